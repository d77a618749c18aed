"""One prune call: a model (a checkpoint folder or a net in memory), a method and a budget in, the pruned
checkpoint and ``plan.json`` out — what ``mtprune prune`` and a run's prune stages both run.

    from mtprune.api import PruneRequest, prune_checkpoint
    result = prune_checkpoint(PruneRequest("runs/dense", "bn", target=("macs", 0.5), size=(512, 512)), "runs/p")
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from mtprune.checkpoint import load_model, save_model
from mtprune.config import Config, Timing
from mtprune.cost.counting import count_macs, count_params
from mtprune.cost.host_memory import host_memory
from mtprune.cost.latency import best_latency
from mtprune.cost.runtimes import Setup, setups_of
from mtprune.cost.tables import LatencyTable
from mtprune.cost.timing import latency_kw, table_setup, timed_as
from mtprune.data.from_config import sample_images
from mtprune.errors import DataError, UsageError
from mtprune.io import write_json
from mtprune.models.base import BACKBONE, DECODER, SegmentationModel
from mtprune.pruning import plan_cost, prune, scorer_inputs, scorer_of
from mtprune.pruning.fit import latency_fit
from mtprune.pruning.plan import PLAN_FILE, PruningPlan
from mtprune.pruning.recalibrate import check_images


@dataclass
class PruneRequest:
    """What to prune and how. ``source``: a checkpoint or stage folder (its stored scores — a ``sparse-mtp``
    stage's γ — are used by ``bn``), or a model in memory (pruned in place). Exactly one of ``ratio`` (the
    fraction of prunable channels removed) and ``target`` (``("macs" | "params" | "latency", X)``). ``size``:
    the input size of MACs and timing. ``timing``: how ``target=("latency", X)`` and ``round_to="auto"``
    time (:class:`~mtprune.config.Timing`). ThiNet reads ``samples`` training images of the segmentation set
    ``config`` describes and, with ``rescale``, rescales the next layers; ``recalibrate_bn`` images of that set
    re-estimate every BatchNorm's statistics in the pruned net (:func:`~mtprune.pruning.recalibrate_bn`)."""

    source: str | Path | SegmentationModel
    method: str
    ratio: float | None = None
    target: tuple[str, float] | None = None
    thresholds: str = "independent"
    round_to: int | str = 1
    min_channels: int = 1
    size: tuple[int, int] = (513, 513)
    timing: Timing = field(default_factory=Timing)
    config: Config = field(default_factory=Config)
    samples: int | None = None
    rescale: bool = True
    normalize: str = "none"  # "mean": each layer's scores over their mean before a unified threshold
    compensate: bool = False  # fold a removed channel's constant output (γ = 0) into its consumers
    recalibrate_bn: int = 0  # training images of ``config``'s set re-estimating every BN's statistics (0: off)
    on_candidate: Callable[[dict[str, Any]], None] | None = None  # each target candidate, as it is measured
    log: Callable[[str], None] | None = None  # progress lines (what is timed, where)

    @property
    def timed(self) -> bool:
        """Whether anything is timed: a latency target or ``round_to="auto"``."""
        return self.round_to == "auto" or (self.target is not None and self.target[0] == "latency")


@dataclass
class PruneResult:
    model: SegmentationModel  # the pruned net
    plan: PruningPlan
    summary: dict[str, Any]  # plan.json's "cost": method, ratio, sizes, params/MACs before and after …


def prune_checkpoint(
    request: PruneRequest,
    out: str | Path | None = None,
    model_out: str | Path | None = None,
    claim: Callable[[], contextlib.AbstractContextManager] | None = None,
) -> PruneResult:
    """Prune as ``request`` says (:func:`prune_model`) and, with ``out``, write ``out/plan.json`` (the plan and
    its ``cost`` summary) and the pruned checkpoint in ``model_out`` (default ``out``), inside ``claim()``
    (the CLI's writer lock of ``out``) — only once everything was computed, so a failure writes nothing."""
    src = request.source
    if (
        out is not None
        and not isinstance(src, SegmentationModel)
        and Path(src).resolve().is_relative_to(Path(out).resolve())
    ):
        raise UsageError("--out must not be --checkpoint or hold it (the dense model would be overwritten)")
    result = prune_model(request)
    if out is not None:
        with claim() if claim is not None else contextlib.nullcontext():
            write_pruned(result, request, Path(out), Path(model_out or out))
    return result


def check_destination(request: PruneRequest, out: str | Path) -> None:
    """One line when writing to ``out`` would overwrite the model being pruned."""
    src = request.source
    if not isinstance(src, SegmentationModel) and Path(src).resolve().is_relative_to(Path(out).resolve()):
        raise UsageError("--out must not be --checkpoint or hold it (the dense model would be overwritten)")


