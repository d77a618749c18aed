"""Issue 29: bad data and values, refused in one line (nothing written) or handled; each reproduced first."""

from __future__ import annotations

import json
import os

import numpy as np
import pytest
import torch
from PIL import Image
from tests.test_train import cfg

from mtprune import build_model, save_model
from mtprune.cli import main
from mtprune.config import load_config
from mtprune.errors import UsageError
from mtprune.io import folder_lock
from mtprune.pipeline import run_stage


def _one_line(capsys, code: int, want: int = 2) -> str:
    assert code == want
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1, err
    return err[0]


def test_a_batch_without_a_labelled_pixel_contributes_zero_and_is_counted(tmp_path, capsys):
    from mtprune.data import write_synthetic

    root = tmp_path / "syn"
    write_synthetic(root, num_train=8, num_val=2, image_size=32, num_cls_train=4, num_cls_val=2)
    masks = sorted((root / "VOCdevkit" / "VOC2012" / "SegmentationClass").glob("train_*.png"))
    for m in masks[::2]:  # half the training masks entirely ignore (255), as Cityscapes crops can be
        im = Image.open(m)
        filled = Image.fromarray(np.full(np.asarray(im).shape, 255, np.uint8), mode="P")
        filled.putpalette(im.getpalette())
        filled.save(m)
    c = cfg(f"data.seg.root={root}", "data.seg.dataset=synthetic", "data.seg.options={}", "data.seg.val_options={}",
            "train_seg.batch_size=2", "train_seg.epochs=2", "log_every=1", "data.seg.scale_range=[1.0,1.0]",
            "data.seg.hflip=0.0")  # fmt: skip
    m = run_stage("train-seg", c, tmp_path / "seg")
    rows = [json.loads(x) for x in (tmp_path / "seg" / "metrics.jsonl").read_text().splitlines()]
    assert all(np.isfinite(r["loss"]) for r in rows if "loss" in r)
    assert m["batches_without_labels"] >= 1
    assert main(["check-data", "--dataset", "synthetic", "--root", str(root), "--split", "train"]) == 0
    assert "warning: 4 mask(s) entirely ignore" in capsys.readouterr().out


def test_the_seg_loss_of_an_all_ignore_batch_is_zero_with_a_zero_gradient():
    from mtprune.train.engine import seg_loss

    logits = torch.randn(2, 3, 4, 4, requires_grad=True)
    loss = seg_loss({"out": logits, "aux": [logits]}, torch.full((2, 4, 4), 255), 0.4)
    loss.backward()
    assert float(loss.detach()) == 0.0 and logits.grad is not None and float(logits.grad.abs().sum()) == 0.0
    target = torch.randint(0, 3, (2, 4, 4))
    want = torch.nn.functional.cross_entropy(logits, target)
    assert torch.allclose(seg_loss({"out": logits}, target, 0.4), want)


@pytest.mark.parametrize(
    "setting, words",
    [
        ("data.seg.crop_size=[0,0]", "data.seg.crop_size"),
        ("data.seg.crop_size=[-5,32]", "data.seg.crop_size"),
        ("data.seg.crop_size=[32]", "data.seg.crop_size"),
        ("data.seg.scale_range=[2,0.5]", "data.seg.scale_range"),
        ("data.seg.scale_range=[0,0]", "data.seg.scale_range"),
        ("data.seg.hflip=7", "data.seg.hflip"),
        ("seed=-1", "seed"),
        ("train_seg.batch_size=1", "train_seg.batch_size: 1"),
        ("sparse_mtp.l1_budget=-0.5", "sparse_mtp.l1_budget: -0.5 must be >= 0"),
    ],
)
def test_impossible_values_are_refused_when_the_config_loads(setting, words, tmp_path, capsys):
    with pytest.raises(UsageError, match=words):
        load_config(overrides=[setting])
    code = main(["train", "train-seg", "--set", setting, "--out", str(tmp_path / "out")])
    assert words.split(":")[0] in _one_line(capsys, code) and not (tmp_path / "out").exists()


def test_an_l1_budget_of_zero_is_a_sparse_stage_without_the_l1_term():
    assert load_config(overrides=["sparse_slimming.l1_budget=0"]).sparse_slimming.l1_budget == 0.0


def test_batch_size_one_is_fine_with_frozen_batchnorm_statistics():
    assert load_config(overrides=["train_seg.batch_size=1", "optim.freeze_bn_stats=true"]).train_seg.batch_size == 1


