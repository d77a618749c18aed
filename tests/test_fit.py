"""``--round-to auto`` (issue 19): counts the device at hand likes, from a table of conv timings. The clock is
replaced by arithmetic (multiples of 16 channels run at twice the speed), so every choice is exact."""

from __future__ import annotations

import copy
import json

import pytest
import torch
from tests.conftest import randomize_bn

from mtprune.cli import main
from mtprune.errors import UsageError
from mtprune.evaluate.fit import MULTIPLE, ConvShape, LatencyTable, latency_fit
from mtprune.models import build_model
from mtprune.pruning import apply_plan, make_plan, mask_plan

SIZE = (32, 32)


def fake_ms(s: ConvShape) -> float:
    """Work × 2 for each of the input and output counts that is not a multiple of 16."""
    slow = (1 if s.cin % 16 == 0 else 2) * (1 if s.cout % 16 == 0 else 2)
    return s.cin * s.cout * s.height * s.width * s.kernel[0] * s.kernel[1] / s.groups * 1e-6 * slow


def fake_ratio(a: list[ConvShape], b: list[ConvShape]) -> float:
    return sum(map(fake_ms, b)) / sum(map(fake_ms, a))


def _net():
    return randomize_bn(build_model("deeplabv3_resnet18", 5, 10, 0.5))  # 32 … 256 channels, irregular γ


