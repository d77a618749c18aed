"""Prunable channel groups found from the dependency graph (issue 18): for every built-in net they equal
the lists its class declares, so results do not change; the rule itself on small hand-made nets."""

from __future__ import annotations

import pytest
import torch
from torch import nn
from torchvision.models import resnet as tvr

from mtprune import build_model
from mtprune.errors import UsageError
from mtprune.models import MODELS
from mtprune.models.base import PrunableLayer
from mtprune.models.groups import dependency_graph, discover_prunable_layers

PARTS = {"backbone": ["backbone"], "decoder": ["decoder"]}


def _hand_written(model) -> list[PrunableLayer]:
    """The lists each built-in family declared by hand before its groups were discovered (frozen here)."""
    bb = []
    for lname in ("layer1", "layer2", "layer3", "layer4"):
        for i, blk in enumerate(getattr(model.backbone, lname)):
            for k in (1, 2) if isinstance(blk, tvr.Bottleneck) else (1,):
                bb.append(PrunableLayer(f"backbone.{lname}.{i}.conv{k}", f"backbone.{lname}.{i}.bn{k}", "backbone"))
    if model.family == "deeplabv3":
        n = model.decoder.num_branches
        dec = [(f"decoder.aspp.convs.{i}.0", f"decoder.aspp.convs.{i}.1") for i in range(n - 1)]
        dec += [(f"decoder.aspp.convs.{n - 1}.1", f"decoder.aspp.convs.{n - 1}.2")]
        dec += [("decoder.aspp.project.0", "decoder.aspp.project.1"), ("decoder.head.0", "decoder.head.1")]
    elif model.family == "pspnet":
        names = [f"decoder.ppm.stages.{i}" for i in range(len(model.decoder.ppm.stages))] + ["decoder.bottleneck"]
        dec = [(f"{n}.conv", f"{n}.bn") for n in names]
    else:
        sp = [f"decoder.spatial_path.conv{i}" for i in (1, 2, 3)]
        heads = ["decoder.context_path.conv_head16", "decoder.head.conv", "decoder.aux_heads.0.conv"]
        dec = [(f"{n}.conv", f"{n}.bn") for n in [*sp, *heads, "decoder.aux_heads.1.conv"]]
    return bb + [PrunableLayer(c, b, "decoder") for c, b in dec]


@pytest.mark.parametrize("name", sorted(MODELS))
def test_the_groups_of_every_built_in_net_equal_the_lists_once_written_by_hand(name):
    model = build_model(name, 6, 10, 0.125)
    assert model.prunable_layers() == _hand_written(model)
    assert len(_hand_written(model)) > 10


def test_the_stem_of_a_bottleneck_resnet_is_untied_and_found_unless_excluded():
    model = build_model("deeplabv3_resnet50", 6, 10, 0.125)
    found = discover_prunable_layers(model, PARTS)
    assert PrunableLayer("backbone.conv1", "backbone.bn1", "backbone") in found
    basic = discover_prunable_layers(build_model("deeplabv3_resnet18", 6, 10, 0.125), PARTS)
    assert all(lay.conv != "backbone.conv1" for lay in basic)  # BasicBlocks sum the stem's output: tied


class _Net(nn.Module):
    """conv-BN (a) → depthwise conv-BN → conv-BN (b) ⊕ conv-BN (c) (a sum ties b and c) → 1×1 logits; an
    attention gate: conv-BN (d) × sigmoid(conv-BN (e))."""

    def __init__(self) -> None:
        super().__init__()

        def cbr(cin: int, cout: int, groups: int = 1) -> nn.Sequential:
            return nn.Sequential(nn.Conv2d(cin, cout, 3, padding=1, groups=groups, bias=False), nn.BatchNorm2d(cout))

        self.backbone = nn.ModuleDict({"a": cbr(3, 8), "dw": cbr(8, 8, groups=8), "b": cbr(8, 8), "c": cbr(3, 8)})
        self.decoder = nn.ModuleDict({"d": cbr(8, 8), "e": cbr(8, 8), "f": cbr(8, 8), "logits": nn.Conv2d(8, 5, 1)})

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        bb, dec = self.backbone, self.decoder
        h = torch.relu(bb["dw"](torch.relu(bb["a"](x))))
        s = torch.relu(bb["b"](h) + bb["c"](x))
        g = torch.relu(dec["d"](s)) * torch.sigmoid(dec["e"](s))
        return dec["logits"](torch.relu(dec["f"](g)))


