"""``mtprune cost``: parameters, MACs and measured latency of a model — alone, or against the unpruned one."""

from __future__ import annotations

import argparse
import contextlib
import json
import sys
from dataclasses import asdict, dataclass, field
from typing import Any

from mtprune.checkpoint import load_model
from mtprune.cli.args import positive_int
from mtprune.cli.model_args import ModelSource, add_model_source, add_timing, model_source, timing_of
from mtprune.config import Timing
from mtprune.cost import best_latency, compare_cost, model_cost, paired_ratio, setups_of, timed_as
from mtprune.cost.host_memory import CACHED, DEPLOY_ENV
from mtprune.cost.latency import timing_warning
from mtprune.cost.layers import (
    channels_text,
    compare_layers,
    excess_by_kind,
    ideal_ratio,
    layer_latency,
    layer_profiles,
)
from mtprune.cost.runtimes import ONNXRUNTIME, TORCH
from mtprune.cost.timing import latency_kw
from mtprune.errors import UsageError
from mtprune.models.base import SegmentationModel


@dataclass(frozen=True)
class CostRequest:
    source: ModelSource
    size: tuple[int, int]
    latency: bool = False
    against: str | None = None
    timing: Timing = field(default_factory=Timing)
    per_layer: bool = False
    top: int = 15
    json: bool = False


def _request(args: argparse.Namespace) -> CostRequest:
    timed = args.latency or args.per_layer
    if not timed and (args.runtime is not None or args.timing):
        raise UsageError("--runtime / --timing: only when nets are timed (--latency, --per-layer)")
    return CostRequest(
        model_source(args), (args.size[0], args.size[1]), args.latency, args.against,
        timing_of(args.runtime, args.timing), args.per_layer, args.top, args.json,
    )  # fmt: skip


def _cost(args: argparse.Namespace) -> int:
    return cost(_request(args))


def cost(req: CostRequest) -> int:
    """Measure as ``req`` says and print (a table, or one JSON object)."""
    model = req.source.model()
    if req.latency or req.per_layer:
        latency_kw(req.timing)  # a request this machine cannot honour: one line before any work
    with timed_as(req.timing) if req.latency or req.per_layer else contextlib.nullcontext() as mode:
        figures = _against(req, model) if req.against else _alone(req, model)
    rows = figures.pop("_rows", None)
    warning = timing_warning(figures) if req.against and req.latency else None
    if warning:
        print(warning, file=sys.stderr)
    if req.latency:
        figures["host_memory"] = mode
    if req.json:
        print(json.dumps(figures))
    elif req.against:
        print(_against_text(req, figures))
    else:
        print(_alone_text(req, model, figures, rows))
    return 0


def _alone(req: CostRequest, model: SegmentationModel) -> dict[str, Any]:
    """One net: params, MACs; latency in its setup, or with several setups each and the fastest."""
    setups, t = setups_of(req.timing), req.timing
    several = len(setups) > 1
    one = {"device": t.device, "dtype": t.dtype, "runs": t.runs}
    if not several and req.latency:
        st = setups[0]
        one.update(channels_last=st.channels_last, fold_bn=st.fold_bn, compile=st.compile, runtime=st.runtime)
    out = model_cost(model, req.size, latency=req.latency and not several, **one)
    if req.latency and several:
        best = best_latency(model, req.size, t.device, t.dtype, t.runs, setups=setups)
        b = best["best"]
        out.update({k: b[k] for k in ("latency_ms", "latency_iqr_ms", "device", "page_faults")})
        out.update({"latency_runs": t.runs, "best": b, "configs": best["configs"]})
    elif req.latency:
        out["setup"] = setups[0].label
    if req.per_layer:
        layout, fold_bn = _eager_setup(req.timing, out.get("configs"))
        rows, total = layer_latency(
            model, req.size, device=t.device, channels_last=layout == "channels_last", fold_bn=fold_bn
        )
        out["layers"] = [{**_row(r), "gmacs_per_s": r.gmacs_per_s} for r in rows]
        out["layers_total_ms"] = total
        out["_rows"] = rows
    return out


def _against(req: CostRequest, model: SegmentationModel) -> dict[str, Any]:
    """The net against ``req.against`` (the unpruned one), timed in the same rounds; with ``per_layer`` layer
    by layer too."""
    against = load_model(req.against)
    kw = latency_kw(req.timing) if req.latency else {}
    out = compare_cost(model, against, req.size, latency=req.latency, **kw)
    if req.per_layer:
        layout, fold_bn = _eager_setup(req.timing, out.get("configs"))
        both = layer_profiles(
            {"this": model, "against": against}, req.size, device=req.timing.device,
            channels_last=layout == "channels_last", fold_bn=fold_bn, runs=req.timing.runs,
        )  # fmt: skip
        this, other = both["this"], both["against"]
        rows = compare_layers(this, other)
        out.update(
            layers=rows,
            layers_ideal_ratio=ideal_ratio(rows),
            layers_total_ms=this.total_ms,
            against_layers_total_ms=other.total_ms,
            layers_ratio=paired_ratio(this.totals_ms, other.totals_ms)["ratio"],
            layers_setup={"layout": layout, "fold_bn": fold_bn},
            layers_runs=req.timing.runs,
        )
    return out


