"""The supervised stages — ``pretrain-cls`` (Eq. 1), ``train-seg`` (Eq. 2), ``sparse-slimming`` (Eq. 3
on N2) and ``finetune`` — as sequences of single-task phases on the shared engine."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from mtprune.config import Config
from mtprune.data.from_config import make_dataset
from mtprune.errors import UsageError
from mtprune.method import soft_threshold_, sparsity_penalty
from mtprune.method.sparsity import budget_alpha, l1_shrink, median_abs
from mtprune.models.base import BACKBONE, DECODER, SegmentationModel
from mtprune.train.diagnostics import report_sparsity, shrink_check
from mtprune.train.distill import Distiller, distiller, rescale_before_finetune
from mtprune.train.distributed import DistEnv, autocast
from mtprune.train.engine import (
    STAGE_TASKS,
    ClsNet,
    Evaluator,
    SegNet,
    StageRun,
    clip,
    convert_sync_bn,
    initial_model,
    lr_at,
    no_evaluation,
    place_model,
    prunable_gammas,
    seg_loss,
    set_lr,
    set_train_mode,
    sgd,
    steps_for,
    sync_buffers,
    to_device,
    training_stream,
    warn_crop,
    wrap_ddp,
)
from mtprune.train.streams import BatchStream
from mtprune.train.teacher import ClsTask, cls_task, uses_teacher


@dataclass
class Phase:
    """``steps`` SGD steps of one task on one network."""

    name: str
    task: str  # "cls" | "seg"
    net: nn.Module
    opt: torch.optim.Optimizer
    stream: BatchStream
    steps: int
    lr: float
    schedule: str
    aux_weight: float = 0.4
    gammas: list[nn.Parameter] = field(default_factory=list)  # ℓ1-regularised BN scales (slimming)
    alpha: float = 0.0
    l1: str = "subgradient"
    gamma_lr: float = 1.0  # the γ's learning rate, as a multiple of ``lr``
    t: float = 1.2  # l1 "polarization": the weight of ‖γ‖₁ against ‖γ − γ̄‖₁
    distill: Distiller | None = None  # a seg phase's distillation from the dense net (fine-tuning)
    cls: ClsTask = field(default_factory=ClsTask)  # a cls phase's loss: labels or a teacher's outputs


def run_phases(run: StageRun, phases: list[Phase], cfg: Config, env: DistEnv, evaluate: Evaluator) -> None:
    """The training loop: each phase's steps in turn, resumable at any step."""
    run.total = sum(p.steps for p in phases)
    run.start()
    try:
        offset = 0
        for ph in phases:
            set_train_mode(ph.net, cfg)
            while run.step < offset + ph.steps:
                i = run.step - offset
                lr = lr_at(ph.schedule, ph.lr, i, ph.steps)
                set_lr(ph.opt, lr)
                batch = next(ph.stream)
                x, y = to_device(run.seg_batch(batch) if ph.task == "seg" else batch, cfg, env)
                with autocast(env.device, cfg.optim.amp):
                    out = ph.net(x)
                loss = seg_loss(out, y, ph.aux_weight) if ph.task == "seg" else ph.cls.loss(out, x, y)
                run.check_finite(loss, ph.name)
                objective = loss
                if ph.gammas and ph.l1 in ("subgradient", "polarization"):  # Eq. 3: gradient += α·sign(γ)
                    objective = loss + sparsity_penalty(ph.gammas, ph.alpha, ph.t if ph.l1 == "polarization" else None)
                if ph.distill is not None:  # fine-tuning: the dense net's logits on the same batch
                    objective = objective + ph.distill.loss(out["out"], x)
                ph.opt.zero_grad(set_to_none=True)
                objective.backward()
                clip(ph.net.parameters(), cfg)
                ph.opt.step()
                if ph.gammas and ph.l1 == "proximal":
                    soft_threshold_(ph.gammas, lr * ph.gamma_lr * ph.alpha)
                record = {"phase": ph.name, "loss": float(loss.detach()), "lr": lr}
                run.after_step(record | ({"teacher_ms": round(ph.distill.ms, 3)} if ph.distill else {}))
                if ph.task == "seg" and cfg.eval.every_epoch and (i + 1) % ph.stream.steps_per_epoch == 0:
                    epoch_eval(run, ph, cfg, env, evaluate, (i + 1) / ph.stream.steps_per_epoch)
            offset += ph.steps
    finally:
        run.close_progress()


