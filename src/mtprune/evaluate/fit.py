"""Channel counts the hardware at hand likes: ``--round-to auto``.

A pruned layer's kept count n is whatever the scores leave (37, 101 …), and oneDNN, cuDNN and ONNX
Runtime run some channel counts much faster than their neighbours: the same 0.5× plan rounded up to
multiples of 16 ran faster on one CPU and slower on another (bench/README.md). So instead of a fixed
multiple, :func:`latency_fit` times each prunable conv — BatchNorm folded (a conv with bias), in the
chosen memory layout, batch 1, at the feature size it sees at the input size — together with the convs
that consume its channels, at n and at every count up to the next multiple of :data:`MULTIPLE`, on the
device at hand, and keeps n unless a larger count is more than :data:`NOISE` faster (then the smallest
count within :data:`NOISE` of the fastest, kept only if a fresh paired timing against n confirms the gain:
the fastest of many noisy timings is biased low, and unconfirmed picks made nets slower on an AMD EPYC,
bench/README.md): never fewer channels than the scores keep, and more only where they are measurably
faster. Identical shapes are timed once;
the times are kept in a :class:`LatencyTable` (``~/.cache/mtprune/``, per device, threads, layout and
torch version), so a second prune of the same net is instant.
"""

from __future__ import annotations

import copy
import json
import os
import re
import statistics
import time
from collections.abc import Callable
from dataclasses import astuple, dataclass
from functools import partial
from pathlib import Path
from typing import Any

import torch
from torch import nn

from mtprune.errors import UsageError
from mtprune.io import write_json
from mtprune.models.groups import dependency_graph
from mtprune.pruning import Fit, PruningPlan, apply_plan
from mtprune.pruning.thinet import find_consumers

#: counts are tried from the kept one up to the next multiple of this
MULTIPLE = 32
#: a larger count replaces n only when it is faster than n by more than this fraction
NOISE = 0.02