def _eager_setup(timing: Timing, configs: list[dict[str, Any]] | None) -> tuple[str, bool]:
    """The layout and BN folding of a per-layer profile (forward hooks need eager modules): the timing's one
    eager setup, or with several the fastest eager one timed (contiguous, unfolded when none was)."""
    eager = [c for c in configs or [] if c["runtime"] == TORCH and not c["compile"]]
    if eager:
        fastest = min(eager, key=lambda c: c["latency_ms"])
        return fastest["layout"], fastest["fold_bn"]
    st = setups_of(timing)[0]
    if len(setups_of(timing)) == 1 and st.runtime == TORCH and not st.compile:
        return ("channels_last" if st.channels_last else "contiguous"), st.fold_bn
    return "contiguous", False


def _row(r: Any) -> dict[str, Any]:
    """A :class:`~mtprune.cost.layers.LayerTime` as JSON, without its per-run times."""
    return {k: v for k, v in asdict(r).items() if k != "times_ms"}


# --- rendering -------------------------------------------------------------------------------------
def _named(setup: str) -> str:
    return "ONNX Runtime (CPU)" if setup == ONNXRUNTIME else setup


def host_memory_text(mode: str) -> str:
    if mode != CACHED:
        return mode
    return f"cached (freed memory kept for reuse; a deployment: {' '.join(f'{k}={v}' for k, v in DEPLOY_ENV.items())})"


def _alone_text(req: CostRequest, model: SegmentationModel, c: dict[str, Any], rows: list | None) -> str:
    lines = [
        f"model   {model.name} (width {model.width}, {model.num_classes} classes)",
        f"size    {req.size[0]}×{req.size[1]}",
        f"params  {c['params'] / 1e6:.2f} M",
        f"MACs    {c['macs'] / 1e9:.2f} G",
    ]
    if req.latency and "configs" not in c:
        lines.append(
            f"latency {c['latency_ms']:.2f} ms median (IQR {c['latency_iqr_ms']:.2f} ms, {c['latency_runs']} runs, "
            f"{c['device']}, {req.timing.dtype}, {_named(c['setup'])})"
        )
    if req.latency and "configs" in c:
        lines.append("latency by setup (median ± IQR, page faults per forward):")
        for s in c["configs"]:
            mark = "  ← fastest" if s["setup"] == c["best"]["setup"] else ""
            lines.append(
                f"  {_named(s['setup']):24s} {s['latency_ms']:9.2f} ± {s['latency_iqr_ms']:.2f} ms "
                f"{s['page_faults']:8d}{mark}"
            )
        b = c["best"]
        lines.append(
            f"fastest {_named(b['setup'])}, timed alone: {b['latency_ms']:.2f} ms median "
            f"(IQR {b['latency_iqr_ms']:.2f} ms)"
        )
    if req.latency:
        lines.append(f"memory  {host_memory_text(c['host_memory'])}; {c['page_faults']} page faults per forward")
    if req.per_layer:
        lines.append(_layer_table(rows or [], c["layers_total_ms"], req.top))
    return "\n".join(lines)


def _against_text(req: CostRequest, c: dict[str, Any]) -> str:
    size = req.size
    lines = [
        f"size    {size[0]}×{size[1]}      {'this':>12s} {'against':>12s} {'ratio':>8s}",
        f"params  {c['params'] / 1e6:10.2f} M {c['against_params'] / 1e6:10.2f} M {c['params_ratio']:8.3f}",
        f"MACs    {c['macs'] / 1e9:10.3f} G {c['against_macs'] / 1e9:10.3f} G {c['macs_ratio']:8.3f}",
    ]
    if req.latency:
        lines += [
            f"latency {c['latency_ms']:9.2f} ms {c['against_latency_ms']:9.2f} ms {c['latency_ratio']:8.3f}"
            f" ± {c['latency_ratio_iqr']:.3f} (median and IQR of {c['runs']} paired rounds, {c['device']})",
            f"gap     latency ratio − MACs ratio = {c['gap']:+.3f}",
            f"setup   this: {_named(c['config']['setup'])}; against: {_named(c['against_config']['setup'])}",
            f"memory  {host_memory_text(c['host_memory'])}; page faults per forward: this "
            f"{c['page_faults']}, against {c['against_page_faults']}",
        ]
        if len(c["configs"]) > 1:
            lines.append("by setup (this / against ms, same-setup ratio):")
            lines += [
                f"  {_named(s['setup']):24s} {s['latency_ms']:9.2f} / {s['against_latency_ms']:9.2f}  "
                f"{s['same_setup_ratio']:.3f}"
                for s in c["configs"]
            ]
    if req.per_layer:
        lines.append(_layers_against_table(c, req.top))
    return "\n".join(lines)