def epoch_eval(run: StageRun, ph: Phase, cfg: Config, env: DistEnv, evaluate: Evaluator, epoch: float) -> None:
    """Validation mIoU after a segmentation epoch, logged as ``{"epoch", "val_miou"}`` (Fig. 4)."""
    model = ph.net.module._model if hasattr(ph.net, "module") else ph.net._model
    sync_buffers(model, env)
    r = evaluate(model, cfg, env, ("seg",), True)
    run.log({"step": run.step, "epoch": epoch, "phase": ph.name, "val_miou": r["miou"]})
    set_train_mode(ph.net, cfg)
    run.restart_clock()  # the evaluation is not training time


def _phase(
    task: str,
    model: SegmentationModel,
    cfg: Config,
    env: DistEnv,
    dataset: Any,
    section: str,
    epochs: str = "epochs",
    lr: str = "lr",
    batch: str = "batch_size",
    **kw: Any,
) -> Phase:
    """A ``task`` phase ("seg": backbone + decoder, "cls": backbone + classification head) whose settings are
    the keys ``epochs``, ``lr``, ``batch`` (and ``schedule``, ``aux_weight`` where the section has them) of
    config section ``section``."""
    c = getattr(cfg, section)
    seed = cfg.seed if task == "seg" else cfg.seed + 1
    stream = training_stream(dataset, getattr(c, batch), seed, cfg, env, f"{section}.{batch}")
    head = model.decoder if task == "seg" else model.cls_head
    ct = cls_task(cfg, model, env.device) if task == "cls" else ClsTask()
    net = wrap_ddp(SegNet(model) if task == "seg" else ClsNet(model.backbone, model.cls_head, ct.output), env)
    gam = kw.get("gammas", ())
    params = list(model.backbone.parameters()) + list(head.parameters())
    opt = sgd(params, getattr(c, lr), cfg, gam, kw.get("gamma_lr", 1.0))
    schedule = getattr(c, "schedule", "poly" if task == "seg" else "linear")
    aux = getattr(c, "aux_weight", 0.4)
    steps = steps_for(getattr(c, epochs), stream)
    return Phase(task, task, net, opt, stream, steps, getattr(c, lr), schedule, aux, cls=ct, **kw)


def _stage_phases(
    stage: str, model: SegmentationModel, cfg: Config, env: DistEnv, seg_ds: Any, cls_ds: Any
) -> list[Phase]:
    """The phases of a supervised stage."""
    if stage == "pretrain-cls":
        return [_phase("cls", model, cfg, env, cls_ds, "pretrain_cls")]
    if stage == "train-seg":
        return [_phase("seg", model, cfg, env, seg_ds, "train_seg")]
    if stage == "sparse-slimming":
        c = cfg.sparse_slimming
        l1 = {"gammas": prunable_gammas(model), "alpha": c.alpha, "l1": c.l1, "gamma_lr": c.gamma_lr, "t": c.t}
        ph = _phase("seg", model, cfg, env, seg_ds, "sparse_slimming", **l1)
        if c.l1_budget is not None:  # one α, as Network Slimming's, from the median of all prunable |γ|
            ph.alpha = budget_alpha(c.l1_budget, median_abs(ph.gammas), _phase_shrink(ph, cfg, 1.0))
        return [ph]
    if stage == "finetune":
        f, phases = cfg.finetune, []
        if f.cls_epochs > 0:
            phases.append(_phase("cls", model, cfg, env, cls_ds, "finetune", "cls_epochs", "lr_cls", "cls_batch_size"))
        if f.seg_epochs > 0:
            seg = _phase("seg", model, cfg, env, seg_ds, "finetune", "seg_epochs", "lr_seg", "seg_batch_size")
            seg.distill = distiller(cfg, model, env.device)
            phases.append(seg)
        return phases
    raise UsageError(f"unknown stage '{stage}'")


