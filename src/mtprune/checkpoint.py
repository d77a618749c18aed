"""Model checkpoints: a directory with ``arch.json`` + ``model.safetensors``. No pickle anywhere.

``arch.json`` holds the dense model's constructor arguments (model name, classes, width), the channel
counts of every module that pruning changed (``channels``: module name → ``[in, out]`` or ``[n]``), the
mtprune version and free-form ``meta``. :func:`load_model` builds the dense model, resizes the pruned
modules, checks every tensor of the file against the result (name and shape) and loads the weights; a
directory copied elsewhere loads the same. Every file is written atomically (temp file + rename), the
weights before ``arch.json``, so an interrupted save never leaves an ``arch.json`` describing weights
that are not there.
"""

from __future__ import annotations

import contextlib
import json
import os
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError, safe_open

from mtprune.errors import CheckpointError, MtpruneError, UsageError
from mtprune.io import ensure_dir, read_json, save_tensors, write_json, write_text
from mtprune.models import build_model
from mtprune.models.base import SegmentationModel
from mtprune.models.shapes import module_shapes, resize_modules
from mtprune.models.specs import adopt_named_code, named_code, ran_here
from mtprune.version import __version__

ARCH_FILE = "arch.json"
WEIGHTS_FILE = "model.safetensors"
#: the γ a sparse-mtp stage stores beside its model for pruning (γ1 of W1, γ2 of W2)
SCORES_FILE = "scores.safetensors"
FORMAT = "mtprune-model"


def pruned_shapes(model: SegmentationModel) -> dict[str, list[int]]:
    """Channel counts of the modules of ``model`` that differ from its dense architecture."""
    with torch.device("meta"):
        dense = _build(model.arch(), getattr(model, "source_file", None))
    ref = module_shapes(dense)
    return {k: v for k, v in module_shapes(model).items() if ref.get(k) != v}


#: the copy of a ``python:`` model's factory file a checkpoint carries (it is the user's code: it runs on load)
MODEL_SOURCE_FILE = "model_src.py"
#: the environment variable that consents to running the code checkpoints carry (as ``--trust-code``)
TRUST_CODE_ENV = "MTPRUNE_TRUST_CODE"
_trust_code = False  # --trust-code of the running command (trusting_code)


@contextlib.contextmanager
def trusting_code(trust: bool = True) -> Iterator[None]:
    """Consent, inside the block, to running the code a checkpoint carries (the CLI's ``--trust-code``)."""
    global _trust_code
    before, _trust_code = _trust_code, bool(trust) or _trust_code
    try:
        yield
    finally:
        _trust_code = before


@dataclass(frozen=True)
class Consent:
    """What this process consented to — ``--trust-code``, and the code files the user named (their
    checkpoints' copies need no more consent) — handed to a process it starts (:func:`adopt_consent`)."""

    trust_code: bool
    named_code: frozenset[str]


def current_consent() -> Consent:
    return Consent(_trust_code, named_code())


def adopt_consent(consent: Consent) -> None:
    """In a process started by another: its consent, for the rest of this process."""
    global _trust_code
    _trust_code = _trust_code or consent.trust_code
    adopt_named_code(consent.named_code)


def check_code_consent(source: Path, trust_code: bool = False) -> None:
    """One line refusing to run a checkpoint's ``model_src.py`` unless the user consented: ``trust_code``,
    ``--trust-code`` (:func:`trusting_code`), ``MTPRUNE_TRUST_CODE=1``, or the same code already ran in this
    process because the user named its file (a run's own checkpoints)."""
    if trust_code or _trust_code or os.environ.get(TRUST_CODE_ENV) == "1" or ran_here(source):
        return
    raise UsageError(
        f"{source}: the checkpoint carries Python code (its model's factory) that runs when it loads; if you "
        f"trust it, pass --trust-code (API: trust_code=True; or {TRUST_CODE_ENV}=1)"
    )


def _build(arch: dict[str, Any], source: Path | None = None) -> SegmentationModel:
    """The dense model an ``arch.json`` (or ``model.arch()``) describes (``source``: its factory's file)."""
    return build_model(
        arch["model"],
        int(arch["num_classes"]),
        int(arch["cls_classes"]),
        float(arch["width"]),
        model_args=arch.get("model_args"),
        parts=arch.get("parts"),
        source=source,
        coupled=arch.get("coupled", "skip"),
    )


def save_model(model: SegmentationModel, directory: str | os.PathLike, meta: dict[str, Any] | None = None) -> Path:
    """Write ``model`` (dense or pruned) to ``directory`` as ``arch.json`` + ``model.safetensors``."""
    directory = ensure_dir(directory)
    arch = {
        "format": FORMAT,
        "mtprune_version": __version__,
        **model.arch(),
        "channels": pruned_shapes(model),
        "meta": meta or {},
    }
    save_tensors(directory / WEIGHTS_FILE, model.state_dict(), {"format": FORMAT, "model": model.name})
    source = getattr(model, "source_file", None)
    if source is not None:  # the factory goes with the weights: the checkpoint loads without the original file
        write_text(directory / MODEL_SOURCE_FILE, Path(source).read_text())
    write_json(directory / ARCH_FILE, arch)
    return directory


def resolve_checkpoint(path: str | os.PathLike) -> Path:
    """A model directory, or a stage output folder holding one in ``model/`` (``mtprune train`` writes those)."""
    path = Path(path)
    if not (path / ARCH_FILE).is_file() and (path / "model" / ARCH_FILE).is_file():
        return path / "model"
    return path


