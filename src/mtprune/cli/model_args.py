"""The options ``init``, ``cost`` and ``prune`` share — which model (``--model …`` or ``--checkpoint``) and
how it is timed (``--runtime``, ``--timing``) — parsed into typed values (:class:`ModelSource`,
:class:`~mtprune.config.Timing`); old timing flags answer with their new spelling."""

from __future__ import annotations

import argparse
import json
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any

from mtprune.checkpoint import load_model
from mtprune.config import RUNTIMES, Timing, make_timing, safe_yaml
from mtprune.errors import UsageError
from mtprune.models import build_model, list_models
from mtprune.models.base import BACKBONE, DECODER, SegmentationModel
from mtprune.models.specs import is_spec

MODEL_HELP = (
    f"a built-in net ({', '.join(list_models())}), torchvision:NAME (a torchvision.models.segmentation builder, "
    "weights=None) or python:FILE.py:FUNCTION / python:package.module:FUNCTION (FUNCTION(num_classes, **model_args))"
)


@dataclass(frozen=True)
class ModelSource:
    """A model to build (``spec`` with ``num_classes`` …) or to load (``checkpoint``)."""

    spec: str | None = None
    num_classes: int | None = None
    cls_classes: int = 1000
    width: float = 1.0
    model_args: dict[str, Any] | None = None
    parts: dict[str, list[str]] | None = None
    coupled: str = "skip"
    checkpoint: str | None = None

    def model(self) -> SegmentationModel:
        """The model: loaded, or built (one line for a missing or doubled choice)."""
        if self.checkpoint and self.spec:
            raise UsageError("give either --model or --checkpoint, not both")
        if self.checkpoint:
            return load_model(self.checkpoint)
        if not self.spec:
            raise UsageError("a model is needed: --model NAME --num-classes N, or --checkpoint DIR")
        if self.num_classes is None:
            raise UsageError("--model needs --num-classes N")
        kw = {"model_args": self.model_args, "parts": self.parts, "coupled": self.coupled}
        return build_model(self.spec, self.num_classes, self.cls_classes, self.width, **kw)


def model_source(args: argparse.Namespace) -> ModelSource:
    """The :class:`ModelSource` of the parsed options (parsing only)."""
    return ModelSource(
        getattr(args, "model", None), getattr(args, "num_classes", None), getattr(args, "cls_classes", 1000),
        args.width, args.model_args, dict(args.parts) if args.parts else None, args.coupled,
        getattr(args, "checkpoint", None),
    )  # fmt: skip


def json_object(text: str) -> dict[str, Any]:
    try:
        value = json.loads(text)
    except json.JSONDecodeError as e:
        raise argparse.ArgumentTypeError(f"not JSON ({e.msg}): {text}") from None
    if not isinstance(value, dict):
        raise argparse.ArgumentTypeError(f"a JSON object is needed, got {text}")
    return value


def _part(text: str) -> tuple[str, list[str]]:
    part, sep, modules = text.partition("=")
    if not sep or part not in (BACKBONE, DECODER) or not modules:
        raise argparse.ArgumentTypeError(f"'{text}': expected backbone=MODULE or decoder=MODULE[,MODULE…]")
    return part, [m for m in modules.split(",") if m]


def model_name(text: str) -> str:
    if text not in list_models() and not is_spec(text):
        raise argparse.ArgumentTypeError(
            f"unknown model '{text}' (choose from {', '.join(list_models())}, "
            "or torchvision:NAME, python:FILE.py:FUNCTION)"
        )
    return text


def add_model_spec(g: argparse._ArgumentGroup | argparse.ArgumentParser) -> None:
    """``--model-args``, ``--parts``, ``--coupled``: how a model spec is built and grouped."""
    g.add_argument(
        "--model-args", type=json_object, default=None, metavar="JSON", help="the builder's keyword arguments"
    )
    g.add_argument(
        "--parts",
        nargs="+",
        type=_part,
        metavar="PART=MODULE[,MODULE…]",
        help="backbone=MODULE decoder=MODULE[,MODULE…] (module names in the model); default: torchvision's, or a "
        "backbone/encoder child and the other children",
    )
    g.add_argument(
        "--coupled",
        choices=["skip", "group"],
        default="skip",
        help="channels tied by a residual sum or a product: not pruned (skip, the paper's rule; default) or pruned "
        "together, scored by the sum of their |γ| (group)",
    )


