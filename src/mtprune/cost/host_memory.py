"""How the process gets its host memory — a deployment setting that moves the latency ratio.

glibc's ``malloc`` serves every block above its mmap threshold (at most 32 MiB) with a fresh ``mmap`` and
gives it back on ``free``, so each forward of a segmentation net at 513² page-faults its large tensors
afresh: the unpruned residual stream at output stride 8, the logits upsampled to the input size. That
kernel time does not shrink with the pruned channels (measured: bench/README.md, "Host memory: the page faults …").

:func:`cached_host_memory` makes glibc keep freed memory for reuse (``mallopt``: no mmap'd blocks, no
trimming), as ONNX Runtime's arena and PyTorch's CUDA caching allocator already do; a deployment gets the
same with the environment :data:`DEPLOY_ENV` (no code). :func:`minor_faults` counts the faults of the
process, for the timing code to report them per forward.
"""

from __future__ import annotations

import contextlib
import ctypes
import ctypes.util
import os
import platform
from collections.abc import Iterator

from mtprune.errors import UsageError

try:
    import resource
except ImportError:  # Windows: no getrusage
    resource = None

#: the two ways a timing can get its host memory: glibc as configured, or freed memory kept for reuse
SYSTEM, CACHED = "system", "cached"
HOST_MEMORY = (SYSTEM, CACHED)

#: glibc's mallopt parameters (malloc.h)
_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD, _M_MMAP_MAX = -1, -3, -4
_KEEP = {_M_TRIM_THRESHOLD: 2**31 - 1, _M_MMAP_MAX: 0}
#: what leaving :func:`cached_host_memory` sets: the state glibc's dynamic thresholds reach in a process that
#: frees large blocks (a PyTorch net after its first forward) — blocks up to 32 MiB from the heap, larger ones
#: mmap'd. A ``mallopt`` call ends the dynamic adjustment for good, so glibc's start-up values (128 KiB)
#: would mmap every block above them for the rest of the process.
_STEADY = {_M_MMAP_THRESHOLD: 32 * 2**20, _M_TRIM_THRESHOLD: 64 * 2**20, _M_MMAP_MAX: 65536}

#: the same setting for a deployed process, read by glibc at start-up (``MALLOC_*_`` are its tunables'
#: environment names; ``GLIBC_TUNABLES=glibc.malloc.mmap_max=0:glibc.malloc.trim_threshold=2147483647``)
DEPLOY_ENV = {"MALLOC_MMAP_MAX_": "0", "MALLOC_TRIM_THRESHOLD_": str(2**31 - 1)}

_depth = 0


def _libc() -> ctypes.CDLL | None:
    """glibc, or None where the C library is another (musl, macOS, Windows: no ``mallopt`` to call)."""
    if platform.system() != "Linux" or platform.libc_ver()[0] != "glibc":
        return None
    return ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")


def can_cache() -> bool:
    """Whether :func:`cached_host_memory` works here (glibc)."""
    return _libc() is not None


def _from_environment() -> bool:
    """Whether the process was started with glibc told not to mmap (:data:`DEPLOY_ENV` or its tunable)."""
    tunables = os.environ.get("GLIBC_TUNABLES", "")
    return os.environ.get("MALLOC_MMAP_MAX_") == "0" or "glibc.malloc.mmap_max=0" in tunables


def host_memory() -> str:
    """The host memory the process has now: ``"preloaded (<library>)"`` under another allocator
    (``LD_PRELOAD`` jemalloc, tcmalloc …: glibc's settings do not reach it), :data:`CACHED` inside
    :func:`cached_host_memory` or when started with :data:`DEPLOY_ENV`, else :data:`SYSTEM`."""
    preload = [p for p in os.environ.get("LD_PRELOAD", "").split() if "malloc" in os.path.basename(p)]
    if preload:
        return f"preloaded ({os.path.basename(preload[0])})"
    return CACHED if _depth or _from_environment() else SYSTEM


@contextlib.contextmanager
def cached_host_memory() -> Iterator[None]:
    """Inside, glibc serves large blocks from its heap and keeps freed memory for the next allocation
    (``mallopt(M_MMAP_MAX, 0)``, ``mallopt(M_TRIM_THRESHOLD, 2³¹−1)``), so a forward that allocates what the
    previous one freed does not page-fault; on leaving, glibc is set as its dynamic thresholds leave a
    process that has run a net (:data:`_STEADY`) and the kept memory is returned (``malloc_trim``). Nests;
    does nothing in a process started with :data:`DEPLOY_ENV`.
    Raises :class:`~mtprune.errors.UsageError` where the C library is not glibc."""
    global _depth
    libc = _libc()
    if libc is None:
        raise UsageError(f"cached host memory needs glibc's malloc (Linux); this is {platform.system()}")
    own = _depth == 0 and not _from_environment()
    if own:
        for param, value in _KEEP.items():
            libc.mallopt(param, value)
    _depth += 1
    try:
        yield
    finally:
        _depth -= 1
        if own:
            for param, value in _STEADY.items():
                libc.mallopt(param, value)
            libc.malloc_trim(0)


def host_memory_context(mode: str) -> contextlib.AbstractContextManager:
    """:func:`cached_host_memory` for ``"cached"``, nothing for ``"system"`` (the ``--host-memory`` flag)."""
    if mode not in HOST_MEMORY:
        raise UsageError(f"unknown host memory '{mode}'; choose from {', '.join(HOST_MEMORY)}")
    return cached_host_memory() if mode == CACHED else contextlib.nullcontext()


def minor_faults() -> int:
    """Minor page faults of this process so far, all threads (0 where ``getrusage`` does not exist)."""
    return 0 if resource is None else int(resource.getrusage(resource.RUSAGE_SELF).ru_minflt)
