"""One training engine for every stage: the loop, schedules, AMP, checkpoints, logs, resume.

A stage is a list of *phases* (or, for MTP, the ALM rounds of :mod:`mtprune.train.mtp`), each a number
of SGD steps on one task. :class:`StageRun` owns what every stage shares: the output folder, the
resolved config, the resumable state (``state.safetensors``), the JSON-lines metrics, the progress bar,
the NaN check, and the final export (``model/``, ``done.json``). Rerunning the same command on the
same folder resumes from the last checkpoint; a finished stage is not run again.
"""

from __future__ import annotations

import json
import math
import sys
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

import mtprune.train.state as st
from mtprune import interrupt
from mtprune.checkpoint import load_model, save_model
from mtprune.config import Config, save_config
from mtprune.data import IGNORE_INDEX, SkipBadSamples
from mtprune.data.check import crop_warning
from mtprune.errors import MtpruneError, UsageError, WriteError
from mtprune.io import append_line, ensure_dir, read_lines, sweep_temp_files, write_json, write_text
from mtprune.models import build_model
from mtprune.models.base import SegmentationModel, last_feature
from mtprune.models.specs import is_spec
from mtprune.train.distributed import DistEnv, barrier
from mtprune.train.progress import Progress
from mtprune.train.speed import SpeedMeter
from mtprune.train.streams import BatchStream

#: the validation sets each stage's final evaluation measures (segmentation mIoU, classification top-1/5)
STAGE_TASKS: dict[str, tuple[str, ...]] = {
    "pretrain-cls": ("cls",),
    "train-seg": ("seg",),
    "sparse-mtp": ("seg", "cls"),
    "sparse-slimming": ("seg",),
    "finetune": ("seg", "cls"),
}
STATE_FILE = "state.safetensors"
METRICS_FILE = "metrics.jsonl"
DONE_FILE = "done.json"


# --- schedules and losses ----------------------------------------------------------------------
def lr_at(schedule: str, base_lr: float, it: int, total: int) -> float:
    """Learning rate at iteration ``it`` of ``total``: ``poly`` ``lr·(1 − it/total)^0.9`` (segmentation),
    ``linear`` ``lr·(1 − it/total)`` (classification), or ``constant``."""
    frac = min(max(it / max(total, 1), 0.0), 1.0)
    if schedule == "poly":
        return base_lr * (1.0 - frac) ** 0.9
    if schedule == "linear":
        return base_lr * (1.0 - frac)
    if schedule == "constant":
        return base_lr
    raise UsageError(f"unknown lr schedule '{schedule}' (poly, linear, constant)")


def seg_loss(outputs: dict[str, Any], target: torch.Tensor, aux_weight: float) -> torch.Tensor:
    """Cross-entropy (ignore 255) on the main logits + ``aux_weight`` × each auxiliary head's; a batch without
    a labelled pixel contributes 0 (not the NaN of a mean over nothing)."""
    valid = (target != IGNORE_INDEX).sum().clamp_min(1)  # no host sync: the mean is the sum over the count

    def ce(logits: torch.Tensor) -> torch.Tensor:
        return F.cross_entropy(logits.float(), target, ignore_index=IGNORE_INDEX, reduction="sum") / valid

    loss = ce(outputs["out"])
    for aux in outputs.get("aux", []):
        loss = loss + aux_weight * ce(aux)
    return loss


def has_labels(batch: Any) -> bool:
    """Whether a segmentation batch (still on the CPU: no device sync) has a labelled pixel."""
    return bool((batch[1] != IGNORE_INDEX).any())


class SegNet(nn.Module):
    """backbone + decoder of a model as one module (what DDP wraps for a segmentation step)."""

    def __init__(self, model: SegmentationModel) -> None:
        super().__init__()
        self.backbone, self.decoder = model.backbone, model.decoder
        object.__setattr__(self, "_model", model)  # not a submodule: its cls_head is not trained here

    def forward(self, x: torch.Tensor) -> dict[str, Any]:
        return self._model.seg_outputs(x, aux=True)


class ClsNet(nn.Module):
    """A backbone + a classification head as one module: the classification net N1. ``output``: what it
    returns, the head's ``logits`` or the backbone's last ``features`` (a teacher's feature target)."""

    def __init__(self, backbone: nn.Module, cls_head: nn.Module, output: str = "logits") -> None:
        super().__init__()
        self.backbone, self.cls_head, self.output = backbone, cls_head, output

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        features = last_feature(self.backbone(x))
        return features if self.output == "features" else self.cls_head(features)


