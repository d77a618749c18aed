"""The MTP split shared by every segmentation model: backbone N1 + decoder (N2's head) + cls head.

A :class:`SegmentationModel` holds

- ``backbone``: a ResNet trunk (:class:`~mtprune.models.resnet.ResNetBackbone`), the part that MTP
  trains on both tasks (W1 / W3 in the paper);
- ``decoder``: the segmentation head (W2): ASPP, pyramid pooling, or BiSeNet's paths and heads;
- ``cls_head``: global average pooling + a linear layer, with its own number of classes, so that
  backbone + ``cls_head`` is the classification net N1.

and finds its prunable channel groups (:meth:`prunable_layers`), each tagged ``backbone`` or
``decoder``, from Torch-Pruning's dependency graph (:mod:`mtprune.models.groups`): the same rule for the
built-in nets and for any net a user brings.
"""

from __future__ import annotations

import contextlib
import json
from collections.abc import Iterator
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

# the names of the MTP split and its channel groups are defined with the groups; imported from here too
from mtprune.models.groups import BACKBONE, DECODER, PrunableLayer, model_groups  # noqa: F401


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
    #: channels tied by a residual sum or a product: left alone (``skip``, the paper's rule) or pruned
    #: together (``group``)
    coupled: str = "skip"

    def __init__(self, name: str, num_classes: int, cls_classes: int, width: float) -> None:
        super().__init__()
        self.name = name
        self.num_classes = num_classes
        self.cls_classes = cls_classes
        self.width = width
        self._groups: list[PrunableLayer] | None = None

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
        """The prunable channel groups in module order, found once from the dependency graph
        (:func:`mtprune.models.groups.model_groups`); they do not change when channels are removed."""
        if self._groups is None:
            self._groups = model_groups(self)
        return list(self._groups)

    def kept_modules(self) -> list[str]:
        """Convs never pruned though the rule would allow it: the backbone's ``kept_modules`` (a ResNet's
        stem, as in the paper), as names in the whole model."""
        return [f"backbone.{n}" for n in getattr(self.backbone, "kept_modules", ())]

    def groups_key(self) -> str | None:
        """Models with the same key have the same groups (traced once per process): a built-in net's follow
        from its :meth:`arch`. None: trace this model itself."""
        return json.dumps(self.arch(), sort_keys=True)

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
