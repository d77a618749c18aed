"""Images without labels for MTP's classification task when ImageNet is not at hand: the targets come
from a frozen teacher (:mod:`mtprune.train.teacher`), not from the files. Any images under one or more
folders (recursively, sorted, so the order is the same on every machine)."""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path

from mtprune.data.base import ClassificationDataset, Transform, check_root
from mtprune.errors import DataError

#: the file suffixes taken as images
IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp", ".ppm", ".tif", ".tiff", ".webp")


def image_files(folder: Path) -> list[Path]:
    """Every image file under ``folder`` (recursively), sorted by path."""
    return sorted(p for p in folder.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES and p.is_file())


class TeacherImages(ClassificationDataset):
    """Images under ``roots`` (each a folder), items ``(image, 0)``: the label is the teacher's, given at
    training time. ``num_classes`` is None: the teacher's classification head decides it."""

    def __init__(self, roots: Sequence[str | os.PathLike], transforms: Transform | None = None) -> None:
        if not roots:
            raise DataError("dataset 'teacher' needs image folders (data.cls.roots, or --root)", exit_code=2)
        samples: list[tuple[Path, int]] = []
        for root in roots:
            folder = check_root(root, "teacher")
            found = image_files(folder)
            if not found:
                raise DataError(f"{folder}: no images under it (looked for {', '.join(IMAGE_SUFFIXES)})", exit_code=2)
            samples += [(p, 0) for p in found]
        super().__init__(samples, [], transforms=transforms, name="teacher", split="", root=Path(roots[0]))
        self.num_classes = None  # type: ignore[assignment]


def build_teacher_images(
    root: str | os.PathLike | Sequence[str | os.PathLike],
    split: str = "",
    transforms: Transform | None = None,
) -> TeacherImages:
    """The registry's builder: ``root`` (one folder or several), with ``split`` a sub-folder of each when given."""
    roots = [root] if isinstance(root, str | os.PathLike) else list(root)
    return TeacherImages([Path(r) / split if split else Path(r) for r in roots], transforms)
