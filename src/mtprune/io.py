"""Atomic file writes (temp file in the same folder + ``os.replace``) and safe JSON/weights IO.

Every file mtprune writes goes through these helpers, so a run killed at any moment leaves either
the old file or the new one, never a half-written one; files get the mode the umask gives (0644 under
the usual umask), so a team can read a run. A write that fails (full disk, file-size limit, read-only
place) raises one :class:`~mtprune.errors.WriteError` line naming the file and the reason.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import json
import os
import re
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import save_file

from mtprune.errors import MtpruneError, UsageError, WriteError

#: the temp files of an interrupted write: ours (``.<name>.<random>.tmp``) and safetensors' (``.tmp<random>``)
TEMP_PATTERNS = (".*.tmp", ".tmp*")


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


FILE_MODE = 0o666 & ~_umask()  # what open() would give a new file

_REASONS = {
    errno.ENOSPC: "no space left on device",
    errno.EFBIG: "file too large (a file-size limit, e.g. ulimit -f)",
    errno.EDQUOT: "disk quota exceeded",
    errno.EROFS: "read-only file system",
    errno.EACCES: "permission denied",
}


def write_failure(e: BaseException) -> str | None:
    """Why a write failed, in words, for an ``OSError`` or a ``SafetensorError`` wrapping one (None: not an
    I/O failure)."""
    if isinstance(e, OSError):
        return _REASONS.get(e.errno or 0, e.strerror or str(e))
    if isinstance(e, SafetensorError):
        m = re.search(r"os error (\d+)|code: (\d+)", str(e))
        if m:
            code = int(m.group(1) or m.group(2))
            return _REASONS.get(code, os.strerror(code))
    return None


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary path next to ``path``; on success rename it over ``path`` atomically. A failed
    write raises :class:`WriteError` (``path`` itself untouched) and leaves no temp file."""
    path = Path(path)
    ensure_dir(path.parent)
    try:
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    except OSError as e:
        raise WriteError(f"{path.parent}: {write_failure(e)} (cannot write {path.name} there)") from None
    os.close(fd)
    tmp_path = Path(tmp)
    try:
        yield tmp_path
        os.chmod(tmp_path, FILE_MODE)
        os.replace(tmp_path, path)
    except (OSError, SafetensorError) as e:
        reason = write_failure(e)
        if reason is None:
            raise
        raise WriteError(f"{path.parent}: {reason} while writing {path.name}") from None
    finally:
        if tmp_path.exists():
            tmp_path.unlink()


def sweep_temp_files(folder: str | os.PathLike) -> list[Path]:
    """Remove the temp files interrupted writes left in ``folder`` (and its ``model/``); returns them.
    Only for a folder this process alone writes (a stage holding its lock)."""
    folder = Path(folder)
    found = [p for d in (folder, folder / "model") if d.is_dir() for pat in TEMP_PATTERNS for p in d.glob(pat)]
    for p in found:
        if p.is_file():
            p.unlink()
    return found


def ensure_dir(folder: str | os.PathLike) -> Path:
    """Create ``folder`` (and its parents) if needed; one :class:`WriteError` line when that is impossible
    (a regular file in the way, a read-only place, no permission)."""
    folder = Path(folder)
    if folder.exists() and not folder.is_dir():
        raise WriteError(f"{folder}: exists and is not a folder")
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise WriteError(f"{folder}: cannot create the folder ({write_failure(e)})") from None
    return folder


LOCK_FILE = ".lock"


def open_no_follow(path: Path, flags: int) -> int:
    """``os.open`` that never follows a symbolic link at ``path`` (``O_NOFOLLOW``): a link planted in a run
    folder (``.lock → victim``) is refused in one line instead of having its target truncated or appended to."""
    try:
        return os.open(path, flags | os.O_NOFOLLOW, FILE_MODE)
    except OSError as e:
        if e.errno == errno.ELOOP:
            raise UsageError(f"{path} is a symbolic link: mtprune never writes through one (remove it)") from None
        raise


class FolderBusy(MtpruneError):
    """Another process holds a folder's lock."""


