from __future__ import annotations

import pytest
import torch
from tests.conftest import tiny
from torch import nn

from mtprune.errors import UsageError
from mtprune.evaluate.cost import count_macs, count_params, measure_latency


class SmallNet(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, 8, 3, padding=1, bias=False)
        self.bn = nn.BatchNorm2d(8)
        self.conv2 = nn.Conv2d(8, 16, 3, stride=2, padding=1)
        self.fc = nn.Linear(16, 10)

    def forward(self, x):
        x = torch.relu(self.bn(self.conv1(x)))
        x = self.conv2(x)
        return self.fc(x.mean((2, 3)))


def test_macs_of_a_small_conv_net_equal_a_hand_count():
    # conv1: 32·32 outputs × 8 channels × (3·3·3) MACs; conv2: 16·16 × 16 × (8·3·3); fc: 16·10
    hand = 32 * 32 * 8 * 27 + 16 * 16 * 16 * 72 + 16 * 10
    assert count_macs(SmallNet(), (32, 32)) == hand
    assert count_params(SmallNet()) == 8 * 27 + 16 + 16 * 72 + 16 + 16 * 10 + 10


def test_params_leave_out_training_only_heads():
    m = tiny("bisenet_resnet18")
    total = sum(p.numel() for p in m.parameters())
    heads = sum(p.numel() for p in m.cls_head.parameters()) + sum(p.numel() for p in m.decoder.aux_heads.parameters())
    assert count_params(m) == total - heads


@pytest.mark.slow
def test_deeplabv3_resnet101_matches_the_papers_counting():
    from mtprune.models import build_model

    with torch.device("meta"):
        m = build_model("deeplabv3_resnet101", 21)
    assert round(count_params(m) / 1e6, 2) == 58.63
    m = build_model("deeplabv3_resnet101", 21)
    assert round(count_macs(m, (513, 513)) / 1e9, 2) == 71.70


def test_latency_reports_median_and_iqr():
    lat = measure_latency(SmallNet(), (16, 16), runs=20, warmup=1)
    assert lat.runs == 20 and lat.latency_ms > 0 and lat.latency_iqr_ms >= 0
    with pytest.raises(UsageError, match="at least 20"):
        measure_latency(SmallNet(), (16, 16), runs=5)


@pytest.mark.parametrize("name", ["deeplabv3_resnet18", "pspnet_resnet18", "bisenet_resnet18"])
def test_folded_batchnorm_computes_the_same_output(name):
    from mtprune.evaluate.cost import fold_batchnorm
    from mtprune.pruning import prune

    torch.manual_seed(0)
    m = tiny(name)
    with torch.no_grad():  # non-trivial BN statistics
        for bn in m.modules():
            if isinstance(bn, nn.BatchNorm2d):
                bn.running_mean.uniform_(-0.5, 0.5)
                bn.running_var.uniform_(0.5, 2.0)
                bn.weight.uniform_(0.1, 1.0)
    prune(m, "bn", 0.5)
    m.eval()
    folded = fold_batchnorm(m)
    assert not any(isinstance(q, nn.BatchNorm2d) for q in folded.modules())
    assert any(isinstance(q, nn.BatchNorm2d) for q in m.modules())  # the original is untouched
    x = torch.randn(2, 3, 48, 64)
    with torch.no_grad():
        ref, out = m(x), folded(x)
    assert out.shape == ref.shape
    assert (out - ref).abs().max().item() < 1e-4 * max(1.0, ref.abs().max().item())
    assert count_macs(folded, (48, 64)) == count_macs(m, (48, 64))


