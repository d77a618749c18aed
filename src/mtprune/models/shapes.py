"""Channel counts of a model's modules: recorded after pruning (``arch.json``'s ``channels``) and given
back to a freshly built dense model before a pruned checkpoint's weights are loaded."""

from __future__ import annotations

import torch
from torch import nn

from mtprune.errors import UsageError


def module_shapes(model: nn.Module) -> dict[str, list[int]]:
    """Channel counts of every conv ([in, out]), linear ([in, out]) and BatchNorm ([n]) by module name."""
    out: dict[str, list[int]] = {}
    for name, m in model.named_modules():
        if isinstance(m, nn.Conv2d):
            out[name] = [m.in_channels, m.out_channels]
        elif isinstance(m, nn.Linear):
            out[name] = [m.in_features, m.out_features]
        elif isinstance(m, nn.BatchNorm2d):
            out[name] = [m.num_features]
    return out


def resize_modules(model: nn.Module, shapes: dict[str, list[int]]) -> None:
    """Give modules new channel counts (fresh, uninitialised tensors on the same device); the inverse of
    recording :func:`module_shapes` after pruning. Used to rebuild a pruned net before loading weights."""
    for name, shape in shapes.items():
        try:
            m = model.get_submodule(name)
        except AttributeError:
            raise UsageError(f"module '{name}' does not exist in {type(model).__name__}") from None
        dev = next(iter(m.parameters())).device if any(True for _ in m.parameters()) else torch.device("cpu")
        if isinstance(m, nn.Conv2d):
            cin, cout = shape
            depthwise = m.groups == m.in_channels == m.out_channels and m.groups > 1
            if m.groups != 1 and not (depthwise and cin == cout):
                raise UsageError(f"cannot resize grouped conv '{name}' ({m.groups} groups) to {cin} → {cout} channels")
            m.in_channels, m.out_channels = cin, cout
            if depthwise:
                m.groups = cin
            m.weight = nn.Parameter(torch.empty(cout, cin // m.groups, *m.kernel_size, device=dev))
            if m.bias is not None:
                m.bias = nn.Parameter(torch.empty(cout, device=dev))
        elif isinstance(m, nn.Linear):
            cin, cout = shape
            m.in_features, m.out_features = cin, cout
            m.weight = nn.Parameter(torch.empty(cout, cin, device=dev))
            if m.bias is not None:
                m.bias = nn.Parameter(torch.empty(cout, device=dev))
        elif isinstance(m, nn.BatchNorm2d):
            (n,) = shape
            m.num_features = n
            if m.affine:
                m.weight = nn.Parameter(torch.empty(n, device=dev))
                m.bias = nn.Parameter(torch.empty(n, device=dev))
            if m.track_running_stats:
                m.running_mean = torch.empty(n, device=dev)
                m.running_var = torch.empty(n, device=dev)
        else:
            raise UsageError(f"module '{name}' ({type(m).__name__}) cannot be resized")
