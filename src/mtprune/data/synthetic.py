"""A deterministic synthetic visual world: textured shapes on cluttered backgrounds.

Ten shape classes (disk, square, triangle, ring, stripes patch, ...), each with its own geometry,
texture (dots, checker, stripes, noise, ...) and colour statistics, are drawn at random positions,
sizes and rotations over a background of smooth colour fields and small clutter items of random
colours and shapes (which are labelled background). Two sets come from this world:

* segmentation (:class:`SyntheticSegmentation`): 1–4 objects per image; class 0 is the background
  and classes ``1..K-1`` are the first ``K-1`` shapes;
* classification (:class:`SyntheticClassification`): one dominant object per image, labelled with
  its shape class (up to all ten shapes, a superset of the segmentation classes), so pre-training on
  it transfers to segmentation as ImageNet pre-training does.

Every sample is a pure function of ``(seed, task, split, index)``, at any image size, and takes
about a millisecond at 64×64. :func:`write_synthetic` writes both sets to disk in the VOC layout
(plus an ImageNet-style tree) so that the ordinary loaders read them.
"""

from __future__ import annotations

import colorsys
import os
import zlib
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image
from torchvision import tv_tensors

from mtprune.data.base import (
    ClassificationDataset,
    SampleInfo,
    SegmentationDataset,
    Transform,
    identity_label_map,
)
from mtprune.data.voc import save_voc_mask
from mtprune.errors import DataError
from mtprune.io import atomic_path, read_json, write_json, write_text

# name, geometry, texture, hue, texture frequency (cycles across the object radius)
_CLASSES: list[tuple[str, str, str, float, float]] = [
    ("disk", "disk", "dots", 0.00, 3.0),
    ("square", "square", "checker", 0.60, 2.0),
    ("triangle", "triangle", "stripes", 0.15, 3.0),
    ("ring", "ring", "noise", 0.33, 0.0),
    ("stripes", "rect", "stripes", 0.80, 5.0),
    ("cross", "cross", "radial", 0.50, 0.0),
    ("diamond", "diamond", "waves", 0.08, 3.0),
    ("ellipse", "ellipse", "checker", 0.70, 4.0),
    ("star", "star", "dots", 0.25, 4.0),
    ("crescent", "crescent", "waves", 0.92, 2.0),
]
SHAPE_CLASSES = [c[0] for c in _CLASSES]
"""The ten shape classes of the synthetic world, in segmentation-class order."""

META_FILE = "synthetic.json"
_TASK_CODE = {"seg": 1, "cls": 2}


def seg_class_names(num_classes: int) -> list[str]:
    """``["background", <first num_classes-1 shapes>]``."""
    if not 2 <= num_classes <= len(SHAPE_CLASSES) + 1:
        raise DataError(f"synthetic segmentation needs 2..{len(SHAPE_CLASSES) + 1} classes, got {num_classes}")
    return ["background", *SHAPE_CLASSES[: num_classes - 1]]


def cls_class_names(num_classes: int) -> list[str]:
    """The classification classes: the first ``num_classes`` shapes, sorted by name (as ImageFolder
    orders the folders written by :func:`write_synthetic`)."""
    if not 2 <= num_classes <= len(SHAPE_CLASSES):
        raise DataError(f"synthetic classification needs 2..{len(SHAPE_CLASSES)} classes, got {num_classes}")
    return sorted(SHAPE_CLASSES[:num_classes])


def _split_code(split: str) -> int:
    return {"train": 0, "val": 1, "test": 2}.get(split, zlib.crc32(split.encode()) + 3)


def _rng(seed: int, task: str, split: str, index: int) -> np.random.Generator:
    return np.random.default_rng([int(seed), _TASK_CODE[task], _split_code(split), int(index)])


def _hsv(h: float, s: float, v: float) -> np.ndarray:
    return np.array(colorsys.hsv_to_rgb(h % 1.0, min(max(s, 0.0), 1.0), min(max(v, 0.0), 1.0)), np.float32) * 255


