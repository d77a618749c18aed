"""The synthetic world: deterministic, fast, well-formed, and readable from disk by the same loaders."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from mtprune.cli import main
from mtprune.data import (
    SHAPE_CLASSES,
    SyntheticClassification,
    SyntheticSegmentation,
    build_dataset,
    check_dataset,
    read_meta,
)
from mtprune.data.synthetic import generate_cls_sample, generate_seg_sample
from mtprune.errors import DataError


def test_same_seed_same_tensors_other_seed_other_tensors() -> None:
    a = build_dataset("synthetic", None, "train", task="seg", num_samples=5, image_size=48, seed=3)
    b = build_dataset("synthetic", None, "train", task="seg", num_samples=5, image_size=48, seed=3, cache=False)
    c = build_dataset("synthetic", None, "train", task="seg", num_samples=5, image_size=48, seed=4)
    for i in range(5):
        assert torch.equal(a[i][0], b[i][0]) and torch.equal(a[i][1], b[i][1])
    assert not torch.equal(a[0][0], c[0][0])
    val = build_dataset("synthetic", None, "val", task="seg", num_samples=5, image_size=48, seed=3)
    assert not torch.equal(a[0][0], val[0][0])  # splits differ
    x = build_dataset("synthetic", None, "train", task="cls", num_samples=5, image_size=48, seed=3)
    y = build_dataset("synthetic", None, "train", task="cls", num_samples=5, image_size=48, seed=3)
    assert all(torch.equal(x[i][0], y[i][0]) and x[i][1] == y[i][1] for i in range(5))


def test_segmentation_set_is_well_formed() -> None:
    ds = SyntheticSegmentation("train", num_samples=40, image_size=(40, 56), num_classes=6, seed=0)
    assert (ds.task, ds.num_classes, ds.ignore_index) == ("seg", 6, 255)
    assert ds.class_names == ["background", *SHAPE_CLASSES[:5]]
    img, mask = ds[0]
    assert img.shape == (3, 40, 56) and img.dtype == torch.uint8
    assert mask.shape == (40, 56) and mask.dtype == torch.int64
    report = check_dataset(ds, progress=False)
    assert report.ok and report.num_samples == 40
    assert report.class_pixels is not None and (report.class_pixels > 0).all()  # every class occurs
    assert 0.5 < report.class_pixels[0] / report.class_pixels.sum() < 0.95  # background dominates, not all
    assert report.sizes == {(40, 56): 40}


def test_classification_set_is_well_formed() -> None:
    ds = SyntheticClassification("train", num_samples=200, image_size=32, num_classes=10, seed=0)
    assert ds.task == "cls" and ds.num_classes == 10 and ds.class_names == sorted(SHAPE_CLASSES)
    labels = [ds[i][1] for i in range(len(ds))]
    assert set(labels) == set(range(10))
    # the classification classes include every shape class of the segmentation set
    assert set(SyntheticSegmentation(num_classes=6).class_names[1:]) <= set(ds.class_names)


def test_each_sample_is_generated_once_and_on_its_own(monkeypatch: pytest.MonkeyPatch) -> None:
    """What keeps generation cheap without timing it: an index is generated only when first read (not its
    predecessors), once per cached set however often it is read, and every read without the cache
    generates again."""
    import mtprune.data.synthetic as synthetic

    calls: list[tuple[str, int]] = []
    for task, fn in (("seg", synthetic.generate_seg_sample), ("cls", synthetic.generate_cls_sample)):

        def counting(seed, split, index, *args, _task=task, _fn=fn):
            calls.append((_task, index))
            return _fn(seed, split, index, *args)

        monkeypatch.setattr(synthetic, f"generate_{task}_sample", counting)

    seg = SyntheticSegmentation("train", num_samples=10, image_size=32, seed=0)
    img, mask = seg[7]
    assert calls == [("seg", 7)]  # random access: sample 7 does not need samples 0..6
    ref_img, ref_mask = generate_seg_sample(0, "train", 7, 32, 6)
    assert np.array_equal(img.permute(1, 2, 0).numpy(), ref_img) and np.array_equal(mask.numpy(), ref_mask)
    for _ in range(3):
        for i in range(10):
            seg[i]
    assert check_dataset(seg, progress=False).ok
    assert sorted(calls) == [("seg", i) for i in range(10)]  # each index once, whatever reads it

    calls.clear()
    cls = SyntheticClassification("val", num_samples=4, image_size=32, seed=0)
    assert [cls[i][1] for i in (2, 2, 0, 2)] == [generate_cls_sample(0, "val", i, 32, 10)[1] for i in (2, 2, 0, 2)]
    assert calls == [("cls", 2), ("cls", 0)]  # the reference calls above bypass the counter

    calls.clear()
    uncached = SyntheticSegmentation("train", num_samples=10, image_size=32, seed=0, cache=False)
    for _ in range(2):
        uncached[3]
    assert calls == [("seg", 3), ("seg", 3)]


def test_class_count_limits() -> None:
    with pytest.raises(DataError):
        SyntheticSegmentation(num_classes=12)
    with pytest.raises(DataError):
        SyntheticClassification(num_classes=11)


def test_make_data_writes_voc_layout_read_by_the_same_loaders(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "syn"
    args = [
        "make-data",
        "synthetic",
        "--out",
        str(out),
        "--num-train",
        "6",
        "--num-val",
        "3",
        "--size",
        "40",
        "48",
        "--seed",
        "5",
        "--num-classes",
        "4",
        "--num-cls-train",
        "12",
        "--num-cls-val",
        "4",
    ]
    assert main(args) == 0
    printed = capsys.readouterr().out
    assert str(out / "VOCdevkit" / "VOC2012") in printed and str(out / "cls") in printed
    voc = out / "VOCdevkit" / "VOC2012"
    assert len(list((voc / "JPEGImages").glob("*.jpg"))) == 9
    assert len(list((voc / "SegmentationClass").glob("*.png"))) == 9
    assert (voc / "ImageSets" / "Segmentation" / "val.txt").read_text().split() == [f"val_{i:06d}" for i in range(3)]
    meta = read_meta(out)
    assert meta["num_classes"] == 4 and meta["image_size"] == [40, 48]

    seg = build_dataset("synthetic", out, "train")
    assert seg.num_classes == 4 and seg.class_names == ["background", "disk", "square", "triangle"]
    memory = SyntheticSegmentation("train", num_samples=6, image_size=(40, 48), num_classes=4, seed=5)
    for i in range(6):
        img, mask = seg[i]
        assert torch.equal(mask, memory[i][1])  # palette PNG masks are exact
        assert (img.float() - memory[i][0].float()).abs().mean() < 6  # JPEG quality 95
    as_voc = build_dataset("voc", out, "val")  # plain VOC reader: 21 class names, same masks
    assert len(as_voc) == 3 and int(as_voc[0][1].max()) < 4

    cls = build_dataset("synthetic", out, "train", task="cls")
    assert cls.task == "cls" and len(cls) == 12 and cls.class_names == sorted(SHAPE_CLASSES)
    folder = build_dataset("imagefolder", out / "cls", "val")
    assert len(folder) == 4
    mem_cls = SyntheticClassification("val", num_samples=4, image_size=(40, 48), num_classes=10, seed=5)
    assert sorted(t for _, t in folder.samples) == sorted(mem_cls[i][1] for i in range(4))

    assert main(["check-data", "--dataset", "synthetic", "--root", str(out)]) == 0
    assert main(["check-data", "--dataset", "synthetic", "--root", str(out), "--task", "cls"]) == 0
    capsys.readouterr()


def test_make_data_refuses_to_overwrite(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "syn"
    small = ["--num-train", "2", "--num-val", "1", "--num-cls-train", "2", "--num-cls-val", "1", "--size", "16", "16"]
    assert main(["make-data", "synthetic", "--out", str(out), *small]) == 0
    assert main(["make-data", "synthetic", "--out", str(out), *small]) == 1
    assert "--force" in capsys.readouterr().err
    assert main(["make-data", "synthetic", "--out", str(out), "--num-train", "1", *small[2:], "--force"]) == 0
    assert len(list((out / "VOCdevkit" / "VOC2012" / "JPEGImages").iterdir())) == 2
    other = tmp_path / "other"
    other.mkdir()
    (other / "keep.txt").write_text("x")
    assert main(["make-data", "synthetic", "--out", str(other), *small]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "not empty" in err[0]
    assert main(["make-data", "synthetic", "--out", str(tmp_path / "x"), "--num-classes", "20"]) == 2
    assert "--num-classes must be in 2..11" in capsys.readouterr().err


def test_no_temporary_files_left(tmp_path: Path) -> None:
    out = tmp_path / "syn"
    small = ["--num-train", "2", "--num-val", "1", "--num-cls-train", "2", "--num-cls-val", "1", "--size", "16", "16"]
    assert main(["make-data", "synthetic", "--out", str(out), *small]) == 0
    assert not [p for p in out.rglob("*") if p.name.endswith(".tmp")]
    with Image.open(out / "VOCdevkit" / "VOC2012" / "SegmentationClass" / "train_000000.png") as mask:
        assert mask.mode == "P" and np.asarray(mask).ndim == 2
