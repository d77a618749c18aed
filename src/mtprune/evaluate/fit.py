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
faster. A count nothing beats is filled up to the channel multiple the kernels compute in when a paired
timing says that is not slower (:func:`_fill`). With ``runtime="onnxruntime"`` the convs are timed in
ONNX Runtime, chained as in the net (:func:`conv_graph`), and counts first rounded up to its channel block
(:func:`ort_block`). Identical shapes are timed once; the times are kept in a :class:`LatencyTable`
(``~/.cache/mtprune/``, per device, threads, layout and runtime version), so a second prune of the same
net is instant.
"""

from __future__ import annotations

import copy
import functools
import json
import math
import os
import re
import statistics
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import astuple, dataclass
from functools import partial
from pathlib import Path
from typing import Any

import torch
from torch import nn

from mtprune.errors import UsageError
from mtprune.evaluate.cost import ONNXRUNTIME, TORCH
from mtprune.evaluate.host_memory import SYSTEM, host_memory
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


def _torch_runner(shapes: list[ConvShape], device: str, channels_last: bool) -> Callable[[], None]:
    """One forward of each conv of ``shapes`` (with a bias: BN folded) in PyTorch, CUDA synchronised."""
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    convs = [_conv_of(sh, device, fmt) for sh in shapes]
    sync = torch.cuda.synchronize if device.startswith("cuda") else (lambda: None)

    @torch.no_grad()
    def run() -> None:
        for conv, x in convs:
            conv(x)
        sync()

    return run


def out_size(shape: ConvShape) -> tuple[int, int]:
    """The spatial size of the output of a conv of ``shape``."""
    dims = zip((shape.height, shape.width), shape.padding, shape.dilation, shape.kernel, shape.stride, strict=True)
    h, w = ((n + 2 * p - d * (k - 1) - 1) // st + 1 for n, p, d, k, st in dims)
    return h, w


def _feeds(producer: ConvShape, consumer: ConvShape) -> bool:
    """Whether ``consumer`` takes exactly ``producer``'s output (all its channels, at its size)."""
    return consumer.cin == producer.cout and (consumer.height, consumer.width) == out_size(producer)


def conv_graph(shapes: list[ConvShape], chain: bool = True) -> bytes:
    """An ONNX model (opset 17) of a layer's convs as ONNX Runtime runs them in the net: the first shape
    (the layer's conv) on input ``x0``, each later one (a consumer) fed by its output through a ReLU when
    it takes exactly that output (:func:`_feeds`) and ``chain``, else on an input of its own; each output
    pooled by a sink that keeps the blocked layout, as the net's next operator does; every conv with a bias
    (BN folded), random weights. Chained, a channel count ONNX Runtime's blocked (NCHWc) kernels cannot
    take costs here what it costs in the net: the reorders to and from the plain layout between the two
    convs, which timing each conv on its own would not show."""
    from mtprune.export import require_export_extra  # onnx: the export extra, only when asked for

    require_export_extra()
    from onnx import TensorProto, helper, numpy_helper

    gen = torch.Generator().manual_seed(0)
    nodes, inputs, outputs, weights = [], [], [], []
    for i, sh in enumerate(shapes):
        w = torch.randn(sh.cout, sh.cin // sh.groups, *sh.kernel, generator=gen).numpy()
        weights += [numpy_helper.from_array(w, f"w{i}"), numpy_helper.from_array(w[:, 0, 0, 0].copy(), f"b{i}")]
        source = "r0" if chain and i > 0 and _feeds(shapes[0], sh) else f"x{i}"
        if source == f"x{i}":
            inputs.append(helper.make_tensor_value_info(source, TensorProto.FLOAT, [1, sh.cin, sh.height, sh.width]))
        nodes.append(helper.make_node(
            "Conv", [source, f"w{i}", f"b{i}"], [f"y{i}"], kernel_shape=list(sh.kernel), strides=list(sh.stride),
            pads=[*sh.padding, *sh.padding], dilations=list(sh.dilation), group=sh.groups,
        ))  # fmt: skip
        outputs.append(helper.make_tensor_value_info(f"y{i}", TensorProto.FLOAT, None))
    if chain and any(_feeds(shapes[0], sh) for sh in shapes[1:]):
        nodes.insert(1, helper.make_node("Relu", ["y0"], ["r0"]))
        outputs.pop(0)  # y0 is consumed inside the graph
    for out in outputs:  # a sink that takes the blocked layout, as the net's next op does (no reorder after it)
        nodes.append(helper.make_node("GlobalAveragePool", [out.name], [f"g{out.name}"]))
    outputs = [helper.make_tensor_value_info(f"g{out.name}", TensorProto.FLOAT, None) for out in outputs]
    graph = helper.make_graph(nodes, "convs", inputs, outputs, weights)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]).SerializeToString()


