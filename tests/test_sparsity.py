"""Sparse-stage diagnostics (issue 17): the scale-free sparse fraction, the warning when a stage did not
switch off as many channels as the run prunes, and the γ distributions the report draws."""

from __future__ import annotations

import json

import pytest
import torch
from tests.test_train import cfg

from mtprune import build_model, save_model
from mtprune.method.sparsity import gamma_quantiles, gamma_summary, sparse_fraction
from mtprune.pipeline import run_stage
from mtprune.train.engine import prunable_gammas


def test_the_sparse_fraction_of_a_known_gamma_vector():
    g = [torch.tensor([0.001] * 30 + [1.0] * 70), torch.tensor([-0.002] * 10 + [2.0] * 10)]
    # |γ| pooled: 40 tiny, 80 large; 95th percentile of the pool is 2.0 → threshold 0.1
    assert sparse_fraction(g) == 40 / 120
    s = gamma_summary(g)
    assert s["q05"] == pytest.approx(0.001) and (s["q95"], s["sparse"]) == (2.0, 40 / 120)
    assert sparse_fraction([torch.full((50,), 0.9)]) == 0.0  # all alike near 1: nothing switched off
    assert sparse_fraction([torch.zeros(50)]) == 1.0  # all collapsed to 0 (a proximal ℓ1 too strong): all off
    assert gamma_quantiles([torch.arange(11.0)], n=3) == [0.0, 5.0, 10.0]


SLIM = ("sparse_slimming.epochs=2", "sparse_slimming.batch_size=4", "run.ratios=[0.5]")


def test_the_warning_fires_on_a_stage_that_does_not_separate(tmp_path, capsys):
    metrics = run_stage("sparse-slimming", cfg(*SLIM, "sparse_slimming.alpha=0"), tmp_path / "a0")
    err = capsys.readouterr().err
    assert "warning: sparse-slimming: only" in err and "backbone" in err and "decoder" in err
    done = json.loads((tmp_path / "a0" / "done.json").read_text())["metrics"]
    assert done["warnings"] and metrics["sparse_backbone"] < 0.5 and metrics["sparse_decoder"] < 0.5
    assert set(done["gamma_distribution"]) == {"before", "after"}
    assert len(done["gamma_distribution"]["after"]["decoder"]) == 101


def test_no_warning_on_a_stage_that_separates(tmp_path, capsys):
    model = build_model("deeplabv3_resnet18", 6, 10, 0.125)
    with torch.no_grad():  # spread |γ| over (0, 1]: the proximal ℓ1 switches the lower half off
        for g in prunable_gammas(model):
            g.copy_(torch.linspace(0.02, 1.0, g.numel())[torch.randperm(g.numel())])
    save_model(model, tmp_path / "spread")
    sets = (*SLIM, "sparse_slimming.l1=proximal", "sparse_slimming.alpha=0.5", "sparse_slimming.lr=0.3")
    metrics = run_stage("sparse-slimming", cfg(*sets), tmp_path / "sep", init=str(tmp_path / "spread"))
    assert "warning" not in capsys.readouterr().err
    assert metrics["sparse_backbone"] >= 0.5 and metrics["sparse_decoder"] >= 0.5 and "warnings" not in metrics
    assert metrics["gamma_before"]["sparse_backbone"] < 0.1  # the starting γ were not sparse
