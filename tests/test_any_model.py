"""Any segmentation model (issue 18): torchvision's builders and the user's own factory, wrapped with
their parts, pruned physically (equal to the masked net), saved and loaded."""

from __future__ import annotations

import copy
import json

import pytest
import torch
from torch import nn

from mtprune import build_model, load_model, save_model
from mtprune.errors import UsageError
from mtprune.pruning import prune, scorer_inputs
from mtprune.pruning.apply import mask_plan

TV = "torchvision:deeplabv3_mobilenet_v3_large"
UNET = {"encoder_name": "resnet18", "encoder_depth": 3, "decoder_channels": [32, 16, 8]}
#: the models issue 18 names (LR-ASPP with its SE gates and sums pruned together), as (spec, model_args, coupled)
NAMED = [
    ("torchvision:lraspp_mobilenet_v3_large", {}, "group"),
    ("torchvision:deeplabv3_resnet50", {"aux_loss": True}, "skip"),
    ("smp:Unet", UNET, "skip"),
    ("smp:DeepLabV3Plus", {"encoder_name": "mobilenet_v2"}, "skip"),
]


def _spread_gammas(model: nn.Module) -> None:
    """Spread the prunable γ, β and give every BN the running statistics of a few batches: a fresh
    MobileNetV3 in eval mode (running variance 1) shrinks its features to ~1e-9, and a net whose output
    does not depend on its channels would make "pruned equals masked" say nothing."""
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for lay in model.prunable_layers():
            for name in (lay.bn, *lay.followers):
                bn = model.get_submodule(name)
                bn.weight.copy_(torch.rand(bn.weight.shape, generator=g) + 0.1)
                bn.bias.copy_(torch.rand(bn.bias.shape, generator=g) * 0.2 - 0.1)
        for bn in model.modules():
            if isinstance(bn, nn.BatchNorm2d):
                bn.momentum = None  # cumulative average
                bn.reset_running_stats()
        model.train()
        for _ in range(3):
            model.seg_outputs(torch.randn(4, 3, 64, 64, generator=g), aux=True)
            model.forward_cls(torch.randn(4, 3, 64, 64, generator=g))
        model.eval()


def _pruned_equals_masked_and_reloads(model: nn.Module, tmp_path, method: str = "bn", **kw) -> nn.Module:
    """Prune a copy of ``model`` (whose output depends on its channels) and mask another with the same plan:
    the removed channels change the output, exactly as masking them does; the pruned net saves and loads."""
    masked, pruned = copy.deepcopy(model), copy.deepcopy(model)
    mask_plan(masked, prune(pruned, method, 0.5, **kw))
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        assert (pruned(x) - model(x)).abs().mean() > 0.05  # the removed channels mattered …
        assert torch.allclose(pruned(x), masked(x), atol=1e-5)  # … exactly as masking them does
        assert torch.allclose(pruned.forward_cls(x), masked.forward_cls(x), atol=1e-5)
    assert sum(p.numel() for p in pruned.parameters()) < sum(p.numel() for p in model.parameters())
    save_model(pruned, tmp_path / "ck")
    with torch.no_grad():
        assert torch.equal(load_model(tmp_path / "ck")(x), pruned(x))
    return pruned


def every_method_equals_masked(model: nn.Module, tmp_path) -> None:
    """:func:`_pruned_equals_masked_and_reloads` for the uniform, bn, FPGM and ThiNet plans."""
    thinet = {"images": torch.randn(2, 3, 64, 64), "rescale": False}
    for method, kw in (("uniform", {}), ("bn", {}), ("fpgm", {}), ("thinet", thinet)):
        _pruned_equals_masked_and_reloads(model, tmp_path / method, method, **kw)


@pytest.fixture(scope="module")
def tv_model():
    torch.manual_seed(0)
    model = build_model(TV, 5, 10, model_args={"aux_loss": True})
    _spread_gammas(model)
    return model.eval()


def test_a_torchvision_model_gives_torchvision_s_logits(tv_model):
    from torchvision.models.segmentation import deeplabv3_mobilenet_v3_large

    own = deeplabv3_mobilenet_v3_large(weights=None, weights_backbone=None, num_classes=5, aux_loss=True).eval()
    own.load_state_dict(tv_model._net.state_dict())
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        assert torch.allclose(tv_model(x), own(x)["out"], atol=1e-5)
        seg = tv_model.seg_outputs(x, aux=True)
        assert len(seg["aux"]) == 1 and torch.allclose(seg["aux"][0], own(x)["aux"], atol=1e-5)
        assert tv_model.forward_cls(x).shape == (2, 10)


