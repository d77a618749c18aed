"""Pruning to a budget (``--target macs=X``) and the overlap of two plans (issue 17)."""

from __future__ import annotations

import json

import pytest
from tests.conftest import randomize_bn

from mtprune.cli import main
from mtprune.cost import count_macs
from mtprune.cost.host_memory import can_cache
from mtprune.cost.runtimes import onnxruntime_installed
from mtprune.errors import UsageError
from mtprune.models import build_model
from mtprune.pruning import make_plan, plan_cost, plan_overlap, prune
from mtprune.pruning.plan import LayerPlan, PruningPlan

SIZE = (64, 64)


def _net(seed: int = 0):
    return randomize_bn(build_model("deeplabv3_resnet18", 6, 10, 0.5), seed)  # irregular |γ| scores


@pytest.mark.parametrize(
    ("method", "thresholds"), [("uniform", "independent"), ("bn", "unified"), ("bn", "independent")]
)
def test_a_macs_target_lands_just_below_it(method, thresholds):
    model = _net()
    dense = count_macs(model, SIZE)
    plan = prune(model, method, None, thresholds, target=("macs", 0.5), cost=plan_cost(model, "macs", SIZE))
    reached = count_macs(model, SIZE) / dense
    assert 0.48 <= reached <= 0.50 and reached == pytest.approx(plan.target["reached"], abs=1e-12)
    assert plan.target["macs"] == 0.5 and 0 < plan.ratio < 1 and len(plan.target["candidates"]) > 5


