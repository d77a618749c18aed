"""``mtprune init --weights FILE``: a trained state dict of a whole model, loaded strictly, never unpickled."""

from __future__ import annotations

import os
from pathlib import Path

import torch
from torch import nn

from mtprune.errors import UsageError


def _read(path: Path) -> dict[str, torch.Tensor]:
    try:
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file

            state = load_file(str(path))
        else:  # a torchvision-style .pth: tensors only (weights_only refuses arbitrary objects)
            state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # truncated, corrupt, or holding objects weights_only refuses
        msg = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise UsageError(f"{path}: cannot read a state dict ({msg})") from None
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
    if extra:
        raise UsageError(f"{path}: unexpected tensor '{extra[0]}' (not in the model)")
    with torch.no_grad():
        target.load_state_dict(state, strict=True)
