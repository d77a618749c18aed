"""Channel pruning: scores → thresholds → plan → physical removal (Torch-Pruning).

``prune(model, method, ratio, ...)`` is the one call; the pieces are importable on their own:
:mod:`~mtprune.pruning.scores` (per-method channel importance), :mod:`~mtprune.pruning.plan`
(independent / unified thresholds, ``min_channels``, ``round_to``), :mod:`~mtprune.pruning.apply`
(physical removal and masking), :mod:`~mtprune.pruning.thinet` (ThiNet's statistics, greedy and
least-squares rescaling).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch

from mtprune.errors import UsageError
from mtprune.models.base import SegmentationModel
from mtprune.models.shapes import module_shapes
from mtprune.pruning.apply import apply_plan, build_dependency_graph, mask_plan
from mtprune.pruning.compensate import constant_inputs
from mtprune.pruning.methods import METHODS, Method, get_method, register_method, scorer_of
from mtprune.pruning.plan import THRESHOLDS, PruningPlan, check_ratio, compute_plan, plan_overlap, with_counts
from mtprune.pruning.recalibrate import recalibrate_bn
from mtprune.pruning.scores import SCORERS, get_scorer, register_scorer, scorer_inputs
from mtprune.pruning.search import TARGET_METRICS, Cost, parse_target, plan_cost, search_ratio
from mtprune.pruning.thinet import ThiNetStats, thinet_rescale, thinet_statistics


def make_plan(
    model: SegmentationModel,
    method: str,
    ratio: float,
    thresholds: str = "independent",
    round_to: int = 1,
    min_channels: int = 1,
    fit: Fit | None = None,
    normalize: str = "none",
    **score_kw: Any,
) -> PruningPlan:
    """Score ``model``'s prunable channels with ``method`` (a scorer, or a method of
    :data:`~mtprune.pruning.methods.METHODS`: its scorer) and choose the kept ones (no model change);
    ``fit``: :func:`refit` the counts (``--round-to auto``); ``normalize``: :func:`normalize_scores`."""
    scorer = get_scorer(scorer_of(method))
    ratio = check_ratio(ratio)
    layers = model.prunable_layers()
    scores = normalize_scores(scorer.fn(model, layers, **score_kw), normalize)
    plan = compute_plan(scores, layers, ratio, scorer.scope, thresholds, min_channels, round_to, method=method)
    plan.model = model.arch()
    return refit(plan, scores, fit)


#: how scores are put on one scale before a unified threshold compares them across layers
NORMALIZE = ("none", "mean")


def normalize_scores(scores: dict[str, torch.Tensor], how: str = "none") -> dict[str, torch.Tensor]:
    """``mean``: each layer's scores divided by their mean (Torch-Pruning's ``BNScaleImportance(normalizer=
    'mean')``), so that a unified threshold compares a channel with its own layer's scale — a layer whose γ
    all shrank together (scale-invariant under the next BN) is not removed wholesale; ``none``: as scored."""
    if how not in NORMALIZE:
        raise UsageError(f"normalize '{how}': choose from {', '.join(NORMALIZE)}")
    if how == "none":
        return scores
    return {k: v / v.float().mean().clamp_min(1e-12) for k, v in scores.items()}


#: plan → (the kept count each layer should have instead, a report of why): ``--round-to auto``'s choice
Fit = Callable[[PruningPlan], tuple[dict[str, int], dict[str, Any]]]


def refit(plan: PruningPlan, scores: dict[str, torch.Tensor], fit: Fit | None) -> PruningPlan:
    """``plan`` with the counts ``fit`` chooses (never fewer channels than the scores keep; the best-scored
    removed ones come back), ``round_to`` "auto" and the report in ``rounding``; ``plan`` as is without one."""
    if fit is None:
        return plan
    counts, report = fit(plan)
    out = with_counts(plan, scores, counts)
    out.round_to, out.rounding = "auto", report
    return out


def prune(
    model: SegmentationModel,
    method: str,
    ratio: float | None,
    thresholds: str = "independent",
    round_to: int = 1,
    min_channels: int = 1,
    *,
    rescale: bool = True,
    target: tuple[str, float] | None = None,
    cost: Cost | None = None,
    on_candidate: Callable[[dict[str, Any]], None] | None = None,
    fit: Fit | None = None,
    normalize: str = "none",
    compensate: bool = False,
    recalibrate: list[torch.Tensor] | None = None,
    **score_kw: Any,
) -> PruningPlan:
    """Prune ``model`` in place (physically) and return the plan that was applied.

    Exactly one of ``ratio`` (the fraction of prunable channels removed) and ``target`` (a budget such as
    ``("macs", 0.5)``, with ``cost``: plan → the pruned net's metric as a fraction of the unpruned one's;
    :func:`~mtprune.pruning.search.search_ratio` finds the ratio, recorded in ``plan.target``; each
    candidate tried is passed to ``on_candidate`` as it is measured). ``fit`` refits each plan's counts
    (:func:`refit`; ``--round-to auto``), every candidate's too.

    ``thinet``: the statistics (``score_kw["stats"]``, or measured here from ``images=…``, see
    :func:`~mtprune.pruning.thinet.thinet_statistics`) choose the channels, and with ``rescale`` (default)
    the consumers' kept input channels are then rescaled by least squares (:func:`thinet_rescale`) — the
    pruned net then differs from the masked one, by design. ``rescale`` is ignored by other methods.

    ``compensate``: a removed channel that outputs a constant (γ = 0: a sparse stage switched it off)
    has the constant folded into its consumers (:mod:`~mtprune.pruning.compensate`), so removing it costs nothing.

    ``recalibrate``: training images (normalised batches) whose batch statistics then replace every
    BatchNorm's running ones (:func:`~mtprune.pruning.recalibrate.recalibrate_bn`, EagleEye's adaptive BN).
    """
    if (ratio is None) == (target is None):
        raise UsageError("give exactly one of a ratio and a target")
    if target is not None and cost is None:
        raise UsageError(f"a {target[0]} target needs the cost of a plan")
    scorer = scorer_of(method)
    if ratio is not None:
        check_ratio(ratio)  # before ThiNet's statistics are measured
    stats = None
    if scorer == "thinet":
        stats = score_kw.get("stats") or thinet_statistics(model, model.prunable_layers(), **score_kw)
        score_kw = {"stats": stats}
    if target is None:
        plan = make_plan(model, method, float(ratio), thresholds, round_to, min_channels, fit, normalize, **score_kw)
    else:
        plan = _plan_for_target(
            model, method, target, cost, thresholds, round_to, min_channels, on_candidate, fit, normalize, **score_kw
        )
    apply_plan(model, plan, constants=constant_inputs(model) if compensate else None)
    if stats is not None and rescale:
        thinet_rescale(model, plan, stats)
    if recalibrate is not None:
        recalibrate_bn(model, recalibrate)
    return plan


def _plan_for_target(
    model: SegmentationModel,
    method: str,
    target: tuple[str, float],
    cost: Any,
    thresholds: str,
    round_to: int,
    min_channels: int,
    on_candidate: Callable[[dict[str, Any]], None] | None = None,
    fit: Fit | None = None,
    normalize: str = "none",
    **score_kw: Any,
) -> PruningPlan:
    """The plan of the smallest ratio whose cost meets ``target`` (the scores computed once)."""
    scorer = get_scorer(scorer_of(method))
    layers = model.prunable_layers()
    scores = normalize_scores(scorer.fn(model, layers, **score_kw), normalize)

    def plan_at(p: float) -> PruningPlan:
        plan = compute_plan(scores, layers, p, scorer.scope, thresholds, min_channels, round_to, method=method)
        plan.model = model.arch()
        return refit(plan, scores, fit)

    metric, budget = target
    plan, reached, trail = search_ratio(plan_at, cost, budget, metric, on_candidate=on_candidate)
    plan.target = {metric: budget, "reached": reached, "candidates": trail}
    return plan


__all__ = [
    "recalibrate_bn",
    "Fit",
    "NORMALIZE",
    "normalize_scores",
    "plan_cost",
    "METHODS",
    "SCORERS",
    "THRESHOLDS",
    "Method",
    "TARGET_METRICS",
    "PruningPlan",
    "ThiNetStats",
    "apply_plan",
    "build_dependency_graph",
    "compute_plan",
    "get_method",
    "get_scorer",
    "make_plan",
    "mask_plan",
    "module_shapes",
    "parse_target",
    "plan_overlap",
    "prune",
    "refit",
    "register_method",
    "register_scorer",
    "scorer_inputs",
    "scorer_of",
    "search_ratio",
    "thinet_rescale",
    "thinet_statistics",
]
