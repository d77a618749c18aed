"""Channel pruning: scores → thresholds → plan → physical removal (Torch-Pruning).

``prune(model, method, ratio, ...)`` is the one call; the pieces are importable on their own:
:mod:`~mtprune.pruning.scores` (per-method channel importance), :mod:`~mtprune.pruning.plan`
(independent / unified thresholds, ``min_channels``, ``round_to``), :mod:`~mtprune.pruning.apply`
(physical removal and masking).
"""

from __future__ import annotations

from typing import Any

from mtprune.models.base import SegmentationModel
from mtprune.pruning.apply import apply_plan, build_dependency_graph, mask_plan, module_shapes
from mtprune.pruning.plan import THRESHOLDS, PruningPlan, check_ratio, compute_plan
from mtprune.pruning.scores import SCORERS, get_scorer, register_scorer


def make_plan(
    model: SegmentationModel,
    method: str,
    ratio: float,
    thresholds: str = "independent",
    round_to: int = 1,
    min_channels: int = 1,
    **score_kw: Any,
) -> PruningPlan:
    """Score ``model``'s prunable channels with ``method`` and choose the kept ones (no model change)."""
    scorer = get_scorer(method)
    ratio = check_ratio(ratio)
    layers = model.prunable_layers()
    scores = scorer.fn(model, layers, **score_kw)
    plan = compute_plan(scores, layers, ratio, scorer.scope, thresholds, min_channels, round_to, method=method)
    plan.model = model.arch()
    return plan


def prune(
    model: SegmentationModel,
    method: str,
    ratio: float,
    thresholds: str = "independent",
    round_to: int = 1,
    min_channels: int = 1,
    **score_kw: Any,
) -> PruningPlan:
    """Prune ``model`` in place (physically) and return the plan that was applied."""
    plan = make_plan(model, method, ratio, thresholds, round_to, min_channels, **score_kw)
    apply_plan(model, plan)
    return plan


__all__ = [
    "SCORERS",
    "THRESHOLDS",
    "PruningPlan",
    "apply_plan",
    "build_dependency_graph",
    "compute_plan",
    "get_scorer",
    "make_plan",
    "mask_plan",
    "module_shapes",
    "prune",
    "register_scorer",
]
