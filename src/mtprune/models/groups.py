"""Prunable channel groups found from Torch-Pruning's dependency graph instead of lists written by hand.

A conv's output channels are a prunable group (a :class:`~mtprune.models.base.PrunableLayer`) when

- a BatchNorm follows it (the BN's γ is the channel's score): the group holds that BN's channels;
- no other full conv's or linear layer's output channels are tied to them. A residual sum or an
  element-wise product (an attention gate) ties them; a depthwise conv after the BN follows them and does
  not count. Tied groups are left alone: the paper's rule for post-activation ResNets, "only channels no
  residual sum ties" (``coupled="skip"``);
- they do not reach a model output (the logits, the classification head's output).

The group's ``part`` is the part whose module prefix owns the conv (``backbone`` or ``decoder``). For the
built-in nets the groups found equal the lists their classes declare (``tests/test_groups.py``).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import torch
import torch_pruning as tp
from torch import nn

from mtprune.models.base import PrunableLayer, eval_mode

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
    with eval_mode(model), torch.enable_grad():
        return tp.DependencyGraph().build_dependency(model, example_inputs=x, forward_fn=forward_fn, verbose=False)


def _is_depthwise(m: nn.Module) -> bool:
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


def discover_prunable_layers(
    model: nn.Module,
    parts: dict[str, Sequence[str]],
    dg: tp.DependencyGraph | None = None,
    exclude: Sequence[str] = (),
) -> list[PrunableLayer]:
    """The prunable channel groups of ``model`` (module order), each tagged with the part (a key of ``parts``:
    part → module-name prefixes) that owns its conv; convs outside every part, and those named in
    ``exclude``, are not pruned."""
    dg = dg or dependency_graph(model)
    names = {m: n for n, m in model.named_modules()}
    out = []
    for name, conv in model.named_modules():
        part = _owner(name, parts)
        if (
            part is None
            or name in exclude
            or not isinstance(conv, nn.Conv2d)
            or _is_depthwise(conv)
            or conv not in dg.module2node
        ):
            continue
        members = _group_members(dg, conv)
        bns = [m for m in members if isinstance(m, nn.BatchNorm2d)]
        ties = [m for m in members if m is not conv and isinstance(m, nn.Linear | nn.Conv2d) and not _is_depthwise(m)]
        if not bns or ties or _reaches_output(dg, members):
            continue
        out.append(PrunableLayer(name, names[bns[0]], part, tuple(names[b] for b in bns[1:])))
    return out
