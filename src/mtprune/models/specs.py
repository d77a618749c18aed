"""Model specs beyond the built-in names: ``torchvision:NAME``, ``smp:ARCH`` and ``python:FILE.py:FUNCTION``.

- ``torchvision:NAME`` — a builder of :mod:`torchvision.models.segmentation` (``fcn_resnet50``,
  ``deeplabv3_resnet50``, ``deeplabv3_mobilenet_v3_large``, ``lraspp_mobilenet_v3_large`` …), built with
  ``weights=None, weights_backbone=None`` (nothing is downloaded) and ``model_args`` (e.g. ``aux_loss``).
  Parts: ``backbone``; ``classifier`` (+ ``aux_classifier`` when the builder made one).
- ``smp:ARCH`` — ``segmentation_models_pytorch.create_model(ARCH, encoder_weights=None, classes=…,
  **model_args)`` (the optional ``smp`` extra; e.g. ``{"encoder_name": "resnet18"}``). Parts: ``encoder``;
  ``decoder`` + ``segmentation_head`` (+ ``classification_head`` with ``aux_params``).
- ``python:FILE.py:FUNCTION`` or ``python:package.module:FUNCTION`` — the user's factory,
  ``FUNCTION(num_classes, **model_args) -> nn.Module``. Parts as given, or found: a ``backbone`` or
  ``encoder`` child is the backbone and every other child with parameters is the decoder.
"""

from __future__ import annotations

import hashlib
import importlib
import importlib.util
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from torch import nn

from mtprune.errors import UsageError
from mtprune.models.base import BACKBONE, DECODER
from mtprune.models.generic import WrappedSegmentationModel

KINDS = ("torchvision", "smp", "python")

#: SHA-256 of the factory files this process ran because the user named them (not a checkpoint's copy): a
#: checkpoint carrying the same code needs no further consent here (mtprune.checkpoint.load_model)
_TRUSTED: set[str] = set()


def code_digest(path: Path) -> str:
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


def ran_here(path: Path) -> bool:
    """Whether this process already ran the code in ``path`` because the user named its file or module."""
    return code_digest(path) in _TRUSTED


def named_code() -> frozenset[str]:
    """The digests of the code files this process ran because the user named them (:func:`ran_here`)."""
    return frozenset(_TRUSTED)


def adopt_named_code(digests: frozenset[str]) -> None:
    """Count ``digests`` as named by the user here too: a process started by one that ran them."""
    _TRUSTED.update(digests)


def is_spec(name: str) -> bool:
    """``name`` is a ``kind:…`` spec (not a built-in name)."""
    return name.split(":", 1)[0] in KINDS and ":" in name


def _torchvision(name: str, num_classes: int, args: dict[str, Any]) -> tuple[nn.Module, dict[str, list[str]]]:
    from torchvision import models
    from torchvision.models import segmentation

    builders = sorted(models.list_models(module=segmentation))
    if name not in builders:
        raise UsageError(f"torchvision:{name}: not a torchvision segmentation builder ({', '.join(builders)})")
    kwargs = {"weights": None, "weights_backbone": None, **args, "num_classes": num_classes}
    try:
        net = models.get_model(name, **kwargs)
    except (TypeError, ValueError) as e:
        raise UsageError(f"torchvision:{name}: {e}") from None
    decoder = ["classifier"] + (["aux_classifier"] if getattr(net, "aux_classifier", None) is not None else [])
    return net, {BACKBONE: ["backbone"], DECODER: decoder}


def _smp(arch: str, num_classes: int, args: dict[str, Any]) -> tuple[nn.Module, dict[str, list[str]]]:
    try:
        import segmentation_models_pytorch as smp
    except ImportError:
        raise UsageError(
            f"smp:{arch}: segmentation_models_pytorch is not installed (pip install 'mtprune[smp]')"
        ) from None
    if args.get("encoder_weights") is not None:
        raise UsageError(f"smp:{arch}: encoder_weights must be null (nothing is downloaded; use init --weights)")
    kwargs = {**args, "encoder_weights": None, "classes": num_classes}
    try:
        net = smp.create_model(arch, **kwargs)
    except (KeyError, TypeError, ValueError) as e:
        raise UsageError(f"smp:{arch}: {str(e).strip(chr(39))}") from None
    decoder = ["decoder", "segmentation_head"]
    if getattr(net, "classification_head", None) is not None:
        decoder.append("classification_head")
    return net, {BACKBONE: ["encoder"], DECODER: decoder}


