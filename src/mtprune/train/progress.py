"""A stage's progress: a tqdm bar in a terminal; in a log file (stderr not a terminal: CI, ``nohup``, a
cluster job) one plain line every ``interval`` seconds and one at the end, instead of a carriage-return
update per step. ``MTPRUNE_NO_PROGRESS=1`` silences both."""

from __future__ import annotations

import os
import sys
import time
from collections.abc import Callable
from typing import Any, TextIO

from tqdm import tqdm


def _fmt(v: Any) -> str:
    return f"{v:.4g}" if isinstance(v, float) else str(v)


class Progress:
    """``update(postfix)`` after each step, ``close()`` at the end (or before an error is printed)."""

    def __init__(
        self,
        total: int,
        initial: int,
        desc: str,
        enabled: bool = True,
        stream: TextIO | None = None,
        interval: float = 30.0,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.stream = stream or sys.stderr
        self.enabled = enabled and os.environ.get("MTPRUNE_NO_PROGRESS") != "1"
        self.total, self.n, self.desc, self.interval, self.clock = total, initial, desc, interval, clock
        self.tty = self.enabled and hasattr(self.stream, "isatty") and self.stream.isatty()
        self._bar = (
            tqdm(total=total, initial=initial, desc=desc, unit="it", dynamic_ncols=True, file=self.stream)
            if self.tty
            else None
        )
        self._start = self._last = clock()
        self._start_n = self._printed_n = initial
        self._postfix: dict[str, Any] = {}

    def update(self, postfix: dict[str, Any]) -> None:
        self.n += 1
        self._postfix = postfix
        if self._bar is not None:
            self._bar.update(1)
            self._bar.set_postfix({k: _fmt(v) for k, v in postfix.items()}, refresh=False)
        elif self.enabled and self.clock() - self._last >= self.interval:
            self._line()

    def _line(self) -> None:
        now = self.clock()
        rate = (self.n - self._start_n) / max(now - self._start, 1e-9)
        pct = 100.0 * self.n / max(self.total, 1)
        extra = "".join(f", {k}={_fmt(v)}" for k, v in self._postfix.items())
        print(
            f"{self.desc}: step {self.n}/{self.total} ({pct:.0f} %), {rate:.3g} it/s{extra}",
            file=self.stream,
            flush=True,
        )
        self._last, self._printed_n = now, self.n

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()
            self._bar = None
        elif self.enabled and self.n != self._printed_n:
            self._line()
        self.enabled = False
