from __future__ import annotations

import copy
import math

import pytest
import torch
from tests.conftest import tiny

from mtprune.cost import count_macs, count_params
from mtprune.errors import UsageError
from mtprune.models.base import BACKBONE, DECODER
from mtprune.pruning import apply_plan, compute_plan, make_plan, mask_plan
from mtprune.pruning.plan import PruningPlan


@pytest.mark.parametrize("thresholds", ["independent", "unified", "layerwise"])
def test_pruned_output_equals_masked_output(tiny_model, thresholds):
    plan = make_plan(tiny_model, "bn", 0.5, thresholds)
    masked = mask_plan(copy.deepcopy(tiny_model), plan)
    pruned = apply_plan(copy.deepcopy(tiny_model), plan)
    x = torch.randn(2, 3, 64, 72)
    with torch.no_grad():
        assert (pruned(x) - masked(x)).abs().max() < 1e-5
        assert (pruned.forward_cls(x) - masked.forward_cls(x)).abs().max() < 1e-5
        for a, b in zip(pruned.seg_outputs(x, aux=True)["aux"], masked.seg_outputs(x, aux=True)["aux"], strict=True):
            assert (a - b).abs().max() < 1e-5
        # the masking is not a no-op: the dense net computes something else
        assert (tiny_model(x) - masked(x)).abs().max() > 1e-3
    assert count_params(pruned) < count_params(tiny_model)
    assert count_macs(pruned, (64, 64)) < count_macs(tiny_model, (64, 64))
    for name, lp in plan.layers.items():
        conv = pruned.get_submodule(name)
        assert conv.out_channels == len(lp.kept)
    bn_of = {lay.conv: lay.bn for lay in pruned.prunable_layers()}
    for name, lp in plan.layers.items():
        assert pruned.get_submodule(bn_of[name]).num_features == len(lp.kept)


def _removed(plan: PruningPlan, part: str | None) -> tuple[int, int]:
    ls = [lp for lp in plan.layers.values() if part is None or lp.part == part]
    return sum(lp.channels - len(lp.kept) for lp in ls), sum(lp.channels for lp in ls)


@pytest.mark.parametrize("ratio", [0.25, 0.5, 0.7])
def test_independent_thresholds_remove_p_of_each_part(ratio):
    m = tiny("deeplabv3_resnet50", seed=3)
    plan = make_plan(m, "bn", ratio, "independent")
    for part in (BACKBONE, DECODER):
        removed, n = _removed(plan, part)
        assert removed == math.floor(ratio * n)  # min_channels never binds here
    # scores below each threshold are removed, scores above kept
    bn_of = {lay.conv: lay.bn for lay in m.prunable_layers()}
    for name, lp in plan.layers.items():
        g = m.get_submodule(bn_of[name]).weight.abs()
        tau = plan.tau[lp.part]
        drop = sorted(set(range(lp.channels)) - set(lp.kept))
        assert all(g[i] <= tau for i in drop) and all(g[i] >= tau for i in lp.kept)


def test_unified_threshold_removes_p_overall_and_differs_from_independent():
    m = tiny("deeplabv3_resnet50", seed=4)
    # make the decoder's γ systematically smaller: a unified threshold then prunes it harder
    with torch.no_grad():
        for lay in m.prunable_layers():
            if lay.part == DECODER:
                m.get_submodule(lay.bn).weight.mul_(0.5)
    uni = make_plan(m, "bn", 0.5, "unified")
    ind = make_plan(m, "bn", 0.5, "independent")
    removed, n = _removed(uni, None)
    assert removed == math.floor(0.5 * n)
    assert uni.removed_fraction(DECODER) > 0.6 > ind.removed_fraction(DECODER)
    assert set(uni.tau) == {"all"} and set(ind.tau) == {BACKBONE, DECODER}


