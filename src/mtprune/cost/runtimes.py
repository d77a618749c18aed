"""The runtimes a net is timed in: PyTorch eager (a memory layout, BatchNorm folded or not), ``torch.compile``
with inductor's freezing, or ONNX Runtime's CPU provider — each a :class:`Setup` — and the inference copies
they time (:func:`inference_net`, :func:`ort_net`, :func:`fold_batchnorm`)."""

from __future__ import annotations

import contextlib
import copy
import importlib.util
import tempfile
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from mtprune.config import Timing
from mtprune.errors import UsageError
from mtprune.models.base import eval_mode
from mtprune.models.groups import bn_source, dependency_graph

#: the runtimes a net can be timed in: PyTorch itself, or ONNX Runtime's CPU execution provider
TORCH, ONNXRUNTIME = "torch", "onnxruntime"


@dataclass(frozen=True)
class Setup:
    """How a net is run for timing: memory layout, BatchNorm folded, ``torch.compile`` — or, with
    ``runtime="onnxruntime"``, exported to ONNX and run by ONNX Runtime on the CPU (which folds BatchNorm,
    fuses convolutions with their sums and activations and picks its own layout: the other fields are moot)."""

    channels_last: bool = False
    fold_bn: bool = False
    compile: bool = False
    runtime: str = TORCH

    @property
    def label(self) -> str:
        """The setup in the timing vocabulary (:data:`~mtprune.config.RUNTIMES`): ``eager``, ``fold-bn``,
        ``channels-last``, ``channels-last+fold-bn``, ``compile``, ``channels-last+compile``, ``onnxruntime``."""
        if self.runtime == ONNXRUNTIME:
            return ONNXRUNTIME
        parts = ["channels-last"] if self.channels_last else []
        parts += ["compile"] if self.compile else (["fold-bn"] if self.fold_bn else [])
        return "+".join(parts) or "eager"


def setup_dict(st: Setup) -> dict[str, object]:
    """``{"setup", "layout", "fold_bn", "compile", "runtime"}`` of a :class:`Setup` (the JSON form; ``setup``:
    its :attr:`~Setup.label`)."""
    if st.runtime == ONNXRUNTIME:
        return {"setup": st.label, "layout": "contiguous", "fold_bn": True, "compile": False, "runtime": ONNXRUNTIME}
    layout = "channels_last" if st.channels_last else "contiguous"
    return {"setup": st.label, "layout": layout, "fold_bn": st.fold_bn, "compile": st.compile, "runtime": TORCH}


LAYOUTS = ("contiguous", "channels_last")


def all_setups(compile: bool = False, onnxruntime: bool = False) -> list[Setup]:
    """Every configuration a deployment would try: both memory layouts, with and without BatchNorm folded
    into the convolutions (and ``torch.compile`` with freezing, in both layouts, if asked; and ONNX Runtime
    if asked)."""
    variants = [(False, False), (True, False)] + ([(True, True)] if compile else [])
    out = [Setup(layout == "channels_last", f, c) for layout in LAYOUTS for f, c in variants]
    return out + ([Setup(runtime=ONNXRUNTIME)] if onnxruntime else [])


def onnxruntime_installed() -> bool:
    """Whether ONNX Runtime and onnx (the ``export`` extra) can be imported here."""
    return all(importlib.util.find_spec(m) is not None for m in ("onnxruntime", "onnx"))


def setups_of(timing: Timing) -> list[Setup]:
    """The setups ``timing.runtime`` names, in order, each once: ``eager``, ``channels-last``, ``fold-bn``,
    ``compile`` (with freezing), ``onnxruntime``, or ``channels-last+fold-bn`` / ``channels-last+compile``;
    ``best``: every eager setup (both layouts, with and without BatchNorm folded) and ONNX Runtime where it
    is installed (:func:`onnxruntime_installed`)."""
    out: list[Setup] = []
    for name in timing.runtimes():
        if name == "best":
            found = all_setups(onnxruntime=onnxruntime_installed())
        elif name == "onnxruntime":
            found = [Setup(runtime=ONNXRUNTIME)]
        else:
            parts = set(name.split("+"))
            found = [Setup("channels-last" in parts, "fold-bn" in parts, "compile" in parts)]
        out += [st for st in found if st not in out]
    return out


def fold_batchnorm(model: nn.Module) -> nn.Module:
    """An inference copy of ``model`` with every BatchNorm that follows a convolution folded into the
    convolution's weights (``W' = γ/σ·W``, ``b' = β + γ/σ·(b − m)``), as deployment runtimes do.

    Uses ``torch.fx`` (``torch.fx.experimental.optimization.fuse``): the copy is a ``GraphModule`` that
    computes the segmentation output of ``model.forward``, equal to it up to float rounding, in eval mode.
    A model ``torch.fx`` cannot trace (a wrapped user net: its forward is the net's own) is folded module by
    module instead (:func:`_fold_by_graph`). The original model is not changed.
    """
    from torch.fx.experimental.optimization import fuse  # imported when used: torch.fx is slow to import

    try:
        with eval_mode(model):
            return fuse(model, inplace=False)
    except Exception:  # noqa: BLE001 - any model torch.fx cannot trace
        return _fold_by_graph(model)