def _geometry(kind: str, u: np.ndarray, v: np.ndarray) -> np.ndarray:
    if kind == "disk":
        return u * u + v * v <= 1.0
    if kind == "square":
        return np.maximum(np.abs(u), np.abs(v)) <= 0.8
    if kind == "triangle":
        inside = np.ones(u.shape, bool)
        for k in range(3):
            a = -np.pi / 2 + 2 * np.pi * k / 3
            inside &= u * np.cos(a) + v * np.sin(a) <= 0.5
        return inside
    if kind == "ring":
        r2 = u * u + v * v
        return (r2 <= 1.0) & (r2 >= 0.3)
    if kind == "rect":
        return (np.abs(u) <= 1.0) & (np.abs(v) <= 0.5)
    if kind == "cross":
        au, av = np.abs(u), np.abs(v)
        return ((au <= 0.3) & (av <= 1.0)) | ((av <= 0.3) & (au <= 1.0))
    if kind == "diamond":
        return np.abs(u) + np.abs(v) <= 1.0
    if kind == "ellipse":
        return u * u + (v / 0.55) ** 2 <= 1.0
    if kind == "star":
        return np.hypot(u, v) <= 0.55 + 0.45 * np.cos(5 * np.arctan2(v, u))
    if kind == "crescent":
        return (u * u + v * v <= 1.0) & ((u - 0.45) ** 2 + v * v > 0.75**2)
    if kind == "bar":
        return (np.abs(u) <= 1.0) & (np.abs(v) <= 0.18)
    raise ValueError(kind)


def _texture(kind: str, u: np.ndarray, v: np.ndarray, freq: float, rng: np.random.Generator) -> np.ndarray:
    f = freq * np.pi
    if kind == "dots":
        return (np.sin(f * u) * np.sin(f * v) > 0.35).astype(np.float32)
    if kind == "checker":
        return (np.sin(f * u) * np.sin(f * v) > 0).astype(np.float32)
    if kind == "stripes":
        return 0.5 + 0.5 * np.sin(f * u)
    if kind == "waves":
        return 0.5 + 0.5 * np.sin(f * np.hypot(u, v))
    if kind == "radial":
        return np.clip(np.hypot(u, v), 0, 1)
    if kind == "noise":
        return rng.random(u.shape, dtype=np.float32)
    return np.zeros(u.shape, np.float32)


def _draw(
    img: np.ndarray,
    label: np.ndarray | None,
    value: int,
    rng: np.random.Generator,
    cy: float,
    cx: float,
    radius: float,
    geometry: str,
    texture: str,
    freq: float,
    color_a: np.ndarray,
    color_b: np.ndarray,
) -> None:
    """Paint one rotated, textured shape into ``img`` (and ``value`` into ``label``)."""
    h, w = label.shape if label is not None else img.shape[:2]
    reach = radius * 1.05 + 1
    y0, y1 = max(0, int(cy - reach)), min(h, int(cy + reach) + 1)
    x0, x1 = max(0, int(cx - reach)), min(w, int(cx + reach) + 1)
    if y0 >= y1 or x0 >= x1:
        return
    theta = rng.uniform(0, 2 * np.pi)
    c, s = np.cos(theta), np.sin(theta)
    dy = (np.arange(y0, y1, dtype=np.float32)[:, None] + 0.5 - cy) / radius
    dx = (np.arange(x0, x1, dtype=np.float32)[None, :] + 0.5 - cx) / radius
    u = c * dx + s * dy
    v = -s * dx + c * dy
    inside = _geometry(geometry, u, v)
    if not inside.any():
        return
    t = _texture(texture, u, v, freq, rng)[inside][:, None]
    region = img[y0:y1, x0:x1]
    region[inside] = color_a * (1 - t) + color_b * t
    if label is not None:
        label[y0:y1, x0:x1][inside] = value


