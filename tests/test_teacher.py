"""MTP's classification task without ImageNet (issue 28): label-free images, a frozen teacher's logits or
features as Eq. 7's targets, teacher agreement as top-1 / top-5, and the bad inputs refused in one line."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch
from PIL import Image
from tests.test_pipeline import TINY

from mtprune import build_model, load_model, save_model
from mtprune.cli import main
from mtprune.config import load_config
from mtprune.errors import DataError, UsageError
from mtprune.method import feature_mse, teacher_kl
from mtprune.pipeline import run_stage
from mtprune.train.teacher import ClsTask, cls_task

NET = "deeplabv3_efficientnet_lite0"


def test_the_kl_target_is_zero_on_the_teacher_s_own_logits_and_scales_with_t_squared():
    z = torch.randn(4, 10)
    assert float(teacher_kl(z, z, 2.0)) == pytest.approx(0.0, abs=1e-6)
    zt = torch.randn(4, 10)
    p_t = torch.softmax(zt / 3, 1)
    want = (p_t * (torch.log_softmax(zt / 3, 1) - torch.log_softmax(z / 3, 1))).sum(1).mean() * 9
    assert float(teacher_kl(z, zt, 3.0)) == pytest.approx(float(want), rel=1e-5)


def test_the_feature_target_ignores_the_scale_of_a_map_and_is_two_for_opposite_maps():
    f = torch.randn(2, 8, 3, 3)
    assert float(feature_mse(5 * f, f)) == pytest.approx(0.0, abs=1e-6)
    assert float(feature_mse(-f, f)) == pytest.approx(4.0, rel=1e-5)


def _images(folder, n: int, size: int = 24, seed: int = 0):
    rng = np.random.default_rng(seed)
    folder.mkdir(parents=True, exist_ok=True)
    for i in range(n):
        sub = folder / ("a" if i % 2 else "b")  # any layout: images are found recursively
        sub.mkdir(exist_ok=True)
        Image.fromarray(rng.integers(0, 255, (size, size, 3), dtype=np.uint8)).save(sub / f"{i}.png")
    return folder


def test_label_free_images_are_found_in_every_folder_and_an_empty_one_is_one_line(tmp_path):
    from mtprune.data import build_dataset

    ds = build_dataset("teacher", [_images(tmp_path / "x", 3), _images(tmp_path / "y", 2)], "")
    assert len(ds) == 5 and ds.num_classes is None and ds[0][1] == 0
    (tmp_path / "empty").mkdir()
    with pytest.raises(DataError, match="empty: no images under it"):
        build_dataset("teacher", [tmp_path / "empty"], "")


@pytest.fixture
def teacher_dir(tmp_path):
    torch.manual_seed(0)
    save_model(build_model(NET, 6, 1000, width=0.125, model_args={"output_stride": 32}), tmp_path / "teacher")
    return tmp_path / "teacher"


def _cfg(tmp_path, teacher_dir, *extra: str):
    roots = json.dumps([str(_images(tmp_path / "imgs", 20))])
    sets = [
        s
        for s in TINY
        if not s.startswith(("model.width", "data.cls.options", "data.cls.val_options", "data.cls.size"))
    ]
    return load_config(
        overrides=[
            *sets,
            f"model.name={NET}",
            "model.width=0.125",
            'model.model_args={"output_stride": 32}',
            "data.cls.dataset=teacher",
            f"data.cls.roots={roots}",
            f"data.cls.root={tmp_path / 'imgs'}",
            "data.cls.val_split=a",
            f"data.cls.teacher={teacher_dir}",
            "data.cls.size=32",
            "log_every=1",
            *extra,
        ]
    )


def test_sparse_mtp_learns_w1_from_the_teacher_and_reports_the_agreement(tmp_path, teacher_dir):
    c = _cfg(tmp_path, teacher_dir)
    m = run_stage("sparse-mtp", c, tmp_path / "mtp", init=str(teacher_dir))
    assert 0.0 <= m["top1"] <= m["top5"] <= 1.0  # the agreement with the teacher's top-1 on ROOT/a
    rows = [json.loads(x) for x in (tmp_path / "mtp" / "metrics.jsonl").read_text().splitlines()]
    cls = [r["loss"] for r in rows if r.get("phase") == "w1"]
    assert cls and all(math.isfinite(v) and v >= 0 for v in cls)
    # the W1 loss is the KL to the teacher: zero for the teacher itself in eval mode
    task = cls_task(c, load_model(teacher_dir), "cpu")
    x = torch.randn(2, 3, 32, 32)
    net = task.teacher
    assert float(task.loss(net(x), x, torch.zeros(2, dtype=torch.long))) == pytest.approx(0.0, abs=1e-6)


def test_finetune_s_classification_epochs_use_the_teacher(tmp_path, teacher_dir):
    c = _cfg(tmp_path, teacher_dir, "finetune.seg_epochs=0.25")
    run_stage("finetune", c, tmp_path / "ft", init=str(teacher_dir))
    rows = [json.loads(x) for x in (tmp_path / "ft" / "metrics.jsonl").read_text().splitlines()]
    assert any(r.get("phase") == "cls" for r in rows)
    done = json.loads((tmp_path / "ft" / "done.json").read_text())
    assert "top1" in done["metrics"]


def test_the_feature_target_trains_and_a_pruned_last_map_is_one_line(tmp_path, teacher_dir):
    c = _cfg(tmp_path, teacher_dir, "data.cls.target=features")
    student = load_model(teacher_dir)
    task = cls_task(c, student, "cpu")
    assert isinstance(task, ClsTask) and task.output == "features"
    x = torch.randn(2, 3, 32, 32)
    feats = student.backbone(x)
    with torch.no_grad():
        assert float(task.loss(feats, x, torch.zeros(2))) == pytest.approx(0.0, abs=1e-6)
    with pytest.raises(UsageError, match="last feature map is"):
        task.loss(feats[:, :-1], x, torch.zeros(2))
    run_stage("sparse-mtp", c, tmp_path / "mtp", init=str(teacher_dir))


def test_a_run_with_a_teacher_skips_pretrain_cls_and_starts_from_the_teacher(tmp_path, teacher_dir):
    c = _cfg(
        tmp_path, teacher_dir, "run.methods=[mtp, uniform]", "run.ratios=[0.5]", "eval.every_epoch=false",
        "run.eval_pruned=true",
    )  # fmt: skip
    c.run.qualitative = 0
    from mtprune.pipeline import run_pipeline

    rows = run_pipeline(c, tmp_path / "run")
    assert not (tmp_path / "run" / "pretrain-cls").exists()
    assert {r["tag"] for r in rows} >= {"dense", "mtp-0.5-independent", "uniform-0.5"}
    mtp = next(r for r in rows if r["method"] == "mtp")
    assert mtp["top1"] is not None  # the teacher agreement of the pruned net's backbone
    # run.eval_pruned: the pruned net before fine-tuning, evaluated too; the sparse stage's sparsity on the row
    assert 0 <= mtp["miou_pruned"] <= 1 and mtp["top1_pruned"] is not None
    done = json.loads((tmp_path / "run" / "eval-mtp-0.5-independent-pruned" / "done.json").read_text())
    assert done["metrics"]["miou"] == mtp["miou_pruned"]
    assert set(mtp["sparsity"]) == {"backbone", "decoder"} and "sparsity" not in rows[0]


def _refused(argv: list[str], capsys) -> str:
    assert main(argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1
    return err[0]


def test_bad_teachers_and_folders_are_one_line_and_nothing_is_written(tmp_path, teacher_dir, capsys):
    yaml = tmp_path / "c.yaml"
    base = f"model: {{name: {NET}, width: 0.125, model_args: {{output_stride: 32}}}}\n"
    imgs = _images(tmp_path / "imgs", 4)

    def run(cls_yaml: str) -> str:
        yaml.write_text(base + "data:\n  cls: " + cls_yaml + "\n")
        out = tmp_path / "out"
        msg = _refused(["run", str(yaml), "--out", str(out)], capsys)
        assert not out.exists()
        return msg

    other = tmp_path / "resnet"
    save_model(build_model("deeplabv3_resnet18", 6, 1000, width=0.125), other)
    (tmp_path / "empty").mkdir()
    ok = f"{{dataset: teacher, roots: [{imgs}], teacher: {teacher_dir}}}"
    assert "no images under it" in run(ok.replace(str(imgs), str(tmp_path / "empty")))
    assert "no teacher" in run(f"{{dataset: teacher, roots: [{imgs}]}}")
    tv = tmp_path / "tv"
    save_model(build_model("torchvision:lraspp_mobilenet_v3_large", 6, 1000), tv)
    assert "has no trained classification head" in run(ok.replace(str(teacher_dir), str(tv)))
    msg = run(ok.replace(str(teacher_dir), str(other)))
    assert "a deeplabv3_resnet18 teacher for a deeplabv3_efficientnet_lite0 net (another architecture)" in msg
    with pytest.raises(UsageError, match="a deeplabv3_resnet18 teacher"):  # a stage refuses it before training
        run_stage("sparse-mtp", _cfg(tmp_path, other), tmp_path / "mtp", init=str(teacher_dir))
    msg = _refused(["init", "--model", "deeplabv3_resnet18", "--num-classes", "4", "--backbone-weights", "imagenet",
                    "--out", str(tmp_path / "i")], capsys)  # fmt: skip
    assert "no package ships ImageNet weights" in msg and not (tmp_path / "i").exists()


def test_eval_against_a_teacher(tmp_path, teacher_dir, capsys):
    imgs = _images(tmp_path / "imgs", 6)
    argv = ["eval", "--checkpoint", str(teacher_dir), "--dataset", "teacher", "--root", str(imgs)]
    assert main([*argv, "--teacher", str(teacher_dir), "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["top1"] == 1.0 and out["top5"] == 1.0 and out["num_images"] == 6
    torch.manual_seed(1)
    student = build_model(NET, 6, 1000, width=0.125, model_args={"output_stride": 32})
    save_model(student, tmp_path / "student")
    argv[2] = str(tmp_path / "student")
    assert main([*argv, "--teacher", str(teacher_dir), "--json"]) == 0
    other = json.loads(capsys.readouterr().out)
    assert other["top1"] < 1.0 and other["top1"] <= other["top5"]
    assert "needs --teacher DIR" in _refused(argv, capsys)
