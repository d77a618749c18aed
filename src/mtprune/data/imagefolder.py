"""Classification images in the ImageNet folder layout, read through torchvision's ImageFolder.

``ROOT/{split}/<class>/*`` (split names are whatever the tree uses: ``train``/``val`` for ImageNet,
``train``/``test`` for the CIFAR-10 tree); class ids follow the sorted class-folder names.
"""

from __future__ import annotations

import inspect
import os
from pathlib import Path

from torchvision.datasets import ImageFolder

from mtprune.data.base import ClassificationDataset, Transform, check_root, require_dir
from mtprune.errors import DataError

# A class folder without images is not an error (torchvision >= 0.18 can be told so).
_ALLOW_EMPTY = {"allow_empty": True} if "allow_empty" in inspect.signature(ImageFolder).parameters else {}


class ImageFolderDataset(ClassificationDataset):
    """``ROOT/{split}/<class>/*``: items ``(image, class id)``."""

    def __init__(
        self,
        root: str | os.PathLike,
        split: str = "train",
        transforms: Transform | None = None,
        name: str = "imagefolder",
    ) -> None:
        root_path = check_root(root, name)
        split_dir = require_dir(root_path / split, "ImageNet-style layout ROOT/SPLIT/<class>/*")
        try:
            tv = ImageFolder(str(split_dir), **_ALLOW_EMPTY)
        except (FileNotFoundError, OSError) as e:
            raise DataError(f"expected class folders with images under {split_dir} ({e})") from None
        if not tv.samples:
            raise DataError(f"{split_dir}: no images in its class folders ({len(tv.classes)} folders)")
        super().__init__(
            [(Path(p), t) for p, t in tv.samples],
            tv.classes,
            transforms=transforms,
            name=name,
            split=split,
            root=root_path,
        )
