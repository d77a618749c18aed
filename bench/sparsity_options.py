"""Which sparse-training settings make the γ choose the channels (issue 17, point 4).

    python bench/sparsity_options.py --config src/mtprune/configs/demo.yaml --init RUN/train-seg --out OUT \
        [--ratio 0.5] [--option NAME KEY=VALUE ...]...

For every option (a name and ``--set`` overrides), runs ``sparse-mtp`` and ``sparse-slimming`` from the same
dense ``train-seg`` model (the product's stages, resumable: a rerun reuses finished ones), then prints and
writes ``OUT/options.json``: per stage and part the sparse fraction (|γ| below ``run.sparsity_threshold`` ×
the part's 95th percentile) and the |γ| quantiles, and the kept-channel Jaccard overlap at ``--ratio`` of
the MTP plan with Slimming's and of each with the plan the dense net's own |γ| give. Without ``--option``
it runs the built-in set below. Accuracy after fine-tuning is ``mtprune run``'s job.
"""

from __future__ import annotations

import argparse
import os
from pathlib import Path

from mtprune import load_model
from mtprune.config import load_config
from mtprune.io import read_json, write_json
from mtprune.pipeline import run_stage
from mtprune.pruning import make_plan, plan_overlap, scorer_inputs

OPTIONS = {
    "as shipped": [],
    "subgradient α 0.05": ["sparse_mtp.alpha1=0.05", "sparse_mtp.alpha2=0.05", "sparse_slimming.alpha=0.05"],
    "proximal α 0.5": [
        "sparse_mtp.l1=proximal", "sparse_mtp.alpha1=0.5", "sparse_mtp.alpha2=0.5",
        "sparse_slimming.l1=proximal", "sparse_slimming.alpha=0.5",
    ],
    "proximal α 1": [
        "sparse_mtp.l1=proximal", "sparse_mtp.alpha1=1.0", "sparse_mtp.alpha2=1.0",
        "sparse_slimming.l1=proximal", "sparse_slimming.alpha=1.0",
    ],
    "proximal α 2": [
        "sparse_mtp.l1=proximal", "sparse_mtp.alpha1=2.0", "sparse_mtp.alpha2=2.0",
        "sparse_slimming.l1=proximal", "sparse_slimming.alpha=2.0",
    ],
}  # fmt: skip


def _with_gamma_lr(l1: str, alpha: float, gamma_lr: float) -> list[str]:
    return [
        f"sparse_mtp.l1={l1}", f"sparse_mtp.alpha1={alpha}", f"sparse_mtp.alpha2={alpha}",
        f"sparse_mtp.gamma_lr={gamma_lr}", f"sparse_slimming.l1={l1}", f"sparse_slimming.alpha={alpha}",
        f"sparse_slimming.gamma_lr={gamma_lr}",
    ]  # fmt: skip


OPTIONS |= {  # the γ's own learning rate (bench/README.md, first table)
    "proximal α 1.5": _with_gamma_lr("proximal", 1.5, 1),
    "proximal α 0.05 γlr 10": _with_gamma_lr("proximal", 0.05, 10),
    "proximal α 0.2 γlr 10": _with_gamma_lr("proximal", 0.2, 10),
    "proximal α 0.4 γlr 10": _with_gamma_lr("proximal", 0.4, 10),
    "subgradient α 0.02 γlr 10": _with_gamma_lr("subgradient", 0.02, 10),
    "subgradient α 0.05 γlr 10": _with_gamma_lr("subgradient", 0.05, 10),
}


def _plan(folder: Path, cfg, ratio: float):
    return make_plan(load_model(folder), "bn", ratio, **scorer_inputs("bn", folder, cfg))


def run_option(name: str, sets: list[str], a: argparse.Namespace) -> dict:
    cfg = load_config(a.config, [*sets, "eval.final=false"])
    out = a.out / name.replace(" ", "_")
    row: dict = {"option": name, "set": sets}
    for stage in ("sparse-mtp", "sparse-slimming"):
        m = run_stage(stage, cfg, out / stage, init=str(a.init))
        row[stage] = {k: m[k] for k in ("sparse_backbone", "sparse_decoder", "gamma_backbone", "gamma_decoder")}
    dense = _plan(a.init, cfg, a.ratio)
    mtp, slim = _plan(out / "sparse-mtp", cfg, a.ratio), _plan(out / "sparse-slimming", cfg, a.ratio)
    row["overlap"] = {
        "mtp~slimming": plan_overlap(mtp, slim),
        "mtp~dense": plan_overlap(mtp, dense),
        "slimming~dense": plan_overlap(slim, dense),
    }
    return row


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--config", required=True)
    ap.add_argument("--init", required=True, type=Path, help="a finished train-seg folder")
    ap.add_argument("--out", required=True, type=Path)
    ap.add_argument("--ratio", type=float, default=0.5)
    ap.add_argument("--option", nargs="+", action="append", metavar=("NAME", "KEY=VALUE"), default=None)
    a = ap.parse_args()
    options = {o[0]: o[1:] for o in a.option} if a.option else OPTIONS
    os.environ.setdefault("MTPRUNE_NO_PROGRESS", "1")
    path = a.out / "options.json"
    rows = [r for r in (read_json(path) if path.is_file() else []) if r["option"] not in options]
    for name, sets in options.items():
        rows.append(run_option(name, sets, a))
        write_json(path, rows)
        r = rows[-1]
        ov, mt, sl = r["overlap"], r["sparse-mtp"], r["sparse-slimming"]
        print(
            f"{name:22s} mtp sparse bb/dec {mt['sparse_backbone']:.2f}/{mt['sparse_decoder']:.2f}"
            f"  slim {sl['sparse_backbone']:.2f}/{sl['sparse_decoder']:.2f}"
            f"  overlap mtp~slim {ov['mtp~slimming']['all']:.3f}  mtp~dense {ov['mtp~dense']['all']:.3f}"
            f"  slim~dense {ov['slimming~dense']['all']:.3f}",
            flush=True,
        )


if __name__ == "__main__":
    main()
