"""Pruning to a budget: the ratio p whose plan's cost (MACs, params or latency of the pruned net, as a
fraction of the unpruned one's) is the largest not above a target, by bisection over p. A latency is
measured (the pruned net against the unpruned one, round-robin, on the device at hand), so its search
stops at a coarser ``tol`` (:data:`LATENCY_TOL`): a candidate costs seconds, not microseconds."""

from __future__ import annotations

import copy
from collections.abc import Callable
from typing import Any

from torch import nn

from mtprune.cost.counting import count_macs, count_params
from mtprune.cost.latency import latency_against
from mtprune.errors import UsageError
from mtprune.pruning.apply import apply_plan
from mtprune.pruning.plan import PruningPlan

#: the budgets a target can name; the cost of each is measured by the caller (evaluation sits above pruning)
TARGET_METRICS = ("macs", "params", "latency")
#: the bisection's resolution in p for a latency target (each candidate is timed)
LATENCY_TOL = 0.01

Cost = Callable[[PruningPlan], "float | dict[str, float]"]


def parse_target(text: str) -> tuple[str, float]:
    """``"macs=0.5"`` → ``("macs", 0.5)``; one line naming the value when it is not a budget in (0, 1)."""
    metric, sep, value = text.partition("=")
    metric = metric.strip()
    if not sep or metric not in TARGET_METRICS:
        raise UsageError(f"--target {text}: expected METRIC=X with METRIC one of {', '.join(TARGET_METRICS)}")
    try:
        x = float(value)
    except ValueError:
        raise UsageError(f"--target {text}: '{value}' is not a number") from None
    if not 0.0 < x < 1.0:
        raise UsageError(f"--target {text}: {x:g} is outside (0, 1), the fraction of the unpruned net's {metric}")
    return metric, x


def search_ratio(
    plan_at: Callable[[float], PruningPlan],
    cost: Cost,
    target: float,
    metric: str = "macs",
    tol: float | None = None,
    max_ratio: float = 0.99,
    on_candidate: Callable[[dict[str, Any]], None] | None = None,
) -> tuple[PruningPlan, float, list[dict[str, Any]]]:
    """Bisection over p ∈ (0, ``max_ratio``]: the smallest p (to ``tol``; default 1e-3, :data:`LATENCY_TOL`
    for a latency) whose plan ``plan_at(p)`` costs at most ``target`` (``cost(plan)``: a fraction of the
    unpruned net's, or a dict holding it under ``metric`` with other figures, e.g. the MACs ratio of a
    timed candidate). Returns that plan, its cost, and every candidate tried (``{"ratio", metric, …}``,
    each also passed to ``on_candidate`` as it is measured). The cost falls as p grows; a budget that not
    even ``max_ratio`` reaches is one line (exit 2)."""
    tol = tol if tol is not None else (LATENCY_TOL if metric == "latency" else 1e-3)
    trail: list[dict[str, Any]] = []

    def tried(p: float) -> tuple[PruningPlan, float]:
        plan = plan_at(p)
        c = cost(plan)
        entry = {"ratio": p, **(c if isinstance(c, dict) else {metric: c})}
        trail.append(entry)
        if on_candidate is not None:
            on_candidate(entry)
        return plan, float(entry[metric])

    best = tried(max_ratio)
    if best[1] > target:
        raise UsageError(
            f"--target {metric}={target:g}: no plan reaches it (pruning {max_ratio:g} of the channels leaves "
            f"{best[1]:.3f} of the {metric})"
        )
    lo, hi = 0.0, max_ratio
    while hi - lo > tol:
        mid = (lo + hi) / 2
        plan, c = tried(mid)
        if c <= target:
            best, hi = (plan, c), mid
        else:
            lo = mid
    return best[0], best[1], trail


def plan_cost(model: nn.Module, metric: str, size: tuple[int, int], **latency_kw: Any) -> Callable[[Any], Any]:
    """``plan → the pruned net's MACs (at ``size``) or params as a fraction of ``model``'s``: each plan is
    applied to a copy of ``model`` on the meta device (shapes only, no weights: fast on any model). For
    ``latency``: ``plan → {"latency", "latency_iqr", "macs"}``, the pruned copy timed against ``model``
    (:func:`latency_against` with ``latency_kw``: ``setups``, ``device``, ``runs``, ``warmup``)."""
    if metric == "latency":
        return _latency_cost(model, size, **latency_kw)
    if metric not in ("macs", "params"):
        raise UsageError(f"the cost of a plan is its macs, params or latency, not {metric}")

    def measure(m: nn.Module) -> float:
        return float(count_macs(m, size) if metric == "macs" else count_params(m))

    shapes = copy.deepcopy(model).to("meta")
    base = measure(shapes)

    def ratio(plan: Any) -> float:
        pruned = copy.deepcopy(shapes)
        apply_plan(pruned, plan)
        return measure(pruned) / base

    return ratio


def _latency_cost(model: nn.Module, size: tuple[int, int], **latency_kw: Any) -> Callable[[Any], dict[str, float]]:
    """``plan → {"latency": paired latency ratio of the pruned net against model, "latency_iqr", "macs"}``."""
    macs = plan_cost(model, "macs", size)

    def cost(plan: Any) -> dict[str, float]:
        pruned = apply_plan(copy.deepcopy(model), plan)
        r = latency_against({"pruned": pruned}, model, size, **latency_kw)["pruned"]
        out = {"latency": r["latency_ratio"], "latency_iqr": r["latency_ratio_iqr"], "macs": macs(plan)}
        if "reliable" in r:  # timed with a precision: how well the candidate's ratio is known
            out |= {"latency_halfwidth": r["ratio_halfwidth"], "reliable": float(r["reliable"])}
        return out

    return cost
