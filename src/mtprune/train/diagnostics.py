"""What a sparse stage reports about its γ: per part the |γ| quantiles and the scale-free sparse fraction
(:mod:`mtprune.method.sparsity`), the distribution before and after, and a warning when the stage did
not switch off as many channels as the run prunes (the plan then follows the dense net's |γ|)."""

from __future__ import annotations

import math
import sys
from typing import Any

import torch

from mtprune.config import L1_SHRINK_MAX, L1_SHRINK_MIN, Config
from mtprune.method.sparsity import gamma_quantiles, gamma_summary, median_abs
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
    1 − √X (a conv's MACs scale with its input × output channels), for a params target 1 − √X too, and for
    a latency target X at least that (a net's latency falls no faster than its MACs: a lower bound)."""
    shares = list(cfg.run.ratios) + [1.0 - math.sqrt(next(iter(t.values()))) for t in cfg.run.targets]
    return max(shares, default=0.0)


def sparsity_warnings(stage: str, diag: dict[str, Any], cfg: Config, alpha_keys: dict[str, str]) -> list[str]:
    """A ``warning:`` line for each part whose sparse fraction is below the share the run prunes; its advice
    depends on whether the stage's ℓ1 shrink budget (``l1_shrink_ratio``) met the rule of docs/method.md,
    "Choosing α"."""
    need = pruned_share(cfg)
    out: list[str] = []
    if diag.get("l1_mild"):  # a mild stage was asked for: the plan ranks the |γ| the stage leaves, knowingly
        return out
    for part in (BACKBONE, DECODER):
        frac = diag.get(f"sparse_{part}")
        if frac is not None and frac < need:
            ratio = (diag.get("l1_shrink_ratio") or {}).get(part)
            if ratio is not None and ratio >= L1_SHRINK_MIN:
                advice = (
                    f"the shrink budget met the rule ({ratio:.2f} × the median |γ|), so the task held every γ up: "
                    "layers whose loss is not invariant to their BN's scale (activations other than ReLU, attention "
                    "gates) or a net far from trained; raise l1_budget, or start from a trained net"
                )
            else:
                advice = f"raise {alpha_keys[part]} (or set l1_budget), train the stage longer, or use l1: proximal"
            out.append(
                f"warning: {stage}: only {100 * frac:.1f} % of the {part}'s prunable γ are below "
                f"{cfg.run.sparsity_threshold:g} × its 95th percentile, fewer than the {100 * need:.0f} % the run "
                f"prunes: the ℓ1 term did not separate the channels, so the plan follows the dense net's |γ|; {advice}"
            )
    return out


def shrink_check(
    stage: str,
    before: Parts,
    shrink: dict[str, float],
    cfg: Config,
    alpha_keys: dict[str, str],
    l1_budget: float | None = None,
) -> dict[str, Any]:
    """At a sparse stage's start: ``l1_shrink`` (each part's ℓ1 shrink budget,
    :func:`~mtprune.method.sparsity.l1_shrink`) and ``l1_shrink_ratio`` (÷ the part's starting median |γ|),
    with a ``warning:`` line, said now, for each part whose ratio is below ``L1_SHRINK_MIN`` while the run
    prunes (such a stage cannot switch channels off, whatever its length) or above ``L1_SHRINK_MAX`` (it
    switches off more than the task can spare): the rule for α (docs/method.md). An ``l1_budget`` below
    ``L1_SHRINK_MIN`` asks for such a mild stage (a trained net, a short stage: docs/method.md): one plain line
    says so instead, and ``l1_mild`` keeps the end-of-stage warnings quiet."""
    out: dict[str, Any] = {"l1_shrink": dict(shrink), "l1_shrink_ratio": {}, "warnings": []}
    if l1_budget is not None and l1_budget < L1_SHRINK_MIN and pruned_share(cfg) > 0:
        out["l1_mild"] = True
        print(
            f"{stage}: l1_budget {l1_budget:g} < {L1_SHRINK_MIN:g}: a mild stage — few γ are switched off and the "
            'plan ranks the |γ| it leaves (docs/method.md, "Choosing α")',
            file=sys.stderr,
        )
    for part, budget in shrink.items():
        median = median_abs(before[part])
        if median == 0:  # nothing to shrink: every γ of the part is already 0
            out["l1_shrink_ratio"][part] = None
            continue
        ratio = out["l1_shrink_ratio"][part] = budget / median
        if ratio < L1_SHRINK_MIN and pruned_share(cfg) > 0 and not out.get("l1_mild"):
            want = L1_SHRINK_MIN * median / budget if budget > 0 else math.inf
            out["warnings"].append(
                f"warning: {stage}: the ℓ1 term can shrink the {part}'s γ by at most {budget:.3g} over this stage, "
                f"{ratio:.2f} × their median |γ| {median:.3g}; below {L1_SHRINK_MIN:g} × it few or no channels are "
                f"switched off: raise {alpha_keys[part]} ×{want:.3g} (or gamma_lr, or the steps), or set l1_budget"
            )
        elif ratio > L1_SHRINK_MAX and pruned_share(cfg) > 0:
            out["warnings"].append(
                f"warning: {stage}: the ℓ1 term can shrink the {part}'s γ by {budget:.3g} over this stage, "
                f"{ratio:.2f} × their median |γ| {median:.3g}; above {L1_SHRINK_MAX:g} × it switches off more than the "
                f"task can spare: lower {alpha_keys[part]} (or set l1_budget: 1.2)"
            )
    for w in out["warnings"]:
        print(w, file=sys.stderr)
    return out


def report_sparsity(
    stage: str, before: Parts, after: Parts, cfg: Config, alpha_keys: dict[str, str], start: dict | None = None
) -> dict:
    """The final diagnostics of a sparse stage (for its ``done.json``), its warnings said on stderr; ``start``:
    :func:`shrink_check`'s record (its warnings were said at the start)."""
    diag = round_diagnostics(after, cfg)
    diag["gamma_before"] = round_diagnostics(before, cfg)
    diag["gamma_distribution"] = {"before": distribution(before), "after": distribution(after)}
    start = dict(start or {})
    early = start.pop("warnings", [])
    diag.update(start)
    late = sparsity_warnings(stage, diag, cfg, alpha_keys)
    for w in late:
        print(w, file=sys.stderr)
    warnings = early + late
    if warnings:
        diag["warnings"] = warnings
    return diag
