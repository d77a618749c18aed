"""``mtprune run``: Algorithm 1 end to end, every method on the same budget, as resumable stages.

Each stage has its own folder under the run folder and a ``done.json`` when finished, so a rerun
reuses finished stages and resumes the interrupted one:

    pretrain-cls/   train-seg/   eval-dense/                     the dense baseline (shared)
    sparse-mtp/     sparse-slimming/                             sparse training, when a method needs it
    prune-<tag>/    finetune-<tag>/    eval-<tag>/               per method × ratio × thresholds
    results.json    report.md    plots/                          the comparison

``<tag>`` is ``<method>-<ratio>[-<thresholds>][-nocls]``. Every method gets the same fine-tuning
budget (the ``finetune`` section); ``run.without_cls_finetune`` adds the Table 1 variant with no
classification fine-tuning. A stage is reused (or resumed) only if its ``recipe.json`` matches what the
configuration asks of it now (:mod:`mtprune.recipe`); otherwise the run stops, naming the stage and
the keys that changed, so results of two configurations never mix in one folder.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Callable
from copy import deepcopy
from pathlib import Path
from typing import Any

import torch

from mtprune.checkpoint import load_model, resolve_checkpoint, save_model
from mtprune.config import Config, save_config
from mtprune.errors import UsageError
from mtprune.evaluate.cost import count_macs, count_params, interleaved_latency
from mtprune.io import read_json, write_json
from mtprune.pruning import SCORERS, THRESHOLDS, prune
from mtprune.recipe import check_recipe, config_keys, input_id, write_recipe
from mtprune.train import run_stage, seed_everything
from mtprune.train.distributed import DistEnv, barrier, setup
from mtprune.train.engine import DONE_FILE, make_dataset, sample_images, stage_steps
from mtprune.train.stages import final_metrics
from mtprune.train.streams import epoch_steps

#: method → (sparse-training stage or None, channel scores)
METHODS: dict[str, tuple[str | None, str]] = {
    "mtp": ("sparse-mtp", "bn"),
    "slimming": ("sparse-slimming", "bn"),
    "uniform": (None, "uniform"),
    "fpgm": (None, "fpgm"),
    "thinet": (None, "thinet"),
}
GLOBAL_METHODS = ("mtp", "slimming")  # the ones whose thresholds (independent / unified) matter


def _say(env: DistEnv, msg: str) -> None:
    if env.is_main:
        print(msg, file=sys.stderr, flush=True)


def check_run_config(cfg: Config) -> None:
    r = cfg.run
    for m in r.methods:
        if m not in METHODS:
            raise UsageError(f"run.methods: unknown method '{m}' (choose from {', '.join(METHODS)})")
        if METHODS[m][1] not in SCORERS:
            raise UsageError(f"run.methods: '{m}' needs the '{METHODS[m][1]}' scorer, not available here")
    for p in r.ratios:
        if not 0 < p < 1:
            raise UsageError(f"run.ratios: {p} is outside (0, 1)")
    if isinstance(r.without_cls_finetune, list):
        for m in r.without_cls_finetune:
            if m not in r.methods:
                raise UsageError(f"run.without_cls_finetune: '{m}' is not one of run.methods ({', '.join(r.methods)})")
    for t in r.thresholds:
        if t not in THRESHOLDS:
            raise UsageError(f"run.thresholds: unknown '{t}' (choose from {', '.join(THRESHOLDS)})")
    if r.latency and r.latency_runs < 20:  # checked here, not after hours of training in the latency stage
        raise UsageError(f"run.latency_runs: {r.latency_runs} is below 20 (latency medians need at least 20 rounds)")
    if r.latency and r.latency_threads is not None and r.latency_threads < 1:
        raise UsageError(f"run.latency_threads: {r.latency_threads} is below 1")


def variant_tag(method: str, ratio: float, thresholds: str, cls_finetune: bool = True) -> str:
    """``<method>-<ratio>[-<thresholds>][-nocls]``: the name of a variant's stage folders and results row."""
    tag = f"{method}-{ratio:g}" + (f"-{thresholds}" if method in GLOBAL_METHODS else "")
    return tag + ("" if cls_finetune else "-nocls")


