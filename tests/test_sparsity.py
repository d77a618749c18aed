"""Sparse-stage diagnostics (issue 17): the scale-free sparse fraction, the warning when a stage did not
switch off as many channels as the run prunes, and the γ distributions the report draws."""

from __future__ import annotations

import json

import pytest
import torch
from tests.test_train import cfg

from mtprune import build_model, load_model, save_model
from mtprune.method.sparsity import gamma_quantiles, gamma_summary, l1_shrink, sparse_fraction
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


@pytest.mark.parametrize(
    "stage, sets",
    [
        (
            "sparse-slimming",
            ("sparse_slimming.epochs=1e-6", "sparse_slimming.batch_size=4", "sparse_slimming.alpha=0.01"),
        ),
        (
            "sparse-mtp",
            ("sparse_mtp.rounds=1", "sparse_mtp.steps_cls=1", "sparse_mtp.steps_seg=1", "sparse_mtp.alpha1=0.01"),
        ),
    ],
)
def test_gamma_lr_scales_the_first_step_of_the_gammas_only(tmp_path, stage, sets):
    """One SGD step from one model: with ``gamma_lr`` K the prunable γ move K × as far (first step: no
    momentum history, no coupling yet), every other parameter exactly as far as with K = 1."""
    model = build_model("deeplabv3_resnet18", 6, 10, 0.125)
    save_model(model, tmp_path / "init")
    key = stage.replace("-", "_")
    moved = {}
    for k in (1, 4):
        run_stage(stage, cfg(*sets, f"{key}.gamma_lr={k}"), tmp_path / f"k{k}", init=str(tmp_path / "init"))
        after = load_model(tmp_path / f"k{k}")
        moved[k] = {n: p.detach() - dict(model.named_parameters())[n].detach() for n, p in after.named_parameters()}
    gammas = {lay.bn + ".weight" for lay in model.prunable_layers()}
    for name, d1 in moved[1].items():
        if name in gammas:
            assert d1.abs().max() > 0 and torch.allclose(moved[4][name], 4 * d1, rtol=1e-3, atol=5e-7), (
                name
            )  # γ ≈ 1: float32 ulp 6e-8
        else:
            assert torch.equal(moved[4][name], d1), name


def test_gamma_lr_enters_the_alm_step_size_check():
    from mtprune.errors import UsageError
    from mtprune.train.mtp import check_mtp_config

    c = cfg("sparse_mtp.lr_cls=0.01", "sparse_mtp.lr_seg=0.01", "sparse_mtp.mu_max=20")
    check_mtp_config(c)  # 0.01 × 20 = 0.2 < 2 (1 + 0.9)
    c = cfg("sparse_mtp.lr_cls=0.01", "sparse_mtp.lr_seg=0.01", "sparse_mtp.mu_max=20", "sparse_mtp.gamma_lr=20")
    with pytest.raises(UsageError, match="gamma_lr"):
        check_mtp_config(c)  # the γ's step 0.2 × 20 = 4 ≥ 3.8 diverges on μ/2‖W1−W3‖²


def test_the_l1_shrink_budget_by_hand():
    lrs = [0.1, 0.2, 0.3]  # Σ lr = 0.6
    assert l1_shrink(0.5, lrs, "proximal", 0.9) == pytest.approx(0.3)  # α Σ lr
    assert l1_shrink(0.5, lrs, "subgradient", 0.9) == pytest.approx(3.0)  # momentum: × 1 / (1 − 0.9)
    assert l1_shrink(0.5, lrs, "proximal", 0.9, gamma_lr=4) == pytest.approx(1.2)
    assert l1_shrink(0.0, lrs, "subgradient", 0.9) == 0.0


def test_a_stage_whose_l1_cannot_reach_the_gammas_says_so_at_its_start(tmp_path, capsys):
    """A fresh net's γ start at 1; a few steps of lr 0.01 with α 1e-3 can shrink them by < 1e-3."""
    sets = (*SLIM, "sparse_slimming.alpha=1e-3", "sparse_slimming.lr=0.01", "sparse_slimming.l1=proximal")
    metrics = run_stage("sparse-slimming", cfg(*sets), tmp_path / "weak")
    err = capsys.readouterr().err
    assert "warning: sparse-slimming: the ℓ1 term can shrink the backbone's γ by at most" in err
    assert "raise sparse_slimming.alpha ×" in err
    budget = metrics["l1_shrink"]["backbone"]
    assert 0 < budget < 1e-3 and metrics["l1_shrink_ratio"]["backbone"] == pytest.approx(budget)  # γ start at 1
    assert any("can shrink" in w for w in metrics["warnings"])


