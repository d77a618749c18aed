"""Parameters and MACs (= FLOPs / 2, as the paper counts).

MACs come from :class:`torch.utils.flop_counter.FlopCounterMode`, which counts the matrix work of
convolutions and matrix products (2 FLOPs per multiply-accumulate) and nothing else (no BN, activation,
pooling or interpolation), the convention of the paper's tables.
"""

from __future__ import annotations

import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

from mtprune.models.base import eval_mode


def count_params(model: nn.Module) -> int:
    """Parameters of the segmentation net as deployed (BN running statistics are buffers, not counted).

    For a :class:`~mtprune.models.SegmentationModel` the classification head and the training-only
    auxiliary heads are left out, as the paper's tables count them.
    """
    if hasattr(model, "seg_num_params"):
        return int(model.seg_num_params())
    return sum(p.numel() for p in model.parameters())


@torch.no_grad()
def count_macs(model: nn.Module, size: tuple[int, int], batch: int = 1) -> int:
    """Multiply-accumulates of one segmentation forward at input ``size`` (H, W), batch 1, eval mode."""
    p = next(model.parameters())
    x = torch.zeros(batch, 3, *size, device=p.device, dtype=p.dtype)
    counter = FlopCounterMode(display=False)
    with eval_mode(model), counter:
        model(x)
    return counter.get_total_flops() // 2
