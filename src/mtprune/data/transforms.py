"""Aligned image/mask transforms built from ``torchvision.transforms.v2``.

Images travel as :class:`tv_tensors.Image` and masks as :class:`tv_tensors.Mask`, so one random draw
(scale, crop window, flip) applies to both: images are resized bilinearly, masks with NEAREST, and
padding fills the mask with the ignore value 255. Every size and range is an argument; the per-dataset
values the training configuration usually takes are in :data:`DATASET_TRANSFORM_DEFAULTS`.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import torch
from torchvision import tv_tensors
from torchvision.transforms import v2
from torchvision.transforms.v2 import functional as F

try:
    from torchvision.transforms.v2 import query_size
except ImportError:  # torchvision < 0.21
    from torchvision.transforms.v2._utils import query_size  # type: ignore[no-redef]

from mtprune.data.base import IGNORE_INDEX

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)

Size = int | Sequence[int]

# Typical values (the DeepLab/PSPNet conventions); a run's configuration overrides any of them.
DATASET_TRANSFORM_DEFAULTS: dict[str, dict[str, Any]] = {
    "voc": {"crop_size": (513, 513), "scale_range": (0.5, 2.0), "hflip": 0.5},
    "cityscapes": {"crop_size": (768, 768), "scale_range": (0.5, 2.0), "hflip": 0.5},
    "ade20k": {"crop_size": (512, 512), "scale_range": (0.5, 2.0), "hflip": 0.5},
    "camvid": {"crop_size": (360, 480), "scale_range": (0.5, 2.0), "hflip": 0.5},
    "synthetic": {"crop_size": (64, 64), "scale_range": (0.5, 2.0), "hflip": 0.5, "size": 64, "resize": 64},
    "imagefolder": {"size": 224, "resize": 256, "hflip": 0.5, "min_area": 0.08},
}


def normalization(dataset: str | None = None) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """The ``(mean, std)`` every dataset is normalised with: ImageNet's (pre-trained weights expect it)."""
    return IMAGENET_MEAN, IMAGENET_STD


def _pair(size: Size) -> tuple[int, int]:
    if isinstance(size, int):
        return (size, size)
    h, w = size
    return (int(h), int(w))


class RandomScale(v2.Transform):
    """Resize image and mask together by one factor drawn uniformly from ``scale_range``.

    Images are resized bilinearly (antialiased), masks with NEAREST (torchvision forces it for
    :class:`tv_tensors.Mask`).
    """

    def __init__(self, scale_range: tuple[float, float] = (0.5, 2.0)) -> None:
        super().__init__()
        lo, hi = float(scale_range[0]), float(scale_range[1])
        if not 0 < lo <= hi:
            raise ValueError(f"scale_range must satisfy 0 < low <= high, got {scale_range}")
        self.scale_range = (lo, hi)

    def make_params(self, flat_inputs: list[Any]) -> dict[str, Any]:
        h, w = query_size(flat_inputs)
        lo, hi = self.scale_range
        s = lo + float(torch.rand(())) * (hi - lo)
        return {"size": [max(1, round(h * s)), max(1, round(w * s))]}

    def transform(self, inpt: Any, params: dict[str, Any]) -> Any:
        return self._call_kernel(F.resize, inpt, size=params["size"], antialias=True)

    # torchvision < 0.21 called these private names.
    def _get_params(self, flat_inputs: list[Any]) -> dict[str, Any]:
        return self.make_params(flat_inputs)

    def _transform(self, inpt: Any, params: dict[str, Any]) -> Any:
        return self.transform(inpt, params)


def _to_float_normalized(mean: Sequence[float], std: Sequence[float]) -> list[v2.Transform]:
    return [
        v2.ToDtype({tv_tensors.Image: torch.float32, tv_tensors.Mask: torch.int64, "others": None}, scale=True),
        v2.Normalize(mean=list(mean), std=list(std)),
    ]


