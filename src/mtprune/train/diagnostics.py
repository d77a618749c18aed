"""What a sparse stage reports about its γ: per part the |γ| quantiles and the scale-free sparse fraction
(:mod:`mtprune.method.sparsity`), the distribution before and after, and a warning when the stage did
not switch off as many channels as the run prunes (the plan then follows the dense net's |γ|)."""

from __future__ import annotations

import math
import sys
from typing import Any

import torch

from mtprune.config import Config
from mtprune.method.sparsity import gamma_quantiles, gamma_summary
from mtprune.models.base import BACKBONE, DECODER

Parts = dict[str, list[torch.Tensor]]  # part → its prunable γ


def round_diagnostics(parts: Parts, cfg: Config) -> dict[str, Any]:
    """``sparse_<part>`` (the fraction below the threshold) and ``gamma_<part>`` (quantiles) of each part."""
    out: dict[str, Any] = {}
    for part, gammas in parts.items():
        s = gamma_summary(gammas, cfg.run.sparsity_threshold)
        if s:
            out[f"sparse_{part}"] = s.pop("sparse")
            out[f"gamma_{part}"] = s
    return out


def distribution(parts: Parts) -> dict[str, list[float]]:
    """Each part's |γ| as 101 quantiles (the report's before / after plot)."""
    return {part: gamma_quantiles(g) for part, g in parts.items() if g}


def pruned_share(cfg: Config) -> float:
    """The largest fraction of channels the run prunes: its largest ratio, or for a MACs target X about
    1 − √X (a conv's MACs scale with its input × output channels), for a params target 1 − √X too."""
    shares = list(cfg.run.ratios) + [1.0 - math.sqrt(next(iter(t.values()))) for t in cfg.run.targets]
    return max(shares, default=0.0)


def sparsity_warnings(stage: str, diag: dict[str, Any], cfg: Config, alpha_keys: dict[str, str]) -> list[str]:
    """A ``warning:`` line for each part whose sparse fraction is below the share the run prunes."""
    need = pruned_share(cfg)
    out = []
    for part in (BACKBONE, DECODER):
        frac = diag.get(f"sparse_{part}")
        if frac is not None and frac < need:
            out.append(
                f"warning: {stage}: only {100 * frac:.1f} % of the {part}'s prunable γ are below "
                f"{cfg.run.sparsity_threshold:g} × its 95th percentile, fewer than the {100 * need:.0f} % the run "
                f"prunes: the ℓ1 term did not separate the channels, so the plan follows the dense net's |γ|; raise "
                f"{alpha_keys[part]}, train the stage longer, or use l1: proximal"
            )
    return out


def report_sparsity(stage: str, before: Parts, after: Parts, cfg: Config, alpha_keys: dict[str, str]) -> dict:
    """The final diagnostics of a sparse stage (for its ``done.json``), its warnings said on stderr."""
    diag = round_diagnostics(after, cfg)
    diag["gamma_before"] = round_diagnostics(before, cfg)
    diag["gamma_distribution"] = {"before": distribution(before), "after": distribution(after)}
    warnings = sparsity_warnings(stage, diag, cfg, alpha_keys)
    for w in warnings:
        print(w, file=sys.stderr)
    if warnings:
        diag["warnings"] = warnings
    return diag
