"""The README's "Your own model" example, run as written (issue 18): its factory and commands, a tiny
``mtprune run`` with every method on it, every method's plan equal to the masked net, and a checkpoint that
loads from a copied folder after the factory's file is gone."""

from __future__ import annotations

import json
import re
import shlex
import shutil
from pathlib import Path

import pytest
import torch
from tests.test_any_model import _spread_gammas, every_method_equals_masked
from tests.test_pipeline import TINY

from mtprune import build_model, load_model
from mtprune.cli import main

README = Path(__file__).resolve().parents[1] / "README.md"


def _block(marker: str) -> str:
    text = README.read_text()
    m = re.search(rf"<!-- your-own-model: {marker} -->\n```\w+\n(.*?)```", text, re.S)
    assert m, f"README has no '{marker}' block"
    return m.group(1)


@pytest.fixture
def mynet(tmp_path, monkeypatch) -> Path:
    monkeypatch.chdir(tmp_path)
    (tmp_path / "mynet.py").write_text(_block("mynet.py"))
    return tmp_path


def test_the_readme_commands_run_as_written(mynet, capsys):
    for line in _block("commands").strip().splitlines():
        argv = shlex.split(line)
        assert argv[0] == "mtprune" and main(argv[1:]) == 0, line
    assert (mynet / "runs" / "mynet-p50.onnx").is_file()
    copied = mynet / "elsewhere"
    shutil.copytree(mynet / "runs" / "mynet-p50", copied)
    (mynet / "mynet.py").unlink()  # the checkpoint carries model_src.py
    model = load_model(copied)
    assert model.name == "python:mynet.py:make" and model(torch.randn(1, 3, 32, 32)).shape == (1, 6, 32, 32)


def test_its_groups_and_every_method_s_plan(mynet):
    model = build_model("python:mynet.py:make", 6, 10)
    assert [lay.conv for lay in model.prunable_layers()] == [
        "backbone.stem.0",
        "backbone.low.0",
        "backbone.low.6",
        "backbone.high.0",
        "backbone.high.6",
        "decoder.decoder.fuse.0",
    ]
    _spread_gammas(model)
    every_method_equals_masked(model, mynet)


def test_mtprune_run_with_every_method_on_it(mynet):
    (mynet / "my.yaml").write_text(
        "model: {name: 'python:mynet.py:make', model_args: {width: 8}}\n"
        "run:\n  methods: [mtp, slimming, uniform, fpgm, thinet]\n  thinet_samples: 8\n  ratios: [0.5]\n"
        "  latency: false\n"
    )
    argv = ["run", "my.yaml", "--out", "runs/my"]
    for s in TINY:
        if not s.startswith(("run.", "model.")):
            argv += ["--set", s]
    assert main(argv) == 0
    rows = {r["tag"]: r for r in json.loads((mynet / "runs" / "my" / "results.json").read_text())}
    assert {"dense", "mtp-0.5-independent", "slimming-0.5-independent", "uniform-0.5", "fpgm-0.5", "thinet-0.5"} <= set(
        rows
    )
    assert all(0 < r["params_ratio"] < 1 for t, r in rows.items() if t != "dense")
