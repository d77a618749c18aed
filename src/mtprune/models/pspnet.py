"""PSPNet (Zhao et al., 2017): dilated ResNet (output stride 8) + pyramid pooling module.

Decoder: for each bin b in (1, 2, 3, 6), adaptive average pooling to b×b → 1×1 conv to
``512·width`` channels → BN → ReLU → bilinear upsampling; the four branches are concatenated with the
backbone features, then a 3×3 bottleneck conv-BN-ReLU to ``512·width`` channels, dropout 0.1 and the
1×1 logits conv.

Prunable decoder channels, as :mod:`mtprune.models.groups` finds them (every conv followed by a BN
whose output is not the logits): the four pyramid branch convs ``decoder.ppm.stages.{i}.conv`` and the
bottleneck ``decoder.bottleneck.conv``.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from mtprune.models.base import (
    ClassificationHead,
    ConvBNReLU,
    SegmentationModel,
    scaled,
    upsample_to,
)
from mtprune.models.resnet import ResNetBackbone


class PyramidStage(nn.Module):
    def __init__(self, cin: int, cout: int, bin_size: int) -> None:
        super().__init__()
        self.pool = nn.AdaptiveAvgPool2d(bin_size)
        self.conv = nn.Conv2d(cin, cout, 1, bias=False)
        self.bn = nn.BatchNorm2d(cout)
        self.relu = nn.ReLU(inplace=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return upsample_to(self.relu(self.bn(self.conv(self.pool(x)))), x.shape[-2:])


class PyramidPooling(nn.Module):
    def __init__(self, cin: int, cout: int, bins: tuple[int, ...]) -> None:
        super().__init__()
        self.stages = nn.ModuleList(PyramidStage(cin, cout, b) for b in bins)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.cat([x, *(stage(x) for stage in self.stages)], dim=1)


class PSPDecoder(nn.Module):
    def __init__(self, in_channels: int, num_classes: int, channels: int, bins: tuple[int, ...]) -> None:
        super().__init__()
        self.ppm = PyramidPooling(in_channels, channels, bins)
        self.bottleneck = ConvBNReLU(in_channels + len(bins) * channels, channels, 3)
        self.dropout = nn.Dropout2d(0.1)
        self.classifier = nn.Conv2d(channels, num_classes, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.dropout(self.bottleneck(self.ppm(x))))


class PSPNet(SegmentationModel):
    family = "pspnet"

    def __init__(
        self,
        name: str,
        depth: int,
        num_classes: int,
        cls_classes: int = 1000,
        width: float = 1.0,
        bins: tuple[int, ...] = (1, 2, 3, 6),
    ) -> None:
        super().__init__(name, num_classes, cls_classes, width)
        self.backbone = ResNetBackbone(depth, width, dilation=(False, True, True))
        c5 = self.backbone.out_channels
        self.decoder = PSPDecoder(c5, num_classes, scaled(512, width), bins)
        self.cls_head = ClassificationHead(c5, cls_classes)

    def seg_outputs(self, x: torch.Tensor, aux: bool | None = None) -> dict[str, Any]:
        logits = self.decoder(self.backbone(x)["c5"])
        return {"out": upsample_to(logits, x.shape[-2:]), "aux": []}
