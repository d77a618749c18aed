"""ResNet backbones (N1) built from torchvision's blocks, with a ``width`` factor and dilation.

The module and parameter names are torchvision's (``conv1``, ``bn1``, ``layer1.0.conv1`` ...), so an
ImageNet checkpoint of torchvision loads as it is (:func:`load_torchvision_weights`), from a local
``.pth`` file only: nothing is ever downloaded.

Prunable channels (paper, Sec. 3 / appendix: "post-activation ResNet, only the first two convs of each
residual block"), as the dependency graph finds them (:mod:`mtprune.models.groups`): ``conv1`` and
``conv2`` of every Bottleneck, ``conv1`` of every BasicBlock. A block's last conv is tied to the
shortcut by the residual sum and is never pruned; nor is the stem (``kept_modules``): tied to the first
block's shortcut in a BasicBlock ResNet, and kept in a Bottleneck one too, as the paper does.
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn
from torchvision.models import resnet as tvr

from mtprune.errors import CheckpointError
from mtprune.models.base import scaled
from mtprune.models.weights import check_state, first_line, load_tensors


class BasicBlock(tvr.BasicBlock):
    """torchvision's BasicBlock, with dilation (torchvision refuses it): both 3×3 convs are dilated,
    as in dilated ResNet-18/34 segmentation backbones. Same module names, so torchvision weights load."""

    def __init__(
        self,
        inplanes: int,
        planes: int,
        stride: int = 1,
        downsample: nn.Module | None = None,
        groups: int = 1,
        base_width: int = 64,
        dilation: int = 1,
        norm_layer: type | None = None,
    ) -> None:
        super().__init__(inplanes, planes, stride, downsample, groups, base_width, 1, norm_layer)
        if dilation > 1:
            self.conv1 = tvr.conv3x3(inplanes, planes, stride, dilation=dilation)
            self.conv2 = tvr.conv3x3(planes, planes, dilation=dilation)


DEPTHS: dict[int, tuple[type[nn.Module], list[int]]] = {
    18: (BasicBlock, [2, 2, 2, 2]),
    34: (BasicBlock, [3, 4, 6, 3]),
    50: (tvr.Bottleneck, [3, 4, 6, 3]),
    101: (tvr.Bottleneck, [3, 4, 23, 3]),
}


class ResNetBackbone(tvr.ResNet):
    """torchvision's ResNet trunk (no ``avgpool``/``fc``) returning the features of every stage.

    ``forward(x)`` returns ``{"c2": layer1, "c3": layer2, "c4": layer3, "c5": layer4}``.
    ``width`` scales every channel count (stem, block widths); ``dilation`` is torchvision's
    ``replace_stride_with_dilation`` (``[False, False, True]``: output stride 16; ``[False, True, True]``:
    output stride 8).
    """

    #: modules the pruning rule would allow but that are never pruned: the stem, as in the paper
    kept_modules = ("conv1",)

    def __init__(self, depth: int, width: float = 1.0, dilation: tuple[bool, bool, bool] = (False,) * 3) -> None:
        if depth not in DEPTHS:
            raise ValueError(f"unsupported ResNet depth {depth}; choose from {sorted(DEPTHS)}")
        block, layers = DEPTHS[depth]
        nn.Module.__init__(self)
        self.depth = depth
        self._norm_layer = nn.BatchNorm2d
        self.inplanes = scaled(64, width)
        self.dilation = 1
        self.groups = 1
        self.base_width = 64
        self.conv1 = nn.Conv2d(3, self.inplanes, kernel_size=7, stride=2, padding=3, bias=False)
        self.bn1 = nn.BatchNorm2d(self.inplanes)
        self.relu = nn.ReLU(inplace=True)
        self.maxpool = nn.MaxPool2d(kernel_size=3, stride=2, padding=1)
        self.layer1 = self._make_layer(block, scaled(64, width), layers[0])
        self.layer2 = self._make_layer(block, scaled(128, width), layers[1], stride=2, dilate=dilation[0])
        self.layer3 = self._make_layer(block, scaled(256, width), layers[2], stride=2, dilate=dilation[1])
        self.layer4 = self._make_layer(block, scaled(512, width), layers[3], stride=2, dilate=dilation[2])
        self.channels = {
            "c2": scaled(64, width) * block.expansion,
            "c3": scaled(128, width) * block.expansion,
            "c4": scaled(256, width) * block.expansion,
            "c5": scaled(512, width) * block.expansion,
        }
        for m in self.modules():  # torchvision's initialisation
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.constant_(m.weight, 1)
                nn.init.constant_(m.bias, 0)

    @property
    def out_channels(self) -> int:
        return self.channels["c5"]

    def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:  # type: ignore[override]
        x = self.maxpool(self.relu(self.bn1(self.conv1(x))))
        c2 = self.layer1(x)
        c3 = self.layer2(c2)
        c4 = self.layer3(c3)
        c5 = self.layer4(c4)
        return {"c2": c2, "c3": c3, "c4": c4, "c5": c5}


def load_torchvision_weights(model: nn.Module, path: str | Path) -> list[str]:
    """Load a torchvision ImageNet ResNet ``.pth`` (a plain state dict) into ``model.backbone``.

    The file is read with ``torch.load(weights_only=True)``: no arbitrary object is unpickled.
    torchvision's ``fc`` goes to ``model.cls_head.fc`` when the shapes fit (1000 classes), otherwise it
    is skipped. Returns the names of the skipped tensors. A missing file, a tensor missing from the file
    or a shape mismatch raises :class:`CheckpointError` naming it.
    """
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"{path}: backbone weights file not found")
    try:
        state = load_tensors(path)
    except Exception as e:  # noqa: BLE001 - any unreadable file (a pickle payload included) is one error line
        raise CheckpointError(f"{path}: cannot read backbone weights ({type(e).__name__}: {first_line(e)})") from None
    if isinstance(state, dict) and "state_dict" in state and isinstance(state["state_dict"], dict):
        state = state["state_dict"]
    if not isinstance(state, dict):
        raise CheckpointError(f"{path}: expected a state dict of tensors")
    backbone = model.backbone.state_dict()
    skipped: list[str] = []
    check_state(state, backbone, path, "the backbone", CheckpointError)  # another depth or width: a mismatch
    model.backbone.load_state_dict({k: state[k] for k in backbone}, strict=True)
    fc = model.cls_head.fc
    if "fc.weight" in state and tuple(state["fc.weight"].shape) == tuple(fc.weight.shape):
        fc.load_state_dict({"weight": state["fc.weight"], "bias": state["fc.bias"]})
    else:
        skipped += [k for k in ("fc.weight", "fc.bias") if k in state]
    return skipped