def add_model_source(p: argparse.ArgumentParser) -> None:
    """Either ``--model SPEC --num-classes N …`` or ``--checkpoint DIR``."""
    src = p.add_argument_group("model (either --model … or --checkpoint DIR)")
    src.add_argument("--model", metavar="SPEC", help=MODEL_HELP)
    src.add_argument("--num-classes", type=int, metavar="N", help="segmentation classes (with --model)")
    src.add_argument("--width", type=float, default=1.0, metavar="W", help="channel width factor of a built-in net")
    add_model_spec(src)
    src.add_argument("--checkpoint", metavar="DIR", help="a model directory (arch.json + model.safetensors)")


# --- timing ----------------------------------------------------------------------------------------
#: the flags the timing vocabulary replaced (issue 30) and their new spelling
RENAMED = {
    "--best": "--runtime best",
    "--compile": "--runtime compile",
    "--onnxruntime": "--runtime onnxruntime",
    "--channels-last": "--runtime channels-last",
    "--fold-bn": "--runtime fold-bn",
    "--device": "--timing device=cpu|cuda",
    "--dtype": "--timing dtype=float32|bfloat16",
    "--runs": "--timing runs=N",
    "--threads": "--timing threads=T",
    "--host-memory": "--timing host_memory=system|cached",
    "--latency-table": "--timing table=FILE",
}


class _Renamed(argparse.Action):
    """An old flag: one line naming its new spelling, exit 2."""

    def __call__(self, parser: argparse.ArgumentParser, namespace: argparse.Namespace, *_: Any, **__: Any) -> None:
        flag = self.option_strings[0]
        namespace.renamed = f"{flag} is now {RENAMED[flag]}"  # reported by mtprune.cli.main: one line, exit 2


def add_timing(p: argparse.ArgumentParser, when: str) -> None:
    """``--runtime`` and ``--timing`` (and the old flags, hidden, that name them)."""
    p.add_argument(
        "--runtime",
        default=None,
        metavar="R[,R…]",
        help=f"{when}: the runtime(s) nets are timed in — {', '.join(RUNTIMES)} (default eager; best: both "
        "layouts with and without BN folded, and ONNX Runtime where installed); several: each net in its fastest, "
        "ratios best against best",
    )
    p.add_argument(
        "--timing",
        nargs="+",
        default=[],
        metavar="KEY=VALUE|FILE",
        help=f"{when}: the rest of the timing — device=cpu|cuda, runs=N (paired rounds, ≥ 20; 20), threads=T, "
        "host_memory=system|cached (default cached with several runtimes where glibc allows it), "
        "dtype=float32|bfloat16, table=FILE (--round-to auto's timings); or a YAML file of these keys",
    )
    for flag in RENAMED:
        p.add_argument(flag, nargs="?", action=_Renamed, help=argparse.SUPPRESS)


def timing_of(runtime: str | None, items: list[str]) -> Timing:
    """The :class:`~mtprune.config.Timing` of ``--runtime`` and ``--timing`` (checked: one line for a bad key or
    value, naming it)."""
    data: dict[str, Any] = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep:
            data.update(_timing_file(Path(item)))
            continue
        data[key.strip()] = safe_yaml(value) if value.strip() else None
    if runtime is not None:
        data["runtime"] = runtime
    names = {f.name for f in fields(Timing)}
    bad = [k for k in data if k not in names]
    if bad:
        raise UsageError(f"--timing {bad[0]}: unknown key (known: {', '.join(sorted(names))})")
    return make_timing(data, "--timing ")


def _timing_file(path: Path) -> dict[str, Any]:
    try:
        data = safe_yaml(path.read_text(encoding="utf-8"))
    except OSError as e:
        raise UsageError(f"--timing {path}: not KEY=VALUE and not a readable file ({e.strerror})") from None
    if not isinstance(data, dict):
        raise UsageError(f"--timing {path}: not a mapping of timing keys")
    return data
