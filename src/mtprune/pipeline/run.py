"""``mtprune run``: Algorithm 1 end to end, every method on the same budget, as resumable stages in the
run layout of :mod:`mtprune.layout`.

Every method gets the same fine-tuning budget (the ``finetune`` section; :mod:`~mtprune.pipeline.budget`);
``run.without_cls_finetune`` adds the Table 1 variant with no classification fine-tuning. Each stage is
reused, resumed or refused by its recipe (:func:`~mtprune.pipeline.runner.execute`), so results of two
configurations never mix in one folder.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator
from copy import deepcopy
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import torch

from mtprune import layout
from mtprune.checkpoint import Consent, adopt_consent, current_consent
from mtprune.config import Config, Timing, check_timing, save_config
from mtprune.cost.host_memory import CACHED, can_cache
from mtprune.cost.runtimes import check_runtimes, setups_of
from mtprune.cost.timing import latency_kw
from mtprune.data.from_config import make_dataset
from mtprune.errors import UsageError
from mtprune.io import folder_lock, read_json, write_json
from mtprune.layout import Variant, variants
from mtprune.pipeline.budget import finetune_budget
from mtprune.pipeline.parallel import Job, run_processes, threads_per_job
from mtprune.pipeline.runner import Say, execute, say_on_main
from mtprune.pipeline.stages import evaluation, latency, pruning, timing_size, training
from mtprune.pruning import METHODS, TARGET_METRICS, THRESHOLDS, plan_overlap
from mtprune.pruning.plan import PLAN_FILE
from mtprune.report import write_report
from mtprune.report.seeds import write_seeds_summary
from mtprune.train import seed_everything
from mtprune.train.distributed import DistEnv, barrier, setup
from mtprune.train.teacher import check_teacher, load_teacher, uses_teacher


def check_run_config(cfg: Config) -> None:
    r = cfg.run
    for m in r.methods:
        if m not in METHODS:
            raise UsageError(f"run.methods: unknown method '{m}' (choose from {', '.join(METHODS)})")
    for p in r.ratios:
        if not 0 < p < 1:
            raise UsageError(f"run.ratios: {p} is outside (0, 1)")
    for t in r.targets:
        if len(t) != 1 or next(iter(t)) not in TARGET_METRICS or not 0 < next(iter(t.values())) < 1:
            raise UsageError(
                f"run.targets: {t} is not one of {{macs: X}}, {{params: X}}, {{latency: X}} with X in (0, 1)"
            )
    if isinstance(r.without_cls_finetune, list):
        for m in r.without_cls_finetune:
            if m not in r.methods:
                raise UsageError(f"run.without_cls_finetune: '{m}' is not one of run.methods ({', '.join(r.methods)})")
    for t in r.thresholds:
        if t not in THRESHOLDS:
            raise UsageError(f"run.thresholds: unknown '{t}' (choose from {', '.join(THRESHOLDS)})")
    if r.timing.host_memory == CACHED and not can_cache():  # checked here, not after hours of training
        raise UsageError("run.timing.host_memory: cached needs glibc's malloc (Linux); set it to system")
    if r.latency or _timed_while_pruning(cfg):
        _check_machine(r.timing)
    _check_teacher(cfg)


def _check_machine(timing: Timing) -> None:
    """``run.timing`` honoured by this machine (CUDA there when asked, ONNX Runtime on the CPU in float32)."""
    check_timing(timing, "run.timing.")
    try:
        latency_kw(timing)
        check_runtimes(setups_of(timing), timing.device, timing.dtype)
    except UsageError as e:
        raise UsageError(f"run.timing: {e}") from None


def runs_pretrain(cfg: Config) -> bool:
    """Whether a run starts with ``pretrain-cls``: with ``run.pretrain``, unless ``model.backbone_weights`` gives
    the backbone its pre-training already (ImageNet weights) or a teacher is the classification task (the
    teacher is the pre-trained net)."""
    return cfg.run.pretrain and not cfg.model.backbone_weights and not uses_teacher(cfg)


def _check_teacher(cfg: Config) -> None:
    """A teacher's classification task: the teacher and the image folders, checked before anything is written."""
    if not uses_teacher(cfg):
        return
    check_teacher(cfg, load_teacher(cfg), None)
    make_dataset(cfg, "cls", train=True)  # an empty or missing image folder is one line here


