"""Deployment: ONNX export of a dense or pruned net, checked against PyTorch, timed in ONNX Runtime.

``onnx`` and ``onnxruntime`` are the optional ``export`` extra (``pip install "mtprune[export]"``).
The exported graph is the segmentation forward (``image`` → ``logits`` at the input size); with
``dynamic`` the batch, height and width are dynamic axes.
"""

from __future__ import annotations

import copy
import glob
import os
import shutil
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from mtprune.errors import MtpruneError, UsageError, WriteError
from mtprune.io import FILE_MODE, ensure_dir, write_failure


def require_export_extra() -> Any:
    try:
        import onnx  # noqa: F401
        import onnxruntime as ort
    except ImportError:
        raise MtpruneError(
            'ONNX export needs the export extra: pip install "mtprune[export]" (onnx, onnxruntime)'
        ) from None
    return ort


def unaligned_convs(model: nn.Module, multiple: int = 8) -> list[str]:
    """Names of the convolutions whose input or output channel count is not a multiple of ``multiple``
    (the image stem's 3 input channels and the class count of logits convolutions excepted: pruning does
    not set them).

    ONNX Runtime's CPU kernels run irregular channel counts markedly slower than multiples of 8 (measured:
    bench/README.md, "ONNX Runtime, dense against pruned"); a pruned net with unaligned convolutions is best
    re-pruned with ``mtprune prune --round-to 8`` (or ``auto``) before ONNX deployment.
    """
    classes = getattr(model, "num_classes", None)
    out = []
    for name, m in model.named_modules():
        if isinstance(m, nn.Conv2d):
            cin = m.in_channels if m.in_channels != 3 else multiple
            cout = m.out_channels if m.out_channels != classes else multiple
            if cin % multiple or cout % multiple:
                out.append(name)
    return out


def _window_matrix(bins: int, n: int) -> torch.Tensor:
    """``bins × n``: row i averages adaptive pooling's window i of a length-``n`` axis, [⌊i·n/b⌋, ⌈(i+1)·n/b⌉)."""
    m = torch.zeros(bins, n)
    for i in range(bins):
        lo, hi = (i * n) // bins, -(-((i + 1) * n) // bins)
        m[i, lo:hi] = 1.0 / (hi - lo)
    return m


class PoolByMatmul(nn.Module):
    """``adaptive_avg_pool2d`` of a fixed ``(h, w)`` input to ``(bh, bw)`` as two matrix products with the
    windows' averaging matrices: the same numbers, exported as two MatMuls. The exporter lowers adaptive
    pooling whose windows do not divide the size (PSPNet's bins 2, 3, 6 of a 65² feature map) into
    Where / Split / Transpose / ReduceMean / GatherND / Squeeze nodes, which cost the pruned net as much as
    the dense one; as matrix products they shrink with it (measured: bench/README.md, "Deployment
    speed on a Zen 3 EPYC")."""

    def __init__(self, out: tuple[int, int], size: tuple[int, int]) -> None:
        super().__init__()
        self.register_buffer("rows", _window_matrix(out[0], size[0]))
        self.register_buffer("cols", _window_matrix(out[1], size[1]).T.contiguous())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.rows @ x @ self.cols  # (bh × h) @ (…, h, w) @ (w × bw) → (…, bh, bw)


