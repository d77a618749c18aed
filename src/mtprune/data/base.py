"""Dataset base classes shared by every layout: decoding, validation and the sample contract.

Segmentation items are ``(image, mask)``: without transforms a ``uint8`` tensor ``3×H×W`` and an
``int64`` tensor ``H×W``; after the transforms of :mod:`mtprune.data.transforms` a normalised
``float32`` image. Mask values are class ids ``0..K-1`` or :data:`IGNORE_INDEX` (each dataset's own
"unlabelled" value is mapped to it). Classification items are ``(image, int label)``.

A sample that cannot be used (a file that is missing or does not decode, a mask whose size differs
from its image, a label value that is neither a class nor the ignore value) raises
:class:`BadSampleError`, a :class:`~mtprune.errors.DataError` whose message is one line naming the
file (and the value). :meth:`SegmentationDataset.inspect` reports every problem of a sample instead
of raising; ``mtprune check-data`` is built on it.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image
from torch.utils.data import Dataset
from torchvision import tv_tensors

from mtprune.errors import DataError

IGNORE_INDEX = 255
"""The ignore value of every segmentation mask mtprune yields (after each dataset's own mapping)."""

Transform = Callable[..., Any]


@dataclass(frozen=True)
class SampleProblem:
    """One problem of one sample: the file, what is wrong, and the offending value (if any)."""

    file: str
    what: str = ""
    value: str = ""

    def __str__(self) -> str:
        return self.file + (f": {self.what}" if self.what else "") + (f" ({self.value})" if self.value else "")


class BadSampleError(DataError):
    """A sample that cannot be read or used; the message is one line naming its file.

    Raised in a DataLoader worker, the exception reaches the main process rebuilt from the worker's
    traceback text; the constructor then keeps only the original one-line message.
    """

    def __init__(self, problem: SampleProblem | str) -> None:
        if isinstance(problem, str):
            problem = SampleProblem(_original_message(problem))
        super().__init__(str(problem))
        self.problem = problem


def _original_message(text: str) -> str:
    marker = f"{BadSampleError.__name__}: "
    for line in reversed(text.strip().splitlines()):
        if marker in line:
            return line.split(marker, 1)[1].strip()
    return " ".join(text.split())


@dataclass
class SampleInfo:
    """What :meth:`inspect` learns about one sample without raising."""

    index: int
    image_size: tuple[int, int] | None = None  # (height, width)
    class_counts: np.ndarray | None = None  # seg: pixels per class id 0..K-1
    ignore_count: int = 0  # seg: pixels equal to the ignore value
    label: int | None = None  # cls: the class id
    problems: list[SampleProblem] = field(default_factory=list)


def require_dir(path: Path, what: str) -> Path:
    """Raise a one-line :class:`DataError` naming ``path`` unless it is a directory."""
    if not path.is_dir():
        raise DataError(f"expected directory {path} ({what}) not found")
    return path


def require_file(path: Path, what: str) -> Path:
    """Raise a one-line :class:`DataError` naming ``path`` unless it is a file."""
    if not path.is_file():
        raise DataError(f"expected file {path} ({what}) not found")
    return path


def check_root(root: str | os.PathLike | None, dataset: str) -> Path:
    """The dataset root as a :class:`Path`; a missing one is a one-line :class:`DataError`."""
    if root is None:
        raise DataError(f"dataset {dataset!r} needs a root directory")
    path = Path(root).expanduser()
    if not path.is_dir():
        raise DataError(f"expected dataset root directory {path} ({dataset}) not found")
    return path


def _short(e: BaseException) -> str:
    text = " ".join(str(e).split()) or type(e).__name__
    return text if len(text) <= 120 else text[:117] + "..."


def decode_image(path: Path, problems: list[SampleProblem]) -> np.ndarray | None:
    """Decode ``path`` as an RGB ``uint8`` array ``H×W×3``; on failure append a problem, return None."""
    if not path.is_file():
        problems.append(SampleProblem(str(path), "listed file not found"))
        return None
    try:
        with Image.open(path) as img:
            arr = np.array(to_rgb8(img))
    except (OSError, ValueError, SyntaxError, Image.DecompressionBombError) as e:
        problems.append(SampleProblem(str(path), "image does not decode", _short(e)))
        return None
    return arr


def to_rgb8(img: Image.Image) -> Image.Image:
    """``img`` as 8-bit RGB. 16-bit grayscale (``I;16*``) and 32-bit integer (``I``) images are scaled by
    65535 → 255 (PIL's own conversion clips them, a 16-bit photo becoming all white); float (``F``) images
    are taken as 0..1 when their values lie there, else as 0..255."""
    if img.mode.startswith("I;16") or img.mode == "I":
        arr = np.asarray(img).astype(np.float64)
        img = Image.fromarray(np.clip(np.rint(arr / 257.0), 0, 255).astype(np.uint8))
    elif img.mode == "F":
        arr = np.asarray(img).astype(np.float64)
        scale = 255.0 if arr.size and arr.max() <= 1.0 else 1.0
        img = Image.fromarray(np.clip(np.rint(arr * scale), 0, 255).astype(np.uint8))
    return img.convert("RGB")


def decode_mask(path: Path, problems: list[SampleProblem]) -> np.ndarray | None:
    """Decode a label PNG as an ``H×W`` integer array (palette PNGs give the palette index)."""
    if not path.is_file():
        problems.append(SampleProblem(str(path), "listed file not found"))
        return None
    try:
        with Image.open(path) as img:
            mode = img.mode
            arr = np.asarray(img)
    except (OSError, ValueError, SyntaxError, Image.DecompressionBombError) as e:
        problems.append(SampleProblem(str(path), "mask does not decode", _short(e)))
        return None
    if arr.ndim != 2:
        problems.append(SampleProblem(str(path), "mask is not a single-channel label image", f"mode {mode}"))
        return None
    return arr


def identity_label_map(num_classes: int, raw_ignore: int = IGNORE_INDEX) -> np.ndarray:
    """A 256-entry map: ``0..K-1`` to themselves, ``raw_ignore`` to 255, everything else invalid (-1)."""
    lut = np.full(256, -1, dtype=np.int16)
    lut[:num_classes] = np.arange(num_classes)
    lut[raw_ignore] = IGNORE_INDEX
    return lut


class DatasetView(Dataset):
    """A dataset wrapped by another: same length, and the wrapped dataset's attributes (``num_classes``,
    ``class_names``, ``task``...) forwarded. Subclasses change ``__getitem__``."""

    def __init__(self, dataset: Dataset) -> None:
        self.dataset = dataset

    def __len__(self) -> int:
        return len(self.dataset)  # type: ignore[arg-type]

    def __getattr__(self, name: str) -> Any:
        if name.startswith("__") or "dataset" not in self.__dict__:
            raise AttributeError(name)
        return getattr(self.__dict__["dataset"], name)


class SeededSubset(DatasetView):
    """``n`` samples of ``dataset``, a seeded draw without replacement (kept in the drawn order), so that
    "the same 46 labelled images" is one fixed set whatever else varies. ``indices`` are the originals."""

    def __init__(self, dataset: Dataset, n: int, seed: int = 0) -> None:
        super().__init__(dataset)
        total = len(dataset)  # type: ignore[arg-type]
        if not 1 <= n <= total:
            raise ValueError(f"train_subset {n} is outside 1..{total} (the split's size)")

        perm = torch.randperm(total, generator=torch.Generator().manual_seed(seed))
        self.indices = sorted(perm[:n].tolist())

    def __len__(self) -> int:
        return len(self.indices)

    def __getitem__(self, index: int) -> Any:
        return self.dataset[self.indices[index]]


class SegmentationDataset(Dataset):
    """A list of ``(image file, mask file)`` pairs with a raw-label → class-id map.

    Subclasses fill ``samples`` and ``label_map`` (256 entries: class id, 255 for ignore, -1 for a
    value that must not occur) and ``label_desc`` (how a bad value is described in messages).
    """

    task = "seg"
    ignore_index = IGNORE_INDEX

    def __init__(
        self,
        samples: Sequence[tuple[Path, Path]],
        class_names: Sequence[str],
        label_map: np.ndarray,
        label_desc: str,
        transforms: Transform | None = None,
        name: str = "",
        split: str = "",
        root: Path | None = None,
    ) -> None:
        self.samples = [(Path(i), Path(m)) for i, m in samples]
        self.class_names = list(class_names)
        self.num_classes = len(self.class_names)
        self.label_map = label_map
        self.label_desc = label_desc
        self.transforms = transforms
        self.name = name
        self.split = split
        self.root = root

    def __len__(self) -> int:
        return len(self.samples)

    def __repr__(self) -> str:
        return (
            f"{type(self).__name__}(name={self.name!r}, split={self.split!r}, root={str(self.root)!r}, "
            f"samples={len(self)}, num_classes={self.num_classes})"
        )

    def _read(self, index: int, info: SampleInfo) -> tuple[np.ndarray, np.ndarray] | None:
        """Decode and validate sample ``index``, filling ``info``; the pair (image, class-id mask)."""
        img_path, mask_path = self.samples[index]
        problems = info.problems
        img = decode_image(img_path, problems)
        mask = decode_mask(mask_path, problems)
        if img is not None:
            info.image_size = (int(img.shape[0]), int(img.shape[1]))
        if mask is None:
            return None
        if img is not None and mask.shape != img.shape[:2]:
            problems.append(
                SampleProblem(
                    str(mask_path),
                    "mask size differs from its image",
                    f"mask {mask.shape[1]}x{mask.shape[0]}, image {img.shape[1]}x{img.shape[0]}",
                )
            )
        if mask.dtype != np.uint8:
            lo, hi = int(mask.min()), int(mask.max())
            if lo < 0 or hi > 255:
                problems.append(
                    SampleProblem(str(mask_path), f"label value {self.label_desc}", str(lo if lo < 0 else hi))
                )
                return None
            mask = mask.astype(np.uint8)
        hist = np.bincount(mask.ravel(), minlength=256)
        bad = np.flatnonzero((hist > 0) & (self.label_map < 0))
        if bad.size:
            values = ", ".join(str(v) for v in bad[:8]) + (", ..." if bad.size > 8 else "")
            problems.append(SampleProblem(str(mask_path), f"label value {self.label_desc}", values))
        mapped = self.label_map
        counts = np.zeros(self.num_classes, dtype=np.int64)
        valid = (hist > 0) & (mapped >= 0)
        ids = mapped[valid]
        in_class = ids < self.num_classes
        np.add.at(counts, ids[in_class].astype(np.int64), hist[valid][in_class])
        info.class_counts = counts
        info.ignore_count = int(hist[valid][~in_class].sum())
        if problems or img is None:
            return None
        return img, self.label_map[mask].astype(np.uint8)

    def inspect(self, index: int) -> SampleInfo:
        """Decode sample ``index`` and report its size, pixels per class and every problem."""
        info = SampleInfo(index)
        self._read(index, info)
        return info

    def load(self, index: int) -> tuple[tv_tensors.Image, tv_tensors.Mask]:
        """The decoded sample as ``tv_tensors`` (``uint8`` image, ``uint8`` class-id mask)."""
        info = SampleInfo(index)
        pair = self._read(index, info)
        if pair is None:
            raise BadSampleError(info.problems[0])
        img, mask = pair
        image = tv_tensors.Image(torch.from_numpy(img).permute(2, 0, 1).contiguous())
        return image, tv_tensors.Mask(torch.from_numpy(mask))

    def __getitem__(self, index: int) -> tuple[torch.Tensor, torch.Tensor]:
        image, mask = self.load(index)
        if self.transforms is not None:
            image, mask = self.transforms(image, mask)
        return image.as_subclass(torch.Tensor), mask.as_subclass(torch.Tensor).to(torch.int64)


class ClassificationDataset(Dataset):
    """A list of ``(image file, class id)`` pairs; items are ``(image, int label)``."""

    task = "cls"
    ignore_index = -100

    def __init__(
        self,
        samples: Sequence[tuple[Path, int]],
        class_names: Sequence[str],
        transforms: Transform | None = None,
        name: str = "",
        split: str = "",
        root: Path | None = None,
    ) -> None:
        self.samples = [(Path(p), int(t)) for p, t in samples]
        self.class_names = list(class_names)
        self.num_classes = len(self.class_names)
        self.transforms = transforms
        self.name = name
        self.split = split
        self.root = root

    def __len__(self) -> int:
        return len(self.samples)

    def __repr__(self) -> str:
        return (
            f"{type(self).__name__}(name={self.name!r}, split={self.split!r}, root={str(self.root)!r}, "
            f"samples={len(self)}, num_classes={self.num_classes})"
        )

    def _read(self, index: int, info: SampleInfo) -> np.ndarray | None:
        path, label = self.samples[index]
        info.label = label
        img = decode_image(path, info.problems)
        if img is not None:
            info.image_size = (int(img.shape[0]), int(img.shape[1]))
        return img

    def inspect(self, index: int) -> SampleInfo:
        info = SampleInfo(index)
        self._read(index, info)
        return info

    def load(self, index: int) -> tuple[tv_tensors.Image, int]:
        info = SampleInfo(index)
        img = self._read(index, info)
        if img is None:
            raise BadSampleError(info.problems[0])
        image = tv_tensors.Image(torch.from_numpy(img).permute(2, 0, 1).contiguous())
        return image, self.samples[index][1]

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int]:
        image, label = self.load(index)
        if self.transforms is not None:
            image = self.transforms(image)
        return image.as_subclass(torch.Tensor), label
