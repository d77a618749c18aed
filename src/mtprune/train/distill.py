"""What fine-tuning takes from the dense net beyond the paper: a distillation term on the segmentation
logits (``finetune.distill``) and BN scales rescaled to the dense net's before the first step
(``finetune.rescale_gamma``)."""

from __future__ import annotations

import time
from typing import Any

import torch

from mtprune.checkpoint import load_model
from mtprune.config import Config
from mtprune.errors import UsageError
from mtprune.method.distill import DISTILL_LOSSES
from mtprune.models.base import SegmentationModel
from mtprune.pruning.rescale import median_gammas, rescale_gamma_


class Distiller:
    """``weight`` × the distillation loss of the student's logits against the frozen ``teacher``'s on the same
    batch (the teacher in eval mode, under no_grad); ``ms``: the teacher's forward time of the last step."""

    def __init__(self, teacher: SegmentationModel, weight: float, kind: str, temperature: float) -> None:
        self.teacher, self.weight, self.temperature = teacher.eval(), weight, temperature
        self.fn = DISTILL_LOSSES[kind]
        self.ms, self.total_ms, self.steps = 0.0, 0.0, 0

    def loss(self, student: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        t0 = time.perf_counter()
        with torch.no_grad():
            target = self.teacher(x)
        self.ms = (time.perf_counter() - t0) * 1000.0
        self.total_ms, self.steps = self.total_ms + self.ms, self.steps + 1
        return self.weight * self.fn(student, target, self.temperature)


def _dense(cfg: Config, what: str) -> str:
    teacher = cfg.finetune.distill.teacher
    if not teacher:
        raise UsageError(
            f"{what} needs the dense net: finetune.distill.teacher DIR (mtprune run sets it to the run's dense net)"
        )
    return teacher


def distiller(cfg: Config, model: SegmentationModel, device: Any) -> Distiller | None:
    """The fine-tuning's :class:`Distiller` (None with weight 0: the plain fine-tune, no teacher loaded)."""
    d = cfg.finetune.distill
    if d.weight == 0:
        return None
    teacher = load_model(_dense(cfg, "finetune.distill.weight > 0"), device=device)
    if teacher.num_classes != model.num_classes:
        raise UsageError(
            f"finetune.distill.teacher {d.teacher}: {teacher.num_classes} classes, the net fine-tuned has "
            f"{model.num_classes}"
        )
    for p in teacher.parameters():
        p.requires_grad_(False)
    return Distiller(teacher, d.weight, d.kind, d.temperature)


def rescale_before_finetune(cfg: Config, model: SegmentationModel) -> dict[str, float]:
    """``finetune.rescale_gamma``: each pruned layer's kept γ brought to the dense net's median |γ|
    (:func:`~mtprune.pruning.rescale.rescale_gamma_`); ``{bn: scale}`` ({} when off)."""
    if not cfg.finetune.rescale_gamma:
        return {}
    dense = load_model(_dense(cfg, "finetune.rescale_gamma"))
    return rescale_gamma_(model, median_gammas(dense), tuple(cfg.data.seg.crop_size))
