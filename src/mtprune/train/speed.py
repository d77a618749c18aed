"""Training speed of a stage: the wall time of the steps this process ran (evaluation and checkpoint
writing excluded), split by the data stream each step drew from, and the time spent waiting for data."""

from __future__ import annotations

import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any, Protocol


class Served(Protocol):
    served: int  # samples served so far
    wait_s: float  # seconds spent waiting for the loader


@dataclass
class SpeedMeter:
    """Times steps between :meth:`restart` and :meth:`step_done`; ``clock`` is injectable for tests."""

    streams: Mapping[str, Served]
    world_size: int = 1
    clock: Callable[[], float] = time.perf_counter
    train_s: float = 0.0
    timed_steps: int = 0
    stream_s: dict[str, float] = field(default_factory=dict)  # step time by the data stream the step drew from
    _mark: float | None = None
    _waited: float = 0.0
    _served: dict[str, int] = field(default_factory=dict)

    def restart(self) -> None:
        """Start timing the next step here (after a pause the step time must not count: evaluation)."""
        self._mark = self.clock()

    def step_done(self) -> float:
        """Account the step that just ended; returns the seconds it waited for data."""
        if self._mark is not None:
            dt = self.clock() - self._mark
            self.train_s += dt
            self.timed_steps += 1
            drawn = [n for n, s in self.streams.items() if s.served != self._served.get(n, 0)]
            for n in drawn:
                self.stream_s[n] = self.stream_s.get(n, 0.0) + dt / len(drawn)
        self._served = {n: s.served for n, s in self.streams.items()}
        waited = sum(s.wait_s for s in self.streams.values())
        data_s, self._waited = waited - self._waited, waited
        return data_s

    def report(self) -> dict[str, Any] | None:
        """Training speed of the steps this process ran (a resumed stage: those after the resume).

        ``images_per_s`` per data stream: the images of that stream (all processes together under DDP)
        over the time of the steps that drew from it (``stream_s``: a fine-tuning's classification
        phase, an MTP stage's Eq. 7 steps…); ``steps_per_s`` and ``train_s`` over all steps (evaluation
        and checkpoint writing excluded); ``data_wait_frac``, the share of ``train_s`` spent waiting for
        the data loader — near 0 when the loader keeps up.
        """
        if self.timed_steps == 0 or self.train_s <= 0:
            return None
        return {
            "steps": self.timed_steps,
            "train_s": self.train_s,
            "steps_per_s": self.timed_steps / self.train_s,
            "images_per_s": {
                n: s.served * self.world_size / self.stream_s[n]
                for n, s in self.streams.items()
                if s.served and self.stream_s.get(n)
            },
            "stream_s": dict(self.stream_s),
            "data_wait_frac": sum(s.wait_s for s in self.streams.values()) / self.train_s,
            "world_size": self.world_size,
        }
