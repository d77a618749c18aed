"""Loaders: seeded workers, the distributed sampler, and bad samples (stop with one line, or skip)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from torch.utils.data import DistributedSampler

from mtprune.data import (
    BadSampleError,
    SkipBadSamples,
    SyntheticSegmentation,
    build_dataset,
    build_loader,
    seg_train_transforms,
)


def camvid_tree(root: Path, n: int = 6, bad: tuple[int, ...] = ()) -> Path:
    lines = []
    for split_dir in ("train", "trainannot"):
        (root / split_dir).mkdir(parents=True, exist_ok=True)
    for i in range(n):
        name = f"s{i}.png"
        Image.fromarray(np.full((8, 10, 3), i * 10, np.uint8)).save(root / "train" / name)
        mask = np.full((8, 10), i % 11, np.uint8)
        if i in bad:
            mask[0, 0] = 77
        Image.fromarray(mask, mode="L").save(root / "trainannot" / name)
        lines.append(f"/SegNet/CamVid/train/{name} /SegNet/CamVid/trainannot/{name}\n")
    (root / "train.txt").write_text("".join(lines))
    return root


def batches(loader) -> list[tuple[torch.Tensor, torch.Tensor]]:  # noqa: ANN001
    it = iter(loader)
    try:
        return [(x.clone(), y.clone()) for x, y in it]
    finally:
        # Shut the workers down now: left to the traceback's collection, torch waits 5 s to join them.
        shutdown = getattr(it, "_shutdown_workers", None)
        if shutdown is not None:
            shutdown()


def test_seeded_workers_reproduce_augmentations() -> None:
    ds = SyntheticSegmentation(
        "train", num_samples=8, image_size=32, num_classes=4, seed=0, transforms=seg_train_transforms(24)
    )
    runs = [batches(build_loader(ds, 4, shuffle=True, seed=s, num_workers=2)) for s in (7, 7, 8)]
    assert all(torch.equal(a[0], b[0]) and torch.equal(a[1], b[1]) for a, b in zip(runs[0], runs[1], strict=True))
    assert not all(torch.equal(a[0], b[0]) for a, b in zip(runs[0], runs[2], strict=True))


def test_loader_options() -> None:
    ds = SyntheticSegmentation("train", num_samples=10, image_size=16, num_classes=3)
    loader = build_loader(ds, 4, shuffle=False, drop_last=True)
    assert loader.pin_memory == torch.cuda.is_available()
    assert len(loader) == 2
    x, y = next(iter(loader))
    assert x.shape == (4, 3, 16, 16) and y.shape == (4, 16, 16) and y.dtype == torch.int64
    dist = build_loader(ds, 2, shuffle=True, seed=3, distributed=True, rank=1, world_size=2)
    assert isinstance(dist.sampler, DistributedSampler) and dist.sampler.rank == 1
    assert dist.sampler.seed == 3 and len(dist) == 3  # 5 samples for this rank, batches of 2
    other = build_loader(ds, 2, shuffle=True, seed=3, distributed=True, rank=0, world_size=2)
    for epoch in (0, 1):
        dist.sampler.set_epoch(epoch)
        other.sampler.set_epoch(epoch)
        assert set(dist.sampler).isdisjoint(set(other.sampler))


def test_bad_sample_stops_the_run_with_one_line(tmp_path: Path) -> None:
    ds = build_dataset("camvid", camvid_tree(tmp_path, bad=(3,)), "train")
    bad_file = tmp_path / "trainannot" / "s3.png"
    expected = f"{bad_file}: label value outside 0..10 and not the ignore value 11 (77)"
    for workers in (0, 1):
        with pytest.raises(BadSampleError) as e:
            batches(build_loader(ds, 2, shuffle=False, num_workers=workers))
        assert str(e.value) == expected, workers  # one line even when raised in a worker process


def test_skip_bad_skips_and_counts_across_workers(tmp_path: Path) -> None:
    ds = build_dataset("camvid", camvid_tree(tmp_path, n=8, bad=(2, 5)), "train")
    wrapped = SkipBadSamples(ds)
    assert wrapped.num_classes == 11 and wrapped.task == "seg" and len(wrapped) == 8
    out = batches(build_loader(wrapped, 4, shuffle=False, num_workers=2))
    assert [x.shape[0] for x, _ in out] == [4, 4]  # bad samples are replaced, batches keep their size
    assert wrapped.num_skipped == 2 and wrapped.skipped_indices() == [2, 5]
    labels = torch.cat([y[:, 0, 1] for _, y in out]).tolist()
    assert 2 not in labels and 5 not in labels  # sample i has label i; the bad ones never appear
    report = wrapped.report()
    assert report.startswith("skipped 2 bad samples") and str(tmp_path / "trainannot" / "s2.png") in report
    assert all("(77)" in p for p in wrapped.problems())


def test_skip_bad_with_every_sample_bad(tmp_path: Path) -> None:
    ds = build_dataset("camvid", camvid_tree(tmp_path, n=2, bad=(0, 1)), "train")
    with pytest.raises(BadSampleError, match="every one of the 2 samples is bad"):
        SkipBadSamples(ds)[0]
