"""Failures a user running long jobs hits (issue 16): each reproduced, then handled in one line."""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
import textwrap

import pytest
import torch
from safetensors import SafetensorError
from safetensors.torch import load_file
from tests.conftest import crash_at
from tests.test_train import cfg

from mtprune.cli import main
from mtprune.cli.run_cmds import demo_config_path
from mtprune.config import load_config
from mtprune.errors import MtpruneError, UsageError, WriteError
from mtprune.io import FolderBusy, append_line, folder_lock, read_lines, save_tensors, write_failure
from mtprune.pipeline import run_stage
from mtprune.train.engine import StageRun

SEG = ("train_seg.epochs=1", "train_seg.batch_size=4", "checkpoint_every=2")  # 4 steps


def _holder(folder) -> subprocess.Popen:
    """Another process holding ``folder``'s lock until it is killed."""
    code = f"from mtprune.io import folder_lock\nimport time\nwith folder_lock({str(folder)!r}):\n"
    code += "    print('locked', flush=True)\n    time.sleep(120)\n"
    p = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True)
    assert p.stdout.readline().strip() == "locked"
    return p


# --- 1. one folder, one writer ------------------------------------------------------------------------
def test_a_second_writer_of_a_stage_folder_is_refused_and_a_dead_holders_lock_is_taken_over(tmp_path, capsys):
    out = tmp_path / "seg"
    holder = _holder(out)
    try:
        argv = ["train", "train-seg", "--out", str(out)] + [
            x for s in (*SEG, "model.width=0.125") for x in ("--set", s)
        ]
        assert main(argv) == 1
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and str(out) in err[0] and f"pid {holder.pid}" in err[0]
        assert sorted(p.name for p in out.iterdir()) == [".lock"]  # nothing written
    finally:
        holder.kill()
        holder.wait()
    assert run_stage("train-seg", cfg(*SEG), out) is not None  # the dead process's lock is taken over
    assert (out / "done.json").is_file()


def test_the_lock_is_one_per_folder_and_released_on_any_exit(tmp_path):
    with folder_lock(tmp_path / "a"):
        with pytest.raises(FolderBusy, match=f"pid {os.getpid()}"), folder_lock(tmp_path / "a"):
            pass
        with folder_lock(tmp_path / "b"):  # another folder: its own lock
            pass
    with pytest.raises(RuntimeError), folder_lock(tmp_path / "a"):
        raise RuntimeError
    with folder_lock(tmp_path / "a"):  # released after the error
        pass


def test_a_run_folder_has_one_writer(tmp_path):
    from tests.test_pipeline import tiny_cfg

    from mtprune.pipeline import run_pipeline

    holder = _holder(tmp_path / "run")
    try:
        with pytest.raises(FolderBusy, match=str(tmp_path / "run")):
            run_pipeline(tiny_cfg("run.methods=[uniform]"), tmp_path / "run", progress=lambda m: None)
        assert not (tmp_path / "run" / "config.yaml").exists()
    finally:
        holder.kill()
        holder.wait()


# --- 2. torn logs, failed saves, temp files ------------------------------------------------------------
def test_a_torn_log_line_does_not_block_the_resume(tmp_path, monkeypatch, capsys):
    undo = crash_at(monkeypatch, 3)
    with pytest.raises(KeyboardInterrupt):
        run_stage("train-seg", cfg(*SEG, "log_every=1"), tmp_path)
    undo()
    with open(tmp_path / "metrics.jsonl", "a") as f:
        f.write('{"stage": "train-seg", "step": 54,')  # what a full disk left
    (tmp_path / ".state.safetensors.x1y2.tmp").write_bytes(b"partial")  # a killed save's temp files
    (tmp_path / "model").mkdir(exist_ok=True)
    (tmp_path / "model" / ".tmpAbC123").write_bytes(b"partial")
    run_stage("train-seg", cfg(*SEG, "log_every=1"), tmp_path)
    err = capsys.readouterr().err
    assert "dropped 1 torn line" in err and "removed 2 temp file" in err
    records, torn = read_lines(tmp_path / "metrics.jsonl")
    assert torn == 0 and [r["step"] for r in records if "loss" in r] == [1, 2, 3, 4]
    assert not list(tmp_path.glob(".*.tmp")) and not list((tmp_path / "model").glob(".tmp*"))