def test_its_groups_are_found_in_both_parts_with_depthwise_followers(tv_model):
    layers = tv_model.prunable_layers()
    parts = {lay.part for lay in layers}
    assert parts == {"backbone", "decoder"}
    # MobileNetV3's expand convs (blocks without squeeze-excitation) carry the depthwise conv's BN along
    assert any(lay.followers for lay in layers if lay.part == "backbone")
    # squeeze-excitation multiplies a block's channels: those blocks' expand convs are tied, not listed
    assert not any(".block.0.0" in lay.conv and lay.conv.startswith("backbone.4.") for lay in layers)


@pytest.mark.parametrize("method", ["uniform", "bn", "thinet"])
def test_the_pruned_torchvision_model_computes_what_the_masked_one_does(tv_model, method, tmp_path):
    kw = {"images": torch.randn(4, 3, 64, 64), "rescale": False} if method == "thinet" else {}
    pruned = _pruned_equals_masked_and_reloads(tv_model, tmp_path, method, **kw)  # ThiNet: via the dw consumers
    assert sum(p.numel() for p in pruned.parameters()) < 0.6 * sum(p.numel() for p in tv_model.parameters())
    arch = json.loads((tmp_path / "ck" / "arch.json").read_text())
    assert arch["model"] == TV and arch["model_args"] == {"aux_loss": True}
    assert arch["parts"] == {"backbone": ["backbone"], "decoder": ["classifier", "aux_classifier"]}


def test_a_model_without_prunable_decoder_groups_prunes_its_backbone():
    model = build_model("torchvision:lraspp_mobilenet_v3_large", 3, 10)
    assert {lay.part for lay in model.prunable_layers()} == {"backbone"}  # LR-ASPP gates its only conv-BN
    plan = prune(model, "uniform", 0.5)
    assert plan.layers and model(torch.randn(1, 3, 64, 64)).shape == (1, 3, 64, 64)
    grouped = build_model("torchvision:lraspp_mobilenet_v3_large", 3, 10, coupled="group")
    dec = [lay.conv for lay in grouped.prunable_layers() if lay.part == "decoder"]
    assert dec == ["decoder.classifier.cbr.0"]  # with its gate (the scale branch's conv) pruned along


FACTORY = """
import torch
from torch import nn


class Net(nn.Module):
    def __init__(self, num_classes, width=8):
        super().__init__()
        self.encoder = nn.Sequential(
            nn.Conv2d(3, width, 3, 2, 1, bias=False), nn.BatchNorm2d(width), nn.ReLU(),
            nn.Conv2d(width, 2 * width, 3, 2, 1, bias=False), nn.BatchNorm2d(2 * width), nn.ReLU(),
        )
        self.head = nn.Sequential(
            nn.Conv2d(2 * width, width, 3, 1, 1, bias=False), nn.BatchNorm2d(width), nn.ReLU(),
            nn.Conv2d(width, num_classes, 1),
        )

    def forward(self, x):
        return self.head(self.encoder(x))  # logits at 1/4 of the input: the wrapper resizes them


def make(num_classes, **kw):
    return Net(num_classes, **kw)
"""


def test_a_python_factory_with_found_parts(tmp_path):
    path = tmp_path / "mynet.py"
    path.write_text(FACTORY)
    model = build_model(f"python:{path}:make", 4, 10, model_args={"width": 8}).eval()
    assert model.parts == {"backbone": ["encoder"], "decoder": ["head"]}
    assert model(torch.randn(1, 3, 32, 32)).shape == (1, 4, 32, 32)
    assert [(lay.conv, lay.part) for lay in model.prunable_layers()] == [
        ("backbone.0", "backbone"),
        ("backbone.3", "backbone"),
        ("decoder.head.0", "decoder"),
    ]
    explicit = build_model(f"python:{path}:make", 4, 10, parts={"backbone": ["encoder"], "decoder": ["head"]})
    assert explicit.parts == model.parts


