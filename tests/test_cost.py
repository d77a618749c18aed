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
