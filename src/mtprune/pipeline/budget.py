"""The fine-tuning budget of a run: the same for every method, or (``run.equal_seg_steps``) extended so
that every method gets as many segmentation steps after ``train-seg`` as the one with the longest sparse
stage."""

from __future__ import annotations

from mtprune.config import Config
from mtprune.data.from_config import make_dataset
from mtprune.errors import UsageError
from mtprune.pruning import get_method
from mtprune.train.engine import stage_steps
from mtprune.train.streams import epoch_steps


def sparse_seg_steps(cfg: Config, method: str, world_size: int = 1, seg_samples: int | None = None) -> int:
    """Segmentation forward/backward passes of ``method``'s sparse stage (0 for the data-free methods):
    ``sparse-mtp`` ``rounds × steps_seg`` (twice that in ``alternating`` mode, one Eq. 8 and one Eq. 9
    pass a step), ``sparse-slimming`` its epochs over the segmentation set (``seg_samples`` images; by
    default the configured training set's size)."""
    stage = get_method(method).sparse_stage
    if stage == "sparse-mtp":
        c = cfg.sparse_mtp
        return c.rounds * c.steps_seg * (2 if c.mode == "alternating" else 1)
    if stage == "sparse-slimming":
        c2 = cfg.sparse_slimming
        return stage_steps(c2.epochs, _seg_epoch_steps(cfg, c2.batch_size, world_size, seg_samples))
    return 0


def extra_seg_steps(cfg: Config, world_size: int = 1, seg_samples: int | None = None) -> dict[str, int]:
    """With ``run.equal_seg_steps``: the segmentation steps added to each method's fine-tuning so that
    every method gets as many after ``train-seg`` as the method with the longest sparse stage
    (:func:`sparse_seg_steps`); without it, 0 for every method (the same fine-tuning budget)."""
    if not cfg.run.equal_seg_steps:
        return dict.fromkeys(cfg.run.methods, 0)
    steps = {m: sparse_seg_steps(cfg, m, world_size, seg_samples) for m in cfg.run.methods}
    top = max(steps.values(), default=0)
    return {m: top - n for m, n in steps.items()}


def extended_seg_epochs(cfg: Config, extra: int, world_size: int = 1, seg_samples: int | None = None) -> float:
    """``finetune.seg_epochs`` that gives ``extra`` more segmentation steps than the configured ones."""
    per_epoch = _seg_epoch_steps(cfg, cfg.finetune.seg_batch_size, world_size, seg_samples)
    steps = stage_steps(cfg.finetune.seg_epochs, per_epoch) if cfg.finetune.seg_epochs > 0 else 0
    return (steps + extra - 0.5) / per_epoch  # the stage takes ceil(epochs × steps per epoch) = steps + extra


def finetune_budget(cfg: Config, world_size: int = 1) -> tuple[dict[str, int], dict[str, float]]:
    """``(extra segmentation steps per method, finetune.seg_epochs of the methods whose fine-tuning is
    extended)``; the training set is built once, and only when ``run.equal_seg_steps`` needs its size."""
    if not cfg.run.equal_seg_steps:
        return extra_seg_steps(cfg), {}
    n = len(make_dataset(cfg, "seg", train=True))
    extra = extra_seg_steps(cfg, world_size, n)
    return extra, {m: extended_seg_epochs(cfg, k, world_size, n) for m, k in extra.items() if k}


def _seg_epoch_steps(cfg: Config, batch_size: int, world_size: int, seg_samples: int | None) -> int:
    n = len(make_dataset(cfg, "seg", train=True)) if seg_samples is None else seg_samples
    try:
        return epoch_steps(n, batch_size, world_size)
    except ValueError as e:
        raise UsageError(f"segmentation training set: {e}") from None
