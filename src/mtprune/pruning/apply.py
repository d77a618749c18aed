"""Physical channel removal with Torch-Pruning's DependencyGraph, and the equivalent masking.

:func:`apply_plan` removes the channels a :class:`PruningPlan` does not keep: for every prunable conv,
Torch-Pruning's dependency graph removes the conv's output filters, its BatchNorm's channels and the
matching input channels of every consumer (the next conv, a concatenation's following conv, the
classification head), so the pruned net computes what the masked net computes, with smaller tensors.

:func:`mask_plan` is the reference it is tested against: it keeps all tensors and zeroes γ and β of the
removed channels, so each removed channel outputs ReLU(0) = 0 and contributes nothing downstream.
"""

from __future__ import annotations

import torch
import torch_pruning as tp

from mtprune.errors import UsageError
from mtprune.models.base import SegmentationModel
from mtprune.models.groups import dependency_graph
from mtprune.pruning.compensate import fold_removed_constants
from mtprune.pruning.plan import PruningPlan


def build_dependency_graph(model: SegmentationModel) -> tp.DependencyGraph:
    """Trace every output of ``model`` (segmentation, auxiliary heads, classification head) in eval mode."""
    return dependency_graph(model)


def _check_plan_fits(model: SegmentationModel, plan: PruningPlan) -> None:
    known = {layer.conv for layer in model.prunable_layers()}
    for name, lp in plan.layers.items():
        if name not in known:
            raise UsageError(f"plan layer '{name}' is not a prunable layer of {model.name}")
        conv = model.get_submodule(name)
        if conv.out_channels != lp.channels:
            raise UsageError(f"plan layer '{name}' has {lp.channels} channels, the model has {conv.out_channels}")
        if not lp.kept or not all(0 <= i < lp.channels for i in lp.kept):
            raise UsageError(f"plan layer '{name}': kept indices must be a non-empty subset of 0..{lp.channels - 1}")


@torch.no_grad()
def apply_plan(
    model: SegmentationModel,
    plan: PruningPlan,
    dg: tp.DependencyGraph | None = None,
    constants: dict[str, torch.Tensor] | None = None,
) -> SegmentationModel:
    """Physically remove the channels ``plan`` drops, in place; returns ``model``.

    With ``constants`` (:func:`~mtprune.pruning.compensate.constant_inputs` of the unpruned net), each removed
    channel that outputs a constant has it folded into its consumers first (:mod:`mtprune.pruning.compensate`).
    """
    _check_plan_fits(model, plan)
    dg = dg or build_dependency_graph(model)
    names = {id(m): n for n, m in model.named_modules()}
    for name, lp in plan.layers.items():
        conv = model.get_submodule(name)
        drop = sorted(set(range(conv.out_channels)) - set(lp.kept))
        if not drop:
            continue
        group = dg.get_pruning_group(conv, tp.prune_conv_out_channels, idxs=drop)
        if not dg.check_pruning_group(group):
            raise UsageError(f"Torch-Pruning refused to prune '{name}' (it would remove every channel)")
        if constants is not None:
            fold_removed_constants(group, dg, names, constants)
        group.prune()
    return model


@torch.no_grad()
def mask_plan(model: SegmentationModel, plan: PruningPlan) -> SegmentationModel:
    """Zero γ and β of every channel ``plan`` drops (in place): the masked equivalent of :func:`apply_plan`."""
    _check_plan_fits(model, plan)
    layers = {layer.conv: layer for layer in model.prunable_layers()}
    for name, lp in plan.layers.items():
        drop = sorted(set(range(lp.channels)) - set(lp.kept))
        for bn_name in layers[name].all_bns:  # a depthwise conv's BN, a tied conv's, go with it
            bn = model.get_submodule(bn_name)
            bn.weight[drop] = 0.0
            bn.bias[drop] = 0.0
    return model
