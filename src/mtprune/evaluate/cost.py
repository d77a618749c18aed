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


@dataclass
class LayerTime:
    """One leaf module's share of a forward: its MACs and its own wall time (median over runs)."""

    name: str
    kind: str
    in_channels: int
    out_channels: int
    out_size: tuple[int, int]
    macs: int
    ms: float

    @property
    def gmacs_per_s(self) -> float:
        return self.macs / self.ms / 1e6 if self.ms > 0 else 0.0


def _layer_kind(m: nn.Module) -> str:
    if isinstance(m, nn.Conv2d):
        k, s, d = m.kernel_size, m.stride, m.dilation
        g = f" g{m.groups}" if m.groups > 1 else ""
        return f"Conv2d {k[0]}×{k[1]} s{s[0]} d{d[0]}{g}"
    return type(m).__name__


@torch.no_grad()
def layer_latency(
    model: nn.Module,
    size: tuple[int, int],
    device: str = "cpu",
    channels_last: bool = False,
    fold_bn: bool = False,
    warmup: int = 2,
    runs: int = 5,
) -> tuple[list[LayerTime], float]:
    """Where a batch-1 forward spends its time: every leaf module (convolutions, BatchNorms, activations,
    pooling …) with its MACs (``FlopCounterMode``, per module) and its own wall time, median over ``runs``
    forwards after ``warmup``; and the median total forward time in ms. The time of functional operations
    between modules (interpolation, residual sums, concatenation) is the total minus the modules' sum.

    Forward hooks read the clock around each module (synchronising CUDA), which adds a little overhead per
    module: compare layers with each other and with the same layer of another net, not with
    :func:`measure_latency`. Module names are those of ``model`` (the same in a pruned net and its dense
    original), so two nets can be compared layer by layer.
    """
    model = model.eval()
    net = fold_batchnorm(model) if fold_bn else model
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    net = net.to(device).to(memory_format=fmt)
    x = torch.randn(1, 3, *size, device=device).to(memory_format=fmt)
    leaves = {n: m for n, m in net.named_modules() if n and not any(True for _ in m.children())}

    counter = FlopCounterMode(display=False)
    with counter:
        net(x)
    flops: dict[str, int] = {}
    for key, ops in counter.get_flop_counts().items():
        name = key.split(".", 1)[1] if "." in key else ""
        if name in leaves:
            flops[name] = int(sum(ops.values()))

    sync = torch.cuda.synchronize if str(device).startswith("cuda") else (lambda: None)
    times: dict[str, list[float]] = {n: [] for n in leaves}
    shapes: dict[str, tuple[int, int, int, int]] = {}
    starts: dict[str, float] = {}
    recording = [False]

    def pre(name: str):
        def hook(_m, inp):
            if recording[0]:
                sync()
                starts[name] = time.perf_counter()

        return hook

    def post(name: str):
        def hook(_m, inp, out):
            if recording[0]:
                sync()
                times[name].append((time.perf_counter() - starts[name]) * 1000.0)
                if isinstance(out, torch.Tensor) and out.dim() == 4 and isinstance(inp[0], torch.Tensor):
                    shapes[name] = (inp[0].shape[1], out.shape[1], out.shape[2], out.shape[3])

        return hook

    handles = []
    for n, m in leaves.items():
        handles.append(m.register_forward_pre_hook(pre(n)))
        handles.append(m.register_forward_hook(post(n)))
    totals = []
    try:
        for i in range(warmup + runs):
            recording[0] = i >= warmup
            sync()
            t0 = time.perf_counter()
            net(x)
            sync()
            if recording[0]:
                totals.append((time.perf_counter() - t0) * 1000.0)
    finally:
        for h in handles:
            h.remove()
        model.to(memory_format=torch.contiguous_format)
    rows = []
    for n, m in leaves.items():
        if not times[n]:
            continue  # a module the forward does not use (e.g. the classification head)
        ci, co, h, w = shapes.get(n, (0, 0, 0, 0))
        rows.append(LayerTime(n, _layer_kind(m), ci, co, (h, w), flops.get(n, 0) // 2, statistics.median(times[n])))
    return rows, statistics.median(totals)


LAYOUTS = ("contiguous", "channels_last")


def best_latency(
    model: nn.Module,
    size: tuple[int, int],
    device: str = "cpu",
    dtype: str = "float32",
    runs: int = 20,
    warmup: int = 5,
    compile: bool = False,
) -> dict[str, object]:
    """The net in its fastest configuration — the figure a deployment engineer ships: the latency of every
    memory layout (contiguous, channels_last) with and without BatchNorm folded into the convolutions (and
    with ``torch.compile`` too if asked), and which was fastest.

    Returns ``{"best": {"layout", "fold_bn", "compile", "latency_ms", "latency_iqr_ms"}, "configs": [...]}``.
    """
    configs = []
    variants = [(False, False), (True, False)] + ([(True, True)] if compile else [])
    for layout in LAYOUTS:
        for fold, comp in variants:
            lat = measure_latency(
                model,
                size,
                device=device,
                dtype=dtype,
                channels_last=layout == "channels_last",
                warmup=warmup,
                runs=runs,
                fold_bn=fold,
                compile=comp,
            )
            model.to(memory_format=torch.contiguous_format)
            configs.append(
                {
                    "layout": layout,
                    "fold_bn": fold,
                    "compile": comp,
                    "latency_ms": lat.latency_ms,
                    "latency_iqr_ms": lat.latency_iqr_ms,
                    "device": lat.device,
                }
            )
    best = min(configs, key=lambda c: c["latency_ms"])
    return {"best": best, "configs": configs}


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
