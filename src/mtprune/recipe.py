"""What a stage folder was made from, checked before a finished or interrupted stage is reused.

Every stage (``mtprune train`` and each stage of ``mtprune run``) writes ``recipe.json`` into its
folder when it starts: the configuration keys that decide its result (:data:`STAGE_KEYS`) and the
identity of the model it started from (:func:`input_id`: the digest of the source stage's own recipe,
so a change anywhere upstream changes every stage downstream). Rerunning a command on the same folder
reuses a finished stage and resumes an interrupted one only when the recipe is the same; otherwise it
stops with one line naming the stage folder and the keys that differ, and touches nothing.

Not part of a recipe: what changes how fast a stage runs or what it logs, never what it computes
(``device``, ``data.workers``, ``checkpoint_every``, ``log_every``, ``optim.channels_last``,
``optim.cudnn_benchmark``, the ``run`` section outside pruning), where the data lives (``data.seg.root``,
``data.cls.root``: a run may resume on a machine that mounts the data elsewhere), and ``data.skip_bad``
(rerunning with ``--skip-bad`` is how a stage stopped by a bad sample goes on; ``done.json`` counts
the samples it skipped).
Folders written before recipes existed (no ``recipe.json``) are reused as before.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Any

from mtprune.checkpoint import resolve_checkpoint
from mtprune.config import Config, config_to_dict
from mtprune.errors import UsageError
from mtprune.io import read_json, write_json

RECIPE_FILE = "recipe.json"

#: keys in the recipe of every training stage
COMMON_KEYS = ("seed", "model", "optim")
#: the keys each training stage adds (its own section and the data it trains on)
STAGE_KEYS: dict[str, tuple[str, ...]] = {
    "pretrain-cls": ("data.cls", "pretrain_cls"),
    "train-seg": ("data.seg", "train_seg"),
    "sparse-mtp": ("data.cls", "data.seg", "sparse_mtp"),
    "sparse-slimming": ("data.seg", "sparse_slimming"),
    "finetune": ("data.cls", "data.seg", "finetune"),
}
#: keys that never change a result (speed, logging, data location)
IGNORED_KEYS = frozenset(
    {"optim.channels_last", "optim.cudnn_benchmark", "data.seg.root", "data.cls.root", "data.workers"}
)


def _flat(value: Any, prefix: str, out: dict[str, Any]) -> None:
    if isinstance(value, dict) and not prefix.endswith("options"):
        for k, v in value.items():
            _flat(v, f"{prefix}.{k}" if prefix else str(k), out)
    elif prefix not in IGNORED_KEYS:
        out[prefix] = value


def config_keys(cfg: Config, keys: tuple[str, ...]) -> dict[str, Any]:
    """The flattened (``a.b.c`` → value) configuration under each of ``keys``, minus :data:`IGNORED_KEYS`."""
    full = config_to_dict(cfg)
    out: dict[str, Any] = {}
    for key in keys:
        node: Any = full
        for part in key.split("."):
            node = node[part]
        _flat(node, key, out)
    return json.loads(json.dumps(out))  # tuples → lists, as they read back from recipe.json


def _defaults() -> dict[str, Any]:
    """Every configuration key's default value, flattened."""
    out: dict[str, Any] = {}
    _flat(config_to_dict(Config()), "", out)
    return json.loads(json.dumps(out))


def digest(recipe: dict[str, Any]) -> str:
    """A short, stable hash of a recipe (sorted-key JSON)."""
    return hashlib.sha256(json.dumps(recipe, sort_keys=True).encode()).hexdigest()[:16]


def input_id(path: str | os.PathLike | None) -> str | None:
    """Identity of the model a stage starts from: ``recipe:<digest>`` of a stage folder (or its
    ``model/``) that has a recipe, else ``sha256:<…>`` of the checkpoint's weights file; None for none."""
    if path is None:
        return None
    p = Path(path)
    for folder in (p, p.parent if p.name == "model" else None):
        if folder is not None and (folder / RECIPE_FILE).is_file():
            return "recipe:" + digest(read_json(folder / RECIPE_FILE))

    weights = resolve_checkpoint(p) / "model.safetensors"
    if not weights.is_file():
        return f"path:{p.name}"  # loading it will fail with its own error
    h = hashlib.sha256()
    with open(weights, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return "sha256:" + h.hexdigest()[:16]


def stage_recipe(stage: str, cfg: Config, init: str | os.PathLike | None = None) -> dict[str, Any]:
    """The recipe of training stage ``stage`` run with ``cfg`` from the model at ``init``."""
    return {
        "stage": stage,
        "input": input_id(init),
        "config": config_keys(cfg, COMMON_KEYS + STAGE_KEYS[stage]),
    }


def _show(v: Any) -> str:
    s = json.dumps(v)
    return s if len(s) <= 40 else s[:37] + "..."


def differences(old: dict[str, Any], new: dict[str, Any]) -> list[str]:
    """``key: old → new`` for every recipe entry that differs (config keys by their dotted name)."""
    out = []
    for key in ("stage", "input"):
        if old.get(key) != new.get(key):
            what = "its input model (the stage it starts from was made differently)" if key == "input" else key
            out.append(f"{what}: {_show(old.get(key))} → {_show(new.get(key))}")
    a, b, default = old.get("config", {}), new.get("config", {}), _defaults()
    for key in sorted(set(a) | set(b)):
        if key not in a and key in default and b.get(key) == default[key]:
            continue  # a key added since, at its default: the stage was made with what the default does
        if a.get(key, "<unset>") != b.get(key, "<unset>"):
            out.append(f"{key}: {_show(a.get(key, '<unset>'))} → {_show(b.get(key, '<unset>'))}")
    for key in sorted(set(old) | set(new)):
        if key not in ("stage", "input", "config") and old.get(key) != new.get(key):
            out.append(f"{key}: {_show(old.get(key))} → {_show(new.get(key))}")
    return out


def check_recipe(out: str | os.PathLike, recipe: dict[str, Any], has_work: bool) -> None:
    """Before reusing or resuming the stage in ``out``: refuse it if it was made with another recipe.

    ``has_work``: the folder holds something to reuse (``done.json`` or a resumable state); with nothing
    to reuse there is nothing to check. A different recipe raises :class:`~mtprune.errors.UsageError`
    naming the folder and the differing keys; a folder with work but no recipe (made before recipes
    existed) is accepted as it is."""
    out = Path(out)
    path = out / RECIPE_FILE
    if not has_work or not path.is_file():
        return
    diff = differences(read_json(path), json.loads(json.dumps(recipe)))
    if diff:
        more = f" (and {len(diff) - 3} more)" if len(diff) > 3 else ""
        raise UsageError(
            f"{out}: this stage was made with another recipe — {'; '.join(diff[:3])}{more}; "
            f"rerun with a new --out, or delete {out} to redo it"
        )


def write_recipe(out: str | os.PathLike, recipe: dict[str, Any]) -> None:
    """Write ``out/recipe.json`` (atomically) as a stage starts from nothing (rank 0 only)."""
    write_json(Path(out) / RECIPE_FILE, recipe)
