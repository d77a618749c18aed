"""Multi-task pruning (MTP) by inexact augmented Lagrange multipliers — the paper's Eq. 3 and 6–10.

Notation (paper, Sec. 3): W1 is the backbone trained on classification (with the classification head),
W3 an auxiliary copy of the backbone trained on segmentation, W2 the decoder; γ1, γ3, γ2 are the BN
scales of W1, W3, W2. The constraint W1 = W3 is enforced through the augmented Lagrangian (Eq. 6)

    L = ℓcls(W1) + λ ℓseg(W3, W2) + μ/2 ‖W1 − W3‖² + ⟨E, W1 − W3⟩ + α1‖γ1‖₁ + α2 (‖γ2‖₁ + ‖γ3‖₁),

minimised alternately over W1 (Eq. 7), W2 (Eq. 8), W3 (Eq. 9), then E and μ are updated (Eq. 10).

Tensors are passed as aligned lists: ``w1[i]`` and ``w3[i]`` are the same backbone parameter in both
copies and ``E[i]`` its multiplier (one tensor per backbone parameter, BN γ and β included; BN running
statistics are buffers, not parameters, and are not tied). Each objective is differentiable: its
gradient w.r.t. the variable being solved is the task gradient, ``E + μ(W1 − W3)`` (Eq. 7) or
``−E − μ(W1 − W3)`` (Eq. 9), and ``α·sign(γ)`` — the subgradient of the ℓ1 term, exactly what Network
Slimming adds to γ's gradient. The other copy enters detached: it is a constant of that sub-problem.
Training steps on the ``*_backward`` functions: each writes its objective's whole gradient into
``.grad``. With the ``proximal`` ℓ1 option, call them with ``alpha = 0`` and apply
:func:`soft_threshold_` after each optimiser step instead.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

Tensors = Sequence[torch.Tensor]


def l1_penalty(gammas: Tensors, alpha: float) -> torch.Tensor:
    """``α Σ|γ|`` over the given BN scales (Eq. 3's sparsity term; its gradient is ``α·sign(γ)``)."""
    if alpha == 0 or not gammas:
        dev = gammas[0].device if gammas else None
        return torch.zeros((), device=dev)
    return alpha * torch.stack([g.abs().sum() for g in gammas]).sum()


def polarization_penalty(gammas: Tensors, alpha: float, t: float) -> torch.Tensor:
    """``α (t‖γ‖₁ − ‖γ − γ̄‖₁)`` over all the given scales together, ``γ̄`` their mean: the polarization
    regulariser (Zhuang et al., NeurIPS 2020) in place of ℓ1 (``l1: polarization``). It pushes every γ to 0 by
    ``t·α`` and away from the mean by ``α``, so the scales split into a group at 0 and a group well above it,
    instead of all shrinking together. Gradient w.r.t. ``γ_i``: ``α (t·sign(γ_i) − sign(γ_i − γ̄) +
    mean_j sign(γ_j − γ̄))``."""
    if alpha == 0 or not gammas:
        dev = gammas[0].device if gammas else None
        return torch.zeros((), device=dev)
    flat = torch.cat([g.reshape(-1) for g in gammas])
    return alpha * (t * flat.abs().sum() - (flat - flat.mean()).abs().sum())


def sparsity_penalty(gammas: Tensors, alpha: float, t: float | None = None) -> torch.Tensor:
    """The sparsity term on ``gammas``: ℓ1 (:func:`l1_penalty`, Eq. 3), or with ``t`` the polarization
    regulariser (:func:`polarization_penalty`)."""
    return l1_penalty(gammas, alpha) if t is None else polarization_penalty(gammas, alpha, t)


@torch.no_grad()
def soft_threshold_(gammas: Tensors, threshold: float) -> None:
    """Proximal step of ``threshold·‖γ‖₁`` (``threshold = lr·α``), in place: ``γ ← sign(γ)·max(|γ| − t, 0)``."""
    if threshold <= 0:
        return
    for g in gammas:
        g.copy_(torch.sign(g) * torch.clamp(g.abs() - threshold, min=0.0))


def alm_coupling(w1: Tensors, w3: Tensors, E: Tensors, mu: float) -> torch.Tensor:
    """``⟨E, W1 − W3⟩ + μ/2 ‖W1 − W3‖²`` summed over all backbone tensors (Eq. 6's augmented terms)."""
    if len(w1) != len(w3) or len(w1) != len(E):
        raise ValueError(f"W1, W3 and E must align: got {len(w1)}, {len(w3)}, {len(E)} tensors")
    diffs = [a - b for a, b in zip(w1, w3, strict=True)]
    inner = torch.stack([(e * d).sum() for e, d in zip(E, diffs, strict=True)]).sum()
    sq = torch.stack([(d * d).sum() for d in diffs]).sum()
    return inner + 0.5 * mu * sq


def eq7_objective(
    cls_loss: torch.Tensor,
    w1: Tensors,
    w3: Tensors,
    E: Tensors,
    mu: float,
    gamma1: Tensors,
    alpha1: float,
) -> torch.Tensor:
    """Eq. 7, the W1 sub-problem: ``ℓcls + ⟨E, W1 − W3⟩ + μ/2‖W1 − W3‖² + α1‖γ1‖₁`` (W3 held fixed).

    Training steps on its gradient, :func:`eq7_backward`."""
    return cls_loss + alm_coupling(w1, [t.detach() for t in w3], E, mu) + l1_penalty(gamma1, alpha1)


def eq8_objective(seg_loss: torch.Tensor, gamma2: Tensors, alpha2: float, lam: float) -> torch.Tensor:
    """Eq. 8, the W2 (decoder) sub-problem: ``λ ℓseg + α2‖γ2‖₁``."""
    return lam * seg_loss + l1_penalty(gamma2, alpha2)


def eq9_objective(
    seg_loss: torch.Tensor,
    w1: Tensors,
    w3: Tensors,
    E: Tensors,
    mu: float,
    gamma3: Tensors,
    alpha2: float,
    lam: float,
) -> torch.Tensor:
    """Eq. 9, the W3 sub-problem: ``λ ℓseg + μ/2‖W1 − W3‖² + ⟨E, W1 − W3⟩ + α2‖γ3‖₁`` (W1 held fixed).

    Training steps on its gradient, :func:`eq9_backward`."""
    return lam * seg_loss + alm_coupling([t.detach() for t in w1], w3, E, mu) + l1_penalty(gamma3, alpha2)


def joint_seg_objective(
    seg_loss: torch.Tensor,
    w1: Tensors,
    w3: Tensors,
    E: Tensors,
    mu: float,
    gamma2: Tensors,
    gamma3: Tensors,
    alpha2: float,
    lam: float,
) -> torch.Tensor:
    """Eq. 8 and Eq. 9 from one segmentation forward/backward (``joint`` mode).

    ``λ ℓseg + α2‖γ2‖₁ + μ/2‖W1 − W3‖² + ⟨E, W1 − W3⟩ + α2‖γ3‖₁``: its gradient w.r.t. W2 is Eq. 8's and
    w.r.t. W3 is Eq. 9's, because the two share ``λ ℓseg`` and each other term touches one variable only.
    One step on it updates W2 and W3 from the same batch, as a Jacobi (rather than Gauss–Seidel) sweep.
    Training steps on its gradient, :func:`joint_seg_backward`.
    """
    return eq9_objective(seg_loss, w1, w3, E, mu, gamma3, alpha2, lam) + l1_penalty(gamma2, alpha2)


# --- the gradients training steps on ------------------------------------------------------------------
# Each computes its objective's whole gradient into ``.grad`` — the task loss and ℓ1 by backpropagation,
# the ALM terms by :func:`add_alm_grad_` (their exact gradient, tested equal to autograd's, in a few fused
# passes over the backbone instead of an autograd graph per tensor: what keeps an MTP step near a plain one).
def eq7_backward(
    cls_loss: torch.Tensor,
    w1: Tensors,
    w3: Tensors,
    E: Tensors,
    mu: float,
    gamma1: Tensors,
    alpha1: float,
    t: float | None = None,
) -> None:
    """The gradient of Eq. 7 (:func:`eq7_objective`) w.r.t. W1: ``∇ℓcls + α1·sign(γ1) + E + μ(W1 − W3)``
    (with ``t``: the polarization term's gradient in place of ``α1·sign(γ1)``, :func:`sparsity_penalty`)."""
    (cls_loss + sparsity_penalty(gamma1, alpha1, t)).backward()
    add_alm_grad_(w1, w3, E, mu, +1.0)


def eq8_backward(seg_loss: torch.Tensor, gamma2: Tensors, alpha2: float, lam: float, t: float | None = None) -> None:
    """The gradient of Eq. 8 (:func:`eq8_objective`) w.r.t. W2: ``λ∇ℓseg + α2·sign(γ2)`` (``t``: polarization)."""
    (lam * seg_loss + sparsity_penalty(gamma2, alpha2, t)).backward()


def eq9_backward(
    seg_loss: torch.Tensor,
    w1: Tensors,
    w3: Tensors,
    E: Tensors,
    mu: float,
    gamma3: Tensors,
    alpha2: float,
    lam: float,
    t: float | None = None,
) -> None:
    """The gradient of Eq. 9 (:func:`eq9_objective`) w.r.t. W3: ``λ∇ℓseg + α2·sign(γ3) − E − μ(W1 − W3)``
    (``t``: polarization)."""
    (lam * seg_loss + sparsity_penalty(gamma3, alpha2, t)).backward()
    add_alm_grad_(w3, w1, E, mu, -1.0)


def joint_seg_backward(
    seg_loss: torch.Tensor,
    w1: Tensors,
    w3: Tensors,
    E: Tensors,
    mu: float,
    gamma2: Tensors,
    gamma3: Tensors,
    alpha2: float,
    lam: float,
    t: float | None = None,
) -> None:
    """The gradient of :func:`joint_seg_objective`: Eq. 8's w.r.t. W2 and Eq. 9's w.r.t. W3, one backward
    (``t``: polarization)."""
    (lam * seg_loss + sparsity_penalty(gamma3, alpha2, t) + sparsity_penalty(gamma2, alpha2, t)).backward()
    add_alm_grad_(w3, w1, E, mu, -1.0)


@torch.no_grad()
def add_alm_grad_(w: Tensors, w_other: Tensors, E: Tensors, mu: float, sign: float) -> None:
    """Add the gradient of the ALM terms ``⟨E, W1−W3⟩ + μ/2‖W1−W3‖²`` to ``w``'s ``.grad``, in place.

    ``sign=+1`` with ``w = W1, w_other = W3`` gives Eq. 7's ``E + μ(W1 − W3)``; ``sign=−1`` with
    ``w = W3, w_other = W1`` gives Eq. 9's ``−E − μ(W1 − W3)`` (used by :func:`eq7_backward`,
    :func:`eq9_backward`, :func:`joint_seg_backward`).
    """
    diff = torch._foreach_sub(list(w), list(w_other)) if sign > 0 else torch._foreach_sub(list(w_other), list(w))
    torch._foreach_mul_(diff, mu)  # μ(W1 − W3)
    torch._foreach_add_(diff, list(E))  # E + μ(W1 − W3)
    for p, d in zip(w, diff, strict=True):
        if p.grad is None:
            p.grad = d.mul_(sign)
        else:
            p.grad.add_(d, alpha=sign)


@torch.no_grad()
def eq10_update(E: Tensors, w1: Tensors, w3: Tensors, mu: float, rho: float, mu_max: float | None = None) -> float:
    """Eq. 10: ``E ← E + μ(W1 − W3)`` in place, and return the new ``μ = min(ρμ, mu_max)``."""
    for e, a, b in zip(E, w1, w3, strict=True):
        e.add_(a - b, alpha=mu)
    new_mu = rho * mu
    return min(new_mu, mu_max) if mu_max is not None else new_mu


@torch.no_grad()
def relative_gap(w1: Tensors, w3: Tensors) -> float:
    """``‖W1 − W3‖ / ‖W1‖`` over all backbone tensors: how far the two copies are from agreeing."""
    num = torch.stack([(a - b).float().pow(2).sum() for a, b in zip(w1, w3, strict=True)]).sum().sqrt()
    den = torch.stack([a.float().pow(2).sum() for a in w1]).sum().sqrt()
    return float(num / den.clamp_min(1e-12))