def set_train_mode(module: nn.Module, cfg: Config) -> None:
    """Training mode; with ``optim.freeze_bn_stats`` BatchNorm layers stay in eval mode (they normalise
    with, and do not update, their running statistics; γ and β are still trained). Under DDP on CPU,
    where SyncBatchNorm is not available, this makes N processes compute what one process computes."""
    module.train()
    if cfg.optim.freeze_bn_stats:
        for m in module.modules():
            if isinstance(m, nn.modules.batchnorm._BatchNorm):
                m.eval()


def convert_sync_bn(modules: Iterable[nn.Module], cfg: Config, env: DistEnv) -> None:
    """With ``optim.sync_bn`` under DDP, replace every BatchNorm2d of ``modules`` (in place) by SyncBatchNorm."""
    if not (cfg.optim.sync_bn and env.distributed):
        return
    if env.device.type != "cuda":
        raise UsageError("optim.sync_bn needs CUDA (SyncBatchNorm is CUDA-only); on CPU use optim.freeze_bn_stats")
    for m in modules:
        for name, child in list(m.named_children()):
            setattr(m, name, nn.SyncBatchNorm.convert_sync_batchnorm(child))


def revert_sync_bn(module: nn.Module) -> nn.Module:
    """Replace every SyncBatchNorm of ``module`` (in place) by an equal BatchNorm2d, for export."""
    for name, child in list(module.named_children()):
        if isinstance(child, nn.SyncBatchNorm):
            bn = nn.BatchNorm2d(child.num_features, child.eps, child.momentum, child.affine, child.track_running_stats)
            bn.load_state_dict(child.state_dict())
            bn.to(child.weight.device if child.weight is not None else "cpu")
            bn.train(child.training)
            setattr(module, name, bn)
        else:
            revert_sync_bn(child)
    return module


@torch.no_grad()
def sync_buffers(module: nn.Module, env: DistEnv) -> None:
    """Broadcast rank 0's buffers (BN running statistics, which each rank updates on its own batches)."""
    if env.distributed:
        for b in module.buffers():
            torch.distributed.broadcast(b, src=0)


def wrap_ddp(module: nn.Module, env: DistEnv) -> nn.Module:
    if not env.distributed:
        return module
    ids = [env.device.index] if env.device.type == "cuda" else None
    return nn.parallel.DistributedDataParallel(module, device_ids=ids)


def sgd(
    params: Iterable[nn.Parameter], lr: float, cfg: Config, gammas: Iterable[nn.Parameter] = (), gamma_lr: float = 1.0
) -> torch.optim.SGD:
    """SGD with the config's momentum and weight decay; ``gammas`` (ℓ1-regularised BN scales among
    ``params``) learn at ``gamma_lr`` × the rate :func:`set_lr` gives the others."""
    params, ids = list(params), {id(g) for g in gammas}
    groups = [{"params": [p for p in params if id(p) not in ids], "lr_scale": 1.0}]
    if ids:
        groups.append({"params": [p for p in params if id(p) in ids], "lr_scale": float(gamma_lr)})
    return torch.optim.SGD(groups, lr=lr, momentum=cfg.optim.momentum, weight_decay=cfg.optim.weight_decay)


def set_lr(opt: torch.optim.Optimizer, lr: float) -> None:
    """The step's learning rate ``lr`` on every parameter group, times the group's ``lr_scale``."""
    for g in opt.param_groups:
        g["lr"] = lr * g.get("lr_scale", 1.0)


def prunable_gammas(model: SegmentationModel, part: str | None = None) -> list[nn.Parameter]:
    """BN scales γ of the prunable layers (of one part): the parameters the ℓ1 terms act on."""
    layers = [lay for lay in model.prunable_layers() if part in (None, lay.part)]
    return [model.get_submodule(name).weight for lay in layers for name in lay.scored]


#: how a stage validates its model: ``evaluate(model, cfg, env, tasks, force)`` → metrics (``miou``,
#: ``per_class``, ``top1`` …). Training sits below evaluation in the layers, so the stage runner passes
#: :func:`mtprune.evaluate.validation.final_metrics` in; ``force`` evaluates even without ``eval.final``.
Evaluator = Callable[[SegmentationModel, Config, DistEnv, tuple[str, ...], bool], dict[str, Any]]


