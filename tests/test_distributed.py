"""DDP on CPU (gloo): 2 processes against 1 process with the same global batch.

Tolerance: with BN statistics frozen (``optim.freeze_bn_stats``: SyncBatchNorm is CUDA-only, and with
per-process batch statistics the two runs legitimately differ) and no scale jitter (so every process
has the same number of valid pixels and DDP's mean of per-process means is the global mean), the
weight updates of the two runs agree to 1e-4 relative (measured: 4e-6); the all-reduced confusion
matrix of the 2-process evaluation gives exactly the 1-process figures of the same checkpoint.
"""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys

import pytest
import torch

from mtprune import load_model
from mtprune.config import load_config
from mtprune.data.from_config import make_dataset
from mtprune.evaluate.inference import build_eval_loader, evaluate_segmentation
from mtprune.models import build_model
from mtprune.pipeline import run_stage

SETTINGS = [
    "model.name=bisenet_resnet18",
    "model.width=0.125",
    "data.cls.options={num_samples: 16, image_size: 32}",
    "data.seg.options={num_samples: 16, image_size: 64}",
    "data.seg.val_options={num_samples: 6}",
    "data.cls.size=32",
    "data.seg.crop_size=[64,64]",
    "data.seg.scale_range=[1.0,1.0]",
    "train_seg.epochs=1",
    "optim.freeze_bn_stats=true",
]


@pytest.mark.skipif(not torch.distributed.is_available(), reason="torch.distributed is not available")
def test_two_gloo_processes_match_one_process(tmp_path):
    args = []
    for s in SETTINGS + ["train_seg.batch_size=2"]:
        args += ["--set", s]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MTPRUNE_NO_PROGRESS": "1"}
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--nproc_per_node=2",
        "--master_port=29533",
        "-m",
        "mtprune",
        "train",
        "train-seg",
        "--out",
        str(tmp_path / "two"),
        *args,
    ]
    r = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]

    cfg = load_config(overrides=SETTINGS + ["train_seg.batch_size=4"])
    run_stage("train-seg", cfg, tmp_path / "one")

    torch.manual_seed(cfg.seed)
    init = build_model("bisenet_resnet18", 6, 10, 0.125).state_dict()
    one, two = load_model(tmp_path / "one").state_dict(), load_model(tmp_path / "two").state_dict()
    diff = math.sqrt(sum(((one[k] - two[k]).double() ** 2).sum() for k in one if one[k].is_floating_point()))
    step = math.sqrt(sum(((one[k] - init[k]).double() ** 2).sum() for k in one if one[k].is_floating_point()))
    assert step > 0 and diff / step < 1e-4

    # the 2-process run's all-reduced evaluation equals a 1-process evaluation of its own checkpoint
    metrics = json.loads((tmp_path / "two" / "done.json").read_text())["metrics"]
    ds = make_dataset(cfg, "seg", train=False)
    ref = evaluate_segmentation(load_model(tmp_path / "two"), build_eval_loader(ds), ds.num_classes, progress=False)
    assert metrics["miou"] == pytest.approx(ref["miou"], abs=1e-12)
    assert metrics["pixel_acc"] == pytest.approx(ref["pixel_acc"], abs=1e-12)
