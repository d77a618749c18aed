"""Time to build the dependency graph and physically prune deeplabv3_resnet101 at p = 0.5 (CPU).

    python bench/prune_time.py [--model deeplabv3_resnet101] [--ratio 0.5] [--method bn] [--repeats 5]

Goal (issue 3): < 2 s for dependency graph + pruning. Prints the median of ``--repeats`` runs of each
phase (plan, dependency graph, removal) on a fresh model each time.
"""

from __future__ import annotations

import argparse
import platform
import statistics
import time

import torch

from mtprune.models import build_model
from mtprune.pruning import apply_plan, build_dependency_graph, make_plan


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="deeplabv3_resnet101")
    ap.add_argument("--num-classes", type=int, default=21)
    ap.add_argument("--method", default="bn")
    ap.add_argument("--ratio", type=float, default=0.5)
    ap.add_argument("--repeats", type=int, default=5)
    args = ap.parse_args()
    phases: dict[str, list[float]] = {"plan": [], "dependency graph": [], "removal": [], "total": []}
    for _ in range(args.repeats):
        torch.manual_seed(0)
        model = build_model(args.model, args.num_classes)
        with torch.no_grad():  # irregular plans: random γ
            for m in model.modules():
                if isinstance(m, torch.nn.BatchNorm2d):
                    m.weight.uniform_(0.0, 1.0)
        t0 = time.perf_counter()
        plan = make_plan(model, args.method, args.ratio)
        t1 = time.perf_counter()
        dg = build_dependency_graph(model)
        t2 = time.perf_counter()
        apply_plan(model, plan, dg)
        t3 = time.perf_counter()
        for k, v in zip(phases, (t1 - t0, t2 - t1, t3 - t2, t3 - t0), strict=True):
            phases[k].append(v)
    print(
        f"{args.model}, {args.method} p={args.ratio}, torch {torch.__version__}, {torch.get_num_threads()} threads, "
        f"{platform.processor() or platform.machine()}"
    )
    for k, v in phases.items():
        print(f"  {k:17s} median {statistics.median(v):.3f} s  (min {min(v):.3f}, max {max(v):.3f}, {len(v)} runs)")


if __name__ == "__main__":
    main()
