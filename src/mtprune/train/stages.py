"""The supervised stages — ``pretrain-cls`` (Eq. 1), ``train-seg`` (Eq. 2), ``sparse-slimming`` (Eq. 3
on N2) and ``finetune`` — as sequences of single-task phases on the shared engine."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from mtprune.config import Config
from mtprune.data.from_config import make_dataset
from mtprune.errors import UsageError
from mtprune.method import l1_penalty, soft_threshold_
from mtprune.models.base import SegmentationModel
from mtprune.train.distributed import DistEnv, autocast
from mtprune.train.engine import (
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
    set_train_mode,
    sgd,
    steps_for,
    sync_buffers,
    to_device,
    wrap_ddp,
)
from mtprune.train.streams import BatchStream


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
                for g in ph.opt.param_groups:
                    g["lr"] = lr
                x, y = to_device(next(ph.stream), cfg, env)
                with autocast(env.device, cfg.optim.amp):
                    out = ph.net(x)
                loss = seg_loss(out, y, ph.aux_weight) if ph.task == "seg" else F.cross_entropy(out.float(), y)
                run.check_finite(loss, ph.name)
                objective = loss
                if ph.gammas and ph.l1 == "subgradient":
                    objective = loss + l1_penalty(ph.gammas, ph.alpha)  # Eq. 3: gradient += α·sign(γ)
                ph.opt.zero_grad(set_to_none=True)
                objective.backward()
                clip(ph.net.parameters(), cfg)
                ph.opt.step()
                if ph.gammas and ph.l1 == "proximal":
                    soft_threshold_(ph.gammas, lr * ph.alpha)
                run.after_step({"phase": ph.name, "loss": float(loss.detach()), "lr": lr})
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


def _seg_phase(
    name: str,
    model: SegmentationModel,
    cfg: Config,
    env: DistEnv,
    dataset: Any,
    epochs: float,
    lr: float,
    batch_size: int,
    schedule: str,
    aux_weight: float,
    **kw: Any,
) -> Phase:
    stream = BatchStream(dataset, batch_size, cfg.seed, env, cfg.data.workers)
    net = wrap_ddp(SegNet(model), env)
    opt = sgd(list(model.backbone.parameters()) + list(model.decoder.parameters()), lr, cfg)
    return Phase(name, "seg", net, opt, stream, steps_for(epochs, stream), lr, schedule, aux_weight, **kw)


def _cls_phase(
    name: str,
    model: SegmentationModel,
    cfg: Config,
    env: DistEnv,
    dataset: Any,
    epochs: float,
    lr: float,
    batch_size: int,
    schedule: str = "linear",
) -> Phase:
    stream = BatchStream(dataset, batch_size, cfg.seed + 1, env, cfg.data.workers)
    net = wrap_ddp(ClsNet(model.backbone, model.cls_head), env)
    opt = sgd(list(model.backbone.parameters()) + list(model.cls_head.parameters()), lr, cfg)
    return Phase(name, "cls", net, opt, stream, steps_for(epochs, stream), lr, schedule)


def run_supervised(
    stage: str, cfg: Config, out: Path, env: DistEnv, init: str | None, evaluate: Evaluator = no_evaluation
) -> dict[str, Any]:
    """``pretrain-cls``, ``train-seg``, ``sparse-slimming`` or ``finetune`` in folder ``out``; ``evaluate``
    validates the model per epoch (``eval.every_epoch``) and at the end."""
    if stage == "finetune" and not init:
        raise UsageError("finetune needs --init DIR: the pruned checkpoint to fine-tune")
    seg_ds, cls_ds = make_dataset(cfg, "seg", True), make_dataset(cfg, "cls", True)  # built once per stage
    model = place_model(initial_model(cfg, init, seg_ds.num_classes, cls_ds.num_classes), cfg, env)
    convert_sync_bn([model.backbone, model.decoder], cfg, env)
    run = StageRun(stage, cfg, out, env)
    if stage == "pretrain-cls":
        c = cfg.pretrain_cls
        phases = [_cls_phase("cls", model, cfg, env, cls_ds, c.epochs, c.lr, c.batch_size, c.schedule)]
        tasks: tuple[str, ...] = ("cls",)
    elif stage == "train-seg":
        c2 = cfg.train_seg
        phases = [
            _seg_phase("seg", model, cfg, env, seg_ds, c2.epochs, c2.lr, c2.batch_size, c2.schedule, c2.aux_weight)
        ]
        tasks = ("seg",)
    elif stage == "sparse-slimming":
        c3 = cfg.sparse_slimming
        phases = [
            _seg_phase(
                "seg",
                model,
                cfg,
                env,
                seg_ds,
                c3.epochs,
                c3.lr,
                c3.batch_size,
                c3.schedule,
                c3.aux_weight,
                gammas=prunable_gammas(model),
                alpha=c3.alpha,
                l1=c3.l1,
            )
        ]
        tasks = ("seg",)
    elif stage == "finetune":
        c4 = cfg.finetune
        phases = []
        if c4.cls_epochs > 0:
            phases.append(_cls_phase("cls", model, cfg, env, cls_ds, c4.cls_epochs, c4.lr_cls, c4.cls_batch_size))
        if c4.seg_epochs > 0:
            phases.append(
                _seg_phase(
                    "seg", model, cfg, env, seg_ds, c4.seg_epochs, c4.lr_seg, c4.seg_batch_size, "poly", c4.aux_weight
                )
            )
        tasks = ("seg", "cls")
    else:
        raise UsageError(f"unknown stage '{stage}'")
    run.modules = {"model": model}
    run.optimizers = {p.name: p.opt for p in phases}
    run.streams = {p.name: p.stream for p in phases}
    run_phases(run, phases, cfg, env, evaluate)
    sync_buffers(model, env)
    return run.finish(model, evaluate(model, cfg, env, tasks, False), meta={"init": init})
