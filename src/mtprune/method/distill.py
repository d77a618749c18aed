"""Distillation from the dense net during fine-tuning — beyond the paper, which fine-tunes on the task loss
only. The teacher's and the student's segmentation logits (N × C × H × W, at the same size) are compared
pixel by pixel (:func:`pixel_kl`, Hinton et al.'s knowledge distillation applied per pixel) or channel by
channel (:func:`channel_wise_distill`, Shu et al., ICCV 2021: each class map a distribution over locations)."""

from __future__ import annotations

import torch
import torch.nn.functional as F


def pixel_kl(student: torch.Tensor, teacher: torch.Tensor, temperature: float = 1.0) -> torch.Tensor:
    """``T² · mean over pixels of KL(softmax(t/T) ‖ softmax(s/T))`` over the class axis (dim 1); its gradient
    w.r.t. ``s`` is ``T (softmax(s/T) − softmax(t/T)) / (N·H·W)``."""
    t = temperature
    log_s = F.log_softmax(student.float() / t, dim=1)
    log_t = F.log_softmax(teacher.float() / t, dim=1)
    return (log_t.exp() * (log_t - log_s)).sum(1).mean() * t * t


def channel_wise_distill(student: torch.Tensor, teacher: torch.Tensor, temperature: float = 1.0) -> torch.Tensor:
    """CWD: each channel's map turned into a distribution over the H·W locations by ``softmax(·/T)``,
    ``T² · mean over N·C of KL(teacher's ‖ student's)``; its gradient w.r.t. ``s`` is
    ``T (softmax_loc(s/T) − softmax_loc(t/T)) / (N·C)``."""
    t = temperature
    n, c = student.shape[:2]
    log_s = F.log_softmax(student.float().reshape(n * c, -1) / t, dim=1)
    log_t = F.log_softmax(teacher.float().reshape(n * c, -1) / t, dim=1)
    return (log_t.exp() * (log_t - log_s)).sum(1).mean() * t * t


#: ``finetune.distill.kind`` → the loss
DISTILL_LOSSES = {"logits": pixel_kl, "channel": channel_wise_distill}
