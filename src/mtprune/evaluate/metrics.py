"""Segmentation and classification metrics that accumulate over batches and reduce over processes.

:class:`ConfusionMatrix` counts ``(target, prediction)`` pixel pairs, ignoring pixels whose target
is ``ignore_index``; :class:`TopKAccuracy` counts top-k hits of class logits. Both keep their counts
as ``int64`` tensors on the device of the first update, and ``reduce_from_all_processes()`` sums
them over the default process group (a no-op when ``torch.distributed`` is not initialised), so a
distributed evaluation that lets each rank see its shard reports the figures of the whole set.

Every figure is a fraction in ``[0, 1]`` (the command line prints percentages).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
import torch.distributed as dist


def _all_reduce_sum(t: torch.Tensor) -> torch.Tensor:
    """Sum ``t`` over the default process group (in place when possible); a no-op when not distributed.

    NCCL only reduces CUDA tensors: a CPU tensor is moved to the current CUDA device and back.
    """
    if not (dist.is_available() and dist.is_initialized()):
        return t
    if dist.get_backend() == "nccl" and t.device.type != "cuda":
        buf = t.to(torch.device("cuda", torch.cuda.current_device()))
        dist.all_reduce(buf, op=dist.ReduceOp.SUM)
        t.copy_(buf.to(t.device))
        return t
    dist.all_reduce(t, op=dist.ReduceOp.SUM)
    return t


class ConfusionMatrix:
    """A ``K×K`` confusion matrix of pixel counts: ``mat[t, p]`` pixels of target class ``t`` predicted ``p``.

    ``update(pred, target)`` takes predicted class ids (any shape, or logits/scores ``N×K×…`` whose
    argmax over dim 1 is taken) and targets of the prediction's shape; pixels with
    ``target == ignore_index`` are not counted. A target value outside ``0..K-1`` that is not the
    ignore value raises :class:`ValueError` (a dataset/model class mismatch).

    :meth:`compute` returns

    - ``per_class``: IoU of every class, ``TP / (TP + FP + FN)``; ``NaN`` for a class that occurs
      neither in the targets nor in the predictions (union 0);
    - ``miou``: the mean of ``per_class`` over the classes present in target **or** prediction (the
      NaN-mean, as torchvision's references and mmsegmentation compute it): a class that is
      predicted but never in the targets counts with IoU 0; one absent from both does not count;
    - ``pixel_acc``: correctly labelled / all counted pixels;
    - ``mean_acc``: the mean per-class recall over the classes present in the targets;
    - ``num_pixels``: the number of counted (non-ignored) pixels.

    Figures are fractions in ``[0, 1]``; with no counted pixel they are ``NaN``.
    """

    def __init__(self, num_classes: int, ignore_index: int = 255, device: str | torch.device | None = None) -> None:
        if num_classes < 1:
            raise ValueError(f"num_classes must be >= 1, got {num_classes}")
        self.num_classes = int(num_classes)
        self.ignore_index = int(ignore_index)
        self.mat = torch.zeros(self.num_classes, self.num_classes, dtype=torch.int64, device=device)

    def reset(self) -> None:
        """Zero the counts."""
        self.mat.zero_()

    @torch.no_grad()
    def update(self, pred: torch.Tensor, target: torch.Tensor) -> None:
        """Count the pixels of one batch (``pred`` ids or ``N×K×…`` scores, ``target`` ids)."""
        if pred.is_floating_point():
            pred = pred.argmax(1)
        if pred.shape != target.shape:
            raise ValueError(f"prediction shape {tuple(pred.shape)} differs from target shape {tuple(target.shape)}")
        if self.mat.device != pred.device:
            self.mat = self.mat.to(pred.device)
        k = self.num_classes
        target = target.to(device=pred.device, dtype=torch.int64).flatten()
        pred = pred.to(torch.int64).flatten()
        keep = target != self.ignore_index
        target, pred = target[keep], pred[keep]
        if target.numel() == 0:
            return
        lo, hi = int(target.min()), int(target.max())
        if lo < 0 or hi >= k:
            bad = lo if lo < 0 else hi
            raise ValueError(
                f"target value {bad} is neither a class id 0..{k - 1} nor the ignore value {self.ignore_index}"
            )
        plo, phi = int(pred.min()), int(pred.max())
        if plo < 0 or phi >= k:
            raise ValueError(f"predicted class {plo if plo < 0 else phi} outside 0..{k - 1}")
        self.mat += torch.bincount(target * k + pred, minlength=k * k).reshape(k, k)

    def reduce_from_all_processes(self) -> None:
        """Sum the counts over every process of the default group (call once, after the last update)."""
        _all_reduce_sum(self.mat)

    def compute(self) -> dict[str, Any]:
        """``miou``, ``per_class`` (list, NaN for absent classes), ``pixel_acc``, ``mean_acc``, ``num_pixels``."""
        m = self.mat.double().cpu()
        tp = m.diag()
        gt = m.sum(1)  # pixels per target class
        pr = m.sum(0)  # pixels per predicted class
        union = gt + pr - tp
        iou = torch.where(union > 0, tp / union.clamp(min=1), torch.full_like(tp, float("nan")))
        total = float(m.sum())
        present = union > 0
        miou = float(iou[present].mean()) if bool(present.any()) else float("nan")
        has_gt = gt > 0
        mean_acc = float((tp[has_gt] / gt[has_gt]).mean()) if bool(has_gt.any()) else float("nan")
        return {
            "miou": miou,
            "per_class": [float(v) for v in iou],
            "pixel_acc": float(tp.sum()) / total if total > 0 else float("nan"),
            "mean_acc": mean_acc,
            "num_pixels": int(total),
        }


def topk_correct(logits: torch.Tensor, target: torch.Tensor, ks: Sequence[int] = (1, 5)) -> list[int]:
    """How many rows of ``logits`` (``N×M``) have ``target`` among their ``k`` highest scores, per ``k``.

    ``k`` larger than ``M`` is clipped to ``M`` (every row counts as a hit).
    """
    if logits.ndim != 2:
        raise ValueError(f"logits must be N×M, got shape {tuple(logits.shape)}")
    n, m = logits.shape
    target = target.to(logits.device).long().reshape(-1)
    if target.numel() != n:
        raise ValueError(f"{target.numel()} targets for {n} rows of logits")
    if n == 0:
        return [0 for _ in ks]
    maxk = min(max(ks), m)
    top = logits.topk(maxk, dim=1).indices  # N×maxk, best first
    hits = top == target[:, None]
    return [int(hits[:, : min(k, m)].any(1).sum()) for k in ks]


class TopKAccuracy:
    """Top-k accuracy accumulator (default top-1 and top-5) for ``N×M`` class logits.

    ``compute()`` gives ``{"top1": …, "top5": …, "num_samples": n}`` with fractions in ``[0, 1]``
    (``NaN`` before any sample); ``k > M`` counts every sample as a hit.
    """

    def __init__(self, ks: Sequence[int] = (1, 5), device: str | torch.device | None = None) -> None:
        if not ks or min(ks) < 1:
            raise ValueError(f"ks must be positive, got {tuple(ks)}")
        self.ks = tuple(int(k) for k in ks)
        # counts[0] = samples, counts[1 + i] = hits at ks[i]
        self.counts = torch.zeros(1 + len(self.ks), dtype=torch.int64, device=device)

    def reset(self) -> None:
        self.counts.zero_()

    @torch.no_grad()
    def update(self, logits: torch.Tensor, target: torch.Tensor) -> None:
        hits = topk_correct(logits, target, self.ks)
        self.counts += torch.tensor([logits.shape[0], *hits], dtype=torch.int64, device=self.counts.device)

    def reduce_from_all_processes(self) -> None:
        """Sum the counts over every process of the default group (call once, after the last update)."""
        _all_reduce_sum(self.counts)

    def compute(self) -> dict[str, Any]:
        c = self.counts.cpu().tolist()
        n = c[0]
        out: dict[str, Any] = {f"top{k}": (c[1 + i] / n if n else float("nan")) for i, k in enumerate(self.ks)}
        out["num_samples"] = n
        return out


def topk_accuracy(logits: torch.Tensor, target: torch.Tensor, ks: Sequence[int] = (1, 5)) -> dict[str, float]:
    """Top-k accuracy of one batch of logits, ``{"top1": …, "top5": …}`` as fractions in ``[0, 1]``."""
    acc = TopKAccuracy(ks)
    acc.update(logits, target)
    out = acc.compute()
    out.pop("num_samples")
    return out


__all__ = ["ConfusionMatrix", "TopKAccuracy", "topk_accuracy", "topk_correct"]
