"""Transforms keep image and mask aligned (a misaligned crop or flip would fail these tests)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torchvision import tv_tensors
from torchvision.transforms import v2

from mtprune.data import (
    build_transforms,
    cls_eval_transforms,
    cls_train_transforms,
    normalization,
    seg_eval_transforms,
    seg_train_transforms,
)
from mtprune.data.transforms import RandomScale

# class c is painted with colour PALETTE[c]; far apart so that the nearest colour decodes the class
PALETTE = torch.tensor([[0.9, 0.1, 0.1], [0.1, 0.9, 0.1], [0.1, 0.1, 0.9], [0.9, 0.9, 0.1], [0.1, 0.9, 0.9]])


def encoded_pair(seed: int, h: int = 48, w: int = 64, block: int = 8) -> tuple[tv_tensors.Image, tv_tensors.Mask]:
    """An image whose colour encodes the class of each pixel, and the matching mask; the layout is
    asymmetric (random blocks), so a flip or shift of one but not the other changes the classes."""
    g = torch.Generator().manual_seed(seed)
    blocks = torch.randint(0, len(PALETTE), (h // block, w // block), generator=g)
    mask = blocks.repeat_interleave(block, 0).repeat_interleave(block, 1)
    image = (PALETTE[mask].permute(2, 0, 1) * 255).round().to(torch.uint8)
    return tv_tensors.Image(image), tv_tensors.Mask(mask.to(torch.uint8))


def decode_classes(image: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Nearest palette class of each pixel, and whether the pixel is a pure class colour (not a blend)."""
    dist = ((image.permute(1, 2, 0)[:, :, None, :] - PALETTE[None, None]) ** 2).sum(-1)
    best, cls = dist.min(-1)
    return cls, best < 0.002


def agreement(image: torch.Tensor, mask: torch.Tensor) -> float:
    """Share of labelled, pure-colour pixels whose mask class equals the class the image encodes."""
    cls, pure = decode_classes(image)
    keep = pure & (mask != 255)
    assert keep.sum() > max(50, 0.3 * int((mask != 255).sum()))
    return float((cls[keep] == mask[keep]).float().mean())


ZERO_ONE = {"mean": (0.0, 0.0, 0.0), "std": (1.0, 1.0, 1.0)}  # keep the image in [0, 1] to decode it


def test_encoding_catches_misalignment() -> None:
    """The check itself: flipping or shifting only the image is detected."""
    image, mask = encoded_pair(0)
    x = image.float() / 255
    assert agreement(x, mask) == 1.0
    assert agreement(torch.flip(x, [-1]), mask) < 0.6
    assert agreement(x[:, 8:, :], mask[:-8, :]) < 0.6


@pytest.mark.parametrize("seed", range(12))
def test_seg_train_transforms_keep_image_and_mask_aligned(seed: int) -> None:
    torch.manual_seed(seed)
    t = seg_train_transforms((40, 56), scale_range=(0.5, 2.0), hflip=0.5, **ZERO_ONE)
    image, mask = encoded_pair(seed)
    out_img, out_mask = t(image, mask)
    assert out_img.shape == (3, 40, 56) and out_img.dtype == torch.float32
    assert out_mask.shape == (40, 56) and out_mask.dtype == torch.int64
    assert set(out_mask.unique().tolist()) <= set(range(len(PALETTE))) | {255}  # NEAREST: no new values
    assert agreement(out_img, out_mask) > 0.99
    # padding: ignore in the mask exactly where the image was padded with zeros
    padded = out_mask == 255
    assert torch.all(out_img[:, padded] == 0)


def test_seg_train_pads_small_images_with_ignore() -> None:
    torch.manual_seed(0)
    t = seg_train_transforms(96, scale_range=(1.0, 1.0), hflip=0.0, **ZERO_ONE)
    image, mask = encoded_pair(1, 48, 64)
    out_img, out_mask = t(image, mask)
    assert out_mask.shape == (96, 96)
    assert int((out_mask != 255).sum()) == 48 * 64  # the whole image survives, the rest is ignore
    assert agreement(out_img, out_mask) == 1.0


