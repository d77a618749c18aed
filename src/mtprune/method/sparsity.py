"""How sparse the BN scales γ are: the diagnostics that say whether sparse training chose the channels.

An absolute count ("|γ| < 1e-2") stays 0 under the ℓ1 subgradient, whose γ jitter around 0 with
amplitude ≈ lr·α/(1−β), and means nothing for a net whose γ all sit near 1. The fraction used here is
scale-free: the share of a part's prunable |γ| below ``threshold`` × that part's 95th percentile.
"""

from __future__ import annotations

from collections.abc import Sequence

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