@dataclass(frozen=True)
class ConvShape:
    """One convolution as timed: channels, geometry and the input's spatial size."""

    cin: int
    cout: int
    kernel: tuple[int, int]
    stride: tuple[int, int]
    padding: tuple[int, int]
    dilation: tuple[int, int]
    groups: int
    height: int
    width: int

    @property
    def key(self) -> str:
        return ",".join(str(v) for v in astuple(self))

    @classmethod
    def of(cls, conv: nn.Conv2d, size: tuple[int, int], cin: int | None = None, cout: int | None = None) -> ConvShape:
        """``conv``'s shape at input ``size`` with ``cin`` inputs and ``cout`` outputs (default: its own); a
        depthwise conv (groups = inputs, outputs a multiple of them) keeps its multiplier: ``cout`` is then
        derived from ``cin``."""
        cin = conv.in_channels if cin is None else cin
        groups = 1
        if conv.groups > 1:  # only depthwise ones reach here (see _timeable)
            groups, cout = cin, cin * (conv.out_channels // conv.in_channels)
        return cls(cin, conv.out_channels if cout is None else cout, tuple(conv.kernel_size), tuple(conv.stride),
                   tuple(conv.padding), tuple(conv.dilation), groups, *size)  # fmt: skip


def _conv_of(shape: ConvShape, device: str, fmt: torch.memory_format) -> tuple[nn.Conv2d, torch.Tensor]:
    conv = nn.Conv2d(shape.cin, shape.cout, shape.kernel, shape.stride, shape.padding, shape.dilation, shape.groups)
    x = torch.randn(1, shape.cin, shape.height, shape.width, device=device).to(memory_format=fmt)
    return conv.eval().to(device).to(memory_format=fmt), x


def time_conv(shape: ConvShape, device: str = "cpu", channels_last: bool = False, runs: int = 7) -> float:
    """Median wall time (ms) of a batch-1 forward of a conv of ``shape`` with a bias (BN folded), after two
    warm-up runs; CUDA synchronised. At least ``runs`` runs, more (up to 50) for a conv faster than 3 ms, so
    that every median spans ≥ 20 ms."""
    conv, x = _conv_of(shape, device, torch.channels_last if channels_last else torch.contiguous_format)
    sync = torch.cuda.synchronize if device.startswith("cuda") else (lambda: None)
    times: list[float] = []
    with torch.no_grad():
        for i in range(52):
            sync()
            t0 = time.perf_counter()
            conv(x)
            sync()
            if i >= 2:
                times.append((time.perf_counter() - t0) * 1000.0)
            if len(times) >= runs and sum(times) >= 20.0:
                break
    return statistics.median(times)


def time_pair(
    a: list[ConvShape], b: list[ConvShape], device: str = "cpu", channels_last: bool = False, rounds: int = 15
) -> float:
    """Median over ``rounds`` of time(b) / time(a), the two sets of convs timed in turn (alternating order)
    after a warm-up: the paired check that a count chosen from the table is really faster. A minimum over
    many noisy single timings is biased low (the winner's curse); this fresh, paired measurement is not."""
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    sets = [[_conv_of(sh, device, fmt) for sh in shapes] for shapes in (a, b)]
    sync = torch.cuda.synchronize if device.startswith("cuda") else (lambda: None)

    def run(convs: list[tuple[nn.Conv2d, torch.Tensor]]) -> float:
        sync()
        t0 = time.perf_counter()
        for conv, x in convs:
            conv(x)
        sync()
        return time.perf_counter() - t0

    ratios = []
    with torch.no_grad():
        for convs in sets:
            run(convs), run(convs)
        for r in range(rounds):
            if r % 2 == 0:
                ta, tb = run(sets[0]), run(sets[1])
            else:
                tb, ta = run(sets[1]), run(sets[0])
            ratios.append(tb / ta)
    return statistics.median(ratios)


def default_table_path(device: str = "cpu", channels_last: bool = False) -> Path:
    """``~/.cache/mtprune/latency-<device>-<threads or GPU>-<layout>-torch<version>.json``
    (``$MTPRUNE_CACHE`` instead of ``~/.cache/mtprune`` if set)."""
    if device.startswith("cuda"):
        where = torch.cuda.get_device_name(device)
    else:
        where = f"{torch.backends.cpu.get_cpu_capability()}-{torch.get_num_threads()}threads"
    layout = "channels_last" if channels_last else "contiguous"
    tag = re.sub(r"[^A-Za-z0-9.+]+", "_", f"{device.split(':')[0]}-{where}-{layout}-torch{torch.__version__}")
    root = Path(os.environ.get("MTPRUNE_CACHE", Path.home() / ".cache" / "mtprune"))
    return root / f"latency-{tag}.json"


class LatencyTable:
    """Measured times (ms) of single convs by :class:`ConvShape`, for one device and layout, kept in a JSON
    file (``path``) so that the next prune on the same machine times nothing. ``measure``: shape → ms
    (default :func:`time_conv`; tests pass arithmetic); ``compare``: two lists of shapes → the paired time
    ratio second / first (default :func:`time_pair`; with a ``measure`` given, the ratio of its sums)."""

    def __init__(
        self,
        path: str | os.PathLike | None = None,
        device: str = "cpu",
        channels_last: bool = False,
        measure: Callable[[ConvShape], float] | None = None,
        compare: Callable[[list[ConvShape], list[ConvShape]], float] | None = None,
    ) -> None:
        if device.startswith("cuda") and not torch.cuda.is_available():
            raise UsageError("--round-to auto --device cuda asked for, but CUDA is not available on this machine")
        self.path = Path(path) if path is not None else default_table_path(device, channels_last)
        self.measure = measure or (lambda s: time_conv(s, device, channels_last))
        if compare is None and measure is not None:
            compare = lambda a, b: sum(map(measure, b)) / sum(map(measure, a))  # noqa: E731
        self.compare = compare or (lambda a, b: time_pair(a, b, device, channels_last))
        self.times: dict[str, float] = {}
        self.measured = 0  # shapes timed by this table (not found in the file)
        if self.path.is_file():
            try:
                data = json.loads(self.path.read_text())
                self.times = {str(k): float(v) for k, v in data["times_ms"].items()}
            except (OSError, ValueError, KeyError, TypeError, AttributeError) as e:
                raise UsageError(f"{self.path}: not a latency table ({type(e).__name__}: {e}); delete it") from None

    def ms(self, shape: ConvShape) -> float:
        if shape.key not in self.times:
            self.times[shape.key] = float(self.measure(shape))
            self.measured += 1
        return self.times[shape.key]

    def ratio(self, a: list[ConvShape], b: list[ConvShape]) -> float:
        """The paired time ratio of the convs ``b`` to the convs ``a`` (cached like single times)."""
        key = "pair " + " + ".join(sh.key for sh in a) + " | " + " + ".join(sh.key for sh in b)
        if key not in self.times:
            self.times[key] = float(self.compare(a, b))
            self.measured += 1
        return self.times[key]

    def save(self) -> None:
        write_json(self.path, {"format": "mtprune-latency-table", "torch": torch.__version__, "times_ms": self.times})


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
            counts: range) -> tuple[int, dict[int, float], float]:  # fmt: skip
    """The kept count n = ``counts[0]`` unless a larger one is faster by more than :data:`NOISE`; then the
    smallest count within :data:`NOISE` of the fastest (and still that much faster than n) — if a paired
    re-measurement against n (:meth:`LatencyTable.ratio`) confirms it is faster by more than :data:`NOISE`.
    Returns the count, every count's table time, and the confirming ratio (1.0 when n stays unchecked)."""
    times = {c: table.ms(own(c)) + sum(table.ms(u(c)) for u in uses) for c in counts}
    n, best = counts[0], min(times.values())
    if best >= times[n] / (1 + NOISE):
        return n, times, 1.0
    bound = min(best * (1 + NOISE), times[n] / (1 + NOISE))
    c = min(c for c, t in times.items() if t <= bound)
    ratio = table.ratio([own(n), *(u(n) for u in uses)], [own(c), *(u(c) for u in uses)])
    return (c if ratio < 1 / (1 + NOISE) else n), times, ratio


