"""The paper's mathematics as pure functions on tensors (no data, no training loop).

- :func:`l1_penalty`, :func:`soft_threshold_` — the ℓ1 sparsity on BN scales γ (Eq. 3, Network Slimming).
- :func:`alm_coupling` — the augmented-Lagrangian terms ``⟨E, W1−W3⟩ + μ/2‖W1−W3‖²`` (Eq. 6).
- :func:`eq7_objective`, :func:`eq8_objective`, :func:`eq9_objective` — the three sub-problems, and
  :func:`eq7_backward`, :func:`eq8_backward`, :func:`eq9_backward` — their gradients, what training runs.
- :func:`joint_seg_objective` / :func:`joint_seg_backward` — Eq. 8 and Eq. 9 from one segmentation forward.
- :func:`add_alm_grad_` — the ALM terms' gradient added in place (inside the ``*_backward`` functions).
- :func:`eq10_update` — the multiplier update ``E ← E + μ(W1−W3)``, ``μ ← ρμ``.
- :func:`teacher_kl`, :func:`feature_mse` — Eq. 7's ℓcls when a frozen teacher, not labels, gives Y1.
- Beyond the paper: :func:`polarization_penalty` (``l1: polarization``), :func:`pixel_kl` /
  :func:`channel_wise_distill` (distillation from the dense net while fine-tuning).
"""

from mtprune.method.distill import DISTILL_LOSSES, channel_wise_distill, pixel_kl
from mtprune.method.mtp import (
    add_alm_grad_,
    alm_coupling,
    eq7_backward,
    eq7_objective,
    eq8_backward,
    eq8_objective,
    eq9_backward,
    eq9_objective,
    eq10_update,
    joint_seg_backward,
    joint_seg_objective,
    l1_penalty,
    polarization_penalty,
    relative_gap,
    soft_threshold_,
    sparsity_penalty,
)
from mtprune.method.teacher import feature_mse, teacher_kl

__all__ = [
    "DISTILL_LOSSES",
    "channel_wise_distill",
    "pixel_kl",
    "polarization_penalty",
    "sparsity_penalty",
    "feature_mse",
    "teacher_kl",
    "add_alm_grad_",
    "alm_coupling",
    "eq7_backward",
    "eq7_objective",
    "eq8_backward",
    "eq8_objective",
    "eq9_backward",
    "eq9_objective",
    "eq10_update",
    "joint_seg_backward",
    "joint_seg_objective",
    "l1_penalty",
    "relative_gap",
    "soft_threshold_",
]