def _background(rng: np.random.Generator, h: int, w: int, clutter: int) -> np.ndarray:
    """A smooth random colour field with ``clutter`` small random items on it."""
    yy = np.linspace(-1, 1, h, dtype=np.float32)[:, None, None]
    xx = np.linspace(-1, 1, w, dtype=np.float32)[None, :, None]
    base = _hsv(rng.random(), rng.uniform(0.0, 0.6), rng.uniform(0.25, 0.85))
    img = base + rng.normal(0, 40, 3).astype(np.float32) * yy + rng.normal(0, 40, 3).astype(np.float32) * xx
    for _ in range(2):
        fy, fx, ph = rng.uniform(0.5, 3.0), rng.uniform(0.5, 3.0), rng.uniform(0, 2 * np.pi)
        img = img + rng.normal(0, 25, 3).astype(np.float32) * np.sin(np.pi * (fy * yy + fx * xx) + ph)
    field_ = img
    img = np.empty((h, w, 3), np.float32)
    img[...] = field_
    size = min(h, w)
    for _ in range(clutter):
        geometry = ("disk", "square", "bar", "bar")[rng.integers(4)]
        texture = ("plain", "noise", "stripes")[rng.integers(3)]
        ca = _hsv(rng.random(), rng.uniform(0, 1), rng.uniform(0.1, 1))
        cb = _hsv(rng.random(), rng.uniform(0, 1), rng.uniform(0.1, 1))
        _draw(
            img,
            None,
            0,
            rng,
            rng.uniform(0, h),
            rng.uniform(0, w),
            size * rng.uniform(0.03, 0.09),
            geometry,
            texture,
            rng.uniform(1, 4),
            ca,
            cb,
        )
    return img


def _object_colors(rng: np.random.Generator, cls: int) -> tuple[np.ndarray, np.ndarray]:
    hue = _CLASSES[cls][3] + rng.normal(0, 0.03)
    a = _hsv(hue, rng.uniform(0.55, 1.0), rng.uniform(0.55, 1.0))
    b = _hsv(hue + 0.08, rng.uniform(0.3, 0.9), rng.uniform(0.15, 0.5))
    return a, b