def test_a_yaml_alias_bomb_is_refused_at_once(tmp_path):
    bomb = "a: &a [x, x, x, x, x, x, x, x, x, x]\n" + "".join(
        f"{c}: &{c} [*{p}, *{p}, *{p}, *{p}, *{p}, *{p}, *{p}, *{p}, *{p}, *{p}]\n"
        for p, c in zip("abcdefgh", "bcdefghi", strict=True)
    )
    path = tmp_path / "bomb.yaml"
    path.write_text(bomb + "model: {model_args: *i}\n")
    with pytest.raises(UsageError, match=r"bomb.yaml: YAML aliases \(\*a\) are not allowed"):
        load_config(path)
    with pytest.raises(UsageError, match="aliases"):
        load_config(overrides=["model.model_args=[&x [1], *x]"])


def test_torchvision_weights_with_an_auxiliary_head_name_the_fix(tmp_path, capsys):
    torch.manual_seed(0)
    with_aux = build_model("torchvision:fcn_resnet50", 4, model_args={"aux_loss": True})
    torch.save(with_aux._net.state_dict(), tmp_path / "tv.pth")
    argv = ["init", "--model", "torchvision:fcn_resnet50", "--num-classes", "4", "--weights", str(tmp_path / "tv.pth")]
    msg = _one_line(capsys, main([*argv, "--out", str(tmp_path / "a")]))
    assert "aux_classifier" in msg and """--model-args '{"aux_loss": true}'""" in msg
    assert main([*argv, "--model-args", '{"aux_loss": true}', "--out", str(tmp_path / "b")]) == 0


def test_overwrite_refuses_a_folder_mtprune_did_not_write_and_a_folder_in_use(tmp_path, capsys):
    theirs = tmp_path / "theirs"
    (theirs / "sub").mkdir(parents=True)
    (theirs / "precious.txt").write_text("keep me")
    init = ["init", "--model", "deeplabv3_resnet18", "--num-classes", "4", "--width", "0.25", "--overwrite"]
    assert "not an mtprune checkpoint or run folder" in _one_line(capsys, main([*init, "--out", str(theirs)]))
    assert (theirs / "precious.txt").read_text() == "keep me" and (theirs / "sub").is_dir()
    ours = tmp_path / "ours"
    assert main([*init, "--out", str(ours)]) == 0
    assert main([*init, "--out", str(ours)]) == 0  # an mtprune checkpoint: replaced
    with folder_lock(ours):  # a live writer holds it (mtprune train, another prune)
        msg = _one_line(capsys, main([*init, "--out", str(ours)]), 1)
    assert "in use by another mtprune process" in msg and (ours / "arch.json").is_file()


def test_finetune_into_its_own_init_is_refused(tmp_path, capsys):
    save_model(build_model("deeplabv3_resnet18", 6, 10, width=0.125), tmp_path / "ck")
    code = main(["train", "finetune", "--init", str(tmp_path / "ck"), "--out", str(tmp_path / "ck")])
    assert "--out is the --init checkpoint" in _one_line(capsys, code)


def _ck(tmp_path):
    save_model(build_model("deeplabv3_resnet18", 4, 10, width=0.125), tmp_path / "ck")
    return tmp_path / "ck"


def test_weights_of_another_float_dtype_are_cast_once_and_int8_is_one_line(tmp_path, capsys):
    from safetensors.torch import load_file, save_file

    from mtprune import load_model
    from mtprune.errors import CheckpointError

    ck = _ck(tmp_path)
    state = load_file(str(ck / "model.safetensors"))
    want = load_model(ck)
    save_file({k: v.half() if v.is_floating_point() else v for k, v in state.items()}, str(ck / "model.safetensors"))
    model = load_model(ck)
    assert all(p.dtype == torch.float32 for p in model.parameters())
    assert torch.allclose(model.backbone.conv1.weight, want.backbone.conv1.weight, atol=1e-3)
    assert capsys.readouterr().err.count("float16") == 1  # said once, not once a tensor
    state["backbone.conv1.weight"] = state["backbone.conv1.weight"].to(torch.int8)
    save_file(state, str(ck / "model.safetensors"))
    with pytest.raises(CheckpointError, match=r"tensor 'backbone.conv1.weight' is int8, float32 expected"):
        load_model(ck)


@pytest.mark.parametrize("channels", [{"backbone.conv1": [3, -4]}, {"backbone.conv1": ["3", "4"]}, {"x": 5}])
def test_arch_json_channel_counts_that_are_not_positive_integers_are_one_line(tmp_path, channels):
    from mtprune import load_model
    from mtprune.errors import CheckpointError

    ck = _ck(tmp_path)
    arch = json.loads((ck / "arch.json").read_text())
    arch["channels"] = channels
    (ck / "arch.json").write_text(json.dumps(arch))
    with pytest.raises(CheckpointError, match="'channels'") as e:
        load_model(ck)
    assert "\n" not in str(e.value)


