"""The dense net of the real-ImageNet benchmark (``configs/camvid_effnet.yaml``): has it converged, and what
is ImageNet worth here?

Trains the dense segmentation net (stage ``train-seg``, validation mIoU after every epoch) in three arms:
``imagenet`` (the config's budget), ``imagenet-long`` (1.5× the epochs: converged when it gains < 0.5 mIoU)
and ``random`` (the config's budget from random initialisation: the ImageNet knowledge the premise is about).
Every arm is an ordinary resumable stage folder under ``--out``; a finished one is reused. Writes the curves,
the final mIoU of each arm, the step time and the machine to ``--json``.

    python bench/effnet_dense.py --out runs/effnet-dense --json bench/results/effnet_dense_cpu.json
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

ARMS = ("imagenet", "imagenet-long", "random")


def _curve(folder: Path) -> list[dict[str, float]]:
    rows = [json.loads(x) for x in (folder / "metrics.jsonl").read_text().splitlines() if x.strip()]
    return [{"epoch": r["epoch"], "step": r["step"], "val_miou": r["val_miou"]} for r in rows if "val_miou" in r]


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--config", default="configs/camvid_effnet.yaml")
    ap.add_argument("--set", nargs="*", default=[], metavar="KEY=VALUE", help="config overrides")
    ap.add_argument("--arms", nargs="+", default=list(ARMS), choices=ARMS)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", required=True)
    ap.add_argument("--json", required=True, help="results file")
    args = ap.parse_args(argv)
    from latency import run_header
    from mtprune.config import load_config
    from mtprune.io import read_json, write_json
    from mtprune.pipeline import run_stage

    result: dict[str, Any] = {**run_header("effnet_dense.py", 0), "config": args.config, "arms": {}}
    for arm in args.arms:
        cfg = load_config(args.config, [*args.set, f"seed={args.seed}", "eval.every_epoch=true"])
        if arm == "imagenet-long":
            cfg.train_seg.epochs *= 1.5
        if arm == "random":
            cfg.model.backbone_weights = None
        folder = Path(args.out) / arm
        run_stage("train-seg", cfg, folder)
        done = read_json(folder / "done.json")
        result["arms"][arm] = {
            "epochs": cfg.train_seg.epochs,
            "steps": done["steps"],
            "miou": done["metrics"]["miou"],
            "curve": _curve(folder),
            "throughput": done.get("throughput"),
        }
        write_json(args.json, result)
        print(f"{arm}: {done['steps']} steps, val mIoU {100 * done['metrics']['miou']:.2f}", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
