"""Latency figures that survive a busy machine (issue 32, item 4): a ratio is re-timed in more paired rounds
until it is known to ±precision, and a figure that is not says so in one ``warning:`` line."""

from __future__ import annotations

import itertools

import pytest
import torch
from tests.test_cost import STEP_S, FakeClock

from mtprune.cost.load import LoadWatch, busy_seconds
from mtprune.cost.rounds import paired_rounds, ratio_halfwidth


def test_paired_rounds_add_blocks_until_the_figures_are_known_or_the_limit():
    t, _ = paired_rounds({"a": lambda: None}, 4, until=lambda times: len(times["a"]) >= 12, max_rounds=40)
    assert len(t["a"]) == 12  # three blocks of 4: enough
    t, _ = paired_rounds({"a": lambda: None}, 4, until=lambda times: False, max_rounds=16)
    assert len(t["a"]) == 16  # never enough: stops at the limit
    t, _ = paired_rounds({"a": lambda: None}, 4, until=lambda times: True, max_rounds=16)
    assert len(t["a"]) == 4  # known after the first block


def test_the_half_width_of_a_paired_ratio():
    ref = [1.0] * 20
    assert ratio_halfwidth([0.5] * 20, ref) == 0.0
    noisy = [0.4, 0.6] * 10  # IQR of the ratios 0.2 → σ ≈ 0.148; 1.96 × 1.2533 × σ / √20
    assert ratio_halfwidth(noisy, ref) == pytest.approx(1.96 * 1.2533 * (0.2 / 1.349) / 20**0.5)
    assert ratio_halfwidth([1.0, 2.0], [1.0, 1.0]) == float("inf")


class NoisyNet(torch.nn.Module):
    """Each forward "takes" its base steps, times a factor that cycles through ``noise`` (another tenant)."""

    def __init__(self, clock: FakeClock, base: float, noise: list[float]) -> None:
        super().__init__()
        self.clock, self.base, self.noise = clock, base, itertools.cycle(noise)

    def forward(self, x):
        self.clock.now += self.base * next(self.noise) * STEP_S
        return x


def test_a_noisy_ratio_is_retimed_then_flagged_and_a_steady_one_is_not(monkeypatch):
    from mtprune.cost import latency_against
    from mtprune.cost.latency import timing_warning

    clock = FakeClock()
    monkeypatch.setattr(FakeClock, "__deepcopy__", lambda self, memo: self, raising=False)
    steady = latency_against(
        {"p": NoisyNet(clock, 5, [1.0])}, NoisyNet(clock, 10, [1.0]), (4, 4), runs=20, warmup=1, clock=clock,
        precision=0.02,
    )["p"]  # fmt: skip
    assert steady["runs"] == 20 and steady["reliable"] and steady["ratio_halfwidth"] == 0.0
    assert steady["latency_ratio"] == 0.5 and timing_warning(steady) is None
    noisy = latency_against(
        {"p": NoisyNet(clock, 5, [1.0, 1.9, 1.0, 1.0, 2.3])}, NoisyNet(clock, 10, [1.0, 1.0, 1.7]), (4, 4),
        runs=20, warmup=1, clock=clock, precision=0.02,
    )["p"]  # fmt: skip
    assert noisy["runs"] == 160 and not noisy["reliable"] and noisy["ratio_halfwidth"] > 0.02  # 8 × 20 rounds
    line = timing_warning(noisy)
    assert line.startswith("warning: the latency ratio ") and "known to ±" in line and "160 paired rounds" in line
    assert "\n" not in line
    unchecked = latency_against(
        {"p": NoisyNet(clock, 5, [1.0, 1.9])}, NoisyNet(clock, 10, [1.0]), (4, 4), runs=20, warmup=1, clock=clock
    )["p"]
    assert unchecked["runs"] == 20 and unchecked["reliable"]  # no precision asked: timed as asked


def test_the_load_of_other_processes_is_read_from_the_kernel_s_counters():
    stat = "cpu  100 20 30 400 50 5 5 10 0 0\ncpu0 50 10 15 200 25 2 3 5 0 0\n"
    assert busy_seconds(stat, 100) == pytest.approx((100 + 20 + 30 + 5 + 5 + 10) / 100)
    with pytest.raises(AssertionError):
        busy_seconds("intr 1 2 3\n", 100)
    with LoadWatch() as w:
        sum(i * i for i in range(10000))
    assert w.others is None or w.others >= 0.0


def test_a_latency_target_timed_on_a_busy_machine_says_so(monkeypatch, tmp_path):
    from tests.conftest import tiny

    import mtprune.pruning.search as search
    from mtprune.api import PruneRequest, prune_checkpoint
    from mtprune.config import Timing
    from mtprune.cost import count_macs

    def noisy(models, against, size, **kw):
        ratio = count_macs(models["pruned"], size) / count_macs(against, size) + 0.05
        return {
            "pruned": {"latency_ratio": ratio, "latency_ratio_iqr": 0.1, "ratio_halfwidth": 0.06, "reliable": False}
        }

    monkeypatch.setattr(search, "latency_against", noisy)
    said: list[str] = []
    req = PruneRequest(tiny("deeplabv3_resnet18"), "uniform", target=("latency", 0.7), size=(32, 32),
                       timing=Timing(runs=20), log=said.append)  # fmt: skip
    result = prune_checkpoint(req, tmp_path / "p")
    assert [s for s in said if s.startswith("warning: ")] and "known to ±0.060 only" in said[-1]
    assert result.summary["timing_warning"].endswith("known to ±0.060 only")
    assert all(c["reliable"] == 0.0 for c in result.plan.target["candidates"])
