"""Training throughput of the real stages: images/s of ``train-seg`` and ``sparse-mtp`` (issue 7).

    python bench/throughput.py [--model deeplabv3_resnet101] [--crop 513 | --crop H W] [--seg-batch 8]
                               [--cls-size 224] [--cls-batch 32] [--stages train-seg sparse-mtp]
                               [--modes joint alternating] [--steps 30] [--warmup 5] [--device auto]
                               [--workers 8] [--channels-last] [--cudnn-benchmark] [--no-amp] [--json FILE]

Each configuration runs the product's own stage (``mtprune.pipeline.run_stage``, the code ``mtprune train``
runs) in its own process, on synthetic data generated at the crop size by ``--workers`` loader
processes, with ``log_every=1``: every step's end time is in ``metrics.jsonl``. The first ``--warmup``
steps (cuDNN autotuning, allocator growth, loader start) are dropped; the figures are over the rest:

- ``seg images/s``: segmentation images per second of wall time (for ``sparse-mtp`` with its
  classification steps in that time too), ``cls images/s`` likewise;
- ``ms/step`` per phase (median): ``seg`` for ``train-seg``; ``w1`` (Eq. 7, a classification step),
  ``w2w3`` (joint Eq. 8 + 9) or ``w2`` / ``w3`` (alternating) for ``sparse-mtp``: the seg step of
  ``sparse-mtp`` against ``train-seg``'s is the cost of the ALM terms;
- ``computing``: the same without the step's wait for the data loader (``data_s`` of the stage's log);
- ``data wait``: the share of the timed wall time spent waiting for the loader (near 0 when the loader
  keeps up; if it does not, images/s are the loader's, and ``computing`` is what the GPU could do);
- peak memory: ``torch.cuda.max_memory_allocated`` on CUDA, the process's max RSS on CPU.

On CUDA the stages run under bf16 autocast (``optim.amp``, on unless ``--no-amp``). A sparse-mtp
round here is ``--round-steps`` classification steps and as many segmentation steps.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import tempfile
from datetime import date
from pathlib import Path

import torch


def overrides(a: argparse.Namespace, stage: str, mode: str | None) -> list[str]:
    steps = a.steps + a.warmup
    if stage == "train-seg":
        n_seg, n_cls = steps * a.seg_batch, a.cls_batch  # one epoch: exactly the steps asked for
        o = [f"train_seg.batch_size={a.seg_batch}", "train_seg.epochs=1"]
    else:
        k = a.round_steps
        per_round = 2 * k if mode == "joint" else 3 * k
        rounds = -(-steps // per_round)
        n_seg = (rounds * (per_round - k) + 1) * a.seg_batch  # one epoch covers every segmentation pass
        n_cls = (rounds * k + 1) * a.cls_batch
        o = [
            f"sparse_mtp.mode={mode}",
            f"sparse_mtp.rounds={rounds}",
            f"sparse_mtp.steps_cls={k}",
            f"sparse_mtp.steps_seg={k}",
            f"sparse_mtp.seg_batch_size={a.seg_batch}",
            f"sparse_mtp.cls_batch_size={a.cls_batch}",
        ]
    return o + [
        f"device={a.device}",
        f"model.name={a.model}",
        f"model.width={a.width}",
        "model.num_classes=21",
        "model.cls_classes=1000",
        f"data.seg.options={{num_samples: {n_seg}, image_size: [{a.crop_hw[0]}, {a.crop_hw[1]}], num_classes: 11}}",
        f"data.seg.crop_size=[{a.crop_hw[0]},{a.crop_hw[1]}]",
        f"data.cls.options={{num_samples: {n_cls}, image_size: {a.cls_size}}}",
        f"data.cls.size={a.cls_size}",
        f"data.workers={a.workers}",
        f"optim.amp={str(not a.no_amp).lower()}",
        f"optim.channels_last={str(a.channels_last).lower()}",
        f"optim.cudnn_benchmark={str(a.cudnn_benchmark).lower()}",
        "eval.final=false",
        "log_every=1",
        "checkpoint_every=0",
    ]


def run_one(a: argparse.Namespace, stage: str, mode: str | None) -> dict:
    """One configuration, in this process (the parent runs each in a child)."""
    from mtprune.config import load_config
    from mtprune.pipeline import run_stage

    cfg = load_config(overrides=overrides(a, stage, mode))
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / stage
        if torch.cuda.is_available():
            torch.cuda.reset_peak_memory_stats()
        run_stage(stage, cfg, out)
        recs = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
        done = json.loads((out / "done.json").read_text())
    steps = [r for r in recs if "phase" in r and "loss" in r]
    if len(steps) <= a.warmup + 1:
        raise SystemExit(f"{stage}: {len(steps)} steps, too few after {a.warmup} warm-up steps")
    batch = {"seg": a.seg_batch, "w2w3": a.seg_batch, "w2": a.seg_batch, "w3": a.seg_batch, "w1": a.cls_batch}
    timed = steps[a.warmup :]
    t0 = steps[a.warmup - 1]["time"] if a.warmup else None
    if t0 is None:
        raise SystemExit("--warmup must be at least 1 (the first step's start is not logged)")
    wall = timed[-1]["time"] - t0
    per_phase: dict[str, list[float]] = {}
    compute: dict[str, list[float]] = {}
    prev = t0
    for r in timed:
        per_phase.setdefault(r["phase"], []).append(r["time"] - prev)
        compute.setdefault(r["phase"], []).append(r["time"] - prev - r["data_s"])
        prev = r["time"]
    seg_imgs = sum(batch[r["phase"]] for r in timed if r["phase"] in ("seg", "w2w3", "w2"))
    w3_imgs = sum(batch[r["phase"]] for r in timed if r["phase"] == "w3")  # alternating: a 2nd seg pass
    cls_imgs = sum(batch[r["phase"]] for r in timed if r["phase"] == "w1")
    dev = cfg.device if cfg.device != "auto" else ("cuda" if torch.cuda.is_available() else "cpu")
    peak = (
        torch.cuda.max_memory_allocated() / 2**30
        if dev == "cuda"
        else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20
    )
    return {
        "stage": stage,
        "mode": mode,
        "steps_timed": len(timed),
        "wall_s": wall,
        "seg_images_per_s": seg_imgs / wall,
        "seg_passes_per_s": (seg_imgs + w3_imgs) / wall,
        "cls_images_per_s": cls_imgs / wall,
        "ms_per_step": {p: 1e3 * statistics.median(v) for p, v in per_phase.items()},
        "compute_ms_per_step": {p: 1e3 * statistics.median(v) for p, v in compute.items()},
        "data_wait_frac_timed": sum(r["data_s"] for r in timed) / wall,
        "stage_throughput": done.get("throughput"),  # the stage's own report (warm-up steps included)
        "peak_gib": peak,
        "device": torch.cuda.get_device_name() if dev == "cuda" else platform.processor() or platform.machine(),
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="deeplabv3_resnet101")
    ap.add_argument("--width", type=float, default=1.0)
    ap.add_argument("--crop", type=int, nargs="+", default=[513], help="segmentation crop: S (square) or H W")
    ap.add_argument("--seg-batch", type=int, default=8)
    ap.add_argument("--cls-size", type=int, default=224)
    ap.add_argument("--cls-batch", type=int, default=32)
    ap.add_argument("--stages", nargs="+", default=["train-seg", "sparse-mtp"], choices=["train-seg", "sparse-mtp"])
    ap.add_argument("--modes", nargs="+", default=["joint"], choices=["joint", "alternating"])
    ap.add_argument("--steps", type=int, default=30, help="timed steps per configuration (after the warm-up)")
    ap.add_argument("--warmup", type=int, default=5)
    ap.add_argument("--round-steps", type=int, default=5, help="sparse-mtp: steps_cls = steps_seg per round")
    ap.add_argument("--device", default="auto")
    ap.add_argument("--workers", type=int, default=8)
    ap.add_argument("--channels-last", action="store_true")
    ap.add_argument("--cudnn-benchmark", action="store_true")
    ap.add_argument("--no-amp", action="store_true", help="fp32 on CUDA (default: bf16 autocast)")
    ap.add_argument("--json", default=None, help="append the rows to this JSON file")
    ap.add_argument("--one", nargs=2, default=None, help=argparse.SUPPRESS)
    a = ap.parse_args()
    if a.warmup < 1 or a.steps < 2:
        ap.error("--warmup must be ≥ 1 and --steps ≥ 2")
    if len(a.crop) not in (1, 2):
        ap.error("--crop takes S or H W")
    a.crop_hw = (a.crop[0], a.crop[-1])
    if a.one:
        stage, mode = a.one
        print(json.dumps(run_one(a, stage, None if mode == "-" else mode)))
        return
    configs = [(s, m) for s in a.stages for m in ([None] if s == "train-seg" else a.modes)]
    rows = []
    for stage, mode in configs:
        proc = subprocess.run(
            [sys.executable, __file__, *sys.argv[1:], "--one", stage, mode or "-"],
            capture_output=True,
            text=True,
            env={**os.environ, "MTPRUNE_NO_PROGRESS": "1"},
        )
        if proc.returncode != 0:
            raise SystemExit(f"{stage} {mode or ''}: failed\n{proc.stderr[-3000:]}")
        rows.append(json.loads(proc.stdout.strip().splitlines()[-1]))
    setup = {
        "date": date.today().isoformat(),
        "model": a.model,
        "width": a.width,
        "crop": list(a.crop_hw),
        "seg_batch": a.seg_batch,
        "cls_size": a.cls_size,
        "cls_batch": a.cls_batch,
        "amp": not a.no_amp,
        "channels_last": a.channels_last,
        "cudnn_benchmark": a.cudnn_benchmark,
        "workers": a.workers,
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
        "command": " ".join(["python", "bench/throughput.py", *sys.argv[1:]]),
    }
    print(
        f"{a.model} width {a.width}, seg batch {a.seg_batch}×{a.crop_hw[0]}×{a.crop_hw[1]}, "
        f"cls batch {a.cls_batch}×{a.cls_size}², "
        f"{'bf16 autocast' if not a.no_amp else 'fp32'} (CUDA only), channels_last {a.channels_last}, "
        f"{rows[0]['device']}, torch {torch.__version__}, {a.steps}+ timed steps after {a.warmup} warm-up"
    )
    base = next((r for r in rows if r["stage"] == "train-seg"), None)
    for r in rows:
        name = r["stage"] + (f" ({r['mode']})" if r["mode"] else "")
        phases = ", ".join(
            f"{p} {ms:.0f} ms ({r['compute_ms_per_step'][p]:.0f} computing)" for p, ms in r["ms_per_step"].items()
        )
        rel = ""
        seg_ms = r["compute_ms_per_step"].get("w2w3")
        if base and seg_ms:
            rel = f"; seg step computing {seg_ms / base['compute_ms_per_step']['seg']:.3f}× train-seg's"
        wait = r["data_wait_frac_timed"]
        cls = f", cls {r['cls_images_per_s']:.2f} img/s" if r["cls_images_per_s"] else ""
        wait_s = f"; data wait {100 * wait:.0f} %"
        print(
            f"  {name:24s} seg {r['seg_images_per_s']:.2f} img/s{cls}; {phases}{rel}{wait_s}; "
            f"peak {r['peak_gib']:.2f} GiB"
        )
    if a.json:
        path = Path(a.json)
        old = json.loads(path.read_text()) if path.exists() else []
        tmp = path.with_suffix(path.suffix + ".tmp")
        tmp.write_text(json.dumps(old + [{"setup": setup, "rows": rows}], indent=1))
        tmp.replace(path)


if __name__ == "__main__":
    main()
