from __future__ import annotations

import statistics

import pytest
import torch
from tests.conftest import tiny
from torch import nn

from mtprune.cost import count_macs, count_params, measure_latency
from mtprune.errors import UsageError


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


# The paper's figures (README, "Cost of the paper's models"): model, classes, input (H, W), M params, GMACs.
PAPER_COSTS = [
    ("deeplabv3_resnet101", 21, (513, 513), 58.04, 71.52),  # Table 2
    ("deeplabv3_resnet101", 19, (720, 1080), None, 201.9),  # Table 4 (no params given)
    ("pspnet_resnet50", 150, (513, 513), 46.71, 190.43),  # Table 2
    ("bisenet_resnet18", 19, (1024, 2048), 12.89, 104.27),  # Table 3
]
# Relative tolerances against the paper. The paper's nets come from other implementations (README,
# "Differences"): its DeepLabv3 is not torchvision's ResNet + ASPP (its footnote 1; ours has 1.0 % more
# params, 0.25 % more MACs), and TorchSeg's BiSeNet spatial path has a fourth, 1×1 conv (0.5 % fewer params
# here, 0.4 % more MACs). Measured gaps are at most 1.02 % (params) and 0.37 % (MACs).
PARAMS_TOLERANCE = 0.015
MACS_TOLERANCE = 0.005
# The paper's PSPNet (hszhao/semseg) has the "deep stem" ResNet-50 (three 3×3 convs instead of one 7×7),
# which we do not build so that torchvision's ImageNet weights load unchanged; its extra work, counted by
# hand in the README, is +7.14 GMACs at 513² (stem 7.42 G instead of 0.62 G, +0.34 G in layer1's first
# block). That is the whole of the 4 % MACs gap: ours + 7.14 G is within MACS_TOLERANCE of the paper.
DEEP_STEM_GMACS = {"pspnet_resnet50": 7.14}


@pytest.mark.slow
@pytest.mark.parametrize(("name", "classes", "size", "mparams", "gmacs"), PAPER_COSTS)
def test_cost_of_the_papers_models_matches_the_paper(name, classes, size, mparams, gmacs):
    from mtprune.models import build_model

    with torch.device("meta"):  # shapes only: FlopCounterMode counts the same on meta tensors
        m = build_model(name, classes)
    if mparams is not None:
        assert count_params(m) / 1e6 == pytest.approx(mparams, rel=PARAMS_TOLERANCE)
    ours = count_macs(m, size) / 1e9 + DEEP_STEM_GMACS.get(name, 0.0)
    assert ours == pytest.approx(gmacs, rel=MACS_TOLERANCE)


@pytest.mark.parametrize("name", ["deeplabv3_resnet18", "pspnet_resnet18", "bisenet_resnet18"])
def test_macs_on_meta_tensors_equal_macs_on_real_tensors(name):
    from mtprune.models import build_model

    with torch.device("meta"):
        meta = build_model(name, 5, cls_classes=7, width=0.25)
    assert count_macs(meta, (48, 64)) == count_macs(tiny(name), (48, 64))
    assert count_params(meta) == count_params(tiny(name))


def test_latency_reports_median_and_iqr():
    lat = measure_latency(SmallNet(), (16, 16), runs=20, warmup=1)
    assert lat.runs == 20 and lat.latency_ms > 0 and lat.latency_iqr_ms >= 0
    with pytest.raises(UsageError, match="at least 20"):
        measure_latency(SmallNet(), (16, 16), runs=5)


# Fake time in seconds, in steps of 1/128 s: timestamps and their differences are exact binary fractions,
# and so are the milliseconds (1 step = 7.8125 ms), their medians and quartiles.
STEP_S = 1 / 128
STEP_MS = 1000 * STEP_S


class FakeClock:
    """A clock that moves only when a :class:`ScriptedNet` runs; counts how often it is read."""

    def __init__(self) -> None:
        self.now = 0.0
        self.reads = 0

    def __call__(self) -> float:
        self.reads += 1
        return self.now