def _fold_by_graph(model: nn.Module) -> nn.Module:
    """A copy of ``model`` in eval mode whose convs that feed exactly one BatchNorm — and that BN nothing
    else — carry the BN folded in (the BN becomes an identity), found on Torch-Pruning's dependency graph."""
    from torch.nn.utils.fusion import fuse_conv_bn_eval

    net = copy.deepcopy(model).eval()
    try:
        dg = dependency_graph(net)
    except Exception as e:  # noqa: BLE001 - a model Torch-Pruning cannot trace either
        raise UsageError(f"cannot fold BatchNorm into convolutions: the model could not be traced ({e})") from None
    names = {id(m): n for n, m in net.named_modules()}
    for bn in [m for m in net.modules() if isinstance(m, nn.BatchNorm2d) and m in dg.module2node]:
        conv = bn_source(dg, bn)
        if not isinstance(conv, nn.Conv2d) or {id(o.module) for o in dg.module2node[conv].outputs} != {id(bn)}:
            continue
        net.set_submodule(names[id(conv)], fuse_conv_bn_eval(conv, bn))
        net.set_submodule(names[id(bn)], nn.Identity())
    return net


def inference_net(model: nn.Module, device: str, channels_last: bool, fold_bn: bool, compile: bool) -> nn.Module:
    """The net as it will be timed: eval mode, BN folded if asked, on ``device``, in the memory format."""
    model = model.eval()
    if fold_bn:
        model = fold_batchnorm(model)
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    model = model.to(device).to(memory_format=fmt)
    return torch.compile(model) if compile else model


def check_runtimes(setups: Iterable[Setup], device: str, dtype: str) -> None:
    """One line for a runtime that cannot run as asked: ONNX Runtime is timed on the CPU, in float32."""
    for st in setups:
        if st.runtime not in (TORCH, ONNXRUNTIME):
            raise UsageError(f"unknown runtime '{st.runtime}'; choose from {TORCH}, {ONNXRUNTIME}")
        if st.runtime == ONNXRUNTIME and (device != "cpu" or dtype != "float32"):
            raise UsageError(f"ONNX Runtime is timed on the CPU in float32 (asked: {device}, {dtype})")


def ort_net(model: nn.Module, size: tuple[int, int]) -> Callable[[Any], Any]:
    """``model`` exported to ONNX (a temporary file, gone once loaded) and loaded into an ONNX Runtime CPU
    session with all graph optimisations, torch's thread count and no spinning idle threads (they would slow
    the next net of the round): a function of a ``1×3×H×W`` array."""
    from mtprune.export import export_onnx, ort_session  # the export extra, only when asked for

    net = copy.deepcopy(model).to(memory_format=torch.contiguous_format)  # another entry may hold it channels_last
    with tempfile.TemporaryDirectory(prefix="mtprune-ort-") as tmp:
        path = export_onnx(net, Path(tmp) / "net.onnx", size)
        sess = ort_session(path, threads=torch.get_num_threads(), spin=False)  # nets share the cores in turn
    return lambda x: sess.run(None, {"image": x})


def compile_settings(nets: int) -> contextlib.AbstractContextManager:
    """``torch.compile`` as an inference deployment uses it: inductor's *freezing* (weights become constants,
    BatchNorm folded, convolution weights pre-packed once for oneDNN instead of reordered on every call),
    and room for one compiled graph per net — falling back to eager silently would time the wrong thing.
    Nested, it never lowers the room an outer call made (several nets timed pair by pair)."""
    import torch._dynamo.config as dynamo_config  # when used: importing dynamo costs seconds
    import torch._inductor.config as inductor_config

    stack = contextlib.ExitStack()
    stack.enter_context(inductor_config.patch(freezing=True))
    now = next(
        (getattr(dynamo_config, n) for n in ("recompile_limit", "cache_size_limit") if hasattr(dynamo_config, n)), 0
    )
    limit = max(8, 2 * nets, now)
    stack.enter_context(dynamo_config.patch(**_recompile_limits(dynamo_config, limit, max(256, 4 * limit))))
    return stack


def _recompile_limits(config: Any, per_frame: int, total: int) -> dict[str, Any]:
    """dynamo's private recompile limits, under the names this torch has: ``recompile_limit`` and friends
    (torch ≥ 2.6) or their older names ``cache_size_limit``, ``accumulated_cache_size_limit``,
    ``fail_on_cache_limit_hit``; the one place mtprune touches a private torch setting."""
    names = [
        (("recompile_limit", "cache_size_limit"), per_frame),
        (("accumulated_recompile_limit", "accumulated_cache_size_limit"), total),
        (("fail_on_recompile_limit_hit", "fail_on_cache_limit_hit"), True),
    ]
    out = {}
    for candidates, value in names:
        name = next((n for n in candidates if hasattr(config, n)), None)
        if name is not None:
            out[name] = value
    return out