def no_evaluation(model: SegmentationModel, cfg: Config, env: DistEnv, tasks: tuple[str, ...], force: bool) -> dict:
    """The :data:`Evaluator` of a stage run without validation data: no metrics."""
    return {}


# --- the model a stage starts from ---------------------------------------------------------------
def initial_model(cfg: Config, init: str | None, seg_classes: int | None, cls_classes: int | None) -> SegmentationModel:
    """The stage's starting model: ``init`` (a checkpoint or stage folder) or a fresh ``cfg.model``."""
    if init:
        model = load_model(init)
        if seg_classes is not None and model.num_classes != seg_classes:
            raise UsageError(
                f"{init}: the model has {model.num_classes} segmentation classes, the dataset {seg_classes}"
            )
        if cls_classes is not None and model.cls_classes != cls_classes:
            raise UsageError(
                f"{init}: the model's classification head has {model.cls_classes} classes, the dataset {cls_classes}"
            )
        return model
    m = cfg.model
    for key, given, data in (("num_classes", m.num_classes, seg_classes), ("cls_classes", m.cls_classes, cls_classes)):
        if given is not None and data is not None and given != data:
            which = "segmentation" if key == "num_classes" else "classification"
            raise UsageError(f"model.{key}: {given}, but the {which} dataset has {data} classes (leave it unset)")
    nc = m.num_classes or seg_classes
    cc = m.cls_classes or cls_classes or (1000 if cfg.data.cls.dataset == "teacher" else None)  # a teacher's: ImageNet
    if nc is None or cc is None:
        raise UsageError("model.num_classes and model.cls_classes are needed (or the datasets that give them)")
    if is_spec(m.name):  # model.width and backbone_weights belong to the built-in nets
        return build_model(m.name, nc, cc, model_args=m.model_args, parts=m.parts, coupled=m.coupled)
    return build_model(
        m.name, nc, cc, m.width, m.backbone_weights, model_args=m.model_args, parts=m.parts, coupled=m.coupled
    )


