"""``mtprune train STAGE --config FILE [--set key=value ...] --out DIR``."""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

from mtprune.config import load_config
from mtprune.pipeline import run_stage
from mtprune.train import STAGES
from mtprune.train.distributed import cleanup


def _train(args: argparse.Namespace) -> int:
    cfg = load_config(args.config, args.set + (["data.skip_bad=true"] if args.skip_bad else []))
    if args.resume and not Path(args.out, "state.safetensors").is_file():
        print(f"note: nothing to resume in {args.out}; starting {args.stage}")
    metrics = run_stage(args.stage, cfg, args.out, init=args.init)
    cleanup()
    shown = {k: v for k, v in metrics.items() if k != "per_class"}
    print(json.dumps(shown) if args.json else f"{args.stage} done: {_metric_line(shown)} (all in {args.out}/done.json)")
    return 0


def _metric_line(metrics: dict[str, Any]) -> str:
    """The scalar metrics, and dicts of scalars as ``key.sub``, as one short line (4 significant digits);
    distributions, lists and the warnings (already printed) stay in done.json."""
    flat: dict[str, Any] = {}
    for k, v in metrics.items():
        if isinstance(v, dict) and all(isinstance(x, int | float | None) for x in v.values()):
            flat.update({f"{k}.{sub}": x for sub, x in v.items()})
        elif isinstance(v, int | float | str | None):
            flat[k] = v
    return ", ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in flat.items())


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("train", help="run one training stage (resumable: rerun the same command to continue)")
    p.add_argument("stage", choices=STAGES, help="the stage of Algorithm 1")
    p.add_argument("--config", metavar="FILE", help="YAML config (defaults: the embedded synthetic setup)")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="override a config key")
    p.add_argument("--init", metavar="DIR", help="start from this checkpoint or stage folder (finetune: required)")
    p.add_argument("--out", required=True, metavar="DIR", help="stage output folder")
    p.add_argument("--resume", action="store_true", help="continue DIR's run (the default when DIR has a state)")
    p.add_argument("--skip-bad", action="store_true", help="skip (and count) unreadable or invalid samples")
    p.add_argument("--json", action="store_true", help="print the final metrics as JSON")
    p.set_defaults(func=_train)