def variants(cfg: Config) -> list[dict[str, Any]]:
    """Every model the run compares: method × ratio × thresholds (+ the no-cls-fine-tuning variant)."""
    out = []
    r = cfg.run
    for method in r.methods:
        modes = r.thresholds if method in GLOBAL_METHODS else ["layer"]
        for ratio in r.ratios:
            for th in modes:
                nocls = r.without_cls_finetune
                both = nocls is True or (isinstance(nocls, list) and method in nocls)
                for cls_ft in [True, False] if both else [True]:
                    tag = variant_tag(method, ratio, th, cls_ft)
                    out.append({"method": method, "ratio": ratio, "thresholds": th, "cls_finetune": cls_ft, "tag": tag})
    return out


def prune_stage(src: Path, method: str, ratio: float, thresholds: str, cfg: Config, out: Path) -> None:
    """Prune the model of stage folder ``src`` into ``out`` (plan.json + model/ + done.json)."""
    recipe = prune_recipe(src, method, ratio, thresholds, cfg)
    done = (out / DONE_FILE).is_file()
    check_recipe(out, recipe, has_work=done)
    if done:
        return
    write_recipe(out, recipe)
    model = load_model(src)
    score = METHODS[method][1]
    kw: dict[str, Any] = {}
    if score == "bn":
        scores = resolve_checkpoint(src) / "scores.safetensors"
        if scores.is_file():
            from safetensors.torch import load_file

            kw["scores"] = load_file(str(scores))
    if score == "thinet":
        batches = sample_images(cfg, cfg.run.thinet_samples)
        kw.update(images=batches, num_samples=sum(b.shape[0] for b in batches), seed=cfg.seed)
    th = thresholds if thresholds in THRESHOLDS else "independent"
    plan = prune(model, score, ratio, th, cfg.run.round_to, cfg.run.min_channels, **kw)
    write_json(out / "plan.json", plan.to_dict())
    save_model(
        model,
        out / "model",
        meta={"pruned": {"method": method, "ratio": ratio, "thresholds": thresholds}, "source": str(src)},
    )
    write_json(out / DONE_FILE, {"stage": "prune", "method": method, "ratio": ratio, "thresholds": thresholds})


def prune_recipe(src: Path, method: str, ratio: float, thresholds: str, cfg: Config) -> dict[str, Any]:
    """What :func:`prune_stage` computes from: the source model, the method, ratio, thresholds and the
    ``run`` keys of the plan (ThiNet also draws images: the seed and the segmentation data)."""
    keys: tuple[str, ...] = ("run.round_to", "run.min_channels")
    if METHODS[method][1] == "thinet":
        keys += ("seed", "run.thinet_samples", "data.seg")
    return {
        "stage": "prune",
        "input": input_id(src),
        "method": method,
        "ratio": ratio,
        "thresholds": thresholds,
        "config": config_keys(cfg, keys),
    }


def eval_recipe(src: Path, cfg: Config) -> dict[str, Any]:
    """What :func:`eval_stage` measures: the model, the evaluation settings, the validation data and the
    input size of the MACs count."""
    return {
        "stage": "eval",
        "input": input_id(src),
        "config": config_keys(cfg, ("eval", "data.seg", "data.cls", "run.latency_size")),
    }


def eval_stage(src: Path, cfg: Config, env: DistEnv, out: Path) -> dict[str, Any]:
    """Validation mIoU (+ per class), top-1/top-5, params and MACs of ``src``'s model (latency: the run's
    ``latency`` stage times every model together)."""
    recipe = eval_recipe(src, cfg)
    done = (out / DONE_FILE).is_file()
    check_recipe(out, recipe, has_work=done)
    if done:
        return dict(read_json(out / DONE_FILE)["metrics"])
    if env.is_main:
        write_recipe(out, recipe)
    model = load_model(src).to(env.device)
    metrics = final_metrics(model, cfg, env, ("seg", "cls"), force=True)
    size = tuple(cfg.run.latency_size or cfg.data.seg.crop_size)
    model = model.cpu()
    metrics.update(params=count_params(model), macs=count_macs(model, size), cost_size=list(size))
    if env.is_main:
        write_json(out / DONE_FILE, {"stage": "eval", "source": str(src), "metrics": metrics})
    barrier(env)
    return metrics


def _latency_done(sources: dict[str, Path], out: Path) -> dict[str, dict[str, Any]] | None:
    """The finished latency stage in ``out`` if it timed exactly the models of ``sources`` (the same
    tags, each made by the same recipe), else None."""
    if not (out / DONE_FILE).is_file():
        return None
    done = read_json(out / DONE_FILE)
    lat = done.get("latency", {})
    if sorted(lat) != sorted(sources):
        return None
    if "inputs" in done and done["inputs"] != {tag: input_id(src) for tag, src in sources.items()}:
        return None
    return dict(lat)


