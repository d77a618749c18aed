"""Where a forward spends its time, layer by layer (``mtprune cost --per-layer``, ``bench/latency.py
--per-layer``): every leaf module's own wall time (forward hooks) and its MACs.

Two nets are compared the way their latencies are, in paired rounds
(:func:`~mtprune.cost.rounds.paired_rounds`: one forward of each per round), so that a drift of the machine
between two separate profiles is not read as a layer that did not shrink (bench/README.md, "… per-layer
profiles paired per round").
"""

from __future__ import annotations

import copy
import statistics
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

from mtprune.cost.rounds import paired_ratio, paired_rounds
from mtprune.cost.runtimes import inference_net


@dataclass
class LayerTime:
    """One leaf module's share of a forward: its MACs and its own wall time per forward (all its calls:
    a ResNet block calls its ReLU two or three times), median over runs; every run's time in ``times_ms``;
    the channels and size of its last call."""

    name: str
    kind: str
    in_channels: int
    out_channels: int
    out_size: tuple[int, int]
    macs: int
    ms: float
    times_ms: list[float] = field(default_factory=list, repr=False)

    @property
    def gmacs_per_s(self) -> float:
        return self.macs / self.ms / 1e6 if self.ms > 0 else 0.0


@dataclass
class LayerProfile:
    """A net's :class:`LayerTime` rows and its forward times with hooks (``totals_ms``, one per run)."""

    rows: list[LayerTime]
    totals_ms: list[float]

    @property
    def total_ms(self) -> float:
        return statistics.median(self.totals_ms)

    def outside_ms(self) -> list[float]:
        """Per run, the time between modules (interpolation, residual sums, concatenation …)."""
        inside = [sum(r.times_ms[i] for r in self.rows) for i in range(len(self.totals_ms))]
        return [t - s for t, s in zip(self.totals_ms, inside, strict=True)]


def _layer_kind(m: nn.Module) -> str:
    if isinstance(m, nn.Conv2d):
        k, s, d = m.kernel_size, m.stride, m.dilation
        g = f" g{m.groups}" if m.groups > 1 else ""
        return f"Conv2d {k[0]}×{k[1]} s{s[0]} d{d[0]}{g}"
    return type(m).__name__


def _leaves(net: nn.Module) -> dict[str, nn.Module]:
    return {n: m for n, m in net.named_modules() if n and not any(True for _ in m.children())}


def _leaf_flops(net: nn.Module, x: torch.Tensor, leaves: dict[str, nn.Module]) -> dict[str, int]:
    """FLOPs of each leaf module of ``net`` in one forward of ``x`` (``FlopCounterMode``'s per-module counts)."""
    counter = FlopCounterMode(display=False)
    with counter:
        net(x)
    flops: dict[str, int] = {}
    for key, ops in counter.get_flop_counts().items():
        name = key.split(".", 1)[1] if "." in key else ""
        if name in leaves:
            flops[name] = int(sum(ops.values()))
    return flops


