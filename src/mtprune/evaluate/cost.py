"""Cost accounting: parameters, MACs (= FLOPs / 2, as the paper counts) and measured latency.

MACs come from :class:`torch.utils.flop_counter.FlopCounterMode`, which counts the matrix work of
convolutions and matrix products (2 FLOPs per multiply-accumulate) and nothing else (no BN, activation,
pooling or interpolation), the convention of the paper's tables.
"""

from __future__ import annotations

import statistics
import time
from dataclasses import asdict, dataclass

import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

from mtprune.errors import UsageError


def count_params(model: nn.Module) -> int:
    """Parameters of the segmentation net as deployed (BN running statistics are buffers, not counted).

    For a :class:`~mtprune.models.SegmentationModel` the classification head and the training-only
    auxiliary heads are left out, as the paper's tables count them.
    """
    if hasattr(model, "seg_num_params"):
        return int(model.seg_num_params())
    return sum(p.numel() for p in model.parameters())


@torch.no_grad()
def count_macs(model: nn.Module, size: tuple[int, int], batch: int = 1) -> int:
    """Multiply-accumulates of one segmentation forward at input ``size`` (H, W), batch 1, eval mode."""
    was_training = model.training
    model.eval()
    p = next(model.parameters())
    x = torch.zeros(batch, 3, *size, device=p.device, dtype=p.dtype)
    counter = FlopCounterMode(display=False)
    with counter:
        model(x)
    model.train(was_training)
    return counter.get_total_flops() // 2


@dataclass
class Latency:
    latency_ms: float
    latency_iqr_ms: float
    device: str
    runs: int


def fold_batchnorm(model: nn.Module) -> nn.Module:
    """An inference copy of ``model`` with every BatchNorm that follows a convolution folded into the
    convolution's weights (``W' = γ/σ·W``, ``b' = β + γ/σ·(b − m)``), as deployment runtimes do.

    Uses ``torch.fx`` (``torch.fx.experimental.optimization.fuse``): the copy is a ``GraphModule`` that
    computes the segmentation output of ``model.forward``, equal to it up to float rounding, in eval mode.
    The original model is not changed.
    """
    from torch.fx.experimental.optimization import fuse

    try:
        return fuse(model.eval(), inplace=False)
    except Exception as e:  # a model torch.fx cannot trace
        raise UsageError(f"cannot fold BatchNorm into convolutions: torch.fx failed to trace the model ({e})") from None


@torch.no_grad()
def measure_latency(
    model: nn.Module,
    size: tuple[int, int],
    device: str = "cpu",
    dtype: str = "float32",
    channels_last: bool = False,
    warmup: int = 5,
    runs: int = 20,
    fold_bn: bool = False,
    compile: bool = False,
) -> Latency:
    """Median and inter-quartile range of the wall time of a batch-1 forward, after ``warmup`` runs.

    On CUDA every run is synchronised before the clock is read. ``dtype="bfloat16"`` runs under
    autocast. The model is moved to ``device`` (and ``channels_last`` memory format if asked).
    ``fold_bn`` times an inference copy with BatchNorm folded into the convolutions
    (:func:`fold_batchnorm`); ``compile`` times ``torch.compile(model)`` (the compilation happens in
    the warm-up runs and is not timed).
    """
    if runs < 20:
        raise UsageError(f"latency needs at least 20 timed runs (got {runs})")
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise UsageError("--device cuda asked for, but CUDA is not available on this machine")
    dtypes = {"float32": torch.float32, "bfloat16": torch.bfloat16}
    if dtype not in dtypes:
        raise UsageError(f"unknown dtype '{dtype}'; choose from float32, bfloat16")
    model = model.eval()
    if fold_bn:
        model = fold_batchnorm(model)
    model = model.to(device)
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    model = model.to(memory_format=fmt)
    if compile:
        model = torch.compile(model)
        warmup = max(warmup, 2)
    x = torch.randn(1, 3, *size, device=device).to(memory_format=fmt)
    autocast = torch.autocast(device_type=torch.device(device).type, dtype=torch.bfloat16, enabled=dtype == "bfloat16")
    sync = torch.cuda.synchronize if device.startswith("cuda") else (lambda: None)
    times = []
    with autocast:
        for i in range(warmup + runs):
            sync()
            t0 = time.perf_counter()
            model(x)
            sync()
            if i >= warmup:
                times.append((time.perf_counter() - t0) * 1000.0)
    q = statistics.quantiles(times, n=4, method="inclusive")
    name = (
        torch.cuda.get_device_name(device) if device.startswith("cuda") else f"cpu ({torch.get_num_threads()} threads)"
    )
    return Latency(statistics.median(times), q[2] - q[0], name, runs)


def model_cost(
    model: nn.Module,
    size: tuple[int, int],
    latency: bool = False,
    **latency_kw: object,
) -> dict[str, object]:
    """``{"params", "macs", "size"}`` and, with ``latency=True``, ``latency_ms``, ``latency_iqr_ms``,
    ``device`` — the keys of ``mtprune cost --json``."""
    out: dict[str, object] = {"params": count_params(model), "macs": count_macs(model, size), "size": list(size)}
    if latency:
        lat = measure_latency(model, size, **latency_kw)  # type: ignore[arg-type]
        d = asdict(lat)
        out.update({k: d[k] for k in ("latency_ms", "latency_iqr_ms", "device")})
        out["latency_runs"] = lat.runs
    return out
