"""Several seeds at once on one machine (``mtprune run --seeds … --jobs N``): each seed's stages in a process of
its own, torch's threads split between them. On a small CPU box one process rarely keeps every core busy
(the data loading, the optimiser step and the many small kernels of a mobile-class net run on one), so two
single-thread seeds finish more work per hour than one two-thread seed; bench/README.md has the measured ratio.

Each process writes its output to a log file and nothing else outside its seed's folder (one writer per
folder); a seed that fails leaves the others running and is named, with its log's last line, at the end.
Ctrl-C (or SIGINT to the parent) reaches every seed: each stops at its last checkpoint, and rerunning the
command resumes them."""

from __future__ import annotations

import ctypes
import multiprocessing
import os
import signal
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from multiprocessing.connection import wait
from pathlib import Path
from typing import Any

from mtprune import interrupt
from mtprune.errors import MtpruneError
from mtprune.io import open_no_follow
from mtprune.pipeline.runner import Say

LOG_FLAGS = os.O_WRONLY | os.O_CREAT | os.O_APPEND
#: seconds a process gets to stop at its checkpoint after SIGINT before it is terminated
STOP_GRACE_S = 60.0


@dataclass(frozen=True)
class Job:
    """One process: ``target(*args)``, its stdout and stderr appended to ``log``."""

    name: str
    log: Path
    args: tuple[Any, ...]


def threads_per_job(threads: int, jobs: int) -> int:
    """torch threads for each of ``jobs`` processes sharing ``threads`` (at least one)."""
    return max(1, threads // jobs)


def run_processes(target: Callable[..., Any], jobs: list[Job], parallel: int, say: Say) -> None:
    """Run every job in a spawned process, at most ``parallel`` at once, in order; raises
    :class:`MtpruneError` naming each job that failed (exit code 2 when every failure was a usage error)."""
    ctx = multiprocessing.get_context("spawn")  # no fork of a process holding torch's thread pools
    pending, running, failed = list(jobs), {}, []
    try:
        while pending or running:
            while pending and len(running) < parallel:
                job = pending.pop(0)
                job.log.parent.mkdir(parents=True, exist_ok=True)
                os.close(open_no_follow(job.log, LOG_FLAGS))  # a link planted as the log: one line, here
                p = ctx.Process(target=_child, args=(target, job.log, job.args, os.getpid()), name=job.name)
                p.start()
                running[p.sentinel] = (job, p)
                say(f"== {job.name}: process {p.pid}, its output in {job.log} ==")
            for sentinel in wait(list(running)):
                job, p = running.pop(sentinel)
                p.join()
                if p.exitcode == 0:
                    say(f"== {job.name}: done ==")
                else:
                    failed.append((job, p.exitcode))
                    say(f"== {job.name}: failed (exit {p.exitcode}): {last_line(job.log)} ==")
    finally:
        _stop([p for _, p in running.values()])
    if failed:
        names = "; ".join(f"{job.name} (exit {code}: {last_line(job.log)}; log {job.log})" for job, code in failed)
        usage = all(code == 2 for _, code in failed)
        raise MtpruneError(f"{len(failed)} of {len(jobs)} failed: {names}", exit_code=2 if usage else 1)


def _child(target: Callable[..., Any], log: Path, args: tuple[Any, ...], parent: int) -> None:
    """The body of a spawned process: output to ``log`` (line-buffered), Ctrl-C recorded as in the CLI (a
    second one, from the parent after the terminal's, ignored), stopped like Ctrl-C when ``parent`` ends
    however it ends, a user-facing error as its one line and exit code."""
    fd = open_no_follow(log, LOG_FLAGS)
    os.dup2(fd, 1)
    os.dup2(fd, 2)
    os.close(fd)
    for stream in (sys.stdout, sys.stderr):
        stream.reconfigure(line_buffering=True)  # type: ignore[union-attr]
    interrupt.install(once=True)
    try:
        _stop_with(parent)
        target(*args)
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        sys.exit(130)
    except MtpruneError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(e.exit_code)


def _stop_with(parent: int) -> None:
    """SIGINT to this process when ``parent`` ends, even killed (Linux: ``PR_SET_PDEATHSIG``; elsewhere
    nothing): no seed trains on, holding its folder, after the command is gone."""
    try:
        ctypes.CDLL(None).prctl(1, signal.SIGINT)  # 1: PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        return
    if os.getppid() != parent:  # it ended before the request was made
        raise KeyboardInterrupt


def _stop(alive: list[multiprocessing.process.BaseProcess]) -> None:
    """SIGINT to each process still running (each stops at its last checkpoint), then wait; terminate what
    is left after :data:`STOP_GRACE_S` in all."""
    for p in alive:
        if p.is_alive() and p.pid is not None:
            os.kill(p.pid, signal.SIGINT)
    deadline = time.monotonic() + STOP_GRACE_S
    for p in alive:
        p.join(max(0.0, deadline - time.monotonic()))
        if p.is_alive():
            p.terminate()
            p.join()


def last_line(log: Path, tail: int = 4096) -> str:
    """The last non-empty line of ``log`` ("" when there is none)."""
    try:
        with open(log, "rb") as f:
            f.seek(max(0, f.seek(0, os.SEEK_END) - tail))
            lines = [line.strip() for line in f.read().decode("utf-8", "replace").splitlines() if line.strip()]
    except OSError:
        return ""
    return lines[-1] if lines else ""
