"""How busy the machine was while something was timed: the CPU time other processes took, from the kernel's
counters (``/proc/stat``) less this process's own (``getrusage``). A latency ratio timed while other
processes ran is paired per round, but its spread grows; :mod:`mtprune.cost.latency` re-times until the ratio
is known well enough, and says so in one ``warning:`` line when it is not."""

from __future__ import annotations

import os
import time
from pathlib import Path
from types import TracebackType

try:
    import resource
except ImportError:  # not on POSIX
    resource = None  # type: ignore[assignment]

STAT = Path("/proc/stat")


def busy_seconds(stat_text: str, ticks: int) -> float:
    """CPU seconds spent busy by all cores (user, nice, system, irq, softirq, steal) in ``/proc/stat``'s
    first line (``ticks`` per second)."""
    fields = stat_text.splitlines()[0].split()
    assert fields[0] == "cpu", "not /proc/stat"
    values = [int(v) for v in fields[1:]]
    user, nice, system, _idle, _iowait, irq, softirq, steal = (values + [0] * 8)[:8]
    return (user + nice + system + irq + softirq + steal) / ticks


def _busy() -> float | None:
    try:
        return busy_seconds(STAT.read_text(), os.sysconf("SC_CLK_TCK"))
    except (OSError, ValueError, AssertionError):
        return None


def _own() -> float:
    if resource is None:
        return 0.0
    r = resource.getrusage(resource.RUSAGE_SELF)
    return r.ru_utime + r.ru_stime


class LoadWatch:
    """A block's ``others``: the cores other processes kept busy on average while it ran (None where the
    kernel's counters cannot be read)."""

    def __enter__(self) -> LoadWatch:
        self.t0, self.busy0, self.own0 = time.perf_counter(), _busy(), _own()
        self.others: float | None = None
        return self

    def __exit__(self, kind: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None) -> None:
        busy, wall = _busy(), time.perf_counter() - self.t0
        if busy is not None and self.busy0 is not None and wall > 0:
            self.others = max(0.0, (busy - self.busy0) - (_own() - self.own0)) / wall