class ScriptedNet(nn.Module):
    """Each forward "takes" the next of ``steps`` (in STEP_S) on ``clock`` and logs its name in ``log``."""

    def __init__(self, name: str, clock: FakeClock, steps: list[int], log: list[str]) -> None:
        super().__init__()
        self.name, self.clock, self.steps, self.log = name, clock, iter(steps), log

    def forward(self, x):
        self.clock.now += next(self.steps) * STEP_S
        self.log.append(self.name)
        return x


def test_interleaved_latency_with_a_fake_clock_gives_exact_medians_iqrs_and_paired_ratios():
    from mtprune.cost import interleaved_latency

    clock, log = FakeClock(), []
    a_steps = [10 + 7 * r % 20 for r in range(20)]  # 10..29 out of order: even rounds 10, 12 … 28, odd 11 … 29
    b_steps = [s * (2 if r % 2 == 0 else 3) for r, s in enumerate(a_steps)]  # b is 2× a in even rounds, 3× in odd
    nets = {"a": ScriptedNet("a", clock, [1000, *a_steps], log), "b": ScriptedNet("b", clock, [1000, *b_steps], log)}
    out = interleaved_latency(nets, (4, 4), runs=20, warmup=1, reference="a", clock=clock)

    assert log[:2] == ["a", "b"] and log[2:] == ["a", "b", "b", "a"] * 10  # warm-up, then alternating order
    assert clock.reads == 2 * 2 * 20  # warm-up runs are not timed
    assert out["a"]["times_ms"] == [s * STEP_MS for s in a_steps]
    assert out["b"]["times_ms"] == [s * STEP_MS for s in b_steps]
    # a: median of 10..29 = 19.5; inclusive quartiles 14.75 and 24.25
    assert out["a"]["latency_ms"] == 19.5 * STEP_MS and out["a"]["latency_iqr_ms"] == 9.5 * STEP_MS
    assert out["a"]["ratio"] == 1.0 and out["a"]["ratio_iqr"] == 0.0
    # b sorted: 20 24 28 32 33 36 39 40 44 45 | 48 51 52 56 57 63 69 75 81 87 → median 46.5,
    # quartiles 33 + 0.75·3 = 35.25 and 57 + 0.25·6 = 58.5
    assert out["b"]["latency_ms"] == 46.5 * STEP_MS and out["b"]["latency_iqr_ms"] == 23.25 * STEP_MS
    # paired per round: ten 2s and ten 3s → median 2.5, quartiles 2 and 3 (not 46.5 / 19.5 = 2.38)
    assert out["b"]["ratio"] == 2.5 and out["b"]["ratio_iqr"] == 1.0
    assert out["b"]["runs"] == 20 and out["b"]["device"].startswith("cpu")


class LayoutNet(nn.Module):
    """Each forward "takes" ``contiguous`` or ``channels_last`` steps on ``clock``, by its input's layout."""

    def __init__(self, clock: FakeClock, contiguous: int, channels_last: int) -> None:
        super().__init__()
        self.clock, self.steps = clock, {True: channels_last, False: contiguous}

    def forward(self, x):
        self.clock.now += self.steps[x.is_contiguous(memory_format=torch.channels_last)] * STEP_S
        return x


def test_latency_against_takes_each_nets_fastest_setup_and_pairs_the_rounds(monkeypatch):
    from mtprune.cost import Setup, latency_against

    clock = FakeClock()
    monkeypatch.setattr(FakeClock, "__deepcopy__", lambda self, memo: self, raising=False)  # copies share it
    setups = [Setup(), Setup(channels_last=True)]
    pruned, dense = LayoutNet(clock, 4, 3), LayoutNet(clock, 10, 6)
    out = latency_against({"p": pruned}, dense, (4, 4), setups, runs=20, warmup=1, clock=clock)["p"]
    # best against best: 3 / 6 (both channels_last), not 3 / 10 or the same-setup 4 / 10
    assert out["latency_ratio"] == 0.5 and out["latency_ratio_iqr"] == 0.0
    assert out["latency_ms"] == 3 * STEP_MS and out["against_latency_ms"] == 6 * STEP_MS
    cl = {"setup": "channels-last", "layout": "channels_last", "fold_bn": False, "compile": False, "runtime": "torch"}
    assert out["config"] == out["against_config"] == cl
    assert [c["same_setup_ratio"] for c in out["configs"]] == [0.4, 0.5]
    mixed = latency_against({"p": LayoutNet(clock, 2, 3)}, dense, (4, 4), setups, runs=20, warmup=1, clock=clock)
    assert mixed["p"]["latency_ratio"] == 2 / 6 and mixed["p"]["config"]["layout"] == "contiguous"
    with pytest.raises(UsageError, match="'against' names the reference"):
        latency_against({"against": pruned}, dense, (4, 4), setups, runs=20)