@pytest.mark.parametrize(
    "stage, sets",
    [
        (
            "sparse-mtp",
            ("sparse_mtp.rounds=2", "sparse_mtp.steps_cls=2", "sparse_mtp.steps_seg=2", "sparse_mtp.l1=proximal"),
        ),
        ("sparse-slimming", ("sparse_slimming.epochs=0.5", "sparse_slimming.batch_size=4")),
    ],
)
def test_l1_budget_sets_alpha_from_the_rule(tmp_path, stage, sets):
    """``l1_budget: B`` gives each part (Slimming: the pooled γ) the α whose shrink budget is B × the starting
    median |γ|: the stored ratio is B and the stored α reproduces the budget by :func:`l1_shrink`."""
    model = build_model("deeplabv3_resnet18", 6, 10, 0.125)
    with torch.no_grad():  # medians 0.5 (backbone) and 0.25 (decoder)
        for lay in model.prunable_layers():
            model.get_submodule(lay.bn).weight.fill_(0.5 if lay.part == "backbone" else 0.25)
    save_model(model, tmp_path / "init")
    key = stage.replace("-", "_")
    m = run_stage(
        stage, cfg(*sets, f"{key}.l1_budget=1.2", "run.ratios=[0.5]"), tmp_path / "s", init=str(tmp_path / "init")
    )
    if stage == "sparse-mtp":
        assert m["l1_shrink_ratio"] == pytest.approx({"backbone": 1.2, "decoder": 1.2})
        assert m["l1_shrink"] == pytest.approx({"backbone": 0.6, "decoder": 0.3})
        assert m["l1_alpha"]["backbone"] > 0 and m["l1_alpha"]["decoder"] > 0
    else:  # one α for both parts, from the pooled median (more backbone γ than decoder γ here: 0.5)
        assert m["l1_alpha"]["backbone"] == m["l1_alpha"]["decoder"] > 0
        assert m["l1_shrink"]["backbone"] == pytest.approx(1.2 * 0.5)
        assert m["l1_shrink_ratio"] == pytest.approx({"backbone": 1.2, "decoder": 2.4})


def test_the_not_separated_warning_says_why_by_whether_the_shrink_budget_met_the_rule():
    from mtprune.train.diagnostics import sparsity_warnings

    c = cfg("run.ratios=[0.5]")
    keys = {"backbone": "sparse_mtp.alpha1", "decoder": "sparse_mtp.alpha2"}
    diag = {"sparse_backbone": 0.0, "sparse_decoder": 0.6, "l1_shrink_ratio": {"backbone": 0.3, "decoder": 1.2}}
    (short,) = sparsity_warnings("sparse-mtp", diag, c, keys)  # the decoder separated: no warning for it
    assert "only 0.0 % of the backbone's" in short and "raise sparse_mtp.alpha1 (or set l1_budget)" in short
    diag = {"sparse_backbone": 0.0, "l1_shrink_ratio": {"backbone": 1.15}}
    (held,) = sparsity_warnings("sparse-mtp", diag, c, keys)
    assert "met the rule (1.15 × the median |γ|)" in held and "raise l1_budget, or start from a trained net" in held


def test_a_mild_l1_budget_asked_for_says_so_once_and_does_not_warn(capsys):
    from mtprune.train.diagnostics import shrink_check, sparsity_warnings

    c = cfg("run.ratios=[0.5]")
    keys = {"backbone": "sparse_mtp.alpha1", "decoder": "sparse_mtp.alpha2"}
    before = {"backbone": [torch.full((8,), 1.0)], "decoder": [torch.full((4,), 0.5)]}
    shrink = {"backbone": 0.25, "decoder": 0.125}  # 0.25 × each median
    asked = shrink_check("sparse-mtp", before, shrink, c, keys, l1_budget=0.25)
    err = capsys.readouterr().err
    assert (
        asked["l1_mild"] and asked["warnings"] == [] and asked["l1_shrink_ratio"] == {"backbone": 0.25, "decoder": 0.25}
    )
    assert err.count("\n") == 1 and "l1_budget 0.25 < 1.1: a mild stage" in err and "warning" not in err
    diag = {
        "sparse_backbone": 0.01,
        "sparse_decoder": 0.0,
        "l1_shrink_ratio": asked["l1_shrink_ratio"],
        "l1_mild": True,
    }
    assert sparsity_warnings("sparse-mtp", diag, c, keys) == []
    # the same budget from a small α (not asked for): both warnings, as before
    alpha = shrink_check("sparse-mtp", before, shrink, c, keys)
    assert "l1_mild" not in alpha and len(alpha["warnings"]) == 2
    assert len(sparsity_warnings("sparse-mtp", {**diag, "l1_mild": False}, c, keys)) == 2
