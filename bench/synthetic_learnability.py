"""How learnable is the synthetic dataset, and does classification pre-training on it help?

Trains a small dense model (``deeplabv3_resnet18``, width 0.25) on the in-memory synthetic
segmentation set for a fixed wall-clock budget on CPU and reports validation mIoU against chance
(uniform random labels, and "everything is background"). Then it pre-trains the same architecture
on the synthetic classification set, fine-tunes for the same segmentation budget, and reports that
too, plus a from-scratch run given the pre-training's time as extra segmentation time (the fair
comparison at equal total compute).

    python bench/synthetic_learnability.py                     # 60 s per phase, 1 torch thread
    python bench/synthetic_learnability.py --steps 700 --pretrain-steps 600   # budget in steps
    python bench/synthetic_learnability.py --seconds 30 --json out.json
"""

from __future__ import annotations

import argparse
import os
import platform
import time
from datetime import date
from typing import Any

import torch
import torch.nn.functional as F

from mtprune.data import (
    build_dataset,
    build_loader,
    cls_eval_transforms,
    cls_train_transforms,
    seg_eval_transforms,
    seg_train_transforms,
)
from mtprune.io import write_json
from mtprune.models import build_model


def confusion(pred: torch.Tensor, target: torch.Tensor, k: int) -> torch.Tensor:
    keep = target != 255
    return torch.bincount(target[keep] * k + pred[keep], minlength=k * k).reshape(k, k)


def miou(conf: torch.Tensor) -> float:
    conf = conf.double()
    inter = conf.diag()
    union = conf.sum(0) + conf.sum(1) - inter
    present = union > 0
    return float((inter[present] / union[present]).mean())


@torch.no_grad()
def evaluate_seg(model: torch.nn.Module, loader: Any, k: int) -> float:
    model.eval()
    conf = torch.zeros(k, k, dtype=torch.long)
    for x, y in loader:
        conf += confusion(model(x).argmax(1).flatten(), y.flatten(), k)
    return miou(conf)


@torch.no_grad()
def chance_mious(loader: Any, k: int, seed: int = 0) -> tuple[float, float]:
    g = torch.Generator().manual_seed(seed)
    rand = torch.zeros(k, k, dtype=torch.long)
    bg = torch.zeros(k, k, dtype=torch.long)
    for _, y in loader:
        rand += confusion(torch.randint(0, k, y.shape, generator=g).flatten(), y.flatten(), k)
        bg += confusion(torch.zeros_like(y).flatten(), y.flatten(), k)
    return miou(rand), miou(bg)


@torch.no_grad()
def evaluate_cls(model: Any, loader: Any) -> float:
    model.eval()
    right = total = 0
    for x, y in loader:
        right += int((model.forward_cls(x).argmax(1) == y).sum())
        total += len(y)
    return right / max(total, 1)


def poly_lr(opt: torch.optim.Optimizer, base: float, frac: float) -> None:
    for group in opt.param_groups:
        group["lr"] = base * max(0.0, 1.0 - frac) ** 0.9


def train_timed(
    model: Any, loader: Any, seconds: float, lr: float, task: str, max_steps: int | None = None
) -> dict[str, Any]:
    """Train until ``seconds`` of wall-clock have passed (checked every step), or for ``max_steps``
    steps when given; poly LR over the budget."""
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=1e-4)
    model.train()
    steps = epochs = 0
    start = time.perf_counter()
    loss = torch.tensor(0.0)
    while True:
        epochs += 1
        for x, y in loader:
            frac = (time.perf_counter() - start) / seconds if max_steps is None else steps / max_steps
            if frac >= 1:
                return {
                    "steps": steps,
                    "epochs": epochs - 1 + 0.0,
                    "seconds": time.perf_counter() - start,
                    "last_loss": float(loss.detach()),
                }
            poly_lr(opt, lr, frac)
            if task == "seg":
                loss = F.cross_entropy(model(x), y, ignore_index=255)
            else:
                loss = F.cross_entropy(model.forward_cls(x), y)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            steps += 1


def warm(dataset: Any) -> float:
    """Generate (and cache) every sample; returns the seconds it took."""
    t = time.perf_counter()
    for i in range(len(dataset)):
        dataset.arrays(i)
    return time.perf_counter() - t