def shared_clock(monkeypatch) -> tuple[FakeClock, list]:
    """A fake clock every copy of a net shares, and the two layouts as setups."""
    from mtprune.cost import Setup

    clock = FakeClock()
    monkeypatch.setattr(FakeClock, "__deepcopy__", lambda self, memo: self, raising=False)
    return clock, [Setup(), Setup(channels_last=True)]


class TaxedNet(LayoutNet):
    """A LayoutNet whose call costs ``tax`` more steps when ``taxed(channels_last, last call's net, last call
    in channels-last)`` says so; by default when the call before it (of any net) ran in the other layout:
    another runtime's idle threads still holding the cores."""

    def __init__(self, clock: FakeClock, contiguous: int, channels_last: int, tax: int = 0, big: bool = False):
        super().__init__(clock, contiguous, channels_last)
        self.tax, self.big = tax, big

    def taxed(self, cl: bool, last: LayoutNet | None, last_cl: bool) -> bool:
        return last is not None and last_cl != cl

    def forward(self, x):
        cl = x.is_contiguous(memory_format=torch.channels_last)
        last, last_cl = getattr(self.clock, "last", None), getattr(self.clock, "last_cl", cl)
        self.clock.last, self.clock.last_cl = self, cl
        self.clock.now += (self.steps[cl] + self.tax * self.taxed(cl, last, last_cl)) * STEP_S
        return x


def test_best_against_best_is_timed_head_to_head_without_the_other_setups_tax(monkeypatch):
    from mtprune.cost import latency_against

    clock, setups = shared_clock(monkeypatch)
    pruned, dense = TaxedNet(clock, 4, 3, tax=2), TaxedNet(clock, 10, 6, tax=2)
    out = latency_against({"p": pruned}, dense, (4, 4), setups, runs=20, warmup=1, clock=clock)["p"]
    # both pick channels-last; timed again alone, no call follows a contiguous one: 3 / 6, not (3 + 2) / (6 + 2)
    assert out["config"]["layout"] == out["against_config"]["layout"] == "channels_last"
    assert out["latency_ratio"] == 0.5 and out["latency_ms"] == 3 * STEP_MS and out["runs"] == 20
    # the per-setup rows: each setup timed in its own rounds, untaxed
    assert [c["latency_ms"] for c in out["configs"]] == [4 * STEP_MS, 3 * STEP_MS]


class AfterChannelsLastNet(TaxedNet):
    """Taxed in contiguous calls right after a channels-last call: one runtime taxing another, one way only."""

    def taxed(self, cl, last, last_cl):
        return not cl and last is not None and last_cl


def test_the_fastest_setup_is_chosen_from_each_setups_own_rounds(monkeypatch):
    from mtprune.cost import latency_against

    clock, setups = shared_clock(monkeypatch)
    pruned, dense = AfterChannelsLastNet(clock, 3, 4, tax=2), AfterChannelsLastNet(clock, 8, 12, tax=2)
    out = latency_against({"p": pruned}, dense, (4, 4), setups, runs=20, warmup=1, clock=clock)["p"]
    # one round-robin of every setup saw p's contiguous calls after channels-last ones (3 + 2 > 4) and chose
    # channels-last; in each setup's own rounds contiguous is 3 against 4
    assert out["config"]["layout"] == out["against_config"]["layout"] == "contiguous"
    assert out["latency_ratio"] == 3 / 8 and out["latency_ms"] == 3 * STEP_MS


