"""The real CamVid and CIFAR-10 trees under ``../shared/data`` load (skipped, with the reason, when absent)."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

from mtprune.data import CAMVID_CLASSES, build_dataset, build_loader, seg_train_transforms

# tests/ -> repo root -> its parent, where shared/ lives next to the checkout
SHARED = Path(os.environ.get("MTPRUNE_SHARED_DATA", Path(__file__).resolve().parents[2] / "shared" / "data"))
CAMVID = SHARED / "camvid"
CIFAR10 = SHARED / "cifar10"


@pytest.mark.skipif(not (CAMVID / "train.txt").is_file(), reason=f"CamVid not present at {CAMVID}")
def test_shared_camvid_loads() -> None:
    train = build_dataset("camvid", CAMVID, "train")
    val = build_dataset("camvid", CAMVID, "val")
    assert (len(train), len(val)) == (367, 101)
    assert train.class_names == CAMVID_CLASSES and train.num_classes == 11
    for ds in (train, val):
        img, mask = ds[0]
        assert img.shape == (3, 360, 480) and img.dtype == torch.uint8 and mask.shape == (360, 480)
        values = set(mask.unique().tolist())
        assert values <= set(range(11)) | {255} and len(values) > 3
    aug = build_dataset("camvid", CAMVID, "train", seg_train_transforms((180, 240), (0.25, 1.0)))
    x, y = next(iter(build_loader(aug, 2, shuffle=True, seed=0)))
    assert x.shape == (2, 3, 180, 240) and y.shape == (2, 180, 240) and y.dtype == torch.int64


@pytest.mark.skipif(not (CIFAR10 / "train").is_dir(), reason=f"CIFAR-10 tree not present at {CIFAR10}")
def test_shared_cifar10_loads_through_imagefolder() -> None:
    train = build_dataset("imagefolder", CIFAR10, "train")
    test = build_dataset("imagefolder", CIFAR10, "test")
    assert (len(train), len(test)) == (20000, 5000)
    assert train.class_names == sorted(train.class_names) and len(train.class_names) == 10
    assert train.class_names[:2] == ["airplane", "automobile"]
    img, label = test[len(test) - 1]
    assert img.shape == (3, 32, 32) and label == 9
