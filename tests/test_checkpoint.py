from __future__ import annotations

import json
import shutil

import pytest
import torch
from tests.conftest import tiny

from mtprune import load_model, save_model
from mtprune.errors import CheckpointError
from mtprune.pruning import prune


@pytest.mark.parametrize("name", ["deeplabv3_resnet18", "pspnet_resnet18", "bisenet_resnet18"])
def test_pruned_model_save_load_gives_identical_outputs(tmp_path, name):
    m = tiny(name)
    prune(m, "bn", 0.5, round_to=2)
    save_model(m, tmp_path / "a")
    shutil.copytree(tmp_path / "a", tmp_path / "copied")  # a directory copied elsewhere still loads
    loaded = load_model(tmp_path / "copied").eval()
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        assert torch.allclose(m(x), loaded(x), atol=1e-6, rtol=0)
        assert torch.allclose(m.forward_cls(x), loaded.forward_cls(x), atol=1e-6, rtol=0)
    for (k, a), (k2, b) in zip(m.state_dict().items(), loaded.state_dict().items(), strict=True):
        assert k == k2 and torch.equal(a, b)
    arch = json.loads((tmp_path / "a" / "arch.json").read_text())
    assert arch["model"] == name and arch["channels"] and arch["mtprune_version"]
    assert not list((tmp_path / "a").glob("*.tmp"))


def test_dense_checkpoint_has_no_channel_changes(tmp_path):
    save_model(tiny("deeplabv3_resnet18"), tmp_path)
    assert json.loads((tmp_path / "arch.json").read_text())["channels"] == {}


def test_weights_of_another_arch_fail_with_one_line_naming_the_tensor(tmp_path):
    pruned = tiny("deeplabv3_resnet18")
    prune(pruned, "bn", 0.5)
    save_model(pruned, tmp_path / "pruned")
    save_model(tiny("deeplabv3_resnet18"), tmp_path / "dense")
    # dense weights under a pruned arch
    shutil.copy(tmp_path / "dense" / "model.safetensors", tmp_path / "pruned" / "model.safetensors")
    with pytest.raises(CheckpointError) as e:
        load_model(tmp_path / "pruned")
    msg = str(e.value)
    assert "\n" not in msg and "backbone.layer1.0.conv1.weight" in msg and "shape" in msg
    # another model entirely
    save_model(tiny("bisenet_resnet18"), tmp_path / "bise")
    shutil.copy(tmp_path / "bise" / "model.safetensors", tmp_path / "dense" / "model.safetensors")
    with pytest.raises(CheckpointError, match="tensor '.*'"):
        load_model(tmp_path / "dense")


def test_truncated_and_missing_files(tmp_path):
    save_model(tiny("bisenet_resnet18"), tmp_path)
    w = tmp_path / "model.safetensors"
    w.write_bytes(w.read_bytes()[: w.stat().st_size // 2])
    with pytest.raises(CheckpointError, match="truncated or corrupt"):
        load_model(tmp_path)
    w.unlink()
    with pytest.raises(CheckpointError, match="weights file not found"):
        load_model(tmp_path)
    with pytest.raises(CheckpointError, match="not found"):
        load_model(tmp_path / "nowhere")
    (tmp_path / "arch.json").write_text("{not json")
    with pytest.raises(CheckpointError, match="not valid JSON"):
        load_model(tmp_path)
