"""Datasets in their official layouts, aligned transforms, a synthetic world, loaders and checks.

``build_dataset(name, root, split, transforms=None, **kw)`` covers :data:`DATASETS`:

========== ==== ======================================================================== =======
name       task layout under ``root``                                                   classes
========== ==== ======================================================================== =======
voc        seg  ``VOCdevkit/VOC2012/{JPEGImages,SegmentationClass,ImageSets/...}``        21
cityscapes seg  ``leftImg8bit/{split}/{city}/*`` + ``gtFine/{split}/{city}/*_labelIds``   19
ade20k     seg  ``ADEChallengeData2016/{images,annotations}/{training,validation}``      150
camvid     seg  SegNet: ``{split}.txt`` lists, ``{split}/``, ``{split}annot/``            11
imagefolder cls ``{split}/<class>/*`` (ImageNet, the CIFAR-10 tree)                       folders
synthetic  seg/cls in memory (``root=None``) or the folder ``make-data synthetic`` wrote   6 / 10
teacher    cls  any images under one or more folders; the labels are a teacher's          teacher's
========== ==== ======================================================================== =======

Segmentation items are ``(image, mask)`` with mask values ``0..K-1`` or 255 (ignore);
classification items are ``(image, int)``. Every dataset has ``num_classes``, ``class_names``,
``ignore_index``, ``task`` and ``inspect(i)``; a bad sample raises
:class:`~mtprune.data.base.BadSampleError` (one line naming the file) unless wrapped in
:class:`SkipBadSamples`. Nothing here downloads.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from mtprune.data.ade20k import ADE20K_CLASSES, ADE20KDataset
from mtprune.data.base import (
    IGNORE_INDEX,
    BadSampleError,
    ClassificationDataset,
    SampleInfo,
    SampleProblem,
    SegmentationDataset,
    Transform,
    check_root,
)
from mtprune.data.camvid import CAMVID_CLASSES, CamVidDataset
from mtprune.data.check import CheckReport, check_dataset, format_report
from mtprune.data.cityscapes import CITYSCAPES_CLASSES, CityscapesDataset
from mtprune.data.imagefolder import ImageFolderDataset
from mtprune.data.loader import SkipBadSamples, build_loader, seed_worker
from mtprune.data.synthetic import (
    SHAPE_CLASSES,
    SyntheticClassification,
    SyntheticSegmentation,
    read_meta,
    write_synthetic,
)
from mtprune.data.teacher import TeacherImages, build_teacher_images
from mtprune.data.transforms import (
    DATASET_TRANSFORM_DEFAULTS,
    IMAGENET_MEAN,
    IMAGENET_STD,
    build_transforms,
    cls_eval_transforms,
    cls_train_transforms,
    normalization,
    seg_eval_transforms,
    seg_train_transforms,
)
from mtprune.data.voc import VOC_CLASSES, VOCDataset
from mtprune.errors import DataError, UsageError


@dataclass(frozen=True)
class DatasetSpec:
    """A registry entry: the task, the standard splits (train first) and the builder."""

    task: str
    splits: tuple[str, ...]
    builder: Callable[..., Any]
    description: str


def _build_voc(root: Any, split: str, transforms: Transform | None, **kw: Any) -> VOCDataset:
    return VOCDataset(root, split, transforms, **kw)


def _build_synthetic(root: Any, split: str, transforms: Transform | None, task: str = "seg", **kw: Any) -> Any:
    if task not in ("seg", "cls"):
        raise UsageError(f"synthetic task must be 'seg' or 'cls', got {task!r}")
    if root is None:
        cls = SyntheticSegmentation if task == "seg" else SyntheticClassification
        return cls(split=split, transforms=transforms, **kw)
    root = check_root(root, "synthetic")
    meta = read_meta(root)
    if task == "seg":
        return VOCDataset(root, split, transforms, class_names=meta["class_names"], name="synthetic")
    return ImageFolderDataset(os.path.join(root, "cls"), split, transforms, name="synthetic")


DATASETS: dict[str, DatasetSpec] = {
    "voc": DatasetSpec("seg", ("train", "val", "train_aug"), _build_voc, "PASCAL VOC 2012, 21 classes"),
    "cityscapes": DatasetSpec("seg", ("train", "val"), CityscapesDataset, "Cityscapes fine, 19 classes"),
    "ade20k": DatasetSpec("seg", ("training", "validation"), ADE20KDataset, "ADE20K SceneParsing, 150 classes"),
    "camvid": DatasetSpec("seg", ("train", "val", "test"), CamVidDataset, "CamVid (SegNet layout), 11 classes"),
    "imagefolder": DatasetSpec(
        "cls", ("train", "val", "test"), ImageFolderDataset, "classification, ROOT/SPLIT/<class>/*"
    ),
    "synthetic": DatasetSpec("seg", ("train", "val"), _build_synthetic, "synthetic textured shapes (seg or cls)"),
    "teacher": DatasetSpec("cls", ("",), build_teacher_images, "any images in folders, a teacher's labels"),
}


def list_datasets() -> list[str]:
    return list(DATASETS)


def build_dataset(
    name: str,
    root: str | os.PathLike | None,
    split: str = "train",
    transforms: Transform | None = None,
    **kw: Any,
) -> Any:
    """Build dataset ``name`` (a key of :data:`DATASETS`) from ``root`` for ``split``.

    ``synthetic`` takes ``task="seg"|"cls"``; with ``root=None`` it is generated in memory (kwargs
    ``num_samples``, ``image_size``, ``num_classes``, ``seed``, ``cache``), with a root it reads what
    ``mtprune make-data synthetic`` wrote. ``voc`` takes ``class_names``. A missing root or wrong
    layout raises :class:`DataError` naming the expected path; an unknown name :class:`UsageError`.
    """
    spec = DATASETS.get(name)
    if spec is None:
        raise UsageError(f"unknown dataset {name!r} (choose from {', '.join(DATASETS)})")
    if root is None and name != "synthetic":
        raise DataError(f"dataset {name!r} needs a root directory")
    return spec.builder(root, split, transforms, **kw)


__all__ = [
    "ADE20K_CLASSES",
    "CAMVID_CLASSES",
    "CITYSCAPES_CLASSES",
    "DATASETS",
    "DATASET_TRANSFORM_DEFAULTS",
    "IGNORE_INDEX",
    "IMAGENET_MEAN",
    "IMAGENET_STD",
    "SHAPE_CLASSES",
    "VOC_CLASSES",
    "ADE20KDataset",
    "BadSampleError",
    "CamVidDataset",
    "CheckReport",
    "CityscapesDataset",
    "ClassificationDataset",
    "DatasetSpec",
    "ImageFolderDataset",
    "SampleInfo",
    "SampleProblem",
    "SegmentationDataset",
    "SkipBadSamples",
    "SyntheticClassification",
    "SyntheticSegmentation",
    "TeacherImages",
    "VOCDataset",
    "build_dataset",
    "build_loader",
    "build_transforms",
    "check_dataset",
    "cls_eval_transforms",
    "cls_train_transforms",
    "format_report",
    "list_datasets",
    "normalization",
    "read_meta",
    "seed_worker",
    "seg_eval_transforms",
    "seg_train_transforms",
    "write_synthetic",
]
