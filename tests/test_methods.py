"""A pruning method is one description (mtprune.pruning.methods) plus its scorer: the pipeline, the run
layout, the report and ``mtprune prune`` all read it."""

from __future__ import annotations

import json

import torch
from tests.test_pipeline import tiny_cfg

from mtprune.cli import main
from mtprune.layout import color, variant_tag, variants
from mtprune.pipeline import run_pipeline, run_stage
from mtprune.pruning import METHODS, SCORERS, Method, scorer_of
from mtprune.pruning.scores import Scorer


def test_a_new_method_is_one_entry_plus_its_scorer(tmp_path, monkeypatch):
    def last_scores(model, layers, **_):
        return {
            lay.conv: -torch.arange(model.get_submodule(lay.conv).out_channels, dtype=torch.float) for lay in layers
        }

    # the two registrations a new method takes (undone after the test)
    monkeypatch.setitem(SCORERS, "last", Scorer("last", "layer", last_scores, "the highest channel indices go first"))
    monkeypatch.setitem(METHODS, "lastk", Method("lastk", "last", None, "tab:olive", "keeps the first channels"))
    assert scorer_of("lastk") == "last" and color("lastk") == "tab:olive"
    cfg = tiny_cfg("run.methods=[lastk]", "run.pretrain=false", "run.qualitative=0")
    assert [v.tag for v in variants(cfg.run)] == ["lastk-0.5"] == [variant_tag("lastk", 0.5, "layer")]
    rows = run_pipeline(cfg, tmp_path / "r", progress=lambda m: None)
    assert [r["tag"] for r in rows] == ["dense", "lastk-0.5"]
    plan = json.loads((tmp_path / "r" / "prune-lastk-0.5" / "plan.json").read_text())
    for lp in plan["layers"].values():  # the scorer chose: the first half of every layer is kept
        assert lp["kept"] == list(range(len(lp["kept"]))) and len(lp["kept"]) == lp["channels"] - lp["channels"] // 2
    assert "lastk 0.5×" in (tmp_path / "r" / "report.md").read_text()


def test_prune_cli_takes_a_run_method_for_its_scorer(tmp_path, capsys):
    run_stage("sparse-mtp", tiny_cfg(), tmp_path / "sparse")
    plans = {}
    for method in ("mtp", "bn"):
        out = tmp_path / method
        argv = ["prune", "--checkpoint", str(tmp_path / "sparse"), "--method", method, "--ratio", "0.5"]
        assert main([*argv, "--size", "32", "32", "--out", str(out), "--json"]) == 0
        plans[method] = json.loads((out / "plan.json").read_text())
    capsys.readouterr()
    assert plans["mtp"]["layers"] == plans["bn"]["layers"]  # mtp is bn on the stored γ1 / γ2
    assert plans["mtp"]["tau"] == plans["bn"]["tau"]
