"""Cost accounting: parameters, MACs (= FLOPs / 2, as the paper counts) and measured latency.

MACs come from :class:`torch.utils.flop_counter.FlopCounterMode`, which counts the matrix work of
convolutions and matrix products (2 FLOPs per multiply-accumulate) and nothing else (no BN, activation,
pooling or interpolation), the convention of the paper's tables.
"""

from __future__ import annotations

import contextlib
import copy
import statistics
import tempfile
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

from mtprune.errors import UsageError
from mtprune.evaluate.host_memory import host_memory, minor_faults
from mtprune.models.base import eval_mode
from mtprune.models.groups import bn_source, dependency_graph
from mtprune.pruning.apply import apply_plan


def count_params(model: nn.Module) -> int:
    """Parameters of the segmentation net as deployed (BN running statistics are buffers, not counted).

    For a :class:`~mtprune.models.SegmentationModel` the classification head and the training-only
    auxiliary heads are left out, as the paper's tables count them.
    """
    if hasattr(model, "seg_num_params"):
        return int(model.seg_num_params())
    return sum(p.numel() for p in model.parameters())


def plan_cost(model: nn.Module, metric: str, size: tuple[int, int], **latency_kw: Any) -> Callable[[Any], Any]:
    """``plan → the pruned net's MACs (at ``size``) or params as a fraction of ``model``'s``: each plan is
    applied to a copy of ``model`` on the meta device (shapes only, no weights: fast on any model). For
    ``latency``: ``plan → {"latency", "latency_iqr", "macs"}``, the pruned copy timed against ``model``
    (:func:`latency_against` with ``latency_kw``: ``setups``, ``device``, ``runs``, ``warmup``)."""
    if metric == "latency":
        return _latency_cost(model, size, **latency_kw)
    if metric not in ("macs", "params"):
        raise UsageError(f"the cost of a plan is its macs, params or latency, not {metric}")

    def measure(m: nn.Module) -> float:
        return float(count_macs(m, size) if metric == "macs" else count_params(m))

    shapes = copy.deepcopy(model).to("meta")
    base = measure(shapes)

    def ratio(plan: Any) -> float:
        pruned = copy.deepcopy(shapes)
        apply_plan(pruned, plan)
        return measure(pruned) / base

    return ratio


def _latency_cost(model: nn.Module, size: tuple[int, int], **latency_kw: Any) -> Callable[[Any], dict[str, float]]:
    """``plan → {"latency": paired latency ratio of the pruned net against model, "latency_iqr", "macs"}``."""
    macs = plan_cost(model, "macs", size)

    def cost(plan: Any) -> dict[str, float]:
        pruned = apply_plan(copy.deepcopy(model), plan)
        r = latency_against({"pruned": pruned}, model, size, **latency_kw)["pruned"]
        return {"latency": r["latency_ratio"], "latency_iqr": r["latency_ratio_iqr"], "macs": macs(plan)}

    return cost


@torch.no_grad()
def count_macs(model: nn.Module, size: tuple[int, int], batch: int = 1) -> int:
    """Multiply-accumulates of one segmentation forward at input ``size`` (H, W), batch 1, eval mode."""
    p = next(model.parameters())
    x = torch.zeros(batch, 3, *size, device=p.device, dtype=p.dtype)
    counter = FlopCounterMode(display=False)
    with eval_mode(model), counter:
        model(x)
    return counter.get_total_flops() // 2


@dataclass
class Latency:
    latency_ms: float
    latency_iqr_ms: float
    device: str
    runs: int
    page_faults: int = 0  # median minor page faults per forward
    host_memory: str = "system"  # mtprune.evaluate.host_memory.host_memory() while timed


def fold_batchnorm(model: nn.Module) -> nn.Module:
    """An inference copy of ``model`` with every BatchNorm that follows a convolution folded into the
    convolution's weights (``W' = γ/σ·W``, ``b' = β + γ/σ·(b − m)``), as deployment runtimes do.

    Uses ``torch.fx`` (``torch.fx.experimental.optimization.fuse``): the copy is a ``GraphModule`` that
    computes the segmentation output of ``model.forward``, equal to it up to float rounding, in eval mode.
    A model ``torch.fx`` cannot trace (a wrapped user net: its forward is the net's own) is folded module by
    module instead (:func:`_fold_by_graph`). The original model is not changed.
    """
    from torch.fx.experimental.optimization import fuse  # imported when used: torch.fx is slow to import

    try:
        with eval_mode(model):
            return fuse(model, inplace=False)
    except Exception:  # noqa: BLE001 - any model torch.fx cannot trace
        return _fold_by_graph(model)


