"""The classification task of a stage: labels (ImageNet, a folder tree), or a frozen teacher's outputs on
label-free images (``data.cls.dataset: teacher``) — Eq. 7's ℓcls either way (:mod:`mtprune.method.teacher`).

The teacher is the net before segmentation training: ``data.cls.teacher`` (a checkpoint), or by default
``model`` built with its ``backbone_weights`` (the run's pretrained init: backbone + classification head as
pre-trained). ``data.cls.target``: ``logits`` (KL at ``data.cls.temperature`` on the classification head's
logits) or ``features`` (its last backbone feature map, for nets without a trained classification head).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from mtprune.checkpoint import load_model, read_arch, resolve_checkpoint
from mtprune.config import Config
from mtprune.errors import UsageError
from mtprune.method import feature_mse, teacher_kl
from mtprune.models import build_model
from mtprune.models.base import SegmentationModel
from mtprune.models.specs import is_spec
from mtprune.train.engine import ClsNet

TEACHER = "teacher"


def uses_teacher(cfg: Config) -> bool:
    return cfg.data.cls.dataset == TEACHER


def load_teacher(cfg: Config) -> SegmentationModel:
    """The teacher: ``data.cls.teacher``, or ``model`` built with its ``backbone_weights``; in eval mode."""
    c, m = cfg.data.cls, cfg.model
    if c.teacher:
        return load_model(c.teacher)
    if not m.backbone_weights:
        raise UsageError(
            "data.cls.dataset teacher: no teacher — set data.cls.teacher DIR (the net whose classification function "
            "to keep) or model.backbone_weights (the pretrained init is the teacher)"
        )
    return build_model(
        m.name, m.num_classes or 1, m.cls_classes or 1000, m.width, m.backbone_weights, m.model_args, m.parts, None,
        m.coupled,
    ).eval()  # fmt: skip


def _has_trained_head(cfg: Config, teacher: SegmentationModel) -> bool:
    """A built-in net's classification head is pre-trained (ImageNet weights or pretrain-cls); a wrapped
    torchvision / smp / own net's is mtprune's, trained only by a ``pretrain-cls`` stage."""
    if not is_spec(teacher.name):
        return True
    if not cfg.data.cls.teacher:
        return False
    return read_arch(resolve_checkpoint(cfg.data.cls.teacher)).get("meta", {}).get("stage") == "pretrain-cls"


def check_teacher(cfg: Config, teacher: SegmentationModel, student: SegmentationModel | None) -> None:
    """One line for a teacher that cannot teach ``student`` (None: the net ``cfg.model`` describes): another
    architecture, another number of classification classes (logits), or no trained classification head with
    ``target: logits``."""
    where = f"data.cls.teacher {cfg.data.cls.teacher}" if cfg.data.cls.teacher else f"the teacher ({teacher.name})"
    if cfg.data.cls.target == "logits" and not _has_trained_head(cfg, teacher):
        raise UsageError(
            f"{where}: {teacher.name} has no trained classification head (mtprune's is untrained): "
            "use data.cls.target: features"
        )
    name, args = (
        (cfg.model.name, cfg.model.model_args) if student is None else (student.name, student.arch().get("model_args"))
    )
    if teacher.name != name or (teacher.arch().get("model_args") or {}) != (args or {}):
        raise UsageError(f"{where}: a {teacher.name} teacher for a {name} net (another architecture)")
    if student is None:
        return
    if cfg.data.cls.target == "logits" and teacher.cls_classes != student.cls_classes:
        raise UsageError(
            f"{where}: its classification head has {teacher.cls_classes} classes, the net's {student.cls_classes}"
        )


def teacher_net(cfg: Config, student: SegmentationModel | None, device: torch.device | str) -> nn.Module:
    """The frozen teacher N1 (backbone + classification head) on ``device``, returning what ``data.cls.target``
    names; checked against ``student`` (:func:`check_teacher`)."""
    teacher = load_teacher(cfg)
    check_teacher(cfg, teacher, student)
    net = ClsNet(teacher.backbone, teacher.cls_head, cfg.data.cls.target).to(device).eval()
    net.requires_grad_(False)
    return net


@dataclass
class ClsTask:
    """Eq. 7's classification loss of a stage: cross-entropy on labels, or against a frozen ``teacher``'s
    logits (KL at ``temperature``) or features. ``output``: what the student's N1 must return."""

    teacher: nn.Module | None = None
    output: str = "logits"
    temperature: float = 2.0

    def loss(self, out: torch.Tensor, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """ℓcls of the student's output ``out`` on images ``x`` (labels ``y``, unused with a teacher)."""
        if self.teacher is None:
            return F.cross_entropy(out.float(), y)
        with torch.no_grad():
            target = self.teacher(x)
        if self.output == "logits":
            return teacher_kl(out, target, self.temperature)
        if out.shape != target.shape:
            raise UsageError(
                f"data.cls.target features: the net's last feature map is {tuple(out.shape[1:])}, the teacher's "
                f"{tuple(target.shape[1:])} (pruned channels): use a teacher of the same channels, or target logits"
            )
        return feature_mse(out, target)


def cls_task(cfg: Config, student: SegmentationModel, device: torch.device | str) -> ClsTask:
    """The classification task of ``cfg`` for ``student``: labels, or its teacher (loaded and checked here,
    before the stage writes anything)."""
    if not uses_teacher(cfg):
        return ClsTask()
    c = cfg.data.cls
    return ClsTask(teacher_net(cfg, student, device), c.target, c.temperature)