def prune_model(request: PruneRequest) -> PruneResult:
    """The pruned net, its plan and summary (nothing written)."""
    _check(request)
    model = request.source if isinstance(request.source, SegmentationModel) else load_model(request.source)
    where = None if isinstance(request.source, SegmentationModel) else request.source
    scorer = scorer_of(request.method)
    cfg = request.config
    try:
        score_kw = scorer_inputs(scorer, where, cfg, request.samples)
    except UsageError as e:
        raise UsageError(f"--method {e}") from None
    before = {"params": count_params(model), "macs": count_macs(model, request.size)}
    recal = _recalibration_images(request)
    with timed_as(request.timing) if request.timed else contextlib.nullcontext() as mode:
        cost = None
        if request.target is not None and request.target[0] == "latency":
            cost = plan_cost(model, "latency", timing_size(request), **latency_kw(request.timing))
        elif request.target is not None:
            cost = plan_cost(model, request.target[0], request.size)
        plan = prune(
            model, request.method, request.ratio, request.thresholds, 1 if request.round_to == "auto" else
            int(request.round_to), request.min_channels, rescale=request.rescale, target=request.target, cost=cost,
            on_candidate=request.on_candidate, fit=_fit(request, model), normalize=request.normalize,
            compensate=request.compensate, recalibrate=recal, **score_kw,
        )  # fmt: skip
        memory = host_memory() if mode is not None else None
    summary = _summary(request, model, plan, before)
    noisy = [c for c in (plan.target or {}).get("candidates", []) if c.get("reliable") == 0.0]
    if noisy and request.log is not None:  # never a plan picked from noise silently
        worst = max(c["latency_halfwidth"] for c in noisy)
        request.log(
            f"warning: {len(noisy)} of the latency target's candidates were known to ±{worst:.3f} only (a busy "
            "machine): the ratio chosen may be off by as much; prune on a quiet machine"
        )
        summary["timing_warning"] = f"{len(noisy)} candidates known to ±{worst:.3f} only"
    if memory is not None:
        summary["host_memory"] = memory
    if scorer == "thinet":
        summary["thinet"] = {"images": score_kw["num_samples"], "rescale": request.rescale}
    if recal is not None:
        summary["recalibrate_bn"] = sum(b.shape[0] for b in recal)  # images used
    return PruneResult(model, plan, summary)


def _recalibration_images(request: PruneRequest) -> list[torch.Tensor] | None:
    """``request.recalibrate_bn`` training images of ``request.config``'s segmentation set (None when 0)."""
    if not request.recalibrate_bn:
        return None
    try:
        images = sample_images(request.config, request.recalibrate_bn)
    except (DataError, UsageError) as e:
        raise UsageError(f"recalibrate_bn needs training images: {e}") from None
    check_images(images)  # before anything is measured
    return images


def write_pruned(result: PruneResult, request: PruneRequest, out: Path, model_out: Path) -> None:
    """``out/plan.json`` and the pruned checkpoint in ``model_out`` (its meta: what was pruned, from what)."""
    s = result.summary
    keys = ("method", "ratio", "thresholds", "normalize", "compensate", "target", "thinet", "recalibrate_bn")
    meta = {"pruned": {k: s[k] for k in keys if k in s}}
    source = "model in memory" if isinstance(request.source, SegmentationModel) else str(request.source)
    write_json(out / PLAN_FILE, {**result.plan.to_dict(), "cost": s})
    save_model(result.model, model_out, meta={**meta, "source": source})


def _check(request: PruneRequest) -> None:
    """One line for a request no prune can honour, before anything is loaded or measured."""
    if (request.ratio is None) == (request.target is None):
        raise UsageError("give exactly one of a ratio and a target")
    if request.samples is not None and request.samples < 1:
        raise UsageError(f"--samples must be ≥ 1 (got {request.samples})")
    if request.recalibrate_bn < 0:
        raise UsageError(f"recalibrate_bn must be ≥ 0 images (got {request.recalibrate_bn})")
    if request.round_to != "auto" and (not isinstance(request.round_to, int) or request.round_to < 1):
        raise UsageError(f"round_to must be a multiple K ≥ 1 or auto (got {request.round_to!r})")
    if request.timed:
        latency_kw(request.timing)  # checked before any work


def _fit(request: PruneRequest, model: SegmentationModel) -> Any:
    """``round_to="auto"``: the counts the hardware at hand likes (:func:`~mtprune.pruning.fit.latency_fit`),
    timed in the runtime ``request.timing`` names — with several, the one the unpruned net is fastest in."""
    if request.round_to != "auto":
        return None
    t = request.timing
    fastest = None
    if len(setups_of(t)) > 1:
        best = best_latency(model, timing_size(request), t.device, t.dtype, t.runs, setups=setups_of(t))["best"]
        fastest = Setup(best["layout"] == "channels_last", best["fold_bn"], best["compile"], best["runtime"])
    runtime, channels_last = table_setup(t, fastest)
    table = LatencyTable(t.table, t.device, channels_last, runtime=runtime)
    if request.log is not None:
        where = "ONNX Runtime (CPU)" if runtime == "onnxruntime" else t.device
        layout = ", channels_last" if channels_last else ""
        request.log(f"--round-to auto: timing convs in {where}{layout} (table {table.path})")
    return latency_fit(model, timing_size(request), table)


def timing_size(request: PruneRequest) -> tuple[int, int]:
    """The input size nets are timed at: ``timing.size``, else the size MACs are counted at."""
    size = request.timing.size or request.size
    return (size[0], size[1])


def _summary(
    request: PruneRequest, model: SegmentationModel, plan: PruningPlan, before: dict[str, int]
) -> dict[str, Any]:
    after = {"params": count_params(model), "macs": count_macs(model, request.size)}
    summary: dict[str, Any] = {
        "method": request.method,
        "ratio": plan.ratio,
        "thresholds": plan.thresholds,
        "size": list(request.size),
        "before": before,
        "after": after,
        "params_ratio": after["params"] / before["params"],
        "macs_ratio": after["macs"] / before["macs"],
        "removed": {p: plan.removed_fraction(p) for p in (BACKBONE, DECODER)},
    }
    if request.normalize != "none":
        summary["normalize"] = request.normalize
    if request.compensate:
        summary["compensate"] = True
    if request.timed:
        summary["timing"] = {"runtime": request.timing.runtime, "runs": request.timing.runs}
        summary["timing"]["size"] = list(timing_size(request))
    if plan.target is not None:
        summary["target"] = {k: v for k, v in plan.target.items() if k != "candidates"}
    return summary
