"""Shared fixtures: tiny models of the real structure with random BN statistics."""

from __future__ import annotations

import pytest
import torch

from mtprune.models import build_model
from mtprune.models.base import SegmentationModel
from mtprune.train.engine import StageRun

TINY_FAMILIES = ["deeplabv3_resnet18", "deeplabv3_resnet50", "pspnet_resnet50", "bisenet_resnet18"]


def crash_at(monkeypatch: pytest.MonkeyPatch, step: int, stage: str | None = None):
    """Make training raise KeyboardInterrupt right after ``step`` (of ``stage``, or of any stage) is logged
    and checkpointed; returns a function that undoes it."""
    original = StageRun.after_step

    def crash(self: StageRun, record: dict) -> None:
        original(self, record)
        if self.step == step and (stage is None or self.stage == stage):
            raise KeyboardInterrupt

    monkeypatch.setattr(StageRun, "after_step", crash)
    return lambda: monkeypatch.setattr(StageRun, "after_step", original)


def randomize_bn(model: torch.nn.Module, seed: int = 0) -> torch.nn.Module:
    """Random γ, β and running statistics in every BN, so that pruning choices and outputs are non-trivial."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, torch.nn.BatchNorm2d):
                n = m.num_features
                m.weight.copy_(torch.rand(n, generator=g) * 0.9 + 0.1)
                m.bias.copy_(torch.rand(n, generator=g) - 0.5)
                m.running_mean.copy_((torch.rand(n, generator=g) - 0.5) * 0.4)
                m.running_var.copy_(torch.rand(n, generator=g) + 0.5)
    return model


def tiny(
    name: str, num_classes: int = 5, cls_classes: int = 7, width: float = 0.25, seed: int = 0
) -> SegmentationModel:
    torch.manual_seed(seed)
    return randomize_bn(build_model(name, num_classes, cls_classes=cls_classes, width=width), seed).eval()


@pytest.fixture(params=TINY_FAMILIES)
def tiny_model(request: pytest.FixtureRequest) -> SegmentationModel:
    return tiny(request.param)