def test_per_layer_macs_add_up_to_the_model_and_shrink_with_pruning():
    from mtprune.evaluate.cost import layer_latency
    from mtprune.pruning import prune

    torch.manual_seed(0)
    m = tiny("deeplabv3_resnet18")
    rows, total = layer_latency(m, (48, 64), runs=2, warmup=1)
    convs = [r for r in rows if r.kind.startswith("Conv2d")]
    # every conv the forward runs, with its own MACs; the classification head is not run
    assert len(convs) == sum(isinstance(q, nn.Conv2d) for q in m.modules())
    assert sum(r.macs for r in rows) == count_macs(m, (48, 64))
    assert all(r.ms > 0 for r in rows) and total > 0
    stem = next(r for r in rows if r.name == "backbone.conv1")
    assert stem.kind == "Conv2d 7×7 s2 d1" and stem.in_channels == 3 and stem.out_size == (24, 32)
    # the hand count of the stem: 24·32 outputs × C_out × 3·7·7
    assert stem.macs == 24 * 32 * stem.out_channels * 3 * 49
    prune(m, "uniform", 0.5)
    pruned, _ = layer_latency(m, (48, 64), runs=2, warmup=1, fold_bn=True, channels_last=True)
    assert not any(r.kind == "BatchNorm2d" for r in pruned)  # folded into the convs
    p1 = next(r for r in pruned if r.name == "backbone.layer1.0.conv1")
    d1 = next(r for r in rows if r.name == "backbone.layer1.0.conv1")
    assert p1.out_channels < d1.out_channels and p1.macs * d1.out_channels == d1.macs * p1.out_channels
    assert sum(r.macs for r in pruned) == count_macs(m, (48, 64))


def test_best_latency_times_every_configuration_and_picks_the_fastest():
    from mtprune.evaluate.cost import best_latency

    out = best_latency(tiny("deeplabv3_resnet18"), (32, 32), runs=20, warmup=1)
    configs = out["configs"]
    assert [(c["layout"], c["fold_bn"]) for c in configs] == [
        ("contiguous", False),
        ("contiguous", True),
        ("channels_last", False),
        ("channels_last", True),
    ]
    assert out["best"]["latency_ms"] == min(c["latency_ms"] for c in configs)


def test_interleaved_latency_pairs_rounds_and_copies_shared_models():
    from mtprune.evaluate.cost import Setup, interleaved_latency, paired_ratio

    m = tiny("deeplabv3_resnet18")
    setups = {"a": Setup(), "b": Setup(channels_last=True), "c": Setup(fold_bn=True)}
    out = interleaved_latency(dict.fromkeys(setups, m), (32, 32), runs=20, warmup=1, reference="a", setups=setups)
    assert all(len(out[k]["times_ms"]) == 20 for k in setups)
    assert out["a"]["ratio"] == 1.0 and out["a"]["ratio_iqr"] == 0.0
    assert out["b"]["ratio"] == paired_ratio(out["b"]["times_ms"], out["a"]["times_ms"])["ratio"]
    assert m.backbone.conv1.weight.is_contiguous()  # the channels_last entry ran on its own copy
    assert paired_ratio([2.0, 4.0, 9.0], [1.0, 2.0, 3.0])["ratio"] == 2.0
    with pytest.raises(UsageError, match="reference 'dense' is not one of the nets"):
        interleaved_latency({"a": m}, (32, 32), runs=20, reference="dense")


@pytest.mark.slow
def test_compiled_nets_are_timed_compiled_side_by_side():
    """Two nets of the same class compiled in one round-robin: each gets its own frozen graph (a recompile
    limit hit would raise instead of silently timing eager code)."""
    from mtprune.evaluate.cost import Setup, interleaved_latency
    from mtprune.pruning import prune

    a = tiny("deeplabv3_resnet18", width=0.125)
    b = tiny("deeplabv3_resnet18", width=0.125)
    prune(b, "bn", 0.5)
    st = Setup(channels_last=True, fold_bn=True, compile=True)
    out = interleaved_latency({"a": a, "b": b}, (32, 32), runs=20, warmup=1, setups={"a": st, "b": st}, reference="a")
    assert out["b"]["ratio"] > 0 and len(out["b"]["times_ms"]) == 20
