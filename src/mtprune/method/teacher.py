"""Eq. 7's classification loss ℓcls(N1(W1, X1), Y1) when Y1 comes from a frozen teacher instead of labels.

MTP trains W1 on classification to keep the backbone's ImageNet function while W3 learns segmentation.
Without ImageNet's labels, the function to keep is the pretrained net's own: its outputs on any images are
the targets. Two forms, pure functions on tensors:

- :func:`teacher_kl` — the teacher's logits (a trained classification head): KL(softmax(z_t/T) ‖ softmax(z/T))·T²
  (Hinton et al., 2015; T² keeps the gradient's scale independent of T);
- :func:`feature_mse` — its last backbone feature map (a net without a trained head): the mean squared
  distance of the two maps, each normalised to unit length per image.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def teacher_kl(student_logits: torch.Tensor, teacher_logits: torch.Tensor, temperature: float) -> torch.Tensor:
    """Eq. 7's ℓcls with a teacher's logits as Y1: ``KL(softmax(z_t/T) ‖ softmax(z/T)) · T²``, mean over the batch."""
    t = float(temperature)
    log_p = F.log_softmax(student_logits.float() / t, dim=1)
    log_q = F.log_softmax(teacher_logits.float() / t, dim=1)
    return F.kl_div(log_p, log_q, reduction="batchmean", log_target=True) * (t * t)


def feature_mse(student_features: torch.Tensor, teacher_features: torch.Tensor) -> torch.Tensor:
    """Eq. 7's ℓcls with a teacher's feature map as Y1: ``‖f/‖f‖ − f_t/‖f_t‖‖²`` per image, mean over the batch."""
    a = F.normalize(student_features.float().flatten(1), dim=1)
    b = F.normalize(teacher_features.float().flatten(1), dim=1)
    return (a - b).pow(2).sum(1).mean()