def test_several_nets_are_timed_pair_by_pair_against_the_reference(monkeypatch):
    from mtprune.cost import latency_against

    clock, setups = shared_clock(monkeypatch)
    dense = TaxedNet(clock, 10, 6, tax=2)
    contiguous, cl = TaxedNet(clock, 2, 5, tax=2), TaxedNet(clock, 4, 3, tax=2)
    both = latency_against({"a": contiguous, "b": cl}, dense, (4, 4), setups, runs=20, warmup=1, clock=clock)
    alone = latency_against({"b": cl}, dense, (4, 4), setups, runs=20, warmup=1, clock=clock)["b"]
    # in one round-robin of a, b and dense, b's calls would follow a's contiguous ones: (3 + 2) / 6
    assert both["b"]["latency_ratio"] == alone["latency_ratio"] == 0.5 and both["b"]["latency_ms"] == 3 * STEP_MS
    assert both["a"]["config"]["layout"] == "contiguous" and both["b"]["config"]["layout"] == "channels_last"
    assert both["b"]["against_latency_ms"] == 6 * STEP_MS and len(both["a"]["times_ms"]) == 20


class EvictingNet(TaxedNet):
    """Taxed in channels-last calls right after a call of another, ``big`` net (packed weights evicted)."""

    def taxed(self, cl, last, last_cl):
        return cl and last is not None and last is not self and last.big


def test_the_reference_keeps_one_setup_across_the_pairs(monkeypatch):
    from mtprune.cost import best_latency, latency_against

    clock, setups = shared_clock(monkeypatch)
    dense = EvictingNet(clock, 8, 6, tax=4)
    nets = {"a": EvictingNet(clock, 2, 5, big=True), "b": EvictingNet(clock, 4, 3)}
    out = latency_against(nets, dense, (4, 4), setups, runs=20, warmup=1, clock=clock)
    alone = best_latency(dense, (4, 4), runs=20, warmup=1, setups=setups, clock=clock)["best"]
    # in a's pair alone dense's channels-last calls follow a's (6 + 4 > 8): it would be timed contiguous there
    assert alone["layout"] == out["a"]["against_config"]["layout"] == out["b"]["against_config"]["layout"]
    assert alone["layout"] == "channels_last" and out["b"]["latency_ratio"] == 0.5
    with pytest.raises(ValueError, match="not one of the setups"):
        latency_against({"a": dense}, dense, (4, 4), setups[:1], against_setup=setups[1])


def test_compare_cost_gives_the_ratios_of_two_real_nets_and_the_gap():
    from mtprune.cost import compare_cost
    from mtprune.pruning import prune

    dense, pruned = tiny("deeplabv3_resnet18"), tiny("deeplabv3_resnet18")
    prune(pruned, "uniform", 0.5)
    out = compare_cost(pruned, dense, (32, 32), runs=20, warmup=1)
    assert out["macs_ratio"] == count_macs(pruned, (32, 32)) / count_macs(dense, (32, 32)) < 0.7
    assert out["params_ratio"] == count_params(pruned) / count_params(dense)
    assert out["gap"] == out["latency_ratio"] - out["macs_ratio"] and out["latency_ratio"] > 0
    assert len(out["times_ms"]) == len(out["against_times_ms"]) == 20
    assert "latency_ratio" not in compare_cost(pruned, dense, (32, 32), latency=False)


def test_measure_latency_with_a_fake_clock_gives_the_exact_median_and_iqr():
    clock, log = FakeClock(), []
    steps = [500, 500] + [21 - k for k in range(21)]  # two warm-up runs, then 21, 20 … 1
    lat = measure_latency(ScriptedNet("m", clock, steps, log), (4, 4), runs=21, warmup=2, clock=clock)
    # median 11; inclusive quartiles 6 and 16
    assert (lat.latency_ms, lat.latency_iqr_ms, lat.runs) == (11 * STEP_MS, 10 * STEP_MS, 21)
    assert len(log) == 23 and clock.reads == 2 * 21


@pytest.mark.parametrize("name", ["deeplabv3_resnet18", "pspnet_resnet18", "bisenet_resnet18"])
def test_folded_batchnorm_computes_the_same_output(name):
    from mtprune.cost import fold_batchnorm
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