class _LayerClock:
    """Forward hooks reading the clock around every leaf module of a net (after ``sync``) while ``on``; a
    module called several times in a forward (a shared ReLU) has the sum of its calls' times."""

    def __init__(self, net: nn.Module, sync: Callable[[], None], clock: Callable[[], float]) -> None:
        self.leaves, self.sync, self.clock, self.on = _leaves(net), sync, clock, False
        self.times: dict[str, list[float]] = {n: [] for n in self.leaves}
        self.called: set[str] = set()
        self.shapes: dict[str, tuple[int, int, int, int]] = {}
        self.starts: dict[str, float] = {}
        self.handles = []
        for n, m in self.leaves.items():
            self.handles += [m.register_forward_pre_hook(self._pre(n)), m.register_forward_hook(self._post(n))]

    def _pre(self, name: str) -> Callable[..., None]:
        def hook(_m: nn.Module, _inp: Any) -> None:
            if self.on:
                self.sync()
                self.starts[name] = self.clock()

        return hook

    def _post(self, name: str) -> Callable[..., None]:
        def hook(_m: nn.Module, inp: Any, out: Any) -> None:
            if self.on:
                self.sync()
                self.times[name][-1] += (self.clock() - self.starts[name]) * 1000.0
                self.called.add(name)
                if isinstance(out, torch.Tensor) and out.dim() == 4 and isinstance(inp[0], torch.Tensor):
                    self.shapes[name] = (inp[0].shape[1], out.shape[1], out.shape[2], out.shape[3])

        return hook

    def start(self, on: bool) -> None:
        """Before a forward: record it (``on``) or not (warm-up)."""
        self.on = on
        for t in self.times.values() if on else ():
            t.append(0.0)

    def rows(self, flops: dict[str, int]) -> list[LayerTime]:
        out = []
        for n, m in self.leaves.items():
            if n not in self.called:
                continue  # a module the forward does not use (e.g. the classification head)
            ci, co, h, w = self.shapes.get(n, (0, 0, 0, 0))
            ms = statistics.median(self.times[n])
            out.append(LayerTime(n, _layer_kind(m), ci, co, (h, w), flops.get(n, 0) // 2, ms, self.times[n]))
        return out

    def remove(self) -> None:
        for h in self.handles:
            h.remove()


@torch.no_grad()
def layer_profiles(
    models: Mapping[str, nn.Module],
    size: tuple[int, int],
    device: str = "cpu",
    channels_last: bool = False,
    fold_bn: bool = False,
    warmup: int = 2,
    runs: int = 5,
    *,
    clock: Callable[[], float] = time.perf_counter,
) -> dict[str, LayerProfile]:
    """Where each net's batch-1 forward spends its time: every leaf module (convolutions, BatchNorms,
    activations, pooling …) with its MACs (``FlopCounterMode``, per module) and its own wall time, over
    ``runs`` rounds after ``warmup``, each round one forward of every net (in alternating order). The time
    of functional operations between modules (interpolation, residual sums, concatenation) is the total
    minus the modules' sum (:meth:`LayerProfile.outside_ms`).

    Forward hooks read the clock around each module (synchronising CUDA), which adds a little overhead per
    module: compare layers with each other and with the same layer of another net, not with
    :func:`~mtprune.cost.latency.measure_latency`. Module names are those of the model (the same in a pruned
    net and its dense original), so two nets can be compared layer by layer (:func:`compare_layers`).
    ``clock``: read around each module and each forward, in seconds (tests pass a fake one).
    """
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    x = torch.randn(1, 3, *size, device=device).to(memory_format=fmt)
    sync = torch.cuda.synchronize if str(device).startswith("cuda") else (lambda: None)
    nets, seen = {}, set()
    for k, m in models.items():  # the same module under two keys: each gets its own hooks (and copy)
        nets[k] = inference_net(copy.deepcopy(m) if id(m) in seen else m, device, channels_last, fold_bn, False)
        seen.add(id(m))
    flops = {k: _leaf_flops(net, x, _leaves(net)) for k, net in nets.items()}
    clocks = {k: _LayerClock(net, sync, clock) for k, net in nets.items()}
    names = list(nets)
    try:
        calls = {k: (lambda k=k: nets[k](x)) for k in names}
        totals, _ = paired_rounds(calls, runs, warmup, clock=clock, sync=sync, before=lambda k, on: clocks[k].start(on))
    finally:
        for k, c in clocks.items():
            c.remove()
            models[k].to(memory_format=torch.contiguous_format)
    return {k: LayerProfile(clocks[k].rows(flops[k]), totals[k]) for k in names}


def layer_latency(model: nn.Module, size: tuple[int, int], **kw: Any) -> tuple[list[LayerTime], float]:
    """One net's :func:`layer_profiles` (the same keywords): its rows and its median forward time with hooks
    (ms)."""
    p = layer_profiles({"net": model}, size, **kw)["net"]
    return p.rows, p.total_ms


def work_ratio(layer: LayerTime, against: LayerTime) -> float:
    """How much of ``against``'s work ``layer`` does: its MACs ratio (convolutions), else its channels ratio
    (BatchNorm, activations, pooling: their work scales with the channels)."""
    if against.macs:
        return layer.macs / against.macs
    return layer.out_channels / against.out_channels if against.out_channels else 1.0


def compare_layers(net: LayerProfile, against: LayerProfile) -> list[dict[str, Any]]:
    """Each layer of ``net`` that ``against`` has too (same module name), timed in the same rounds:
    ``{"name", "kind", "in_channels", "out_channels", "against_in_channels", "against_out_channels",
    "macs", "against_macs", "ms", "against_ms", "ratio", "ratio_iqr"`` (per-round paired time ratio),
    ``"work_ratio"`` (:func:`work_ratio`), ``"excess_ms"`` (its time beyond ``work_ratio`` × the other's:
    what it costs above shrinking with its work)}``, and one row ``"(outside modules)"`` (kind
    ``functional``) for the time between modules, work ratio 1; largest excess first."""
    theirs = {r.name: r for r in against.rows}
    out = []
    for r in net.rows:
        a = theirs.get(r.name)
        if a is None or a.ms <= 0:
            continue
        w = work_ratio(r, a)
        out.append(
            {
                "name": r.name, "kind": r.kind, "in_channels": r.in_channels, "out_channels": r.out_channels,
                "against_in_channels": a.in_channels, "against_out_channels": a.out_channels,
                "macs": r.macs, "against_macs": a.macs, "ms": r.ms, "against_ms": a.ms,
                **paired_ratio(r.times_ms, a.times_ms), "work_ratio": w, "excess_ms": r.ms - w * a.ms,
            }
        )  # fmt: skip
    mine, other = net.outside_ms(), against.outside_ms()
    ms, ams = statistics.median(mine), statistics.median(other)
    outside = {"name": "(outside modules)", "kind": "functional", "ms": ms, "against_ms": ams, "work_ratio": 1.0}
    ratio = paired_ratio(mine, other) if min(other) > 0 else {"ratio": ms / ams if ams else 1.0, "ratio_iqr": 0.0}
    out.append({**outside, **ratio, "excess_ms": ms - ams})
    return sorted(out, key=lambda row: -row["excess_ms"])


def ideal_ratio(rows: list[dict[str, Any]]) -> float:
    """The time ratio the net would reach if every layer's time shrank exactly with its work (:func:`work_ratio`)
    and the time between modules (the ``functional`` row: the logits' upsampling, residual sums, gates …) stayed:
    Σ work ratio × the other net's ms / Σ the other net's ms over :func:`compare_layers`' rows. The floor that the
    work which does not shrink sets for this plan at this size; the measured ratio lies above it by the rows'
    excess / the other net's total."""
    total = sum(r["against_ms"] for r in rows)
    return sum(r["work_ratio"] * r["against_ms"] for r in rows) / total if total > 0 else 1.0


def excess_by_kind(rows: list[dict[str, Any]]) -> dict[str, tuple[float, float, float]]:
    """:func:`compare_layers`' rows summed by layer kind (``Conv2d``, ``ReLU`` …, ``functional``): the other
    net's ms, this net's ms and the excess ms."""
    kinds: dict[str, tuple[float, float, float]] = {}
    for r in rows:
        a, b, e = kinds.get(r["kind"].split(" ")[0], (0.0, 0.0, 0.0))
        kinds[r["kind"].split(" ")[0]] = (a + r["against_ms"], b + r["ms"], e + r["excess_ms"])
    return dict(sorted(kinds.items()))


def channels_text(row: dict[str, Any]) -> str:
    """``"in→out → in→out"`` of a :func:`compare_layers` row (the other net's, then this one's); "" outside."""
    if "in_channels" not in row:
        return ""
    return (
        f"{row['against_in_channels']:>4d}→{row['against_out_channels']:<4d} → "
        f"{row['in_channels']:>4d}→{row['out_channels']:<4d}"
    )