def test_log_lines_are_appended_whole(tmp_path):
    path = tmp_path / "m.jsonl"
    append_line(path, json.dumps({"a": 1}))
    append_line(path, json.dumps({"b": 2}))
    assert read_lines(path) == ([{"a": 1}, {"b": 2}], 0)


def test_a_save_that_hits_a_file_size_limit_is_one_line_and_keeps_the_checkpoint(tmp_path):
    """EFBIG from ``ulimit -f`` (Python ignores SIGXFSZ, so the write fails instead of killing it)."""
    out = tmp_path / "seg"
    sets = [
        x
        for s in (*SEG, "model.width=0.125", "data.seg.options={num_samples: 16, image_size: 40}")
        for x in ("--set", s)
    ]
    code = textwrap.dedent(
        f"""
        import resource, sys
        from mtprune.cli import main
        resource.setrlimit(resource.RLIMIT_FSIZE, (300_000, 300_000))
        sys.exit(main({["train", "train-seg", "--out", str(out), *sets]!r}))
        """
    )
    env = {**os.environ, "MTPRUNE_NO_PROGRESS": "1"}
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env)
    lines = r.stderr.strip().splitlines()
    assert r.returncode == 1, r.stderr
    assert len(lines) == 1 and "file too large" in lines[0] and "state.safetensors" in lines[0], r.stderr
    assert "step 2" in lines[0] and "no checkpoint was written before" in lines[0]
    assert not [p for p in out.iterdir() if p.name.startswith(".") and p.name != ".lock"]  # no temp file left
    assert run_stage("train-seg", cfg(*SEG), out) is not None  # with room, the same command goes on


def test_write_failures_are_named():
    assert write_failure(OSError(28, "No space left on device")) == "no space left on device"
    assert write_failure(SafetensorError("Error while serializing: I/O error: No space left (os error 28)")) == (
        "no space left on device"
    )
    assert write_failure(SafetensorError("invalid header")) is None