def latency_stage(sources: dict[str, Path], cfg: Config, out: Path) -> dict[str, dict[str, Any]]:
    """Batch-1 CPU latency of every model of the run, timed round-robin against the dense one
    (:func:`~mtprune.evaluate.cost.interleaved_latency`: one forward of each per round, so the machine's
    drift hits every model alike); ``{tag: {"latency_ms", "latency_iqr_ms", "latency_device", "ratio",
    "ratio_iqr"}}``, the ratio paired per round. Redone when the run's set of models (or one of
    them) changed."""
    done = _latency_done(sources, out)
    if done is not None:
        return done
    size = tuple(cfg.run.latency_size or cfg.data.seg.crop_size)
    models = {tag: load_model(src).cpu() for tag, src in sources.items()}
    threads = torch.get_num_threads()
    if cfg.run.latency_threads:
        torch.set_num_threads(cfg.run.latency_threads)
    try:
        timed = interleaved_latency(models, size, device="cpu", runs=cfg.run.latency_runs, reference="dense")
    finally:
        torch.set_num_threads(threads)
    lat = {
        tag: {
            "latency_ms": t["latency_ms"],
            "latency_iqr_ms": t["latency_iqr_ms"],
            "latency_device": t["device"],
            "ratio": t["ratio"],
            "ratio_iqr": t["ratio_iqr"],
        }
        for tag, t in timed.items()
    }
    inputs = {tag: input_id(src) for tag, src in sources.items()}
    write_json(out / DONE_FILE, {"stage": "latency", "size": list(size), "latency": lat, "inputs": inputs})
    return lat


def run_pipeline(
    cfg: Config,
    out: str | os.PathLike,
    env: DistEnv | None = None,
    progress: Callable[[str], None] | None = None,
    pretrained: str | os.PathLike | None = None,
) -> list[dict[str, Any]]:
    """Run Algorithm 1 for every configured method; returns the rows of ``results.json``.

    ``pretrained``: a finished ``pretrain-cls`` folder (or checkpoint) to start ``train-seg`` from
    instead of running ``pretrain-cls`` here (several seeds sharing one pre-trained backbone, as the
    paper's runs share one ImageNet model)."""
    check_run_config(cfg)
    out = Path(out)
    env = env or setup(cfg.device)
    say = progress or (lambda m: _say(env, m))
    if env.is_main:
        out.mkdir(parents=True, exist_ok=True)
        save_config(cfg, out / "config.yaml")

    def stage(name: str, fn: Callable[[], Any], reused: bool | None = None) -> Any:
        if reused is None:
            reused = (out / name / DONE_FILE).is_file()
        if not reused:
            say(f"[{name}] running")
        result = fn()  # a finished stage is said to be reused once fn has checked its recipe
        if reused:
            say(f"[{name}] reused")
        return result

    init = None
    if pretrained is not None:
        init = str(pretrained)
    elif cfg.run.pretrain:
        stage("pretrain-cls", lambda: run_stage("pretrain-cls", cfg, out / "pretrain-cls", env=env))
        init = str(out / "pretrain-cls")
    stage("train-seg", lambda: run_stage("train-seg", cfg, out / "train-seg", init=init, env=env))
    dense = stage("eval-dense", lambda: eval_stage(out / "train-seg", cfg, env, out / "eval-dense"))
    rows = [
        _row({"method": "dense", "ratio": 0.0, "thresholds": "-", "cls_finetune": False, "tag": "dense"}, dense, dense)
    ]
    for sparse in sorted({METHODS[m][0] for m in cfg.run.methods if METHODS[m][0]}):
        stage(sparse, lambda s=sparse: run_stage(s, cfg, out / s, init=str(out / "train-seg"), env=env))
    seg_epochs: dict[str, float] = {}  # fine-tuning segmentation epochs of the methods run.equal_seg_steps extends
    if cfg.run.equal_seg_steps:
        n = len(make_dataset(cfg, "seg", train=True))  # the one dataset build the budget needs
        extra = extra_seg_steps(cfg, env.world_size, n)
        seg_epochs = {m: extended_seg_epochs(cfg, k, env.world_size, n) for m, k in extra.items() if k}
        steps = ", ".join(f"{m} +{k}" for m, k in extra.items())
        say(f"[budget] equal segmentation steps: fine-tuning steps {steps}")
    else:
        extra = extra_seg_steps(cfg)
    for v in variants(cfg):
        src = out / (METHODS[v["method"]][0] or "train-seg")
        ptag = v["tag"].removesuffix("-nocls")
        if env.is_main:
            stage(
                f"prune-{ptag}",
                lambda v=v, src=src, ptag=ptag: prune_stage(
                    src, v["method"], v["ratio"], v["thresholds"], cfg, out / f"prune-{ptag}"
                ),
            )
        barrier(env)
        ft_cfg = deepcopy(cfg)
        if not v["cls_finetune"]:
            ft_cfg.finetune.cls_epochs = 0
        v["extra_seg_steps"] = extra[v["method"]]
        if v["method"] in seg_epochs:
            ft_cfg.finetune.seg_epochs = seg_epochs[v["method"]]
        stage(
            f"finetune-{v['tag']}",
            lambda v=v, c=ft_cfg, ptag=ptag: run_stage(
                "finetune", c, out / f"finetune-{v['tag']}", init=str(out / f"prune-{ptag}"), env=env
            ),
        )
        m = stage(
            f"eval-{v['tag']}", lambda v=v: eval_stage(out / f"finetune-{v['tag']}", cfg, env, out / f"eval-{v['tag']}")
        )
        rows.append(_row(v, m, dense))
    if env.is_main and cfg.run.latency:
        sources = {"dense": out / "train-seg"} | {r["tag"]: out / f"finetune-{r['tag']}" for r in rows[1:]}
        lat = stage(
            "latency",
            lambda: latency_stage(sources, cfg, out / "latency"),
            reused=_latency_done(sources, out / "latency") is not None,
        )
        for r in rows:
            t = lat[r["tag"]]
            r.update(latency_ms=t["latency_ms"], latency_iqr_ms=t["latency_iqr_ms"], latency_ratio=t["ratio"])
    if env.is_main:
        write_json(out / "results.json", rows)
        from mtprune.report import write_report

        say("[report] writing report.md and plots")
        write_report(out, cfg, rows)
    barrier(env)
    return rows


