"""Removing a channel that outputs a constant without losing the constant (issue 28's finding).

A sparse stage's ℓ1 term drives a channel's BN scale γ to 0; the channel then outputs act(β), the same value at
every pixel, and the layers after it were trained with that value. Removing the channel (``apply_plan``) removes
the value too. Here the value is folded into each consumer first — a conv's or linear's bias, or, for a conv
without bias that feeds a BatchNorm, that BN's running mean (``BN(y + c) = BN'(y)`` with ``μ' = μ − c``; in
training mode the batch mean absorbs ``c`` anyway) — so the pruned net computes what the unpruned one computes
wherever a 1×1 consumer sees the channel (a k×k consumer differs on its zero-padded border only).

"Constant" is measured, not assumed: a conv / linear input channel whose values do not depend on the input (four
probe images give the same map, :func:`constant_inputs`). Channels that depend on it are removed as before.
"""

from __future__ import annotations

import torch
import torch_pruning as tp
from torch import nn

IN_HANDLERS = (tp.prune_conv_in_channels, tp.prune_linear_in_channels)


def _consumers(model: nn.Module) -> dict[str, nn.Module]:
    """The modules whose input channels a constant can be folded through: linears and ungrouped convs."""
    return {
        n: m
        for n, m in model.named_modules()
        if isinstance(m, nn.Linear) or (isinstance(m, nn.Conv2d) and m.groups == 1)
    }


@torch.no_grad()
def constant_inputs(
    model: nn.Module, size: tuple[int, int] = (224, 224), rtol: float = 1e-5
) -> dict[str, torch.Tensor]:
    """``{consumer name: per input channel, the value it takes whatever the input, NaN where it depends on it}``.

    Four different images go through ``model`` in eval mode — two of loud noise, a blank one and a faint one; a
    channel whose values are equal position by position for all four (within ``rtol`` × the consumer input's
    largest magnitude) does not depend on the input: a switched-off channel, or one fed only by such channels (a
    channel that merely saturates on noise does not stay put on a blank image). Its value is the median over
    positions — the constant of the interior, where a k×k conv's zero padding does not reach.
    """
    values: dict[str, torch.Tensor] = {}

    def hook_for(name: str):
        def hook(mod: nn.Module, inputs: tuple) -> None:
            x = inputs[0].detach().float()
            x = x.flatten(2) if x.dim() == 4 else x.unsqueeze(-1)  # [4, C, positions]
            bound = rtol * float(x.abs().max()) + 1e-12
            fixed = (x - x[:1]).abs().amax(dim=(0, 2)) <= bound
            med = x[0].median(-1).values
            values[name] = torch.where(fixed, med, torch.full_like(med, float("nan"))).cpu()

        return hook

    handles = [m.register_forward_pre_hook(hook_for(n)) for n, m in _consumers(model).items()]
    was_training = model.training
    model.eval()
    try:
        p = next(model.parameters())
        noise = torch.randn(3, 3, *size, generator=torch.Generator().manual_seed(0))
        x = torch.stack([3 * noise[0], 3 * noise[1], torch.zeros_like(noise[0]), 0.1 * noise[2]])
        model(x.to(device=p.device, dtype=p.dtype))
    finally:
        for h in handles:
            h.remove()
        model.train(was_training)
    return values


def _next_batchnorm(dg: tp.DependencyGraph, mod: nn.Module) -> nn.BatchNorm2d | None:
    node = dg.module2node.get(mod)
    outs = list({id(n.module): n.module for n in node.outputs}.values()) if node is not None else []
    if len(outs) == 1 and isinstance(outs[0], nn.BatchNorm2d) and outs[0].track_running_stats:
        return outs[0]
    return None


@torch.no_grad()
def fold_removed_constants(
    group: tp.Group, dg: tp.DependencyGraph, names: dict[int, str], constants: dict[str, torch.Tensor]
) -> None:
    """Fold the constant input channels ``group`` is about to remove into their consumers, and drop those
    channels from ``constants`` (kept in the consumers' current indexing). A consumer with neither a bias nor a
    BatchNorm after it keeps nothing of them, as without folding."""
    removed: dict[str, set[int]] = {}
    mods: dict[str, nn.Module] = {}
    for item in group.items:
        mod = item.dep.target.module
        name = names.get(id(mod))
        if item.dep.handler in IN_HANDLERS and name in constants:
            removed.setdefault(name, set()).update(int(i) for i in item.idxs)
            mods[name] = mod
    for name, drop in removed.items():
        _fold(mods[name], dg, constants[name], torch.tensor(sorted(drop), dtype=torch.long))
        keep = torch.ones(len(constants[name]), dtype=torch.bool)
        keep[sorted(drop)] = False
        constants[name] = constants[name][keep]


def _fold(mod: nn.Module, dg: tp.DependencyGraph, constants: torch.Tensor, idxs: torch.Tensor) -> None:
    """Add the contribution of ``mod``'s constant input channels ``idxs`` to its bias or next BN's mean."""
    values = constants[idxs]
    const = ~torch.isnan(values)
    if not const.any():
        return
    w = mod.weight[:, idxs[const]]
    w = w.sum(dim=(2, 3)) if w.dim() == 4 else w
    delta = w.float() @ values[const].to(w.device)
    if mod.bias is not None:
        mod.bias += delta.to(mod.bias.dtype)
    elif (bn := _next_batchnorm(dg, mod)) is not None:
        bn.running_mean -= delta.to(bn.running_mean.dtype)
