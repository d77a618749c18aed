"""Timing tables of single convolutions, the measurements behind ``--round-to auto``
(:func:`mtprune.pruning.fit.latency_fit` is the policy that reads them).

A :class:`ConvShape` is one convolution as timed: channels, geometry and input size, with a bias (BN
folded), batch 1. It runs in PyTorch (a layout, a device) or in ONNX Runtime, where a layer's convs are
chained as in the net (:func:`conv_graph`) and counts rounded to its channel block (:func:`ort_block`), or
where none is in reach to the count its blocked convs need between them (:func:`ort_alignment`).
Identical shapes are timed once; the times are kept in a :class:`LatencyTable` file (``~/.cache/mtprune/``,
per device, threads, layout and runtime version), so a second prune of the same net times nothing.
"""

from __future__ import annotations

import functools
import json
import math
import os
import re
import statistics
import tempfile
import time
from collections.abc import Callable
from dataclasses import astuple, dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from mtprune.cost.host_memory import SYSTEM, host_memory
from mtprune.cost.rounds import paired_rounds
from mtprune.cost.runtimes import ONNXRUNTIME, TORCH
from mtprune.errors import UsageError
from mtprune.io import write_json


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


def _optimised_nodes(graph: bytes) -> list[Any]:
    """The nodes of ``graph`` as ONNX Runtime's CPU provider optimises it on this machine (all graph
    optimisations): what :func:`ort_block` and :func:`ort_alignment` read its layout choices off."""
    from mtprune.export import require_export_extra  # the export extra, only when ONNX Runtime is asked for

    ort = require_export_extra()
    import onnx

    opts = ort.SessionOptions()
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    opts.log_severity_level = 3  # not the warning that an optimised model is hardware-specific: that is the point
    with tempfile.TemporaryDirectory() as tmp:
        opts.optimized_model_filepath = str(Path(tmp) / "probe.onnx")
        ort.InferenceSession(graph, opts, providers=["CPUExecutionProvider"])
        return list(onnx.load(opts.optimized_model_filepath).graph.node)


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
    probes = [ConvShape(64, c, (1, 1), (1, 1), (0, 0), (1, 1), 1, 8, 8) for c in PROBE_CHANNELS]
    nodes = _optimised_nodes(conv_graph(probes, chain=False))
    plain = {n.output[0] for n in nodes if n.domain == "" and n.op_type == "GlobalAveragePool"}  # gy<i> as built
    counts = [c for i, c in enumerate(PROBE_CHANNELS) if f"gy{i}" not in plain]
    return math.gcd(*counts) if counts else 1


@functools.cache
def ort_alignment() -> int:
    """The channel count ONNX Runtime's blocked (NCHWc) convs need between them on this machine (MLAS's: 4):
    a conv feeding another keeps the blocked layout when the count between them is a multiple of it, even
    off :func:`ort_block` (its kernels pad it), and leaves it otherwise — a reorder out and a plain conv after
    it (19 channels: both; 20: neither). Found as :func:`ort_block` is: one probe chain (conv 64 → c → 64) per
    count c above one block, optimised, reading which chains kept their second conv blocked: the gcd of those
    counts (1 when none, or without blocked kernels)."""
    block = ort_block()
    if block == 1:
        return 1
    kept = []
    for c in range(block + 1, 2 * block + 1):
        chain = [ConvShape(64, c, (1, 1), (1, 1), (0, 0), (1, 1), 1, 8, 8),
                 ConvShape(c, 64, (1, 1), (1, 1), (0, 0), (1, 1), 1, 8, 8)]  # fmt: skip
        convs = [i for i, n in enumerate(_optimised_nodes(conv_graph(chain))) if n.op_type == "Conv"]
        if len(convs) >= 2 and convs[1] == convs[0] + 1:  # the two convs next to each other: no reorder between
            kept.append(c)
    return math.gcd(*kept) if kept else 1


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
    times, _ = paired_rounds({"a": run_a, "b": run_b}, rounds, warmup=2)
    ratios = [tb / ta for ta, tb in zip(times["a"], times["b"], strict=True)]
    return statistics.median(ratios)


def default_table_path(device: str = "cpu", channels_last: bool = False, runtime: str = TORCH) -> Path:
    """``~/.cache/mtprune/latency-<device>_<threads or GPU>_<layout>_torch<version>.json``, for ONNX Runtime
    ``latency-cpu_<capability>_<threads>_onnxruntime<version>.json``, with ``_cached`` before ``.json`` when
    the host memory is not the system's (:func:`~mtprune.cost.host_memory.host_memory`: a conv's time
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
        #: where no multiple of ``block`` is in reach, counts are rounded up to multiples of this (the count
        #: ONNX Runtime's blocked convs need between them, :func:`ort_alignment`)
        self.align = ort_alignment() if runtime == ONNXRUNTIME and measure is None else 1
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


def vector_width(device: str = "cpu") -> int:
    """The channel multiple PyTorch's conv kernels compute in on ``device``: the fp32 lanes of the CPU's
    widest vector unit (16 with AVX-512, 8 with AVX2 or less: oneDNN pads channels to them), 8 on CUDA
    (cuDNN's tensor-core tiles). Only a candidate: :func:`_fill` keeps it when a timing agrees."""
    if device.startswith("cuda"):
        return 8
    return 16 if torch.backends.cpu.get_cpu_capability().startswith("AVX512") else 8
