"""Removing switched-off channels without losing their constant output (pruning/compensate.py)."""

from __future__ import annotations

import copy

import pytest
import torch
import torch_pruning as tp
from tests.conftest import tiny
from torch import nn

from mtprune.pruning import apply_plan, make_plan, prune
from mtprune.pruning.compensate import constant_inputs, fold_removed_constants


def _chain() -> nn.Sequential:
    """conv 3×3 → BN → ReLU → conv 1×1 (no bias) → BN → ReLU6 → conv 1×1 (bias): both paths of a fold."""
    torch.manual_seed(0)
    net = nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1, bias=False),
        nn.BatchNorm2d(8),
        nn.ReLU(),
        nn.Conv2d(8, 6, 1, bias=False),
        nn.BatchNorm2d(6),
        nn.ReLU6(),
        nn.Conv2d(6, 4, 1),
    )
    with torch.no_grad():
        for bn in (net[1], net[4]):
            bn.weight.uniform_(0.5, 1.5)
            bn.bias.uniform_(0.2, 1.0)  # switched-off channels output ReLU(β) > 0: removing them changes the net
            bn.running_mean.uniform_(-0.2, 0.2)
            bn.running_var.uniform_(0.5, 1.5)
        net[1].weight[[1, 5]] = 0.0  # switched off: channels 1 and 5 output the constant ReLU(β)
        net[4].weight[[2]] = 0.0
    return net.eval()


def _prune(net: nn.Sequential, compensate: bool) -> nn.Sequential:
    net = copy.deepcopy(net)
    dg = tp.DependencyGraph().build_dependency(net, example_inputs=torch.randn(1, 3, 16, 16))
    names = {id(m): n for n, m in net.named_modules()}
    consts = constant_inputs(net, size=(16, 16)) if compensate else None
    for conv, drop in ((net[0], [1, 5]), (net[3], [2])):
        group = dg.get_pruning_group(conv, tp.prune_conv_out_channels, idxs=drop)
        if consts is not None:
            fold_removed_constants(group, dg, names, consts)
        group.prune()
    return net


def test_constant_inputs_finds_exactly_the_switched_off_channels_and_their_values():
    net = _chain()
    consts = constant_inputs(net, size=(16, 16))
    assert torch.isnan(consts["0"]).all()  # the image: varies
    fixed = (~torch.isnan(consts["3"])).nonzero().flatten().tolist()
    assert fixed == [1, 5]
    assert torch.allclose(consts["3"][fixed], torch.relu(net[1].bias[fixed]).detach())
    assert (~torch.isnan(consts["6"])).nonzero().flatten().tolist() == [2]
    assert torch.allclose(consts["6"][2], torch.clamp(net[4].bias[2], 0, 6).detach())


def test_pruning_switched_off_channels_with_their_constants_folded_leaves_the_output_equal():
    net = _chain()
    x = torch.randn(2, 3, 16, 16)
    with_fold, without = _prune(net, compensate=True), _prune(net, compensate=False)
    with torch.no_grad():
        ref = net(x)
        folded = with_fold(x)  # through the next BN's running mean, and through a bias
        dropped = without(x)
    assert folded.shape == ref.shape
    assert torch.allclose(folded, ref, atol=1e-5)
    assert (dropped - ref).abs().max() > 0.05  # without the fold the constants are lost


def test_compensation_in_training_mode_is_absorbed_by_the_batch_statistics():
    net = _chain()
    pruned = _prune(net, compensate=True).train()
    plain = _prune(net, compensate=False).train()
    x = torch.randn(4, 3, 16, 16)
    with torch.no_grad():  # a BN in training mode normalises with the batch mean: a folded shift changes nothing
        assert torch.allclose(pruned[:5](x), plain[:5](x), atol=1e-5)


@pytest.mark.parametrize("name", ["deeplabv3_efficientnet_lite0", "deeplabv3_resnet18"])
def test_prune_with_compensate_keeps_a_sparse_net_s_function_where_dropping_loses_it(name):
    net = tiny(name, width=0.25)
    plan = make_plan(net, "bn", 0.5)
    layers = {lay.conv: lay for lay in net.prunable_layers()}
    with torch.no_grad():  # what a sparse stage leaves: the removed channels' γ at 0, β as trained
        for conv, lp in plan.layers.items():
            drop = sorted(set(range(lp.channels)) - set(lp.kept))
            for bn in layers[conv].all_bns:
                net.get_submodule(bn).weight[drop] = 0.0
    x = torch.randn(1, 3, 320, 320)
    errors = {}
    for compensate in (True, False):
        pruned = copy.deepcopy(net)
        got = prune(pruned, "bn", 0.5, compensate=compensate)
        assert got.layers == plan.layers
        with torch.no_grad():
            errors[compensate] = (pruned.eval()(x) - net(x)).abs()[..., 100:-100, 100:-100].max().item()
    # the centre: exact up to what the zero-padded borders and the global pooling branch carry inward
    assert errors[True] < 0.01 < errors[False]


def test_without_switched_off_channels_compensation_changes_nothing():
    net = tiny("deeplabv3_resnet18", width=0.25)  # every γ > 0: no channel is constant
    plan = make_plan(net, "bn", 0.5)
    a, b = copy.deepcopy(net), copy.deepcopy(net)
    apply_plan(a, plan, constants=constant_inputs(a))
    apply_plan(b, plan)
    for (ka, va), (kb, vb) in zip(a.state_dict().items(), b.state_dict().items(), strict=True):
        assert ka == kb and torch.equal(va, vb), ka


def test_the_prune_request_and_the_run_s_prune_recipe_carry_compensate(tmp_path):
    from mtprune.api import PruneRequest, prune_model
    from mtprune.config import Config
    from mtprune.pipeline.stages import prune_recipe

    result = prune_model(PruneRequest(tiny("deeplabv3_resnet18"), "bn", 0.5, size=(64, 64), compensate=True))
    assert result.summary["compensate"] is True
    cfg = Config()
    assert prune_recipe(tmp_path, "mtp", 0.5, "independent", cfg)["config"]["run.compensate"] is False
    cfg.run.compensate = True
    assert prune_recipe(tmp_path, "mtp", 0.5, "independent", cfg)["config"]["run.compensate"] is True