def pools_by_matmul(model: nn.Module, size: tuple[int, int]) -> nn.Module:
    """A copy of ``model`` whose ``nn.AdaptiveAvgPool2d`` layers with windows that do not divide their
    input (at the input ``size``) are :class:`PoolByMatmul` (``model`` itself when there is none)."""
    pools = {n: m for n, m in model.named_modules() if isinstance(m, nn.AdaptiveAvgPool2d)}
    if not pools:
        return model
    seen: dict[str, tuple[int, int]] = {}

    def record(name: str) -> Any:
        def hook(_m: nn.Module, args: tuple[torch.Tensor, ...]) -> None:  # None: the input is unchanged
            seen.setdefault(name, (args[0].shape[-2], args[0].shape[-1]))

        return hook

    hooks = [m.register_forward_pre_hook(record(n)) for n, m in pools.items()]
    try:
        model(torch.zeros(1, 3, *size))
    finally:
        for h in hooks:
            h.remove()
    swap = {}
    for n, hw in seen.items():
        o = pools[n].output_size
        out = (o, o) if isinstance(o, int) else tuple(b if b is not None else d for b, d in zip(o, hw, strict=True))
        if hw[0] % out[0] or hw[1] % out[1]:
            swap[n] = PoolByMatmul(out, hw)
    if not swap:
        return model
    model = copy.deepcopy(model)
    for n, m in swap.items():
        model.set_submodule(n, m)
    return model


@torch.no_grad()
def export_onnx(
    model: nn.Module,
    path: str | os.PathLike,
    size: tuple[int, int],
    dynamic: bool = False,
    opset: int = 18,
    exporter: str = "dynamo",
) -> Path:
    """Export ``model``'s segmentation forward to ``path`` (atomically) for a ``1×3×H×W`` example input.

    ``exporter="dynamo"`` (default; ``torch.export`` + onnxscript) handles PSPNet's adaptive pooling,
    which the legacy ``"torchscript"`` exporter refuses. PSPNet's pyramid bins (2, 3, 6) pool over
    windows that depend on the feature size, so its graph is exported for ``size`` only: with ``dynamic``
    only its batch axis is dynamic. In a graph of fixed height and width, adaptive poolings whose windows
    do not divide their input are exported as matrix products (:func:`pools_by_matmul`).
    """
    require_export_extra()
    if exporter not in ("dynamo", "torchscript"):
        raise UsageError(f"unknown exporter '{exporter}' (dynamo or torchscript)")
    path = Path(path)
    model = model.eval().cpu()
    fixed_size = not dynamic or (exporter == "dynamo" and getattr(model, "family", "") == "pspnet")
    model = pools_by_matmul(model, size) if fixed_size else model
    x = torch.zeros(1, 3, *size)
    kw: dict[str, Any] = {"input_names": ["image"], "output_names": ["logits"], "opset_version": opset}
    if exporter == "dynamo":
        kw.update(dynamo=True, verbose=False)
        if dynamic:
            dim = torch.export.Dim
            axes = {0: dim("batch", min=1, max=1024)}
            if getattr(model, "family", "") != "pspnet":
                axes.update({2: dim("height", min=32, max=8192), 3: dim("width", min=32, max=8192)})
            kw["dynamic_shapes"] = (axes,)
    else:
        kw["dynamo"] = False
        if dynamic:
            names = {0: "batch", 2: "height", 3: "width"}
            kw["dynamic_axes"] = {"image": names, "logits": names}
    if exporter == "dynamo":
        kw["external_data"] = _weight_bytes(model) >= PROTOBUF_LIMIT
    _write_onnx(path, lambda target: torch.onnx.export(model, (x,), str(target), **kw))
    return path


#: a protobuf (one .onnx file) holds at most 2 GB; larger weights go to ``<name>.data`` beside it
PROTOBUF_LIMIT = 2**31 - 2**24  # 2 GiB less 16 MiB for the graph itself


def _weight_bytes(model: nn.Module) -> int:
    return sum(t.numel() * t.element_size() for t in [*model.parameters(), *model.buffers()])