def _fold_by_graph(model: nn.Module) -> nn.Module:
    """A copy of ``model`` in eval mode whose convs that feed exactly one BatchNorm — and that BN nothing
    else — carry the BN folded in (the BN becomes an identity), found on Torch-Pruning's dependency graph."""
    from torch.nn.utils.fusion import fuse_conv_bn_eval

    net = copy.deepcopy(model).eval()
    try:
        dg = dependency_graph(net)
    except Exception as e:  # noqa: BLE001 - a model Torch-Pruning cannot trace either
        raise UsageError(f"cannot fold BatchNorm into convolutions: the model could not be traced ({e})") from None
    names = {id(m): n for n, m in net.named_modules()}
    for bn in [m for m in net.modules() if isinstance(m, nn.BatchNorm2d) and m in dg.module2node]:
        conv = bn_source(dg, bn)
        if not isinstance(conv, nn.Conv2d) or {id(o.module) for o in dg.module2node[conv].outputs} != {id(bn)}:
            continue
        net.set_submodule(names[id(conv)], fuse_conv_bn_eval(conv, bn))
        net.set_submodule(names[id(bn)], nn.Identity())
    return net


def check_latency_args(device: str, dtype: str, runs: int) -> None:
    """One line for a timing request this machine cannot honour: too few runs, no CUDA, an unknown dtype."""
    if runs < 20:
        raise UsageError(f"latency needs at least 20 timed runs (got {runs})")
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise UsageError("--device cuda asked for, but CUDA is not available on this machine")
    if dtype not in ("float32", "bfloat16"):
        raise UsageError(f"unknown dtype '{dtype}'; choose from float32, bfloat16")


def _inference_net(model: nn.Module, device: str, channels_last: bool, fold_bn: bool, compile: bool) -> nn.Module:
    """The net as it will be timed: eval mode, BN folded if asked, on ``device``, in the memory format."""
    model = model.eval()
    if fold_bn:
        model = fold_batchnorm(model)
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    model = model.to(device).to(memory_format=fmt)
    return torch.compile(model) if compile else model


def _device_name(device: str) -> str:
    if device.startswith("cuda"):
        return torch.cuda.get_device_name(device)
    return f"cpu ({torch.get_num_threads()} threads)"


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
    runtime: str = "torch",
    *,
    clock: Callable[[], float] = time.perf_counter,
) -> Latency:
    """Median and inter-quartile range of the wall time of a batch-1 forward, after ``warmup`` runs.

    On CUDA every run is synchronised before the clock is read. ``dtype="bfloat16"`` runs under
    autocast. The model is moved to ``device`` (and ``channels_last`` memory format if asked).
    ``fold_bn`` times an inference copy with BatchNorm folded into the convolutions
    (:func:`fold_batchnorm`); ``compile`` times ``torch.compile(model)`` with inductor's freezing (weights
    pre-packed once; the compilation happens in the warm-up runs and is not timed); ``runtime="onnxruntime"``
    times the net exported to ONNX in ONNX Runtime instead (:class:`Setup`). To compare nets with each other, use
    :func:`interleaved_latency`, which cancels the machine's drift between measurements. ``clock``: the
    timer read around each run, in seconds (tests pass a fake one).
    """
    setups = {"model": Setup(channels_last, fold_bn, compile, runtime)}
    kw = {"warmup": warmup, "runs": runs, "setups": setups, "clock": clock}
    r = interleaved_latency({"model": model}, size, device, dtype, **kw)["model"]
    return Latency(r["latency_ms"], r["latency_iqr_ms"], r["device"], runs, r["page_faults"], r["host_memory"])


#: the runtimes a net can be timed in: PyTorch itself, or ONNX Runtime's CPU execution provider
TORCH, ONNXRUNTIME = "torch", "onnxruntime"