def read_arch(directory: str | os.PathLike) -> dict[str, Any]:
    """Read and validate ``DIR/arch.json``."""
    directory = Path(directory)
    if not directory.is_dir():
        raise CheckpointError(f"{directory}: checkpoint directory not found")
    path = directory / ARCH_FILE
    if not path.is_file():
        raise CheckpointError(f"{path}: not found ({directory} is not an mtprune checkpoint)")
    try:
        arch = read_json(path)
    except MtpruneError as e:
        raise CheckpointError(str(e)) from None
    if not isinstance(arch, dict) or arch.get("format") != FORMAT:
        raise CheckpointError(f"{path}: not an mtprune model description (format '{FORMAT}' expected)")
    for key, kind in (("model", str), ("num_classes", int), ("cls_classes", int), ("width", (int, float))):
        if key not in arch:
            raise CheckpointError(f"{path}: key '{key}' missing")
        value = arch[key]
        if not isinstance(value, kind) or isinstance(value, bool) or (kind is int and value < 1):
            raise CheckpointError(f"{path}: '{key}' is {json.dumps(value)}, not a {_KIND[key]}")
    channels = arch.get("channels", {})
    if not isinstance(channels, dict) or not all(
        isinstance(v, list) and 1 <= len(v) <= 2 and all(type(c) is int and c >= 1 for c in v)
        for v in channels.values()
    ):
        raise CheckpointError(f"{path}: 'channels' must map module names to lists of positive channel counts")
    if not isinstance(arch.get("model_args", {}), dict):
        raise CheckpointError(f"{path}: 'model_args' must be an object (the builder's keyword arguments)")
    parts = arch.get("parts", {})
    if not isinstance(parts, dict) or not all(
        isinstance(v, list) and all(isinstance(n, str) for n in v) for v in parts.values()
    ):
        raise CheckpointError(f"{path}: 'parts' must map backbone / decoder to lists of module names")
    return arch


_KIND = {"model": "model name", "num_classes": "positive integer", "cls_classes": "positive integer", "width": "number"}


def _as_expected(t: torch.Tensor, ref: torch.Tensor, name: str, path: Path, cast: set[str]) -> torch.Tensor:
    """``t`` in ``ref``'s dtype: another floating dtype is cast (and named in ``cast``); anything else is one
    line naming the tensor and its dtype."""
    if t.dtype == ref.dtype:
        return t
    if t.is_floating_point() and ref.is_floating_point():
        cast.add(str(t.dtype).removeprefix("torch."))
        return t.to(ref.dtype)
    have, want = str(t.dtype).removeprefix("torch."), str(ref.dtype).removeprefix("torch.")
    raise CheckpointError(f"{path}: tensor '{name}' is {have}, {want} expected")


def load_model(
    directory: str | os.PathLike, device: str | torch.device = "cpu", trust_code: bool = False
) -> SegmentationModel:
    """Rebuild the model described by ``DIR/arch.json`` and load ``DIR/model.safetensors`` into it.

    ``DIR`` may also be a stage output folder of ``mtprune train`` (its final model is in ``DIR/model``).
    A ``python:`` model is built from the checkpoint's own ``model_src.py`` only (never a file ``arch.json``
    names), and only with consent (``trust_code``, see :func:`check_code_consent`): loading runs that code.

    The model is returned in eval mode (call ``.train()`` to train it). Raises :class:`CheckpointError`
    naming the first tensor whose name or shape does not fit the
    architecture, or the file when it is truncated or corrupt.
    """
    directory = resolve_checkpoint(directory)
    arch = read_arch(directory)
    source = directory / MODEL_SOURCE_FILE
    if arch["model"].startswith("python:"):
        if not source.is_file():
            raise CheckpointError(
                f"{directory / ARCH_FILE}: names Python code ({arch['model']}) but {directory} carries no "
                f"{MODEL_SOURCE_FILE}: a checkpoint runs no code but its own"
            )
        check_code_consent(source, trust_code)
    try:
        with torch.device("meta"):
            model = _build(arch, source if arch["model"].startswith("python:") else None)
            resize_modules(model, {k: list(v) for k, v in arch.get("channels", {}).items()})
    except MtpruneError as e:
        raise CheckpointError(f"{directory / ARCH_FILE}: {e}") from None
    expected = model.state_dict()
    wpath = directory / WEIGHTS_FILE
    if not wpath.is_file():
        raise CheckpointError(f"{wpath}: weights file not found")
    state: dict[str, torch.Tensor] = {}
    try:
        with safe_open(str(wpath), framework="pt", device="cpu") as f:
            keys = set(f.keys())
            for name, ref in expected.items():
                if name not in keys:
                    raise CheckpointError(f"{wpath}: tensor '{name}' of {arch['model']} is missing from the file")
                shape = tuple(f.get_slice(name).get_shape())
                if shape != tuple(ref.shape):
                    raise CheckpointError(
                        f"{wpath}: tensor '{name}' has shape {shape}, arch.json expects {tuple(ref.shape)}"
                    )
            extra = sorted(keys - set(expected))
            if extra:
                raise CheckpointError(f"{wpath}: unexpected tensor '{extra[0]}' (not part of {arch['model']})")
            cast: set[str] = set()
            for name, ref in expected.items():  # copied: a tensor read from the file may be only 8-byte
                state[name] = _as_expected(f.get_tensor(name), ref, name, wpath, cast).clone()  # aligned
            if cast:
                print(f"note: {wpath}: {', '.join(sorted(cast))} weights cast to float32", file=sys.stderr)
    except (SafetensorError, OSError, RuntimeError, ValueError) as e:
        msg = str(e).splitlines()[0] if str(e) else type(e).__name__
        raise CheckpointError(f"{wpath}: truncated or corrupt weights file ({msg})") from None
    model.load_state_dict(state, strict=True, assign=True)
    return model.to(device).eval()
