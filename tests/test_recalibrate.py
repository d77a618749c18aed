"""BatchNorm statistics re-estimated after pruning (``recalibrate_bn``, EagleEye's adaptive BN)."""

from __future__ import annotations

import copy
import json

import pytest
import torch
from tests.conftest import tiny
from torch import nn

from mtprune.cli import main
from mtprune.config import load_config
from mtprune.errors import UsageError
from mtprune.pipeline.stages import prune_recipe
from mtprune.pruning import apply_plan, make_plan, prune, recalibrate_bn
from mtprune.pruning.recalibrate import _batches


def _net() -> nn.Sequential:
    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv2d(3, 6, 3, padding=1), nn.BatchNorm2d(6), nn.ReLU(), nn.Dropout(0.9),
                        nn.Conv2d(6, 4, 1), nn.BatchNorm2d(4))  # fmt: skip
    for bn in (net[1], net[5]):  # stale statistics, as a dense net's BN has after pruning
        bn.running_mean.fill_(5.0)
        bn.running_var.fill_(9.0)
    return net.eval()


def test_running_statistics_become_the_batch_statistics_of_the_images_and_nothing_else_changes():
    net = _net()
    before = {k: v.clone() for k, v in net.state_dict().items() if "running" not in k and "num_batches" not in k}
    x = torch.randn(6, 3, 10, 12, generator=torch.Generator().manual_seed(1))
    assert recalibrate_bn(net, [x]) == 6
    h = net[0](x)  # by hand: the first BN's input over images × pixels
    assert torch.allclose(net[1].running_mean, h.mean((0, 2, 3)), atol=1e-5)
    assert torch.allclose(net[1].running_var, h.var((0, 2, 3), unbiased=True), atol=1e-4)
    bn1 = net[1]  # in the pass, the first BN normalised with its batch's statistics; dropout was off
    h2 = net[4](net[2](nn.functional.batch_norm(h, None, None, bn1.weight, bn1.bias, training=True)))
    assert torch.allclose(net[5].running_mean, h2.mean((0, 2, 3)), atol=1e-5)
    assert not net.training and all(m.momentum == 0.1 for m in (net[1], net[5]))
    net.eval()
    after = {k: v for k, v in net.state_dict().items() if k in before}
    assert all(torch.equal(before[k], after[k]) for k in before)  # weights, γ, β untouched


def test_two_batches_average_their_statistics_and_a_short_last_batch_joins_the_one_before():
    net = _net()
    a, b = (torch.randn(4, 3, 8, 8, generator=torch.Generator().manual_seed(s)) for s in (2, 3))
    recalibrate_bn(net, [a, b], batch_size=4)
    means = [net[0](t).mean((0, 2, 3)) for t in (a, b)]
    assert torch.allclose(net[1].running_mean, (means[0] + means[1]) / 2, atol=1e-5)
    imgs = [torch.zeros(3, 8, 8)] * 17
    assert [t.shape[0] for t in _batches(imgs, 8)] == [8, 9]  # 17 = 8 + 8 + 1: the 1 joins
    assert [t.shape[0] for t in _batches([torch.zeros(5, 3, 8, 8), torch.zeros(3, 3, 6, 6)], 8)] == [5, 3]
    assert [t.shape[0] for t in _batches([torch.zeros(5, 3, 8, 8), torch.zeros(1, 3, 6, 6)], 8)] == [5]  # alone
    with pytest.raises(UsageError, match="at least 2 training images"):
        recalibrate_bn(_net(), [torch.zeros(3, 8, 8)])
    with pytest.raises(UsageError, match="batch_size must be ≥ 2"):
        recalibrate_bn(_net(), imgs, batch_size=1)


def test_modes_survive_per_module_and_a_failed_pass_leaves_every_statistic_as_it_was():
    net = _net().train()
    net[5].eval()  # a BN kept frozen on purpose
    x = torch.randn(4, 3, 8, 8)
    recalibrate_bn(net, [x])
    assert [m.training for m in net] == [True, True, True, True, True, False]
    bad = _net()
    stale = {k: v.clone() for k, v in bad.state_dict().items()}
    bad[4] = nn.Conv2d(5, 4, 1)  # the pass fails after the first BN was re-estimated: 6 channels into 5
    with pytest.raises(RuntimeError):
        recalibrate_bn(bad, [x])
    assert torch.equal(bad[1].running_mean, stale["1.running_mean"]) and bad[1].momentum == 0.1
    assert int(bad[1].num_batches_tracked) == int(stale["1.num_batches_tracked"]) and not bad.training
    assert recalibrate_bn(nn.Sequential(nn.Conv2d(3, 4, 1), nn.ReLU()), [x]) == 0  # no BN: nothing to do