def test_bad_specs_are_one_line(tmp_path):
    (tmp_path / "flat.py").write_text(
        "from torch import nn\ndef make(n):\n    return nn.Sequential(nn.Conv2d(3, n, 1))\n"
    )
    with pytest.raises(UsageError, match="no 'backbone' or 'encoder' child.*--parts"):
        build_model(f"python:{tmp_path / 'flat.py'}:make", 4)
    with pytest.raises(UsageError, match="not a torchvision segmentation builder"):
        build_model("torchvision:resnet50", 4)
    with pytest.raises(UsageError, match="has no function 'nope'"):
        build_model(f"python:{tmp_path / 'flat.py'}:nope", 4)
    with pytest.raises(UsageError, match="file .* not found"):
        build_model(f"python:{tmp_path / 'missing.py'}:make", 4)
    (tmp_path / "mynet.py").write_text(FACTORY)
    with pytest.raises(UsageError, match="parameter 'head.0.weight' is in no part"):
        build_model(f"python:{tmp_path / 'mynet.py'}:make", 4, parts={"backbone": ["encoder"], "decoder": ["head.3"]})


def test_cli_init_with_weights_then_prune_and_cost(tmp_path, capsys):
    from torchvision.models.segmentation import lraspp_mobilenet_v3_large

    from mtprune.cli import main

    torch.manual_seed(1)
    own = lraspp_mobilenet_v3_large(weights=None, weights_backbone=None, num_classes=3).eval()
    torch.save(own.state_dict(), tmp_path / "trained.pth")
    ck, pr = tmp_path / "ck", tmp_path / "pr"
    spec = ["--model", "torchvision:lraspp_mobilenet_v3_large", "--num-classes", "3", "--cls-classes", "4"]
    assert main(["init", *spec, "--weights", str(tmp_path / "trained.pth"), "--out", str(ck)]) == 0
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        assert torch.allclose(load_model(ck)(x), own(x)["out"], atol=1e-5)  # the trained logits, imported
    assert main(["prune", "--checkpoint", str(ck), "--method", "uniform", "--ratio", "0.5", "--out", str(pr)]) == 0
    capsys.readouterr()
    assert main(["cost", "--checkpoint", str(pr), "--size", "64", "64", "--json"]) == 0
    cost = json.loads(capsys.readouterr().out)
    assert 0 < cost["params"] < sum(p.numel() for p in own.parameters())


