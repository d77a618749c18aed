"""DeepLabv3 (Chen et al., 2017): dilated ResNet (output stride 16) + ASPP decoder.

The decoder is torchvision's ``ASPP`` (1×1 branch, three 3×3 atrous branches at rates 6/12/18, the
image-pooling branch, 1×1 projection + dropout 0.5) followed by DeepLabHead's 3×3 conv-BN-ReLU and the
1×1 logits conv, with ``256·width`` channels. Backbone: torchvision ResNet with
``replace_stride_with_dilation=[False, False, True]``, multi-grid (1, 1, 1).

Prunable decoder channels, as :mod:`mtprune.models.groups` finds them (every conv followed by a BN
whose output is not the logits): the five ASPP branch convs (``decoder.aspp.convs.0`` … ``.4``, the
image-pooling one included), the projection ``decoder.aspp.project.0`` and the head conv
``decoder.head.0``.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn
from torchvision.models.segmentation.deeplabv3 import ASPP

from mtprune.models.base import ClassificationHead, SegmentationModel, scaled, upsample_to
from mtprune.models.resnet import ResNetBackbone


class DeepLabV3Decoder(nn.Module):
    def __init__(self, in_channels: int, num_classes: int, channels: int, rates: tuple[int, ...]) -> None:
        super().__init__()
        self.aspp = ASPP(in_channels, list(rates), out_channels=channels)
        self.head = nn.Sequential(
            nn.Conv2d(channels, channels, 3, padding=1, bias=False),
            nn.BatchNorm2d(channels),
            nn.ReLU(inplace=True),
        )
        self.classifier = nn.Conv2d(channels, num_classes, 1)
        self.num_branches = 2 + len(rates)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.head(self.aspp(x)))


class DeepLabV3(SegmentationModel):
    family = "deeplabv3"

    def __init__(
        self,
        name: str,
        depth: int,
        num_classes: int,
        cls_classes: int = 1000,
        width: float = 1.0,
        rates: tuple[int, ...] = (6, 12, 18),
    ) -> None:
        super().__init__(name, num_classes, cls_classes, width)
        self.backbone = ResNetBackbone(depth, width, dilation=(False, False, True))
        c5 = self.backbone.out_channels
        self.decoder = DeepLabV3Decoder(c5, num_classes, scaled(256, width), rates)
        self.cls_head = ClassificationHead(c5, cls_classes)

    def seg_outputs(self, x: torch.Tensor, aux: bool | None = None) -> dict[str, Any]:
        logits = self.decoder(self.backbone(x)["c5"])
        return {"out": upsample_to(logits, x.shape[-2:]), "aux": []}
