"""BatchNorm statistics re-estimated after pruning ("adaptive BN": Li et al., EagleEye, ECCV 2020).

Removing channels changes what every consumer's BatchNorm sees: its running mean and variance were measured on
the dense net's inputs and no longer normalise the pruned net's, so the pruned net evaluated as it is scores far
below what its weights can do (bench/README.md, "mIoU right after pruning"). :func:`recalibrate_bn` replaces
every BatchNorm's running statistics by those of a few training images passed through the pruned net — no
weight changes, no gradient. It matters where the pruned net is used or judged before fine-tuning; a
fine-tuning in training mode re-estimates the statistics anyway.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import torch
from torch import nn

from mtprune.errors import UsageError
from mtprune.models.base import SegmentationModel

#: the fewest images a batch may have: a BatchNorm after a global pooling sees one value per image and channel
MIN_BATCH = 2


def _batches(images: Iterable[torch.Tensor], batch_size: int) -> list[torch.Tensor]:
    """``images`` ([B, 3, H, W] batches or [3, H, W] images) regrouped by image size into batches of up to
    ``batch_size``, none smaller than :data:`MIN_BATCH`: a short last batch joins the one before, and a size
    fewer than :data:`MIN_BATCH` images have is left out."""
    if batch_size < MIN_BATCH:
        raise UsageError(f"recalibrate_bn: batch_size must be ≥ {MIN_BATCH} (got {batch_size})")
    groups: dict[tuple[int, ...], list[torch.Tensor]] = {}
    for item in images:
        t = item.unsqueeze(0) if item.dim() == 3 else item
        if t.dim() != 4:
            raise UsageError(f"recalibrate_bn: images must be [B, 3, H, W] or [3, H, W], got {tuple(item.shape)}")
        groups.setdefault(tuple(t.shape[1:]), []).append(t)
    out: list[torch.Tensor] = []
    for parts in groups.values():
        split = list(torch.cat(parts).split(batch_size))
        if len(split) > 1 and split[-1].shape[0] < MIN_BATCH:
            split[-2:] = [torch.cat(split[-2:])]
        out += [b for b in split if b.shape[0] >= MIN_BATCH]
    return out


def check_images(images: Iterable[torch.Tensor], batch_size: int = 8) -> None:
    """One line unless ``images`` hold at least :data:`MIN_BATCH` images of one size."""
    if not _batches(images, batch_size):
        raise UsageError(f"recalibrate_bn needs at least {MIN_BATCH} training images of one size")


def _ran(bns: list[nn.Module]) -> tuple[set[int], list[Any]]:
    """The ids of the BatchNorms that run (filled as they do), and the hooks recording it."""
    seen: set[int] = set()
    hooks = [m.register_forward_pre_hook(lambda mod, _inp: seen.add(id(mod))) for m in bns]
    return seen, hooks


@torch.no_grad()
def recalibrate_bn(model: nn.Module, images: Iterable[torch.Tensor], batch_size: int = 8) -> int:
    """Replace the running mean and variance of every BatchNorm of ``model`` that the segmentation forward
    (auxiliary heads included) runs by the plain average of their batch statistics over ``images``
    (normalised, as the model takes them; :func:`_batches`), passed through it with only the BatchNorms in
    training mode (dropout stays off). A BatchNorm the forward does not reach (a classification head's) keeps
    its statistics; weights, affine parameters, momenta and every module's mode are left as they were, and on
    an error the statistics too. Returns the number of images used (0: no BatchNorm)."""
    bns = [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.track_running_stats]
    if not bns:
        return 0
    batches = _batches(images, batch_size)
    if not batches:
        raise UsageError(f"recalibrate_bn needs at least {MIN_BATCH} training images of one size")
    saved = [{k: v.clone() for k, v in m.state_dict().items() if k.startswith(("running", "num_batches"))} for m in bns]
    modes, momenta = {m: m.training for m in model.modules()}, [m.momentum for m in bns]
    device = bns[0].running_mean.device
    forward = (lambda x: model.seg_outputs(x, aux=True)) if isinstance(model, SegmentationModel) else model
    seen, hooks = _ran(bns)
    ok = False
    try:
        model.eval()
        for m in bns:
            m.reset_running_stats()
            m.momentum = None  # a cumulative average over the batches
            m.train()
        for b in batches:
            forward(b.to(device))
        ok = True
    finally:
        for h in hooks:
            h.remove()
        for m, old, mom in zip(bns, saved, momenta, strict=True):
            m.momentum = mom
            if not ok or id(m) not in seen:
                m.load_state_dict({**m.state_dict(), **old})
        for mod, mode in modes.items():
            mod.training = mode
    return sum(b.shape[0] for b in batches)
