"""How sparse the BN scales γ are: the diagnostics that say whether sparse training chose the channels.

An absolute count ("|γ| < 1e-2") stays 0 under the ℓ1 subgradient, whose γ jitter around 0 with
amplitude ≈ lr·α/(1−β), and means nothing for a net whose γ all sit near 1. The fraction used here is
scale-free: the share of a part's prunable |γ| below ``threshold`` × that part's 95th percentile.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence

import torch

from mtprune.config import SPARSITY_THRESHOLD


def _abs(gammas: Sequence[torch.Tensor]) -> torch.Tensor:
    return torch.cat([g.detach().abs().flatten().float().cpu() for g in gammas])


def _off(g: torch.Tensor, below: torch.Tensor) -> torch.Tensor:
    """The switched-off channels: |γ| below the bound, and every exact zero (a part whose γ all collapsed to 0
    has a 95th percentile of 0 and is all switched off, not none)."""
    return (g < below) | (g == 0)


def sparse_fraction(gammas: Sequence[torch.Tensor], threshold: float = SPARSITY_THRESHOLD) -> float:
    """The fraction of ``|γ|`` below ``threshold`` × their 95th percentile (0.0 for no γ)."""
    if not gammas:
        return 0.0
    g = _abs(gammas)
    return int(_off(g, threshold * torch.quantile(g, 0.95)).sum()) / g.numel()


def gamma_summary(gammas: Sequence[torch.Tensor], threshold: float = SPARSITY_THRESHOLD) -> dict[str, float]:
    """``{"q05", "q50", "q95"}`` (absolute |γ| quantiles) and ``"sparse"`` (:func:`sparse_fraction`)."""
    if not gammas:
        return {}
    g = _abs(gammas)
    q = torch.quantile(g, torch.tensor([0.05, 0.5, 0.95]))
    return {
        "q05": float(q[0]),
        "q50": float(q[1]),
        "q95": float(q[2]),
        "sparse": int(_off(g, threshold * q[2]).sum()) / g.numel(),
    }


def gamma_quantiles(gammas: Sequence[torch.Tensor], n: int = 101) -> list[float]:
    """``n`` evenly spaced quantiles of ``|γ|`` (0 … 100 %): its distribution, small enough to keep in JSON."""
    if not gammas:
        return []
    return [float(v) for v in torch.quantile(_abs(gammas), torch.linspace(0, 1, n))]


def l1_shrink(alpha: float, lrs: Iterable[float], l1: str, momentum: float, gamma_lr: float = 1.0) -> float:
    """The ℓ1 shrink budget of a stage: how far the ℓ1 term alone moves a γ towards 0, ``α·gamma_lr·Σ lr_t``
    over its steps; for ``l1: subgradient`` × 1/(1 − β), since momentum β integrates the constant
    ``α·sign(γ)`` into a step 1/(1 − β) larger (the proximal step is applied after the momentum update).

    Why it decides whether a stage separates channels: a BN whose output reaches the loss only through
    another conv + BN (every prunable layer inside a residual block, an ASPP branch) can be scaled as a
    whole at no cost to the loss, so the ℓ1 term first shrinks all its γ together, unopposed, and the task
    gradient (which grows as 1/scale) only starts to keep some channels and let the others go once the
    scale is small. A stage whose budget is below the γ's starting median ends before that point: every
    γ of a part smaller by about the same amount, the ranking still the dense net's (bench/README.md)."""
    scale = gamma_lr / (1.0 - momentum) if l1 in ("subgradient", "polarization") else gamma_lr
    return float(alpha * scale * sum(lrs))


def median_abs(gammas: Sequence[torch.Tensor]) -> float:
    """The median of ``|γ|`` (0.0 for no γ): the scale the ℓ1 shrink budget is measured against."""
    return float(_abs(gammas).median()) if gammas else 0.0


def budget_alpha(budget: float, median: float, unit_shrink: float) -> float:
    """The α whose shrink budget (:func:`l1_shrink`) is ``budget`` × ``median``, given the shrink of α = 1."""
    return budget * median / unit_shrink if unit_shrink > 0 else 0.0