def test_auto_counts_grow_to_where_the_table_says_it_is_faster_and_never_shrink(tmp_path):
    model = _net()
    table = LatencyTable(tmp_path / "t.json", measure=fake_ms)
    plain = make_plan(model, "bn", 0.5)
    plan = make_plan(model, "bn", 0.5, fit=latency_fit(model, SIZE, table))
    assert plan.round_to == "auto" and plan.rounding
    for name, lp in plan.layers.items():
        before = plain.layers[name]
        assert set(before.kept) <= set(lp.kept)
        r = plan.rounding.get(name)
        if r is None:
            assert len(lp.kept) == len(before.kept)
            continue
        assert (r["from"], r["to"]) == (len(before.kept), len(lp.kept)) and r["to"] > r["from"]
        assert r["ms_to"] < r["ms_from"] / (1 + 0.02) and r["to"] <= -(-r["from"] // MULTIPLE) * MULTIPLE
    # a BasicBlock's conv1 feeds conv2 (another width's output): both its own and conv2's input are 16-aligned
    assert all(r["to"] % 16 == 0 for r in plan.rounding.values())
    # the best-scored removed channels came back, and the pruned net is still the masked one
    name = next(iter(plan.rounding))
    s = model.get_submodule(name.replace("conv", "bn")).weight.detach().abs()
    back = sorted(set(plan.layers[name].kept) - set(plain.layers[name].kept))
    removed = sorted(set(range(s.numel())) - set(plain.layers[name].kept), key=lambda c: -float(s[c]))
    assert back == sorted(removed[: len(back)])
    pruned, masked = apply_plan(copy.deepcopy(model), plan), mask_plan(copy.deepcopy(model), plan)
    x = torch.randn(1, 3, *SIZE)
    with torch.no_grad():
        assert torch.allclose(pruned.eval()(x), masked.eval()(x), atol=1e-5)


def test_the_table_is_kept_so_a_second_fit_times_nothing(tmp_path):
    model = _net()
    first = LatencyTable(tmp_path / "t.json", measure=fake_ms)
    plan = make_plan(model, "bn", 0.5, fit=latency_fit(model, SIZE, first))
    assert first.measured > 0 and json.loads((tmp_path / "t.json").read_text())["format"] == "mtprune-latency-table"

    def no_clock(_shape):
        raise AssertionError("a shape in the table was timed again")

    second = LatencyTable(tmp_path / "t.json", measure=no_clock)
    again = make_plan(model, "bn", 0.5, fit=latency_fit(model, SIZE, second))
    assert second.measured == 0 and again.layers == plan.layers
    (tmp_path / "t.json").write_text("{not json")
    with pytest.raises(UsageError, match="t.json: not a latency table"):
        LatencyTable(tmp_path / "t.json")


def test_prune_cli_round_to_auto_reports_what_it_changed(tmp_path, capsys, monkeypatch):
    import mtprune.evaluate.fit as fit_mod

    monkeypatch.setattr(fit_mod, "time_conv", lambda s, device, channels_last: fake_ms(s))
    monkeypatch.setattr(fit_mod, "time_pair", lambda a, b, device, channels_last: fake_ratio(a, b))
    monkeypatch.setenv("MTPRUNE_CACHE", str(tmp_path / "cache"))
    d = str(tmp_path / "d")
    main(["init", "--model", "deeplabv3_resnet18", "--num-classes", "3", "--width", "0.5", "--out", d])
    capsys.readouterr()
    base = ["prune", "--checkpoint", d, "--method", "uniform", "--ratio", "0.4", "--size", "32", "32"]
    assert main([*base, "--round-to", "auto", "--out", str(tmp_path / "p")]) == 0
    out = capsys.readouterr()
    plan = json.loads((tmp_path / "p" / "plan.json").read_text())
    assert plan["round_to"] == "auto" and plan["rounding"]
    assert out.out.count("round-to auto: ") == len(plan["rounding"]) and "table " in out.err
    assert len(list((tmp_path / "cache").glob("latency-cpu*contiguous*.json"))) == 1
    with pytest.raises(SystemExit) as e:
        main([*base, "--round-to", "17x", "--out", str(tmp_path / "q")])
    assert e.value.code == 2 and "'17x' is not a multiple K or auto" in capsys.readouterr().err
    assert main([*base, "--latency-table", str(tmp_path / "t.json"), "--out", str(tmp_path / "q")]) == 2
    assert "only with --round-to auto" in capsys.readouterr().err and not (tmp_path / "q").exists()


def test_a_run_s_prune_stage_rounds_to_auto(tmp_path, monkeypatch):
    from tests.test_pipeline import tiny_cfg

    import mtprune.evaluate.fit as fit_mod
    import mtprune.pipeline.stages as pl
    from mtprune.checkpoint import save_model
    from mtprune.pipeline import execute

    monkeypatch.setattr(fit_mod, "time_conv", lambda s, device, channels_last: fake_ms(s))
    monkeypatch.setattr(fit_mod, "time_pair", lambda a, b, device, channels_last: fake_ratio(a, b))
    monkeypatch.setenv("MTPRUNE_CACHE", str(tmp_path / "cache"))
    cfg = tiny_cfg("run.round_to=auto", "run.latency_threads=1")
    save_model(_net(), tmp_path / "d")
    execute(pl.pruning(tmp_path / "d", "uniform", 0.4, "independent", cfg, tmp_path / "p"))
    plan = json.loads((tmp_path / "p" / "plan.json").read_text())
    assert plan["round_to"] == "auto" and all(r["to"] > r["from"] for r in plan["rounding"].values())
    with pytest.raises(UsageError, match="round_to"):
        tiny_cfg("run.round_to=nearest")


def test_the_choice_keeps_n_unless_a_larger_count_is_clearly_faster():
    from mtprune.evaluate.fit import _choose

    def pick(times: list[float]) -> int:
        table = LatencyTable("/nonexistent/t.json", measure=lambda s: times[s.cout - 10])
        own = lambda c: ConvShape(8, c, (1, 1), (1, 1), (0, 0), (1, 1), 1, 4, 4)  # noqa: E731
        return _choose(table, own, [], range(10, 10 + len(times)))[0]

    assert pick([1.03, 1.019, 1.0]) == 12  # 11 is within 2 % of n's time: no gain; 12 is 3 % faster
    assert pick([1.0, 0.99, 0.985]) == 10  # nothing 2 % faster than n: n stays
    assert pick([1.0, 0.97, 0.9, 0.905]) == 12  # the smallest count within 2 % of the fastest


def test_a_count_the_table_prefers_is_kept_only_if_a_paired_retiming_confirms_it(tmp_path):
    from mtprune.evaluate.fit import _choose

    times = [1.0, 0.9]  # the table says 11 channels are 10 % faster than 10
    own = lambda c: ConvShape(8, c, (1, 1), (1, 1), (0, 0), (1, 1), 1, 4, 4)  # noqa: E731
    asked = []

    def retimed(ratio: float):
        def compare(a, b):
            asked.append(([s.cout for s in a], [s.cout for s in b]))
            return ratio

        return LatencyTable(tmp_path / f"{ratio}.json", measure=lambda s: times[s.cout - 10], compare=compare)

    assert _choose(retimed(0.99), own, [], range(10, 12)) == (10, {10: 1.0, 11: 0.9}, 0.99)  # not confirmed
    assert _choose(retimed(0.95), own, [], range(10, 12))[::2] == (11, 0.95)  # confirmed: 5 % faster, paired
    assert asked == [([10], [11]), ([10], [11])]
    table = retimed(0.95)
    table.ratio([own(10)], [own(11)]), table.save()
    again = LatencyTable(tmp_path / "0.95.json", measure=lambda s: 1 / 0, compare=lambda a, b: 1 / 0)
    assert again.ratio([own(10)], [own(11)]) == 0.95  # cached with the single times: not re-timed


def test_auto_on_bisenet_skips_the_auxiliary_heads_and_times_concatenations_whole(tmp_path):
    shapes = []

    def record(s: ConvShape) -> float:
        shapes.append(s)
        return fake_ms(s)

    model = randomize_bn(build_model("pspnet_resnet18", 5, 10, 0.5))
    plan = make_plan(
        model, "uniform", 0.5, fit=latency_fit(model, SIZE, LatencyTable(tmp_path / "p.json", measure=record))
    )
    pruned = apply_plan(copy.deepcopy(model), make_plan(model, "uniform", 0.5))
    neck = pruned.decoder.bottleneck.conv  # c5 and the four pyramid branches, concatenated
    timed_in = {s.cin for s in shapes if s.cout == neck.out_channels and s.kernel == (3, 3)}
    assert neck.in_channels in timed_in  # c5 + every branch: not one branch's count alone
    assert plan.layers.keys() == make_plan(model, "uniform", 0.5).layers.keys()
    bis = randomize_bn(build_model("bisenet_resnet18", 5, 10, 0.5))
    fitted = make_plan(
        bis, "bn", 0.5, fit=latency_fit(bis, (64, 64), LatencyTable(tmp_path / "b.json", measure=fake_ms))
    )
    assert fitted.rounding and not any(n.startswith("decoder.aux_heads") for n in fitted.rounding)  # training-only


def test_groups_are_found_on_a_model_whose_bns_are_sync_batchnorm():
    from mtprune.models.groups import discover_prunable_layers

    model = build_model("deeplabv3_resnet18", 5, 10, 0.25)
    parts = {"backbone": ["backbone"], "decoder": ["decoder"]}
    want = discover_prunable_layers(model, parts, exclude=["backbone.conv1"])
    synced = torch.nn.SyncBatchNorm.convert_sync_batchnorm(copy.deepcopy(model))
    assert discover_prunable_layers(synced, parts, exclude=["backbone.conv1"]) == want and len(want) > 10