def test_an_unwritable_out_is_one_line(tmp_path, capsys):
    blocker = tmp_path / "file"
    blocker.write_text("x")
    assert main(["init", "--model", "deeplabv3_resnet18", "--num-classes", "3", "--out", str(blocker / "sub")]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and str(blocker) in err[0]
    with pytest.raises(WriteError):
        save_tensors(blocker / "x.safetensors", {"a": torch.zeros(2)}, {})


# --- 4. poisoned weights -------------------------------------------------------------------------------
def test_a_non_finite_buffer_stops_the_stage_before_it_is_checkpointed(tmp_path, monkeypatch):
    original = StageRun.after_step

    def poison(self, record):
        if self.step == 2:  # after step 3's update: a BN's running variance overflows
            self.modules["model"].backbone.bn1.running_var[0] = float("inf")
        original(self, record)

    monkeypatch.setattr(StageRun, "after_step", poison)
    with pytest.raises(MtpruneError) as e:
        run_stage("train-seg", cfg(*SEG, "train_seg.epochs=2"), tmp_path)
    msg = str(e.value)
    assert "\n" not in msg and "train-seg: step 4" in msg and "'model.backbone.bn1.running_var'" in msg
    assert "checkpoint of step 2" in msg
    state = load_file(str(tmp_path / "state.safetensors"))  # the step-2 checkpoint, all finite
    assert all(bool(torch.isfinite(t).all()) for t in state.values() if t.is_floating_point())
    assert not (tmp_path / "model").exists()


@pytest.mark.parametrize("value", [".nan", "-0.1", "0", ".inf"])
def test_a_bad_learning_rate_is_refused_up_front(value):
    with pytest.raises(UsageError, match="train_seg.lr"):
        load_config(overrides=[f"train_seg.lr={value}"])


# --- 6. config values ----------------------------------------------------------------------------------
def test_config_floats_take_every_float_python_reads(tmp_path):
    c = load_config(overrides=["train_seg.lr=1e-3", "sparse_mtp.mu_max=1e+12", "optim.weight_decay=5E-4"])
    assert (c.train_seg.lr, c.sparse_mtp.mu_max, c.optim.weight_decay) == (1e-3, 1e12, 5e-4)
    path = tmp_path / "c.yaml"
    path.write_text("train_seg:\n  lr: 1e-3\n")
    assert load_config(path).train_seg.lr == 1e-3
    path.write_text("train_seg:\n  lr: 0.1\n   epochs: 3\n")
    with pytest.raises(UsageError, match="line 3, column 10"):
        load_config(path)
    with pytest.raises(UsageError, match="expects float"):
        load_config(overrides=["train_seg.lr=fast"])


@pytest.mark.parametrize(
    ("override", "key"),
    [("train_seg.batch_size=0", "train_seg.batch_size"), ("train_seg.epochs=-1", "train_seg.epochs")],
)
def test_counts_and_epochs_out_of_range_are_refused(override, key):
    with pytest.raises(UsageError, match=key):
        load_config(overrides=[override])


# --- 11, 12. identical files, readable by the team -----------------------------------------------------
def test_identical_tensors_give_identical_files_in_any_process(tmp_path):
    code = (
        "import sys, torch\nfrom mtprune.io import save_tensors\n"
        "save_tensors(sys.argv[1], {'w': torch.arange(6.0)}, {'model': 'm', 'format': 'f', 'a': 'b'})"
    )
    digests = set()
    for i in range(3):  # safetensors orders metadata keys by a per-process hash seed
        subprocess.run([sys.executable, "-c", code, str(tmp_path / f"{i}.safetensors")], check=True)
        digests.add(hashlib.sha256((tmp_path / f"{i}.safetensors").read_bytes()).hexdigest())
    assert len(digests) == 1
    assert load_file(str(tmp_path / "0.safetensors"))["w"].tolist() == [0, 1, 2, 3, 4, 5]


def test_written_files_get_the_umasks_mode(tmp_path):
    from mtprune import build_model, save_model

    save_model(build_model("deeplabv3_resnet18", 3, 4, 0.125), tmp_path / "m")
    for name in ("model.safetensors", "arch.json"):
        assert oct((tmp_path / "m" / name).stat().st_mode & 0o777) == oct(0o666 & ~_umask())


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


# --- 5. one line instead of a traceback ----------------------------------------------------------------
def _one_line(capsys, code, expected_code, needle):
    err = capsys.readouterr().err.strip().splitlines()
    assert code == expected_code and len(err) == 1 and needle in err[0], err


@pytest.fixture
def dense(tmp_path):
    out = tmp_path / "dense"
    assert (
        main(["init", "--model", "deeplabv3_resnet18", "--num-classes", "3", "--width", "0.125", "--out", str(out)])
        == 0
    )
    return out


@pytest.mark.parametrize("size", [["0", "0"], ["-64", "64"]])
@pytest.mark.parametrize("cmd", ["cost", "prune", "export"])
def test_a_bad_size_is_one_line(tmp_path, capsys, dense, cmd, size):
    capsys.readouterr()
    argv = {
        "cost": ["cost", "--checkpoint", str(dense)],
        "prune": [
            "prune",
            "--checkpoint",
            str(dense),
            "--method",
            "uniform",
            "--ratio",
            "0.5",
            "--out",
            str(tmp_path / "p"),
        ],
        "export": ["export", "--checkpoint", str(dense), "--onnx", str(tmp_path / "m.onnx")],
    }[cmd]
    with pytest.raises(SystemExit) as e:
        main([*argv, "--size", *size])
    _one_line(capsys, e.value.code, 2, "--size")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["dense"]  # nothing written


def test_an_out_that_is_a_file_is_one_line_for_every_command(tmp_path, capsys, dense):
    f = tmp_path / "f"
    f.write_text("keep me")
    tiny = [x for s in (*SEG, "model.width=0.125") for x in ("--set", s)]
    for argv in (
        ["init", "--model", "deeplabv3_resnet18", "--num-classes", "3", "--out", str(f)],
        ["prune", "--checkpoint", str(dense), "--method", "uniform", "--ratio", "0.5", "--out", str(f)],
        ["train", "train-seg", "--out", str(f), *tiny],
        ["export", "--checkpoint", str(dense), "--onnx", str(f / "m.onnx"), "--size", "32", "32"],
        ["run", str(demo_config_path()), "--out", str(f)],
    ):
        capsys.readouterr()
        code = main(argv)
        err = capsys.readouterr().err.strip().splitlines()
        assert code in (1, 2) and len(err) == 1 and str(f) in err[0], (argv[0], err)
    assert f.read_text() == "keep me"


def test_a_read_only_place_is_one_line(tmp_path, monkeypatch):
    import errno
    import tempfile

    from mtprune import build_model, save_model

    def read_only(*a, **k):
        raise OSError(errno.EROFS, "Read-only file system")

    monkeypatch.setattr(tempfile, "mkstemp", read_only)  # what a read-only mount answers (root ignores modes)
    with pytest.raises(WriteError, match="read-only file system") as e:
        save_model(build_model("deeplabv3_resnet18", 3, 4, 0.125), tmp_path / "m")
    assert "\n" not in str(e.value) and str(tmp_path / "m") in str(e.value)


def test_model_classes_are_checked_against_the_dataset_before_training(tmp_path):
    with pytest.raises(UsageError, match="model.num_classes: 5, but the segmentation dataset has 6 classes"):
        run_stage("train-seg", cfg(*SEG, "model.num_classes=5"), tmp_path)
    assert not (tmp_path / "state.safetensors").exists() and not (tmp_path / "metrics.jsonl").exists()


def test_a_training_set_smaller_than_a_batch_names_the_split_and_the_key(tmp_path):
    with pytest.raises(UsageError) as e:
        run_stage("train-seg", cfg("train_seg.batch_size=32"), tmp_path)
    msg = str(e.value)
    assert "16 samples are too few for batches of 32" in msg and "train split" in msg
    assert "lower train_seg.batch_size" in msg


def test_a_corrupt_scores_file_and_bad_arch_values_are_one_line(tmp_path, capsys, dense):
    from mtprune.io import read_json, write_json

    (dense / "scores.safetensors").write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not json")
    capsys.readouterr()
    code = main(["prune", "--checkpoint", str(dense), "--method", "bn", "--ratio", "0.5", "--out", str(tmp_path / "p")])
    _one_line(capsys, code, 1, "scores.safetensors")
    assert not (tmp_path / "p").exists()
    arch = read_json(dense / "arch.json")
    write_json(dense / "arch.json", {**arch, "num_classes": "abc"})
    code = main(["cost", "--checkpoint", str(dense), "--size", "32", "32"])
    _one_line(capsys, code, 1, "'num_classes' is \"abc\"")


# --- 7. no silent overwrite ----------------------------------------------------------------------------
def test_init_and_prune_refuse_a_folder_holding_something_unless_overwrite(tmp_path, capsys, dense):
    out = tmp_path / "p"
    prune = ["prune", "--checkpoint", str(dense), "--method", "uniform", "--ratio", "0.5", "--size", "32", "32"]
    assert main([*prune, "--out", str(out)]) == 0
    (out / "notes.txt").write_text("mine")
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    capsys.readouterr()
    with pytest.raises(SystemExit) as e:  # argparse-style usage error: exit 2
        raise SystemExit(main([*prune, "--ratio", "0.25", "--out", str(out)]))
    _one_line(capsys, e.value.code, 2, "--overwrite")
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before
    init = ["init", "--model", "deeplabv3_resnet18", "--num-classes", "3", "--width", "0.125"]
    assert main([*init, "--out", str(out)]) == 2
    assert main([*prune, "--ratio", "0.25", "--out", str(out), "--overwrite"]) == 0
    assert not (out / "notes.txt").exists() and json.loads((out / "plan.json").read_text())["ratio"] == 0.25


# --- 10. progress in a log file ------------------------------------------------------------------------
def test_progress_in_a_log_is_a_plain_line_every_interval_and_at_the_end(monkeypatch):
    import io

    from mtprune.train.progress import Progress

    monkeypatch.delenv("MTPRUNE_NO_PROGRESS", raising=False)
    now = [0.0]
    log = io.StringIO()  # not a terminal
    p = Progress(100, 0, "train-seg", stream=log, interval=30.0, clock=lambda: now[0])
    for _ in range(100):
        now[0] += 1.0  # one step a second
        p.update({"loss": 0.5, "lr": 0.01})
    p.close()
    lines = log.getvalue().splitlines()
    assert "\r" not in log.getvalue() and len(lines) == 4  # at 30, 60 and 90 s, and the end
    assert lines[0] == "train-seg: step 30/100 (30 %), 1 it/s, loss=0.5, lr=0.01"
    assert lines[-1].startswith("train-seg: step 100/100 (100 %)")
    quiet = io.StringIO()
    monkeypatch.setenv("MTPRUNE_NO_PROGRESS", "1")
    q = Progress(10, 0, "x", stream=quiet, clock=lambda: now[0])
    q.update({})
    q.close()
    assert quiet.getvalue() == ""


# --- 9. every Ctrl-C stops the run ---------------------------------------------------------------------
@pytest.mark.filterwarnings("ignore::pytest.PytestUnraisableExceptionWarning")
def test_a_ctrl_c_swallowed_by_a_finaliser_still_stops_the_run(tmp_path, capsys, monkeypatch):
    import gc
    import signal

    from mtprune import interrupt

    class Finalised:  # what a data loader iterator's __del__ does when SIGINT lands in it
        def __del__(self):
            os.kill(os.getpid(), signal.SIGINT)

    original = StageRun.after_step

    def swallow_at_step_2(self: StageRun, record: dict) -> None:
        original(self, record)
        if self.step == 2:
            Finalised()
            gc.collect()
            assert interrupt._seen.is_set()  # we got here: the KeyboardInterrupt raised in __del__ was lost

    monkeypatch.setattr(StageRun, "after_step", swallow_at_step_2)
    tiny = [x for s in (*SEG, "model.width=0.125", "checkpoint_every=1", "log_every=1") for x in ("--set", s)]
    try:
        code = main(["train", "train-seg", "--out", str(tmp_path), *tiny])
    finally:
        signal.signal(signal.SIGINT, signal.default_int_handler)
        interrupt._seen.clear()
    assert code == 130 and "interrupted" in capsys.readouterr().err
    assert not (tmp_path / "done.json").exists()
    monkeypatch.setattr(StageRun, "after_step", original)
    lines = [json.loads(x) for x in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [x["step"] for x in lines] == [1, 2]  # stopped at the step after the lost Ctrl-C, not later
    assert main(["train", "train-seg", "--out", str(tmp_path), *tiny]) == 0
    assert "resuming train-seg from step 2" in capsys.readouterr().err  # from its checkpoint


def test_a_ctrl_c_lost_in_one_stage_stops_the_run_before_the_next(tmp_path):
    import signal

    from mtprune import interrupt
    from mtprune.pipeline.runner import Stage, execute

    ran = []

    def swallows_a_ctrl_c():  # e.g. an evaluation whose data loader's finaliser ate it
        try:
            signal.raise_signal(signal.SIGINT)
            sum(range(10_000))  # the handler runs between bytecodes: here
        except KeyboardInterrupt:
            pass
        ran.append("a")

    try:
        interrupt.install()
        execute(Stage("a", tmp_path / "a", {}, swallows_a_ctrl_c), say=lambda _: None)
        with pytest.raises(KeyboardInterrupt):
            execute(Stage("b", tmp_path / "b", {}, lambda: ran.append("b")), say=lambda _: None)
    finally:
        signal.signal(signal.SIGINT, signal.default_int_handler)
        interrupt._seen.clear()
    assert ran == ["a"]
    assert not (tmp_path / "b").exists()


# --- 8. data ---------------------------------------------------------------------------------------------
def test_a_16_bit_grayscale_image_is_scaled_to_8_bit_not_clipped_white(tmp_path):
    import numpy as np
    from PIL import Image

    from mtprune.data.base import decode_image

    raw = np.array([[0, 30000], [51400, 65535]], dtype=np.uint16)
    Image.fromarray(raw).save(tmp_path / "g16.png")
    with Image.open(tmp_path / "g16.png") as img:
        assert img.mode.startswith("I")  # PIL reads it as 16-bit (mode I;16 or I)
    problems: list = []
    arr = decode_image(tmp_path / "g16.png", problems)
    assert not problems and arr.shape == (2, 2, 3)
    assert arr[..., 0].tolist() == [[0, 117], [200, 255]]  # 65535 → 255, not everything above 255 → 255


def test_an_empty_class_tree_fails_check_data(tmp_path, capsys):
    for c in ("cat", "dog"):
        (tmp_path / "train" / c).mkdir(parents=True)
    code = main(["check-data", "--dataset", "imagefolder", "--root", str(tmp_path), "--split", "train"])
    _one_line(capsys, code, 1, "no images")


@pytest.fixture
def synthetic_root(tmp_path):
    from mtprune.data import write_synthetic

    root = tmp_path / "syn"
    write_synthetic(root, num_train=16, num_val=6, image_size=40, num_cls_train=32, num_cls_val=8)
    return root


def _disk_cfg(root, *extra):
    return cfg(
        f"data.seg.root={root}", "data.seg.dataset=synthetic", f"data.cls.root={root}", "data.cls.dataset=synthetic",
        "data.seg.options={}", "data.cls.options={}", *extra,
    )  # fmt: skip


def _corrupt_first_val_image(root):
    voc = root / "VOCdevkit" / "VOC2012"
    first = (voc / "ImageSets" / "Segmentation" / "val.txt").read_text().split()[0]
    bad = voc / "JPEGImages" / f"{first}.jpg"
    bad.write_bytes(b"not an image")
    return voc, first, bad


def test_a_bad_validation_file_is_found_before_training(tmp_path, synthetic_root):
    _, _, bad = _corrupt_first_val_image(synthetic_root)
    out = tmp_path / "seg"
    with pytest.raises(MtpruneError, match="found before training") as e:
        run_stage("train-seg", _disk_cfg(synthetic_root, *SEG, "eval.final=true"), out)
    assert bad.name in str(e.value) and "\n" not in str(e.value)
    assert not (out / "state.safetensors").exists() and not (out / "metrics.jsonl").exists()


def test_skip_bad_validation_skips_a_bad_image_without_counting_a_neighbour_twice(tmp_path, synthetic_root):
    from mtprune import load_model
    from mtprune.evaluate.validation import final_metrics
    from mtprune.train.distributed import setup

    seg = tmp_path / "seg"
    run_stage("train-seg", _disk_cfg(synthetic_root, *SEG, "train_seg.epochs=0.5"), seg)
    model, env = load_model(seg), setup("cpu")
    voc, first, _ = _corrupt_first_val_image(synthetic_root)
    skipped = final_metrics(model, _disk_cfg(synthetic_root, "data.skip_bad=true"), env, ("seg",), force=True)
    lst = voc / "ImageSets" / "Segmentation" / "val.txt"
    lst.write_text("\n".join(n for n in lst.read_text().split() if n != first) + "\n")  # the same set without it
    without = final_metrics(model, _disk_cfg(synthetic_root), env, ("seg",), force=True)
    assert skipped["miou"] == without["miou"] and skipped["per_class"] == without["per_class"]
