"""Measured latency: batch-1 forwards timed in paired rounds (:func:`~mtprune.cost.rounds.paired_rounds`),
one net, several nets, several setups, or nets against a reference (the unpruned net)."""

from __future__ import annotations

import copy
import statistics
import time
from collections.abc import Callable, Sequence
from contextlib import nullcontext
from dataclasses import asdict, dataclass
from typing import Any

import torch
from torch import nn

from mtprune.cost.counting import count_macs, count_params
from mtprune.cost.host_memory import host_memory, minor_faults
from mtprune.cost.load import LoadWatch
from mtprune.cost.rounds import iqr, paired_ratio, paired_rounds, ratio_halfwidth
from mtprune.cost.runtimes import (
    ONNXRUNTIME,
    Setup,
    all_setups,
    check_runtimes,
    compile_settings,
    inference_net,
    ort_net,
    setup_dict,
)
from mtprune.errors import UsageError


@dataclass
class Latency:
    latency_ms: float
    latency_iqr_ms: float
    device: str
    runs: int
    page_faults: int = 0  # median minor page faults per forward
    host_memory: str = "system"  # mtprune.cost.host_memory.host_memory() while timed


def check_latency_args(device: str, dtype: str, runs: int) -> None:
    """One line for a timing request this machine cannot honour: too few runs, no CUDA, an unknown dtype."""
    if runs < 20:
        raise UsageError(f"latency needs at least 20 timed runs (got {runs})")
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise UsageError("--device cuda asked for, but CUDA is not available on this machine")
    if dtype not in ("float32", "bfloat16"):
        raise UsageError(f"unknown dtype '{dtype}'; choose from float32, bfloat16")


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
    until: Callable[[dict[str, list[float]]], bool] | None = None,
    max_runs: int | None = None,
) -> dict[str, dict[str, object]]:
    """Latency of several nets measured round-robin: each of the ``runs`` rounds times one batch-1 forward
    of every net (in alternating order), so that slow drifts of the machine — other tenants, clock
    frequency, memory state — hit every net alike. Separate measurements minutes apart differ markedly
    for the same net on a shared box (bench/README.md); paired rounds cancel that.

    Every net runs with ``channels_last`` / ``fold_bn`` / ``compile``, or with its own :class:`Setup`
    from ``setups`` (same keys as ``models``; the same model object may appear under several keys, each
    gets its own copy). Returns ``{name: {"latency_ms", "latency_iqr_ms", "device", "runs", "page_faults"
    (median minor page faults per forward: the host memory each forward maps afresh), "host_memory"
    (:func:`~mtprune.cost.host_memory.host_memory`)}}`` and, with
    ``reference`` (a key of ``models``), ``"ratio"`` and ``"ratio_iqr"``: the median and IQR over rounds
    of the net's time divided by the reference's time in the same round. ``clock``: the timer read just
    before and just after each timed forward, in seconds (``time.perf_counter``; tests pass a fake one).
    """
    check_latency_args(device, dtype, runs)
    if reference is not None and reference not in models:
        raise UsageError(f"reference '{reference}' is not one of the nets timed ({', '.join(models)})")
    default = Setup(channels_last, fold_bn, compile)
    chosen = {n: (setups or {}).get(n, default) for n in models}
    check_runtimes(chosen.values(), device, dtype)
    nets: dict[str, Callable[[Any], Any]] = {}
    inputs, seen = {}, set()
    for n, m in models.items():
        st = chosen[n]
        x = torch.randn(1, 3, *size, device=device, generator=torch.Generator(device).manual_seed(0))
        if st.runtime == ONNXRUNTIME:
            nets[n], inputs[n] = ort_net(m, size), x.numpy()
            continue
        if id(m) in seen and not st.fold_bn:  # layout changes are in place: give each entry its own module
            m = copy.deepcopy(m)
        seen.add(id(m))
        nets[n] = inference_net(m, device, st.channels_last, st.fold_bn, st.compile)
        inputs[n] = x.to(memory_format=torch.channels_last if st.channels_last else torch.contiguous_format)
        warmup = max(warmup, 2) if st.compile else warmup
    autocast = torch.autocast(device_type=torch.device(device).type, dtype=torch.bfloat16, enabled=dtype == "bfloat16")
    sync = torch.cuda.synchronize if device.startswith("cuda") else (lambda: None)
    names = list(nets)
    calls = {n: (lambda n=n: nets[n](inputs[n])) for n in names}
    with autocast, compile_settings(len(names)):
        times, faults = paired_rounds(
            calls, runs, warmup, clock=clock, sync=sync, counter=minor_faults, until=until, max_rounds=max_runs
        )
    out: dict[str, dict[str, object]] = {}
    for n in names:
        out[n] = {"latency_ms": statistics.median(times[n]), "latency_iqr_ms": iqr(times[n])}
        out[n].update({"device": _device_name(device), "runs": len(times[n]), "times_ms": times[n]})
        out[n].update({"page_faults": int(statistics.median(faults[n])), "host_memory": host_memory()})
        if reference is not None:
            out[n].update(paired_ratio(times[n], times[reference]))
    return out


