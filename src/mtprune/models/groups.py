"""Prunable channel groups found from Torch-Pruning's dependency graph instead of lists written by hand.

A conv's output channels are a prunable group (a :class:`~mtprune.models.base.PrunableLayer`) when

- a BatchNorm follows it (the BN's γ is the channel's score): the group holds that BN's channels;
- no other full conv's or linear layer's output channels are tied to them. A residual sum or an
  element-wise product (an attention gate) ties them; a depthwise conv after the BN follows them and does
  not count. Tied groups are left alone: the paper's rule for post-activation ResNets, "only channels no
  residual sum ties" (``coupled="skip"``). With ``coupled="group"`` tied channels are pruned together,
  scored by the sum of their BNs' |γ|, and a squeeze-and-excitation gate (a conv without BN whose output
  only multiplies the channels, through a sigmoid) is pruned with the channels it gates;
- they do not reach a model output (the logits, the classification head's output).

The group's ``part`` is the part whose module prefix owns the conv (``backbone`` or ``decoder``). Every
model's :meth:`~mtprune.models.base.SegmentationModel.prunable_layers` comes from here
(:func:`model_groups`); for the built-in nets the groups equal the lists written by hand before
(``tests/test_groups.py``), so their results did not change.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch_pruning as tp
from torch import nn

from mtprune.errors import UsageError

BACKBONE = "backbone"
DECODER = "decoder"


@dataclass(frozen=True)
class PrunableLayer:
    """One prunable channel group: the output channels of ``conv`` and of the BatchNorm ``bn`` after it.

    ``conv`` and ``bn`` are module names in the whole model (``model.get_submodule(name)``); the BN
    scale γ of ``bn`` is the channel's importance score. ``part`` is ``"backbone"`` or ``"decoder"``.
    """

    conv: str
    bn: str
    part: str
    #: further BatchNorms whose channels go with these (after a depthwise conv that follows the conv)
    followers: tuple[str, ...] = ()
    #: the BNs of other convs whose outputs a sum or product ties to these (``coupled: group``): pruned with
    #: them, and their |γ| added to the score
    tied: tuple[str, ...] = ()

    @property
    def scored(self) -> tuple[str, ...]:
        """The BNs whose |γ| (summed) score the channels: ``bn`` and the tied ones."""
        return (self.bn, *self.tied)

    @property
    def all_bns(self) -> tuple[str, ...]:
        """Every BN whose channels the group removes."""
        return (self.bn, *self.tied, *self.followers)


#: spatial size of the dummy input used to trace a model (≥ 6·8 so PSPNet's 6×6 bins see real pixels)
TRACE_SIZE = (64, 64)

ForwardFn = Callable[[nn.Module, torch.Tensor], Any]


def dependency_graph(
    model: nn.Module, forward_fn: ForwardFn | None = None, size: Sequence[int] = TRACE_SIZE
) -> tp.DependencyGraph:
    """Torch-Pruning's dependency graph of ``model``, traced in eval mode on one zero image of ``size``
    through ``forward_fn(model, x)`` (default: the model's ``trace_outputs`` if it has one — every output,
    so that no head is left out of the trace — else its forward)."""
    p = next(model.parameters())
    x = torch.zeros(1, 3, *size, device=p.device, dtype=p.dtype)
    if forward_fn is None:
        forward_fn = (lambda m, inp: m.trace_outputs(inp)) if hasattr(model, "trace_outputs") else None
    was_training = model.training
    model.eval()
    try:
        with torch.enable_grad():
            return tp.DependencyGraph().build_dependency(model, example_inputs=x, forward_fn=forward_fn, verbose=False)
    finally:
        model.train(was_training)


def is_depthwise(m: nn.Module) -> bool:
    return isinstance(m, nn.Conv2d) and m.groups > 1 and m.groups == m.in_channels == m.out_channels


def _group_members(dg: tp.DependencyGraph, conv: nn.Conv2d) -> list[nn.Module]:
    """The modules whose output channels are pruned with ``conv``'s (``conv`` included)."""
    group = dg.get_pruning_group(conv, tp.prune_conv_out_channels, idxs=[0])
    out = []
    for dep, _ in group:
        if getattr(dep.handler, "__name__", "") == "prune_out_channels" and dep.target.module not in out:
            out.append(dep.target.module)
    return out


def _reaches_output(dg: tp.DependencyGraph, members: list[nn.Module]) -> bool:
    return any(not dg.module2node[m].outputs for m in members if m in dg.module2node)


def _owner(name: str, parts: dict[str, Sequence[str]]) -> str | None:
    for part, prefixes in parts.items():
        if any(name == p or name.startswith(p + ".") for p in prefixes):
            return part
    return None


def bn_source(dg: tp.DependencyGraph, bn: nn.Module) -> nn.Module | None:
    """The module whose output a BatchNorm normalises (None when it is not a single module's)."""
    inputs = dg.module2node[bn].inputs if bn in dg.module2node else []
    sources = {id(n.module): n.module for n in inputs}  # a module traced twice (seg and cls) appears twice
    return next(iter(sources.values())) if len(sources) == 1 else None


