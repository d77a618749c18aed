"""The one paired-rounds loop every timing of mtprune runs in.

Two things timed minutes apart are not comparable on a shared machine (other tenants, clock frequency,
memory state drift; bench/README.md). So whatever is compared — nets, setups, layers, candidate channel
counts — is timed round-robin: each round calls every function once, in alternating order, and a ratio is
taken per round (:func:`paired_ratio`), so that a drift hits every side alike.
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable, Mapping
from typing import Any


def paired_rounds(
    fns: Mapping[str, Callable[[], Any]],
    rounds: int,
    warmup: int = 0,
    *,
    clock: Callable[[], float] = time.perf_counter,
    sync: Callable[[], None] = lambda: None,
    counter: Callable[[], int] | None = None,
    before: Callable[[str, bool], None] | None = None,
    until: Callable[[dict[str, list[float]]], bool] | None = None,
    max_rounds: int | None = None,
) -> tuple[dict[str, list[float]], dict[str, list[int]]]:
    """Each function of ``fns`` called ``warmup`` times (in order), then ``rounds`` rounds of one call of
    each, alternating the order every round. Returns the wall time (ms) of every timed call per name and,
    with ``counter`` (read before and after each call: e.g. page faults), its increase per call. ``sync``
    runs before each clock read (CUDA); ``before(name, timed)`` before each call (per-layer hooks);
    ``clock``: seconds (tests pass a fake one). With ``until``: after the rounds, more blocks of ``rounds``
    rounds while ``until(times)`` is false, up to ``max_rounds`` in all (a noisy machine: the figures are
    not yet known well enough)."""
    names = list(fns)
    times: dict[str, list[float]] = {n: [] for n in names}
    counts: dict[str, list[int]] = {n: [] for n in names}
    for n in names:
        for _ in range(warmup):
            if before is not None:
                before(n, False)
            fns[n]()
    r = 0
    while not (r >= rounds and r % rounds == 0 and (until is None or r >= (max_rounds or r) or until(times))):
        r += 1
        for n in names if r % 2 == 1 else reversed(names):
            if before is not None:
                before(n, True)
            sync()
            c0, t0 = (counter() if counter else 0), clock()
            fns[n]()
            sync()
            times[n].append((clock() - t0) * 1000.0)
            counts[n].append((counter() if counter else 0) - c0)
    return times, counts


def ratio_halfwidth(times: list[float], reference: list[float]) -> float:
    """The half-width of a 95 % interval of the paired ratio's median, ``1.96 × 1.2533 × σ / √n`` with ``σ``
    estimated robustly from the per-round ratios' IQR (``IQR / 1.349``): how well the ratio is known."""
    ratios = [a / b for a, b in zip(times, reference, strict=True)]
    if len(ratios) < 4:
        return float("inf")
    return 1.96 * 1.2533 * (iqr(ratios) / 1.349) / len(ratios) ** 0.5


def iqr(v: list[float]) -> float:
    """The inter-quartile range of ``v``."""
    q = statistics.quantiles(v, n=4, method="inclusive")
    return q[2] - q[0]


def paired_ratio(times: list[float], reference: list[float]) -> dict[str, float]:
    """``{"ratio", "ratio_iqr"}``: median and IQR over rounds of ``times[i] / reference[i]``."""
    ratios = [a / b for a, b in zip(times, reference, strict=True)]
    return {"ratio": statistics.median(ratios), "ratio_iqr": iqr(ratios)}