def test_non_finite_scores_are_refused(tmp_path):
    from mtprune.errors import CheckpointError
    from mtprune.io import save_tensors
    from mtprune.pruning import scorer_inputs

    ck = _ck(tmp_path)
    model = build_model("deeplabv3_resnet18", 4, 10, width=0.125)
    bn = model.prunable_layers()[0].bn
    scores = {bn: torch.tensor([float("nan")] + [1.0] * (model.get_submodule(bn).num_features - 1))}
    save_tensors(ck / "scores.safetensors", scores, {})
    with pytest.raises(CheckpointError, match=f"scores.safetensors: '{bn}' holds a non-finite score"):
        scorer_inputs("bn", ck, load_config())


def test_a_pickle_payload_as_backbone_weights_is_one_line(tmp_path, capsys):
    import pickle

    class Payload:
        def __reduce__(self):
            return (print, ("pwned",))

    bad = tmp_path / "evil.pth"
    bad.write_bytes(pickle.dumps({"x": Payload()}))
    argv = ["init", "--model", "deeplabv3_resnet18", "--num-classes", "4", "--backbone-weights", str(bad)]
    msg = _one_line(capsys, main([*argv, "--out", str(tmp_path / "o")]), 1)
    assert "evil.pth: cannot read backbone weights" in msg and not (tmp_path / "o").exists()


def test_a_reused_stage_says_when_its_metrics_were_measured_otherwise(tmp_path, capsys):
    run_stage("train-seg", cfg(), tmp_path / "seg")
    capsys.readouterr()
    run_stage("train-seg", cfg("eval.scales=[0.5,1.0]"), tmp_path / "seg")
    assert "measured with eval scales [1.0]" in capsys.readouterr().err


def test_a_finished_stage_is_reused_where_nothing_can_be_written(tmp_path, monkeypatch):
    from mtprune.errors import WriteError
    from mtprune.pipeline import runner

    first = run_stage("train-seg", cfg(), tmp_path / "seg")

    def read_only(folder):
        raise WriteError(f"{folder}: read-only file system (cannot take the folder's lock)")

    monkeypatch.setattr(runner, "folder_lock", read_only)
    assert run_stage("train-seg", cfg(), tmp_path / "seg") == first
    with pytest.raises(WriteError, match="read-only"):  # anything that would write still says why it cannot
        run_stage("train-seg", cfg(), tmp_path / "other")


def test_a_refused_run_keeps_its_config(tmp_path, capsys):
    from tests.test_pipeline import TINY

    argv = ["run", "--out", str(tmp_path / "run")]
    sets = [
        x for s in [*TINY, "run.methods=[uniform]", "run.ratios=[0.5]", "eval.every_epoch=false"] for x in ("--set", s)
    ]
    (tmp_path / "c.yaml").write_text("seed: 0\n")
    assert main([argv[0], str(tmp_path / "c.yaml"), *argv[1:], *sets]) == 0
    before = (tmp_path / "run" / "config.yaml").read_text()
    code = main([argv[0], str(tmp_path / "c.yaml"), *argv[1:], *sets, "--set", "finetune.lr_seg=0.5"])
    assert code != 0 and "finetune.lr_seg" in capsys.readouterr().err
    assert (tmp_path / "run" / "config.yaml").read_text() == before


def test_an_export_killed_before_it_finished_leaves_no_temp_folder_behind(tmp_path):
    from mtprune.export import sweep_dead_exports

    dead = tmp_path / ".m.onnx.999999999.abc.tmp"
    live = tmp_path / f".m.onnx.{os.getpid()}.def.tmp"
    for d in (dead, live):
        d.mkdir()
        (d / "m.onnx").write_bytes(b"half")
    assert sweep_dead_exports(tmp_path / "m.onnx") == [dead]
    assert not dead.exists() and live.exists()


def test_a_crop_larger_than_every_training_image_is_said(tmp_path, capsys):
    from mtprune.data import write_synthetic

    root = tmp_path / "syn"
    write_synthetic(root, num_train=4, num_val=2, image_size=24, num_cls_train=4, num_cls_val=2)
    sets = (f"data.seg.root={root}", "data.seg.dataset=synthetic", "data.seg.options={}", "data.seg.val_options={}",
            "train_seg.batch_size=2")  # fmt: skip
    run_stage("train-seg", cfg(*sets, "data.seg.crop_size=[64,64]", "data.seg.scale_range=[1.0,1.5]"), tmp_path / "a")
    assert "data.seg.crop_size [64, 64] is larger than every training image" in capsys.readouterr().err
    run_stage("train-seg", cfg(*sets, "data.seg.crop_size=[32,32]", "data.seg.scale_range=[1.0,1.5]"), tmp_path / "b")
    assert "larger than every" not in capsys.readouterr().err  # 24 × 1.5 = 36 ≥ 32
