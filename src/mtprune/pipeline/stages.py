"""The stages of a run as :class:`~mtprune.pipeline.runner.Stage` declarations: training (every stage
of Algorithm 1), pruning, evaluation and the latency of every model against the dense one."""

from __future__ import annotations

import os
import sys
from pathlib import Path
from typing import Any

import torch

from mtprune.api import PruneRequest, prune_checkpoint
from mtprune.checkpoint import load_model
from mtprune.config import Config
from mtprune.cost import count_macs, count_params, latency_against, latency_kw, timed_as
from mtprune.cost.latency import timing_warning
from mtprune.data.from_config import make_dataset
from mtprune.evaluate.validation import check_validation_data, final_metrics
from mtprune.io import save_tensors, write_json
from mtprune.layout import QUALITATIVE_FILE, Budget
from mtprune.pipeline.runner import Stage
from mtprune.pruning import THRESHOLDS, get_method
from mtprune.recipe import config_keys, input_id, stage_recipe
from mtprune.train import check_stage, train_stage
from mtprune.train.distributed import DistEnv, barrier
from mtprune.train.engine import DONE_FILE, STAGE_TASKS


def training(stage: str, cfg: Config, out: str | os.PathLike, env: DistEnv, init: str | None = None) -> Stage:
    """Training stage ``stage`` of ``cfg`` from the model at ``init``, in folder ``out``, validated by
    :func:`~mtprune.evaluate.validation.final_metrics`."""
    out = Path(out)

    def run() -> dict[str, Any]:
        tasks = STAGE_TASKS[stage] if cfg.eval.final else ()
        check_validation_data(cfg, tuple(dict.fromkeys(tasks + (("seg",) if cfg.eval.every_epoch else ()))))
        return train_stage(stage, cfg, out, env, init, evaluate=final_metrics)

    def reused(done: dict[str, Any]) -> dict[str, Any]:
        measured, now = done.get("eval"), {"scales": list(cfg.eval.scales), "flip": cfg.eval.flip}
        if measured is not None and measured != now:
            print(
                f"note: {out}: reused; its metrics were measured with eval scales {measured['scales']}, flip "
                f"{measured['flip']} (this config: {now['scales']}, {now['flip']}); mtprune eval measures it anew",
                file=sys.stderr,
            )
        return dict(done.get("metrics", {}))

    return Stage(out.name, out, stage_recipe(check_stage(stage), cfg, init), run, result=reused, resumable=True)


def cost_size(cfg: Config) -> tuple[int, int]:
    """The input size of a run's cost figures (MACs, targets, latency): ``run.latency_size`` or the crop."""
    return tuple(cfg.run.latency_size or cfg.data.seg.crop_size)  # type: ignore[return-value]


def timing_size(cfg: Config) -> tuple[int, int]:
    """The input size a run times its nets at: ``run.timing.size``, else the cost size."""
    return tuple(cfg.run.timing.size or cost_size(cfg))  # type: ignore[return-value]


def prune_recipe(src: Path, method: str, budget: Budget, thresholds: str, cfg: Config) -> dict[str, Any]:
    """What a prune stage computes from: the source model, the method, ratio (or target), thresholds and the
    ``run`` keys of the plan (ThiNet also draws images: the seed and the segmentation data; a target is
    measured at the cost size, a latency target and ``round_to: auto`` as ``run.timing`` says)."""
    keys: tuple[str, ...] = ("run.round_to", "run.min_channels", "run.normalize", "run.compensate")
    if get_method(method).scorer == "thinet":
        keys += ("seed", "run.thinet_samples", "data.seg")
    if cfg.run.recalibrate_bn:  # only when on: the recipes of runs made before it existed stay as they were
        keys += ("run.recalibrate_bn",) + tuple(k for k in ("seed", "data.seg") if k not in keys)
    how: dict[str, Any] = {"ratio": budget}
    if isinstance(budget, dict):
        how = {"target": budget, "size": list(cost_size(cfg))}
    if cfg.run.round_to == "auto" or (isinstance(budget, dict) and "latency" in budget):
        keys += ("run.timing",)
        how["size"] = list(cost_size(cfg))
    return {
        "stage": "prune",
        "input": input_id(src),
        "method": method,
        **how,
        "thresholds": thresholds,
        "config": config_keys(cfg, keys),
    }


def pruning(src: Path, method: str, budget: Budget, thresholds: str, cfg: Config, out: Path) -> Stage:
    """Prune the model of stage folder ``src`` with ``method`` to ``budget`` (a ratio, or a target the
    ratio is searched for) into ``out`` (plan.json + model/ + done.json), by
    :func:`~mtprune.api.prune_checkpoint` — as ``mtprune prune`` does."""

    def run() -> None:
        target = next(iter(budget.items())) if isinstance(budget, dict) else None
        request = PruneRequest(
            source=src,
            method=method,
            ratio=None if target else budget,
            target=target,
            thresholds=thresholds if thresholds in THRESHOLDS else "independent",
            round_to=cfg.run.round_to,
            min_channels=cfg.run.min_channels,
            size=cost_size(cfg),
            timing=cfg.run.timing,
            config=cfg,
            samples=cfg.run.thinet_samples,
            normalize=cfg.run.normalize,
            compensate=cfg.run.compensate,
            recalibrate_bn=cfg.run.recalibrate_bn,
            log=lambda line: print(line, file=sys.stderr, flush=True),  # what is timed; a busy machine's warning
        )
        result = prune_checkpoint(request, out, out / "model")
        pruned = {"method": method, "ratio": result.plan.ratio, "thresholds": thresholds}
        write_json(out / DONE_FILE, {"stage": "prune", **pruned, **({"target": budget} if target else {})})

    return Stage(out.name, out, prune_recipe(src, method, budget, thresholds, cfg), run)