def run_stage(
    stage: str,
    cfg: Config,
    out: str | os.PathLike,
    init: str | None = None,
    env: DistEnv | None = None,
    progress: Say | None = None,
) -> dict[str, Any]:
    """Run, resume or reuse one training stage in ``out`` (``mtprune train``); returns its final metrics.
    ``progress`` receives the runner's ``[stage] running / reused`` line (default: none is printed, the
    stage's own progress bar and messages say it)."""
    if init is not None and Path(init).resolve().is_relative_to(Path(out).resolve()):
        raise UsageError(f"--out is the --init checkpoint or holds it ({out}): the stage would overwrite its input")
    env = env or setup(cfg.device)
    return execute(training(stage, cfg, out, env, init), env, progress or (lambda msg: None))


@contextlib.contextmanager
def _open_run(
    cfg: Config, out: str | os.PathLike, env: DistEnv | None, progress: Say | None
) -> Iterator[tuple[Path, DistEnv, Say]]:
    """Check the run section, then hold the run folder (its lock, rank 0) and write its ``config.yaml``;
    yields the folder, the process group and the progress callback."""
    check_run_config(cfg)
    out = Path(out)
    env = env or setup(cfg.device)
    with folder_lock(out) if env.is_main else contextlib.nullcontext():
        if env.is_main and not (out / "config.yaml").is_file():
            save_config(cfg, out / "config.yaml")
        yield out, env, progress or say_on_main(env)
        if env.is_main:  # a run refused by one of its stages keeps the config.yaml it had
            save_config(cfg, out / "config.yaml")


def run_pipeline(
    cfg: Config,
    out: str | os.PathLike,
    env: DistEnv | None = None,
    progress: Say | None = None,
    pretrained: str | os.PathLike | None = None,
    time_latency: bool = True,
) -> list[dict[str, Any]]:
    """Run Algorithm 1 for every configured method; returns the rows of ``results.json``.

    ``pretrained``: a finished ``pretrain-cls`` folder (or checkpoint) to start ``train-seg`` from
    instead of running ``pretrain-cls`` here (several seeds sharing one pre-trained backbone, as the
    paper's runs share one ImageNet model). ``time_latency=False``: the ``latency`` stage left for a later
    call (a seed's process of ``run --jobs``), the folder's config as given."""
    with _open_run(cfg, out, env, progress) as (out, env, say):
        return _pipeline(cfg, out, env, say, pretrained, time_latency)


