"""``mtprune run --seeds … --jobs N``: seeds as processes of their own, the results of one at a time."""

from __future__ import annotations

import json

import pytest
import torch
from tests.test_pipeline import TINY

from mtprune.cli import main
from mtprune.config import load_config
from mtprune.errors import MtpruneError, UsageError
from mtprune.pipeline import run_seeds
from mtprune.pipeline.parallel import last_line, threads_per_job

# no pretrain-cls: this process would run it, at its own thread count
RUN = ["run.methods=[mtp, uniform]", "run.ratios=[0.5]", "run.thresholds=[independent]", "run.pretrain=false"]


def _cfg(*extra: str):
    return load_config(overrides=TINY + RUN + list(extra))


def _rows(out, seed):
    rows = json.loads((out / f"seed-{seed}" / "results.json").read_text())
    return {r["tag"]: {k: v for k, v in r.items() if not k.startswith("latency")} for r in rows}


@pytest.fixture
def threads():
    before = torch.get_num_threads()
    yield torch.set_num_threads
    torch.set_num_threads(before)


def test_jobs_give_each_seed_the_results_of_a_one_at_a_time_run(tmp_path, threads):
    threads(1)  # the processes get 2 // 2 = 1 thread each: the same sums as this one-thread run
    run_seeds(_cfg(), tmp_path / "one", [0, 1])
    threads(2)
    summary = run_seeds(_cfg(), tmp_path / "jobs", [0, 1], jobs=2)
    for s in (0, 1):
        assert _rows(tmp_path / "jobs", s) == _rows(tmp_path / "one", s)
        log = (tmp_path / "jobs" / f"seed-{s}" / "run.log").read_text()
        assert "[train-seg] running" in log and "[finetune-mtp-0.5-independent] running" in log
        assert not (tmp_path / "one" / f"seed-{s}" / "run.log").exists()
    assert summary["seeds"] == [0, 1]
    assert summary == json.loads((tmp_path / "jobs" / "summary.json").read_text())


def test_the_latency_stage_waits_for_every_seed_then_runs_in_the_parent(tmp_path, threads, capsys):
    threads(2)
    timed = ("run.latency=true", "run.timing.runtime=eager", "run.timing.precision=null")
    run_seeds(_cfg(*timed, "run.methods=[uniform]"), tmp_path / "r", [0, 1], jobs=2)
    printed = capsys.readouterr().err  # progress lines: stderr
    assert printed.count("[latency] running") == 2  # in this process, after both seeds' processes ended
    ended = max(printed.index(f"== seed {s}: done ==") for s in (0, 1))
    assert printed.index("[latency] running") > ended
    for s in (0, 1):
        assert "[latency]" not in (tmp_path / "r" / f"seed-{s}" / "run.log").read_text()
        rows = json.loads((tmp_path / "r" / f"seed-{s}" / "results.json").read_text())
        assert all(r["latency_ms"] > 0 for r in rows)


def test_a_failing_seed_is_named_with_its_logs_last_line_and_the_others_finish(tmp_path, threads):
    threads(2)
    bad = tmp_path / "r" / "seed-1" / "train-seg"  # a stage folder made by another recipe: seed 1 is refused
    bad.mkdir(parents=True)
    (bad / "recipe.json").write_text(json.dumps({"stage": "train-seg", "input": None, "config": {"seed": 7}}))
    (bad / "done.json").write_text("{}")
    refused = r"1 of 2 failed: seed 1 \(exit 2: error: .*train-seg: this stage was made with another recipe"
    with pytest.raises(MtpruneError, match=refused) as e:
        run_seeds(_cfg("run.methods=[uniform]"), tmp_path / "r", [0, 1], jobs=2)
    assert e.value.exit_code == 2  # the seed's own error was a usage error (exit 2): so is the run's
    assert str(tmp_path / "r" / "seed-1" / "run.log") in str(e.value)
    assert (tmp_path / "r" / "seed-0" / "results.json").is_file()  # seed 0 finished beside it
    assert json.loads((bad / "recipe.json").read_text())["config"] == {"seed": 7}  # nothing of seed 1's touched


def test_jobs_bad_values_are_one_line_usage_errors(tmp_path, capsys):
    with pytest.raises(UsageError, match="--jobs must be ≥ 1, got 0"):
        run_seeds(_cfg(), tmp_path / "r", [0, 1], jobs=0)
    with pytest.raises(UsageError, match="--jobs 2: run.round_to: auto times nets while pruning, which needs a quiet"):
        run_seeds(_cfg("run.round_to=auto"), tmp_path / "r", [0, 1], jobs=2)
    with pytest.raises(UsageError, match=r"--jobs 2: the latency target \{'latency': 0.5\} times nets"):
        run_seeds(_cfg("run.ratios=[]", "run.targets=[{latency: 0.5}]"), tmp_path / "r", [0, 1], jobs=2)
    assert not (tmp_path / "r").exists()
    cfg = tmp_path / "c.yaml"
    cfg.write_text("run:\n  methods: [uniform]\n  ratios: [0.5]\n")
    assert main(["run", str(cfg), "--out", str(tmp_path / "x"), "--jobs", "2"]) == 2
    assert "--jobs runs several seeds at once: give --seeds" in capsys.readouterr().err
    assert not (tmp_path / "x").exists()


