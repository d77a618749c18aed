"""PASCAL VOC 2012 segmentation in its official layout (read through torchvision's VOCSegmentation).

``ROOT/VOCdevkit/VOC2012/{JPEGImages, SegmentationClass, ImageSets/Segmentation/{train,val}.txt}``:
21 classes, 255 = ignore; masks are palette PNGs whose palette index is the class. The split
``train_aug`` (alias ``trainaug``) is the usual SBD-augmented training list: ``train_aug.txt`` (in
``ImageSets/Segmentation/`` or ``VOC2012/``, lines ``ID`` or ``/JPEGImages/ID.jpg
/SegmentationClassAug/ID.png``) with masks in ``SegmentationClassAug`` (10,582 images).
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path

import numpy as np
from PIL import Image
from torchvision.datasets import VOCSegmentation

from mtprune.data.base import (
    IGNORE_INDEX,
    SegmentationDataset,
    Transform,
    check_root,
    identity_label_map,
    require_dir,
    require_file,
)
from mtprune.errors import DataError

VOC_CLASSES = [
    "background", "aeroplane", "bicycle", "bird", "boat", "bottle", "bus", "car", "cat", "chair", "cow",
    "diningtable", "dog", "horse", "motorbike", "person", "pottedplant", "sheep", "sofa", "train",
    "tvmonitor",
]  # fmt: skip

VOC_SPLITS = ("train", "val", "trainval", "train_aug")
_AUG_SPLITS = ("train_aug", "trainaug")


def voc_palette() -> list[int]:
    """The 256-colour VOC palette (flat RGB list) used by ``SegmentationClass`` PNGs."""
    palette = []
    for i in range(256):
        r = g = b = 0
        c = i
        for j in range(8):
            r |= ((c >> 0) & 1) << (7 - j)
            g |= ((c >> 1) & 1) << (7 - j)
            b |= ((c >> 2) & 1) << (7 - j)
            c >>= 3
        palette += [r, g, b]
    return palette


def save_voc_mask(mask: np.ndarray, path: str | os.PathLike) -> None:
    """Write a class-id mask as a VOC palette PNG (the class is the palette index)."""
    img = Image.fromarray(mask.astype(np.uint8), mode="P")
    img.putpalette(voc_palette())
    img.save(path, format="PNG")


def _read_aug_list(path: Path) -> list[str]:
    ids = []
    for line in path.read_text(encoding="utf-8").splitlines():
        parts = line.split()
        if parts:
            ids.append(Path(parts[0]).stem)
    return ids


class VOCDataset(SegmentationDataset):
    """VOC 2012 segmentation (or any set written in its layout, such as ``make-data synthetic``)."""

    def __init__(
        self,
        root: str | os.PathLike,
        split: str = "train",
        transforms: Transform | None = None,
        class_names: Sequence[str] = VOC_CLASSES,
        name: str = "voc",
    ) -> None:
        root_path = check_root(root, name)
        voc_root = require_dir(root_path / "VOCdevkit" / "VOC2012", "VOC 2012 layout")
        image_dir = require_dir(voc_root / "JPEGImages", "VOC 2012 layout")
        if split in _AUG_SPLITS:
            candidates = [voc_root / "ImageSets" / "Segmentation" / f"{s}.txt" for s in _AUG_SPLITS] + [
                voc_root / f"{s}.txt" for s in _AUG_SPLITS
            ]
            list_file = next((p for p in candidates if p.is_file()), candidates[0])
            require_file(list_file, "SBD-augmented training list")
            mask_dir = require_dir(voc_root / "SegmentationClassAug", "SBD-augmented masks")
            ids = _read_aug_list(list_file)
            samples = [(image_dir / f"{i}.jpg", mask_dir / f"{i}.png") for i in ids]
        else:
            if split not in VOC_SPLITS:
                raise DataError(f"unknown VOC split {split!r} (expected one of {', '.join(VOC_SPLITS)})")
            require_file(voc_root / "ImageSets" / "Segmentation" / f"{split}.txt", f"VOC list of the {split} split")
            require_dir(voc_root / "SegmentationClass", "VOC 2012 layout")
            tv = VOCSegmentation(str(root_path), year="2012", image_set=split, download=False)
            samples = [(Path(i), Path(m)) for i, m in zip(tv.images, tv.masks, strict=True) if Path(i).name != ".jpg"]
        if not samples:
            raise DataError(f"no samples listed for split {split!r} of {voc_root}")
        num_classes = len(class_names)
        super().__init__(
            samples,
            class_names,
            identity_label_map(num_classes, IGNORE_INDEX),
            f"outside 0..{num_classes - 1} and not the ignore value {IGNORE_INDEX}",
            transforms=transforms,
            name=name,
            split=split,
            root=root_path,
        )