def _pipeline(
    cfg: Config, out: Path, env: DistEnv, say: Say, pretrained: str | os.PathLike | None, time_latency: bool = True
) -> list[dict]:
    init = str(pretrained) if pretrained is not None else None
    if init is None and uses_teacher(cfg) and cfg.data.cls.teacher:
        init = cfg.data.cls.teacher  # the teacher is the net before segmentation training
    if init is None and runs_pretrain(cfg):
        execute(training(layout.PRETRAIN, cfg, out / layout.PRETRAIN, env), env, say)
        init = str(out / layout.PRETRAIN)
    dense_dir = out / layout.TRAIN_SEG
    execute(training(layout.TRAIN_SEG, cfg, dense_dir, env, init), env, say)
    dense = execute(evaluation(dense_dir, cfg, env, out / layout.EVAL_DENSE), env, say)
    rows = [_row(Variant(layout.DENSE, 0.0, layout.NO_THRESHOLDS, False), dense, dense, tag=layout.DENSE)]
    for sparse in sorted({METHODS[m].sparse_stage for m in cfg.run.methods if METHODS[m].sparse_stage}):
        execute(training(sparse, cfg, out / sparse, env, str(dense_dir)), env, say)
    extra, seg_epochs = finetune_budget(cfg, env.world_size)
    if cfg.run.equal_seg_steps:
        say(f"[budget] equal segmentation steps: fine-tuning steps {', '.join(f'{m} +{k}' for m, k in extra.items())}")
    for v in variants(cfg.run):
        v, metrics = _variant(v, cfg, out, env, say, seg_epochs.get(v.method))
        rows.append(_row(v, metrics, dense, extra[v.method]))
    if env.is_main:
        _add_overlaps(rows, out)
        _add_sparsity(rows, out)
    if env.is_main and cfg.run.latency and time_latency:
        _add_latency(rows, cfg, out, env, say)
    if env.is_main:
        write_json(out / layout.RESULTS_FILE, rows)
        say("[report] writing report.md and plots")
        write_report(out, cfg, rows)
    barrier(env)
    return rows


def _variant(
    v: Variant, cfg: Config, out: Path, env: DistEnv, say: Say, seg_epochs: float | None
) -> tuple[Variant, dict[str, Any]]:
    """Prune, fine-tune and evaluate one variant; the variant with its ratio (found for a target) and its
    eval metrics."""
    pruned = out / layout.prune_dir(v.tag)
    if env.is_main:
        src = out / layout.source_dir(v.method)
        execute(pruning(src, v.method, v.budget, v.thresholds, cfg, pruned), env, say)
    barrier(env)
    v = replace(v, ratio=float(read_json(pruned / PLAN_FILE)["ratio"]))
    ft_cfg = deepcopy(cfg)
    if not v.cls_finetune:
        ft_cfg.finetune.cls_epochs = 0
    if seg_epochs is not None:
        ft_cfg.finetune.seg_epochs = seg_epochs
    d = ft_cfg.finetune.distill
    if (d.weight > 0 or ft_cfg.finetune.rescale_gamma) and not d.teacher:  # the dense net of this run
        d.teacher = str(out / layout.TRAIN_SEG)
    before: dict[str, Any] = {}
    if cfg.run.eval_pruned:  # the pruned net before fine-tuning: what the sparse stage and the cut left
        no_pictures = deepcopy(cfg)
        no_pictures.run.qualitative = 0
        m = execute(
            evaluation(pruned, no_pictures, env, out / layout.eval_dir(v.tag.removesuffix("-nocls") + "-pruned")),
            env,
            say,
        )
        before = {"miou_pruned": m.get("miou"), "top1_pruned": m.get("top1")}
    tuned = out / layout.finetune_dir(v.tag)
    execute(training("finetune", ft_cfg, tuned, env, str(pruned)), env, say)
    return v, {**execute(evaluation(tuned, cfg, env, out / layout.eval_dir(v.tag)), env, say), **before}


def _add_overlaps(rows: list[dict[str, Any]], out: Path) -> None:
    """``plan_overlap`` of every pruned row: the Jaccard overlap of its kept channels with those of every
    other row at the same ratio or target (per part and ``all``); 1.0 when they prune the same channels."""
    pruned = [r for r in rows if r["method"] != layout.DENSE]
    plans = {r["tag"]: read_json(out / layout.prune_dir(r["tag"]) / PLAN_FILE) for r in pruned}
    for r in pruned:
        others = [o for o in pruned if layout.budget_key(o) == layout.budget_key(r) and o["tag"] != r["tag"]]
        r["plan_overlap"] = {o["tag"]: plan_overlap(plans[r["tag"]], plans[o["tag"]]) for o in others}