@dataclass(frozen=True)
class Setup:
    """How a net is run for timing: memory layout, BatchNorm folded, ``torch.compile`` — or, with
    ``runtime="onnxruntime"``, exported to ONNX and run by ONNX Runtime on the CPU (which folds BatchNorm,
    fuses convolutions with their sums and activations and picks its own layout: the other fields are moot)."""

    channels_last: bool = False
    fold_bn: bool = False
    compile: bool = False
    runtime: str = TORCH

    @property
    def label(self) -> str:
        if self.runtime == ONNXRUNTIME:
            return ONNXRUNTIME
        parts = ["channels_last" if self.channels_last else "contiguous"]
        parts += ["foldbn"] if self.fold_bn and not self.compile else []
        parts += ["compile"] if self.compile else []
        return "/".join(parts)


@torch.no_grad()
def interleaved_latency(
    models: dict[str, nn.Module],
    size: tuple[int, int],
    device: str = "cpu",
    dtype: str = "float32",
    channels_last: bool = False,
    fold_bn: bool = False,
    compile: bool = False,
    warmup: int = 5,
    runs: int = 20,
    reference: str | None = None,
    setups: dict[str, Setup] | None = None,
    *,
    clock: Callable[[], float] = time.perf_counter,
) -> dict[str, dict[str, object]]:
    """Latency of several nets measured round-robin: each of the ``runs`` rounds times one batch-1 forward
    of every net (in alternating order), so that slow drifts of the machine — other tenants, clock
    frequency, memory state — hit every net alike. Separate measurements minutes apart differed by 12 %
    for the same net on the development box (bench/README.md); paired rounds cancel that.

    Every net runs with ``channels_last`` / ``fold_bn`` / ``compile``, or with its own :class:`Setup`
    from ``setups`` (same keys as ``models``; the same model object may appear under several keys, each
    gets its own copy). Returns ``{name: {"latency_ms", "latency_iqr_ms", "device", "runs", "page_faults"
    (median minor page faults per forward: the host memory each forward maps afresh), "host_memory"
    (:func:`~mtprune.evaluate.host_memory.host_memory`)}}`` and, with
    ``reference`` (a key of ``models``), ``"ratio"`` and ``"ratio_iqr"``: the median and IQR over rounds
    of the net's time divided by the reference's time in the same round. ``clock``: the timer read just
    before and just after each timed forward, in seconds (``time.perf_counter``; tests pass a fake one).
    """
    check_latency_args(device, dtype, runs)
    if reference is not None and reference not in models:
        raise UsageError(f"reference '{reference}' is not one of the nets timed ({', '.join(models)})")
    default = Setup(channels_last, fold_bn, compile)
    chosen = {n: (setups or {}).get(n, default) for n in models}
    _check_runtimes(chosen.values(), device, dtype)
    nets: dict[str, Callable[[Any], Any]] = {}
    inputs, seen = {}, set()
    for n, m in models.items():
        st = chosen[n]
        x = torch.randn(1, 3, *size, device=device, generator=torch.Generator(device).manual_seed(0))
        if st.runtime == ONNXRUNTIME:
            nets[n], inputs[n] = _ort_net(m, size), x.numpy()
            continue
        if id(m) in seen and not st.fold_bn:  # layout changes are in place: give each entry its own module
            m = copy.deepcopy(m)
        seen.add(id(m))
        nets[n] = _inference_net(m, device, st.channels_last, st.fold_bn, st.compile)
        inputs[n] = x.to(memory_format=torch.channels_last if st.channels_last else torch.contiguous_format)
        warmup = max(warmup, 2) if st.compile else warmup
    autocast = torch.autocast(device_type=torch.device(device).type, dtype=torch.bfloat16, enabled=dtype == "bfloat16")
    sync = torch.cuda.synchronize if device.startswith("cuda") else (lambda: None)
    names = list(nets)
    times: dict[str, list[float]] = {n: [] for n in names}
    faults: dict[str, list[int]] = {n: [] for n in names}
    with autocast, _compile_settings(len(names)):
        for n in names:
            for _ in range(warmup):
                nets[n](inputs[n])
        for r in range(runs):
            for n in names if r % 2 == 0 else reversed(names):
                sync()
                f0, t0 = minor_faults(), clock()
                nets[n](inputs[n])
                sync()
                times[n].append((clock() - t0) * 1000.0)
                faults[n].append(minor_faults() - f0)
    out: dict[str, dict[str, object]] = {}
    for n in names:
        out[n] = {"latency_ms": statistics.median(times[n]), "latency_iqr_ms": _iqr(times[n])}
        out[n].update({"device": _device_name(device), "runs": runs, "times_ms": times[n]})
        out[n].update({"page_faults": int(statistics.median(faults[n])), "host_memory": host_memory()})
        if reference is not None:
            out[n].update(paired_ratio(times[n], times[reference]))
    return out


