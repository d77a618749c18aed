"""``mtprune init --weights FILE``: a trained state dict of a whole model, loaded strictly, never unpickled."""

from __future__ import annotations

import os
import warnings
from pathlib import Path
from typing import Any

import torch
from torch import nn

from mtprune.errors import UsageError


def load_tensors(path: Path) -> Any:
    """``torch.load(path, weights_only=True)``: tensors only (a pickle payload is refused), torch's warnings
    about the file's pickle protocol kept off the one-line error path."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return torch.load(path, map_location="cpu", weights_only=True)


def first_line(e: BaseException) -> str:
    """An exception's message as one short line (torch's weights_only refusals run to ~8 lines)."""
    text = str(e).strip()
    return (text.splitlines()[0] if text else type(e).__name__)[:200]


def _read(path: Path) -> dict[str, torch.Tensor]:
    try:
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file

            state = load_file(str(path))
        else:  # a torchvision-style .pth: tensors only (weights_only refuses arbitrary objects)
            state = load_tensors(path)
    except Exception as e:  # truncated, corrupt, or holding objects weights_only refuses
        raise UsageError(f"{path}: cannot read a state dict ({first_line(e)})") from None
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise UsageError(f"{path}: not a state dict of tensors (name → tensor)")
    return state


def check_state(
    state: dict[str, torch.Tensor], expected: dict[str, torch.Tensor], path: Path, what: str, error: type = UsageError
) -> None:
    """Every tensor of ``expected`` (``what``'s state dict) is in ``state`` with its shape: else one line."""
    for name, ref in expected.items():
        if name not in state:
            raise error(f"{path}: tensor '{name}' of {what} is missing from the file")
        if tuple(state[name].shape) != tuple(ref.shape):
            raise error(
                f"{path}: tensor '{name}' has shape {tuple(state[name].shape)}, {what} expects {tuple(ref.shape)}"
            )


def load_weights(model: nn.Module, path: str | os.PathLike) -> None:
    """Load ``path`` into ``model``: into the wrapped net (its own tensor names, e.g. torchvision's) for a
    ``torchvision:``/``python:`` model, into the model itself for a built-in net. Strict: one line naming the
    first missing, unexpected or mis-shaped tensor."""
    path = Path(path)
    if not path.is_file():
        raise UsageError(f"{path}: weights file not found")
    state = _read(path)
    target = getattr(model, "_net", model)
    expected = target.state_dict()
    check_state(state, expected, path, "the model")
    extra = sorted(set(state) - set(expected))
    if extra and extra[0].startswith("aux_classifier."):  # torchvision's released DeepLabv3 / FCN weights
        raise UsageError(
            f"{path}: unexpected tensor '{extra[0]}': the weights have an auxiliary head; build the model with "
            """it: --model-args '{"aux_loss": true}' (model_args: {aux_loss: true})"""
        )
    if extra:
        raise UsageError(f"{path}: unexpected tensor '{extra[0]}' (not in the model)")
    with torch.no_grad():
        target.load_state_dict(state, strict=True)