def test_two_nets_are_profiled_layer_by_layer_in_the_same_rounds():
    from mtprune.cost.layers import compare_layers, layer_profiles
    from mtprune.pruning import prune

    torch.manual_seed(0)
    dense, pruned = tiny("deeplabv3_resnet18"), tiny("deeplabv3_resnet18")
    prune(pruned, "uniform", 0.5)
    prof = layer_profiles({"dense": dense, "pruned": pruned, "again": pruned}, (48, 64), runs=3, warmup=1)
    for p in prof.values():  # every layer timed once per round (the same module under two keys: own hooks)
        assert len(p.totals_ms) == 3 and all(len(r.times_ms) == 3 for r in p.rows)
        assert all(o > 0 for o in p.outside_ms()) and p.total_ms == statistics.median(p.totals_ms)
    rows = compare_layers(prof["pruned"], prof["dense"])
    assert [r["excess_ms"] for r in rows] == sorted((r["excess_ms"] for r in rows), reverse=True)
    by = {r["name"]: r for r in rows}
    conv = by["backbone.layer1.0.conv1"]
    assert conv["work_ratio"] == conv["macs"] / conv["against_macs"] == pytest.approx(0.5, abs=0.05)
    assert conv["out_channels"] < conv["against_out_channels"]
    assert conv["excess_ms"] == pytest.approx(conv["ms"] - conv["work_ratio"] * conv["against_ms"])
    # a BasicBlock calls its ReLU twice per forward: one time per round, the sum of both calls (the shapes
    # are its last call's: after the residual sum, unpruned). A clock that ticks 1 ms per reading: 1 ms per call
    ticks = iter(range(10**6))
    fake = layer_profiles({"d": dense}, (48, 64), runs=2, warmup=1, clock=lambda: next(ticks) / 1000)["d"]
    ms = {r.name: r.times_ms for r in fake.rows}
    assert ms["backbone.layer1.0.relu"] == pytest.approx([2.0, 2.0]) and ms["backbone.layer1.0.conv1"] == pytest.approx(
        [1.0, 1.0]
    )
    assert by["backbone.layer1.0.relu"]["work_ratio"] == 1.0
    stem = by["backbone.conv1"]  # not pruned: all of its work is left
    assert stem["work_ratio"] == 1.0 and stem["in_channels"] == stem["against_in_channels"] == 3
    ratios = [a / b for a, b in zip(prof["pruned"].rows[0].times_ms, prof["dense"].rows[0].times_ms, strict=True)]
    assert by[prof["pruned"].rows[0].name]["ratio"] == statistics.median(ratios)  # paired per round
    outside = by["(outside modules)"]
    assert outside["kind"] == "functional" and outside["work_ratio"] == 1.0
    assert outside["ms"] == statistics.median(prof["pruned"].outside_ms())


def test_per_layer_macs_add_up_to_the_model_and_shrink_with_pruning():
    from mtprune.cost.layers import layer_latency
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
    from mtprune.cost import best_latency

    out = best_latency(tiny("deeplabv3_resnet18"), (32, 32), runs=20, warmup=1)
    configs = out["configs"]
    assert [(c["layout"], c["fold_bn"]) for c in configs] == [
        ("contiguous", False),
        ("contiguous", True),
        ("channels_last", False),
        ("channels_last", True),
    ]
    fastest = min(configs, key=lambda c: c["latency_ms"])
    assert out["best"]["setup"] == fastest["setup"] and out["best"]["latency_ms"] > 0


def test_every_setup_is_timed_alone(monkeypatch):
    from mtprune.cost import best_latency

    clock, setups = shared_clock(monkeypatch)
    out = best_latency(TaxedNet(clock, 4, 3, tax=2), (4, 4), runs=20, warmup=1, setups=setups, clock=clock)
    assert out["best"]["layout"] == "channels_last" and out["best"]["latency_ms"] == 3 * STEP_MS  # untaxed
    assert out["configs"][0]["latency_ms"] == 4 * STEP_MS  # each setup alone: no call follows the other layout


def test_interleaved_latency_pairs_rounds_and_copies_shared_models():
    from mtprune.cost import Setup, interleaved_latency, paired_ratio

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
    from mtprune.cost import Setup, interleaved_latency
    from mtprune.pruning import prune

    a = tiny("deeplabv3_resnet18", width=0.125)
    b = tiny("deeplabv3_resnet18", width=0.125)
    prune(b, "bn", 0.5)
    st = Setup(channels_last=True, fold_bn=True, compile=True)
    out = interleaved_latency({"a": a, "b": b}, (32, 32), runs=20, warmup=1, setups={"a": st, "b": st}, reference="a")
    assert out["b"]["ratio"] > 0 and len(out["b"]["times_ms"]) == 20


