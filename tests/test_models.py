from __future__ import annotations

import pytest
import torch
from tests.conftest import tiny
from torchvision.models import resnet as tvr

from mtprune.errors import CheckpointError, UsageError
from mtprune.models import PAPER_MODELS, build_model, list_models
from mtprune.models.base import BACKBONE, DECODER
from mtprune.models.resnet import load_torchvision_weights


def test_registry_covers_three_families_and_four_depths():
    names = set(list_models())
    for fam in ("deeplabv3", "pspnet", "bisenet"):
        for d in (18, 34, 50, 101):
            assert f"{fam}_resnet{d}" in names
    assert set(PAPER_MODELS) <= names
    with pytest.raises(UsageError, match="unknown model 'unet'"):
        build_model("unet", 3)


@pytest.mark.parametrize(
    "name",
    [
        "deeplabv3_resnet18",
        "deeplabv3_resnet50",
        "pspnet_resnet18",
        "pspnet_resnet50",
        "bisenet_resnet18",
        "bisenet_resnet50",
    ],
)
def test_forwards_have_the_right_shapes(name):
    m = tiny(name, num_classes=4, cls_classes=6)
    x = torch.randn(2, 3, 70, 90)
    with torch.no_grad():
        assert m(x).shape == (2, 4, 70, 90)
        assert m.forward_cls(x).shape == (2, 6)
        seg = m.seg_outputs(x, aux=True)
    n_aux = 2 if name.startswith("bisenet") else 0
    assert len(seg["aux"]) == n_aux
    assert all(a.shape == (2, 4, 70, 90) for a in seg["aux"])


def test_output_strides():
    x = torch.zeros(1, 3, 128, 128)
    with torch.no_grad():
        assert tiny("deeplabv3_resnet50").backbone(x)["c5"].shape[-1] == 8  # OS16
        assert tiny("pspnet_resnet18").backbone(x)["c5"].shape[-1] == 16  # OS8
        assert tiny("bisenet_resnet18").backbone(x)["c5"].shape[-1] == 4  # OS32


def test_prunable_layers_follow_the_rules():
    m = tiny("deeplabv3_resnet50")
    layers = m.prunable_layers()
    bb = [lay.conv for lay in layers if lay.part == BACKBONE]
    dec = [lay.conv for lay in layers if lay.part == DECODER]
    # ResNet-50: 16 bottlenecks × (conv1, conv2); never conv3, the stem or a downsample
    assert len(bb) == 32
    assert all(c.endswith(("conv1", "conv2")) and ".layer" in c for c in bb)
    assert dec == [f"decoder.aspp.convs.{i}.0" for i in range(4)] + [
        "decoder.aspp.convs.4.1",
        "decoder.aspp.project.0",
        "decoder.head.0",
    ]
    for lay in layers:  # each conv is followed by its BN with the same channel count
        conv, bn = m.get_submodule(lay.conv), m.get_submodule(lay.bn)
        assert isinstance(conv, torch.nn.Conv2d) and isinstance(bn, torch.nn.BatchNorm2d)
        assert conv.out_channels == bn.num_features
    r18 = tiny("bisenet_resnet18").prunable_layers()
    assert sum(lay.part == BACKBONE for lay in r18) == 8  # conv1 of 8 BasicBlocks
    assert sum(lay.part == DECODER for lay in r18) == 7
    psp = tiny("pspnet_resnet18").prunable_layers()
    assert [lay.conv for lay in psp if lay.part == DECODER][-1] == "decoder.bottleneck.conv"


def test_width_scales_channels():
    full = build_model("deeplabv3_resnet50", 21)
    half = build_model("deeplabv3_resnet50", 21, width=0.5)
    assert full.backbone.out_channels == 2048 and half.backbone.out_channels == 1024
    assert half.decoder.aspp.project[0].out_channels == 128


def test_torchvision_weights_load_from_local_file(tmp_path):
    ref = tvr.resnet18(num_classes=1000)
    path = tmp_path / "resnet18.pth"
    torch.save(ref.state_dict(), path)
    m = build_model("bisenet_resnet18", 19, backbone_weights=path)
    assert torch.equal(m.backbone.layer3[1].conv2.weight, ref.layer3[1].conv2.weight)
    assert torch.equal(m.cls_head.fc.weight, ref.fc.weight)
    # same trunk output as torchvision's own forward
    x = torch.randn(1, 3, 64, 64)
    ref.eval()
    m.eval()
    with torch.no_grad():
        feats = ref.layer4(ref.layer3(ref.layer2(ref.layer1(ref.maxpool(ref.relu(ref.bn1(ref.conv1(x))))))))
        assert torch.allclose(m.backbone(x)["c5"], feats)
        assert torch.allclose(m.forward_cls(x), ref(x), atol=1e-6)
    with pytest.raises(CheckpointError, match="tensor 'conv1.weight' has shape \\(64, 3, 7, 7\\)"):
        load_torchvision_weights(build_model("bisenet_resnet18", 19, width=0.5), path)
    with pytest.raises(CheckpointError, match="not found"):
        build_model("bisenet_resnet18", 19, backbone_weights=tmp_path / "missing.pth")