def cpu_name() -> str:
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--seconds", type=float, default=60.0, help="segmentation training budget per run")
    p.add_argument("--pretrain-seconds", type=float, default=60.0, help="classification pre-training budget")
    p.add_argument("--steps", type=int, default=None, help="budget segmentation runs in steps, not seconds")
    p.add_argument("--pretrain-steps", type=int, default=None, help="budget pre-training in steps, not seconds")
    p.add_argument("--size", type=int, default=64, help="image size (square)")
    p.add_argument("--num-classes", type=int, default=6)
    p.add_argument("--cls-classes", type=int, default=10)
    p.add_argument("--num-train", type=int, default=1000)
    p.add_argument("--num-val", type=int, default=200)
    p.add_argument("--num-cls-train", type=int, default=4000)
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--lr", type=float, default=2e-3)
    p.add_argument("--model", default="deeplabv3_resnet18")
    p.add_argument("--width", type=float, default=0.25)
    p.add_argument(
        "--threads", type=int, default=1, help="torch threads (1: a shared 2-core box oversubscribes with 2)"
    )
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--skip-equal-compute", action="store_true", help="skip the from-scratch run of equal total time")
    p.add_argument("--json", default=None, help="also write the figures to this JSON file")
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    torch.set_flush_denormal(True)  # denormal floats can make CPU steps 50x slower
    load_start = os.getloadavg()
    k, s = args.num_classes, args.size

    def synthetic(split: str, transforms: Any, task: str, n: int, classes: int) -> Any:
        return build_dataset(
            "synthetic", None, split, transforms, task=task, num_samples=n, image_size=s, num_classes=classes,
            seed=args.seed,
        )  # fmt: skip

    seg_train = synthetic("train", seg_train_transforms(s, (0.5, 2.0)), "seg", args.num_train, k)
    seg_val = synthetic("val", seg_eval_transforms(), "seg", args.num_val, k)
    cls_train = synthetic("train", cls_train_transforms(s, min_area=0.35), "cls", args.num_cls_train, args.cls_classes)
    cls_val = synthetic("val", cls_eval_transforms(s, resize=s), "cls", 500, args.cls_classes)
    gen = {
        name: warm(ds)
        for name, ds in (("seg_train", seg_train), ("seg_val", seg_val), ("cls_train", cls_train), ("cls_val", cls_val))
    }
    n_gen = len(seg_train) + len(seg_val) + len(cls_train) + len(cls_val)
    print(
        f"generated {n_gen} images of {s}x{s} in {sum(gen.values()):.1f} s "
        f"({n_gen / sum(gen.values()):.0f} images/s, one process)"
    )

    seg_loader = build_loader(seg_train, args.batch_size, shuffle=True, seed=args.seed, drop_last=True)
    val_loader = build_loader(seg_val, 50, shuffle=False)
    cls_loader = build_loader(cls_train, 64, shuffle=True, seed=args.seed, drop_last=True)
    cls_val_loader = build_loader(cls_val, 100, shuffle=False)
    chance_rand, chance_bg = chance_mious(val_loader, k)
    print(f"chance mIoU: uniform random {100 * chance_rand:.1f}, all background {100 * chance_bg:.1f}")

    def fresh() -> Any:
        torch.manual_seed(args.seed)
        return build_model(args.model, num_classes=k, cls_classes=args.cls_classes, width=args.width)

    seg_budget = f"{args.steps} steps" if args.steps else f"{args.seconds:.0f} s"
    pre_budget = f"{args.pretrain_steps} steps" if args.pretrain_steps else f"{args.pretrain_seconds:.0f} s"
    results: dict[str, Any] = {}
    model = fresh()
    run = train_timed(model, seg_loader, args.seconds, args.lr, "seg", args.steps)
    results["scratch"] = {**run, "miou": evaluate_seg(model, val_loader, k)}
    print(
        f"from scratch, {seg_budget} seg: mIoU {100 * results['scratch']['miou']:.1f} "
        f"({run['steps']} steps, {run['seconds']:.0f} s)"
    )

    model = fresh()
    pre = train_timed(model, cls_loader, args.pretrain_seconds, args.lr, "cls", args.pretrain_steps)
    top1 = evaluate_cls(model, cls_val_loader)
    run = train_timed(model, seg_loader, args.seconds, args.lr, "seg", args.steps)
    results["pretrained"] = {**run, "miou": evaluate_seg(model, val_loader, k), "pretrain": {**pre, "cls_top1": top1}}
    print(
        f"cls pre-training {pre_budget} (top-1 {100 * top1:.1f} % on {args.cls_classes} classes, "
        f"{pre['steps']} steps, {pre['seconds']:.0f} s) + {seg_budget} seg: mIoU "
        f"{100 * results['pretrained']['miou']:.1f} ({run['steps']} steps, {run['seconds']:.0f} s)"
    )

    if not args.skip_equal_compute:
        model = fresh()
        total = args.seconds + args.pretrain_seconds
        steps = None if args.steps is None else args.steps + (args.pretrain_steps or 0)
        run = train_timed(model, seg_loader, total, args.lr, "seg", steps)
        results["scratch_equal_compute"] = {**run, "miou": evaluate_seg(model, val_loader, k)}
        print(
            f"from scratch, seg for the pre-training's budget too: mIoU "
            f"{100 * results['scratch_equal_compute']['miou']:.1f} ({run['steps']} steps, {run['seconds']:.0f} s)"
        )

    load_end = os.getloadavg()
    print(f"load average (1 min) at start {load_start[0]:.2f}, at end {load_end[0]:.2f}")
    summary = {
        "date": date.today().isoformat(),
        "machine": f"{cpu_name()}, {os.cpu_count()} cores, torch threads {args.threads}",
        "load_average_1min": [load_start[0], load_end[0]],
        "torch": torch.__version__,
        "args": vars(args),
        "generation_seconds": gen,
        "chance_miou_uniform": chance_rand,
        "chance_miou_all_background": chance_bg,
        "results": results,
    }
    if args.json:
        write_json(args.json, summary)


if __name__ == "__main__":
    main()