def test_random_scale_range_and_flip_both_sides() -> None:
    image, mask = encoded_pair(2)
    scale = RandomScale((0.5, 2.0))
    sizes = set()
    for s in range(20):
        torch.manual_seed(s)
        a, b = scale(image, mask)
        assert a.shape[-2:] == b.shape[-2:]
        assert 24 <= a.shape[-2] <= 96
        sizes.add(tuple(a.shape[-2:]))
    assert len(sizes) > 5
    flipped = {
        bool(
            torch.equal(
                seg_train_transforms((48, 64), (1.0, 1.0), 0.5, **ZERO_ONE)(image, mask)[1],
                torch.flip(mask.long(), [-1]),
            )
        )
        for _ in range(20)
    }
    assert flipped == {True, False}


def test_seg_eval_transforms_keep_the_whole_image() -> None:
    image, mask = encoded_pair(3, 50, 70, block=10)
    out_img, out_mask = seg_eval_transforms(**ZERO_ONE)(image, mask)
    assert out_img.shape == (3, 50, 70) and torch.equal(out_mask, mask.long())
    assert agreement(out_img, out_mask) == 1.0
    mean, std = normalization()
    out_img, _ = seg_eval_transforms(mean, std)(image, mask)
    expected = (image.float() / 255 - torch.tensor(mean)[:, None, None]) / torch.tensor(std)[:, None, None]
    assert torch.allclose(out_img, expected, atol=1e-5)
    small_img, small_mask = seg_eval_transforms(resize=(25, 35), **ZERO_ONE)(image, mask)
    assert small_img.shape == (3, 25, 35) and small_mask.shape == (25, 35)
    assert agreement(small_img, small_mask) > 0.99


def test_cls_transforms_sizes_and_label_passthrough() -> None:
    image = tv_tensors.Image(torch.randint(0, 256, (3, 40, 60), dtype=torch.uint8))
    out, label = cls_train_transforms(32)(image, 7)
    assert out.shape == (3, 32, 32) and out.dtype == torch.float32 and label == 7
    out = cls_eval_transforms(32)(image)
    assert out.shape == (3, 32, 32)
    # resize shorter side to 37 (32 * 8/7) then centre crop: the centre of the image is kept
    ramp = tv_tensors.Image(torch.arange(60).repeat(3, 40, 1).to(torch.uint8))
    out = cls_eval_transforms(20, resize=40, **ZERO_ONE)(ramp)
    assert out.shape == (3, 20, 20)
    assert abs(float(out[0, :, 10].mean()) * 255 - 30) < 1.5


def test_build_transforms_from_config() -> None:
    t = build_transforms("seg", True, {"crop_size": [24, 32], "scale_range": [0.75, 1.25], "hflip": 0.0})
    image, mask = encoded_pair(4)
    out_img, out_mask = t(image, mask)
    assert out_img.shape == (3, 24, 32) and out_mask.shape == (24, 32)
    assert isinstance(build_transforms("seg", False, {}), v2.Compose)
    assert build_transforms("cls", False, {"size": 16})(tv_tensors.Image(image)).shape == (3, 16, 16)
    with pytest.raises(ValueError):
        build_transforms("seg", True, {})
    with pytest.raises(ValueError):
        build_transforms("det", False, {"size": 3})


def test_datasets_apply_transforms_to_both(tmp_path) -> None:  # noqa: ANN001
    from mtprune.data import SyntheticSegmentation

    ds = SyntheticSegmentation(
        "train",
        num_samples=4,
        image_size=(40, 50),
        num_classes=4,
        seed=1,
        transforms=seg_train_transforms(32, **ZERO_ONE),
    )
    torch.manual_seed(0)
    img, mask = ds[0]
    assert img.shape == (3, 32, 32) and mask.shape == (32, 32) and mask.dtype == torch.int64
    assert type(img) is torch.Tensor and type(mask) is torch.Tensor
    assert set(np.unique(mask.numpy())) <= {0, 1, 2, 3, 255}
