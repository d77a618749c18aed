"""Walk a dataset, decode every sample, and report sizes, class statistics and every problem."""

from __future__ import annotations

import sys
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from torch.utils.data import DataLoader, Dataset
from tqdm import tqdm

from mtprune.data.base import SampleInfo, SampleProblem


@dataclass
class CheckReport:
    """What :func:`check_dataset` found."""

    name: str
    split: str
    root: str
    task: str
    class_names: list[str]
    ignore_index: int | None
    num_samples: int = 0
    sizes: Counter = field(default_factory=Counter)  # (height, width) -> samples
    class_pixels: np.ndarray | None = None  # seg: pixels per class
    ignore_pixels: int = 0
    class_samples: np.ndarray | None = None  # cls: samples per class
    problems: list[SampleProblem] = field(default_factory=list)
    unlabelled: list[int] = field(default_factory=list)  # seg: samples whose mask is entirely ignore

    @property
    def ok(self) -> bool:
        return not self.problems

    def to_json(self) -> dict[str, Any]:
        out: dict[str, Any] = {
            "dataset": self.name,
            "split": self.split,
            "root": self.root,
            "task": self.task,
            "num_samples": self.num_samples,
            "num_classes": len(self.class_names),
            "image_sizes": [{"height": h, "width": w, "samples": n} for (h, w), n in sorted(self.sizes.items())],
        }
        if self.class_pixels is not None:
            out["pixels_per_class"] = {n: int(c) for n, c in zip(self.class_names, self.class_pixels, strict=True)}
            out["ignore_pixels"] = int(self.ignore_pixels)
            out["ignore_index"] = self.ignore_index
            out["masks_all_ignore"] = len(self.unlabelled)
        if self.class_samples is not None:
            out["samples_per_class"] = {n: int(c) for n, c in zip(self.class_names, self.class_samples, strict=True)}
        out["problems"] = [{"file": p.file, "problem": p.what, "value": p.value} for p in self.problems]
        out["ok"] = self.ok
        return out


class _Inspect(Dataset):
    def __init__(self, dataset: Any) -> None:
        self.dataset = dataset

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, index: int) -> SampleInfo:
        return self.dataset.inspect(index)


def _first(batch: list[SampleInfo]) -> SampleInfo:
    return batch[0]


def check_dataset(dataset: Any, num_workers: int = 0, progress: bool = True) -> CheckReport:
    """Decode every sample of ``dataset`` (anything with ``inspect(i)``, such as the datasets of
    :mod:`mtprune.data`) and gather a :class:`CheckReport`; a tqdm bar goes to stderr when it is a
    terminal and ``progress`` is true."""
    k = int(dataset.num_classes or 0)  # None: a label-free set (a teacher's)
    report = CheckReport(
        name=str(getattr(dataset, "name", "")),
        split=str(getattr(dataset, "split", "")),
        root=str(getattr(dataset, "root", "") or ""),
        task=str(dataset.task),
        class_names=list(dataset.class_names),
        ignore_index=getattr(dataset, "ignore_index", None) if dataset.task == "seg" else None,
        num_samples=len(dataset),
    )
    if dataset.task == "seg":
        report.class_pixels = np.zeros(k, dtype=np.int64)
    else:
        report.class_samples = np.zeros(k, dtype=np.int64)
    infos: Any = _Inspect(dataset)
    if num_workers > 0:
        infos = DataLoader(infos, batch_size=1, num_workers=num_workers, collate_fn=_first)
    bar = tqdm(
        infos,
        total=len(dataset),
        desc=f"check {report.name} {report.split}".strip(),
        unit="img",
        file=sys.stderr,
        disable=None if progress else True,
        leave=False,
    )
    for info in bar:
        if info.image_size is not None:
            report.sizes[info.image_size] += 1
        if info.class_counts is not None and report.class_pixels is not None:
            report.class_pixels += info.class_counts
            report.ignore_pixels += info.ignore_count
            if not info.class_counts.any():
                report.unlabelled.append(info.index)
        if info.label is not None and report.class_samples is not None and 0 <= info.label < k:
            report.class_samples[info.label] += 1
        report.problems.extend(info.problems)
    return report


