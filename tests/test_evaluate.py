"""Evaluation: confusion-matrix metrics, top-k, multi-scale/flip inference, the loops and ``mtprune eval``."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.distributed as dist
from torch import nn
from torch.utils.data import Dataset

from mtprune.cli import main
from mtprune.data import build_dataset, build_loader, cls_eval_transforms, seg_eval_transforms, write_synthetic
from mtprune.evaluate.inference import (
    build_eval_loader,
    evaluate_classification,
    evaluate_segmentation,
    predict_logits,
)
from mtprune.evaluate.metrics import ConfusionMatrix, TopKAccuracy, topk_accuracy
from mtprune.models import build_model

# --- metrics --------------------------------------------------------------------------------------


def test_confusion_matrix_by_hand() -> None:
    # (target, pred) pairs: the 255 pixel is ignored; class 3 occurs nowhere.
    target = torch.tensor([[0, 0, 1, 255], [2, 2, 1, 1]])
    pred = torch.tensor([[0, 1, 1, 2], [2, 0, 1, 1]])
    cm = ConfusionMatrix(4, ignore_index=255)
    cm.update(pred[:1], target[:1])  # two batches accumulate
    cm.update(pred[1:], target[1:])
    assert cm.mat.tolist() == [[1, 1, 0, 0], [0, 3, 0, 0], [1, 0, 1, 0], [0, 0, 0, 0]]
    res = cm.compute()
    # class 0: TP 1, union 2 + 2 - 1 = 3; class 1: 3 / (3 + 4 - 3); class 2: 1 / (2 + 1 - 1)
    assert res["per_class"][:3] == pytest.approx([1 / 3, 3 / 4, 1 / 2])
    assert math.isnan(res["per_class"][3])
    assert res["miou"] == pytest.approx((1 / 3 + 3 / 4 + 1 / 2) / 3)  # 19/36: class 3 does not count
    assert res["pixel_acc"] == pytest.approx(5 / 7)
    assert res["mean_acc"] == pytest.approx((1 / 2 + 1 + 1 / 2) / 3)
    assert res["num_pixels"] == 7

    # scores N×K×H×W are reduced with argmax over the class dim
    scores = torch.nn.functional.one_hot(pred, 4).permute(2, 0, 1)[None].float()
    cm2 = ConfusionMatrix(4)
    cm2.update(scores, target[None])
    assert torch.equal(cm2.mat, cm.mat)


def test_confusion_matrix_predicted_only_class_counts_as_zero() -> None:
    cm = ConfusionMatrix(4)
    cm.update(torch.tensor([0, 3]), torch.tensor([0, 0]))
    res = cm.compute()
    assert res["per_class"][0] == pytest.approx(0.5) and res["per_class"][3] == 0.0
    assert math.isnan(res["per_class"][1]) and math.isnan(res["per_class"][2])
    assert res["miou"] == pytest.approx(0.25)


def test_confusion_matrix_rejects_bad_target_and_reduces_in_a_group(tmp_path: Path) -> None:
    cm = ConfusionMatrix(3)
    with pytest.raises(ValueError, match="target value 7"):
        cm.update(torch.tensor([0, 1]), torch.tensor([0, 7]))
    cm.update(torch.tensor([0, 1, 2]), torch.tensor([0, 1, 1]))
    before = cm.mat.clone()
    cm.reduce_from_all_processes()  # not initialised: no-op
    assert torch.equal(cm.mat, before)
    if not dist.is_available() or dist.is_initialized():
        return
    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'store'}", rank=0, world_size=1)
    try:
        cm.reduce_from_all_processes()  # a one-process group: the sum is the matrix itself
        assert torch.equal(cm.mat, before)
    finally:
        dist.destroy_process_group()


def test_topk_by_hand() -> None:
    logits = torch.tensor(
        [
            [0.1, 0.9, 0.3, 0.2, 0.0, 0.05],  # target 1: rank 1
            [0.5, 0.4, 0.3, 0.2, 0.1, 0.0],  # target 4: rank 5
            [0.5, 0.4, 0.3, 0.2, 0.1, 0.0],  # target 5: rank 6
        ]
    )
    target = torch.tensor([1, 4, 5])
    assert topk_accuracy(logits, target) == pytest.approx({"top1": 1 / 3, "top5": 2 / 3})
    acc = TopKAccuracy((1, 2, 5))
    acc.update(logits[:2], target[:2])
    acc.update(logits[2:], target[2:])
    assert acc.compute() == pytest.approx({"top1": 1 / 3, "top2": 1 / 3, "top5": 2 / 3, "num_samples": 3})
    # fewer classes than k: every sample is a top-5 hit
    assert topk_accuracy(logits[:, :3], torch.tensor([2, 0, 1])) == pytest.approx({"top1": 1 / 3, "top5": 1.0})


# --- inference ------------------------------------------------------------------------------------


class ConstantModel(nn.Module):
    """Logits ``c`` at every pixel, whatever the input (and whatever its size)."""

    def __init__(self, c: list[float]) -> None:
        super().__init__()
        self.register_buffer("c", torch.tensor(c))
        self.num_classes = len(c)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        n, _, h, w = x.shape
        return self.c.view(1, -1, 1, 1).expand(n, -1, h, w).clone()


class RampModel(nn.Module):
    """Two-class logits ``[r, -r]`` with ``r`` rising left to right: not flip-equivariant."""

    num_classes = 2

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        n, _, h, w = x.shape
        r = torch.linspace(-2, 2, w).view(1, 1, 1, w).expand(n, 1, h, w)
        return torch.cat([r, -r], 1)


def test_multiscale_flip_on_constant_and_ramp_models() -> None:
    x = torch.randn(2, 3, 33, 47)
    c = [0.5, -1.0, 2.0]
    p = predict_logits(ConstantModel(c), x, scales=(0.5, 0.75, 1.0, 1.25, 1.5, 1.75), flip=True)
    assert p.shape == (2, 3, 33, 47)
    torch.testing.assert_close(p, torch.tensor(c).softmax(0).view(1, 3, 1, 1).expand_as(p))
    ramp = RampModel()
    plain = predict_logits(ramp, x)
    assert plain[:, 0, :, 0].max() < 0.05 and plain[:, 0, :, -1].min() > 0.95
    # the flipped run, mirrored back, is the complement: the average is 1/2 everywhere
    flipped = predict_logits(ramp, x, scales=(1.0, 0.5), flip=True)
    torch.testing.assert_close(flipped, torch.full_like(flipped, 0.5))


def test_flip_equivariant_model_gives_the_same_probabilities() -> None:
    torch.manual_seed(0)
    conv = nn.Conv2d(3, 4, 1)  # pointwise: mirroring commutes with it
    x = torch.randn(1, 3, 20, 28)
    with torch.no_grad():
        torch.testing.assert_close(predict_logits(conv, x, flip=True), conv(x).softmax(1))


def test_predict_logits_at_scale_one_is_model_softmax() -> None:
    torch.manual_seed(0)
    model = build_model("deeplabv3_resnet18", num_classes=5, cls_classes=4, width=0.125).eval()
    x = torch.randn(2, 3, 40, 56)
    with torch.no_grad():
        ref = model(x)
        p = predict_logits(model, x)
    torch.testing.assert_close(p, ref.softmax(1))
    assert torch.equal(p.argmax(1), ref.argmax(1))


# --- evaluation loops -----------------------------------------------------------------------------


class ListDataset(Dataset):
    def __init__(self, items: list, class_names: list[str]) -> None:
        self.items = items
        self.class_names = class_names

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, i: int):
        return self.items[i]


def test_evaluate_segmentation_mixed_sizes_and_default_collate() -> None:
    # predicts class 1 everywhere; masks of two sizes with ignore pixels
    g = torch.Generator().manual_seed(0)
    items = []
    for h, w in [(8, 12), (10, 6), (8, 12), (10, 6), (8, 12)]:
        mask = torch.randint(0, 3, (h, w), generator=g)
        mask[0, :3] = 255
        items.append((torch.randn(3, h, w, generator=g), mask))
    masks = torch.cat([m.flatten() for _, m in items])
    valid = masks[masks != 255]
    n1, n = int((valid == 1).sum()), valid.numel()
    model = ConstantModel([0.0, 3.0, 0.0])
    ds = ListDataset(items, ["a", "b", "c"])
    res = evaluate_segmentation(model, build_eval_loader(ds, batch_size=3), 3, progress=False)
    assert res["num_images"] == 5 and res["num_skipped"] == 0
    assert res["per_class"] == pytest.approx({"a": 0.0, "b": n1 / n, "c": 0.0})
    assert res["miou"] == pytest.approx(n1 / n / 3)
    assert res["pixel_acc"] == pytest.approx(n1 / n)
    # a default-collated loader (equal sizes) gives the confusion matrix of the same pixels
    same = ListDataset([it for it in items if it[0].shape[1] == 8], ["a", "b", "c"])
    res2 = evaluate_segmentation(model, build_loader(same, 2, shuffle=False), 3, progress=False)
    m2 = torch.cat([m.flatten() for _, m in same.items])
    v2 = m2[m2 != 255]
    assert res2["num_images"] == 3
    assert res2["pixel_acc"] == pytest.approx(float((v2 == 1).sum()) / v2.numel())
    with pytest.raises(Exception, match="predicts 3 classes"):
        evaluate_segmentation(model, build_eval_loader(ds), 4, progress=False)


def test_evaluate_segmentation_matches_a_direct_computation_and_restores_mode() -> None:
    torch.manual_seed(0)
    model = build_model("deeplabv3_resnet18", num_classes=6, cls_classes=4, width=0.125).train()
    ds = build_dataset("synthetic", None, "val", seg_eval_transforms(), num_samples=4, image_size=32)
    res = evaluate_segmentation(
        model, build_eval_loader(ds, batch_size=2), 6, scales=(0.75, 1.0), flip=True, progress=False
    )
    assert model.training  # restored
    model.eval()
    cm = np.zeros((6, 6), np.int64)
    with torch.no_grad():
        for i in range(len(ds)):
            x, y = ds[i]
            pred = predict_logits(model, x[None], (0.75, 1.0), True).argmax(1)[0].numpy()
            y = y.numpy()
            keep = y != 255
            np.add.at(cm, (y[keep], pred[keep]), 1)
    union = cm.sum(0) + cm.sum(1) - np.diag(cm)
    iou = np.where(union > 0, np.diag(cm) / np.maximum(union, 1), np.nan)
    assert list(res["per_class"]) == ds.class_names
    got = [np.nan if v is None else v for v in res["per_class"].values()]
    np.testing.assert_allclose(got, iou)
    assert res["miou"] == pytest.approx(float(np.nanmean(iou)))
    assert res["pixel_acc"] == pytest.approx(np.diag(cm).sum() / cm.sum())


def test_evaluate_classification_matches_argmax() -> None:
    torch.manual_seed(0)
    model = build_model("deeplabv3_resnet18", num_classes=3, cls_classes=10, width=0.125).eval()
    ds = build_dataset("synthetic", None, "val", cls_eval_transforms(32, 32), task="cls", num_samples=6, image_size=32)
    res = evaluate_classification(model, build_eval_loader(ds, batch_size=4), progress=False)
    x = torch.stack([ds[i][0] for i in range(6)])
    y = torch.tensor([ds[i][1] for i in range(6)])
    with torch.no_grad():
        logits = model.forward_cls(x)
    top5 = (logits.topk(5, 1).indices == y[:, None]).any(1).float().mean()
    assert res["num_images"] == 6
    assert res["top1"] == pytest.approx(float((logits.argmax(1) == y).float().mean()))
    assert res["top5"] == pytest.approx(float(top5))


# --- command line ---------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("ckpt") / "dense"
    argv = ["init", "--model", "deeplabv3_resnet18", "--num-classes", "6", "--cls-classes", "10"]
    assert main([*argv, "--width", "0.125", "--out", str(out)]) == 0
    return out


def test_cli_eval_json_and_table(checkpoint: Path, capsys: pytest.CaptureFixture[str]) -> None:
    common = ["eval", "--checkpoint", str(checkpoint), "--dataset", "synthetic", "--image-size", "32"]
    assert main([*common, "--num-samples", "3", "--json", "--scales", "0.5", "1.0", "--flip"]) == 0
    res = json.loads(capsys.readouterr().out)
    assert {"miou", "per_class", "pixel_acc", "num_images"} <= set(res)
    assert list(res["per_class"]) == ["background", "disk", "square", "triangle", "ring", "stripes"]
    assert res["num_images"] == 3 and 0.0 <= res["pixel_acc"] <= 1.0 and res["scales"] == [0.5, 1.0]

    assert main([*common, "--num-samples", "2", "--batch-size", "2"]) == 0
    text = capsys.readouterr().out
    assert "mIoU" in text and "pixel accuracy" in text and "triangle" in text

    assert main([*common, "--num-samples", "5", "--task", "cls", "--json"]) == 0
    res = json.loads(capsys.readouterr().out)
    assert {"top1", "top5"} <= set(res) and res["num_images"] == 5


def test_cli_eval_class_mismatch(checkpoint: Path, capsys: pytest.CaptureFixture[str]) -> None:
    argv = ["eval", "--checkpoint", str(checkpoint), "--dataset", "synthetic", "--num-samples", "1"]
    assert main([*argv, "--num-classes", "4"]) == 1
    err = capsys.readouterr().err
    assert err.startswith("mtprune eval: error: ") and err.count("\n") == 1
    assert "6 segmentation classes" in err and "has 4" in err
    assert main([*argv, "--task", "cls", "--num-classes", "5"]) == 1  # checkpoint's cls head has 10
    assert "10 classification classes" in capsys.readouterr().err


def test_cli_eval_bad_sample(checkpoint: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    root = tmp_path / "syn"
    write_synthetic(root, num_train=0, num_val=3, image_size=(24, 32), num_cls_train=0, num_cls_val=0)
    bad = root / "VOCdevkit" / "VOC2012" / "SegmentationClass" / "val_000001.png"
    bad.write_bytes(b"not a png")
    argv = ["eval", "--checkpoint", str(checkpoint), "--dataset", "synthetic", "--root", str(root), "--json"]
    assert main(argv) == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "val_000001.png" in err
    assert main([*argv, "--skip-bad", "--batch-size", "2"]) == 0
    out, err = capsys.readouterr()
    res = json.loads(out)
    assert res["num_images"] == 2 and res["num_skipped"] == 1
    assert "skipped 1 bad sample" in err