def _timeable(conv: nn.Module) -> bool:
    """A conv whose time at other channel counts is well defined here: a full or a depthwise conv."""
    return isinstance(conv, nn.Conv2d) and (conv.groups == 1 or conv.groups == conv.in_channels)


def _links(model: nn.Module, names: list[str], skip: tuple[str, ...]) -> dict[str, list[str]]:
    """For each prunable conv, the deployed convs that consume its channels (none when the dependency graph
    cannot map them: the conv alone is timed then)."""
    dg = dependency_graph(model)
    out = {}
    for n in names:
        try:
            found = [c for c, _ in find_consumers(model, dg, [n])[n]]
        except UsageError:
            found = []
        out[n] = [c for c in found if _timeable(model.get_submodule(c)) and not _under(c, skip)]
    return out


def _under(name: str, prefixes: tuple[str, ...]) -> bool:
    return any(name == p or name.startswith(p + ".") for p in prefixes)


def latency_fit(model: nn.Module, size: tuple[int, int], table: LatencyTable) -> Fit:
    """The :data:`~mtprune.pruning.Fit` of ``--round-to auto`` for ``model`` at input ``size``: for each
    prunable layer of a plan (in order; a count chosen changes the input count of the layers after it), the
    count c ∈ [n, next multiple of :data:`MULTIPLE`] minimising the time of its conv (c outputs) plus its
    consumers' convs (c of their inputs: a concatenation's other inputs stay), by :func:`_choose`. Layers
    of training-only modules (auxiliary heads), grouped convs and their consumers are not refitted. The
    report: ``{layer: {"from", "to", "ms_from", "ms_to"}}`` for every layer it changed."""
    sizes = conv_input_sizes(model, size)
    skip = tuple(model.training_only_modules()) if hasattr(model, "training_only_modules") else ()
    names = [lay.conv for lay in model.prunable_layers() if not _under(lay.conv, skip)]
    names = [n for n in names if model.get_submodule(n).groups == 1]
    consumers = _links(model, names, skip)
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
            chosen, times, ratio = _choose(table, own, uses, range(n, top + 1))
            if chosen != n:
                counts[name] = chosen
                report[name] = {"from": n, "to": chosen, "ms_from": times[n], "ms_to": times[chosen], "paired": ratio}
        table.save()
        return counts, report

    return fit


def _shape(conv: nn.Conv2d, size: tuple[int, int], cin: int, cout: int) -> ConvShape:
    return ConvShape.of(conv, size, cin=cin, cout=cout)


def _shape_in(conv: nn.Conv2d, size: tuple[int, int], others: int, c: int) -> ConvShape:
    """A consumer fed ``c`` channels by the layer fitted and ``others`` by the rest of its inputs."""
    return ConvShape.of(conv, size, cin=others + c)
