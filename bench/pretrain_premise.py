"""MTP's premise on real data: does classification pre-training help the dense segmentation net?

For one configuration (by default the mini benchmark's, ``configs/camvid_cifar_mini.yaml``) and several
seeds, trains the dense segmentation net (stage ``train-seg``) twice with the same budget: from scratch,
and from the ``pretrain-cls`` backbone. Prints validation mIoU of both, their paired per-seed difference
and the wall time of each stage, and writes them as JSON. Every stage is an ordinary mtprune stage folder
(resumable; a finished one is reused), so extra seeds can be added to a finished run.

    python bench/pretrain_premise.py --out runs/premise --seeds 0 1 2 \\
        --set data.seg.train_subset=46 train_seg.epochs=60 pretrain_cls.epochs=10

Run from the repository root (the config names ``../shared/data``). ``--threads`` sets torch's threads:
with two runs at once on a 2-core box give each one thread (see bench/README.md, caveats).
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import sys
import time
from datetime import date
from pathlib import Path
from typing import Any


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--config", default="configs/camvid_cifar_mini.yaml")
    ap.add_argument("--set", nargs="*", default=[], metavar="KEY=VALUE", help="config overrides")
    ap.add_argument("--seeds", nargs="+", type=int, default=[0])
    ap.add_argument("--arms", nargs="+", default=["scratch", "pretrained"], choices=["scratch", "pretrained"])
    ap.add_argument("--out", required=True)
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--json", default=None, help="results file (default OUT/premise.json)")
    ap.add_argument(
        "--pretrained", default=None, metavar="DIR", help="a finished pretrain-cls folder shared by every seed"
    )
    args = ap.parse_args(argv)
    if args.threads:
        os.environ.setdefault("OMP_NUM_THREADS", str(args.threads))
    import torch

    if args.threads:
        torch.set_num_threads(args.threads)
    from mtprune.config import load_config
    from mtprune.io import read_json, write_json
    from mtprune.pipeline import run_stage

    out = Path(args.out)
    rows: list[dict[str, Any]] = []
    for seed in args.seeds:
        cfg = load_config(args.config, [*args.set, f"seed={seed}"])
        cfg.eval.every_epoch = False
        row: dict[str, Any] = {"seed": seed}
        base = out / f"seed{seed}"
        if "pretrained" in args.arms and args.pretrained:
            # a finished pretrain-cls folder shared by every seed (made with its own seed): read, not rerun
            row["cls_top1"] = read_json(Path(args.pretrained) / "done.json")["metrics"].get("top1")
        elif "pretrained" in args.arms:
            t = time.perf_counter()
            m = run_stage("pretrain-cls", cfg, base / "pretrain-cls")
            row["pretrain_s"] = round(time.perf_counter() - t, 1)
            row["cls_top1"] = m.get("top1")
        for arm in args.arms:
            t = time.perf_counter()
            init = (args.pretrained or str(base / "pretrain-cls")) if arm == "pretrained" else None
            m = run_stage("train-seg", cfg, base / f"train-seg-{arm}", init=init)
            row[f"{arm}_s"] = round(time.perf_counter() - t, 1)
            row[arm] = m.get("miou")
        if "scratch" in row and "pretrained" in row:
            row["diff"] = row["pretrained"] - row["scratch"]
        rows.append(row)
        print(row, flush=True)

    summary: dict[str, Any] = {}
    for key in ("scratch", "pretrained", "diff"):
        vals = [r[key] for r in rows if r.get(key) is not None]
        if vals:
            summary[key] = {
                "mean": statistics.fmean(vals),
                "std": statistics.stdev(vals) if len(vals) > 1 else 0.0,
                "n": len(vals),
            }
    result = {
        "date": date.today().isoformat(),
        "machine": f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores",
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
        "command": "python " + " ".join([sys.argv[0], *(argv if argv is not None else sys.argv[1:])]),
        "config": args.config,
        "overrides": args.set,
        "rows": rows,
        "summary": summary,
    }
    write_json(Path(args.json) if args.json else out / "premise.json", result)
    print("\n| seed | scratch mIoU | pre-trained mIoU | Δ | cls top-1 |")
    print("|---|---|---|---|---|")
    for r in rows:

        def f(v: Any) -> str:
            return "" if v is None else f"{100 * v:.2f}"

        print(
            f"| {r['seed']} | {f(r.get('scratch'))} | {f(r.get('pretrained'))} | {f(r.get('diff'))} "
            f"| {f(r.get('cls_top1'))} |"
        )
    for k, s in summary.items():
        print(f"{k}: {100 * s['mean']:.2f} ± {100 * s['std']:.2f} (n={s['n']})")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