@contextlib.contextmanager
def folder_lock(folder: str | os.PathLike) -> Iterator[None]:
    """Hold ``folder``'s writer lock (``folder/.lock``, an ``flock``) for the block: one writer per folder.

    Another holder — another process, or another lock of this one — makes it raise :class:`FolderBusy`
    naming the folder and the holder's pid, touching nothing. The operating system releases the lock
    when its process ends however it ends, so the lock of a killed process is simply taken over."""
    folder = ensure_dir(folder)
    try:
        fd = open_no_follow(folder / LOCK_FILE, os.O_RDWR | os.O_CREAT)
    except OSError as e:
        raise WriteError(f"{folder}: {write_failure(e)} (cannot take the folder's lock)") from None
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.pread(fd, 32, 0).decode(errors="replace").strip() or "?"
            raise FolderBusy(
                f"{folder}: in use by another mtprune process (pid {holder}); wait for it to end or use another --out"
            ) from None
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
        yield
    finally:
        os.close(fd)  # releases the flock


def write_text(path: str | os.PathLike, text: str) -> None:
    """Write ``text`` to ``path`` atomically."""
    with atomic_path(path) as tmp, open(tmp, "w", encoding="utf-8") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())


def write_json(path: str | os.PathLike, obj: Any) -> None:
    """Write ``obj`` as indented JSON to ``path`` atomically."""
    write_text(path, json.dumps(obj, indent=2, sort_keys=False) + "\n")


def append_line(path: str | os.PathLike, line: str) -> None:
    """Append ``line`` and a newline to ``path`` in one write; a write that fails or falls short is undone
    (the file is cut back to its old end), so the file only ever holds whole lines."""
    data = (line + "\n").encode("utf-8")
    path = Path(path)
    try:
        fd = open_no_follow(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT)
    except OSError as e:
        raise WriteError(f"{path.parent}: {write_failure(e)} while writing {path.name}") from None
    try:
        end = os.fstat(fd).st_size
        try:
            written = os.write(fd, data)
        except OSError as e:
            os.ftruncate(fd, end)
            raise WriteError(f"{path.parent}: {write_failure(e)} while writing {path.name}") from None
        if written != len(data):
            os.ftruncate(fd, end)
            raise WriteError(f"{path.parent}: no space left on device while writing {path.name}")
    finally:
        os.close(fd)


def read_lines(path: str | os.PathLike) -> tuple[list[dict[str, Any]], int]:
    """The JSON records of a JSON-lines file, and how many lines could not be read (a torn last line
    left by a crash or a full disk is dropped, not fatal)."""
    records, bad = [], 0
    for ln in Path(path).read_text(encoding="utf-8", errors="replace").splitlines():
        try:
            records.append(json.loads(ln))
        except json.JSONDecodeError:
            bad += 1
    return records, bad


def save_tensors(path: str | os.PathLike, tensors: dict[str, torch.Tensor], metadata: dict[str, str]) -> None:
    """Write a safetensors file atomically, its header in a fixed order (safetensors writes the metadata
    keys in a varying order), so identical tensors give an identical file."""
    tensors = {k: v.detach().contiguous().cpu() for k, v in tensors.items()}
    with atomic_path(path) as tmp:
        save_file(tensors, str(tmp), metadata=metadata)
        _sort_header_metadata(tmp)


def _sort_header_metadata(path: Path) -> None:
    """Rewrite the ``__metadata__`` of a safetensors header in sorted key order, in place (same length)."""
    with open(path, "r+b") as f:
        n = int.from_bytes(f.read(8), "little")
        raw = f.read(n)
        header = json.loads(raw)
        meta = header.get("__metadata__")
        if not meta or len(meta) < 2:
            return
        header["__metadata__"] = dict(sorted(meta.items()))
        new = json.dumps(header, separators=(",", ":"), ensure_ascii=False).encode("utf-8")
        if len(new) > n:  # cannot happen for a header safetensors wrote; leave it as it is
            return
        f.seek(8)
        f.write(new + b" " * (n - len(new)))


def read_json(path: str | os.PathLike) -> Any:
    """Read a JSON file; a missing or malformed file raises :class:`MtpruneError` naming it."""
    path = Path(path)
    if not path.is_file():
        raise MtpruneError(f"{path}: file not found")
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise MtpruneError(f"{path}: not valid JSON ({e})") from None
