"""The MTP split shared by every segmentation model: backbone N1 + decoder (N2's head) + cls head.

A :class:`SegmentationModel` holds

- ``backbone``: a ResNet trunk (:class:`~mtprune.models.resnet.ResNetBackbone`), the part that MTP
  trains on both tasks (W1 / W3 in the paper);
- ``decoder``: the segmentation head (W2): ASPP, pyramid pooling, or BiSeNet's paths and heads;
- ``cls_head``: global average pooling + a linear layer, with its own number of classes, so that
  backbone + ``cls_head`` is the classification net N1.

and declares its prunable channel groups (:meth:`prunable_layers`), each tagged ``backbone`` or
``decoder``. The rules that choose them are written where each model implements them.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

BACKBONE = "backbone"
DECODER = "decoder"


@dataclass(frozen=True)
class PrunableLayer:
    """One prunable channel group: the output channels of ``conv`` and of the BatchNorm ``bn`` after it.

    ``conv`` and ``bn`` are module names in the whole model (``model.get_submodule(name)``); the BN
    scale γ of ``bn`` is the channel's importance score. ``part`` is ``"backbone"`` or ``"decoder"``.
    """

    conv: str
    bn: str
    part: str
    #: further BatchNorms whose channels go with these (after a depthwise conv that follows the conv)
    followers: tuple[str, ...] = ()
    #: the BNs of other convs whose outputs a sum or product ties to these (``coupled: group``): pruned with
    #: them, and their |γ| added to the score
    tied: tuple[str, ...] = ()

    @property
    def scored(self) -> tuple[str, ...]:
        """The BNs whose |γ| (summed) score the channels: ``bn`` and the tied ones."""
        return (self.bn, *self.tied)

    @property
    def all_bns(self) -> tuple[str, ...]:
        """Every BN whose channels the group removes."""
        return (self.bn, *self.tied, *self.followers)


class ClassificationHead(nn.Module):
    """Global average pooling + linear: turns the backbone into the classification net N1."""

    def __init__(self, in_channels: int, num_classes: int) -> None:
        super().__init__()
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(in_channels, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(torch.flatten(self.pool(x), 1))


class ConvBNReLU(nn.Sequential):
    """``conv`` (no bias) → ``bn`` → ``relu``; the building block of every prunable decoder layer."""

    def __init__(self, cin: int, cout: int, kernel_size: int = 3, stride: int = 1, dilation: int = 1) -> None:
        padding = dilation * (kernel_size - 1) // 2
        super().__init__()
        self.conv = nn.Conv2d(cin, cout, kernel_size, stride, padding, dilation=dilation, bias=False)
        self.bn = nn.BatchNorm2d(cout)
        self.relu = nn.ReLU(inplace=True)


class SegmentationModel(nn.Module):
    """Base class: subclasses build ``backbone``, ``decoder``, ``cls_head`` and implement the rest.

    ``forward(x)`` is the segmentation forward: main logits at the input's size. ``seg_outputs(x)``
    returns ``{"out": logits, "aux": [auxiliary logits]}``; the auxiliary heads (BiSeNet's) run when
    ``aux`` is true (default: in training mode). ``forward_cls(x)`` is the classification forward
    (backbone + ``cls_head``).
    """

    #: the model's registered family name (``deeplabv3``, ``pspnet``, ``bisenet``)
    family: str = ""

    def __init__(self, name: str, num_classes: int, cls_classes: int, width: float) -> None:
        super().__init__()
        self.name = name
        self.num_classes = num_classes
        self.cls_classes = cls_classes
        self.width = width

    # --- forwards -------------------------------------------------------------------------------
    def seg_outputs(self, x: torch.Tensor, aux: bool | None = None) -> dict[str, Any]:
        raise NotImplementedError

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.seg_outputs(x, aux=False)["out"]

    def forward_cls(self, x: torch.Tensor) -> torch.Tensor:
        return self.cls_head(last_feature(self.backbone(x)))

    def trace_outputs(self, x: torch.Tensor) -> list[torch.Tensor]:
        """Every output of the model (segmentation, auxiliary, classification) for dependency tracing.

        Torch-Pruning only fixes layers it traces: a head left out of the trace breaks after pruning.
        """
        seg = self.seg_outputs(x, aux=True)
        return [seg["out"], *seg["aux"], self.forward_cls(x)]

    # --- MTP split ------------------------------------------------------------------------------
    def prunable_layers(self) -> list[PrunableLayer]:
        """The prunable channel groups, in a fixed order (backbone first, then decoder)."""
        raise NotImplementedError

    def training_only_modules(self) -> list[str]:
        """Modules that the deployed segmentation net does not run (not counted in its parameters)."""
        return ["cls_head"]

    def seg_num_params(self) -> int:
        """Parameters of the deployed segmentation net N2: backbone + decoder, no training-only head."""
        skip = {id(p) for name in self.training_only_modules() for p in self.get_submodule(name).parameters()}
        return sum(p.numel() for p in self.parameters() if id(p) not in skip)

    def arch(self) -> dict[str, Any]:
        """The constructor arguments that rebuild this (dense) model with :func:`build_model`."""
        return {
            "model": self.name,
            "num_classes": self.num_classes,
            "cls_classes": self.cls_classes,
            "width": self.width,
        }


def last_feature(features: Any) -> torch.Tensor:
    """The last feature map of what a backbone returns: a tensor, a list/tuple, or a dict (the last value,
    e.g. ResNetBackbone's ``c5``, torchvision's IntermediateLayerGetter's ``out``)."""
    if isinstance(features, torch.Tensor):
        return features
    if isinstance(features, dict):
        return list(features.values())[-1]
    if isinstance(features, list | tuple):
        return features[-1]
    raise TypeError(f"a backbone returned {type(features).__name__}: a tensor, list, tuple or dict expected")


@contextlib.contextmanager
def eval_mode(model: nn.Module) -> Iterator[nn.Module]:
    """``model`` in eval mode inside the block, its previous mode restored after it (whatever happens)."""
    was_training = model.training
    model.eval()
    try:
        yield model
    finally:
        model.train(was_training)


def upsample_to(x: torch.Tensor, size: tuple[int, int] | torch.Size) -> torch.Tensor:
    """Bilinear resize of logits/features to ``size`` (align_corners=False)."""
    return F.interpolate(x, size=size, mode="bilinear", align_corners=False)


def scaled(channels: int, width: float) -> int:
    """A channel count scaled by the model's ``width`` factor (at least 4 channels)."""
    return max(4, int(round(channels * width)))