def test_onnxruntime_setup_runs_the_exported_net_and_competes_in_latency_against():
    pytest.importorskip("onnxruntime")
    from mtprune.cost import Setup, all_setups, latency_against
    from mtprune.cost.runtimes import ONNXRUNTIME, ort_net

    dense, pruned = tiny("deeplabv3_resnet18"), tiny("deeplabv3_resnet18")
    from mtprune.pruning import prune

    prune(pruned, "uniform", 0.5)
    x = torch.randn(1, 3, 32, 32)
    with torch.no_grad():
        ref = pruned.eval()(x)
    pruned.to(memory_format=torch.channels_last)  # as another entry of the same run may have left it
    out = torch.from_numpy(ort_net(pruned, (32, 32))(x.numpy())[0])
    assert out.shape == ref.shape and (out - ref).abs().max() <= 1e-4 * ref.abs().max()
    assert all_setups()[-1].runtime == "torch" and all_setups(onnxruntime=True)[-1] == Setup(runtime=ONNXRUNTIME)
    setups = [Setup(channels_last=True, fold_bn=True), Setup(runtime=ONNXRUNTIME)]
    timed = latency_against({"p": pruned}, dense, (32, 32), setups, runs=20, warmup=1)["p"]
    assert [c["runtime"] for c in timed["configs"]] == ["torch", "onnxruntime"]
    assert all(c["latency_ms"] > 0 and c["against_latency_ms"] > 0 for c in timed["configs"])
    assert timed["config"]["runtime"] in ("torch", "onnxruntime")
    assert next(pruned.parameters()).is_contiguous()  # given back in its layout


@pytest.mark.parametrize(("device", "dtype"), [("cpu", "bfloat16"), ("cuda", "float32")])
def test_onnxruntime_is_timed_on_the_cpu_in_float32_only(device, dtype, monkeypatch):
    from mtprune.cost import Setup, interleaved_latency
    from mtprune.cost.runtimes import ONNXRUNTIME

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    with pytest.raises(UsageError, match=f"ONNX Runtime is timed on the CPU in float32 \\(asked: {device}, {dtype}\\)"):
        interleaved_latency({"m": nn.Identity()}, (4, 4), device, dtype, setups={"m": Setup(runtime=ONNXRUNTIME)})
    with pytest.raises(UsageError, match="unknown runtime 'tvm'"):
        interleaved_latency({"m": nn.Identity()}, (4, 4), setups={"m": Setup(runtime="tvm")})


def test_the_ideal_ratio_shrinks_each_layer_with_its_work_and_keeps_the_time_between_modules():
    from mtprune.cost.layers import ideal_ratio

    rows = [
        {"name": "conv", "kind": "Conv2d", "against_ms": 10.0, "ms": 7.0, "work_ratio": 0.5},
        {"name": "(outside modules)", "kind": "functional", "against_ms": 6.0, "ms": 6.0, "work_ratio": 1.0},
    ]
    assert ideal_ratio(rows) == pytest.approx((0.5 * 10 + 6) / 16)  # 0.6875: the measured 13/16 is above it
    assert ideal_ratio([]) == 1.0


def test_compile_room_nested_never_shrinks():
    """Several nets timed pair by pair: the outer call makes room for every compiled graph, and each pair's
    own call inside must not lower it (dynamo then fails hard: FailOnRecompileLimitHit)."""
    import torch._dynamo.config as dynamo_config

    from mtprune.cost.runtimes import compile_settings

    name = next(n for n in ("recompile_limit", "cache_size_limit") if hasattr(dynamo_config, n))
    before = getattr(dynamo_config, name)
    with compile_settings(22):
        assert getattr(dynamo_config, name) == 44
        with compile_settings(2):
            assert getattr(dynamo_config, name) == 44
        with compile_settings(30):
            assert getattr(dynamo_config, name) == 60
    assert getattr(dynamo_config, name) == before
