"""Argument types and checks the commands share: one line and exit 2 for a bad value, before any work."""

from __future__ import annotations

import argparse
import shutil
from pathlib import Path

from mtprune.errors import UsageError
from mtprune.io import LOCK_FILE


def positive_int(text: str) -> int:
    """An integer ≥ 1 (image sizes, counts)."""
    try:
        v = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"invalid value '{text}' (a positive integer)") from None
    if v < 1:
        raise argparse.ArgumentTypeError(f"{text} must be a positive integer")
    return v


def fresh_out(path: str | Path, overwrite: bool) -> Path:
    """``--out`` for a command that writes a whole checkpoint: a new or empty folder, or (``--overwrite``)
    an existing one, cleared first. A regular file there, or a folder holding other files, is refused."""
    path = Path(path)
    if path.exists() and not path.is_dir():
        raise UsageError(f"--out {path}: exists and is not a folder")
    held = sorted(p.name for p in path.iterdir() if p.name != LOCK_FILE) if path.is_dir() else []
    if held and not overwrite:
        shown = ", ".join(held[:3]) + (" …" if len(held) > 3 else "")
        raise UsageError(f"--out {path}: the folder is not empty ({shown}); pass --overwrite to replace it")
    for name in held:
        p = path / name
        shutil.rmtree(p) if p.is_dir() and not p.is_symlink() else p.unlink()
    return path