def sparse_seg_steps(cfg: Config, method: str, world_size: int = 1, seg_samples: int | None = None) -> int:
    """Segmentation forward/backward passes of ``method``'s sparse stage (0 for the data-free methods):
    ``sparse-mtp`` ``rounds × steps_seg`` (twice that in ``alternating`` mode, one Eq. 8 and one Eq. 9
    pass a step), ``sparse-slimming`` its epochs over the segmentation set (``seg_samples`` images; by
    default the configured training set's size)."""
    stage = METHODS[method][0]
    if stage == "sparse-mtp":
        c = cfg.sparse_mtp
        return c.rounds * c.steps_seg * (2 if c.mode == "alternating" else 1)
    if stage == "sparse-slimming":
        c2 = cfg.sparse_slimming
        return stage_steps(c2.epochs, _seg_epoch_steps(cfg, c2.batch_size, world_size, seg_samples))
    return 0


def extra_seg_steps(cfg: Config, world_size: int = 1, seg_samples: int | None = None) -> dict[str, int]:
    """With ``run.equal_seg_steps``: the segmentation steps added to each method's fine-tuning so that
    every method gets as many after ``train-seg`` as the method with the longest sparse stage
    (:func:`sparse_seg_steps`); without it, 0 for every method (the same fine-tuning budget)."""
    if not cfg.run.equal_seg_steps:
        return dict.fromkeys(cfg.run.methods, 0)
    steps = {m: sparse_seg_steps(cfg, m, world_size, seg_samples) for m in cfg.run.methods}
    top = max(steps.values(), default=0)
    return {m: top - n for m, n in steps.items()}


def extended_seg_epochs(cfg: Config, extra: int, world_size: int = 1, seg_samples: int | None = None) -> float:
    """``finetune.seg_epochs`` that gives ``extra`` more segmentation steps than the configured ones."""
    per_epoch = _seg_epoch_steps(cfg, cfg.finetune.seg_batch_size, world_size, seg_samples)
    steps = stage_steps(cfg.finetune.seg_epochs, per_epoch) if cfg.finetune.seg_epochs > 0 else 0
    return (steps + extra - 0.5) / per_epoch  # the stage takes ceil(epochs × steps per epoch) = steps + extra


