"""Any segmentation ``nn.Module`` as a :class:`~mtprune.models.base.SegmentationModel`: the model plus its parts.

The user's net runs its own ``forward``; the wrapper names its parts for MTP:

- ``backbone`` (N1, trained on both tasks): one module of the net, returning a tensor, a list/tuple or a
  dict of features; the classification head reads the last one;
- ``decoder`` (N2's head): one or more modules of the net (``decoder.<name>`` in the wrapper, dots of
  nested names as ``__``);
- ``cls_head``: global pool + linear on the backbone's last feature map, made here with ``cls_classes``.

``model(x)`` returns the main logits at the input size whatever the net returns (a tensor, a dict with
``"out"`` and ``"aux"``, a tuple whose first item is the mask); ``seg_outputs`` adds the auxiliary logits.
A net that needs sizes divisible by its output stride (``pad_to``: smp's DeepLabV3+) gets its input padded
with zeros at the bottom and right, and the logits cropped back.
The prunable channel groups are found from the dependency graph (:mod:`mtprune.models.groups`).
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from mtprune.errors import UsageError
from mtprune.models.base import (
    BACKBONE,
    DECODER,
    ClassificationHead,
    SegmentationModel,
    last_feature,
    upsample_to,
)


def _key(name: str) -> str:
    return name.replace(".", "__")


def _module(net: nn.Module, name: str, spec: str) -> nn.Module:
    try:
        return net.get_submodule(name)
    except AttributeError:
        children = ", ".join(n for n, _ in net.named_children())
        raise UsageError(f"{spec}: no module '{name}' in the model (its children: {children})") from None


def _main_and_aux(out: Any) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """The main logits and the auxiliary ones of whatever a segmentation net returns."""
    if isinstance(out, torch.Tensor):
        return out, []
    if isinstance(out, dict) and "out" in out:
        return out["out"], [v for k, v in out.items() if k != "out" and isinstance(v, torch.Tensor) and v.dim() == 4]
    if isinstance(out, list | tuple) and out and isinstance(out[0], torch.Tensor):
        return out[0], [v for v in out[1:] if isinstance(v, torch.Tensor) and v.dim() == 4]
    raise UsageError(f"the model returned {type(out).__name__}: a tensor, a dict with 'out' or a tuple expected")


def _check_covered(net: nn.Module, parts: dict[str, list[str]], spec: str) -> None:
    """Every parameter and buffer of ``net`` lies in a part (else it would be neither trained nor saved)."""
    names = [n for ns in parts.values() for n in ns]
    for kind, items in (("parameter", net.named_parameters()), ("buffer", net.named_buffers())):
        for name, _ in items:
            if not any(name.startswith(n + ".") for n in names):
                raise UsageError(
                    f"{spec}: {kind} '{name}' is in no part ({parts}); name its module in --parts decoder=…"
                )


class WrappedSegmentationModel(SegmentationModel):
    """A user's (or torchvision's, or smp's) segmentation net with its parts; see the module docstring."""

    family = "wrapped"

    def __init__(
        self,
        net: nn.Module,
        spec: str,
        num_classes: int,
        cls_classes: int,
        parts: dict[str, Sequence[str]],
        model_args: dict[str, Any] | None = None,
        coupled: str = "skip",
        pad_to: int = 1,
    ) -> None:
        super().__init__(spec, num_classes, cls_classes, 1.0)
        self.pad_to = pad_to  # the net needs sizes divisible by this (smp's DeepLabV3+): zero-padded, cropped back
        if len(parts.get(BACKBONE, ())) != 1 or not parts.get(DECODER):
            raise UsageError(f"{spec}: parts need one backbone module and at least one decoder module, got {parts}")
        self.parts = {BACKBONE: list(parts[BACKBONE]), DECODER: list(parts[DECODER])}
        self.model_args = dict(model_args or {})
        if coupled not in ("skip", "group"):
            raise UsageError(f"{spec}: coupled must be skip or group, got '{coupled}'")
        self.coupled = coupled  # channels tied by a sum or product: left alone (skip) or pruned together (group)
        self.backbone = _module(net, self.parts[BACKBONE][0], spec)
        self.decoder = nn.ModuleDict({_key(n): _module(net, n, spec) for n in self.parts[DECODER]})
        object.__setattr__(self, "_net", net)  # runs the forward; its modules are the parts above
        _check_covered(net, self.parts, spec)
        self.cls_head = ClassificationHead(self._feature_channels(), cls_classes)
        self.source_file: Path | None = None  # a python: factory's file (a checkpoint carries a copy)

    def _feature_channels(self) -> int:
        p = next(self.backbone.parameters())
        with torch.no_grad():
            was = self.backbone.training
            self.backbone.eval()
            feat = last_feature(self.backbone(torch.zeros(1, 3, 64, 64, device=p.device, dtype=p.dtype)))
            self.backbone.train(was)
        return int(feat.shape[1])

    def seg_outputs(self, x: torch.Tensor, aux: bool | None = None) -> dict[str, Any]:
        aux = self.training if aux is None else aux
        h, w = x.shape[-2:]
        if self.pad_to > 1 and (h % self.pad_to or w % self.pad_to):  # bottom / right zeros, cropped back below
            x = F.pad(x, (0, -w % self.pad_to, 0, -h % self.pad_to))
        main, extra = _main_and_aux(self._net(x))
        size = x.shape[-2:]
        fit = [(t if t.shape[-2:] == size else upsample_to(t, size))[..., :h, :w] for t in [main, *extra]]
        return {"out": fit[0], "aux": fit[1:] if aux else []}

    def groups_key(self) -> str | None:
        """The arch and, for a ``python:`` factory, its file's content: a changed factory is traced anew."""
        if self.source_file is None:
            return json.dumps(self.arch(), sort_keys=True)
        if not self.source_file.is_file():
            return None  # the file is gone: trace this model itself
        src = hashlib.sha256(self.source_file.read_bytes()).hexdigest()
        return json.dumps({**self.arch(), "source": src}, sort_keys=True)

    def arch(self) -> dict[str, Any]:
        return {**super().arch(), "model_args": self.model_args, "parts": self.parts, "coupled": self.coupled}
