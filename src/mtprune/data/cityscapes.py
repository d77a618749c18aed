"""Cityscapes (fine annotations) in its official layout, read through torchvision's Cityscapes.

``ROOT/leftImg8bit/{split}/{city}/*_leftImg8bit.png`` + ``ROOT/gtFine/{split}/{city}/*_gtFine_labelIds.png``:
the 34 label ids are mapped to the 19 train ids; every other id becomes 255 (ignore).
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
from torchvision.datasets import Cityscapes

from mtprune.data.base import IGNORE_INDEX, SegmentationDataset, Transform, check_root, require_dir
from mtprune.errors import DataError

CITYSCAPES_SPLITS = ("train", "val", "test")


def _train_classes() -> list[tuple[int, int, str]]:
    return [(c.id, c.train_id, c.name) for c in Cityscapes.classes]


CITYSCAPES_CLASSES = [
    name for _, tid, name in sorted((c for c in _train_classes() if 0 <= c[1] < IGNORE_INDEX), key=lambda c: c[1])
]


def cityscapes_label_map() -> np.ndarray:
    """256 entries: label id → train id (0..18), other ids → 255, values that are no label id → -1."""
    lut = np.full(256, -1, dtype=np.int16)
    for cid, tid, _ in _train_classes():
        if 0 <= cid < 256:
            lut[cid] = tid if 0 <= tid < len(CITYSCAPES_CLASSES) else IGNORE_INDEX
    return lut


class CityscapesDataset(SegmentationDataset):
    """Cityscapes fine: 19 classes, ignore 255."""

    def __init__(self, root: str | os.PathLike, split: str = "train", transforms: Transform | None = None) -> None:
        root_path = check_root(root, "cityscapes")
        if split not in CITYSCAPES_SPLITS:
            raise DataError(f"unknown Cityscapes split {split!r} (expected one of {', '.join(CITYSCAPES_SPLITS)})")
        require_dir(root_path / "leftImg8bit" / split, "Cityscapes layout")
        require_dir(root_path / "gtFine" / split, "Cityscapes layout")
        try:
            tv = Cityscapes(str(root_path), split=split, mode="fine", target_type="semantic")
        except OSError as e:
            raise DataError(f"{root_path}: not the Cityscapes layout ({e})") from None
        samples = sorted(
            (Path(i), Path(t[0])) for i, t in zip(tv.images, tv.targets, strict=True) if i.endswith("_leftImg8bit.png")
        )
        if not samples:
            raise DataError(f"no *_leftImg8bit.png images under {root_path / 'leftImg8bit' / split}")
        ids = sorted(int(i) for i in np.flatnonzero(cityscapes_label_map() >= 0))
        super().__init__(
            samples,
            CITYSCAPES_CLASSES,
            cityscapes_label_map(),
            f"is not a Cityscapes label id {ids[0]}..{ids[-1]}",
            transforms=transforms,
            name="cityscapes",
            split=split,
            root=root_path,
        )
