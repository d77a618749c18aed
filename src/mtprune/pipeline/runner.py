"""One stage runner for every stage of every command (``mtprune train``, ``mtprune run``, ``--seeds``).

A :class:`Stage` declares its name, its folder, its recipe (what decides its result,
:mod:`mtprune.recipe`) and the function that does its work. :func:`execute` is the one place that
decides what happens to it:

- finished (``done.json``) with the same recipe: **reused** — its result is read back, nothing runs;
- interrupted (a resumable ``state.safetensors``) with the same recipe: **resumed** by its run function;
- made with another recipe: refused in one line naming the folder and the keys that changed (a stage
  marked ``redo_on_change`` — the latency stage, which only measures — is redone instead);
- nothing there: the recipe is written and the stage **runs**.

It says ``[name] running`` or ``[name] reused`` after the recipe check, so a refused stage is never
announced. A Ctrl-C that an earlier stage swallowed (:mod:`mtprune.interrupt`) stops the run before the
next stage starts. Rank 0 holds the stage folder's lock (:func:`~mtprune.io.folder_lock`) all the while: a second
process on the same folder is refused in one line, whatever it would have done there.
"""

from __future__ import annotations

import contextlib
import json
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from mtprune import interrupt
from mtprune.errors import WriteError
from mtprune.io import folder_lock, read_json
from mtprune.recipe import RECIPE_FILE, check_recipe, differences, write_recipe
from mtprune.train.distributed import DistEnv
from mtprune.train.engine import DONE_FILE, STATE_FILE

Say = Callable[[str], None]


def _metrics(done: dict[str, Any]) -> Any:
    return dict(done.get("metrics", {}))


@dataclass
class Stage:
    name: str  # what the progress lines call it (the folder's name in a run)
    out: Path  # its folder
    recipe: dict[str, Any]  # what decides its result
    run: Callable[[], Any]  # does the work (resuming a state if there is one), writes done.json, returns the result
    result: Callable[[dict[str, Any]], Any] = _metrics  # the result, read back from a finished stage's done.json
    resumable: bool = False  # an interrupted run leaves a state.safetensors that run resumes
    redo_on_change: bool = False  # finished with another recipe: redo it (instead of refusing)
    note: str = ""  # added to the progress lines, e.g. "(shared by seeds 0, 1)"


def say_on_main(env: DistEnv | None = None) -> Say:
    """Progress lines on stderr, from rank 0 only."""

    def say(msg: str) -> None:
        if env is None or env.is_main:
            print(msg, file=sys.stderr, flush=True)

    return say


def _same_recipe(stage: Stage) -> bool:
    path = stage.out / RECIPE_FILE
    return path.is_file() and not differences(read_json(path), json.loads(json.dumps(stage.recipe)))


def execute(stage: Stage, env: DistEnv | None = None, say: Say | None = None) -> Any:
    """Reuse, resume or run ``stage`` (see the module doc); returns its result. ``env``: the process
    group (None: a single process); every rank decides alike, rank 0 writes the recipe."""
    interrupt.check()  # a Ctrl-C lost in a finaliser of the last stage: stop here, not after this one
    say = say or say_on_main(env)
    main = env is None or env.is_main
    with contextlib.ExitStack() as held:
        try:
            if main:
                held.enter_context(folder_lock(stage.out))
        except WriteError:  # a read-only place: a finished stage is reused all the same (reuse writes nothing)
            if not ((stage.out / DONE_FILE).is_file() and _same_recipe(stage)):
                raise
            main = False
        return _execute(stage, main, say)


def _execute(stage: Stage, main: bool, say: Say) -> Any:
    done = (stage.out / DONE_FILE).is_file()
    if done and stage.redo_on_change and not _same_recipe(stage):
        done = False
    has_work = done or (stage.resumable and (stage.out / STATE_FILE).is_file())
    check_recipe(stage.out, stage.recipe, has_work)
    note = f" {stage.note}" if stage.note else ""
    if done:
        say(f"[{stage.name}] reused{note}")
        return stage.result(read_json(stage.out / DONE_FILE))
    if main and not has_work:
        write_recipe(stage.out, stage.recipe)
    say(f"[{stage.name}] running{note}")
    return stage.run()