def _ort_runner(shapes: list[ConvShape]) -> Callable[[], None]:
    """One run of :func:`conv_graph` in an ONNX Runtime CPU session set up as ``cost``'s ONNX Runtime setup
    (all graph optimisations, torch's thread count, no spinning threads)."""
    import numpy as np

    from mtprune.export import ort_session  # the export extra, only when asked for

    sess = ort_session(conv_graph(shapes), threads=torch.get_num_threads(), spin=False)
    rng = np.random.default_rng(0)
    feed = {i.name: rng.standard_normal(i.shape).astype(np.float32) for i in sess.get_inputs()}
    return lambda: sess.run(None, feed) and None


#: output channel counts of the probe convs :func:`ort_block` has ONNX Runtime optimise
PROBE_CHANNELS = tuple(range(33, 97))


@functools.cache
def ort_block() -> int:
    """The channel block of ONNX Runtime's CPU provider's blocked (NCHWc) layout on this machine (MLAS's:
    8 with AVX2, 16 with AVX-512). Its convs pad every tensor's channels up to a multiple of it, so counts
    up to the next multiple cost no time, and a tensor of another count leaves the layout for the
    operators after its conv (pooling, sums), with reorders around them; a conv whose input count is not
    even a multiple of 4 falls back to the plain layout altogether (bench/README.md: 50 of an irregular
    DeepLabv3-R101's 112 convs). Found by having ONNX Runtime optimise one probe conv per output count of
    :data:`PROBE_CHANNELS`, each followed by a pooling, and reading which poolings it left plain: the gcd
    of the other counts (1 when none: no blocked kernels on this CPU)."""
    from mtprune.export import require_export_extra  # the export extra, only when ONNX Runtime is asked for

    ort = require_export_extra()
    import onnx

    opts = ort.SessionOptions()
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    opts.log_severity_level = 3  # not the warning that an optimised model is hardware-specific: that is the point
    probes = [ConvShape(64, c, (1, 1), (1, 1), (0, 0), (1, 1), 1, 8, 8) for c in PROBE_CHANNELS]
    with tempfile.TemporaryDirectory() as tmp:
        opts.optimized_model_filepath = str(Path(tmp) / "probe.onnx")
        ort.InferenceSession(conv_graph(probes, chain=False), opts, providers=["CPUExecutionProvider"])
        nodes = onnx.load(opts.optimized_model_filepath).graph.node
    plain = {n.output[0] for n in nodes if n.domain == "" and n.op_type == "GlobalAveragePool"}  # gy<i> as built
    counts = [c for i, c in enumerate(PROBE_CHANNELS) if f"gy{i}" not in plain]
    return math.gcd(*counts) if counts else 1


def runner(shapes: list[ConvShape], device: str = "cpu", channels_last: bool = False, runtime: str = TORCH
           ) -> Callable[[], None]:  # fmt: skip
    """A function running each conv of ``shapes`` once in ``runtime`` (``torch`` on ``device`` in the layout
    of ``channels_last``; ``onnxruntime``: CPU, its own layout)."""
    if runtime == ONNXRUNTIME:
        return _ort_runner(shapes)
    return _torch_runner(shapes, device, channels_last)


def _elapsed_ms(run: Callable[[], None]) -> float:
    t0 = time.perf_counter()
    run()
    return (time.perf_counter() - t0) * 1000.0


def time_convs(shapes: list[ConvShape], device: str = "cpu", channels_last: bool = False, runs: int = 7,
               runtime: str = TORCH) -> float:  # fmt: skip
    """Median wall time (ms) of one batch-1 run of the convs of ``shapes`` with a bias (BN folded) in
    ``runtime`` (:func:`runner`), after two warm-up runs. At least ``runs`` runs, more (up to 50) for convs
    faster than 3 ms, so that every median spans ≥ 20 ms."""
    run = runner(shapes, device, channels_last, runtime)
    run(), run()
    times: list[float] = []
    while len(times) < 50 and (len(times) < runs or sum(times) < 20.0):
        times.append(_elapsed_ms(run))
    return statistics.median(times)