def seg_train_transforms(
    crop_size: Size,
    scale_range: tuple[float, float] = (0.5, 2.0),
    hflip: float = 0.5,
    mean: Sequence[float] = IMAGENET_MEAN,
    std: Sequence[float] = IMAGENET_STD,
) -> v2.Compose:
    """Random scale in ``scale_range``, pad (image 0, mask 255) and random crop to ``crop_size``
    (``int`` or ``(H, W)``), horizontal flip with probability ``hflip``, ``float32`` and normalise."""
    return v2.Compose(
        [
            RandomScale(scale_range),
            v2.RandomCrop(
                _pair(crop_size), pad_if_needed=True, fill={tv_tensors.Image: 0, tv_tensors.Mask: IGNORE_INDEX}
            ),
            v2.RandomHorizontalFlip(hflip),
            *_to_float_normalized(mean, std),
        ]
    )


def seg_eval_transforms(
    mean: Sequence[float] = IMAGENET_MEAN,
    std: Sequence[float] = IMAGENET_STD,
    resize: Size | None = None,
) -> v2.Compose:
    """The whole image, ``float32`` and normalised; ``resize`` (optional ``int`` shorter side or
    ``(H, W)``) resizes image (bilinear) and mask (NEAREST) first, for reduced-resolution protocols."""
    steps: list[v2.Transform] = []
    if resize is not None:
        steps.append(v2.Resize(resize if isinstance(resize, int) else list(_pair(resize)), antialias=True))
    return v2.Compose(steps + _to_float_normalized(mean, std))


def cls_train_transforms(
    size: Size,
    min_area: float = 0.08,
    hflip: float = 0.5,
    mean: Sequence[float] = IMAGENET_MEAN,
    std: Sequence[float] = IMAGENET_STD,
) -> v2.Compose:
    """RandomResizedCrop to ``size`` (area fraction in ``[min_area, 1]``), flip, ``float32``, normalise."""
    return v2.Compose(
        [
            v2.RandomResizedCrop(_pair(size), scale=(min_area, 1.0), antialias=True),
            v2.RandomHorizontalFlip(hflip),
            *_to_float_normalized(mean, std),
        ]
    )


def cls_eval_transforms(
    size: Size,
    resize: int | None = None,
    mean: Sequence[float] = IMAGENET_MEAN,
    std: Sequence[float] = IMAGENET_STD,
) -> v2.Compose:
    """Resize the shorter side to ``resize`` (default ``size·8/7``, i.e. 256 for 224), centre-crop
    ``size``, ``float32``, normalise."""
    h, w = _pair(size)
    if resize is None:
        resize = round(min(h, w) * 8 / 7)
    return v2.Compose([v2.Resize(resize, antialias=True), v2.CenterCrop((h, w)), *_to_float_normalized(mean, std)])


def build_transforms(task: str, train: bool, config: Mapping[str, Any] | None = None) -> v2.Compose:
    """Transforms for ``task`` (``"seg"``/``"cls"``) from a config mapping with the keys of
    :data:`DATASET_TRANSFORM_DEFAULTS` (``crop_size``, ``scale_range``, ``hflip``, ``eval_resize``;
    ``size``, ``resize``, ``min_area``; ``mean``, ``std``)."""
    cfg = dict(config or {})
    mean = tuple(cfg.get("mean", IMAGENET_MEAN))
    std = tuple(cfg.get("std", IMAGENET_STD))
    if task == "seg":
        if train:
            if "crop_size" not in cfg:
                raise ValueError("segmentation training transforms need 'crop_size'")
            return seg_train_transforms(
                cfg["crop_size"], tuple(cfg.get("scale_range", (0.5, 2.0))), float(cfg.get("hflip", 0.5)), mean, std
            )
        return seg_eval_transforms(mean, std, cfg.get("eval_resize"))
    if task == "cls":
        if "size" not in cfg:
            raise ValueError("classification transforms need 'size'")
        if train:
            return cls_train_transforms(
                cfg["size"], float(cfg.get("min_area", 0.08)), float(cfg.get("hflip", 0.5)), mean, std
            )
        return cls_eval_transforms(cfg["size"], cfg.get("resize"), mean, std)
    raise ValueError(f"unknown task {task!r} (expected 'seg' or 'cls')")
