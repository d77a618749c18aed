"""Training: one engine (:mod:`~mtprune.train.engine`) for every stage of Algorithm 1.

``run_stage(stage, cfg, out, init=None)`` runs ``pretrain-cls``, ``train-seg``, ``sparse-mtp``,
``sparse-slimming`` or ``finetune`` in folder ``out``, resuming it if it was interrupted and returning
the finished stage's metrics at once if it already ran — both only if the folder's ``recipe.json``
matches (:mod:`mtprune.recipe`).
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from mtprune.config import Config
from mtprune.errors import UsageError
from mtprune.io import read_json
from mtprune.recipe import check_recipe, stage_recipe, write_recipe
from mtprune.train.distributed import DistEnv, setup
from mtprune.train.engine import DONE_FILE, STATE_FILE

STAGES = ("pretrain-cls", "train-seg", "sparse-mtp", "sparse-slimming", "finetune")


def seed_everything(seed: int) -> None:
    import random

    import numpy as np
    import torch

    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def run_stage(
    stage: str, cfg: Config, out: str | os.PathLike, init: str | None = None, env: DistEnv | None = None
) -> dict[str, Any]:
    """Run (or resume, or reuse) one stage; returns its final metrics."""
    if stage not in STAGES:
        raise UsageError(f"unknown stage '{stage}'; choose from {', '.join(STAGES)}")
    out = Path(out)
    recipe = stage_recipe(stage, cfg, init)
    done = (out / DONE_FILE).is_file()
    has_work = done or (out / STATE_FILE).is_file()
    check_recipe(out, recipe, has_work)
    if done:
        return dict(read_json(out / DONE_FILE).get("metrics", {}))
    env = env or setup(cfg.device)
    if env.is_main and not has_work:
        write_recipe(out, recipe)
    import torch

    torch.use_deterministic_algorithms(env.device.type == "cpu", warn_only=True)
    if env.device.type == "cuda":
        torch.backends.cudnn.benchmark = cfg.optim.cudnn_benchmark
    seed_everything(cfg.seed)
    if stage == "sparse-mtp":
        from mtprune.train.mtp import run_sparse_mtp

        return run_sparse_mtp(cfg, out, env, init)
    from mtprune.train.stages import run_supervised

    return run_supervised(stage, cfg, out, env, init)


__all__ = ["STAGES", "run_stage"]