def _human(n: float) -> str:
    for unit in ("", "K", "M", "G"):
        if abs(n) < 1000:
            return f"{n:.0f}{unit}" if unit == "" else f"{n:.1f}{unit}"
        n /= 1000
    return f"{n:.1f}T"


def format_report(report: CheckReport, max_sizes: int = 5) -> str:
    """The human-readable summary, then one ``PROBLEM: <file>: <what> (<value>)`` line per problem."""
    lines = [
        f"dataset {report.name}, split {report.split}, root {report.root or '(in memory)'}",
        f"samples: {report.num_samples}",
    ]
    if report.sizes:
        hs = [h for h, _ in report.sizes]
        ws = [w for _, w in report.sizes]
        common = ", ".join(f"{w}x{h} ({n})" for (h, w), n in report.sizes.most_common(max_sizes))
        more = f", +{len(report.sizes) - max_sizes} more" if len(report.sizes) > max_sizes else ""
        lines.append(
            f"image sizes (WxH): {len(report.sizes)} distinct, min {min(ws)}x{min(hs)}, "
            f"max {max(ws)}x{max(hs)}; most common: {common}{more}"
        )
    width = max((len(n) for n in report.class_names), default=5)
    if report.class_pixels is not None:
        total = int(report.class_pixels.sum()) + report.ignore_pixels
        lines.append(f"pixels per class ({len(report.class_names)} classes, ignore value {report.ignore_index}):")
        for i, (name, c) in enumerate(zip(report.class_names, report.class_pixels, strict=True)):
            share = 100.0 * c / total if total else 0.0
            lines.append(f"  {i:>3} {name:<{width}} {_human(int(c)):>8} {share:6.2f}%")
        share = 100.0 * report.ignore_pixels / total if total else 0.0
        lines.append(f"  {'':>3} {'(ignore)':<{width}} {_human(report.ignore_pixels):>8} {share:6.2f}%")
    if report.class_samples is not None:
        lines.append(f"samples per class ({len(report.class_names)} classes):")
        for i, (name, c) in enumerate(zip(report.class_names, report.class_samples, strict=True)):
            lines.append(f"  {i:>3} {name:<{width}} {int(c):>8}")
    if report.unlabelled:
        first = ", ".join(f"#{i}" for i in report.unlabelled[:5]) + (" …" if len(report.unlabelled) > 5 else "")
        lines.append(
            f"warning: {len(report.unlabelled)} mask(s) entirely ignore (no labelled pixel: samples {first}); "
            "training counts a batch of them as contributing 0"
        )
    if report.problems:
        lines.append(f"{len(report.problems)} problem{'s' if len(report.problems) != 1 else ''}:")
        lines.extend(f"PROBLEM: {p}" for p in report.problems)
    else:
        lines.append("no problems")
    return "\n".join(lines)


def crop_warning(dataset: Any, crop: Sequence[int], largest_scale: float) -> str | None:
    """A ``warning:`` line when a training crop is larger than every image of a file-backed segmentation set
    even at the largest scale (the batches would be mostly padding, ignored pixels); None otherwise. Reads
    the images' headers only."""
    samples = getattr(dataset, "samples", None)
    if not samples or getattr(dataset, "task", "") != "seg":
        return None
    from PIL import Image

    sizes = []
    for image, _ in samples:
        try:
            with Image.open(image) as im:
                sizes.append(im.size)  # (width, height)
        except OSError:
            return None  # a bad file is the data check's to report
    h, w = max(s[1] for s in sizes), max(s[0] for s in sizes)
    if crop[0] > h * largest_scale and crop[1] > w * largest_scale:
        return (
            f"warning: data.seg.crop_size {list(crop)} is larger than every training image at the largest scale "
            f"(at most {h}×{w} × {largest_scale:g}): the batches are mostly padding (ignored pixels)"
        )
    return None