def _check_runtimes(setups: Iterable[Setup], device: str, dtype: str) -> None:
    """One line for a runtime that cannot run as asked: ONNX Runtime is timed on the CPU, in float32."""
    for st in setups:
        if st.runtime not in (TORCH, ONNXRUNTIME):
            raise UsageError(f"unknown runtime '{st.runtime}'; choose from {TORCH}, {ONNXRUNTIME}")
        if st.runtime == ONNXRUNTIME and (device != "cpu" or dtype != "float32"):
            raise UsageError(f"ONNX Runtime is timed on the CPU in float32 (asked: {device}, {dtype})")


def _ort_net(model: nn.Module, size: tuple[int, int]) -> Callable[[Any], Any]:
    """``model`` exported to ONNX (a temporary file, gone once loaded) and loaded into an ONNX Runtime CPU
    session with all graph optimisations, torch's thread count and no spinning idle threads (they would slow
    the next net of the round): a function of a ``1×3×H×W`` array."""
    from mtprune.export import export_onnx, ort_session  # the export extra, only when asked for

    net = copy.deepcopy(model).to(memory_format=torch.contiguous_format)  # another entry may hold it channels_last
    with tempfile.TemporaryDirectory(prefix="mtprune-ort-") as tmp:
        path = export_onnx(net, Path(tmp) / "net.onnx", size)
        sess = ort_session(path, threads=torch.get_num_threads(), spin=False)  # nets share the cores in turn
    return lambda x: sess.run(None, {"image": x})


def _compile_settings(nets: int) -> contextlib.AbstractContextManager:
    """``torch.compile`` as an inference deployment uses it: inductor's *freezing* (weights become constants,
    BatchNorm folded, convolution weights pre-packed once for oneDNN instead of reordered on every call),
    and room for one compiled graph per net — falling back to eager silently would time the wrong thing."""
    import torch._dynamo.config as dynamo_config  # when used: importing dynamo costs seconds
    import torch._inductor.config as inductor_config

    stack = contextlib.ExitStack()
    stack.enter_context(inductor_config.patch(freezing=True))
    limit = max(8, 2 * nets)
    stack.enter_context(dynamo_config.patch(**_recompile_limits(dynamo_config, limit, max(256, 4 * limit))))
    return stack


def _recompile_limits(config: Any, per_frame: int, total: int) -> dict[str, Any]:
    """dynamo's private recompile limits, under the names this torch has: ``recompile_limit`` and friends
    (torch ≥ 2.6) or their older names ``cache_size_limit``, ``accumulated_cache_size_limit``,
    ``fail_on_cache_limit_hit``; the one place mtprune touches a private torch setting."""
    names = [
        (("recompile_limit", "cache_size_limit"), per_frame),
        (("accumulated_recompile_limit", "accumulated_cache_size_limit"), total),
        (("fail_on_recompile_limit_hit", "fail_on_cache_limit_hit"), True),
    ]
    out = {}
    for candidates, value in names:
        name = next((n for n in candidates if hasattr(config, n)), None)
        if name is not None:
            out[name] = value
    return out


def _iqr(v: list[float]) -> float:
    q = statistics.quantiles(v, n=4, method="inclusive")
    return q[2] - q[0]


def paired_ratio(times: list[float], reference: list[float]) -> dict[str, float]:
    """``{"ratio", "ratio_iqr"}``: median and IQR over rounds of ``times[i] / reference[i]``."""
    ratios = [a / b for a, b in zip(times, reference, strict=True)]
    return {"ratio": statistics.median(ratios), "ratio_iqr": _iqr(ratios)}


LAYOUTS = ("contiguous", "channels_last")


