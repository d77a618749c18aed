"""Every dataset reads a tiny tree of its official layout with the right classes and ignore value;
``check-data`` finds each planted problem and names its file; clean trees pass."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from mtprune.cli import main
from mtprune.data import (
    ADE20K_CLASSES,
    CAMVID_CLASSES,
    CITYSCAPES_CLASSES,
    DATASETS,
    VOC_CLASSES,
    BadSampleError,
    build_dataset,
    check_dataset,
)
from mtprune.data.voc import save_voc_mask
from mtprune.errors import DataError, UsageError

H, W = 12, 16


def rgb(path: Path, seed: int = 0, size: tuple[int, int] = (H, W)) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    arr = np.random.default_rng(seed).integers(0, 256, (*size, 3), dtype=np.uint8)
    Image.fromarray(arr).save(path)


def gray(path: Path, mask: np.ndarray) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(mask.astype(np.uint8), mode="L").save(path)


def stripes(values: list[int], size: tuple[int, int] = (H, W)) -> np.ndarray:
    """A mask of vertical bands, one per value (so every value occurs)."""
    h, w = size
    cols = np.array_split(np.arange(w), len(values))
    mask = np.zeros((h, w), np.uint8)
    for v, c in zip(values, cols, strict=True):
        mask[:, c] = v
    return mask


# --- tree builders --------------------------------------------------------------------------------
def make_voc(root: Path, aug: bool = True) -> Path:
    voc = root / "VOCdevkit" / "VOC2012"
    ids = {"train": ["2007_000032", "2007_000039"], "val": ["2007_000033"]}
    for split, names in ids.items():
        for i, name in enumerate(names):
            rgb(voc / "JPEGImages" / f"{name}.jpg", i)
            (voc / "SegmentationClass").mkdir(parents=True, exist_ok=True)
            save_voc_mask(stripes([0, 15, 255, 20]), voc / "SegmentationClass" / f"{name}.png")
            if aug:
                gray(voc / "SegmentationClassAug" / f"{name}.png", stripes([0, 1, 2, 255]))
        (voc / "ImageSets" / "Segmentation").mkdir(parents=True, exist_ok=True)
        (voc / "ImageSets" / "Segmentation" / f"{split}.txt").write_text("".join(f"{n}\n" for n in names))
    if aug:
        (voc / "ImageSets" / "Segmentation" / "train_aug.txt").write_text(
            "".join(f"/JPEGImages/{n}.jpg /SegmentationClassAug/{n}.png\n" for n in ids["train"] + ids["val"])
        )
    return root


def make_cityscapes(root: Path) -> Path:
    for split, cities in {"train": ["aachen", "bochum"], "val": ["frankfurt"]}.items():
        for i, city in enumerate(cities):
            stem = f"{city}_000000_00001{i}"
            rgb(root / "leftImg8bit" / split / city / f"{stem}_leftImg8bit.png", i)
            # 7 road → 0, 26 car → 13, 0 unlabeled → 255, 4 static → 255, 33 bicycle → 18
            gray(root / "gtFine" / split / city / f"{stem}_gtFine_labelIds.png", stripes([7, 26, 0, 4, 33]))
            gray(root / "gtFine" / split / city / f"{stem}_gtFine_instanceIds.png", stripes([0, 0, 0, 0, 0]))
    return root


def make_ade20k(root: Path) -> Path:
    base = root / "ADEChallengeData2016"
    for split, n in (("training", 2), ("validation", 1)):
        for i in range(n):
            name = f"ADE_{'train' if split == 'training' else 'val'}_{i + 1:08d}"
            rgb(base / "images" / split / f"{name}.jpg", i)
            gray(base / "annotations" / split / f"{name}.png", stripes([0, 1, 150, 12]))
    return root


def make_camvid(root: Path) -> Path:
    for split, n in (("train", 3), ("val", 2)):
        lines = []
        for i in range(n):
            name = f"0001TP_{i:06d}.png"
            rgb(root / split / name, i)
            gray(root / f"{split}annot" / name, stripes([0, 3, 11, 10]))
            lines.append(f"/SegNet/CamVid/{split}/{name} /SegNet/CamVid/{split}annot/{name}\n")
        (root / f"{split}.txt").write_text("".join(lines))
    return root


def make_imagefolder(root: Path, splits: tuple[str, ...] = ("train", "val")) -> Path:
    for split in splits:
        for c, cls in enumerate(["zebra", "ant", "cat"]):
            for i in range(2):
                rgb(root / split / cls / f"{i}.{'png' if i else 'jpg'}", 10 * c + i, (8 + c, 9))
    return root


# --- every layout reads with its classes and ignore value -----------------------------------------
def test_registry_covers_every_layout() -> None:
    assert set(DATASETS) == {"voc", "cityscapes", "ade20k", "camvid", "imagefolder", "synthetic", "teacher"}
    with pytest.raises(UsageError):
        build_dataset("coco", "/nowhere", "train")


def _check_seg_item(ds, num_classes: int) -> torch.Tensor:
    img, mask = ds[0]
    assert ds.task == "seg" and ds.num_classes == num_classes and ds.ignore_index == 255
    assert len(ds.class_names) == num_classes
    assert img.dtype == torch.uint8 and img.shape == (3, H, W)
    assert mask.dtype == torch.int64 and mask.shape == (H, W)
    return mask


def test_voc(tmp_path: Path) -> None:
    root = make_voc(tmp_path)
    ds = build_dataset("voc", root, "train")
    assert len(ds) == 2 and ds.class_names == VOC_CLASSES and len(VOC_CLASSES) == 21
    mask = _check_seg_item(ds, 21)
    assert torch.equal(mask, torch.from_numpy(stripes([0, 15, 255, 20])).long())  # palette index = class
    assert len(build_dataset("voc", root, "val")) == 1
    aug = build_dataset("voc", root, "train_aug")
    assert len(aug) == 3 and aug.samples[0][1].parent.name == "SegmentationClassAug"
    assert torch.equal(aug[0][1], torch.from_numpy(stripes([0, 1, 2, 255])).long())
    assert len(build_dataset("voc", root, "trainaug")) == 3


def test_cityscapes_maps_label_ids_to_train_ids(tmp_path: Path) -> None:
    root = make_cityscapes(tmp_path)
    ds = build_dataset("cityscapes", root, "train")
    assert len(ds) == 2 and len(CITYSCAPES_CLASSES) == 19 and ds.class_names[13] == "car"
    mask = _check_seg_item(ds, 19)
    assert torch.equal(mask, torch.from_numpy(stripes([0, 13, 255, 255, 18])).long())
    assert all(m.name.endswith("_gtFine_labelIds.png") for _, m in ds.samples)
    assert len(build_dataset("cityscapes", root, "val")) == 1


def test_ade20k_shifts_labels_and_ignores_zero(tmp_path: Path) -> None:
    root = make_ade20k(tmp_path)
    ds = build_dataset("ade20k", root, "training")
    assert len(ds) == 2 and len(ADE20K_CLASSES) == 150
    mask = _check_seg_item(ds, 150)
    assert torch.equal(mask, torch.from_numpy(stripes([255, 0, 149, 11])).long())
    assert len(build_dataset("ade20k", root, "val")) == 1  # alias of "validation"


def test_camvid_resolves_list_paths_and_maps_11_to_ignore(tmp_path: Path) -> None:
    root = make_camvid(tmp_path)
    ds = build_dataset("camvid", root, "train")
    assert len(ds) == 3 and ds.class_names == CAMVID_CLASSES
    assert ds.samples[0] == (root / "train" / "0001TP_000000.png", root / "trainannot" / "0001TP_000000.png")
    mask = _check_seg_item(ds, 11)
    assert torch.equal(mask, torch.from_numpy(stripes([0, 3, 255, 10])).long())


def test_imagefolder_sorted_classes_and_split_names(tmp_path: Path) -> None:
    root = make_imagefolder(tmp_path, ("train", "test"))
    ds = build_dataset("imagefolder", root, "test")
    assert ds.task == "cls" and ds.class_names == ["ant", "cat", "zebra"] and len(ds) == 6
    img, label = ds[0]
    assert isinstance(label, int) and label == 0
    assert img.dtype == torch.uint8 and img.shape == (3, 9, 9)  # "ant" images are 9x9
    assert [t for _, t in ds.samples] == [0, 0, 1, 1, 2, 2]


@pytest.mark.parametrize("name", ["voc", "cityscapes", "ade20k", "camvid", "imagefolder", "synthetic"])
def test_missing_root_or_layout_names_the_expected_path(tmp_path: Path, name: str) -> None:
    with pytest.raises(DataError, match="expected") as e:
        build_dataset(name, tmp_path / "absent", "train")
    assert str(tmp_path / "absent") in str(e.value) and "\n" not in str(e.value)
    (tmp_path / "empty").mkdir()
    with pytest.raises(DataError, match="expected") as e:
        build_dataset(name, tmp_path / "empty", "train")
    assert str(tmp_path / "empty") in str(e.value) and "\n" not in str(e.value)


# --- bad samples: dataset errors and check-data ---------------------------------------------------
def plant_problems(root: Path) -> dict[str, tuple[Path, str]]:
    """Break a CamVid tree in four ways; returns what check-data must report, per problem."""
    make_camvid(root)
    undecodable = root / "train" / "0001TP_000000.png"
    undecodable.write_bytes(b"\x89PNG\r\n\x1a\n not really a png")
    wrong_size = root / "trainannot" / "0001TP_000001.png"
    gray(wrong_size, np.zeros((H + 2, W), np.uint8))
    bad_value = root / "trainannot" / "0001TP_000002.png"
    gray(bad_value, stripes([0, 42, 11, 3]))
    with open(root / "train.txt", "a") as f:
        f.write("/SegNet/CamVid/train/missing.png /SegNet/CamVid/trainannot/missing.png\n")
    return {
        "decode": (undecodable, "image does not decode"),
        "size": (wrong_size, f"mask size differs from its image (mask {W}x{H + 2}, image {W}x{H})"),
        "value": (bad_value, "label value outside 0..10 and not the ignore value 11 (42)"),
        "missing": (root / "train" / "missing.png", "listed file not found"),
    }


def test_bad_samples_raise_one_line_naming_the_file(tmp_path: Path) -> None:
    planted = plant_problems(tmp_path)
    ds = build_dataset("camvid", tmp_path, "train")
    for index, key in enumerate(["decode", "size", "value", "missing"]):
        with pytest.raises(BadSampleError) as e:
            ds[index]
        path, what = planted[key]
        assert str(e.value).startswith(f"{path}: {what}") and "\n" not in str(e.value)


def test_check_dataset_reports_every_planted_problem(tmp_path: Path) -> None:
    planted = plant_problems(tmp_path)
    report = check_dataset(build_dataset("camvid", tmp_path, "train"), progress=False)
    assert report.num_samples == 4 and not report.ok
    lines = [str(p) for p in report.problems]
    for path, what in planted.values():
        assert any(line.startswith(f"{path}: {what}") for line in lines), (path, lines)
    # the missing entry's annotation is reported too
    assert any(line.startswith(str(tmp_path / "trainannot" / "missing.png")) for line in lines)


def test_check_data_cli_problems_exit_1(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    planted = plant_problems(tmp_path)
    assert main(["check-data", "--dataset", "camvid", "--root", str(tmp_path), "--split", "train"]) == 1
    out = capsys.readouterr().out
    problem_lines = [line for line in out.splitlines() if line.startswith("PROBLEM: ")]
    assert len(problem_lines) == 5
    for path, what in planted.values():
        assert f"PROBLEM: {path}: {what}" in out
    assert "samples: 4" in out


def test_check_data_cli_clean_trees_exit_0(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    trees = {
        "voc": make_voc(tmp_path / "voc"),
        "cityscapes": make_cityscapes(tmp_path / "cs"),
        "ade20k": make_ade20k(tmp_path / "ade"),
        "camvid": make_camvid(tmp_path / "camvid"),
        "imagefolder": make_imagefolder(tmp_path / "folder"),
    }
    for name, root in trees.items():
        assert main(["check-data", "--dataset", name, "--root", str(root)]) == 0, name
        out = capsys.readouterr().out
        assert "no problems" in out and "PROBLEM" not in out
    main(["check-data", "--dataset", "camvid", "--root", str(trees["camvid"]), "--split", "train"])
    out = capsys.readouterr().out
    assert "samples: 3" in out and "image sizes (WxH): 1 distinct" in out and f"{W}x{H} (3)" in out
    # pixels per class, with names: each band of stripes([0, 3, 11, 10]) is 4 columns x 12 rows x 3 images
    assert any(line.split()[:3] == ["0", "Sky", "144"] for line in out.splitlines())
    assert any(line.split()[:2] == ["(ignore)", "144"] for line in out.splitlines())


def test_check_data_cli_json(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    plant_problems(tmp_path)
    assert main(["check-data", "--dataset", "camvid", "--root", str(tmp_path), "--json"]) == 1
    doc = json.loads(capsys.readouterr().out)
    assert doc["ok"] is False
    train, val = doc["reports"]
    assert train["split"] == "train" and len(train["problems"]) == 5 and val["problems"] == []
    assert val["pixels_per_class"]["Road"] == 2 * 4 * H and val["ignore_pixels"] == 2 * 4 * H


def test_check_data_cli_missing_root_and_wrong_layout(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["check-data", "--dataset", "voc", "--root", str(tmp_path / "nope")]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert err == [f"mtprune check-data: error: expected dataset root directory {tmp_path / 'nope'} (voc) not found"]
    assert main(["check-data", "--dataset", "cityscapes", "--root", str(tmp_path), "--split", "val"]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and str(tmp_path / "leftImg8bit" / "val") in err[0]
    assert main(["check-data", "--dataset", "camvid", "--root", str(tmp_path)]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and str(tmp_path / "train.txt") in err[0]
