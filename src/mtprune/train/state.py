"""Resumable training state in one safetensors file: tensors + a JSON document in its metadata.

Holds the models' weights and buffers, the optimisers' momentum buffers and settings, the RNG states,
the data streams' positions, the step, and whatever a stage adds (the ALM multipliers E and μ). One file
written atomically (temp + rename), so an interrupted save leaves the previous checkpoint intact; no
pickle is involved in reading it back.
"""

from __future__ import annotations

import json
import os
import random
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import numpy as np
import torch
from safetensors import SafetensorError, safe_open

from mtprune.errors import CheckpointError, MtpruneError, UsageError
from mtprune.io import save_tensors

META_KEY = "mtprune_state"


def save_state(path: str | os.PathLike, tensors: dict[str, torch.Tensor], meta: dict[str, Any]) -> None:
    save_tensors(path, tensors, {META_KEY: json.dumps(meta)})


def load_state(path: str | os.PathLike) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    path = Path(path)
    try:
        with safe_open(str(path), framework="pt", device="cpu") as f:
            meta = json.loads((f.metadata() or {})[META_KEY])
            tensors = {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118 - safe_open is not a dict
    except (SafetensorError, OSError, KeyError, json.JSONDecodeError) as e:
        raise CheckpointError(f"{path}: unreadable training state ({type(e).__name__}: {e})") from None
    return tensors, meta


# --- pieces ----------------------------------------------------------------------------------------
def module_tensors(prefix: str, module: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {f"{prefix}.{k}": v for k, v in module.state_dict().items()}


def load_module_tensors(prefix: str, module: torch.nn.Module, tensors: dict[str, torch.Tensor]) -> None:
    sd = {k[len(prefix) + 1 :]: v for k, v in tensors.items() if k.startswith(prefix + ".")}
    missing = set(module.state_dict()) - set(sd)
    if missing:
        raise CheckpointError(f"training state lacks '{prefix}.{sorted(missing)[0]}'")
    module.load_state_dict(sd, strict=True)


def optimizer_state(prefix: str, opt: torch.optim.Optimizer) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    sd = opt.state_dict()
    tensors = {}
    for idx, st in sd["state"].items():
        for k, v in st.items():
            if isinstance(v, torch.Tensor):
                tensors[f"{prefix}.{idx}.{k}"] = v
    return tensors, {"param_groups": sd["param_groups"]}


def load_optimizer_state(
    prefix: str, opt: torch.optim.Optimizer, tensors: dict[str, torch.Tensor], meta: dict[str, Any]
) -> None:
    state: dict[int, dict[str, torch.Tensor]] = {}
    for key, v in tensors.items():
        if key.startswith(prefix + "."):
            idx, name = key[len(prefix) + 1 :].split(".", 1)
            state.setdefault(int(idx), {})[name] = v
    opt.load_state_dict({"state": state, "param_groups": meta["param_groups"]})


def rng_state() -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    tensors = {"rng.torch": torch.get_rng_state()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        for i, s in enumerate(torch.cuda.get_rng_state_all()):
            tensors[f"rng.cuda.{i}"] = s
    py = random.getstate()
    np_state = np.random.get_state()
    meta = {
        "python": [py[0], list(py[1]), py[2]],
        "numpy": [np_state[0], np_state[1].tolist(), int(np_state[2]), int(np_state[3]), float(np_state[4])],
    }
    return tensors, meta


def set_rng_state(tensors: dict[str, torch.Tensor], meta: dict[str, Any]) -> None:
    torch.set_rng_state(tensors["rng.torch"])
    cuda = [tensors[k] for k in sorted(k for k in tensors if k.startswith("rng.cuda."))]
    if cuda and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(cuda)
    py = meta["python"]
    random.setstate((py[0], tuple(py[1]), py[2]))
    n = meta["numpy"]
    np.random.set_state((n[0], np.array(n[1], dtype=np.uint32), n[2], n[3], n[4]))


class NonFiniteError(MtpruneError):
    """Training produced an inf or NaN in a weight, a buffer or an optimiser state."""


def first_non_finite(tensors: dict[str, torch.Tensor]) -> str | None:
    """The name of the first floating-point tensor holding an inf or NaN, or None."""
    for name, t in tensors.items():
        if t.is_floating_point() and not bool(torch.isfinite(t).all()):
            return name
    return None


class Stateful(Protocol):
    """Extra state a stage keeps across a resume (the ALM multipliers E and μ of ``sparse-mtp``)."""

    def state_tensors(self) -> dict[str, torch.Tensor]: ...

    def state_meta(self) -> dict[str, Any]: ...

    def load_state(self, tensors: dict[str, torch.Tensor], meta: dict[str, Any]) -> None: ...


class StreamState(Protocol):
    def state_dict(self) -> dict[str, int]: ...

    def load_state_dict(self, state: dict[str, int]) -> None: ...


@dataclass
class Checkpointer:
    """Everything a stage needs to resume, in one ``state.safetensors``: its modules (by prefix), optimisers,
    data streams' positions, the RNG states, the step, and a :class:`Stateful` extra."""

    path: Path
    stage: str
    modules: dict[str, torch.nn.Module] = field(default_factory=dict)
    optimizers: dict[str, torch.optim.Optimizer] = field(default_factory=dict)
    streams: dict[str, StreamState] = field(default_factory=dict)
    extra: Stateful | None = None

    def save(self, step: int, total: int) -> None:
        """Write the state of ``step`` (of ``total``) atomically (the caller decides which rank writes).
        Raises :class:`NonFiniteError` naming the first tensor with an inf or NaN, writing nothing."""
        tensors: dict[str, torch.Tensor] = {}
        meta: dict[str, Any] = {"stage": self.stage, "step": step, "total": total, "optimizers": {}}
        for name, m in self.modules.items():
            tensors.update(module_tensors(name, m))
        for name, opt in self.optimizers.items():
            t, meta["optimizers"][name] = optimizer_state(f"optim.{name}", opt)
            tensors.update(t)
        meta["streams"] = {n: s.state_dict() for n, s in self.streams.items()}
        rt, meta["rng"] = rng_state()
        tensors.update(rt)
        if self.extra is not None:
            tensors.update(self.extra.state_tensors())
            meta["extra"] = self.extra.state_meta()
        bad = first_non_finite(tensors)
        if bad is not None:
            raise NonFiniteError(f"tensor '{bad}' is not finite (inf or NaN)")
        save_state(self.path, tensors, meta)

    def restore(self) -> int:
        """Load the saved state into the tracked objects; returns its step."""
        tensors, meta = load_state(self.path)
        if meta.get("stage") != self.stage:
            raise UsageError(f"{self.path}: state of stage '{meta.get('stage')}', not '{self.stage}'")
        for name, m in self.modules.items():
            load_module_tensors(name, m, tensors)
        for name, opt in self.optimizers.items():
            load_optimizer_state(f"optim.{name}", opt, tensors, meta["optimizers"][name])
        for name, s in self.streams.items():
            s.load_state_dict(meta["streams"][name])
        set_rng_state(tensors, meta["rng"])
        if self.extra is not None:
            self.extra.load_state(tensors, meta.get("extra", {}))
        return int(meta["step"])