def best_latency(
    model: nn.Module,
    size: tuple[int, int],
    device: str = "cpu",
    dtype: str = "float32",
    runs: int = 20,
    warmup: int = 5,
    setups: Sequence[Setup] | None = None,
    *,
    clock: Callable[[], float] = time.perf_counter,
) -> dict[str, object]:
    """The net in its fastest configuration — the figure a deployment engineer ships: every setup of
    ``setups`` (default :func:`~mtprune.cost.runtimes.all_setups`) timed alone, one after the other (as
    :func:`latency_against`: no other runtime's idle threads taxing its calls), and the fastest taken.

    Returns ``{"best": {"layout", "fold_bn", "compile", "runtime", "latency_ms", "latency_iqr_ms", "device",
    "page_faults"}, "configs": [...] (every setup's figures), "host_memory"}``.
    """
    by_label = {st.label: st for st in (all_setups() if setups is None else setups)}
    keys = ("latency_ms", "latency_iqr_ms", "device", "page_faults")
    kw = {"size": size, "device": device, "dtype": dtype, "warmup": warmup, "runs": runs, "clock": clock}
    timed = {name: _timed({name: (model, st)}, **kw)[name] for name, st in by_label.items()}  # each alone
    configs = [{**setup_dict(st), **{k: timed[name][k] for k in keys}} for name, st in by_label.items()]
    return {"best": dict(min(configs, key=lambda c: c["latency_ms"])), "configs": configs, "host_memory": host_memory()}


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
    precision: float | None = None,
    max_runs: int | None = None,
    against_setup: Setup | None = None,
) -> dict[str, dict[str, Any]]:
    """Each net of ``models`` against the reference net ``against`` (the unpruned one), pair by pair, as
    ``cost --against`` times one pair: in one round-robin of many nets each call pays for the net before it
    (another runtime's or layout's idle threads, another net's weights in the caches) and the figures drift
    from the pair's. A pair is timed setup by setup — the two nets round-robin in each setup of ``setups``
    alone (:func:`interleaved_latency`; the nets are given back in their layout, device and mode) — and each
    net takes its fastest setup; the reference's is ``against_setup`` where given, and with several nets it
    is chosen once (:func:`best_latency`), so every pair is paired against the same setup of it. With several
    setups the chosen two are timed again head to head (between calls of different runtimes the idle threads
    of one tax the next, a small net's calls more: bench/README.md, "Mobile-class nets"); the ratio is paired
    per round — with ``setups=all_setups()`` best against best, the figure a user ships.
    Used by ``mtprune cost --against``, the latency stage of ``mtprune run``, ``prune --target latency=X``
    and ``bench/latency.py``.

    Returns ``{name: {"latency_ratio", "latency_ratio_iqr" (median and IQR over rounds of the per-round
    ratio), "latency_ms", "latency_iqr_ms", "against_latency_ms", "against_latency_iqr_ms", "config",
    "against_config" (each net's fastest setup), "device", "runs", "page_faults", "against_page_faults"
    (per forward, in the fastest setups), "host_memory", "times_ms", "configs": [{**setup, "latency_ms",
    "latency_iqr_ms", "same_setup_ratio", "page_faults", "against_page_faults", "times_ms"}]}}``. Run it
    inside :func:`~mtprune.cost.host_memory.cached_host_memory` to time the nets as a deployment with
    cached host memory runs them.

    With ``precision``: blocks of ``runs`` more rounds until every ratio is known to ± ``precision``
    (:func:`~mtprune.cost.rounds.ratio_halfwidth`), up to ``max_runs`` (default 8 × ``runs``); each entry then
    has ``ratio_halfwidth``, ``reliable`` and ``load_others`` (the cores other processes kept busy meanwhile,
    :class:`~mtprune.cost.load.LoadWatch`), and :func:`timing_warning` says when a figure is unreliable.
    """
    if AGAINST in models:
        raise UsageError(f"'{AGAINST}' names the reference net: give the other nets other names")
    if against_setup is not None and against_setup not in setups:
        raise ValueError(f"against_setup {against_setup.label} is not one of the setups timed")
    if len(models) > 1:  # pair by pair: in one round-robin of many nets each call pays for the one before it
        if against_setup is None and len(setups) > 1:
            ref = best_latency(against, size, device, dtype, runs, warmup, setups, clock=clock)["best"]
            against_setup = next(st for st in setups if st.label == ref["setup"])
        kw = {"setups": setups, "device": device, "dtype": dtype, "runs": runs, "warmup": warmup, "clock": clock}
        kw |= {"precision": precision, "max_runs": max_runs, "against_setup": against_setup}
        room = compile_settings(2 * (len(models) + 1)) if any(st.compile for st in setups) else nullcontext()
        with room:  # every pair compiles its net and the reference again: room for all of them
            return {n: latency_against({n: m}, against, size, **kw)[n] for n, m in models.items()}
    nets = {**models, AGAINST: against}
    until = None if precision is None else (lambda times: _known(times, models, setups) <= precision)
    kw = {"size": size, "device": device, "dtype": dtype, "warmup": warmup, "runs": runs, "clock": clock}
    with LoadWatch() as load:
        # which setup is each net's fastest: setup by setup, the two nets round-robin in that setup alone (in
        # one round-robin of every setup each call paid for the runtime before it, and the choice drifted)
        timed: dict[str, dict[str, Any]] = {}
        for st in setups:
            block = {f"{n}|{st.label}": (m, st) for n, m in nets.items()}
            timed |= _timed(block, **kw, until=None if len(setups) > 1 else until, max_runs=max_runs or 8 * runs)

        def fastest(n: str) -> Setup:
            return min(setups, key=lambda st: timed[f"{n}|{st.label}"]["latency_ms"])

        chosen = {n: fastest(n) for n in nets} | ({AGAINST: against_setup} if against_setup else {})
        final = timed
        if len(setups) > 1:  # the chosen setups alone: another runtime's idle threads would tax each call
            alone = {f"{n}|{chosen[n].label}": (m, chosen[n]) for n, m in nets.items()}
            final = _timed(alone, **kw, until=until, max_runs=max_runs or 8 * runs)
    out = {n: _against_entry(final, timed, n, chosen[n], chosen[AGAINST], setups) for n in models}
    for e in out.values():
        e["ratio_halfwidth"] = ratio_halfwidth(e["times_ms"], e["against_times_ms"])
        e["load_others"] = load.others
        e["reliable"] = precision is None or e["ratio_halfwidth"] <= precision
    return out