def _load_factory(target: str, source: Path | None = None) -> tuple[Any, Path | None]:
    """``FILE.py:FUNCTION`` or ``package.module:FUNCTION`` → the function and the file that defines it;
    ``source``: read the function from this file instead (a checkpoint's copy, ``model_src.py``)."""
    where, _, func = target.rpartition(":")
    if not where or not func:
        raise UsageError(f"python:{target}: expected python:FILE.py:FUNCTION or python:package.module:FUNCTION")
    if source is not None:
        where = str(source)
    if where.endswith(".py"):
        path = Path(where)
        if not path.is_file():
            raise UsageError(f"python:{target}: file {path} not found")
        tag = hashlib.sha256(str(path.resolve()).encode()).hexdigest()[:12]
        spec = importlib.util.spec_from_file_location(f"mtprune_user_{path.stem}_{tag}", path)
        assert spec is not None and spec.loader is not None
        module = importlib.util.module_from_spec(spec)
        sys.modules[spec.name] = module
        try:
            spec.loader.exec_module(module)
        except Exception as e:  # the user's code: any failure is theirs, said in one line
            raise UsageError(f"python:{target}: importing {path} failed: {type(e).__name__}: {e}") from None
    else:
        try:
            module = importlib.import_module(where)
        except ImportError as e:
            raise UsageError(f"python:{target}: cannot import {where}: {e}") from None
    fn = getattr(module, func, None)
    if not callable(fn):
        raise UsageError(f"python:{target}: {where} has no function '{func}'")
    file = getattr(module, "__file__", None)
    if file and source is None:  # the user named this code: its checkpoints' copies are theirs
        _TRUSTED.add(code_digest(Path(file)))
    return fn, Path(file) if file else None


def found_parts(net: nn.Module, spec: str) -> dict[str, list[str]]:
    """A ``backbone`` (or ``encoder``) child as the backbone, the other children with parameters as the
    decoder; one line saying what to pass otherwise."""
    children = dict(net.named_children())
    trunk = next((n for n in ("backbone", "encoder") if n in children), None)
    if trunk is None:
        raise UsageError(
            f"{spec}: the model has no 'backbone' or 'encoder' child (children: {', '.join(children)}); "
            "pass --parts backbone=MODULE decoder=MODULE[,MODULE…]"
        )
    rest = [n for n, m in children.items() if n != trunk and any(True for _ in m.parameters())]
    if not rest:
        raise UsageError(f"{spec}: no module besides '{trunk}' has parameters: pass --parts … decoder=MODULE")
    return {BACKBONE: [trunk], DECODER: rest}


def _python(
    target: str, num_classes: int, args: dict[str, Any], source: Path | None
) -> tuple[nn.Module, dict[str, list[str]] | None, Path | None]:
    fn, file = _load_factory(target, source)
    try:
        net = fn(num_classes, **args)
    except Exception as e:  # the user's code
        raise UsageError(f"python:{target}({num_classes}, **{args}) failed: {type(e).__name__}: {e}") from None
    if not isinstance(net, nn.Module):
        raise UsageError(f"python:{target} returned {type(net).__name__}, not an nn.Module")
    return net, None, file


def build_spec(
    spec: str,
    num_classes: int,
    cls_classes: int,
    model_args: dict[str, Any] | None = None,
    parts: dict[str, Sequence[str]] | None = None,
    source: Path | None = None,
    coupled: str = "skip",
) -> WrappedSegmentationModel:
    """The model named by ``spec`` (see the module docstring), wrapped with its parts; ``source``: for a
    ``python:`` spec, the file to take the factory from (a checkpoint's ``model_src.py``)."""
    kind, _, rest = spec.partition(":")
    args = dict(model_args or {})
    file = None
    if kind == "torchvision":
        net, default = _torchvision(rest, num_classes, args)
    elif kind == "smp":
        net, default = _smp(rest, num_classes, args)
    elif kind == "python":
        net, default, file = _python(rest, num_classes, args, source)
    else:
        raise UsageError(f"unknown model kind '{kind}' in '{spec}' ({', '.join(KINDS)})")
    chosen = {k: list(v) for k, v in parts.items()} if parts else default or found_parts(net, spec)
    pad_to = net.encoder.output_stride if getattr(net, "requires_divisible_input_shape", False) else 1  # smp's
    model = WrappedSegmentationModel(net, spec, num_classes, cls_classes, chosen, args, coupled, pad_to)
    model.source_file = file
    return model
