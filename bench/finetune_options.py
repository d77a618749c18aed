"""Issue 31's options on the real-ImageNet benchmark (``configs/camvid_effnet.yaml``): each option alone and the
chosen combination, for MTP, Slimming and Uniform (distillation for all three), at 0.75× and 0.5× MACs, equal
steps — reusing a finished base run's dense and sparse stages (hard links: only what an option changes is
trained again; ``polarization`` redoes the sparse stages).

    python bench/finetune_options.py --base runs/effnet45 --out runs/effnet-options --seeds 0 1 2 \
        [--options plain distill-logits distill-channel rescale normalize polarization]
    python bench/finetune_options.py --out runs/effnet-options --table     # the table of what has finished
    python bench/finetune_options.py --base runs/effnet-full --out runs/effnet-options-shipped --table
                                                        # the base run's rows as "plain" (the shipped-… options)
    python bench/finetune_options.py --kept bench/results/effnet_options_lr0.001_seed*_cpu_xeon.json --table
                                                        # kept rows ({option: results rows}, seed from the name)
    python bench/finetune_options.py --out runs/effnet-options-shipped --table \
        --save 'bench/results/effnet_options_lr0.001_seed{seed}_cpu_xeon.json'  # OUT's rows kept, one file a seed
    python bench/finetune_options.py --base runs/effnet-options-shipped/shipped-polarization \
        --out runs/effnet-options-shipped --options shipped-polarization-rescale     # a combination on polarization

Each option is an ordinary resumable ``mtprune run`` folder ``OUT/OPTION`` (``seed-K/`` inside); rerun the same
command to continue. The table: per option × model, mIoU (val) mean ± std, mIoU right after pruning, sparsity,
the plan's overlap with Uniform's (when the option's run has Uniform), teacher agreement, the teacher's time per
fine-tuning step, and the paired per-seed differences against ``plain`` and against Uniform under the same option.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import statistics
import subprocess
import sys
from pathlib import Path
from typing import Any

from mtprune.io import write_text

#: what ``COMMON`` turns off, turned back on: the options named ``shipped-…`` change the shipped config alone
SHIPPED = [
    "finetune.distill.weight=1.0",
    "finetune.distill.kind=logits",
    "finetune.distill.temperature=1.0",
    "run.recalibrate_bn=64",
]
#: the polarization regulariser for both sparse stages
POLARIZE = ["sparse_mtp.l1=polarization", "sparse_slimming.l1=polarization"]
#: option → its config overrides
OPTIONS: dict[str, list[str]] = {
    "plain": [],
    "distill-logits": [
        "finetune.distill.weight=1.0",
        "finetune.distill.kind=logits",
        "finetune.distill.temperature=1.0",
    ],
    "distill-channel": [
        "finetune.distill.weight=3.0",
        "finetune.distill.kind=channel",
        "finetune.distill.temperature=4.0",
    ],
    "rescale": ["finetune.rescale_gamma=true"],
    "normalize": ["run.normalize=mean", "run.thresholds=[unified]"],
    "polarization": POLARIZE,
    # issue 28's finding: a switched-off channel's constant act(β) folded into its consumers before removal
    "compensate": ["run.compensate=true"],
    # a sparse stage that shrinks γ by half the median |γ| instead of 1.15 ×, with the constants folded
    "budget-0.5": ["sparse_mtp.l1_budget=0.5", "sparse_slimming.l1_budget=0.5", "run.compensate=true"],
    "budget-0.25": ["sparse_mtp.l1_budget=0.25", "sparse_slimming.l1_budget=0.25", "run.compensate=true"],
    "budget-0.8": ["sparse_mtp.l1_budget=0.8", "sparse_slimming.l1_budget=0.8", "run.compensate=true"],
    # the milder sparse stage alone (nothing else changed: Uniform, FPGM, ThiNet stages reused from the base run)
    "l1-0.25": ["sparse_mtp.l1_budget=0.25", "sparse_slimming.l1_budget=0.25"],
    "l1-0": ["sparse_mtp.l1_budget=0", "sparse_slimming.l1_budget=0"],  # no ℓ1 term: is it the γ ranking?
    # the shipped sparse stage (l1_budget 0.25) with the dense net as teacher of every method's fine-tuning
    "l1-0.25-distill": [
        "sparse_mtp.l1_budget=0.25",
        "sparse_slimming.l1_budget=0.25",
        "finetune.distill.weight=1.0",
        "finetune.distill.kind=logits",
        "finetune.distill.temperature=1.0",
    ],
    # no ℓ1 term with the dense net as teacher of every method's fine-tuning: the two best levers together
    "l1-0-distill": [
        "sparse_mtp.l1_budget=0",
        "sparse_slimming.l1_budget=0",
        "finetune.distill.weight=1.0",
        "finetune.distill.kind=logits",
        "finetune.distill.temperature=1.0",
    ],
    # the milder sparse stage with the dense net as teacher of every method's fine-tuning
    "budget-0.5-distill": [
        "sparse_mtp.l1_budget=0.5",
        "sparse_slimming.l1_budget=0.5",
        "run.compensate=true",
        "finetune.distill.weight=1.0",
        "finetune.distill.kind=logits",
        "finetune.distill.temperature=1.0",
    ],
    # on the shipped config's own run (--base runs/effnet-full: distillation for all, BN re-estimated before
    # fine-tuning): MTP's classification fine-tuning at a fifth of its learning rate — seed 0 of the full run
    # measured the classification epochs at lr 0.005 costing 0.75 / 4.39 mIoU at 0.75× / 0.5×
    "shipped-lr-cls-0.001": [*SHIPPED, "finetune.lr_cls=0.001"],
    # issue 31's options on the shipped config (``shipped-X`` reuses what ``X`` reuses): each alone
    "shipped-l1-0": [
        *SHIPPED,
        "sparse_mtp.l1_budget=0",
        "sparse_slimming.l1_budget=0",
        "run.without_cls_finetune=[mtp]",
    ],
    "shipped-rescale": [*SHIPPED, "finetune.rescale_gamma=true"],
    "shipped-polarization": [*SHIPPED, *POLARIZE],
    "shipped-distill-channel": [
        *SHIPPED,
        "finetune.distill.kind=channel",
        "finetune.distill.weight=3.0",
        "finetune.distill.temperature=4.0",
    ],
    "shipped-normalize": [*SHIPPED, "run.normalize=mean", "run.thresholds=[unified]"],
    # how many channels a layer loses against which ones: Uniform's per-layer counts, the method's |γ| choosing
    "shipped-layerwise": [*SHIPPED, "run.thresholds=[layerwise]"],
    # combinations on the closest lever (run them with --base OUT/shipped-polarization: its sparse stages)
    "shipped-polarization-rescale": [*SHIPPED, *POLARIZE, "finetune.rescale_gamma=true"],
    "shipped-polarization-distill-channel": [
        *SHIPPED,
        *POLARIZE,
        "finetune.distill.kind=channel",
        "finetune.distill.weight=3.0",
        "finetune.distill.temperature=4.0",
    ],
    "shipped-polarization-normalize": [*SHIPPED, *POLARIZE, "run.normalize=mean", "run.thresholds=[unified]"],
}
#: the comparison of issue 31: MTP, Slimming, Uniform; no latency stage (issue 32's subject), pruned nets evaluated
COMMON = [
    "run.methods=[mtp, slimming, uniform]",
    "run.thresholds=[independent]",
    "run.without_cls_finetune=false",
    "run.latency=false",
    "run.eval_pruned=true",
    "finetune.distill.weight=0",  # plain fine-tuning unless the option distils (the config ships distillation on)
    "run.recalibrate_bn=0",  # the pruned nets as the options' runs were made (the config re-estimates BN now)
]
#: the stages an option does not change, linked from the base run (a stage whose recipe an option changes is
#: trained again in the option's folder)
SHARED = ("pretrain-cls", "train-seg", "eval-dense", "sparse-mtp", "sparse-slimming")


def _unchanged(option: str, stage: str) -> bool:
    option = option.removeprefix("shipped-")
    if option == "plain":
        return True  # the base run's own stages: all of them reused
    if option.startswith("polarization-"):  # a combination on a polarization base: what the rest changes
        return _unchanged(option.removeprefix("polarization-"), stage)
    if option.endswith("-distill") and option.startswith("l1-"):  # the sparse stages and plans of the l1- base
        return stage in SHARED or stage.startswith("prune-") or (stage.startswith("eval-") and "-pruned" in stage)
    if option.startswith("l1-"):  # only the sparse stages' ℓ1 budget: what does not start from them is reused
        return not stage.startswith("sparse-") and "mtp" not in stage and "slimming" not in stage
    if option == "polarization" or option.startswith("budget-"):
        return stage in ("pretrain-cls", "train-seg", "eval-dense")
    if option in ("normalize", "compensate", "layerwise"):
        return stage in SHARED
    return stage in SHARED or stage.startswith("prune-") or (stage.startswith("eval-") and stage.endswith("-pruned"))


def _link_stages(base: Path, dest: Path, option: str) -> None:
    """The base seed's stage folders the option does not change, hard-linked into ``dest`` (once; the run
    writes its files atomically, so a linked file is replaced, never changed in place)."""
    if not base.is_dir():  # the base run has not reached this seed: the option's run trains what it needs
        return
    for src in sorted(p for p in base.iterdir() if p.is_dir()):
        dst = dest / src.name
        if _unchanged(option, src.name) and not dst.exists():
            shutil.copytree(src, dst, copy_function=os.link)


def run(args: argparse.Namespace) -> None:
    for option in args.options:
        for seed in args.seeds:
            dest = args.out / option / f"seed-{seed}"
            dest.mkdir(parents=True, exist_ok=True)
            _link_stages(args.base / f"seed-{seed}", dest, option)
            sets = [x for s in [*COMMON, *OPTIONS[option], *args.set, f"seed={seed}"] for x in ("--set", s)]
            cmd = [sys.executable, "-m", "mtprune", "run", args.config, "--out", str(dest), *sets]
            print(f"== {option} seed {seed}: {' '.join(cmd[2:])}", flush=True)
            subprocess.run(cmd, check=True)


def _run_rows(run_dir: Path) -> dict[str, dict[int, dict[str, Any]]]:
    """tag → seed → results row (and the fine-tuning's teacher ms per step) of one run folder (seed-K inside)."""
    found: dict[str, dict[int, dict[str, Any]]] = {}
    for seed_dir in sorted(run_dir.glob("seed-*")):
        results = seed_dir / "results.json"
        if not results.is_file():
            continue
        for r in json.loads(results.read_text()):
            done = seed_dir / f"finetune-{r['tag']}" / "done.json"
            if done.is_file():
                r["teacher_ms"] = json.loads(done.read_text())["metrics"].get("distill_teacher_ms_per_step")
            found.setdefault(r["tag"], {})[int(seed_dir.name[5:])] = r
    return found


def _kept_rows(paths: list[Path]) -> dict[str, dict[str, dict[int, dict[str, Any]]]]:
    """option → tag → seed → row from kept files ``{option: [results rows]}`` whose names say ``seedK``."""
    found: dict[str, dict[str, dict[int, dict[str, Any]]]] = {}
    for path in paths:
        m = re.search(r"seed-?(\d+)", path.name)
        if m is None:
            raise SystemExit(f"finetune_options: {path}: a kept file's name must say its seed (…seedK…)")
        for option, rows in json.loads(path.read_text()).items():
            for r in rows:
                found.setdefault(option, {}).setdefault(r["tag"], {})[int(m.group(1))] = r
    return found


def _rows(
    out: Path | None, base: Path | None = None, kept: list[Path] | None = None
) -> dict[str, dict[str, dict[int, dict[str, Any]]]]:
    """option → tag → seed → results row of OUT's option folders and the ``kept`` files; with ``base``, its
    run's rows are ``plain`` where there are none."""
    found = _kept_rows(kept or [])
    if out is not None and out.is_dir():
        for d in sorted(p for p in out.iterdir() if p.is_dir()):
            for tag, seeds in _run_rows(d).items():
                found.setdefault(d.name, {}).setdefault(tag, {}).update(seeds)
    if base is not None and "plain" not in found:
        found = {"plain": _run_rows(base), **found}
    return found


def _ms(values: list[float], scale: float = 100.0, fmt: str = ".2f") -> str:
    if not values:
        return "–"
    if len(values) == 1:
        return f"{values[0] * scale:{fmt}}"
    return f"{statistics.fmean(values) * scale:{fmt}} ± {statistics.stdev(values) * scale:{fmt}}"


def _paired(a: dict[int, dict[str, Any]], b: dict[int, dict[str, Any]]) -> str:
    diffs = [100 * (a[s]["miou"] - b[s]["miou"]) for s in sorted(a) if s in b]
    return f"{statistics.fmean(diffs):+.2f} ({' '.join(f'{d:+.2f}' for d in diffs)})" if diffs else "–"


def _overlaps(rows: list[dict[str, Any]], prefix: str) -> list[float]:
    """Each row's plan overlap (Jaccard of the kept channels) with its run's model whose tag starts ``prefix``."""
    return [v["all"] for r in rows for t, v in (r.get("plan_overlap") or {}).items() if t.startswith(prefix)]


def save(rows: dict[str, dict[str, dict[int, dict[str, Any]]]], template: str) -> None:
    """Each seed's rows as ``{option: [results rows]}`` in ``template.format(seed=K)`` (written atomically)."""
    seeds = sorted({s for tags in rows.values() for by_seed in tags.values() for s in by_seed})
    for seed in seeds:
        kept = {o: [by[seed] for by in tags.values() if seed in by] for o, tags in rows.items()}
        path = Path(template.format(seed=seed))
        write_text(path, json.dumps({o: r for o, r in kept.items() if r}, indent=1) + "\n")
        print(f"wrote {path}")


def table(out: Path | None, base: Path | None = None, kept: list[Path] | None = None, plain: str = "plain") -> None:
    """The options' table; ``plain``: the option the others are compared with (its Uniform too)."""
    rows = _rows(out, base, kept)
    head = ["option", "model", "seeds", "mIoU %", "before FT %", "sparse bb/dec %", "overlap w/ uniform",
            "agree %", "teacher ms/step", "− plain (paired)", "− uniform (paired)"]  # fmt: skip
    print("| " + " | ".join(head) + " |\n|" + "---|" * len(head))
    for option, tags in rows.items():
        for tag, seeds in tags.items():
            rs = list(seeds.values())
            if rs[0]["method"] == "dense":
                continue
            sp = [r["sparsity"] for r in rs if r.get("sparsity")]
            sparse = f"{_ms([x['backbone'] for x in sp], fmt='.0f')}/{_ms([x['decoder'] for x in sp], fmt='.0f')}"
            # Uniform under the same option, or (an option that does not run Uniform leaves it as it was) plain's
            unis = tags if any(t.startswith("uniform-") for t in tags) else rows.get(plain, {})
            uni = next((t for t in unis if t.startswith("uniform-") and t.split("-", 1)[1] in tag), None)
            cells = [
                option, tag, str(len(rs)), _ms([r["miou"] for r in rs]),
                _ms([r["miou_pruned"] for r in rs if r.get("miou_pruned") is not None]),
                sparse if sp else "–", _ms(_overlaps(rs, "uniform-"), 1.0, ".3f"),
                _ms([r["top1"] for r in rs if r.get("top1") is not None], fmt=".1f"),
                _ms([r["teacher_ms"] for r in rs if r.get("teacher_ms")], 1.0, ".1f"),
                _paired(seeds, rows.get(plain, {}).get(tag, {})) if option != plain else "",
                _paired(seeds, unis[uni]) if uni and uni != tag else "",
            ]  # fmt: skip
            print("| " + " | ".join(cells) + " |")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--base", type=Path, help="a finished run of the config (seed-K folders)")
    ap.add_argument("--out", type=Path, help="the options' run folders (OUT/OPTION/seed-K)")
    ap.add_argument("--kept", type=Path, nargs="+", default=[], help="kept rows: {option: results rows}, …seedK…")
    ap.add_argument("--config", default="configs/camvid_effnet.yaml")
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--options", nargs="+", default=list(OPTIONS), choices=list(OPTIONS))
    ap.add_argument(
        "--set",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="more overrides for every option, e.g. run.methods=[mtp] run.targets=[{macs: 0.5}]",
    )
    ap.add_argument("--plain", default="plain", help="the option the others are compared with (default: plain)")
    ap.add_argument("--save", metavar="TEMPLATE", help="keep the rows, a file a seed ({seed})")
    ap.add_argument("--table", action="store_true", help="print the table of the finished seeds and exit")
    args = ap.parse_args(argv)
    if not args.table:
        if args.base is None or args.out is None:
            ap.error("--base RUN and --out DIR are needed to run the options")
        run(args)
    elif args.out is None and not args.kept:
        ap.error("--table needs --out DIR or --kept FILE…")
    table(args.out, args.base, args.kept, args.plain)
    if args.save:
        save(_rows(args.out, None, args.kept), args.save)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
