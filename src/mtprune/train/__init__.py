"""Training: one engine (:mod:`~mtprune.train.engine`) for every stage of Algorithm 1.

:func:`train_stage` runs ``pretrain-cls``, ``train-seg``, ``sparse-mtp``, ``sparse-slimming`` or
``finetune`` in folder ``out``, resuming it if it was interrupted. Whether a folder is reused, resumed
or refused (its recipe) is the stage runner's decision (:func:`mtprune.pipeline.run_stage`), which also
gives the stage its validation (evaluation sits above training in the layers).
"""

from __future__ import annotations

import os
import random
from pathlib import Path
from typing import Any

import numpy as np
import torch

from mtprune.config import Config
from mtprune.errors import UsageError
from mtprune.train.distributed import DistEnv
from mtprune.train.engine import Evaluator, no_evaluation
from mtprune.train.mtp import run_sparse_mtp
from mtprune.train.stages import run_supervised

STAGES = ("pretrain-cls", "train-seg", "sparse-mtp", "sparse-slimming", "finetune")


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def check_stage(stage: str) -> str:
    if stage not in STAGES:
        raise UsageError(f"unknown stage '{stage}'; choose from {', '.join(STAGES)}")
    return stage


def train_stage(
    stage: str,
    cfg: Config,
    out: str | os.PathLike,
    env: DistEnv,
    init: str | None = None,
    evaluate: Evaluator = no_evaluation,
) -> dict[str, Any]:
    """Run (or resume) training stage ``stage`` in ``out``; returns its final metrics."""
    check_stage(stage)
    torch.use_deterministic_algorithms(env.device.type == "cpu", warn_only=True)
    if env.device.type == "cuda":
        torch.backends.cudnn.benchmark = cfg.optim.cudnn_benchmark
    seed_everything(cfg.seed)
    if stage == "sparse-mtp":
        return run_sparse_mtp(cfg, Path(out), env, init, evaluate)
    return run_supervised(stage, cfg, Path(out), env, init, evaluate)


__all__ = ["STAGES", "check_stage", "seed_everything", "train_stage"]