def _finish(img: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    img += rng.normal(0, 6, img.shape).astype(np.float32)
    return np.clip(img, 0, 255).astype(np.uint8)


def _size(image_size: int | tuple[int, int] | list[int]) -> tuple[int, int]:
    if isinstance(image_size, int):
        return image_size, image_size
    h, w = image_size
    return int(h), int(w)


def generate_seg_sample(
    seed: int, split: str, index: int, image_size: int | tuple[int, int] = 64, num_classes: int = 6
) -> tuple[np.ndarray, np.ndarray]:
    """One segmentation sample: an ``H×W×3 uint8`` image and an ``H×W uint8`` mask (0 = background,
    ``k`` = shape ``k-1``), a pure function of the arguments."""
    h, w = _size(image_size)
    seg_class_names(num_classes)
    rng = _rng(seed, "seg", split, index)
    img = _background(rng, h, w, clutter=int(rng.integers(3, 9)))
    label = np.zeros((h, w), np.uint8)
    size = min(h, w)
    for _ in range(int(rng.integers(1, 5))):
        k = int(rng.integers(1, num_classes))
        _, geometry, texture, _, freq = _CLASSES[k - 1]
        ca, cb = _object_colors(rng, k - 1)
        _draw(
            img,
            label,
            k,
            rng,
            rng.uniform(0.1, 0.9) * h,
            rng.uniform(0.1, 0.9) * w,
            size * rng.uniform(0.1, 0.28),
            geometry,
            texture,
            freq,
            ca,
            cb,
        )
    return _finish(img, rng), label


def generate_cls_sample(
    seed: int, split: str, index: int, image_size: int | tuple[int, int] = 64, num_classes: int = 10
) -> tuple[np.ndarray, int]:
    """One classification sample: an image with one dominant object and its class id (the index in
    :func:`cls_class_names`)."""
    h, w = _size(image_size)
    names = cls_class_names(num_classes)
    rng = _rng(seed, "cls", split, index)
    img = _background(rng, h, w, clutter=int(rng.integers(3, 9)))
    label = int(rng.integers(num_classes))
    shape = SHAPE_CLASSES.index(names[label])
    _, geometry, texture, _, freq = _CLASSES[shape]
    ca, cb = _object_colors(rng, shape)
    _draw(
        img,
        None,
        0,
        rng,
        rng.uniform(0.35, 0.65) * h,
        rng.uniform(0.35, 0.65) * w,
        min(h, w) * rng.uniform(0.25, 0.42),
        geometry,
        texture,
        freq,
        ca,
        cb,
    )
    return _finish(img, rng), label


class SyntheticSegmentation(SegmentationDataset):
    """The synthetic segmentation set generated in memory (cached after the first access)."""

    def __init__(
        self,
        split: str = "train",
        num_samples: int = 512,
        image_size: int | tuple[int, int] = 64,
        num_classes: int = 6,
        seed: int = 0,
        transforms: Transform | None = None,
        cache: bool = True,
    ) -> None:
        names = seg_class_names(num_classes)
        k = len(names)
        super().__init__(
            [],
            names,
            identity_label_map(k),
            f"outside 0..{k - 1} and not the ignore value 255",
            transforms=transforms,
            name="synthetic",
            split=split,
        )
        self.num_samples = int(num_samples)
        self.image_size = _size(image_size)
        self.seed = int(seed)
        self._cache: dict[int, tuple[np.ndarray, np.ndarray]] | None = {} if cache else None

    def __len__(self) -> int:
        return self.num_samples

    def arrays(self, index: int) -> tuple[np.ndarray, np.ndarray]:
        if not 0 <= index < self.num_samples:
            raise IndexError(index)
        if self._cache is not None and index in self._cache:
            return self._cache[index]
        pair = generate_seg_sample(self.seed, self.split, index, self.image_size, self.num_classes)
        if self._cache is not None:
            self._cache[index] = pair
        return pair

    def inspect(self, index: int) -> SampleInfo:
        img, mask = self.arrays(index)
        counts = np.bincount(mask.ravel(), minlength=self.num_classes)[: self.num_classes].astype(np.int64)
        return SampleInfo(index, image_size=(img.shape[0], img.shape[1]), class_counts=counts)

    def load(self, index: int) -> tuple[tv_tensors.Image, tv_tensors.Mask]:
        img, mask = self.arrays(index)
        return (
            tv_tensors.Image(torch.from_numpy(img).permute(2, 0, 1).contiguous()),
            tv_tensors.Mask(torch.from_numpy(mask.copy())),
        )


class SyntheticClassification(ClassificationDataset):
    """The synthetic classification set generated in memory (cached after the first access)."""

    def __init__(
        self,
        split: str = "train",
        num_samples: int = 2000,
        image_size: int | tuple[int, int] = 64,
        num_classes: int = 10,
        seed: int = 0,
        transforms: Transform | None = None,
        cache: bool = True,
    ) -> None:
        super().__init__([], cls_class_names(num_classes), transforms=transforms, name="synthetic", split=split)
        self.num_samples = int(num_samples)
        self.image_size = _size(image_size)
        self.seed = int(seed)
        self._cache: dict[int, tuple[np.ndarray, int]] | None = {} if cache else None

    def __len__(self) -> int:
        return self.num_samples

    def arrays(self, index: int) -> tuple[np.ndarray, int]:
        if not 0 <= index < self.num_samples:
            raise IndexError(index)
        if self._cache is not None and index in self._cache:
            return self._cache[index]
        pair = generate_cls_sample(self.seed, self.split, index, self.image_size, self.num_classes)
        if self._cache is not None:
            self._cache[index] = pair
        return pair

    def inspect(self, index: int) -> SampleInfo:
        img, label = self.arrays(index)
        return SampleInfo(index, image_size=(img.shape[0], img.shape[1]), label=label)

    def load(self, index: int) -> tuple[tv_tensors.Image, int]:
        img, label = self.arrays(index)
        return tv_tensors.Image(torch.from_numpy(img).permute(2, 0, 1).contiguous()), label


def read_meta(root: str | os.PathLike) -> dict[str, Any]:
    """The ``synthetic.json`` that :func:`write_synthetic` leaves in ``root``."""
    path = Path(root) / META_FILE
    if not path.is_file():
        raise DataError(f"expected file {path} (written by 'mtprune make-data synthetic') not found")
    meta = read_json(path)
    if not isinstance(meta, dict) or meta.get("format") != "mtprune-synthetic":
        raise DataError(f"{path}: not a synthetic dataset description")
    return meta


def _save_image(arr: np.ndarray, path: Path, fmt: str) -> None:
    with atomic_path(path) as tmp:
        if fmt == "JPEG":
            Image.fromarray(arr).save(tmp, format="JPEG", quality=95, subsampling=0)
        else:
            Image.fromarray(arr).save(tmp, format="PNG")


def write_synthetic(
    out: str | os.PathLike,
    num_train: int = 500,
    num_val: int = 100,
    image_size: int | tuple[int, int] = 64,
    num_classes: int = 6,
    seed: int = 0,
    cls_classes: int = 10,
    num_cls_train: int = 2000,
    num_cls_val: int = 500,
    progress: Callable[[Iterable[Any], int, str], Iterable[Any]] | None = None,
) -> dict[str, Any]:
    """Write the synthetic world to ``out``: the segmentation set in the VOC 2012 layout
    (``VOCdevkit/VOC2012/{JPEGImages/*.jpg, SegmentationClass/*.png, ImageSets/Segmentation/*.txt}``),
    the classification set as ``cls/{train,val}/<class>/*.png`` and ``synthetic.json`` (written last).
    Every file is written atomically. Returns the description stored in ``synthetic.json``."""
    out = Path(out)
    h, w = _size(image_size)
    seg_names = seg_class_names(num_classes)
    cls_names = cls_class_names(cls_classes)
    voc = out / "VOCdevkit" / "VOC2012"
    jpeg_dir, mask_dir, sets_dir = voc / "JPEGImages", voc / "SegmentationClass", voc / "ImageSets" / "Segmentation"
    for d in (jpeg_dir, mask_dir, sets_dir):
        d.mkdir(parents=True, exist_ok=True)
    wrap = progress or (lambda it, total, desc: it)
    ids_per_split: dict[str, list[str]] = {}
    for split, n in (("train", num_train), ("val", num_val)):
        ids = []
        for i in wrap(range(n), n, f"seg {split}"):
            img, mask = generate_seg_sample(seed, split, i, (h, w), num_classes)
            sid = f"{split}_{i:06d}"
            _save_image(img, jpeg_dir / f"{sid}.jpg", "JPEG")
            with atomic_path(mask_dir / f"{sid}.png") as tmp:
                save_voc_mask(mask, tmp)
            ids.append(sid)
        ids_per_split[split] = ids
        write_text(sets_dir / f"{split}.txt", "".join(f"{s}\n" for s in ids))
    write_text(sets_dir / "trainval.txt", "".join(f"{s}\n" for s in ids_per_split["train"] + ids_per_split["val"]))
    for split, n in (("train", num_cls_train), ("val", num_cls_val)):
        for name in cls_names:
            (out / "cls" / split / name).mkdir(parents=True, exist_ok=True)
        for i in wrap(range(n), n, f"cls {split}"):
            img, label = generate_cls_sample(seed, split, i, (h, w), cls_classes)
            _save_image(img, out / "cls" / split / cls_names[label] / f"{i:06d}.png", "PNG")
    meta = {
        "format": "mtprune-synthetic",
        "version": 1,
        "seed": seed,
        "image_size": [h, w],
        "num_classes": num_classes,
        "class_names": seg_names,
        "splits": {"train": num_train, "val": num_val},
        "cls_num_classes": cls_classes,
        "cls_class_names": cls_names,
        "cls_splits": {"train": num_cls_train, "val": num_cls_val},
    }
    write_json(out / META_FILE, meta)
    return meta
