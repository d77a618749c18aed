"""The cost of MTP training: one MTP round against the same number of plain steps (issue 7).

    python bench/mtp_step.py [--model deeplabv3_resnet18] [--width 0.5] [--seg-size 128] [--cls-size 64]
                             [--steps 5] [--rounds 3] [--device cpu] [--amp] [--channels-last]

A round is ``steps`` classification steps (Eq. 7) and ``steps`` segmentation steps (joint: Eq. 8 + 9
from one pass; alternating: ``steps`` Eq. 8 and ``steps`` Eq. 9 passes) and Eq. 10. "plain" is the same
number of ordinary classification and segmentation SGD steps (cross-entropy only, one backbone). Data are
fixed random tensors, so the figures are compute only. Each mode runs in its own process (peak memory =
that process's max RSS on CPU, ``torch.cuda.max_memory_allocated`` on CUDA); the first round is warm-up.
``--amp`` runs the forwards under bf16 autocast on CUDA (as the training stages do by default there);
``--channels-last`` puts the model and the inputs in NHWC memory format (``optim.channels_last``).
"""

from __future__ import annotations

import argparse
import json
import platform
import resource
import statistics
import subprocess
import sys
import time

import torch
import torch.nn.functional as F

from mtprune.config import load_config
from mtprune.models import build_model
from mtprune.train.distributed import DistEnv
from mtprune.train.mtp import SparseMTP


def run_mode(mode: str, a: argparse.Namespace) -> dict:
    torch.manual_seed(0)
    dev = torch.device(a.device)
    fmt = torch.channels_last if a.channels_last else torch.contiguous_format
    model = build_model(a.model, 21, 100, a.width).to(dev, memory_format=fmt).train()
    xs, ys = (
        torch.randn(a.seg_batch, 3, a.seg_size, a.seg_size, device=dev).to(memory_format=fmt),
        torch.randint(0, 21, (a.seg_batch, a.seg_size, a.seg_size), device=dev),
    )
    xc, yc = (
        torch.randn(a.cls_batch, 3, a.cls_size, a.cls_size, device=dev).to(memory_format=fmt),
        torch.randint(0, 100, (a.cls_batch,), device=dev),
    )
    amp = lambda: torch.autocast(dev.type, dtype=torch.bfloat16, enabled=a.amp and dev.type == "cuda")  # noqa: E731
    sgd = lambda ps: torch.optim.SGD(ps, lr=1e-3, momentum=0.9, weight_decay=1e-4)  # noqa: E731
    sync = torch.cuda.synchronize if dev.type == "cuda" else (lambda: None)
    if mode == "plain":
        opt_c = sgd(list(model.backbone.parameters()) + list(model.cls_head.parameters()))
        opt_s = sgd(list(model.backbone.parameters()) + list(model.decoder.parameters()))

        def one_round() -> None:
            for _ in range(a.steps):
                opt_c.zero_grad()
                with amp():
                    logits = model.forward_cls(xc)
                F.cross_entropy(logits.float(), yc).backward()
                opt_c.step()
            for _ in range(a.steps):
                opt_s.zero_grad()
                with amp():
                    out = model.seg_outputs(xs, aux=True)["out"]
                F.cross_entropy(out.float(), ys).backward()
                opt_s.step()
    else:  # the product's own steps (mtprune.train.mtp.SparseMTP: Eq. 7, Eq. 8/9, Eq. 10)
        cfg = load_config(
            None,
            [
                "sparse_mtp.lr_cls=0.001", "sparse_mtp.lr_seg=0.001", "sparse_mtp.mu0=0.1", "sparse_mtp.rho=1.1",
                "sparse_mtp.mu_max=10.0", "sparse_mtp.alpha1=0.001", "sparse_mtp.alpha2=0.001", "sparse_mtp.lam=1.0",
                f"sparse_mtp.mode={mode}", "optim.momentum=0.9", "optim.weight_decay=0.0001", "optim.grad_clip=null",
                f"optim.amp={str(a.amp).lower()}",
            ],
        )  # fmt: skip
        env = DistEnv(rank=0, world_size=1, local_rank=0, device=dev)
        mtp = SparseMTP(cfg, env, model)
        subs = ["w2w3"] if mode == "joint" else ["w2", "w3"]

        def one_round() -> None:
            for _ in range(a.steps):
                mtp.w1_step(xc, yc, 1e-3)
            for sub in subs:
                for _ in range(a.steps):
                    mtp.seg_step(xs, ys, 1e-3, sub)
            mtp.end_round(0)

    times = []
    for r in range(a.rounds + 1):
        sync()
        t0 = time.perf_counter()
        one_round()
        sync()
        if r > 0:
            times.append(time.perf_counter() - t0)
    peak = (
        torch.cuda.max_memory_allocated() / 2**20
        if dev.type == "cuda"
        else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    )
    return {"mode": mode, "round_s": statistics.median(times), "rounds": a.rounds, "peak_mib": peak}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="deeplabv3_resnet18")
    ap.add_argument("--width", type=float, default=0.5)
    ap.add_argument("--seg-size", type=int, default=128)
    ap.add_argument("--cls-size", type=int, default=64)
    ap.add_argument("--seg-batch", type=int, default=8)
    ap.add_argument("--cls-batch", type=int, default=32)
    ap.add_argument("--steps", type=int, default=5)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--amp", action="store_true", help="bf16 autocast on CUDA")
    ap.add_argument("--channels-last", action="store_true")
    ap.add_argument("--mode", default=None, help=argparse.SUPPRESS)
    a = ap.parse_args()
    if a.mode:
        print(json.dumps(run_mode(a.mode, a)))
        return
    rows = {}
    for mode in ("plain", "joint", "alternating"):
        out = subprocess.run(
            [sys.executable, __file__, *sys.argv[1:], "--mode", mode], capture_output=True, text=True, check=True
        ).stdout
        rows[mode] = json.loads(out.strip().splitlines()[-1])
    print(
        f"{a.model} width {a.width}, seg {a.seg_batch}×{a.seg_size}², cls {a.cls_batch}×{a.cls_size}², "
        f"{a.steps}+{a.steps} steps a round, {a.device}{' bf16' if a.amp and a.device.startswith('cuda') else ''}"
        f"{', channels_last' if a.channels_last else ''}, torch {torch.__version__}, "
        f"{torch.get_num_threads()} threads, {platform.machine()}"
    )
    base = rows["plain"]["round_s"]
    for mode, r in rows.items():
        print(
            f"  {mode:12s} {r['round_s']:.3f} s/round  ({r['round_s'] / base:.3f}× plain)  peak {r['peak_mib']:.0f} MiB"
        )


if __name__ == "__main__":
    main()