def _timed(entries: dict[str, tuple[nn.Module, Setup]], **kw: Any) -> dict[str, dict[str, Any]]:
    """:func:`interleaved_latency` of ``entries`` (key → net, setup); the nets are given back as they were:
    layout, device, mode."""
    kept = {id(m): (m, m.training, next(m.parameters(), torch.empty(0)).device) for m, _ in entries.values()}
    try:
        return interleaved_latency(
            {k: m for k, (m, _) in entries.items()}, setups={k: st for k, (_, st) in entries.items()}, **kw
        )
    finally:
        for m, training, where in kept.values():
            m.to(where, memory_format=torch.contiguous_format).train(training)


def _known(times: dict[str, list[float]], models: dict[str, nn.Module], setups: Sequence[Setup]) -> float:
    """The widest half-width of the best-against-best ratios the rounds so far give."""

    def best(n: str) -> list[float]:
        return min((times[k] for st in setups if (k := f"{n}|{st.label}") in times), key=statistics.median)

    ref = best(AGAINST)
    return max(ratio_halfwidth(best(n), ref) for n in models)


def timing_warning(entry: dict[str, Any], what: str = "the latency ratio") -> str | None:
    """One ``warning:`` line when ``entry`` (:func:`latency_against`'s, with a precision) is not known well
    enough: its half-width, the rounds it took and how busy the machine was; None when it is."""
    if entry.get("reliable", True):
        return None
    busy = entry.get("load_others")
    why = f"other processes kept {busy:.1f} cores busy while timing" if busy is not None else "a noisy machine"
    return (
        f"warning: {what} {entry['latency_ratio']:.3f} is known to ±{entry['ratio_halfwidth']:.3f} only after "
        f"{entry['runs']} paired rounds ({why}): unreliable — time it on a quiet machine"
    )


def _against_entry(
    final: dict[str, dict[str, Any]],
    timed: dict[str, dict[str, Any]],
    name: str,
    best: Setup,
    ref: Setup,
    setups: Sequence[Setup],
) -> dict[str, Any]:
    """One net's figures of :func:`latency_against`: best against best from the head-to-head timings ``final``,
    every setup's row from that setup's own rounds ``timed``."""
    t, a = final[f"{name}|{best.label}"], final[f"{AGAINST}|{ref.label}"]
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
