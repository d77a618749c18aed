"""ADE20K (SceneParsing, ADEChallengeData2016) in its official layout.

``ROOT/ADEChallengeData2016/{images,annotations}/{training,validation}/``: ``*.jpg`` images and
``*.png`` masks with the same stem; 150 classes, label 0 ("other") → ignore, label k → class k−1.
"""

from __future__ import annotations

import os

import numpy as np

from mtprune.data.base import IGNORE_INDEX, SegmentationDataset, Transform, check_root, require_dir
from mtprune.errors import DataError

ADE20K_CLASSES = [
    "wall", "building", "sky", "floor", "tree", "ceiling", "road", "bed", "windowpane", "grass", "cabinet",
    "sidewalk", "person", "earth", "door", "table", "mountain", "plant", "curtain", "chair", "car", "water",
    "painting", "sofa", "shelf", "house", "sea", "mirror", "rug", "field", "armchair", "seat", "fence",
    "desk", "rock", "wardrobe", "lamp", "bathtub", "railing", "cushion", "base", "box", "column",
    "signboard", "chest of drawers", "counter", "sand", "sink", "skyscraper", "fireplace", "refrigerator",
    "grandstand", "path", "stairs", "runway", "case", "pool table", "pillow", "screen door", "stairway",
    "river", "bridge", "bookcase", "blind", "coffee table", "toilet", "flower", "book", "hill", "bench",
    "countertop", "stove", "palm", "kitchen island", "computer", "swivel chair", "boat", "bar",
    "arcade machine", "hovel", "bus", "towel", "light", "truck", "tower", "chandelier", "awning",
    "streetlight", "booth", "television receiver", "airplane", "dirt track", "apparel", "pole", "land",
    "bannister", "escalator", "ottoman", "bottle", "buffet", "poster", "stage", "van", "ship", "fountain",
    "conveyer belt", "canopy", "washer", "plaything", "swimming pool", "stool", "barrel", "basket",
    "waterfall", "tent", "bag", "minibike", "cradle", "oven", "ball", "food", "step", "tank", "trade name",
    "microwave", "pot", "animal", "bicycle", "lake", "dishwasher", "screen", "blanket", "sculpture", "hood",
    "sconce", "vase", "traffic light", "tray", "ashcan", "fan", "pier", "crt screen", "plate", "monitor",
    "bulletin board", "shower", "radiator", "glass", "clock", "flag",
]  # fmt: skip

ADE20K_SPLITS = ("training", "validation")
_ALIASES = {"train": "training", "val": "validation"}
_IMAGE_EXTS = (".jpg", ".jpeg", ".png")


def ade20k_label_map() -> np.ndarray:
    """256 entries: 0 → 255 (ignore), k → k−1 for k in 1..150, larger values → -1 (invalid)."""
    lut = np.full(256, -1, dtype=np.int16)
    lut[0] = IGNORE_INDEX
    lut[1 : len(ADE20K_CLASSES) + 1] = np.arange(len(ADE20K_CLASSES))
    return lut


class ADE20KDataset(SegmentationDataset):
    """ADE20K SceneParsing: 150 classes, ignore 255 (the raw label 0)."""

    def __init__(self, root: str | os.PathLike, split: str = "training", transforms: Transform | None = None) -> None:
        root_path = check_root(root, "ade20k")
        split_dir = _ALIASES.get(split, split)
        if split_dir not in ADE20K_SPLITS:
            raise DataError(f"unknown ADE20K split {split!r} (expected one of {', '.join(ADE20K_SPLITS)})")
        base = require_dir(root_path / "ADEChallengeData2016", "ADE20K layout")
        image_dir = require_dir(base / "images" / split_dir, "ADE20K layout")
        mask_dir = require_dir(base / "annotations" / split_dir, "ADE20K layout")
        samples = [
            (p, mask_dir / f"{p.stem}.png")
            for p in sorted(image_dir.iterdir())
            if p.suffix.lower() in _IMAGE_EXTS and not p.name.startswith(".")
        ]
        if not samples:
            raise DataError(f"no images under {image_dir}")
        k = len(ADE20K_CLASSES)
        super().__init__(
            samples,
            ADE20K_CLASSES,
            ade20k_label_map(),
            f"outside 1..{k} (classes 0..{k - 1}) and not the ignore value 0",
            transforms=transforms,
            name="ade20k",
            split=split_dir,
            root=root_path,
        )
