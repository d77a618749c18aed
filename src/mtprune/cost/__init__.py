"""What a net costs: parameters, MACs (= FLOPs/2, the paper's count) and measured latency.

One timing vocabulary (:class:`~mtprune.config.Timing`: runtime, device, paired rounds, threads, host
memory, dtype), one paired-rounds loop (:mod:`mtprune.cost.rounds`), the runtimes (:mod:`~mtprune.cost.runtimes`),
per-layer profiles (:mod:`~mtprune.cost.layers`) and the conv timing tables of ``--round-to auto``
(:mod:`~mtprune.cost.tables`). Below ``pruning``: pruning policies read these measurements.
"""

from mtprune.config import RUNTIMES, Timing
from mtprune.cost.counting import count_macs, count_params
from mtprune.cost.latency import (
    best_latency,
    compare_cost,
    interleaved_latency,
    latency_against,
    measure_latency,
    model_cost,
)
from mtprune.cost.rounds import paired_ratio, paired_rounds
from mtprune.cost.runtimes import Setup, all_setups, fold_batchnorm, setups_of
from mtprune.cost.timing import latency_kw, timed_as

__all__ = [
    "RUNTIMES",
    "Setup",
    "Timing",
    "all_setups",
    "best_latency",
    "compare_cost",
    "count_macs",
    "count_params",
    "fold_batchnorm",
    "interleaved_latency",
    "latency_against",
    "latency_kw",
    "measure_latency",
    "model_cost",
    "paired_ratio",
    "paired_rounds",
    "setups_of",
    "timed_as",
]
