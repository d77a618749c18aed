"""A :class:`~mtprune.config.Timing` put to work: the setups it names, the host memory and threads it times
with, and the keywords of the latency functions — the one place ``cost``, ``prune``, a run's latency stage
and ``bench/latency.py`` read a timing request from."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Any

import torch

from mtprune.config import Timing, check_timing
from mtprune.cost.host_memory import CACHED, SYSTEM, can_cache, host_memory_context
from mtprune.cost.latency import check_latency_args
from mtprune.cost.runtimes import ONNXRUNTIME, TORCH, Setup, setups_of


def host_memory_of(timing: Timing) -> str:
    """``timing.host_memory``, or its default: ``cached`` where several setups compete and glibc allows it
    (the fastest a deployment can ship), else ``system``."""
    if timing.host_memory is not None:
        return timing.host_memory
    return CACHED if len(setups_of(timing)) > 1 and can_cache() else SYSTEM


@contextlib.contextmanager
def timed_as(timing: Timing) -> Iterator[str]:
    """The block runs with ``timing.threads`` CPU threads (restored after) and its host memory
    (:func:`host_memory_of`); yields the host memory mode."""
    threads = torch.get_num_threads()
    if timing.threads:
        torch.set_num_threads(timing.threads)
    mode = host_memory_of(timing)
    try:
        with host_memory_context(mode):
            yield mode
    finally:
        torch.set_num_threads(threads)


def latency_kw(timing: Timing) -> dict[str, Any]:
    """The keywords of :func:`~mtprune.cost.latency.latency_against` / ``compare_cost`` for ``timing``
    (checked first: one line for a request this machine cannot honour)."""
    check_timing(timing)
    check_latency_args(timing.device, timing.dtype, timing.runs)
    kw = {"setups": setups_of(timing), "device": timing.device, "dtype": timing.dtype, "runs": timing.runs}
    return kw | {"precision": timing.precision}


def table_setup(timing: Timing, fastest: Setup | None = None) -> tuple[str, bool]:
    """``(runtime, channels_last)`` a ``--round-to auto`` table times its convs in: ONNX Runtime for
    ``onnxruntime``, PyTorch channels_last for ``channels-last``, PyTorch contiguous for ``eager``, ``fold-bn``
    and ``compile`` (convs run with a bias, BN folded, either way); with several setups, the one ``fastest``
    names (the dense net's fastest; contiguous PyTorch when not given)."""
    setups = setups_of(timing)
    st = setups[0] if len(setups) == 1 else (fastest or Setup())
    return (ONNXRUNTIME, False) if st.runtime == ONNXRUNTIME else (TORCH, st.channels_last)