# --- the run --------------------------------------------------------------------------------------
@dataclass
class StageRun:
    """One stage run in folder ``out``: the step count, the JSON-lines log, the progress bar, the NaN check
    and the final export; resuming is its :class:`~mtprune.train.state.Checkpointer`'s (what to save:
    ``modules``, ``optimizers``, ``streams``, ``extra``), speed its :class:`~mtprune.train.speed.SpeedMeter`'s."""

    stage: str
    cfg: Config
    out: Path
    env: DistEnv
    modules: dict[str, nn.Module] = field(default_factory=dict)  # saved in the state, by prefix
    optimizers: dict[str, torch.optim.Optimizer] = field(default_factory=dict)
    streams: dict[str, BatchStream] = field(default_factory=dict)
    extra: st.Stateful | None = None  # e.g. the ALM state of sparse-mtp
    step: int = 0
    total: int = 0
    saved_step: int | None = None  # the step of the last checkpoint written or resumed from
    unlabelled: int = 0  # segmentation batches without a labelled pixel (they contributed 0), this process
    meter: SpeedMeter = field(init=False)
    _pbar: Any = None

    def __post_init__(self) -> None:
        self.meter = SpeedMeter(self.streams, self.env.world_size)

    @property
    def state_path(self) -> Path:
        return self.out / STATE_FILE

    @property
    def checkpointer(self) -> st.Checkpointer:
        return st.Checkpointer(self.state_path, self.stage, self.modules, self.optimizers, self.streams, self.extra)

    def log(self, record: dict[str, Any]) -> None:
        """Append one JSON line to ``metrics.jsonl`` (whole or not at all)."""
        if self.env.is_main:
            append_line(self.out / METRICS_FILE, json.dumps({"stage": self.stage, **record}))

    def start(self) -> None:
        """Write the resolved config (rank 0), resume from ``state.safetensors`` if present, open the bar."""
        self.meter = SpeedMeter(self.streams, self.env.world_size)
        if self.env.is_main:
            ensure_dir(self.out)
            save_config(self.cfg, self.out / "config.yaml")
        if self.env.is_main:
            swept = sweep_temp_files(self.out)
            if swept:
                print(
                    f"{self.stage}: removed {len(swept)} temp file(s) of an interrupted write in {self.out}",
                    file=sys.stderr,
                )
        barrier(self.env)
        if self.state_path.is_file():
            self.step = self.saved_step = self.checkpointer.restore()
            self._truncate_log()
            if self.env.is_main:
                print(f"resuming {self.stage} from step {self.step}/{self.total} ({self.state_path})", file=sys.stderr)
        else:
            # models are built with the same seed on every rank; from here on (dropout…) ranks differ
            torch.manual_seed(self.cfg.seed + 1_000 * self.env.rank)
            if self.env.is_main and (self.out / METRICS_FILE).exists():
                (self.out / METRICS_FILE).unlink()
        self._progress()

    def _truncate_log(self) -> None:
        """Drop the log lines written after the checkpoint resumed from, and any torn line."""
        path = self.out / METRICS_FILE
        if self.env.is_main and path.exists():
            records, torn = read_lines(path)
            if torn:
                print(f"{path}: dropped {torn} torn line(s) (an interrupted write)", file=sys.stderr)
            keep = [json.dumps(r) for r in records if r.get("step", 0) <= self.step]
            write_text(path, "".join(x + "\n" for x in keep))

    def save(self) -> None:
        """Checkpoint everything needed to resume (rank 0 writes; every rank waits). Only a state whose
        every tensor is finite is written; a failed write keeps the previous checkpoint."""
        if self.env.is_main:
            try:
                self.checkpointer.save(self.step, self.total)
            except (st.NonFiniteError, WriteError) as e:
                raise type(e)(f"{self.stage}: step {self.step}: {e}; {self._kept()}") from None
            self.saved_step = self.step
        barrier(self.env)

    def _kept(self) -> str:
        if self.saved_step is None or not self.state_path.is_file():
            return "no checkpoint was written before"
        return f"the checkpoint of step {self.saved_step} ({self.state_path}) is intact"

    def check_finite(self, loss: torch.Tensor, what: str) -> None:
        bad = torch.tensor(0.0 if torch.isfinite(loss.detach()).all() else 1.0, device=loss.device)
        if self.env.distributed:
            torch.distributed.all_reduce(bad)
        if bad.item() > 0:
            kept = f"; the last good checkpoint {self.state_path} is kept" if self.state_path.exists() else ""
            raise MtpruneError(f"{self.stage}: {what} loss is {loss.item()} at step {self.step}{kept}")

    def restart_clock(self) -> None:
        """Start timing the next step here (after a pause the step time must not count: evaluation)."""
        self.meter.restart()

    def _progress(self) -> None:
        self._pbar = Progress(self.total, self.step, self.stage, enabled=self.env.is_main)
        self.restart_clock()

    def close_progress(self) -> None:
        """Close the bar (before an error message is printed, so the bar does not redraw after it)."""
        if self._pbar is not None:
            self._pbar.close()
            self._pbar = None

    def after_step(self, record: dict[str, Any]) -> None:
        """Count the step, show it, log every ``log_every``, checkpoint every ``checkpoint_every``; stop on a
        Ctrl-C that arrived during the step, even one a data loader's finaliser swallowed."""
        interrupt.check()
        data_s = self.meter.step_done()
        self.step += 1
        if self._pbar is not None:
            self._pbar.update({k: v for k, v in record.items() if k in _SHOWN})
        if self.step % max(self.cfg.log_every, 1) == 0 or self.step == self.total:
            self.log({"step": self.step, "time": time.time(), "data_s": round(data_s, 6), **record})
        if self.cfg.checkpoint_every and self.step % self.cfg.checkpoint_every == 0 and self.step < self.total:
            self.save()
        self.restart_clock()

    def finish(
        self,
        model: SegmentationModel,
        metrics: dict[str, Any],
        meta: dict[str, Any] | None = None,
        extra_files: Callable[[Path], None] | None = None,
    ) -> dict[str, Any]:
        """Export the final model to ``out/model``, write the final state and ``done.json``."""
        self.close_progress()
        metrics = self._count_skipped(metrics)
        sync_buffers(model, self.env)
        revert_sync_bn(model)
        bad = st.first_non_finite(model.state_dict())
        if bad is not None:
            raise st.NonFiniteError(
                f"{self.stage}: step {self.step}: tensor '{bad}' of the final model is not finite (inf or NaN); "
                f"nothing exported; {self._kept()}"
            )
        self.save()
        if self.env.is_main:
            save_model(model, self.out / "model", meta={"stage": self.stage, **(meta or {})})
            if extra_files:
                extra_files(self.out / "model")
            done: dict[str, Any] = {"stage": self.stage, "steps": self.step, "metrics": metrics}
            done["eval"] = {"scales": list(self.cfg.eval.scales), "flip": self.cfg.eval.flip}  # what measured them
            speed = self.meter.report()
            if speed is not None:
                done["throughput"] = speed
                rates = ", ".join(f"{n} {v:.3g} images/s" for n, v in speed["images_per_s"].items())
                print(
                    f"{self.stage}: {speed['steps']} steps in {speed['train_s']:.1f} s ({rates}; "
                    f"waiting for data {100 * speed['data_wait_frac']:.0f} % of it)",
                    file=sys.stderr,
                )
            write_json(self.out / DONE_FILE, done)
        barrier(self.env)
        return metrics

    def seg_batch(self, batch: Any) -> Any:
        """A segmentation batch, counted (and said once) when no pixel of it is labelled."""
        if not has_labels(batch):
            self.unlabelled += 1
            if self.unlabelled == 1 and self.env.is_main:
                print(f"{self.stage}: step {self.step}: a batch with no labelled pixel (all ignore) "
                      "contributes 0; counted in done.json (batches_without_labels)", file=sys.stderr)  # fmt: skip
        return batch

    def _count_skipped(self, metrics: dict[str, Any]) -> dict[str, Any]:
        """``metrics`` plus the bad samples each stream skipped (``data.skip_bad``), said on stderr."""
        if self.unlabelled:
            metrics = {**metrics, "batches_without_labels": self.unlabelled}
        skipped = {n: s.dataset.num_skipped for n, s in self.streams.items() if isinstance(s.dataset, SkipBadSamples)}
        if not any(skipped.values()):
            return metrics
        if self.env.is_main:
            for n, s in self.streams.items():
                if skipped.get(n):
                    print(f"{self.stage}: {n} data: {s.dataset.report()}", file=sys.stderr)
        return {**metrics, "skipped_bad_samples": skipped}