def test_prune_cli_target_records_the_target_and_refuses_an_unreachable_one(tmp_path, capsys):
    init = [
        "init",
        "--model",
        "deeplabv3_resnet18",
        "--num-classes",
        "3",
        "--width",
        "0.5",
        "--out",
        str(tmp_path / "d"),
    ]
    assert main(init) == 0
    capsys.readouterr()
    base = ["prune", "--checkpoint", str(tmp_path / "d"), "--method", "uniform", "--size", "64", "64"]
    assert main([*base, "--target", "macs=0.6", "--out", str(tmp_path / "p"), "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    plan = json.loads((tmp_path / "p" / "plan.json").read_text())
    assert plan["target"]["macs"] == 0.6 and plan["ratio"] == out["ratio"] and 0.58 <= out["macs_ratio"] <= 0.6
    with pytest.raises(SystemExit) as e:
        main([*base, "--target", "macs=0", "--out", str(tmp_path / "q")])
    assert e.value.code == 2
    with pytest.raises(UsageError, match="no plan reaches it"):
        m = _net()
        prune(m, "uniform", None, target=("params", 0.0001), cost=plan_cost(m, "params", SIZE))


def _fake_timing(monkeypatch, gap: float = 0.05) -> list[dict]:
    """Replace the clock by arithmetic: a pruned net "takes" its MACs ratio + ``gap`` of the unpruned one's."""
    import mtprune.pruning.search as cost_mod

    calls: list[dict] = []

    def latency_against(models, against, size, **kw):
        calls.append(kw)
        ratio = count_macs(models["pruned"], size) / count_macs(against, size) + gap
        return {"pruned": {"latency_ratio": ratio, "latency_ratio_iqr": 0.01}}

    monkeypatch.setattr(cost_mod, "latency_against", latency_against)
    return calls


def test_a_latency_target_bisects_over_timed_candidates_with_their_macs(monkeypatch):
    from mtprune.pruning.search import LATENCY_TOL

    calls, seen = _fake_timing(monkeypatch), []
    model = _net()
    dense = count_macs(model, SIZE)
    cost = plan_cost(model, "latency", SIZE, runs=20)
    plan = prune(model, "bn", None, target=("latency", 0.6), cost=cost, on_candidate=seen.append)
    cands = plan.target["candidates"]
    assert seen == cands and len(cands) == len(calls) and calls[0] == {"runs": 20}
    assert all(c["latency"] == pytest.approx(c["macs"] + 0.05) and c["latency_iqr"] == 0.01 for c in cands)
    # the plan applied is the candidate whose latency is the largest not above 0.6: MACs ≈ 0.55
    reached = plan.target["reached"]
    assert reached <= 0.6 and reached == pytest.approx(count_macs(model, SIZE) / dense + 0.05)
    assert reached == max(c["latency"] for c in cands if c["latency"] <= 0.6) > 0.58
    assert len(cands) <= 2 + 7  # p to LATENCY_TOL: about log2(0.99 / 0.01) halvings
    assert LATENCY_TOL == 0.01


def test_prune_cli_latency_target_prints_each_candidate_and_records_them(tmp_path, capsys, monkeypatch):
    calls = _fake_timing(monkeypatch)
    d = str(tmp_path / "d")
    main(["init", "--model", "deeplabv3_resnet18", "--num-classes", "3", "--width", "0.5", "--out", d])
    base = ["prune", "--checkpoint", str(tmp_path / "d"), "--method", "uniform", "--size", "64", "64"]
    capsys.readouterr()
    assert (
        main(
            [*base, "--target", "latency=0.7", "--runtime", "best", "--timing", "runs=30", "--out", str(tmp_path / "p")]
        )
        == 0
    )
    text = capsys.readouterr().out
    plan = json.loads((tmp_path / "p" / "plan.json").read_text())
    cands = plan["target"]["candidates"]
    assert text.count("candidate p=") == len(cands) and "target latency ≤ 0.7×" in text
    assert {"ratio", "latency", "latency_iqr", "macs"} == set(cands[0]) and plan["target"]["reached"] <= 0.7
    assert (
        len(calls[0]["setups"]) == 4 + onnxruntime_installed()
        and calls[0]["runs"] == 30
        and calls[0]["device"] == "cpu"
    )
    assert (
        main([*base, "--ratio", "0.5", "--runtime", "best", "--timing", "runs=30", "--out", str(tmp_path / "q")]) == 2
    )
    assert "--runtime / --timing: only with --target latency=X" in capsys.readouterr().err
    assert main([*base, "--target", "latency=0.7", "--timing", "runs=5", "--out", str(tmp_path / "q")]) == 2
    assert "runs: 5 is below 20" in capsys.readouterr().err
    assert main([*base, "--target", "latency=0.7", "--runtime", "channels-last", "--out", str(tmp_path / "cl")]) == 0
    assert calls[-1]["setups"][0].channels_last  # the candidates timed in the layout asked for
    assert main([*base, "--target", "latency=0.7", "--runtime", "onnxruntime", "--out", str(tmp_path / "o")]) == 0
    assert [st.runtime for st in calls[-1]["setups"]] == ["onnxruntime"]  # in ONNX Runtime only
    assert main([*base, "--target", "latency=0.7", "--runtime", "best,onnxruntime", "--out", str(tmp_path / "b")]) == 0
    assert sorted(st.runtime for st in calls[-1]["setups"]) == ["onnxruntime", *["torch"] * 4]  # they compete
    assert main([*base, "--target", "latency=0.7", "--channels-last", "--out", str(tmp_path / "q")]) == 2
    assert "--channels-last is now --runtime channels-last" in capsys.readouterr().err  # an old flag
    assert not (tmp_path / "q").exists()  # refused before anything is written


def test_plan_overlap_is_one_for_the_same_plan_and_zero_for_disjoint_plans():
    plan = make_plan(_net(), "bn", 0.5)
    assert plan_overlap(plan, plan) == {"backbone": 1.0, "decoder": 1.0, "all": 1.0}
    a = PruningPlan(
        "x", 0.5, "independent", 1, 1, {"c1": LayerPlan("backbone", 4, [0, 1]), "c2": LayerPlan("decoder", 2, [0])}
    )
    b = PruningPlan(
        "y", 0.5, "independent", 1, 1, {"c1": LayerPlan("backbone", 4, [2, 3]), "c2": LayerPlan("decoder", 2, [0])}
    )
    assert plan_overlap(a, b) == {"backbone": 0.0, "decoder": 1.0, "all": 1 / 5}
    assert plan_overlap(a.to_dict(), b) == plan_overlap(a, b)


def test_a_run_compares_methods_at_one_macs_target_with_their_plan_overlap(tmp_path):
    from tests.test_pipeline import tiny_cfg

    from mtprune.pipeline import run_pipeline

    cfg = tiny_cfg(
        "run.methods=[slimming, uniform]",
        "run.ratios=[]",
        "run.targets=[{macs: 0.6}]",
        "run.thresholds=[independent, unified]",
        "run.pretrain=false",
        "run.qualitative=0",
    )
    rows = run_pipeline(cfg, tmp_path / "r", progress=lambda m: None)
    pruned = {r["tag"]: r for r in rows[1:]}
    assert sorted(pruned) == ["slimming-macs0.6-independent", "slimming-macs0.6-unified", "uniform-macs0.6"]
    for tag, r in pruned.items():
        assert r["target"] == {"macs": 0.6} and 0 < r["ratio"] < 1
        assert 0.5 <= r["macs_ratio"] <= 0.6  # the eval stage's count, at the cost size the target used
        assert sorted(r["plan_overlap"]) == sorted(set(pruned) - {tag})
        for other, ov in r["plan_overlap"].items():
            assert ov == pruned[other]["plan_overlap"][tag] and 0.0 <= ov["all"] <= 1.0
    ind, uni = pruned["slimming-macs0.6-independent"], pruned["slimming-macs0.6-unified"]
    assert ind["ratio"] != uni["ratio"]  # one cost, two threshold modes: two ratios
    report = (tmp_path / "r" / "report.md").read_text()
    assert "Plan overlap" in report and "slimming macs 0.6× (unified)" in report


def test_a_run_s_prune_stage_takes_a_latency_target(tmp_path, monkeypatch):
    from tests.test_pipeline import tiny_cfg

    import mtprune.pipeline.stages as pl
    from mtprune.checkpoint import save_model
    from mtprune.pipeline import execute
    from mtprune.pipeline.run import check_run_config

    calls = _fake_timing(monkeypatch, gap=0.1)
    memory = "cached" if can_cache() else "system"
    cfg = tiny_cfg(
        "run.targets=[{latency: 0.7}]",
        "run.timing.runs=25",
        "run.timing.threads=1",
        f"run.timing.host_memory={memory}",
    )
    check_run_config(cfg)  # {latency: X} is a target a run accepts
    model = _net()
    save_model(model, tmp_path / "d")
    execute(pl.pruning(tmp_path / "d", "uniform", {"latency": 0.7}, "independent", cfg, tmp_path / "p"))
    plan = json.loads((tmp_path / "p" / "plan.json").read_text())
    assert plan["target"]["latency"] == 0.7 and plan["target"]["reached"] <= 0.7
    assert {k: calls[0][k] for k in ("device", "runs")} == {"device": "cpu", "runs": 25} and plan["cost"][
        "host_memory"
    ] == memory  # timed as configured
    pruned = json.loads((tmp_path / "p" / "done.json").read_text())
    assert pruned["target"] == {"latency": 0.7}
    macs = count_macs(pl.load_model(tmp_path / "p" / "model"), pl.cost_size(cfg)) / count_macs(model, pl.cost_size(cfg))
    assert macs + 0.1 == pytest.approx(plan["target"]["reached"])
