"""Channel counts the hardware at hand likes: ``--round-to auto``'s policy.

A pruned layer's kept count n is whatever the scores leave (37, 101 …), and oneDNN, cuDNN and ONNX Runtime
run some channel counts much faster than their neighbours (bench/README.md, "Deployment speed …"). So
instead of a fixed multiple, :func:`latency_fit` times each prunable conv — BN folded, in the chosen
layout, batch 1, at the feature size it sees — together with the convs that consume its channels, at n
and at every count up to the next multiple of :data:`MULTIPLE` (:class:`~mtprune.cost.tables.LatencyTable`),
and keeps n unless a larger count is more than :data:`NOISE` faster: then the smallest count within
:data:`NOISE` of the fastest, kept only if a fresh paired timing against n confirms the gain (the fastest
of many noisy timings is biased low). Never fewer channels than the scores keep, more only where they are
measurably faster; a count nothing beats is filled up to the kernels' channel multiple when a paired
timing says that is not slower (:func:`_fill`).
"""

from __future__ import annotations

import copy
from collections.abc import Callable, Sequence
from functools import partial
from typing import Any

import torch
import torch_pruning as tp
from torch import nn

from mtprune.cost.tables import ConvShape, LatencyTable
from mtprune.errors import UsageError
from mtprune.models.groups import dependency_graph, is_depthwise
from mtprune.pruning import Fit, PruningPlan, apply_plan
from mtprune.pruning.thinet import find_consumers

#: counts are tried from the kept one up to the next multiple of this
MULTIPLE = 32
#: a larger count replaces n only when it is faster than n by more than this fraction
NOISE = 0.02


def conv_input_sizes(model: nn.Module, size: tuple[int, int]) -> dict[str, tuple[int, int]]:
    """The spatial size of every conv's input at input ``size`` (a shape-only copy on the meta device), through
    the model's ``trace_outputs`` when it has one (auxiliary heads included)."""
    meta = copy.deepcopy(model).to("meta").eval()
    sizes: dict[str, tuple[int, int]] = {}

    def record(name: str) -> Callable[..., None]:
        def hook(_m: nn.Module, inp: tuple[torch.Tensor, ...]) -> None:  # returns None: the input is unchanged
            sizes.setdefault(name, (int(inp[0].shape[-2]), int(inp[0].shape[-1])))

        return hook

    hooks = [m.register_forward_pre_hook(record(n)) for n, m in meta.named_modules() if isinstance(m, nn.Conv2d)]
    with torch.no_grad():
        x = torch.zeros(1, 3, *size, device="meta")
        meta.trace_outputs(x) if hasattr(meta, "trace_outputs") else meta(x)
    for h in hooks:
        h.remove()
    return sizes


def _choose(table: LatencyTable, own: Callable[[int], ConvShape], uses: list[Callable[[int], ConvShape]],
            counts: Sequence[int]) -> tuple[int, dict[int, float], float]:  # fmt: skip
    """The kept count n = ``counts[0]`` unless a larger one is faster by more than :data:`NOISE`; then the
    smallest count within :data:`NOISE` of the fastest (and still that much faster than n) — if a paired
    re-measurement against n (:meth:`LatencyTable.ratio`) confirms it is faster by more than :data:`NOISE`.
    Returns the count, every count's table time, and the confirming ratio (1.0 when n stays unchecked)."""
    times = {c: table.layer_ms([own(c), *(u(c) for u in uses)]) for c in counts}
    n, best = counts[0], min(times.values())
    if best >= times[n] / (1 + NOISE):
        return n, times, 1.0
    bound = min(best * (1 + NOISE), times[n] / (1 + NOISE))
    c = min(c for c, t in times.items() if t <= bound)
    ratio = table.ratio([own(n), *(u(n) for u in uses)], [own(c), *(u(c) for u in uses)])
    return (c if ratio < 1 / (1 + NOISE) else n), times, ratio