def run_supervised(
    stage: str, cfg: Config, out: Path, env: DistEnv, init: str | None, evaluate: Evaluator = no_evaluation
) -> dict[str, Any]:
    """``pretrain-cls``, ``train-seg``, ``sparse-slimming`` or ``finetune`` in folder ``out``; ``evaluate``
    validates the model per epoch (``eval.every_epoch``) and at the end."""
    if stage == "finetune" and not init:
        raise UsageError("finetune needs --init DIR: the pruned checkpoint to fine-tune")
    if stage == "pretrain-cls" and uses_teacher(cfg):
        raise UsageError(
            "pretrain-cls trains on labels, and data.cls.dataset teacher has none (the teacher's weights are the "
            "pre-training: run.pretrain false)"
        )
    seg_ds, cls_ds = make_dataset(cfg, "seg", True), make_dataset(cfg, "cls", True)  # built once per stage
    if stage != "pretrain-cls":
        warn_crop(seg_ds, cfg, env)
    model = place_model(initial_model(cfg, init, seg_ds.num_classes, cls_ds.num_classes), cfg, env)
    model.prunable_layers()  # traced (and kept) before SyncBatchNorm replaces the BNs the trace looks for
    rescaled = rescale_before_finetune(cfg, model) if stage == "finetune" else {}  # (a resume restores after)
    convert_sync_bn([model.backbone, model.decoder], cfg, env)
    run = StageRun(stage, cfg, out, env)
    phases = _stage_phases(stage, model, cfg, env, seg_ds, cls_ds)
    run.modules = {"model": model}
    run.optimizers = {p.name: p.opt for p in phases}
    run.streams = {p.name: p.stream for p in phases}
    before = _gamma_parts(model, clone=True)  # the γ the stage starts from (before any resume)
    start = _slimming_shrink(phases[0], before, cfg) if stage == "sparse-slimming" and env.is_main else {}
    run_phases(run, phases, cfg, env, evaluate)
    sync_buffers(model, env)
    metrics = evaluate(model, cfg, env, STAGE_TASKS[stage], False)
    if stage == "sparse-slimming" and env.is_main:
        metrics = {**report_sparsity(stage, before, _gamma_parts(model), cfg, SLIMMING_ALPHA, start), **metrics}
    metrics.update(_finetune_extras(phases, rescaled) if stage == "finetune" else {})
    return run.finish(model, metrics, meta={"init": init})


def _finetune_extras(phases: list[Phase], rescaled: dict[str, float]) -> dict[str, Any]:
    """What fine-tuning took from the dense net: the layers rescaled, the teacher's time per step."""
    out: dict[str, Any] = {"rescaled_layers": len(rescaled)} if rescaled else {}
    d = next((p.distill for p in phases if p.distill is not None), None)
    if d is not None and d.steps:
        out["distill_teacher_ms_per_step"] = d.total_ms / d.steps
    return out


#: the ℓ1 weight of Network Slimming's γ (both parts), named in the sparsity warning
SLIMMING_ALPHA = {BACKBONE: "sparse_slimming.alpha", DECODER: "sparse_slimming.alpha"}


def _phase_shrink(ph: Phase, cfg: Config, alpha: float) -> float:
    """The ℓ1 shrink budget of phase ``ph`` with ``alpha`` (:func:`~mtprune.method.sparsity.l1_shrink`)."""
    lrs = [lr_at(ph.schedule, ph.lr, i, ph.steps) for i in range(ph.steps)]
    return l1_shrink(alpha, lrs, ph.l1, cfg.optim.momentum, ph.gamma_lr)


def _slimming_shrink(ph: Phase, before: dict[str, list[torch.Tensor]], cfg: Config) -> dict[str, Any]:
    """:func:`shrink_check` of Network Slimming's one phase (the same α on both parts)."""
    budget = _phase_shrink(ph, cfg, ph.alpha)
    shrink = {BACKBONE: budget, DECODER: budget}
    out = shrink_check("sparse-slimming", before, shrink, cfg, SLIMMING_ALPHA, cfg.sparse_slimming.l1_budget)
    return {**out, "l1_alpha": {BACKBONE: ph.alpha, DECODER: ph.alpha}}


def _gamma_parts(model: SegmentationModel, clone: bool = False) -> dict[str, list[torch.Tensor]]:
    parts = {part: prunable_gammas(model, part) for part in (BACKBONE, DECODER)}
    return {p: [g.detach().clone() for g in gs] if clone else list(gs) for p, gs in parts.items()}
