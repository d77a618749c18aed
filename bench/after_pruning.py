"""What "mIoU right after pruning" measures: each pruned net of a run evaluated as pruned, with ThiNet's
least-squares rescaling of the consumers applied to its plan, and with its BatchNorm statistics re-estimated on
training images (``recalibrate_bn``) — no training in any of them.

    python bench/after_pruning.py runs/effnet-options/l1-0.25-distill/seed-0 [more seed folders …] \
        [--tags uniform-macs0.5 mtp-macs0.5-independent …] [--images 64] [--json FILE]

Each seed folder is an ``mtprune run`` folder: ``prune-TAG/`` (plan.json; ThiNet's pruned model) and the stage its
plan was made from (``train-seg``, ``sparse-mtp``, ``sparse-slimming``). The images are the run's configured
segmentation training set, drawn from its seed (as ThiNet's statistics are).
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from pathlib import Path
from typing import Any

import torch

TAGS = ["uniform-macs0.5", "mtp-macs0.5-independent", "slimming-macs0.5-independent", "thinet-macs0.5"]


def _source(tag: str) -> str:
    return {"mtp": "sparse-mtp", "slimming": "sparse-slimming"}.get(tag.split("-")[0], "train-seg")


def measure(seed_dir: Path, tags: list[str], images: int) -> dict[str, dict[str, float]]:
    from mtprune.checkpoint import load_model
    from mtprune.config import load_config
    from mtprune.data.from_config import sample_images
    from mtprune.evaluate.validation import final_metrics
    from mtprune.pruning import apply_plan, recalibrate_bn
    from mtprune.pruning.plan import PLAN_FILE, PruningPlan
    from mtprune.pruning.thinet import thinet_rescale, thinet_statistics
    from mtprune.train.distributed import DistEnv

    cfg = load_config(seed_dir / "config.yaml", ["run.qualitative=0"])
    env = DistEnv(0, 1, 0, torch.device("cpu"))
    batches = sample_images(cfg, images)

    def miou(model: torch.nn.Module) -> float:
        return final_metrics(model, cfg, env, ("seg",), force=True)["miou"]

    out: dict[str, dict[str, float]] = {}
    for tag in tags:
        prune_dir = seed_dir / f"prune-{tag}"
        if not prune_dir.is_dir():
            continue
        plan = PruningPlan.from_dict(json.loads((prune_dir / PLAN_FILE).read_text()))
        row: dict[str, float] = {}
        if tag.startswith("thinet"):  # its own pruned model: already rescaled
            row["as_pruned"] = miou(load_model(prune_dir / "model"))
        else:
            dense = load_model(seed_dir / _source(tag))
            stats = thinet_statistics(dense, dense.prunable_layers(), images=batches, num_samples=images, seed=cfg.seed)
            model = apply_plan(dense, plan)
            row["as_pruned"] = miou(model)
            thinet_rescale(model, plan, stats)
            row["ls_rescaled"] = miou(model)
        model = load_model(prune_dir / "model") if tag.startswith("thinet") else apply_plan(
            load_model(seed_dir / _source(tag)), plan)  # fmt: skip
        recalibrate_bn(model, batches)
        row["bn_recalibrated"] = miou(model)
        out[tag] = row
        print(seed_dir, tag, {k: round(v * 100, 2) for k, v in row.items()}, flush=True)
    return out


def table(result: dict[str, dict[str, dict[str, float]]]) -> str:
    tags = [t for t in TAGS + sorted({t for r in result.values() for t in r}) if any(t in r for r in result.values())]
    tags = list(dict.fromkeys(tags))
    cols = [("as_pruned", "as pruned"), ("ls_rescaled", "consumers rescaled (ThiNet's least squares)"),
            ("bn_recalibrated", "BN statistics re-estimated")]  # fmt: skip
    lines = ["| plan, mIoU % right after pruning | " + " | ".join(c for _, c in cols) + " |", "|---" * 4 + "|"]
    for t in tags:
        cells = []
        for key, _ in cols:
            v = [r[t][key] * 100 for r in result.values() if t in r and key in r[t]]
            cells.append("–" if not v else f"{statistics.fmean(v):.2f}" + (f" ± {statistics.stdev(v):.2f}"
                                                                             if len(v) > 1 else ""))  # fmt: skip
        lines.append(f"| {t} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("seeds", nargs="*", type=Path)
    ap.add_argument("--tags", nargs="+", default=TAGS)
    ap.add_argument("--images", type=int, default=64)
    ap.add_argument("--json", default=None)
    ap.add_argument("--render", default=None, metavar="JSON")
    a = ap.parse_args(argv)
    if a.render:
        print(table(json.loads(Path(a.render).read_text())["seeds"]))
        return 0
    torch.set_num_threads(1)  # beside a training run on a 2-core box
    result: dict[str, Any] = {"images": a.images, "seeds": {}}
    for d in a.seeds:
        result["seeds"][str(d)] = measure(d, a.tags, a.images)
        if a.json:
            from mtprune.io import write_json

            write_json(a.json, result)
    print(table(result["seeds"]))
    return 0


if __name__ == "__main__":
    sys.exit(main())