def _add_sparsity(rows: list[dict[str, Any]], out: Path) -> None:
    """``sparsity`` of every row whose method has a sparse stage: the fraction of each part's prunable γ that
    stage left below ``run.sparsity_threshold`` × the part's 95th percentile (its ``done.json``)."""
    for r in rows:
        stage = METHODS[r["method"]].sparse_stage if r["method"] in METHODS else None
        done = out / stage / "done.json" if stage else None
        if done is not None and done.is_file():
            metrics = read_json(done).get("metrics", {})
            r["sparsity"] = {k.removeprefix("sparse_"): v for k, v in metrics.items() if k.startswith("sparse_")}


def _add_latency(rows: list[dict[str, Any]], cfg: Config, out: Path, env: DistEnv, say: Say) -> None:
    """Time every row's model against the dense one (the latency stage) and add its figures to the rows."""
    sources = {r["tag"]: out / layout.model_dir(r["tag"]) for r in rows}
    lat = execute(latency(sources, cfg, out / layout.LATENCY), env, say)
    for r in rows:
        t = lat[r["tag"]]
        r.update(latency_ms=t["latency_ms"], latency_iqr_ms=t["latency_iqr_ms"], latency_ratio=t["ratio"])
        r.update(latency_setup=t.get("setup"), latency_size=list(timing_size(cfg)))


def _row(
    v: Variant, m: dict[str, Any], dense: dict[str, Any], extra_seg_steps: int = 0, tag: str | None = None
) -> dict[str, Any]:
    def ratio(key: str) -> float | None:
        a, b = m.get(key), dense.get(key)
        return a / b if a is not None and b else None

    return {
        "method": v.method,
        "ratio": v.ratio,
        "target": dict([v.target]) if v.target else None,
        "thresholds": v.thresholds,
        "cls_finetune": v.cls_finetune,
        "tag": tag or v.tag,
        "extra_seg_steps": extra_seg_steps,
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
        **{k: m[k] for k in ("miou_pruned", "top1_pruned") if k in m},
    }


def run_seeds(
    cfg: Config,
    out: str | os.PathLike,
    seeds: list[int],
    env: DistEnv | None = None,
    progress: Say | None = None,
    jobs: int = 1,
) -> dict[str, Any]:
    """The run once per seed in ``out/seed-<k>/``, then ``out/summary.{json,md}``: mean ± std of every
    model and the paired per-seed differences (:mod:`mtprune.report.seeds`).

    With ``run.pretrain`` and ``run.shared_pretrain`` (the default), ``pretrain-cls`` runs once, in
    ``out/pretrain-cls/`` with the first seed, and every seed starts from it; the seeds then differ in
    everything after it. Finished seeds and stages are reused, so the command resumes like ``run``.

    ``jobs`` > 1: up to that many seeds at once, each in its own process with its share of torch's threads
    and its output in ``out/seed-<k>/run.log`` (:mod:`mtprune.pipeline.parallel`); the latency stages then
    run one seed after another, with nothing else running. A seed's last bits can differ from a
    one-at-a-time run's (fewer threads sum in another order); a rerun with the same ``jobs`` is identical."""
    if not seeds:
        raise UsageError("run_seeds: no seeds given")
    if len(set(seeds)) != len(seeds):
        raise UsageError(f"seeds repeat: {seeds}")
    if jobs < 1:
        raise UsageError(f"--jobs must be ≥ 1, got {jobs}")
    _check_jobs(cfg, jobs)
    with _open_run(cfg, out, env, progress) as (out, env, say):
        if jobs > 1 and env.world_size > 1:
            raise UsageError("--jobs runs seeds as processes of one machine: under torchrun run them one at a time")
        return _seeds(cfg, out, seeds, env, say, progress, jobs)


def _seed_stages(cfg: Config, seed: int, out: Path, pretrained: Path | None, state: ProcessState) -> None:
    """One seed's stages in a process of its own (``jobs`` > 1), without the latency stage: timing waits
    until no seed trains beside it. ``state``: the starting process's threads share, deterministic mode and
    consent to a checkpoint's code."""
    torch.set_num_threads(state.threads)
    torch.use_deterministic_algorithms(state.deterministic, warn_only=True)
    adopt_consent(state.consent)
    c = deepcopy(cfg)
    c.seed = seed
    seed_everything(seed)
    run_pipeline(c, out, pretrained=pretrained, time_latency=False)