def sweep_dead_exports(path: Path) -> list[Path]:
    """Remove the temp folders (``.<name>.<pid>.<random>.tmp/``) that exports of ``path`` killed before they
    finished left beside it: those whose process is gone (a live one's is left alone). Returns them."""
    gone = []
    for d in path.parent.glob(f".{glob.escape(path.name)}.*.tmp"):
        pid = d.name[len(path.name) + 2 :].split(".", 1)[0]
        if d.is_dir() and not d.is_symlink() and (not pid.isdigit() or not _alive(int(pid))):
            shutil.rmtree(d, ignore_errors=True)
            gone.append(d)
    return gone


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _write_onnx(path: Path, export: Any) -> None:
    """Run ``export(target)`` into a temp folder beside ``path`` under ``path``'s own name, so an external
    weights file is named (and referenced) ``<name>.data``; then move the data file, then the model, into
    place. Without external data any stale ``<name>.data`` goes: the ``.onnx`` is self-contained."""
    ensure_dir(path.parent)
    sweep_dead_exports(path)
    tmp_dir = Path(tempfile.mkdtemp(prefix=f".{path.name}.{os.getpid()}.", suffix=".tmp", dir=path.parent))
    try:
        export(tmp_dir / path.name)
        data = tmp_dir / f"{path.name}.data"
        for f in (data, tmp_dir / path.name):
            if f.exists():
                os.chmod(f, FILE_MODE)
        if data.exists():
            os.replace(data, path.parent / data.name)
        elif (path.parent / data.name).exists():
            (path.parent / data.name).unlink()
        os.replace(tmp_dir / path.name, path)
    except OSError as e:
        raise WriteError(f"{path.parent}: {write_failure(e)} while writing {path.name}") from None
    finally:
        shutil.rmtree(tmp_dir, ignore_errors=True)


def ort_session(path: str | os.PathLike | bytes, threads: int | None = None, spin: bool = True) -> Any:
    """An ONNX Runtime CPU session of the file ``path`` (or a serialised model's bytes) with all graph
    optimisations and ``threads`` intra-op threads.
    ``spin=False`` stops its idle threads from busy-waiting after a run (ORT's default keeps them spinning,
    which takes the cores from whatever runs next: another net timed in the same round)."""
    ort = require_export_extra()
    opts = ort.SessionOptions()
    if threads:
        opts.intra_op_num_threads = threads
    if not spin:
        opts.add_session_config_entry("session.intra_op.allow_spinning", "0")
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    if not isinstance(path, bytes) and not Path(path).is_file():
        raise UsageError(f"{path}: ONNX file not found")
    source = path if isinstance(path, bytes) else str(path)
    return ort.InferenceSession(source, opts, providers=["CPUExecutionProvider"])


@torch.no_grad()
def compare_onnx(model: nn.Module, path: str | os.PathLike, size: tuple[int, int], seed: int = 0) -> dict[str, float]:
    """``max_abs_diff`` = max |ONNX Runtime − PyTorch| of the logits on a random input of ``size``, and
    ``max_rel_diff`` = that divided by max |PyTorch logits| (an untrained net's logits reach ~1e3–1e4)."""
    x = torch.randn(1, 3, *size, generator=torch.Generator().manual_seed(seed))
    ref = model.eval().cpu()(x).numpy()
    sess = ort_session(path)
    out = sess.run(None, {"image": x.numpy()})[0]
    if out.shape != ref.shape:
        raise MtpruneError(f"{path}: ONNX output shape {out.shape} differs from PyTorch's {ref.shape}")
    diff = float(np.abs(out - ref).max())
    return {"max_abs_diff": diff, "max_rel_diff": diff / max(float(np.abs(ref).max()), 1e-12)}


def ort_latency(
    path: str | os.PathLike, size: tuple[int, int], runs: int = 20, warmup: int = 5, threads: int | None = None
) -> dict[str, float]:
    """Median and IQR (ms) of batch-1 ONNX Runtime CPU runs."""
    sess = ort_session(path, threads)
    x = np.random.default_rng(0).standard_normal((1, 3, *size)).astype(np.float32)
    times = []
    for i in range(warmup + runs):
        t0 = time.perf_counter()
        sess.run(None, {"image": x})
        if i >= warmup:
            times.append((time.perf_counter() - t0) * 1000)
    q = statistics.quantiles(times, n=4, method="inclusive")
    return {"latency_ms": statistics.median(times), "latency_iqr_ms": q[2] - q[0], "runs": runs}
