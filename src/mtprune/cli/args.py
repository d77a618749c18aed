"""Argument types and checks the commands share: one line and exit 2 for a bad value, before any work."""

from __future__ import annotations

import argparse
import contextlib
import shutil
from collections.abc import Iterator
from pathlib import Path

from mtprune.errors import UsageError
from mtprune.io import LOCK_FILE, folder_lock


def positive_int(text: str) -> int:
    """An integer ≥ 1 (image sizes, counts)."""
    try:
        v = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"invalid value '{text}' (a positive integer)") from None
    if v < 1:
        raise argparse.ArgumentTypeError(f"{text} must be a positive integer")
    return v


#: the files whose presence makes a folder one mtprune wrote (a checkpoint, a stage or run folder): the only
#: kind ``--overwrite`` clears
OURS = ("arch.json", "model.safetensors", "plan.json", "done.json", "recipe.json", "results.json", "config.yaml")


def _held(path: Path) -> list[str]:
    return sorted(p.name for p in path.iterdir() if p.name != LOCK_FILE) if path.is_dir() else []


def check_out(path: str | Path, overwrite: bool) -> Path:
    """``--out`` for a command that writes a whole checkpoint, checked before any work: a new or empty folder,
    or (``--overwrite``) a folder mtprune wrote. A regular file there, a folder holding other files without
    ``--overwrite``, or a folder mtprune did not write (``precious.txt``) is refused in one line."""
    path = Path(path)
    if path.exists() and not path.is_dir():
        raise UsageError(f"--out {path}: exists and is not a folder")
    held = _held(path)
    shown = ", ".join(held[:3]) + (" …" if len(held) > 3 else "")
    if held and not overwrite:
        raise UsageError(f"--out {path}: the folder is not empty ({shown}); pass --overwrite to replace it")
    if held and not any((path / f).is_file() for f in OURS) and not (path / "model" / "arch.json").is_file():
        raise UsageError(
            f"--out {path}: not an mtprune checkpoint or run folder ({shown}); --overwrite only clears those"
        )
    return path


@contextlib.contextmanager
def claim_out(path: str | Path, overwrite: bool) -> Iterator[Path]:
    """Hold ``--out``'s writer lock for the block (another writer — a live ``mtprune train``, another
    ``prune`` — makes it one line and touches nothing), re-check it (:func:`check_out`) and clear it."""
    path = check_out(path, overwrite)
    with folder_lock(path):
        for name in _held(check_out(path, overwrite)):
            p = path / name
            shutil.rmtree(p) if p.is_dir() and not p.is_symlink() else p.unlink()
        yield path