def time_conv(shape: ConvShape, device: str = "cpu", channels_last: bool = False, runs: int = 7,
              runtime: str = TORCH) -> float:  # fmt: skip
    """:func:`time_convs` of one conv."""
    return time_convs([shape], device, channels_last, runs, runtime)


def time_pair(a: list[ConvShape], b: list[ConvShape], device: str = "cpu", channels_last: bool = False,
              rounds: int = 15, runtime: str = TORCH) -> float:  # fmt: skip
    """Median over ``rounds`` of time(b) / time(a), the two sets of convs timed in turn (alternating order)
    after a warm-up: the paired check that a count chosen from the table is really faster. A minimum over
    many noisy single timings is biased low (the winner's curse); this fresh, paired measurement is not."""
    run_a, run_b = runner(a, device, channels_last, runtime), runner(b, device, channels_last, runtime)
    for run in (run_a, run_a, run_b, run_b):
        run()
    ratios = []
    for r in range(rounds):
        if r % 2 == 0:
            ta, tb = _elapsed_ms(run_a), _elapsed_ms(run_b)
        else:
            tb, ta = _elapsed_ms(run_b), _elapsed_ms(run_a)
        ratios.append(tb / ta)
    return statistics.median(ratios)


def default_table_path(device: str = "cpu", channels_last: bool = False, runtime: str = TORCH) -> Path:
    """``~/.cache/mtprune/latency-<device>_<threads or GPU>_<layout>_torch<version>.json``, for ONNX Runtime
    ``latency-cpu_<capability>_<threads>_onnxruntime<version>.json``, with ``_cached`` before ``.json`` when
    the host memory is not the system's (:func:`~mtprune.evaluate.host_memory.host_memory`: a conv's time
    includes faulting its output in, or not); ``$MTPRUNE_CACHE`` instead of ``~/.cache/mtprune`` if set."""
    if device.startswith("cuda"):
        where = torch.cuda.get_device_name(device)
    else:
        where = f"{torch.backends.cpu.get_cpu_capability()}-{torch.get_num_threads()}threads"
    if runtime == ONNXRUNTIME:
        import onnxruntime

        kind = f"onnxruntime{onnxruntime.__version__}"
    else:
        kind = ("channels_last" if channels_last else "contiguous") + f"-torch{torch.__version__}"
    mode = host_memory()
    memory = "" if device.startswith("cuda") or mode == SYSTEM else f"-{mode}"
    tag = re.sub(r"[^A-Za-z0-9.+]+", "_", f"{device.split(':')[0]}-{where}-{kind}{memory}")
    root = Path(os.environ.get("MTPRUNE_CACHE", Path.home() / ".cache" / "mtprune"))
    return root / f"latency-{tag}.json"


