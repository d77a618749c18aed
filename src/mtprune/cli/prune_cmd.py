"""``mtprune prune``: prune a model physically to a ratio or a budget (:func:`mtprune.api.prune_checkpoint`),
write ``plan.json`` and the pruned checkpoint, print what changed."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

from mtprune.api import PruneRequest, PruneResult, check_destination, prune_checkpoint
from mtprune.cli.args import check_out, claim_out, positive_int
from mtprune.cli.model_args import add_model_source, add_timing, model_source, timing_of
from mtprune.config import THINET_SAMPLES, load_config
from mtprune.errors import UsageError
from mtprune.models.base import BACKBONE, DECODER
from mtprune.pruning import METHODS, NORMALIZE, SCORERS, THRESHOLDS, parse_target, scorer_of
from mtprune.pruning.plan import PLAN_FILE

#: the ``run.`` keys ``mtprune prune --set`` reads (the rest of a plan's settings are its flags)
_PRUNE_RUN_KEYS = ("run.recalibrate_bn=",)


def _request(args: argparse.Namespace) -> tuple[PruneRequest, Path, bool]:
    """The typed request of the parsed options, ``--out`` and ``--overwrite`` (one line for a flag that does not
    apply)."""
    cfg = load_config(args.config, args.set)
    ignored = [kv.split("=", 1)[0] for kv in args.set if kv.startswith("run.") and not kv.startswith(_PRUNE_RUN_KEYS)]
    if ignored:
        raise UsageError(f"--set {ignored[0]}: mtprune prune takes the plan's settings as its own flags (--help); "
                         "--set only describes the training images (data.seg, seed, run.recalibrate_bn)")  # fmt: skip
    if scorer_of(args.method) != "thinet":
        thinet = [f for f, v in (("--samples", args.samples), ("--no-rescale", args.no_rescale)) if v]
        data = [f for f, v in (("--config", args.config), ("--set", args.set)) if v]
        if data and not cfg.run.recalibrate_bn:
            thinet = data + thinet
        if thinet:
            raise UsageError(f"{', '.join(thinet)}: only with --method thinet (or --set run.recalibrate_bn=N)")
    timed = args.round_to == "auto" or (args.target is not None and args.target[0] == "latency")
    if not timed and (args.runtime is not None or args.timing):
        raise UsageError("--runtime / --timing: only with --target latency=X or --round-to auto")
    source = model_source(args)
    stream = sys.stderr if args.json else sys.stdout
    request = PruneRequest(
        source=source.checkpoint or source.model(),
        method=args.method,
        ratio=args.ratio,
        target=args.target,
        thresholds=args.thresholds,
        round_to=args.round_to,
        min_channels=args.min_channels,
        size=(args.size[0], args.size[1]),
        timing=timing_of(args.runtime, args.timing),
        config=cfg,
        samples=args.samples,
        rescale=not args.no_rescale,
        normalize=args.normalize,
        recalibrate_bn=cfg.run.recalibrate_bn,
        on_candidate=_candidate_printer(stream) if args.target else None,
        log=lambda line: print(line, file=sys.stderr, flush=True),
    )
    if source.checkpoint and source.spec:
        raise UsageError("give either --model or --checkpoint, not both")
    return request, Path(args.out), args.overwrite


def _prune(args: argparse.Namespace) -> int:
    request, out, overwrite = _request(args)
    result = prune_request(request, out, overwrite)
    if args.json:
        print(json.dumps(result.summary))
    else:
        _print_pruned(result, out)
    return 0


def prune_request(request: PruneRequest, out: Path, overwrite: bool) -> PruneResult:
    """Prune into ``out`` (checked first; written under its writer lock once everything was computed)."""
    check_destination(request, out)
    check_out(out, overwrite)
    return prune_checkpoint(request, out, claim=lambda: claim_out(out, overwrite))


def _candidate_printer(stream: Any) -> Any:
    """Each candidate of a target search as one line, as it is measured."""

    def show(c: dict[str, Any]) -> None:
        figures = ", ".join(f"{k} {v:.4f}" for k, v in c.items() if k != "ratio")
        print(f"  candidate p={c['ratio']:.4f}: {figures}", file=stream, flush=True)

    return show


def _print_pruned(result: PruneResult, out: Path) -> None:
    plan, s = result.plan, result.summary
    before, after, size = s["before"], s["after"], s["size"]
    print(f"pruned {result.model.name} with {s['method']}, ratio {plan.ratio:.4g} ({plan.thresholds} thresholds)")
    for name, r in (plan.rounding or {}).items():
        why = f"; {r['why']}" if "why" in r else ""
        print(
            f"  round-to auto: {name} {r['from']} → {r['to']} channels ({r['ms_from']:.3f} → {r['ms_to']:.3f} ms{why})"
        )
    if plan.target is not None:
        (metric, budget), reached = next(iter(plan.target.items())), plan.target["reached"]
        tried = len(plan.target["candidates"])
        print(f"  target {metric} ≤ {budget:g}×: ratio {plan.ratio:.4g} found in {tried} candidates, {reached:.4f}×")
    print(f"  removed: backbone {s['removed'][BACKBONE]:.1%}, decoder {s['removed'][DECODER]:.1%} of prunable channels")
    if "thinet" in s:
        t = s["thinet"]
        print(f"  thinet: {t['images']} training images, {'rescaled' if t['rescale'] else 'no rescaling'}")
    print(f"  params {before['params'] / 1e6:.2f} M -> {after['params'] / 1e6:.2f} M ({s['params_ratio']:.3f}×)")
    print(
        f"  MACs   {before['macs'] / 1e9:.2f} G -> {after['macs'] / 1e9:.2f} G ({s['macs_ratio']:.3f}×) "
        f"at {size[0]}×{size[1]}"
    )
    print(f"  wrote {out / PLAN_FILE} and the pruned model in {out}")


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


def _round_to(text: str) -> int | str:
    if text == "auto":
        return text
    try:
        return int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"'{text}' is not a multiple K or auto") from None


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("prune", help="prune a model physically and write plan.json + the pruned checkpoint")
    add_model_source(p)
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
    p.add_argument(
        "--thresholds",
        default="independent",
        choices=THRESHOLDS,
        help="independent (per part, the paper), unified (one ranking) or layerwise (each layer its own: "
        "uniform's counts, the method's choice of channels)",
    )
    p.add_argument(
        "--normalize",
        default="none",
        choices=NORMALIZE,
        help="mean: each layer's scores divided by their mean before the threshold (with --thresholds unified: a "
        "channel is compared with its own layer's scale, no layer goes wholesale); none (default): as scored",
    )
    p.add_argument(
        "--round-to",
        type=_round_to,
        default=1,
        metavar="K|auto",
        help="round each kept count up to a multiple of K; auto: to the count (up to the next multiple of 32) whose "
        "conv and consumers run fastest in --runtime, timed once per shape and cached",
    )
    add_timing(p, "--target latency=X, --round-to auto")
    p.add_argument("--min-channels", type=int, default=1, metavar="N", help="channels every layer keeps at least")
    p.add_argument(
        "--size", type=positive_int, nargs=2, default=[513, 513], metavar=("H", "W"), help="input size for MACs"
    )
    p.add_argument("--out", required=True, metavar="DIR", help="output directory (new or empty)")
    p.add_argument("--overwrite", action="store_true", help="replace what --out holds (it is cleared first)")
    p.add_argument("--json", action="store_true", help="print the summary as JSON")
    th = p.add_argument_group(
        "training images, as `mtprune train` describes them (thinet; and --set run.recalibrate_bn=N: N of them "
        "re-estimate every BatchNorm's statistics after pruning)"
    )
    th.add_argument("--config", metavar="FILE", help="YAML config (default: the embedded synthetic setup)")
    th.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="override a config key")
    th.add_argument("--samples", type=int, metavar="N", help=f"training images measured (default {THINET_SAMPLES})")
    th.add_argument("--no-rescale", action="store_true", help="skip the least-squares rescaling of the next layers")
    p.set_defaults(func=_prune)