def test_a_log_planted_as_a_link_is_refused_and_its_target_untouched(tmp_path, threads):
    threads(2)
    victim = tmp_path / "victim"
    victim.write_text("keep")
    (tmp_path / "r" / "seed-1").mkdir(parents=True)
    (tmp_path / "r" / "seed-1" / "run.log").symlink_to(victim)
    with pytest.raises(UsageError, match="run.log is a symbolic link: mtprune never writes through one"):
        run_seeds(_cfg("run.methods=[uniform]"), tmp_path / "r", [0, 1], jobs=2)
    assert victim.read_text() == "keep"


def test_threads_per_job_and_last_line(tmp_path):
    assert [threads_per_job(t, 2) for t in (1, 2, 3, 8)] == [1, 1, 1, 4]
    log = tmp_path / "log"
    assert last_line(log) == ""
    log.write_text("a\nprogress 1\n\nerror: the end\n\n")
    assert last_line(log) == "error: the end"


@pytest.mark.parametrize("how", ["SIGINT", "SIGKILL"])
def test_ctrl_c_or_a_killed_command_stops_every_seed_at_its_checkpoint_and_a_rerun_resumes(tmp_path, how):
    import shlex
    import signal
    import subprocess
    import sys
    import time

    from mtprune.io import folder_lock

    more = ["run.methods=[uniform]", "finetune.seg_epochs=100", "checkpoint_every=20"]
    sets = [x for s in [*TINY, *RUN, *more] for x in ("--set", s)]
    cfg = tmp_path / "c.yaml"
    cfg.write_text("run:\n  methods: [uniform]\n")
    cmd = [sys.executable, "-m", "mtprune", "run", str(cfg), "--out", str(tmp_path / "r"), "--seeds", "0", "1"]
    p = subprocess.Popen([*cmd, "--jobs", "2", *sets], stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    logs = [tmp_path / "r" / f"seed-{s}" / "run.log" for s in (0, 1)]
    deadline = time.monotonic() + 300
    # both seeds fine-tuning (400 steps: longer than the seeds' start times differ) past a checkpoint
    states = [tmp_path / "r" / f"seed-{s}" / "finetune-uniform-0.5" / "state.safetensors" for s in (0, 1)]
    while not all(state.is_file() for state in states):
        assert p.poll() is None and time.monotonic() < deadline, shlex.join(cmd)
        time.sleep(0.1)
    assert not any("[eval-uniform-0.5]" in log.read_text() for log in logs), "a seed finished fine-tuning first"
    p.send_signal(getattr(signal, how))  # to the command alone: Ctrl-C passed on, or its death noticed
    out, _ = p.communicate(timeout=120)
    if how == "SIGINT":
        assert p.returncode == 130 and "interrupted" in out
    stopped = time.monotonic() + 120
    while not all(log.read_text().rstrip().endswith("interrupted") for log in logs):  # no seed trains on
        assert time.monotonic() < stopped, [log.read_text()[-500:] for log in logs]
        time.sleep(0.2)
    for s in (0, 1):
        with folder_lock(tmp_path / "r" / f"seed-{s}"):  # its process has ended: the folder is free
            pass
    if how == "SIGKILL":
        return  # stopped alike: the SIGINT case shows the rerun
    done = subprocess.run([*cmd, "--jobs", "2", *sets], capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-2000:]
    for log in logs:  # what the first run finished is reused, what it was in the middle of resumed
        rerun = log.read_text().split("interrupted")[-1]
        assert "[train-seg] reused" in rerun and "[eval-dense] reused" in rerun
        assert "resuming finetune from step" in rerun
    assert (tmp_path / "r" / "summary.json").is_file()


def test_a_process_takes_over_the_consent_to_code_the_user_named(tmp_path, monkeypatch):
    from tests.test_trust import _forget_trusted_code, _python_checkpoint

    from mtprune import load_model
    from mtprune.checkpoint import adopt_consent, current_consent

    ck, _ = _python_checkpoint(tmp_path)  # this process ran the user's file: its checkpoint loads here
    consent = current_consent()
    assert load_model(ck).name.startswith("python:")
    _forget_trusted_code(monkeypatch)  # a spawned process: nothing ran there
    with pytest.raises(UsageError, match="--trust-code"):
        load_model(ck)
    adopt_consent(consent)
    assert load_model(ck).name.startswith("python:")