class LatencyTable:
    """Measured times (ms) of single convs by :class:`ConvShape`, for one device, layout and runtime
    (``torch`` or ``onnxruntime``: the counts ONNX Runtime's CPU kernels like are not PyTorch's), kept in a
    JSON file (``path``) so that the next prune on the same machine times nothing. ``measure``: shape → ms
    (default :func:`time_conv`; tests pass arithmetic); ``compare``: two lists of shapes → the paired time
    ratio second / first (default :func:`time_pair`; with a ``measure`` given, the ratio of its sums)."""

    def __init__(
        self,
        path: str | os.PathLike | None = None,
        device: str = "cpu",
        channels_last: bool = False,
        measure: Callable[[ConvShape], float] | None = None,
        compare: Callable[[list[ConvShape], list[ConvShape]], float] | None = None,
        runtime: str = TORCH,
    ) -> None:
        if runtime not in (TORCH, ONNXRUNTIME):
            raise UsageError(f"runtime must be {TORCH} or {ONNXRUNTIME} (got {runtime!r})")
        if runtime == ONNXRUNTIME and device != "cpu":
            raise UsageError(f"--round-to auto in ONNX Runtime times on the CPU only (got --device {device})")
        if device.startswith("cuda") and not torch.cuda.is_available():
            raise UsageError("--round-to auto --device cuda asked for, but CUDA is not available on this machine")
        self.path = Path(path) if path is not None else default_table_path(device, channels_last, runtime)
        self.runtime = runtime
        #: counts are rounded up to multiples of this (ONNX Runtime's blocked layout, :func:`ort_block`)
        self.block = ort_block() if runtime == ONNXRUNTIME and measure is None else 1
        #: a count that nothing beats is filled up to a multiple of this if that is not slower (:func:`_fill`);
        #: 1 (off) in ONNX Runtime, whose counts are already multiples of its block, and for a given ``measure``
        self.fill = vector_width(device) if runtime == TORCH and measure is None else 1
        self.measure = measure or (lambda s: time_conv(s, device, channels_last, runtime=runtime))
        if compare is None and measure is not None:
            compare = lambda a, b: sum(map(measure, b)) / sum(map(measure, a))  # noqa: E731
        self.compare = compare or (lambda a, b: time_pair(a, b, device, channels_last, runtime=runtime))
        self.measure_set: Callable[[list[ConvShape]], float] | None = None  # None: a layer is the sum of its convs
        if runtime == ONNXRUNTIME and measure is None:  # a layer's convs chained as in the net (conv_graph)
            self.measure_set = lambda shapes: time_convs(shapes, device, runtime=runtime)
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

    def layer_ms(self, shapes: list[ConvShape]) -> float:
        """The time of a layer's conv (first) and its consumers' convs: in PyTorch the sum of their single
        times; in ONNX Runtime one timing of them chained as in the net (:func:`conv_graph`)."""
        if self.measure_set is None:
            return sum(map(self.ms, shapes))
        key = "set " + " + ".join(sh.key for sh in shapes)
        if key not in self.times:
            self.times[key] = float(self.measure_set(shapes))
            self.measured += 1
        return self.times[key]

    def ratio(self, a: list[ConvShape], b: list[ConvShape]) -> float:
        """The paired time ratio of the convs ``b`` to the convs ``a`` (cached like single times)."""
        key = "pair " + " + ".join(sh.key for sh in a) + " | " + " + ".join(sh.key for sh in b)
        if key not in self.times:
            self.times[key] = float(self.compare(a, b))
            self.measured += 1
        return self.times[key]

    def save(self) -> None:
        head = {"format": "mtprune-latency-table", "torch": torch.__version__, "runtime": self.runtime}
        write_json(self.path, {**head, "times_ms": self.times})


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


def vector_width(device: str = "cpu") -> int:
    """The channel multiple PyTorch's conv kernels compute in on ``device``: the fp32 lanes of the CPU's
    widest vector unit (16 with AVX-512, 8 with AVX2 or less: oneDNN pads channels to them), 8 on CUDA
    (cuDNN's tensor-core tiles). Only a candidate: :func:`_fill` keeps it when a timing agrees."""
    if device.startswith("cuda"):
        return 8
    return 16 if torch.backends.cpu.get_cpu_capability().startswith("AVX512") else 8


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


def _blocked(counts: range, block: int) -> tuple[int, list[int]]:
    """The counts to choose from and the first of them: all of ``counts`` when ``block`` is 1 or the kept
    count (the first) is a multiple of it; else the multiples of ``block`` among them (none: all). In ONNX
    Runtime a count between two multiples costs the time of the next one (its channels are padded) and takes
    its tensor out of the blocked layout, costs in the net that timing the layer's convs alone does not
    show; the channels up to the multiple are free."""
    ok = [c for c in counts if c % block == 0]
    if block == 1 or not ok or counts[0] % block == 0:
        return counts[0], list(counts)
    return ok[0], ok


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
    of training-only modules (auxiliary heads), grouped convs and their consumers are not refitted. In
    ONNX Runtime (``table.block`` > 1) a kept count that is not a multiple of its block is first rounded up
    to one, then only multiples are tried (:func:`_blocked`). A count nothing beats is filled up to the
    kernels' channel multiple when that is not slower (:func:`_fill`). The report:
    ``{layer: {"from", "to", "ms_from", "ms_to", "paired", "why"}}`` for every layer it changed."""
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
    start, tried = _blocked(range(n, top + 1), table.block)
    chosen, times, ratio = _choose(table, own, uses, tried)
    why = "faster" if start == n else f"ONNX Runtime pads channels to a multiple of {table.block} here: free"
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
