"""Inference and evaluation loops: multi-scale + flip segmentation, top-k classification.

:func:`predict_logits` runs a segmentation model on an image batch at several scales (and mirrored),
and averages the softmax probabilities at the input's size, as the MTP paper's multi-scale testing
does. :func:`evaluate_segmentation` / :func:`evaluate_classification` run a model over a loader and
return plain dicts of fractions in ``[0, 1]`` (mIoU, per-class IoU, pixel accuracy; top-1, top-5).

Loaders: any loader of ``(images N×3×H×W, targets)`` batches works. :func:`build_eval_loader` builds
the recommended one: batches are lists of samples, so images of different sizes (VOC, ADE20K) share a
batch and each size group runs as its own forward (no padding, so results do not depend on the batch
size); a bad sample becomes a :class:`BadSample` marker that the loop either skips and counts
(``skip_bad=True``) or raises as the data package's one-line :class:`~mtprune.errors.DataError`,
also from worker processes.

Distributed runs: give each rank a loader with a :class:`~torch.utils.data.DistributedSampler` (as
``build_eval_loader(..., distributed=True)`` does); each rank evaluates its shard and the confusion
matrix, top-k and image counts are all-reduced, so every rank returns the figures of the whole set.
The padding that ``DistributedSampler`` adds (repeated samples, when the set does not divide by the
world size) is recognised and not counted, so the figures are exactly those of a single-process
run. A ``DistributedDataParallel`` model is unwrapped (``.module``) for evaluation: its forward would
otherwise synchronise buffers, a collective that ranks with shards of unequal length would not match.
"""

from __future__ import annotations

import math
import sys
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, Dataset, DistributedSampler
from tqdm import tqdm

from mtprune.data.base import BadSampleError, DatasetView
from mtprune.data.loader import build_loader
from mtprune.errors import DataError, MtpruneError
from mtprune.evaluate.metrics import ConfusionMatrix, TopKAccuracy, _all_reduce_sum
from mtprune.models.base import eval_mode
from mtprune.train.distributed import autocast

# --- models -------------------------------------------------------------------------------------


def unwrap_model(model: nn.Module) -> nn.Module:
    """The module inside a ``DistributedDataParallel`` / ``DataParallel`` wrapper (else ``model``)."""
    while isinstance(model, nn.parallel.DistributedDataParallel | nn.DataParallel):
        model = model.module
    return model