def test_layerwise_thresholds_keep_uniforms_counts_with_the_gammas_choice():
    m = tiny("deeplabv3_resnet50", seed=4)
    with torch.no_grad():  # a decoder of smaller γ: independent / unified thresholds would prune it harder
        for lay in m.prunable_layers():
            if lay.part == DECODER:
                m.get_submodule(lay.bn).weight.mul_(0.5)
    lw = make_plan(m, "bn", 0.5, "layerwise")
    uni = make_plan(m, "uniform", 0.5)
    bn_of = {lay.conv: lay.bn for lay in m.prunable_layers()}
    assert lw.tau == {}
    for name, lp in lw.layers.items():
        assert len(lp.kept) == len(uni.layers[name].kept) == lp.channels - math.floor(0.5 * lp.channels)
        g = m.get_submodule(bn_of[name]).weight.abs()
        drop = sorted(set(range(lp.channels)) - set(lp.kept))
        assert max(g[i] for i in drop) <= min(g[i] for i in lp.kept)  # this layer's lowest |γ| went
    assert any(lw.layers[n].kept != uni.layers[n].kept for n in lw.layers)  # γ chose, not the filter norm


def test_equal_scores_still_prune_exactly_p_spread_over_layers():
    m = tiny("deeplabv3_resnet18")
    with torch.no_grad():
        for lay in m.prunable_layers():
            m.get_submodule(lay.bn).weight.fill_(1.0)
    plan = make_plan(m, "bn", 0.5)
    for part in (BACKBONE, DECODER):
        removed, n = _removed(plan, part)
        assert removed == n // 2
    # the tie rule spreads removal: every layer keeps about half of its channels
    assert all(abs(len(lp.kept) / lp.channels - 0.5) <= 0.1 for lp in plan.layers.values())


def test_min_channels_and_round_to():
    from mtprune.models.base import PrunableLayer

    layers = [PrunableLayer("a", "a_bn", BACKBONE), PrunableLayer("b", "b_bn", BACKBONE)]
    scores = {"a": torch.full((10,), 0.01), "b": torch.arange(1.0, 31.0)}
    plan = compute_plan(scores, layers, 0.5, "global", min_channels=3)
    assert plan.layers["a"].kept == [0, 1, 2]  # all 10 removed by rank; 3 restored, equal scores: lowest index
    assert len(plan.layers["b"].kept) == 30 - 10  # 20 removed in total, 10 of them from b
    plan8 = compute_plan(scores, layers, 0.5, "global", min_channels=1, round_to=8)
    assert [len(lp.kept) for lp in plan8.layers.values()] == [8, 24]
    # round_to keeps the best-scored channels of b: the 24 largest
    assert plan8.layers["b"].kept == list(range(6, 30))


def test_uniform_keeps_the_same_fraction_by_l1_norm():
    m = tiny("pspnet_resnet18")
    conv = m.get_submodule(m.prunable_layers()[0].conv)
    with torch.no_grad():
        conv.weight[3].zero_()  # the smallest filter must go first
    plan = make_plan(m, "uniform", 0.25)
    for lp in plan.layers.values():
        assert lp.channels - len(lp.kept) == math.floor(0.25 * lp.channels)
    assert 3 not in plan.layers[m.prunable_layers()[0].conv].kept


def test_bad_ratio_method_and_plan_are_refused():
    m = tiny("deeplabv3_resnet18")
    for bad in (0.0, 1.0, -0.1, 1.5):
        with pytest.raises(UsageError, match="ratio"):
            make_plan(m, "bn", bad)
    with pytest.raises(UsageError, match="unknown pruning method 'magic'"):
        make_plan(m, "magic", 0.5)
    plan = make_plan(m, "bn", 0.5)
    other = tiny("bisenet_resnet18")
    with pytest.raises(UsageError, match="not a prunable layer|channels"):
        apply_plan(other, plan)


def test_plan_roundtrips_through_json():
    import json

    m = tiny("bisenet_resnet18")
    plan = make_plan(m, "bn", 0.5, round_to=4)
    again = PruningPlan.from_dict(json.loads(json.dumps(plan.to_dict())))
    assert again.layers == plan.layers and again.ratio == 0.5 and again.round_to == 4


@pytest.mark.slow
def test_uniform_deeplabv3_resnet101_matches_measured_costs():
    from mtprune.models import build_model

    m = build_model("deeplabv3_resnet101", 21)
    apply_plan(m, make_plan(m, "uniform", 0.25))
    assert round(count_params(m) / 1e6, 2) == 40.51
    assert round(count_macs(m, (513, 513)) / 1e9, 2) == 49.64
