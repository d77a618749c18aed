"""BiSeNet (Yu et al., ECCV 2018) with a ResNet context path.

- Spatial path: three stride-2 conv-BN-ReLU (7×7 to 64, 3×3 to 64, 3×3 to 128 channels; ×width) →
  1/8-resolution features.
- Context path on the ResNet (output stride 32): attention refinement modules (ARM: 3×3 conv-BN-ReLU,
  then × a channel attention from global pooling → 1×1 conv → BN → sigmoid) on the 16× (``c4``) and 32×
  (``c5``) features; the global-context vector (global pooling → 1×1 conv-BN-ReLU) added to ARM32's
  output; each sum upsampled (nearest) and refined by a 3×3 conv-BN-ReLU (``conv_head32``,
  ``conv_head16``).
- Feature fusion module (FFM): concatenation of both paths → 1×1 conv-BN-ReLU → ``f + f·attention``
  (global pooling → 1×1 conv → ReLU → 1×1 conv → sigmoid).
- Main head: 3×3 conv-BN-ReLU to ``64·width`` channels + 1×1 logits on the FFM output; two auxiliary
  heads (3×3 conv-BN-ReLU to ``256·width`` + 1×1 logits) on the context features after ``conv_head16``
  and ``conv_head32``, used in training only. Channel counts follow TorchSeg (ycszen), the
  implementation the paper used (its footnote 3).

Prunable decoder channels, as :mod:`mtprune.models.groups` finds them (a conv followed by a BN whose
output is not the logits and is not tied to another conv's output by an element-wise sum or product):
the three spatial-path convs, ``conv_head16`` (feeds a concatenation and an auxiliary head) and the 3×3
conv of each of the three heads. Not prunable:
the ARM convs and their attention convs (product, then sum), the global-context conv and
``conv_head32`` (sums), the FFM's convs (product and sum; the attention convs have no BN).
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from mtprune.models.base import (
    ClassificationHead,
    ConvBNReLU,
    SegmentationModel,
    scaled,
    upsample_to,
)
from mtprune.models.resnet import ResNetBackbone


class SpatialPath(nn.Sequential):
    def __init__(self, width: float) -> None:
        c1, c3 = scaled(64, width), scaled(128, width)
        super().__init__()
        self.conv1 = ConvBNReLU(3, c1, 7, stride=2)
        self.conv2 = ConvBNReLU(c1, c1, 3, stride=2)
        self.conv3 = ConvBNReLU(c1, c3, 3, stride=2)


class AttentionRefinement(nn.Module):
    def __init__(self, cin: int, cout: int) -> None:
        super().__init__()
        self.conv = ConvBNReLU(cin, cout, 3)
        self.conv_atten = nn.Conv2d(cout, cout, 1, bias=False)
        self.bn_atten = nn.BatchNorm2d(cout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        feat = self.conv(x)
        atten = torch.sigmoid(self.bn_atten(self.conv_atten(F.adaptive_avg_pool2d(feat, 1))))
        return feat * atten


class ContextPath(nn.Module):
    def __init__(self, c4: int, c5: int, channels: int) -> None:
        super().__init__()
        self.arm16 = AttentionRefinement(c4, channels)
        self.arm32 = AttentionRefinement(c5, channels)
        self.conv_avg = ConvBNReLU(c5, channels, 1)
        self.conv_head32 = ConvBNReLU(channels, channels, 3)
        self.conv_head16 = ConvBNReLU(channels, channels, 3)

    def forward(self, feats: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        c3, c4, c5 = feats["c3"], feats["c4"], feats["c5"]
        avg = self.conv_avg(F.adaptive_avg_pool2d(c5, 1))
        feat32_sum = self.arm32(c5) + avg
        feat32_up = self.conv_head32(F.interpolate(feat32_sum, size=c4.shape[-2:], mode="nearest"))
        feat16_sum = self.arm16(c4) + feat32_up
        feat16_up = self.conv_head16(F.interpolate(feat16_sum, size=c3.shape[-2:], mode="nearest"))
        return feat16_up, feat32_up  # 1/8 and 1/16 resolution


class FeatureFusion(nn.Module):
    def __init__(self, cin: int, cout: int) -> None:
        super().__init__()
        self.convblk = ConvBNReLU(cin, cout, 1)
        self.conv1 = nn.Conv2d(cout, max(1, cout // 4), 1, bias=False)
        self.relu = nn.ReLU(inplace=True)
        self.conv2 = nn.Conv2d(max(1, cout // 4), cout, 1, bias=False)

    def forward(self, fsp: torch.Tensor, fcp: torch.Tensor) -> torch.Tensor:
        feat = self.convblk(torch.cat([fsp, fcp], dim=1))
        atten = torch.sigmoid(self.conv2(self.relu(self.conv1(F.adaptive_avg_pool2d(feat, 1)))))
        return feat * atten + feat


class SegHead(nn.Module):
    """3×3 conv-BN-ReLU + 1×1 logits conv (BiSeNetOutput)."""

    def __init__(self, cin: int, mid: int, num_classes: int) -> None:
        super().__init__()
        self.conv = ConvBNReLU(cin, mid, 3)
        self.conv_out = nn.Conv2d(mid, num_classes, 1, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv_out(self.conv(x))


class BiSeNetDecoder(nn.Module):
    def __init__(self, c4: int, c5: int, num_classes: int, width: float) -> None:
        super().__init__()
        ch = scaled(128, width)
        self.spatial_path = SpatialPath(width)
        self.context_path = ContextPath(c4, c5, ch)
        fuse = scaled(128, width) + ch
        self.ffm = FeatureFusion(fuse, scaled(256, width))
        self.head = SegHead(scaled(256, width), scaled(64, width), num_classes)
        self.aux_heads = nn.ModuleList(SegHead(ch, scaled(256, width), num_classes) for _ in range(2))


class BiSeNet(SegmentationModel):
    family = "bisenet"

    def __init__(self, name: str, depth: int, num_classes: int, cls_classes: int = 1000, width: float = 1.0) -> None:
        super().__init__(name, num_classes, cls_classes, width)
        self.backbone = ResNetBackbone(depth, width)
        ch = self.backbone.channels
        self.decoder = BiSeNetDecoder(ch["c4"], ch["c5"], num_classes, width)
        self.cls_head = ClassificationHead(ch["c5"], cls_classes)

    def seg_outputs(self, x: torch.Tensor, aux: bool | None = None) -> dict[str, Any]:
        aux = self.training if aux is None else aux
        dec = self.decoder
        fsp = dec.spatial_path(x)
        fcp8, fcp16 = dec.context_path(self.backbone(x))
        out = upsample_to(dec.head(dec.ffm(fsp, fcp8)), x.shape[-2:])
        aux_out = []
        if aux:
            aux_out = [upsample_to(h(f), x.shape[-2:]) for h, f in zip(dec.aux_heads, (fcp8, fcp16), strict=True)]
        return {"out": out, "aux": aux_out}

    def training_only_modules(self) -> list[str]:
        return ["cls_head", "decoder.aux_heads"]