def _seg_logits(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    out = model(x)
    if isinstance(out, dict):  # torchvision-style {"out": logits, "aux": ...}
        out = out["out"]
    return out


def _check_scales(scales: Sequence[float]) -> tuple[float, ...]:
    scales = tuple(float(s) for s in scales)
    if not scales or any(not (s > 0 and math.isfinite(s)) for s in scales):
        raise ValueError(f"scales must be positive numbers, got {scales}")
    return scales


def predict_logits(
    model: nn.Module, image: torch.Tensor, scales: Sequence[float] = (1.0,), flip: bool = False
) -> torch.Tensor:
    """Class probabilities ``N×K×H×W`` of a segmentation model on ``image`` (``N×3×H×W``), test-time augmented.

    For every scale ``s`` the image is resized (bilinear, ``align_corners=False``) to
    ``round(H·s)×round(W·s)`` and run; with ``flip`` its horizontal mirror is run too and the output
    mirrored back. Each output's logits are resized back to ``H×W`` (bilinear), turned into softmax
    probabilities, and the probabilities are averaged over the ``len(scales)·(1 + flip)`` runs (the
    paper's multi-scale testing sums them; the mean has the same argmax and stays a distribution).
    With ``scales=(1.0,)`` and no flip this is ``softmax(model(image))``. The result is float32.

    Call it under ``torch.no_grad()``/``inference_mode`` (the evaluation loops do).
    """
    scales = _check_scales(scales)
    if image.ndim != 4:
        raise ValueError(f"image must be N×3×H×W, got shape {tuple(image.shape)}")
    h, w = image.shape[-2:]
    total: torch.Tensor | None = None
    runs = 0
    for s in scales:
        size = (max(1, round(h * s)), max(1, round(w * s)))
        x = image if size == (h, w) else F.interpolate(image, size=size, mode="bilinear", align_corners=False)
        for mirrored in (False, True) if flip else (False,):
            out = _seg_logits(model, x.flip(-1) if mirrored else x).float()
            if mirrored:
                out = out.flip(-1)
            if out.shape[-2:] != (h, w):
                out = F.interpolate(out, size=(h, w), mode="bilinear", align_corners=False)
            prob = out.softmax(1)
            total = prob if total is None else total.add_(prob)
            runs += 1
    assert total is not None
    return total.div_(runs) if runs > 1 else total


# --- loaders ------------------------------------------------------------------------------------


@dataclass(frozen=True)
class BadSample:
    """What :class:`EvalDataset` yields in place of a sample that cannot be read."""

    index: int
    message: str
    skip: bool


class EvalDataset(DatasetView):
    """A dataset view that turns a bad sample (:class:`BadSampleError`) into a :class:`BadSample` marker.

    The evaluation loops skip and count markers with ``skip=True`` and raise the one-line
    :class:`DataError` of the others. Unlike :class:`~mtprune.data.SkipBadSamples` (for training,
    which substitutes the next good sample to keep batch sizes) no sample is evaluated twice.
    Attributes of the wrapped dataset (``num_classes``, ``class_names``, ``task``...) are forwarded.
    """

    def __init__(self, dataset: Dataset, skip_bad: bool = False) -> None:
        super().__init__(dataset)
        self.skip_bad = bool(skip_bad)

    def __getitem__(self, index: int) -> Any:
        try:
            return self.dataset[index]
        except BadSampleError as e:
            return BadSample(int(index), str(e), self.skip_bad)


def collate_samples(batch: list[Any]) -> list[Any]:
    """The evaluation collate: the list of samples itself (images of any size; grouped later)."""
    return list(batch)


def build_eval_loader(
    dataset: Dataset,
    batch_size: int = 1,
    num_workers: int = 0,
    skip_bad: bool = False,
    distributed: bool = False,
    pin_memory: bool | None = None,
) -> DataLoader:
    """An evaluation loader over ``dataset``: fixed order, :class:`EvalDataset` wrapping,
    :func:`collate_samples`; with ``distributed`` a non-shuffling :class:`DistributedSampler`."""
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    return build_loader(
        EvalDataset(dataset, skip_bad),
        batch_size,
        shuffle=False,
        num_workers=num_workers,
        distributed=distributed,
        drop_last=False,
        pin_memory=pin_memory,
        collate_fn=collate_samples,
    )


def _local_limit(loader: Any) -> int | None:
    """How many leading samples of this rank's iteration are real (not DistributedSampler padding)."""
    sampler = getattr(loader, "sampler", None)
    if isinstance(sampler, DistributedSampler) and not sampler.drop_last:
        n = len(sampler.dataset)  # type: ignore[arg-type]
        return len(range(sampler.rank, n, sampler.num_replicas))
    return None


def _is_main_process() -> bool:
    return not (dist.is_available() and dist.is_initialized()) or dist.get_rank() == 0


class _Batches:
    """Iterates a loader as ``(images, targets)`` groups of equal image size, dropping padding and
    bad samples and counting them."""

    def __init__(self, loader: Any, progress: bool, desc: str) -> None:
        self.loader = loader
        self.progress = progress
        self.desc = desc
        self.limit = _local_limit(loader)
        self.seen = 0  # sample positions consumed, padding excluded
        self.num_images = 0
        self.skipped: list[str] = []

    def _take(self, n: int) -> int:
        keep = n if self.limit is None else max(0, min(n, self.limit - self.seen))
        self.seen += keep
        return keep

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        try:
            total: int | None = len(self.loader)
        except TypeError:
            total = None
        bar = tqdm(
            self.loader,
            total=total,
            desc=self.desc,
            unit="batch",
            file=sys.stderr,
            leave=False,
            disable=True if not (self.progress and _is_main_process()) else None,
        )
        for batch in bar:
            if (
                isinstance(batch, tuple | list)
                and len(batch) == 2
                and isinstance(batch[0], torch.Tensor)
                and batch[0].ndim == 4
            ):  # a default-collated (images, targets) batch
                images, targets = batch[0], torch.as_tensor(batch[1])
                keep = self._take(images.shape[0])
                if keep:
                    self.num_images += keep
                    yield images[:keep], targets[:keep]
                continue
            items = list(batch)[: self._take(len(batch))]
            groups: dict[tuple[int, ...], tuple[list[torch.Tensor], list[Any]]] = {}
            for item in items:
                if isinstance(item, BadSample):
                    if not item.skip:
                        raise DataError(item.message)
                    self.skipped.append(item.message)
                    continue
                image, target = item
                imgs, tgts = groups.setdefault(tuple(image.shape), ([], []))
                imgs.append(image)
                tgts.append(target)
            for imgs, tgts in groups.values():
                self.num_images += len(imgs)
                if isinstance(tgts[0], torch.Tensor):
                    target_t = torch.stack([torch.as_tensor(t) for t in tgts])
                else:
                    target_t = torch.as_tensor(tgts, dtype=torch.int64)
                yield torch.stack(imgs), target_t

    def reduced_counts(self, device: torch.device) -> tuple[int, int]:
        """``(num_images, num_skipped)`` summed over every process."""
        t = torch.tensor([self.num_images, len(self.skipped)], dtype=torch.int64, device=device)
        _all_reduce_sum(t)
        return int(t[0]), int(t[1])


# --- evaluation loops ---------------------------------------------------------------------------


def _model_device(model: nn.Module) -> torch.device:
    p = next(model.parameters(), None)
    return p.device if p is not None else torch.device("cpu")


def _none_if_nan(x: float) -> float | None:
    return None if isinstance(x, float) and math.isnan(x) else x


def evaluate_segmentation(
    model: nn.Module,
    loader: Any,
    num_classes: int,
    ignore_index: int = 255,
    scales: Sequence[float] = (1.0,),
    flip: bool = False,
    device: str | torch.device | None = None,
    class_names: Sequence[str] | None = None,
    progress: bool = True,
    amp: bool = False,
) -> dict[str, Any]:
    """Evaluate a segmentation model (plain or DDP-wrapped) on ``loader``; every figure a fraction in ``[0, 1]``.

    Predictions come from :func:`predict_logits` (``scales``, ``flip``). ``device`` is where batches
    go (default: the device of the model's parameters; the model is not moved); ``amp`` runs the
    forwards under bfloat16 autocast on CUDA (ignored on CPU). The model is put in eval mode and its
    mode restored afterwards. ``class_names`` default to the loader dataset's.

    Returns ``miou``, ``per_class`` (class name → IoU, ``None`` for a class neither in the targets
    nor predicted; mIoU is the mean over the other classes, see :class:`ConfusionMatrix`),
    ``pixel_acc``, ``mean_acc``, ``num_images`` (evaluated, over all processes), ``num_skipped`` (bad
    samples skipped, over all processes), ``skipped`` (this process's first messages), ``scales``,
    ``flip``.
    """
    scales = _check_scales(scales)
    net = unwrap_model(model)
    model_classes = getattr(net, "num_classes", None)
    if model_classes is not None and int(model_classes) != int(num_classes):
        raise MtpruneError(f"the model predicts {model_classes} classes, the evaluation expects {num_classes}")
    dev = torch.device(device) if device is not None else _model_device(net)
    if class_names is None:
        class_names = getattr(getattr(loader, "dataset", None), "class_names", None)
    names = list(class_names) if class_names is not None else [str(i) for i in range(num_classes)]
    if len(names) != num_classes:
        raise MtpruneError(f"{len(names)} class names for {num_classes} classes")
    cm = ConfusionMatrix(num_classes, ignore_index, device=dev)
    batches = _Batches(loader, progress, "eval seg")
    with eval_mode(net), torch.inference_mode():
        for images, targets in batches:
            images = images.to(dev, non_blocking=True)
            targets = targets.to(dev, non_blocking=True)
            with autocast(dev, amp):
                prob = predict_logits(net, images, scales, flip)
            try:
                cm.update(prob.argmax(1), targets)
            except ValueError as e:
                raise DataError(f"{e} (does the dataset have {num_classes} classes?)") from None
    cm.reduce_from_all_processes()
    num_images, num_skipped = batches.reduced_counts(cm.mat.device)
    res = cm.compute()
    return {
        "miou": _none_if_nan(res["miou"]),
        "per_class": {name: _none_if_nan(v) for name, v in zip(names, res["per_class"], strict=True)},
        "pixel_acc": _none_if_nan(res["pixel_acc"]),
        "mean_acc": _none_if_nan(res["mean_acc"]),
        "num_images": num_images,
        "num_skipped": num_skipped,
        "skipped": batches.skipped[:10],
        "scales": list(scales),
        "flip": bool(flip),
    }


def evaluate_classification(
    model: nn.Module,
    loader: Any,
    device: str | torch.device | None = None,
    progress: bool = True,
    amp: bool = False,
    ks: Sequence[int] = (1, 5),
    teacher: nn.Module | None = None,
) -> dict[str, Any]:
    """Top-k accuracy of ``model.forward_cls`` (backbone + classification head) on ``loader``; with a
    ``teacher`` (a module giving logits), against the teacher's top-1 instead of the labels: ``top1`` is the
    agreement of the two top-1s, ``top5`` how often the teacher's top-1 is in the net's top 5.

    Works with a plain or DDP-wrapped :class:`~mtprune.models.base.SegmentationModel` (or any module
    whose ``forward_cls``, else ``forward``, gives ``N×M`` logits). Returns ``top1``, ``top5`` (one
    ``top{k}`` per ``ks``) as fractions in ``[0, 1]`` (``k > M`` counts every sample as a hit),
    ``num_images``, ``num_skipped``, ``skipped``; ``device``/``amp`` as in :func:`evaluate_segmentation`.
    """
    net = unwrap_model(model)
    forward = getattr(net, "forward_cls", net)
    dev = torch.device(device) if device is not None else _model_device(net)
    acc = TopKAccuracy(ks, device=dev)
    batches = _Batches(loader, progress, "eval cls")
    with eval_mode(net), torch.inference_mode():
        for images, targets in batches:
            images = images.to(dev, non_blocking=True)
            targets = targets.to(dev, non_blocking=True)
            with autocast(dev, amp):
                logits = forward(images).float()
                if teacher is not None:
                    targets = teacher(images).argmax(1)
            m = logits.shape[1]
            if targets.numel():
                lo, hi = int(targets.min()), int(targets.max())
                if lo < 0 or hi >= m:
                    bad = lo if lo < 0 else hi
                    raise DataError(f"class label {bad} outside the model's {m} classification classes")
            acc.update(logits, targets)
    acc.reduce_from_all_processes()
    num_images, num_skipped = batches.reduced_counts(acc.counts.device)
    res = acc.compute()
    out: dict[str, Any] = {f"top{k}": _none_if_nan(res[f"top{k}"]) for k in acc.ks}
    out.update(num_images=num_images, num_skipped=num_skipped, skipped=batches.skipped[:10])
    return out


__all__ = [
    "BadSample",
    "EvalDataset",
    "build_eval_loader",
    "collate_samples",
    "evaluate_classification",
    "evaluate_segmentation",
    "predict_logits",
    "unwrap_model",
]