_SHOWN = ("loss", "lr", "phase", "mu")  # the record keys the progress bar shows


def warn_crop(seg_ds: Any, cfg: Config, env: DistEnv) -> None:
    """Say (rank 0) when the training crop is larger than every training image (:func:`crop_warning`)."""
    if env.is_main:
        warning = crop_warning(
            getattr(seg_ds, "dataset", seg_ds), cfg.data.seg.crop_size, max(cfg.data.seg.scale_range)
        )
        if warning:
            print(warning, file=sys.stderr)


def training_stream(dataset: Any, batch_size: int, seed: int, cfg: Config, env: DistEnv, key: str) -> BatchStream:
    """The batch stream of a training phase; a training set smaller than one batch per process is one
    line naming the set, its split and the batch-size key ``key`` to lower."""
    try:
        return BatchStream(dataset, batch_size, seed, env, cfg.data.workers)
    except ValueError as e:
        task = "cls" if getattr(dataset, "task", "seg") == "cls" else "seg"
        d = cfg.data.seg if task == "seg" else cfg.data.cls
        raise UsageError(
            f"data.{task} ({d.dataset}, {d.train_split} split): {e}; lower {key} or train on more images"
        ) from None


def steps_for(epochs: float, stream: BatchStream) -> int:
    return stage_steps(epochs, stream.steps_per_epoch)


def stage_steps(epochs: float, per_epoch: int) -> int:
    """The steps a phase of ``epochs`` (fractions allowed) takes: at least one."""
    return max(1, math.ceil(epochs * per_epoch))


def memory_format(cfg: Config) -> torch.memory_format:
    """The training memory format: ``channels_last`` (NHWC) with ``optim.channels_last``, else contiguous."""
    return torch.channels_last if cfg.optim.channels_last else torch.contiguous_format


def place_model(model: SegmentationModel, cfg: Config, env: DistEnv) -> SegmentationModel:
    """Move a stage's model to its device, in the training memory format (:func:`memory_format`)."""
    return model.to(env.device, memory_format=memory_format(cfg))


def to_device(batch: Any, cfg: Config, env: DistEnv) -> tuple[torch.Tensor, torch.Tensor]:
    """A training batch ``(images, targets)`` on the device, images in the training memory format."""
    x, y = batch
    return (
        x.to(env.device, non_blocking=True, memory_format=memory_format(cfg)),
        y.to(env.device, non_blocking=True),
    )


def clip(params: Iterable[nn.Parameter], cfg: Config) -> None:
    if cfg.optim.grad_clip:
        torch.nn.utils.clip_grad_norm_(list(params), cfg.optim.grad_clip)
