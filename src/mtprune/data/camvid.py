"""CamVid in the SegNet layout (as in ``shared/data/camvid``).

``ROOT/{train,val,test}/*.png`` images, ``ROOT/{train,val,test}annot/*.png`` class-id masks (mode L),
and ``ROOT/{split}.txt`` lists of ``image annotation`` pairs written with the original release's
absolute paths (``/SegNet/CamVid/train/X.png /SegNet/CamVid/trainannot/X.png``): each path is resolved
relative to the root by its last two components. 11 classes; 11 (Unlabelled) → 255 (ignore).
"""

from __future__ import annotations

import os
from pathlib import Path, PurePosixPath

from mtprune.data.base import SegmentationDataset, Transform, check_root, identity_label_map, require_file
from mtprune.errors import DataError

CAMVID_CLASSES = [
    "Sky", "Building", "Pole", "Road", "Pavement", "Tree", "SignSymbol", "Fence", "Car", "Pedestrian",
    "Bicyclist",
]  # fmt: skip
CAMVID_IGNORE = 11
CAMVID_SPLITS = ("train", "val", "test")


def _resolve(root: Path, entry: str) -> Path:
    parts = PurePosixPath(entry.replace("\\", "/")).parts
    return root.joinpath(*parts[-2:])


class CamVidDataset(SegmentationDataset):
    """CamVid, SegNet layout: 11 classes, the raw label 11 → 255 (ignore)."""

    def __init__(self, root: str | os.PathLike, split: str = "train", transforms: Transform | None = None) -> None:
        root_path = check_root(root, "camvid")
        if split not in CAMVID_SPLITS:
            raise DataError(f"unknown CamVid split {split!r} (expected one of {', '.join(CAMVID_SPLITS)})")
        list_file = require_file(root_path / f"{split}.txt", "CamVid SegNet list file")
        samples = []
        for n, line in enumerate(list_file.read_text(encoding="utf-8").splitlines(), 1):
            parts = line.split()
            if not parts:
                continue
            if len(parts) != 2:
                raise DataError(f"{list_file}:{n}: expected 'image annotation', got {line.strip()!r}")
            samples.append((_resolve(root_path, parts[0]), _resolve(root_path, parts[1])))
        if not samples:
            raise DataError(f"{list_file}: no samples listed")
        k = len(CAMVID_CLASSES)
        super().__init__(
            samples,
            CAMVID_CLASSES,
            identity_label_map(k, CAMVID_IGNORE),
            f"outside 0..{k - 1} and not the ignore value {CAMVID_IGNORE}",
            transforms=transforms,
            name="camvid",
            split=split,
            root=root_path,
        )