def _only_gates(dg: tp.DependencyGraph, conv: nn.Conv2d) -> bool:
    """True when ``conv``'s output, through element-wise one-input ops (a sigmoid), only multiplies other
    features: a squeeze-and-excitation gate (MobileNetV3's, EfficientNet's)."""
    todo, seen = list(dg.module2node[conv].outputs), set()
    if not todo:
        return False
    while todo:
        node = todo.pop()
        if id(node) in seen:
            continue
        seen.add(id(node))
        op = node.module
        if not isinstance(op, tp.ops._ElementWiseOp):
            return False
        if "Mul" in str(op._grad_fn) and len(node.inputs) == 2:
            continue
        if len(node.inputs) != 1 or not node.outputs:
            return False
        todo.extend(node.outputs)
    return True


def _group(
    dg: tp.DependencyGraph, conv: nn.Conv2d, coupled: str
) -> tuple[nn.BatchNorm2d, list[nn.Module], list[nn.BatchNorm2d], list[nn.BatchNorm2d]] | None:
    """``conv``'s channel group as (its BN, the tied convs, their BNs, the depthwise followers' BNs), or None
    when it is not prunable: tied while ``coupled`` is ``skip``, a conv of it without its own BN (but with
    ``group``, a squeeze-and-excitation gate's: pruned with the channels it gates, not scored), a BN of
    anything else (a concatenation's), a linear layer or a model output in it."""
    members = _group_members(dg, conv)
    if _reaches_output(dg, members) or any(isinstance(m, nn.Linear) for m in members):
        return None
    full = [m for m in members if isinstance(m, nn.Conv2d) and not is_depthwise(m)]
    if len(full) > 1 and coupled == "skip":
        return None
    bn_of = {}
    for bn in (m for m in members if isinstance(m, nn.modules.batchnorm._BatchNorm)):  # SyncBatchNorm too
        bn_of.setdefault(bn_source(dg, bn), []).append(bn)
    own = {c: bn_of.get(c, []) for c in full}
    if coupled == "group":
        own = {c: b for c, b in own.items() if b or not _only_gates(dg, c)}
    if conv not in own or any(len(b) != 1 for b in own.values()):
        return None
    followers = [bn for src, bns in bn_of.items() if src not in own for bn in bns]
    if any(not is_depthwise(bn_source(dg, bn)) for bn in followers):
        return None
    ties = [c for c in own if c is not conv]
    return own[conv][0], ties, [own[c][0] for c in ties], followers


def discover_prunable_layers(
    model: nn.Module,
    parts: dict[str, Sequence[str]],
    dg: tp.DependencyGraph | None = None,
    exclude: Sequence[str] = (),
    coupled: str = "skip",
) -> list[PrunableLayer]:
    """The prunable channel groups of ``model`` (module order), each tagged with the part (a key of ``parts``:
    part → module-name prefixes) that owns its conv; convs outside every part, and those named in
    ``exclude``, are not pruned. ``coupled``: ``skip`` leaves channels tied by a sum or product alone (the
    paper's rule), ``group`` prunes them together — one entry, named by the group's first conv, its other
    convs' BNs in ``tied``."""
    if coupled not in ("skip", "group"):
        raise UsageError(f"coupled must be skip or group, got '{coupled}'")
    dg = dg or dependency_graph(model)
    names = {m: n for n, m in model.named_modules()}
    out, covered = [], set()
    for name, conv in model.named_modules():
        part = _owner(name, parts)
        if part is None or name in exclude or not isinstance(conv, nn.Conv2d) or is_depthwise(conv):
            continue
        if conv in covered or conv not in dg.module2node:  # already in a tied group; not on the traced path
            continue
        found = _group(dg, conv, coupled)
        if found is None or any(_owner(names[c], parts) is None or names[c] in exclude for c in found[1]):
            continue
        bn, ties, tied_bns, followers = found
        covered.update(ties)
        out.append(
            PrunableLayer(name, names[bn], part, tuple(names[b] for b in followers), tuple(names[b] for b in tied_bns))
        )
    return out


#: groups of the models traced in this process, by :meth:`~mtprune.models.base.SegmentationModel.groups_key`
_FOUND: dict[str, list[PrunableLayer]] = {}


def model_groups(model: Any) -> list[PrunableLayer]:
    """A segmentation model's prunable groups: its ``backbone`` and ``decoder`` modules as the parts, its
    :meth:`~mtprune.models.base.SegmentationModel.kept_modules` excluded, its ``coupled`` rule; traced once
    for every model with the same ``groups_key`` (a trace costs ≈ 0.3–2 s on a CPU)."""
    key = model.groups_key()
    if key is None or key not in _FOUND:
        parts = {BACKBONE: ["backbone"], DECODER: ["decoder"]}
        found = discover_prunable_layers(model, parts, exclude=model.kept_modules(), coupled=model.coupled)
        if key is None:
            return found
        _FOUND[key] = found
    return list(_FOUND[key])
