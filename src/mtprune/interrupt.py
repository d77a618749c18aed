"""Ctrl-C that always stops a run. Python raises ``KeyboardInterrupt`` wherever the main thread is when
SIGINT arrives; inside a finaliser (a data loader iterator's ``__del__`` with ``data.workers ≥ 1``) it is
printed as "Exception ignored" and lost, and the run went on. :func:`install` records every SIGINT, and
the training loop calls :func:`check` after each step, so a lost interrupt stops the run there."""

from __future__ import annotations

import signal
import threading
from types import FrameType

_seen = threading.Event()


def _on_sigint(signum: int, frame: FrameType | None) -> None:
    _seen.set()
    raise KeyboardInterrupt


def _on_first_sigint(signum: int, frame: FrameType | None) -> None:
    if not _seen.is_set():  # a second SIGINT (a terminal's and a parent's) must not break the stopping
        _on_sigint(signum, frame)


def install(once: bool = False) -> None:
    """Record SIGINTs from now on (main thread only; elsewhere nothing changes). ``once``: only the first
    raises ``KeyboardInterrupt``, later ones are recorded only."""
    _seen.clear()
    if threading.current_thread() is threading.main_thread():
        signal.signal(signal.SIGINT, _on_first_sigint if once else _on_sigint)


def check() -> None:
    """Raise ``KeyboardInterrupt`` if a SIGINT arrived since :func:`install` (even one that was swallowed)."""
    if _seen.is_set():
        raise KeyboardInterrupt