def test_cli_init_weights_errors_are_one_line(tmp_path, capsys):
    from mtprune.cli import main

    spec = ["init", "--model", "torchvision:lraspp_mobilenet_v3_large", "--num-classes", "3"]
    from torchvision.models.segmentation import lraspp_mobilenet_v3_large

    state = lraspp_mobilenet_v3_large(weights=None, weights_backbone=None, num_classes=5).state_dict()
    torch.save(state, tmp_path / "five.pth")  # 5 classes: the logits convs do not fit 3
    assert main([*spec, "--weights", str(tmp_path / "five.pth"), "--out", str(tmp_path / "a")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert (
        len(err) == 1
        and "'classifier.low_classifier.weight' has shape (5, 40, 1, 1)" in err[0]
        and "five.pth" in err[0]
    )
    (tmp_path / "junk.pth").write_bytes(b"not a checkpoint")
    assert main([*spec, "--weights", str(tmp_path / "junk.pth"), "--out", str(tmp_path / "b")]) == 2
    assert "cannot read a state dict" in capsys.readouterr().err
    torch.save({"model": nn.Linear(2, 2)}, tmp_path / "pickled.pth")  # an object: refused, never unpickled
    assert main([*spec, "--weights", str(tmp_path / "pickled.pth"), "--out", str(tmp_path / "c")]) == 2
    assert "cannot read a state dict" in capsys.readouterr().err
    assert not (tmp_path / "a" / "arch.json").exists()


def test_a_config_trains_a_torchvision_model(tmp_path):
    from tests.test_train import cfg

    from mtprune.pipeline import run_stage

    c_sets = ("model.name=torchvision:deeplabv3_mobilenet_v3_large", 'model.model_args={"aux_loss": true}')
    c = cfg(*c_sets, "train_seg.epochs=0.05")
    run_stage("train-seg", c, tmp_path / "seg")
    model = load_model(tmp_path / "seg")
    assert model.name == "torchvision:deeplabv3_mobilenet_v3_large" and model.model_args == {"aux_loss": True}
    steps = [json.loads(line) for line in (tmp_path / "seg" / "metrics.jsonl").read_text().splitlines()]
    assert steps and all(r["loss"] > 0 for r in steps if "loss" in r)
    assert model(torch.randn(1, 3, 64, 64)).shape[1] == model.num_classes
    mtp = cfg(*c_sets, "sparse_mtp.rounds=1", "sparse_mtp.steps_cls=2", "sparse_mtp.steps_seg=2")
    m = run_stage("sparse-mtp", mtp, tmp_path / "mtp", init=str(tmp_path / "seg"))
    assert set(m["l1_shrink"]) == {"backbone", "decoder"}
    pruned = load_model(tmp_path / "mtp")
    plan = prune(pruned, "bn", 0.5, **scorer_inputs("bn", tmp_path / "mtp", mtp))
    assert plan.layers and pruned(torch.randn(1, 3, 64, 64)).shape[1] == model.num_classes


def test_a_python_model_checkpoint_carries_its_factory(tmp_path):
    src = tmp_path / "mynet.py"
    src.write_text(FACTORY)
    model = build_model(f"python:{src}:make", 4, 10).eval()
    prune(model, "uniform", 0.5)
    save_model(model, tmp_path / "ck")
    assert (tmp_path / "ck" / "model_src.py").read_text() == FACTORY
    src.write_text(FACTORY.replace("width=8", "width=16"))  # the original changes, then disappears
    src.unlink()
    back = load_model(tmp_path / "ck")
    x = torch.randn(1, 3, 32, 32)
    with torch.no_grad():
        assert torch.equal(back(x), model(x))
    save_model(back, tmp_path / "again")  # a loaded model saves its copy on
    assert (tmp_path / "again" / "model_src.py").read_text() == FACTORY


def test_an_smp_unet_prunes_saves_and_loads(tmp_path):
    pytest.importorskip("segmentation_models_pytorch")
    model = build_model("smp:Unet", 4, 10, model_args=UNET)
    assert model.parts == {"backbone": ["encoder"], "decoder": ["decoder", "segmentation_head"]}
    layers = model.prunable_layers()
    assert {lay.part for lay in layers} == {"backbone", "decoder"}
    assert "decoder.decoder.blocks.0.conv1.0" in [lay.conv for lay in layers]
    _spread_gammas(model)
    _pruned_equals_masked_and_reloads(model, tmp_path)
    with pytest.raises(UsageError, match="encoder_weights must be null"):
        build_model("smp:Unet", 4, model_args={"encoder_weights": "imagenet"})
    with pytest.raises(UsageError, match="smp:Nope: .*Wrong architecture"):
        build_model("smp:Nope", 4)


def test_coupled_group_prunes_a_mobilenet_s_residual_and_gated_channels(tmp_path):
    torch.manual_seed(0)
    model = build_model(TV, 5, 10, coupled="group")
    skip = build_model(TV, 5, 10)
    tied = [lay for lay in model.prunable_layers() if lay.tied]
    assert tied and len(model.prunable_layers()) > len(skip.prunable_layers())
    se = "backbone.4.block.0.0"  # the expand conv of a block with a squeeze-and-excitation gate
    assert se in {lay.conv for lay in model.prunable_layers()} - {lay.conv for lay in skip.prunable_layers()}
    _spread_gammas(model)
    from mtprune.pruning.scores import bn_scores  # a tied group's score: the sum of its BNs' |γ|

    s = bn_scores(model, tied[:1])[tied[0].conv]
    want = sum(model.get_submodule(n).weight.detach().abs() for n in tied[0].scored)
    assert torch.allclose(s, want)
    every_method_equals_masked(model, tmp_path)  # the SE gates' convs are cut with the channels they gate
    assert json.loads((tmp_path / "bn" / "ck" / "arch.json").read_text())["coupled"] == "group"


FIVE = {"mtp-0.5-independent", "slimming-0.5-independent", "uniform-0.5", "fpgm-0.5", "thinet-0.5"}


def _five_method_run(tmp_path, model_yaml: str) -> dict:
    """A tiny ``mtprune run`` (synthetic data) of ``model_yaml``'s model with MTP, Slimming, Uniform, FPGM and
    ThiNet at 0.5: its rows by tag, each pruned one smaller than dense."""
    from tests.test_pipeline import TINY

    from mtprune.cli import main

    cfg_path = tmp_path / "c.yaml"
    cfg_path.write_text(
        model_yaml + "run:\n  methods: [mtp, slimming, uniform, fpgm, thinet]\n  thinet_samples: 4\n"
        "  ratios: [0.5]\n  latency: false\n"
    )
    argv = ["run", str(cfg_path), "--out", str(tmp_path / "run")]
    for s in [*TINY, "eval.every_epoch=false"]:
        if not s.startswith(("run.", "model.")):
            argv += ["--set", s]
    assert main(argv) == 0
    rows = {r["tag"]: r for r in json.loads((tmp_path / "run" / "results.json").read_text())}
    assert set(rows) == {"dense"} | FIVE
    assert all(0 < rows[t]["params_ratio"] < 1 for t in FIVE)
    return rows


def test_mtprune_run_and_export_on_a_torchvision_model(tmp_path, capsys):
    """The whole pipeline on torchvision's LR-ASPP (its decoder has no prunable group: the independent
    decoder threshold has nothing to cut), then ONNX export of a pruned net."""
    from mtprune.cli import main

    _five_method_run(tmp_path, "model: {name: 'torchvision:lraspp_mobilenet_v3_large'}\n")
    capsys.readouterr()
    pytest.importorskip("onnxruntime")
    onnx = tmp_path / "m.onnx"
    ck = str(tmp_path / "run" / "finetune-uniform-0.5")
    assert main(["export", "--checkpoint", ck, "--onnx", str(onnx), "--size", "64", "64", "--check"]) == 0
    assert onnx.is_file() and onnx.stat().st_size > 0


@pytest.mark.parametrize("spec, args, coupled", NAMED)
def test_every_method_s_plan_equals_the_masked_net_and_exports(spec, args, coupled, tmp_path):
    if spec.startswith("smp:"):
        pytest.importorskip("segmentation_models_pytorch")
    torch.manual_seed(0)
    model = build_model(spec, 4, 10, model_args=args, coupled=coupled)
    assert {lay.part for lay in model.prunable_layers()} == {"backbone", "decoder"}
    _spread_gammas(model)
    every_method_equals_masked(model, tmp_path)
    pytest.importorskip("onnxruntime")
    from mtprune.export import compare_onnx, export_onnx

    pruned = load_model(tmp_path / "bn" / "ck")
    diff = compare_onnx(pruned, export_onnx(pruned, tmp_path / "m.onnx", (64, 64)), (64, 64))
    assert diff["max_rel_diff"] < 1e-4


@pytest.mark.parametrize("spec, args, coupled", NAMED[1:])
def test_a_tiny_run_with_every_method_completes(spec, args, coupled, tmp_path):
    """``mtprune run`` with MTP, Slimming, Uniform, FPGM and ThiNet on each named model (LR-ASPP's in the
    run-and-export test, the README model's in test_readme_model)."""
    if spec.startswith("smp:"):
        pytest.importorskip("segmentation_models_pytorch")
    _five_method_run(tmp_path, f"model: {{name: '{spec}', model_args: {json.dumps(args)}, coupled: {coupled}}}\n")


def test_an_smp_net_that_needs_divisible_sizes_gets_any_size_padded_and_cropped_back():
    pytest.importorskip("segmentation_models_pytorch")
    model = build_model("smp:DeepLabV3Plus", 4, 10, model_args={"encoder_name": "mobilenet_v2"}).eval()
    assert model.pad_to == 16  # its encoder's output stride; smp itself refuses 40×40
    x = torch.randn(1, 3, 40, 40)
    with torch.no_grad():
        want = model._net(torch.nn.functional.pad(x, (0, 8, 0, 8)))[..., :40, :40]
        assert torch.equal(model(x), want) and model(torch.randn(1, 3, 48, 48)).shape == (1, 4, 48, 48)
    assert build_model("smp:Unet", 4, 10, model_args=UNET).pad_to == 1  # smp's U-Net takes any size


def test_batchnorm_folds_into_a_wrapped_net_that_torch_fx_cannot_trace(tmp_path):
    """``cost --best`` / ``--fold-bn`` on a torchvision or smp net: folded module by module on the dependency
    graph (torch.fx cannot trace the wrapper, whose forward is the net's own), same logits."""
    from mtprune.cost import fold_batchnorm

    torch.manual_seed(0)
    model = build_model("torchvision:lraspp_mobilenet_v3_large", 4, 10)
    _spread_gammas(model)
    folded = fold_batchnorm(model)
    assert not any(isinstance(m, nn.BatchNorm2d) for m in folded.modules())
    assert any(isinstance(m, nn.BatchNorm2d) for m in model.modules())  # the original is unchanged
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        want = model.eval()(x)
        assert torch.allclose(folded(x), want, atol=1e-4 * float(want.abs().max()))