def _layer_table(layers: list, total_ms: float, top: int) -> str:
    """The ``top`` slowest layers, then the time by layer kind and the time outside modules."""
    lines = [
        f"per layer (forward hooks, median of 5 runs; forward {total_ms:.1f} ms with hooks):",
        f"  {'layer':38s} {'kind':24s} {'in→out':>11s} {'out size':>9s} {'MMACs':>8s} {'ms':>8s} "
        f"{'GMAC/s':>7s} {'%':>5s}",
    ]
    for r in sorted(layers, key=lambda r: r.ms, reverse=True)[:top]:
        io, hw = f"{r.in_channels}→{r.out_channels}", f"{r.out_size[0]}×{r.out_size[1]}"
        lines.append(
            f"  {r.name[:38]:38s} {r.kind:24s} {io:>11s} {hw:>9s} {r.macs / 1e6:8.1f} {r.ms:8.2f} "
            f"{r.gmacs_per_s:7.1f} {100 * r.ms / total_ms:5.1f}"
        )
    by_kind: dict[str, float] = {}
    for r in layers:
        k = r.kind.split(" ")[0]
        by_kind[k] = by_kind.get(k, 0.0) + r.ms
    kinds = ", ".join(f"{k} {v:.1f} ms" for k, v in sorted(by_kind.items(), key=lambda kv: -kv[1]))
    lines.append(
        f"  by kind: {kinds}; outside modules (interpolate, sums, cat …) {total_ms - sum(by_kind.values()):.1f} ms"
    )
    return "\n".join(lines)


def _layers_against_table(cost: dict[str, Any], top: int) -> str:
    """The ``top`` layers that cost most beyond shrinking with their work, then the totals by kind."""
    rows, setup = cost["layers"], cost["layers_setup"]
    lines = [
        f"per layer, both nets in the same {cost['layers_runs']} rounds ({setup['layout']}"
        f"{', BN folded' if setup['fold_bn'] else ''}; forward with hooks {cost['against_layers_total_ms']:.1f} → "
        f"{cost['layers_total_ms']:.1f} ms, paired × {cost['layers_ratio']:.3f}); most time beyond their work:",
        f"  {'layer':38s} {'kind':22s} {'in→out (against → this)':>26s} {'ms':>17s} {'× paired':>9s} {'work ×':>7s} "
        f"{'excess':>8s}",
    ]
    for r in rows[:top]:
        lines.append(
            f"  {r['name'][:38]:38s} {r['kind'][:22]:22s} {channels_text(r):>26s} {r['against_ms']:7.2f} → "
            f"{r['ms']:7.2f} {r['ratio']:9.3f} {r['work_ratio']:7.3f} {r['excess_ms']:+8.2f}"
        )
    summary = "; ".join(f"{k} {a:.1f} → {b:.1f} ms ({e:+.1f})" for k, (a, b, e) in excess_by_kind(rows).items())
    lines.append(f"  by kind (against → this, excess): {summary}")
    fixed = next((r for r in rows if r["kind"] == "functional"), None)
    between = f"; the time between modules stays: {fixed['against_ms']:.1f} → {fixed['ms']:.1f} ms" if fixed else ""
    lines.append(
        f"  if every layer shrank with its work: × {cost['layers_ideal_ratio']:.3f} (the floor of this plan here"
        f"{between})"
    )
    return "\n".join(lines)


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("cost", help="parameters, MACs (= FLOPs/2) and measured latency of a model")
    add_model_source(p)
    p.add_argument("--size", required=True, type=positive_int, nargs=2, metavar=("H", "W"), help="input size")
    p.add_argument("--latency", action="store_true", help="also measure latency (batch 1, median of the runs)")
    p.add_argument(
        "--against",
        metavar="DIR",
        help="a second checkpoint (the unpruned net): ratios of params, MACs and, with --latency, of latency, both "
        "nets timed in paired rounds (one forward of each per round), each in its fastest --runtime",
    )
    add_timing(p, "with --latency / --per-layer")
    p.add_argument(
        "--per-layer",
        action="store_true",
        help="time every layer (forward hooks) and list the slowest with their MACs and GMAC/s; with --against "
        "both nets in the same rounds, each layer's paired ratio against its work (MACs) ratio",
    )
    p.add_argument("--top", type=int, default=15, metavar="N", help="layers listed by --per-layer (default 15)")
    p.add_argument("--json", action="store_true", help="print one JSON object")
    p.set_defaults(func=_cost)