def all_setups(compile: bool = False, onnxruntime: bool = False) -> list[Setup]:
    """Every configuration a deployment would try: both memory layouts, with and without BatchNorm folded
    into the convolutions (and ``torch.compile`` with freezing, in both layouts, if asked; and ONNX Runtime
    if asked)."""
    variants = [(False, False), (True, False)] + ([(True, True)] if compile else [])
    out = [Setup(layout == "channels_last", f, c) for layout in LAYOUTS for f, c in variants]
    return out + ([Setup(runtime=ONNXRUNTIME)] if onnxruntime else [])


def setup_dict(st: Setup) -> dict[str, object]:
    """``{"layout", "fold_bn", "compile", "runtime"}`` of a :class:`Setup` (the JSON form)."""
    if st.runtime == ONNXRUNTIME:
        return {"layout": "contiguous", "fold_bn": True, "compile": False, "runtime": ONNXRUNTIME}
    layout = "channels_last" if st.channels_last else "contiguous"
    return {"layout": layout, "fold_bn": st.fold_bn, "compile": st.compile, "runtime": TORCH}


def best_latency(
    model: nn.Module,
    size: tuple[int, int],
    device: str = "cpu",
    dtype: str = "float32",
    runs: int = 20,
    warmup: int = 5,
    compile: bool = False,
    onnxruntime: bool = False,
) -> dict[str, object]:
    """The net in its fastest configuration — the figure a deployment engineer ships: every setup of
    :func:`all_setups`, timed round-robin (:func:`interleaved_latency`), and which was fastest.

    Returns ``{"best": {"layout", "fold_bn", "compile", "runtime", "latency_ms", "latency_iqr_ms", "device",
    "page_faults"}, "configs": [...], "host_memory"}``.
    """
    setups = {st.label: st for st in all_setups(compile, onnxruntime)}
    timed = interleaved_latency(
        dict.fromkeys(setups, model), size, device, dtype, warmup=warmup, runs=runs, setups=setups
    )
    model.to(memory_format=torch.contiguous_format)
    configs = [
        {**setup_dict(st), **{k: timed[name][k] for k in ("latency_ms", "latency_iqr_ms", "device", "page_faults")}}
        for name, st in setups.items()
    ]
    best = min(configs, key=lambda c: c["latency_ms"])
    return {"best": best, "configs": configs, "host_memory": host_memory()}


AGAINST = "against"


def latency_against(
    models: dict[str, nn.Module],
    against: nn.Module,
    size: tuple[int, int],
    setups: Sequence[Setup] = (Setup(),),
    device: str = "cpu",
    dtype: str = "float32",
    runs: int = 20,
    warmup: int = 5,
    *,
    clock: Callable[[], float] = time.perf_counter,
) -> dict[str, dict[str, Any]]:
    """Each net of ``models`` against the reference net ``against`` (the unpruned one), all of them in every
    setup of ``setups``, timed round-robin in one run (:func:`interleaved_latency`; the nets are given back
    in their layout, device and mode); every net, the reference too, then takes its fastest setup, and the
    ratio is paired per round — with
    ``setups=all_setups()`` best against best, the figure a user ships. Used by ``mtprune cost --against``,
    the latency stage of ``mtprune run``, ``prune --target latency=X`` and ``bench/latency.py``.

    Returns ``{name: {"latency_ratio", "latency_ratio_iqr" (median and IQR over rounds of the per-round
    ratio), "latency_ms", "latency_iqr_ms", "against_latency_ms", "against_latency_iqr_ms", "config",
    "against_config" (each net's fastest setup), "device", "runs", "page_faults", "against_page_faults"
    (per forward, in the fastest setups), "host_memory", "times_ms", "configs": [{**setup, "latency_ms",
    "latency_iqr_ms", "same_setup_ratio", "page_faults", "against_page_faults", "times_ms"}]}}``. Run it
    inside :func:`~mtprune.evaluate.host_memory.cached_host_memory` to time the nets as a deployment with
    cached host memory runs them.
    """
    if AGAINST in models:
        raise UsageError(f"'{AGAINST}' names the reference net: give the other nets other names")
    nets = {**models, AGAINST: against}
    entries = {f"{n}|{st.label}": (m, st) for n, m in nets.items() for st in setups}
    kept = {id(m): (m, m.training, next(m.parameters(), torch.empty(0)).device) for m in nets.values()}
    try:
        timed = interleaved_latency(
            {k: m for k, (m, _) in entries.items()}, size, device, dtype, warmup=warmup, runs=runs,
            setups={k: st for k, (_, st) in entries.items()}, clock=clock,
        )  # fmt: skip
    finally:  # the callers' nets come back as they were: layout, device, mode
        for m, training, where in kept.values():
            m.to(where, memory_format=torch.contiguous_format).train(training)

    def fastest(n: str) -> Setup:
        return min(setups, key=lambda st: timed[f"{n}|{st.label}"]["latency_ms"])

    ref = fastest(AGAINST)
    return {n: _against_entry(timed, n, fastest(n), ref, setups) for n in models}