def eval_recipe(src: Path, cfg: Config) -> dict[str, Any]:
    """What an eval stage measures: the model, the evaluation settings, the validation data and the
    input size of the MACs count."""
    return {
        "stage": "eval",
        "input": input_id(src),
        "config": config_keys(cfg, ("eval", "data.seg", "data.cls", "run.latency_size")),
    }


def evaluation(src: Path, cfg: Config, env: DistEnv, out: Path) -> Stage:
    """Validation mIoU (+ per class), top-1/top-5, params and MACs of ``src``'s model, and the predictions
    of the first ``run.qualitative`` validation images (latency: the run's ``latency`` stage times every
    model together)."""

    def run() -> dict[str, Any]:
        model = load_model(src).to(env.device)
        metrics = final_metrics(model, cfg, env, ("seg", "cls"), force=True)
        if env.is_main and cfg.run.qualitative > 0:
            save_predictions(model, cfg, cfg.run.qualitative, out / QUALITATIVE_FILE)
        size = cost_size(cfg)
        model = model.cpu()
        metrics.update(params=count_params(model), macs=count_macs(model, size), cost_size=list(size))
        if env.is_main:
            write_json(out / DONE_FILE, {"stage": "eval", "source": str(src), "metrics": metrics})
        barrier(env)
        return metrics

    return Stage(out.name, out, eval_recipe(src, cfg), run)


@torch.no_grad()
def save_predictions(model: torch.nn.Module, cfg: Config, n: int, path: Path) -> None:
    """The first ``n`` validation images, their labels and ``model``'s predictions (``image.i``, ``mask.i``,
    ``pred.i``), for the report's qualitative figure."""
    ds = make_dataset(cfg, "seg", train=False)
    device = next(model.parameters()).device
    tensors: dict[str, torch.Tensor] = {}
    for i in range(min(n, len(ds))):
        img, mask = ds[i]
        tensors[f"image.{i}"] = img.contiguous()
        tensors[f"mask.{i}"] = mask.contiguous()
        tensors[f"pred.{i}"] = model(img[None].to(device)).argmax(1)[0].cpu().contiguous()
    save_tensors(path, tensors, {"num_classes": str(ds.num_classes)})


def latency_recipe(sources: dict[str, Path], cfg: Config) -> dict[str, Any]:
    """What the latency stage measures: the model behind every tag and the timing settings."""
    keys = ("run.latency_size", "run.timing", "data.seg.crop_size")
    return {
        "stage": "latency",
        "timed": "pair by pair, each setup in its own rounds",  # older runs timed everything in one round-robin
        "inputs": {tag: input_id(src) for tag, src in sorted(sources.items())},
        "config": config_keys(cfg, keys),
    }


def latency(sources: dict[str, Path], cfg: Config, out: Path) -> Stage:
    """Batch-1 latency of every model of the run at the cost size, timed against the dense one pair by pair
    as ``run.timing`` says (:func:`~mtprune.cost.latency.latency_against`, as ``mtprune cost --against``:
    one forward of each per round; with several runtimes each net in its fastest: best against best);
    ``{tag: {"latency_ms", "latency_iqr_ms", "latency_device", "ratio", "ratio_iqr", "setup", "page_faults",
    "host_memory"}}``, the ratio paired per round, the page faults the median per forward. Redone (not
    refused) when a model or a setting changed."""

    def run() -> dict[str, dict[str, Any]]:
        size = timing_size(cfg)
        models = {tag: load_model(src).cpu() for tag, src in sources.items()}
        dense = models.pop("dense")
        with timed_as(cfg.run.timing):
            timed = latency_against(models or {"dense-copy": dense}, dense, size, **latency_kw(cfg.run.timing))
        lat = {"dense": _dense_entry(list(timed.values()))} if timed else {}
        lat.update({tag: _latency_entry(t) for tag, t in timed.items() if tag in models})
        inputs = {tag: input_id(src) for tag, src in sources.items()}
        warnings = [
            w for tag, t in timed.items() if tag in models and (w := timing_warning(t, f"{tag}'s latency ratio"))
        ]
        for w in warnings:
            print(w, file=sys.stderr)
        done = {"stage": "latency", "size": list(size), "latency": lat, "inputs": inputs, "warnings": warnings}
        write_json(out / DONE_FILE, done)
        return lat

    return Stage(
        out.name, out, latency_recipe(sources, cfg), run, result=lambda d: dict(d["latency"]), redo_on_change=True
    )


def _latency_entry(t: dict[str, Any]) -> dict[str, Any]:
    keys = {"latency_ms": "latency_ms", "latency_iqr_ms": "latency_iqr_ms", "latency_device": "device"}
    keys |= {"page_faults": "page_faults", "host_memory": "host_memory"}
    ratio = {"ratio": t["latency_ratio"], "ratio_iqr": t["latency_ratio_iqr"], "setup": t["config"]["setup"]}
    return {k: t[v] for k, v in keys.items()} | ratio


def _dense_entry(pairs: list[dict[str, Any]]) -> dict[str, Any]:
    """The dense row: its figures in the pair whose latency is the median over the pairs (it is timed once per
    pruned model, always in the same setup)."""
    t = sorted(pairs, key=lambda e: e["against_latency_ms"])[(len(pairs) - 1) // 2]
    keys = {"latency_ms": "against_latency_ms", "latency_iqr_ms": "against_latency_iqr_ms", "latency_device": "device"}
    keys |= {"page_faults": "against_page_faults", "host_memory": "host_memory"}
    return {k: t[v] for k, v in keys.items()} | {"ratio": 1.0, "ratio_iqr": 0.0, "setup": t["against_config"]["setup"]}