def _fill(table: LatencyTable, own: Callable[[int], ConvShape], uses: list[Callable[[int], ConvShape]],
          start: int, top: int) -> tuple[int, float]:  # fmt: skip
    """``start`` filled up to the next multiple of ``table.fill`` (not above ``top``) if a paired timing
    (:meth:`LatencyTable.ratio`) says the layer's convs are not slower there by more than :data:`NOISE`:
    the kernels pad channels to that multiple, so the channels up to it cost no time and are the
    best-scored of those the plan removed. Returns the count and the paired ratio (1.0 when none tried)."""
    f = -(-start // table.fill) * table.fill
    if f == start or f > top:
        return start, 1.0
    ratio = table.ratio([own(start), *(u(start) for u in uses)], [own(f), *(u(f) for u in uses)])
    return (f if ratio <= 1 + NOISE else start), ratio


def _blocked(counts: range, block: int, align: int = 1) -> tuple[int, list[int], str]:
    """The counts to choose from, the first of them and why it is not the kept count (the first of
    ``counts``; "" when it is). In ONNX Runtime a count between two multiples of ``block`` costs the time of
    the next one (its channels are padded) and takes its tensor out of the blocked layout for the operators
    after its conv (pooling, sums), costs in the net that timing the layer's convs alone does not show: a
    kept count off the block is rounded up to the multiples of ``block`` in reach; where none is, to those of
    ``align``, the count its blocked convs need between them (off it, a reorder and a plain conv follow).
    All of ``counts`` when ``block`` is 1 or the kept count is a multiple of it."""
    n = counts[0]
    if block == 1 or n % block == 0:
        return n, list(counts), ""
    on_block = [c for c in counts if c % block == 0]
    if on_block:
        return on_block[0], on_block, f"ONNX Runtime pads channels to a multiple of {block} here: free"
    aligned = [c for c in counts if c % align == 0] if align > 1 else []
    if aligned:
        why = f"ONNX Runtime's blocked convs need a multiple of {align} channels between them: free"
        return aligned[0], aligned, "" if aligned[0] == n else why
    return n, list(counts), ""


def _timeable(conv: nn.Module) -> bool:
    """A conv whose time at other channel counts is well defined here: a full or a depthwise conv."""
    return isinstance(conv, nn.Conv2d) and (conv.groups == 1 or conv.groups == conv.in_channels)


def _links(model: nn.Module, dg: tp.DependencyGraph, names: list[str], skip: tuple[str, ...]) -> dict[str, list[str]]:
    """For each prunable conv, the deployed convs that consume its channels (none when the dependency graph
    cannot map them: the conv alone is timed then)."""
    out = {}
    for n in names:
        try:
            found = [c for c, _ in find_consumers(model, dg, [n])[n]]
        except UsageError:
            found = []
        out[n] = [c for c in found if _timeable(model.get_submodule(c)) and not _under(c, skip)]
    return out


def _depthwise(model: nn.Module, dg: tp.DependencyGraph, names: list[str]) -> dict[str, list[str]]:
    """For each prunable conv, the depthwise convs its channels run through (an inverted residual's expand conv:
    the depthwise conv after it): pruned with it, so timed at its count too."""
    mods = {id(m): n for n, m in model.named_modules()}
    out = {}
    for n in names:
        conv = model.get_submodule(n)
        group = dg.get_pruning_group(conv, tp.prune_conv_out_channels, idxs=list(range(conv.out_channels)))
        found = {mods[id(it.dep.target.module)]: None for it in group.items if is_depthwise(it.dep.target.module)}
        out[n] = list(found)
    return out


def _under(name: str, prefixes: tuple[str, ...]) -> bool:
    return any(name == p or name.startswith(p + ".") for p in prefixes)


def latency_fit(model: nn.Module, size: tuple[int, int], table: LatencyTable) -> Fit:
    """The :data:`~mtprune.pruning.Fit` of ``--round-to auto`` for ``model`` at input ``size``: for each
    prunable layer of a plan (in order; a count chosen changes the input count of the layers after it), the
    count c ∈ [n, next multiple of :data:`MULTIPLE`] minimising the time of its conv (c outputs), the depthwise
    convs its channels run through (c channels: an inverted residual's, :func:`_depthwise`) and its consumers'
    convs (c of their inputs: a concatenation's other inputs stay), by :func:`_choose`. Layers
    of training-only modules (auxiliary heads), grouped convs and their consumers are not refitted. In
    ONNX Runtime (``table.block`` > 1) a kept count that is not a multiple of its block is first rounded up
    to one, then only multiples are tried — where none is in reach, multiples of ``table.align``
    (:func:`_blocked`). A count nothing beats is filled up to the kernels' channel multiple when that is not
    slower (:func:`_fill`). The report:
    ``{layer: {"from", "to", "ms_from", "ms_to", "paired", "why"}}`` for every layer it changed."""
    sizes = conv_input_sizes(model, size)
    skip = tuple(model.training_only_modules()) if hasattr(model, "training_only_modules") else ()
    names = [lay.conv for lay in model.prunable_layers() if not _under(lay.conv, skip)]
    names = [n for n in names if model.get_submodule(n).groups == 1]
    dg = dependency_graph(model)
    consumers, depthwise = _links(model, dg, names, skip), _depthwise(model, dg, names)
    producers: dict[str, list[str]] = {}
    for n, cs in consumers.items():
        for c in cs:
            producers.setdefault(c, []).append(n)
    meta = copy.deepcopy(model).to("meta")

    def fit(plan: PruningPlan) -> tuple[dict[str, int], dict[str, Any]]:
        pruned = apply_plan(copy.deepcopy(meta), plan)
        kept = {n: pruned.get_submodule(n).out_channels for n in plan.layers}
        counts: dict[str, int] = {}
        report: dict[str, Any] = {}

        def inputs(conv_name: str, but: str = "") -> int:  # its input count with the counts chosen so far
            grown = sum(counts.get(p, kept[p]) - kept[p] for p in producers.get(conv_name, []) if p != but)
            return pruned.get_submodule(conv_name).in_channels + grown

        for name in (n for n in names if n in plan.layers):
            n, top = kept[name], min(plan.layers[name].channels, -(-kept[name] // MULTIPLE) * MULTIPLE)
            own = partial(_shape, pruned.get_submodule(name), sizes[name], inputs(name))
            uses = [partial(_shape_in, pruned.get_submodule(u), sizes[u], inputs(u, but=name) - n)
                    for u in consumers[name]]  # fmt: skip
            uses += [partial(_shape_in, pruned.get_submodule(d), sizes[d], 0) for d in depthwise[name]]
            chosen, why = _count(table, own, uses, n, top)
            if chosen != n:
                counts[name], report[name] = chosen, why
        table.save()
        return counts, report

    return fit


def _count(table: LatencyTable, own: Callable[[int], ConvShape], uses: list[Callable[[int], ConvShape]], n: int,
           top: int) -> tuple[int, dict[str, Any]]:  # fmt: skip
    """One layer's count in [n, top] (:func:`_blocked`, :func:`_choose`, then :func:`_fill`) and what the
    report says of it: ``from``, ``to``, the table times ``ms_from`` / ``ms_to``, the ``paired`` ratio that
    decided it and ``why``."""
    start, tried, why = _blocked(range(n, top + 1), table.block, table.align)
    chosen, times, ratio = _choose(table, own, uses, tried)
    why = why or "faster"
    if chosen == start:
        chosen, ratio = _fill(table, own, uses, start, top)
        if chosen != start:
            why = f"free: no slower at a multiple of {table.fill} (paired × {ratio:.3f})"
    ms = {c: times[c] if c in times else table.layer_ms([own(c), *(u(c) for u in uses)]) for c in (n, chosen)}
    return chosen, {"from": n, "to": chosen, "ms_from": ms[n], "ms_to": ms[chosen], "paired": ratio, "why": why}


def _shape(conv: nn.Conv2d, size: tuple[int, int], cin: int, cout: int) -> ConvShape:
    return ConvShape.of(conv, size, cin=cin, cout=cout)


def _shape_in(conv: nn.Conv2d, size: tuple[int, int], others: int, c: int) -> ConvShape:
    """A consumer fed ``c`` channels by the layer fitted and ``others`` by the rest of its inputs."""
    return ConvShape.of(conv, size, cin=others + c)
