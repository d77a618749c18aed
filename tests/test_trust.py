"""Issue 29: trust. A checkpoint that carries code loads only with consent; a run folder's files are never
written through a symlink; one writer per folder, ``--overwrite`` included."""

from __future__ import annotations

import json
import os

import pytest
import torch
from tests.test_any_model import FACTORY

from mtprune import build_model, load_model, save_model
from mtprune.cli import main
from mtprune.errors import CheckpointError, UsageError


def _python_checkpoint(tmp_path):
    src = tmp_path / "mynet.py"
    src.write_text(FACTORY)
    model = build_model(f"python:{src}:make", 4, 10).eval()
    save_model(model, tmp_path / "ck")
    src.unlink()
    return tmp_path / "ck", model


def _forget_trusted_code(monkeypatch):
    from mtprune.models import specs

    monkeypatch.setattr(specs, "_TRUSTED", set())  # a new process: nothing ran here yet
    monkeypatch.delenv("MTPRUNE_TRUST_CODE", raising=False)


def test_a_checkpoint_carrying_code_loads_only_with_consent(tmp_path, monkeypatch):
    ck, model = _python_checkpoint(tmp_path)
    _forget_trusted_code(monkeypatch)
    with pytest.raises(UsageError, match=r"model_src.py: the checkpoint carries Python code .*--trust-code"):
        load_model(ck)
    x = torch.randn(1, 3, 32, 32)
    with torch.no_grad():
        assert torch.equal(load_model(ck, trust_code=True)(x), model(x))
    monkeypatch.setenv("MTPRUNE_TRUST_CODE", "1")
    assert load_model(ck).name == model.name


def test_the_cli_refuses_code_in_a_line_and_runs_it_with_trust_code(tmp_path, monkeypatch, capsys):
    ck, _ = _python_checkpoint(tmp_path)
    _forget_trusted_code(monkeypatch)
    prune = ["prune", "--checkpoint", str(ck), "--method", "uniform", "--ratio", "0.5", "--out", str(tmp_path / "p")]
    onnx = ["export", "--checkpoint", str(ck), "--onnx", str(tmp_path / "m.onnx"), "--size", "32", "32"]
    evaluate = ["eval", "--checkpoint", str(ck), "--dataset", "synthetic", "--num-classes", "4"]
    for argv in (["cost", "--checkpoint", str(ck), "--size", "32", "32"], prune, evaluate, onnx):
        assert main(argv) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and "model_src.py" in err[0] and "--trust-code" in err[0]
    assert not (tmp_path / "p").exists() and not (tmp_path / "m.onnx").exists()
    assert main(["cost", "--checkpoint", str(ck), "--size", "32", "32", "--trust-code"]) == 0
    assert main([*prune, "--trust-code"]) == 0
    assert (tmp_path / "p" / "model_src.py").read_text() == FACTORY


def test_arch_json_may_name_no_code_but_the_checkpoint_s_own(tmp_path, monkeypatch):
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    (elsewhere / "x.py").write_text(FACTORY.replace("def make(", "open(__file__ + '.ran', 'w')\n\ndef make("))
    ck, _ = _python_checkpoint(tmp_path)
    arch = json.loads((ck / "arch.json").read_text())
    arch["model"] = "python:../elsewhere/x.py:make"
    (ck / "arch.json").write_text(json.dumps(arch))
    (ck / "model_src.py").unlink()
    monkeypatch.chdir(tmp_path / "ck")
    for trust in (False, True):
        with pytest.raises(CheckpointError, match="carries no model_src.py"):
            load_model(ck, trust_code=trust)
    assert not (elsewhere / "x.py.ran").exists()  # the file named in arch.json never ran


def test_built_in_torchvision_and_smp_checkpoints_need_no_consent(tmp_path, monkeypatch):
    _forget_trusted_code(monkeypatch)
    for name in ("deeplabv3_resnet18", "torchvision:lraspp_mobilenet_v3_large"):
        save_model(build_model(name, 4, 10, **({"width": 0.25} if "resnet" in name else {})), tmp_path / name)
        assert load_model(tmp_path / name).name == name


def test_a_symlinked_lock_is_not_followed(tmp_path, capsys):
    from mtprune.io import folder_lock

    victim = tmp_path / "victim.txt"
    victim.write_text("precious")
    (tmp_path / "run").mkdir()
    os.symlink(victim, tmp_path / "run" / ".lock")
    with pytest.raises(UsageError, match=r"\.lock is a symbolic link"), folder_lock(tmp_path / "run"):
        pass
    assert victim.read_text() == "precious"
    from mtprune.io import append_line, write_json

    os.symlink(victim, tmp_path / "run" / "metrics.jsonl")
    with pytest.raises(UsageError, match=r"metrics.jsonl is a symbolic link"):
        append_line(tmp_path / "run" / "metrics.jsonl", "{}")
    os.symlink(victim, tmp_path / "run" / "done.json")
    write_json(tmp_path / "run" / "done.json", {"a": 1})  # an atomic write replaces the link, not its target
    assert victim.read_text() == "precious" and not (tmp_path / "run" / "done.json").is_symlink()
