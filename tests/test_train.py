"""The training engine: determinism, exact resume (E and μ included), NaN stop, ℓ1 effect, stage reuse."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file
from tests.conftest import crash_at

from mtprune import load_model
from mtprune.config import load_config
from mtprune.errors import MtpruneError
from mtprune.pipeline import run_stage
from mtprune.train.engine import StageRun, lr_at

TINY = [
    "model.width=0.125",
    "data.cls.options={num_samples: 32, image_size: 32}",
    "data.seg.options={num_samples: 16, image_size: 40}",
    "data.cls.size=32",
    "data.seg.crop_size=[32,32]",
    "eval.final=false",
    "log_every=1",
    "sparse_mtp.rounds=2",
    "sparse_mtp.steps_cls=2",
    "sparse_mtp.steps_seg=2",
    "sparse_mtp.cls_batch_size=8",
    "sparse_mtp.seg_batch_size=4",
    "sparse_mtp.mu0=0.5",
    "sparse_mtp.rho=2.0",
    "sparse_mtp.alpha1=0.01",
    "sparse_mtp.alpha2=0.01",
]


def cfg(*extra: str):
    return load_config(overrides=TINY + list(extra))


def tensors(path):
    return load_file(str(path))


def assert_same(a: dict, b: dict, prefix: str = "") -> None:
    keys = sorted(k for k in a if k.startswith(prefix))
    assert keys and keys == sorted(k for k in b if k.startswith(prefix))
    for k in keys:
        assert torch.equal(a[k], b[k]), k


def test_lr_schedules():
    assert lr_at("poly", 0.01, 0, 100) == pytest.approx(0.01)
    assert lr_at("poly", 0.01, 50, 100) == pytest.approx(0.01 * 0.5**0.9)
    assert lr_at("linear", 0.1, 25, 100) == pytest.approx(0.075)
    assert lr_at("linear", 0.1, 100, 100) == 0.0


@pytest.mark.parametrize("mode", ["joint", "alternating"])
def test_sparse_mtp_is_deterministic(tmp_path, mode):
    c = cfg(f"sparse_mtp.mode={mode}")
    run_stage("sparse-mtp", c, tmp_path / "a")
    run_stage("sparse-mtp", c, tmp_path / "b")
    a, b = tensors(tmp_path / "a" / "state.safetensors"), tensors(tmp_path / "b" / "state.safetensors")
    assert_same(a, b, "model.")
    assert_same(a, b, "backbone1.")
    assert_same(a, b, "alm.E.")
    assert any(v.abs().sum() > 0 for k, v in a.items() if k.startswith("alm.E."))  # E moved
    rounds = [json.loads(x) for x in (tmp_path / "a" / "metrics.jsonl").read_text().splitlines()]
    rounds = [r for r in rounds if "round" in r]
    assert [r["round"] for r in rounds] == [1, 2]
    assert rounds[0]["mu"] == pytest.approx(1.0) and rounds[1]["mu"] == pytest.approx(2.0)  # μ ← ρμ
    for key in ("gap", "cls_loss", "seg_loss", "sparse_backbone", "sparse_decoder"):
        assert key in rounds[0]
    # the exported model and its pruning scores (γ1 of W1, γ2 of W2)
    model = load_model(tmp_path / "a")
    scores = load_file(str(tmp_path / "a" / "model" / "scores.safetensors"))
    lay = model.prunable_layers()[0]
    assert torch.equal(scores[lay.bn], model.get_submodule(lay.bn).weight.abs())


def test_interrupted_sparse_mtp_resumes_bit_identical(tmp_path, monkeypatch):
    c = cfg("checkpoint_every=3", "sparse_mtp.mode=alternating")
    run_stage("sparse-mtp", c, tmp_path / "full")

    undo = crash_at(monkeypatch, 5)
    with pytest.raises(KeyboardInterrupt):
        run_stage("sparse-mtp", c, tmp_path / "cut")
    assert json.loads((tmp_path / "cut" / "metrics.jsonl").read_text().splitlines()[-1])["step"] == 5
    undo()
    run_stage("sparse-mtp", c, tmp_path / "cut")  # the same command again: resumes from step 3
    a, b = tensors(tmp_path / "full" / "state.safetensors"), tensors(tmp_path / "cut" / "state.safetensors")
    for prefix in ("model.", "backbone1.", "alm.E.", "optim."):
        assert_same(a, b, prefix)
    full_log = (tmp_path / "full" / "metrics.jsonl").read_text().splitlines()
    cut_log = (tmp_path / "cut" / "metrics.jsonl").read_text().splitlines()
    timing = ("time", "data_s")  # wall clock and data-loader wait of the step
    strip = [{k: v for k, v in json.loads(x).items() if k not in timing} for x in full_log]
    assert strip == [{k: v for k, v in json.loads(x).items() if k not in timing} for x in cut_log]
    # the training speed counts the steps this process ran: all 12 of the full run (2 rounds × (2 cls +
    # 2 × 2 seg)), the 9 after the resume from step 3 (3 seg steps of round 1, then round 2)
    full = json.loads((tmp_path / "full" / "done.json").read_text())["throughput"]
    cut = json.loads((tmp_path / "cut" / "done.json").read_text())["throughput"]
    assert full["steps"] == 12 and cut["steps"] == 9
    for speed, images in ((full, {"cls": 2 * 2 * 8, "seg": 2 * 4 * 4}), (cut, {"cls": 2 * 8, "seg": 7 * 4})):
        assert speed["steps_per_s"] * speed["train_s"] == pytest.approx(speed["steps"], rel=1e-6)
        # each stream's rate is over the time of the steps that drew from it, which split the total
        assert sum(speed["stream_s"].values()) == pytest.approx(speed["train_s"], rel=1e-6)
        for name, n in images.items():
            assert speed["images_per_s"][name] * speed["stream_s"][name] == pytest.approx(n, rel=1e-6)
        assert 0 < speed["data_wait_frac"] < 1


def test_finished_stage_is_reused(tmp_path):
    c = cfg("train_seg.epochs=1", "train_seg.batch_size=4")
    run_stage("train-seg", c, tmp_path)
    stamp = (tmp_path / "model" / "model.safetensors").stat().st_mtime_ns
    run_stage("train-seg", c, tmp_path)
    assert (tmp_path / "model" / "model.safetensors").stat().st_mtime_ns == stamp


def test_stage_is_reused_or_resumed_only_with_the_same_recipe(tmp_path, monkeypatch, capsys):
    import shutil

    from mtprune.cli import main

    base = ["train_seg.epochs=1", "train_seg.batch_size=4", "finetune.cls_epochs=0", "finetune.seg_batch_size=4"]
    seg = tmp_path / "seg"
    run_stage("train-seg", cfg(*base), seg)
    recipe = json.loads((seg / "recipe.json").read_text())
    assert recipe["stage"] == "train-seg" and recipe["input"] is None
    assert recipe["config"]["train_seg.epochs"] == 1.0 and "data.workers" not in recipe["config"]
    kept = {f: (seg / f).read_bytes() for f in ("done.json", "recipe.json", "model/model.safetensors")}
    # what changes only speed, logging or the data's location: reused
    fast = ("log_every=5", "data.workers=1", "optim.channels_last=true", "checkpoint_every=7", "data.seg.root=/x")
    run_stage("train-seg", cfg(*base, *fast), seg)
    # a key of the recipe: refused with one line naming the folder and the key, nothing written
    with pytest.raises(MtpruneError) as e:
        run_stage("train-seg", cfg(*base, "train_seg.epochs=2", "train_seg.lr=0.02"), seg)
    msg = str(e.value)
    assert str(seg) in msg and "train_seg.epochs: 1.0 → 2.0" in msg and "train_seg.lr: 0.01 → 0.02" in msg
    assert "\n" not in msg and "new --out" in msg
    assert {f: (seg / f).read_bytes() for f in kept} == kept
    # the same through the CLI: exit 2, the one line on stderr
    (tmp_path / "c.yaml").write_text("")
    argv = ["train", "train-seg", "--config", str(tmp_path / "c.yaml"), "--out", str(seg)]
    assert main([*argv, *sum((["--set", s] for s in [*TINY, *base, "seed=3"]), [])]) == 2
    assert "seed: 0 → 3" in capsys.readouterr().err
    # a stage downstream knows its input: once the source is redone another way, it is refused too
    ft = tmp_path / "ft"
    run_stage("finetune", cfg(*base), ft, init=str(seg))
    assert json.loads((ft / "recipe.json").read_text())["input"].startswith("recipe:")
    run_stage("finetune", cfg(*base), ft, init=str(seg))  # unchanged: reused
    shutil.rmtree(seg)
    run_stage("train-seg", cfg(*base, "train_seg.lr=0.02"), seg)
    with pytest.raises(MtpruneError, match="its input model"):
        run_stage("finetune", cfg(*base), ft, init=str(seg))
    # an interrupted stage resumes only with its recipe; with nothing saved yet it takes the new one
    undo = crash_at(monkeypatch, 3)
    cut = tmp_path / "cut"
    with pytest.raises(KeyboardInterrupt):
        run_stage("train-seg", cfg(*base, "checkpoint_every=2"), cut)
    undo()
    state = (cut / "state.safetensors").read_bytes()
    with pytest.raises(MtpruneError, match="train_seg.batch_size: 4 → 2"):
        run_stage("train-seg", cfg(*base, "checkpoint_every=2", "train_seg.batch_size=2"), cut)
    assert (cut / "state.safetensors").read_bytes() == state
    (cut / "state.safetensors").unlink()  # nothing to resume: the folder takes the new recipe
    run_stage("train-seg", cfg(*base, "train_seg.batch_size=2"), cut)
    assert json.loads((cut / "recipe.json").read_text())["config"]["train_seg.batch_size"] == 2
    assert json.loads((cut / "done.json").read_text())["steps"] == 8  # 16 images, batch 2, 1 epoch
    # a folder from before recipes existed is reused as it is
    (cut / "recipe.json").unlink()
    assert run_stage("train-seg", cfg(*base, "train_seg.epochs=3"), cut) is not None
    assert not (cut / "recipe.json").exists()


def test_nan_loss_stops_with_one_line_and_keeps_the_checkpoint(tmp_path, monkeypatch):
    import mtprune.train.stages as stages

    calls = {"n": 0}
    real = stages.seg_loss

    def poisoned(out, y, w):
        calls["n"] += 1
        loss = real(out, y, w)
        return loss * float("nan") if calls["n"] == 4 else loss

    monkeypatch.setattr(stages, "seg_loss", poisoned)
    c = cfg("train_seg.epochs=2", "train_seg.batch_size=4", "checkpoint_every=2")
    with pytest.raises(MtpruneError) as e:
        run_stage("train-seg", c, tmp_path)
    msg = str(e.value)
    assert "\n" not in msg and "train-seg" in msg and "nan" in msg and "step 3" in msg
    assert (tmp_path / "state.safetensors").is_file()


def test_l1_shrinks_gamma(tmp_path):
    base = ["sparse_slimming.epochs=2", "sparse_slimming.batch_size=4", "sparse_slimming.lr=0.05"]
    run_stage("sparse-slimming", cfg(*base, "sparse_slimming.alpha=0"), tmp_path / "a0")
    run_stage("sparse-slimming", cfg(*base, "sparse_slimming.alpha=0.05"), tmp_path / "a1")
    m0, m1 = load_model(tmp_path / "a0"), load_model(tmp_path / "a1")
    g0 = torch.cat([m0.get_submodule(lay.bn).weight.abs() for lay in m0.prunable_layers()]).sum()
    g1 = torch.cat([m1.get_submodule(lay.bn).weight.abs() for lay in m1.prunable_layers()]).sum()
    # 8 steps of lr·α = 0.0025 each, on ~100 γ: a measurable shrink
    assert g1 < g0 - 0.5


def test_large_mu_keeps_copies_closer(tmp_path):
    run_stage("sparse-mtp", cfg("sparse_mtp.mu0=0.0", "sparse_mtp.rho=1.0"), tmp_path / "free")
    run_stage(
        "sparse-mtp", cfg("sparse_mtp.mu0=100.0", "sparse_mtp.rho=1.0", "sparse_mtp.mu_max=100"), tmp_path / "tied"
    )
    free = json.loads((tmp_path / "free" / "done.json").read_text())["metrics"]["gap"]
    tied = json.loads((tmp_path / "tied" / "done.json").read_text())["metrics"]["gap"]
    assert tied < 0.5 * free


def test_unstable_mu_is_refused(tmp_path):
    with pytest.raises(MtpruneError, match="mu_max"):
        run_stage("sparse-mtp", cfg("sparse_mtp.mu0=1000.0", "sparse_mtp.mu_max=1000"), tmp_path)


def test_sync_bn_reverts_to_batchnorm_for_export():
    from tests.conftest import tiny
    from torch import nn

    from mtprune.train.engine import revert_sync_bn

    m = tiny("deeplabv3_resnet18")
    ref = {k: v.clone() for k, v in m.state_dict().items()}
    m.backbone = nn.SyncBatchNorm.convert_sync_batchnorm(m.backbone)
    assert any(isinstance(x, nn.SyncBatchNorm) for x in m.modules())
    revert_sync_bn(m)
    assert not any(isinstance(x, nn.SyncBatchNorm) for x in m.modules())
    assert all(torch.equal(ref[k], v) for k, v in m.state_dict().items())
    x = torch.randn(1, 3, 32, 32)
    with torch.no_grad():
        assert m.eval()(x).shape == (1, 5, 32, 32)


def test_sync_bn_on_cpu_is_refused():
    from mtprune.errors import UsageError
    from mtprune.train.distributed import DistEnv
    from mtprune.train.engine import convert_sync_bn

    with pytest.raises(UsageError, match="CUDA"):
        convert_sync_bn([torch.nn.BatchNorm2d(2)], cfg("optim.sync_bn=true"), DistEnv(0, 2, 0, torch.device("cpu")))


def test_bad_sample_stops_training_with_one_line_unless_skip_bad(tmp_path, capsys, monkeypatch):
    """A corrupt mask in a VOC-layout tree: one line naming the file and exit 1; --skip-bad skips and counts it."""
    from mtprune.cli import main

    monkeypatch.setenv("MTPRUNE_NO_PROGRESS", "1")  # the progress bar also writes to stderr
    root = tmp_path / "syn"
    assert (
        main(
            [
                "make-data",
                "synthetic",
                "--out",
                str(root),
                "--num-train",
                "8",
                "--num-val",
                "2",
                "--size",
                "32",
                "32",
                "--num-cls-train",
                "16",
                "--num-cls-val",
                "4",
            ]
        )
        == 0
    )
    masks = sorted((root / "VOCdevkit" / "VOC2012" / "SegmentationClass").glob("*.png"))
    train_ids = (root / "VOCdevkit" / "VOC2012" / "ImageSets" / "Segmentation" / "train.txt").read_text().split()
    bad = next(m for m in masks if m.stem in train_ids)
    bad.write_bytes(b"not a png")
    capsys.readouterr()
    args = [
        "train",
        "train-seg",
        "--out",
        str(tmp_path / "run"),
        "--set",
        f"data.seg.root={root}",
        "--set",
        "data.seg.crop_size=[32,32]",
        "--set",
        "train_seg.epochs=1",
        "--set",
        "train_seg.batch_size=2",
        "--set",
        "eval.final=false",
        "--set",
        "model.width=0.125",
        "--set",
        f"data.cls.root={root}",
        "--set",
        "data.cls.size=32",
    ]
    assert main(args) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and bad.name in err[0]
    assert main(args + ["--skip-bad"]) == 0
    captured = capsys.readouterr()
    assert "skipped 1 bad sample" in captured.err


def test_train_subset_is_a_fixed_draw_whatever_the_run_seed():
    from mtprune.data.from_config import make_dataset

    a = make_dataset(cfg("data.seg.train_subset=5", "seed=0"), "seg", train=True)
    b = make_dataset(cfg("data.seg.train_subset=5", "seed=3"), "seg", train=True)
    c = make_dataset(cfg("data.seg.train_subset=5", "data.seg.subset_seed=1"), "seg", train=True)
    assert len(a) == 5 and a.indices == b.indices != c.indices
    assert len(set(a.indices)) == 5 and all(0 <= i < 16 for i in a.indices)
    assert a.num_classes == make_dataset(cfg(), "seg", train=True).num_classes
    # the validation split is never cut
    assert len(make_dataset(cfg("data.seg.train_subset=5"), "seg", train=False)) > 5
    with pytest.raises(MtpruneError, match=r"data.seg.train_subset 17 is outside 1..16"):
        make_dataset(cfg("data.seg.train_subset=17"), "seg", train=True)


def test_train_seg_on_a_subset_counts_epochs_over_the_subset(tmp_path):
    from mtprune.train.engine import DONE_FILE

    run_stage("train-seg", cfg("data.seg.train_subset=4", "train_seg.epochs=2", "train_seg.batch_size=2"), tmp_path)
    assert json.loads((tmp_path / DONE_FILE).read_text())["steps"] == 4  # 2 epochs × 4 images / batch 2


def test_channels_last_training_matches_contiguous_and_reports_its_speed(tmp_path, capsys, monkeypatch):
    from mtprune.models import build_model

    # dropout draws its mask in memory order, so the two layouts would drop different activations:
    # without it, the layouts differ by summation order only
    monkeypatch.setattr(torch.nn.Dropout, "forward", lambda self, x: x)
    layouts = []
    original = StageRun.after_step

    def spy(self, record):
        w = self.modules["model"].backbone.layer1[0].conv1.weight
        layouts.append(w.is_contiguous(memory_format=torch.channels_last) and not w.is_contiguous())
        original(self, record)

    monkeypatch.setattr(StageRun, "after_step", spy)
    base = ("train_seg.epochs=0.5", "train_seg.batch_size=4")  # 2 steps (16 images)
    run_stage("train-seg", cfg(*base), tmp_path / "nchw")
    assert layouts == [False] * 2
    capsys.readouterr()
    run_stage("train-seg", cfg(*base, "optim.channels_last=true"), tmp_path / "nhwc")
    assert layouts[2:] == [True] * 2
    err = capsys.readouterr().err
    a, b = load_model(tmp_path / "nchw"), load_model(tmp_path / "nhwc")
    assert all(p.is_contiguous() for p in b.parameters())  # saved and loaded in the standard layout
    torch.manual_seed(0)  # the stage's seed: its starting model
    start = build_model("deeplabv3_resnet18", a.num_classes, a.cls_classes, 0.125).state_dict()
    sa, sb = a.state_dict(), b.state_dict()
    moved = [k for k, v in sa.items() if v.is_floating_point() and not torch.equal(v, start[k])]
    assert len(moved) > 100  # the 2 SGD steps moved (nearly) every tensor…
    for k in moved:  # …and both layouts moved them alike, to 0.1 % of the move (summation order)
        assert float((sb[k] - sa[k]).abs().max()) <= 1e-3 * float((sa[k] - start[k]).abs().max()) + 1e-7, k
    done = json.loads((tmp_path / "nhwc" / "done.json").read_text())
    assert done["throughput"]["steps"] == 2 and done["throughput"]["images_per_s"]["seg"] > 0
    assert "train-seg: 2 steps in" in err and "seg" in err and "images/s" in err


def test_a_key_added_since_at_its_default_is_not_a_recipe_change():
    """A folder made before ``sparse_mtp.gamma_lr`` existed ran what gamma_lr 1 (its default) runs now."""
    from mtprune.recipe import differences, stage_recipe

    new = stage_recipe("sparse-mtp", cfg())
    old = json.loads(json.dumps(new))
    del old["config"]["sparse_mtp.gamma_lr"]
    assert differences(old, new) == []
    changed = stage_recipe("sparse-mtp", cfg("sparse_mtp.gamma_lr=10"))
    assert differences(old, changed) == ['sparse_mtp.gamma_lr: "<unset>" → 10.0']


def test_the_final_line_of_a_stage_shows_scalars_and_small_dicts_not_distributions():
    from mtprune.cli.train_cmds import _metric_line

    metrics = {
        "gap": 0.0033041,
        "sparse_backbone": 0.0,
        "gamma_backbone": {"q05": 0.36358, "q50": 0.37876},
        "l1_shrink_ratio": {"backbone": 1.15, "decoder": None},
        "gamma_distribution": {"before": {"backbone": [1.0] * 101}},
        "warnings": ["warning: …"],
        "miou": 0.02664,
    }
    assert _metric_line(metrics) == (
        "gap=0.003304, sparse_backbone=0, gamma_backbone.q05=0.3636, gamma_backbone.q50=0.3788, "
        "l1_shrink_ratio.backbone=1.15, l1_shrink_ratio.decoder=None, miou=0.02664"
    )