def _seg_epoch_steps(cfg: Config, batch_size: int, world_size: int, seg_samples: int | None) -> int:
    n = len(make_dataset(cfg, "seg", train=True)) if seg_samples is None else seg_samples
    try:
        return epoch_steps(n, batch_size, world_size)
    except ValueError as e:
        raise UsageError(f"segmentation training set: {e}") from None


def _row(v: dict[str, Any], m: dict[str, Any], dense: dict[str, Any]) -> dict[str, Any]:
    def ratio(key: str) -> float | None:
        a, b = m.get(key), dense.get(key)
        return a / b if a is not None and b else None

    return {
        "method": v["method"],
        "ratio": v["ratio"],
        "thresholds": v["thresholds"],
        "cls_finetune": v["cls_finetune"],
        "tag": v["tag"],
        "extra_seg_steps": v.get("extra_seg_steps", 0),
        "miou": m.get("miou"),
        "delta_miou": (m["miou"] - dense["miou"]) if m.get("miou") is not None else None,
        "params": m.get("params"),
        "macs": m.get("macs"),
        "params_ratio": ratio("params"),
        "macs_ratio": ratio("macs"),
        "latency_ms": m.get("latency_ms"),
        "latency_ratio": ratio("latency_ms"),
        "top1": m.get("top1"),
        "top5": m.get("top5"),
        "pixel_acc": m.get("pixel_acc"),
        "per_class": m.get("per_class"),
    }


def run_seeds(
    cfg: Config,
    out: str | os.PathLike,
    seeds: list[int],
    env: DistEnv | None = None,
    progress: Callable[[str], None] | None = None,
) -> dict[str, Any]:
    """The run once per seed in ``out/seed-<k>/``, then ``out/summary.{json,md}``: mean ± std of every
    model and the paired per-seed differences (:mod:`mtprune.report.seeds`).

    With ``run.pretrain`` and ``run.shared_pretrain`` (the default), ``pretrain-cls`` runs once, in
    ``out/pretrain-cls/`` with the first seed, and every seed starts from it; the seeds then differ in
    everything after it. Finished seeds and stages are reused, so the command resumes like ``run``."""

    from mtprune.report.seeds import write_seeds_summary

    if not seeds:
        raise UsageError("run_seeds: no seeds given")
    if len(set(seeds)) != len(seeds):
        raise UsageError(f"seeds repeat: {seeds}")
    check_run_config(cfg)
    out = Path(out)
    env = env or setup(cfg.device)
    say = progress or (lambda m: _say(env, m))
    if env.is_main:
        out.mkdir(parents=True, exist_ok=True)
        save_config(cfg, out / "config.yaml")
    pretrained = None
    if cfg.run.pretrain and cfg.run.shared_pretrain:
        first = deepcopy(cfg)
        first.seed = seeds[0]
        reused = (out / "pretrain-cls" / DONE_FILE).is_file()
        shared = f"(shared by seeds {', '.join(map(str, seeds))})"
        if not reused:
            say(f"[pretrain-cls] running {shared}")
        seed_everything(first.seed)
        run_stage("pretrain-cls", first, out / "pretrain-cls", env=env)
        if reused:
            say(f"[pretrain-cls] reused {shared}")
        pretrained = out / "pretrain-cls"
    per_seed: dict[int, list[dict[str, Any]]] = {}
    for s in seeds:
        c = deepcopy(cfg)
        c.seed = s
        say(f"== seed {s} ==")
        seed_everything(s)
        per_seed[s] = run_pipeline(c, out / f"seed-{s}", env=env, progress=progress, pretrained=pretrained)
    summary: dict[str, Any] = {}
    if env.is_main:
        title = f"mtprune run — {cfg.model.name}, {cfg.data.seg.dataset}, seeds {', '.join(map(str, seeds))}"
        summary = write_seeds_summary(out, per_seed, title)
    barrier(env)
    return summary


def run_command(cfg: Config, out: str | os.PathLike, seeds: list[int] | None = None) -> Any:
    """``mtprune run``: one run (``results.json`` rows), or with ``seeds`` (or ``run.seeds``) one run per
    seed and their summary."""
    torch.use_deterministic_algorithms(True, warn_only=True)
    seeds = list(seeds) if seeds else list(cfg.run.seeds)
    if seeds:
        return run_seeds(cfg, out, seeds)
    seed_everything(cfg.seed)
    return run_pipeline(cfg, out)