def test_a_batchnorm_the_segmentation_forward_does_not_reach_keeps_its_statistics():
    model = tiny("deeplabv3_efficientnet_lite0", width=0.25)
    head = [n for n, m in model.named_modules() if isinstance(m, nn.BatchNorm2d) and n.startswith("cls_head")]
    assert head  # EfficientNet's classification head conv has a BN that only forward_cls runs
    before = {n: model.get_submodule(n).running_mean.clone() for n in head}
    recalibrate_bn(model, [torch.randn(4, 3, 32, 32)])
    assert all(torch.equal(model.get_submodule(n).running_mean, before[n]) for n in head)


def test_a_pruned_segmentation_net_gets_statistics_of_its_own_features():
    model = tiny("deeplabv3_resnet18", width=0.25)
    images = [torch.randn(4, 3, 32, 32, generator=torch.Generator().manual_seed(4))]
    stale = copy.deepcopy(model)
    plan = prune(model, "uniform", 0.5, recalibrate=images)
    apply_plan(stale, plan)
    bns = [n for n, m in model.named_modules() if isinstance(m, nn.BatchNorm2d)]
    first = bns[0]  # the stem's BN: its input is the stem conv's output, the same in train and eval mode
    seen: dict[str, torch.Tensor] = {}
    hook = stale.get_submodule(first).register_forward_pre_hook(lambda _m, inp: seen.setdefault("x", inp[0]))
    with torch.no_grad():
        stale.seg_outputs(images[0], aux=True)
    hook.remove()
    assert torch.allclose(model.get_submodule(first).running_mean, seen["x"].mean((0, 2, 3)), atol=1e-5)
    assert torch.allclose(model.get_submodule(first).running_var, seen["x"].var((0, 2, 3)), atol=1e-4)
    moved = [n for n in bns if not torch.allclose(model.get_submodule(n).running_mean,
                                                  stale.get_submodule(n).running_mean, atol=1e-3)]  # fmt: skip
    assert moved == bns  # every BN of the net, decoder and auxiliary heads included, re-estimated
    # the plan is the same as without recalibration: only the statistics moved
    assert {n: lp.kept for n, lp in plan.layers.items()} == {
        n: lp.kept for n, lp in make_plan(tiny("deeplabv3_resnet18", width=0.25), "uniform", 0.5).layers.items()
    }


def _argv(tmp_path, *extra: str) -> list[str]:
    return ["prune", "--model", "deeplabv3_resnet18", "--num-classes", "4", "--width", "0.125", "--method",
            "uniform", "--ratio", "0.5", "--size", "32", "32", "--out", str(tmp_path / "out"),
            "--set", "data.seg.crop_size=[48,48]", *extra]  # fmt: skip


def test_cli_recalibrates_with_the_config_s_training_images_and_says_so_in_plan_json(tmp_path):
    assert main(_argv(tmp_path, "--set", "run.recalibrate_bn=6")) == 0
    plan = json.loads((tmp_path / "out" / "plan.json").read_text())
    assert plan["cost"]["recalibrate_bn"] == 6


@pytest.mark.parametrize(
    "extra, needle",
    [
        ([], "--set: only with --method thinet (or --set run.recalibrate_bn=N)"),
        (["--set", "run.recalibrate_bn=-1"], "run.recalibrate_bn: -1 must be >= 0"),
        (["--set", "run.recalibrate_bn=4", "--set", "run.round_to=auto"], "--set run.round_to: mtprune prune takes"),
        (
            ["--set", "run.recalibrate_bn=4", "--set", "data.seg.options.num_samples=0"],
            "recalibrate_bn needs training images: the seg training set is empty",
        ),
    ],
)
def test_cli_bad_recalibration_input_is_one_line_exit_2_nothing_written(tmp_path, capsys, extra, needle):
    assert main(_argv(tmp_path, *extra)) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and needle in err
    assert not (tmp_path / "out").exists()


def test_the_prune_recipe_names_recalibration_only_when_it_is_on(tmp_path):
    off = prune_recipe(tmp_path, "uniform", 0.5, "independent", load_config(None, []))["config"]
    on = prune_recipe(tmp_path, "uniform", 0.5, "independent", load_config(None, ["run.recalibrate_bn=8"]))["config"]
    assert "run.recalibrate_bn" not in off and "data.seg.root" not in off  # old runs' recipes stay as they were
    assert on["run.recalibrate_bn"] == 8 and "seed" in on and any(k.startswith("data.seg") for k in on)
