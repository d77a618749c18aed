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

import torch
from torch import nn

from mtprune.errors import UsageError
from mtprune.models.base import SegmentationModel

#: the fewest images a batch may have: a BatchNorm after a global pooling sees one value per image and channel
MIN_BATCH = 2


def _batches(images: Iterable[torch.Tensor], batch_size: int) -> list[torch.Tensor]:
    """``images`` ([B, 3, H, W] batches or [3, H, W] images) regrouped into batches of ``batch_size`` images
    of one size, none smaller than :data:`MIN_BATCH` (a short last batch joins the one before)."""
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
        out += split
    if not out or max(b.shape[0] for b in out) < MIN_BATCH:
        raise UsageError(f"recalibrate_bn needs at least {MIN_BATCH} images of one size (got {len(out)} batches)")
    return out


@torch.no_grad()
def recalibrate_bn(model: nn.Module, images: Iterable[torch.Tensor], batch_size: int = 8) -> int:
    """Replace the running mean and variance of every BatchNorm of ``model`` by the plain average of their batch
    statistics over ``images`` (normalised, as the model takes them), passed through it with only the
    BatchNorms in training mode (dropout stays off) and the auxiliary heads included; weights, affine
    parameters, momenta and the model's mode are left as they were. Returns the number of images used."""
    bns = [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    batches = _batches(images, batch_size)
    was_training, momenta = model.training, [m.momentum for m in bns]
    device = next(model.parameters()).device
    forward = (lambda x: model.seg_outputs(x, aux=True)) if isinstance(model, SegmentationModel) else model
    try:
        model.eval()
        for m in bns:
            m.reset_running_stats()
            m.momentum = None  # a cumulative average over the batches
            m.train()
        for b in batches:
            forward(b.to(device))
    finally:
        for m, mom in zip(bns, momenta, strict=True):
            m.momentum = mom
        model.train(was_training)
    return sum(b.shape[0] for b in batches)