def test_the_rule_on_a_hand_made_net():
    net = _Net()
    found = discover_prunable_layers(net, PARTS, dependency_graph(net, forward_fn=None, size=(16, 16)))
    # a: followed by a BN and a depthwise conv (which follows it, no tie); b and c: tied by the sum;
    # d and e: tied by the product; f: free; logits: no BN, and they are the output
    assert found == [
        PrunableLayer("backbone.a.0", "backbone.a.1", "backbone", followers=("backbone.dw.1",)),
        PrunableLayer("decoder.f.0", "decoder.f.1", "decoder"),
    ]


def test_coupled_group_prunes_tied_channels_together():
    net = _Net()
    dg = dependency_graph(net, forward_fn=None, size=(16, 16))
    found = discover_prunable_layers(net, PARTS, dg, coupled="group")
    # the sum ties b and c (one group, named by b), the product ties d and e; a and f as before
    assert found == [
        PrunableLayer("backbone.a.0", "backbone.a.1", "backbone", followers=("backbone.dw.1",)),
        PrunableLayer("backbone.b.0", "backbone.b.1", "backbone", tied=("backbone.c.1",)),
        PrunableLayer("decoder.d.0", "decoder.d.1", "decoder", tied=("decoder.e.1",)),
        PrunableLayer("decoder.f.0", "decoder.f.1", "decoder"),
    ]
    assert found[1].scored == ("backbone.b.1", "backbone.c.1")
    with pytest.raises(UsageError, match="coupled must be skip or group"):
        discover_prunable_layers(net, PARTS, dg, coupled="all")


class _SENet(nn.Module):
    """conv-BN (a) → × hardsigmoid(fc2(relu(fc1(pool)))) (a squeeze-and-excitation gate: convs without BN)
    → conv-BN (b) → logits."""

    def __init__(self) -> None:
        super().__init__()
        self.backbone = nn.ModuleDict(
            {"a": nn.Sequential(nn.Conv2d(3, 8, 3, padding=1, bias=False), nn.BatchNorm2d(8)),
             "fc1": nn.Conv2d(8, 4, 1), "fc2": nn.Conv2d(4, 8, 1),
             "b": nn.Sequential(nn.Conv2d(8, 8, 3, padding=1, bias=False), nn.BatchNorm2d(8))}
        )  # fmt: skip
        self.decoder = nn.Conv2d(8, 5, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        bb = self.backbone
        h = nn.functional.hardswish(bb["a"](x))
        gate = nn.functional.hardsigmoid(bb["fc2"](torch.relu(bb["fc1"](h.mean((2, 3), keepdim=True)))))
        return self.decoder(torch.relu(bb["b"](h * gate)))


def test_a_squeeze_and_excitation_gate_is_pruned_with_its_channels_only_when_coupled_is_group():
    net = _SENet()
    dg = dependency_graph(net, forward_fn=None, size=(16, 16))
    b = PrunableLayer("backbone.b.0", "backbone.b.1", "backbone")
    assert discover_prunable_layers(net, PARTS, dg) == [b]  # skip: the product ties a to the gate
    assert discover_prunable_layers(net, PARTS, dg, coupled="group") == [
        PrunableLayer("backbone.a.0", "backbone.a.1", "backbone"),  # fc2, the gate, has no BN: not scored
        b,
    ]
