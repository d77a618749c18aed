"""Datasets as a configuration or the command line describes them: the one place that turns a
``data`` section (or ``mtprune eval``'s flags) into a dataset with its transforms.

- :func:`make_dataset` — the segmentation or classification set of a :class:`~mtprune.config.Config`,
  train or validation split, with the configured transforms, subset and bad-sample policy;
- :func:`sample_images` — reproducible training images of that set, batched by size (ThiNet's statistics);
- :func:`eval_dataset` — a named dataset split for evaluation (``mtprune eval``).
"""

from __future__ import annotations

import os
from typing import Any

import torch

from mtprune.config import Config
from mtprune.data import (
    DATASET_TRANSFORM_DEFAULTS,
    SkipBadSamples,
    build_dataset,
    build_transforms,
    seg_eval_transforms,
)
from mtprune.data.base import SeededSubset
from mtprune.errors import UsageError


def _dataset_kwargs(name: str, task: str, options: dict[str, Any], seed: int) -> dict[str, Any]:
    kw = dict(options)
    if name == "synthetic":
        kw.setdefault("task", task)
        kw.setdefault("seed", seed)
    return kw


def make_dataset(cfg: Config, task: str, train: bool) -> Any:
    """The segmentation (``task="seg"``) or classification set of the config, with its transforms."""
    d = cfg.data.seg if task == "seg" else cfg.data.cls
    tcfg: dict[str, Any] = {"hflip": d.hflip}
    if task == "seg":
        tcfg.update(crop_size=d.crop_size, scale_range=d.scale_range, eval_resize=d.eval_resize)
    else:
        tcfg.update(size=d.size, resize=d.resize, min_area=d.min_area)
    options = d.options if train else {**d.options, **d.val_options}
    split = d.train_split if train else d.val_split
    root: Any = d.root
    if task == "cls" and d.dataset == "teacher" and train and d.roots:
        root, split = list(d.roots), ""  # the training folders as they are
    try:
        ds = build_dataset(
            d.dataset,
            root,
            split,
            build_transforms(task, train, tcfg),
            **_dataset_kwargs(d.dataset, task, options, cfg.seed),
        )
    except TypeError as e:  # an option the dataset does not take
        raise UsageError(f"data.{task}.options for dataset '{d.dataset}': {e}") from None
    if train and d.train_subset is not None:
        try:
            ds = SeededSubset(ds, d.train_subset, d.subset_seed)
        except ValueError as e:
            raise UsageError(f"data.{task}.{e}") from None
    # training substitutes a good sample for a bad one (batches keep their size); evaluation skips and
    # counts bad samples itself (mtprune.evaluate.inference.EvalDataset), never counting one twice
    return SkipBadSamples(ds) if cfg.data.skip_bad and train else ds


def has_validation(cfg: Config, task: str) -> bool:
    """Whether the config names a validation split of ``task``: a label-free ``teacher`` set has one only
    with ``data.cls.root`` (its images under ROOT/val_split)."""
    return not (task == "cls" and cfg.data.cls.dataset == "teacher" and cfg.data.cls.root is None)


def sample_images(cfg: Config, n: int, task: str = "seg", max_batch: int = 8) -> list[torch.Tensor]:
    """``n`` images of the configured training set (with its training transforms), drawn reproducibly
    from ``cfg.seed``, grouped into batches of equal image size (ThiNet's statistics)."""
    ds = make_dataset(cfg, task, train=True)
    n = min(n, len(ds))
    if n < 1:
        raise UsageError(f"the {task} training set is empty")
    idx = torch.randperm(len(ds), generator=torch.Generator().manual_seed(cfg.seed))[:n].tolist()
    with torch.random.fork_rng(devices=[]):  # the random training transforms, reproducibly
        torch.manual_seed(cfg.seed)
        images = [ds[i][0] for i in idx]
    batches: list[torch.Tensor] = []
    for img in images:
        if batches and batches[-1].shape[1:] == img.shape and batches[-1].shape[0] < max_batch:
            batches[-1] = torch.cat([batches[-1], img[None]])
        else:
            batches.append(img[None])
    return batches


def eval_dataset(
    name: str,
    root: str | os.PathLike | None,
    split: str,
    task: str,
    resize: int | tuple[int, int] | None = None,
    **synthetic: Any,
) -> Any:
    """Split ``split`` of dataset ``name`` with evaluation transforms: segmentation at full resolution
    (or ``resize``d), classification with the dataset's standard eval transform. ``synthetic``: the
    in-memory synthetic set's generator arguments (``num_samples``, ``image_size``, ``num_classes``, ``seed``)."""
    kw = dict(synthetic)
    if name == "synthetic":
        kw["task"] = task
    if task == "seg":
        transforms = seg_eval_transforms(resize=resize)
    else:
        transforms = build_transforms("cls", False, DATASET_TRANSFORM_DEFAULTS.get(name, {"size": 224}))
    return build_dataset(name, root, split, transforms, **kw)


__all__ = ["eval_dataset", "has_validation", "make_dataset", "sample_images"]