@dataclass(frozen=True)
class ProcessState:
    """What a seed's process takes over from the command's (``jobs`` > 1)."""

    threads: int
    deterministic: bool
    consent: Consent


def _timed_while_pruning(cfg: Config) -> str | None:
    """What makes the run's prune stages time nets (``run.round_to: auto``, a latency target), or None."""
    if cfg.run.round_to == "auto":
        return "run.round_to: auto"
    return next((f"the latency target {t}" for t in cfg.run.targets if "latency" in t), None)


def _check_jobs(cfg: Config, jobs: int) -> None:
    """Seeds at once train beside each other: a run that times while it prunes cannot (one line)."""
    why = _timed_while_pruning(cfg)
    if jobs > 1 and why:
        raise UsageError(
            f"--jobs {jobs}: {why} times nets while pruning, which needs a quiet machine: run the seeds one at a time"
        )


def _seeds(
    cfg: Config, out: Path, seeds: list[int], env: DistEnv, say: Say, progress: Say | None, jobs: int = 1
) -> dict[str, Any]:
    pretrained = None
    if runs_pretrain(cfg) and cfg.run.shared_pretrain:
        first = deepcopy(cfg)
        first.seed = seeds[0]
        shared = training(layout.PRETRAIN, first, out / layout.PRETRAIN, env)
        shared.note = f"(shared by seeds {', '.join(map(str, seeds))})"
        execute(shared, env, say)
        pretrained = out / layout.PRETRAIN
    if jobs > 1 and len(seeds) > 1:
        jobs = min(jobs, len(seeds))
        threads = threads_per_job(torch.get_num_threads(), jobs)
        state = ProcessState(threads, torch.are_deterministic_algorithms_enabled(), current_consent())
        dirs = {s: out / layout.seed_dir(s) for s in seeds}
        work = [Job(f"seed {s}", d / layout.SEED_LOG, (cfg, s, d, pretrained, state)) for s, d in dirs.items()]
        say(f"[seeds] {len(seeds)} seeds, {jobs} at a time, {threads} torch thread(s) each")
        run_processes(_seed_stages, work, jobs, say)
    per_seed: dict[int, list[dict[str, Any]]] = {}
    for s in seeds:  # after the processes: every stage reused, the latency stages timed one seed at a time
        c = deepcopy(cfg)
        c.seed = s
        say(f"== seed {s} ==")
        seed_everything(s)
        per_seed[s] = run_pipeline(c, out / layout.seed_dir(s), env=env, progress=progress, pretrained=pretrained)
    summary: dict[str, Any] = {}
    if env.is_main:
        title = f"mtprune run — {cfg.model.name}, {cfg.data.seg.dataset}, seeds {', '.join(map(str, seeds))}"
        summary = write_seeds_summary(out, per_seed, title)
    barrier(env)
    return summary


def run_command(cfg: Config, out: str | os.PathLike, seeds: list[int] | None = None, jobs: int = 1) -> Any:
    """``mtprune run``: one run (``results.json`` rows), or with ``seeds`` (or ``run.seeds``) one run per
    seed and their summary (``jobs`` seeds at once: :func:`run_seeds`)."""
    torch.use_deterministic_algorithms(True, warn_only=True)
    seeds = list(seeds) if seeds else list(cfg.run.seeds)
    if seeds:
        return run_seeds(cfg, out, seeds, jobs=jobs)
    if jobs != 1:
        raise UsageError("--jobs runs several seeds at once: give --seeds (or run.seeds)")
    seed_everything(cfg.seed)
    return run_pipeline(cfg, out)
