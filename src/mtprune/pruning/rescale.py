"""Rescaling a pruned net's BN scales before fine-tuning (``finetune.rescale_gamma``; Ye et al., ICLR 2018).

ℓ1 on γ of a conv → BN whose output feeds, through a ReLU, only convs shrinks the layer's γ together at no cost
to the loss (the next BN renormalises): a sparse-trained net keeps γ of 0.1–0.2 and its optimiser then sees
them with a much larger effective step. Here each such layer's kept γ and β are multiplied by ``s`` (the dense
layer's median |γ| over the kept median |γ|) and the consuming convs' input weights divided by ``s``: the
function is unchanged (checked on a random batch: a layer whose output does not reach only convs through a
positively homogeneous activation — a residual sum, ReLU6, a depthwise conv — is left as it was).
"""

from __future__ import annotations

import torch
from torch import nn

from mtprune.models.base import SegmentationModel
from mtprune.models.groups import dependency_graph
from mtprune.pruning.thinet import find_consumers


@torch.no_grad()
def rescale_gamma_(
    model: SegmentationModel, reference: dict[str, float], size: tuple[int, int] = (64, 64), tol: float = 1e-4
) -> dict[str, float]:
    """Bring each prunable layer's kept ``|γ|`` median to ``reference[bn name]`` where that leaves the logits
    equal (relative ``tol``), in place; returns ``{bn name: scale}`` of the layers rescaled."""
    was_training = model.training
    model.eval()
    x = 3 * torch.randn(2, 3, *size, generator=torch.Generator().manual_seed(0))
    x = x.to(next(model.parameters()).device)
    base = model(x)
    bound = tol * float(base.abs().max()) + 1e-6
    dg = dependency_graph(model)
    done: dict[str, float] = {}
    for lay in model.prunable_layers():
        bn = model.get_submodule(lay.bn)
        kept = float(bn.weight.detach().abs().median())
        if lay.tied or lay.followers or lay.bn not in reference or kept <= 0:
            continue
        try:
            consumers = find_consumers(model, dg, [lay.conv])[lay.conv]
        except Exception:  # noqa: BLE001 - no conv consumer the graph can map: not rescaled
            continue
        s = reference[lay.bn] / kept
        _scale(bn, [(model.get_submodule(c), m) for c, m in consumers], s)
        if float((model(x) - base).abs().max()) <= bound:
            done[lay.bn] = s
        else:  # the output reaches something that is not linear in it: undo
            _scale(bn, [(model.get_submodule(c), m) for c, m in consumers], 1.0 / s)
    model.train(was_training)
    return done


def _scale(bn: nn.BatchNorm2d, consumers: list[tuple[nn.Module, list[int]]], s: float) -> None:
    """``γ, β ← s·γ, s·β`` and each consumer's input weights of these channels ``← w / s``."""
    bn.weight.mul_(s)
    bn.bias.mul_(s)
    for conv, mapping in consumers:
        conv.weight[:, mapping] /= s


def median_gammas(model: SegmentationModel) -> dict[str, float]:
    """``{bn name: median |γ|}`` of every prunable layer's BN (a rescaling's reference, from the dense net)."""
    return {
        lay.bn: float(model.get_submodule(lay.bn).weight.detach().abs().median()) for lay in model.prunable_layers()
    }