def _against_entry(
    timed: dict[str, dict[str, Any]], name: str, best: Setup, ref: Setup, setups: Sequence[Setup]
) -> dict[str, Any]:
    """One net's figures of :func:`latency_against` from the round-robin timings ``timed``."""
    t, a = timed[f"{name}|{best.label}"], timed[f"{AGAINST}|{ref.label}"]
    r = paired_ratio(t["times_ms"], a["times_ms"])
    configs = [_config_row(st, timed[f"{name}|{st.label}"], timed[f"{AGAINST}|{st.label}"]) for st in setups]
    return {
        "latency_ratio": r["ratio"],
        "latency_ratio_iqr": r["ratio_iqr"],
        "latency_ms": t["latency_ms"],
        "latency_iqr_ms": t["latency_iqr_ms"],
        "against_latency_ms": a["latency_ms"],
        "against_latency_iqr_ms": a["latency_iqr_ms"],
        "config": setup_dict(best),
        "against_config": setup_dict(ref),
        "device": t["device"],
        "runs": t["runs"],
        "page_faults": t["page_faults"],
        "against_page_faults": a["page_faults"],
        "host_memory": t["host_memory"],
        "times_ms": t["times_ms"],
        "against_times_ms": a["times_ms"],
        "configs": configs,
    }


def _config_row(st: Setup, net: dict[str, Any], against: dict[str, Any]) -> dict[str, Any]:
    """A net and the reference in the same setup: both latencies and their paired ratio."""
    return {
        **setup_dict(st),
        "latency_ms": net["latency_ms"],
        "latency_iqr_ms": net["latency_iqr_ms"],
        "against_latency_ms": against["latency_ms"],
        "against_latency_iqr_ms": against["latency_iqr_ms"],
        "same_setup_ratio": paired_ratio(net["times_ms"], against["times_ms"])["ratio"],
        "page_faults": net["page_faults"],
        "against_page_faults": against["page_faults"],
        "times_ms": net["times_ms"],
        "against_times_ms": against["times_ms"],
    }


def compare_cost(
    model: nn.Module,
    against: nn.Module,
    size: tuple[int, int],
    latency: bool = True,
    setups: Sequence[Setup] = (Setup(),),
    **latency_kw: Any,
) -> dict[str, Any]:
    """``model`` (e.g. the pruned net) against ``against`` (the unpruned one): ``params``, ``macs`` of both,
    ``params_ratio``, ``macs_ratio`` and, with ``latency``, :func:`latency_against`'s figures and ``gap``
    (= ``latency_ratio − macs_ratio``: how much less the net speeds up than its work shrinks) — the keys of
    ``mtprune cost --against --json``."""
    out: dict[str, Any] = {"size": list(size)}
    for key, net in (("", model), ("against_", against)):
        out[f"{key}params"], out[f"{key}macs"] = count_params(net), count_macs(net, size)
    out["params_ratio"] = out["params"] / out["against_params"]
    out["macs_ratio"] = out["macs"] / out["against_macs"]
    if latency:
        out.update(latency_against({"model": model}, against, size, setups, **latency_kw)["model"])
        out["gap"] = out["latency_ratio"] - out["macs_ratio"]
    return out


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
        out.update({k: d[k] for k in ("latency_ms", "latency_iqr_ms", "device", "page_faults", "host_memory")})
        out["latency_runs"] = lat.runs
    return out
