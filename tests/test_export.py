"""ONNX export of pruned nets: ONNX Runtime's output equals PyTorch's (1e-4), also at another input size."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from tests.conftest import tiny

from mtprune.cli import main
from mtprune.pruning import prune

ort = pytest.importorskip("onnxruntime", reason="the export extra (onnx, onnxruntime) is not installed")


@pytest.mark.parametrize("name", ["deeplabv3_resnet18", "pspnet_resnet18", "bisenet_resnet18"])
def test_pruned_net_exports_and_matches_pytorch(tmp_path, name):
    from mtprune.export import compare_onnx, export_onnx

    m = tiny(name)
    prune(m, "bn", 0.5)
    path = export_onnx(m, tmp_path / "m.onnx", (64, 64), dynamic=True)
    diff = compare_onnx(m, path, (64, 64))
    assert diff["max_abs_diff"] < 1e-4 and diff["max_rel_diff"] < 1e-4
    sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    # dynamic batch, and (but for PSPNet, whose pyramid bins fix the size) dynamic height and width
    x = torch.randn(2, 3, 64, 64) if name.startswith("pspnet") else torch.randn(2, 3, 96, 128)
    with torch.no_grad():
        ref = m(x).numpy()
    out = sess.run(None, {"image": x.numpy()})[0]
    assert out.shape == ref.shape and np.abs(out - ref).max() < 1e-4


def test_export_cli(tmp_path, capsys):
    import json

    assert (
        main(
            [
                "init",
                "--model",
                "deeplabv3_resnet18",
                "--num-classes",
                "3",
                "--width",
                "0.125",
                "--out",
                str(tmp_path / "d"),
            ]
        )
        == 0
    )
    capsys.readouterr()
    assert (
        main(
            [
                "export",
                "--checkpoint",
                str(tmp_path / "d"),
                "--onnx",
                str(tmp_path / "d.onnx"),
                "--size",
                "48",
                "48",
                "--check",
                "--latency",
                "--json",
            ]
        )
        == 0
    )
    out = json.loads(capsys.readouterr().out)
    assert out["max_abs_diff"] < 1e-4 and out["max_rel_diff"] < 1e-4 and out["latency_ms"] > 0
    assert (tmp_path / "d.onnx").stat().st_size > 10_000


def test_unaligned_convs_are_found_and_round_to_8_removes_them(capsys, tmp_path):
    from mtprune.checkpoint import save_model
    from mtprune.export import unaligned_convs

    dense = tiny("deeplabv3_resnet18")  # width 0.25: 16…128 channels, 5 classes
    assert unaligned_convs(dense) == []  # the stem's 3 inputs and the 5 logits do not count
    m = tiny("deeplabv3_resnet18")
    prune(m, "bn", 0.5)  # random γ: irregular counts
    odd = unaligned_convs(m)
    convs = dict(m.named_modules())
    assert odd and all(convs[n].in_channels % 8 or convs[n].out_channels % 8 for n in odd)
    m8 = tiny("deeplabv3_resnet18")
    prune(m8, "bn", 0.5, round_to=8)
    assert unaligned_convs(m8) == []
    save_model(m, tmp_path / "p")
    assert (
        main(["export", "--checkpoint", str(tmp_path / "p"), "--onnx", str(tmp_path / "p.onnx"), "--size", "32", "32"])
        == 0
    )
    assert f"note: {len(odd)} convolutions have channel counts that are not multiples of 8" in capsys.readouterr().out


@pytest.mark.parametrize("external", [False, True])
def test_exported_files_run_anywhere_and_re_exports_leave_nothing_behind(tmp_path, monkeypatch, external):
    """One self-contained .onnx when the weights fit in a protobuf; else name.onnx + name.onnx.data (a stable
    name it references); copied to another folder, they run the same; a re-export orphans nothing."""
    import shutil

    import mtprune.export as ex

    if external:  # what a model over 2 GB gets, on a tiny one
        monkeypatch.setattr(ex, "PROTOBUF_LIMIT", 0)
    m = tiny("deeplabv3_resnet18")
    for _ in range(2):
        ex.export_onnx(m, tmp_path / "d" / "m.onnx", (64, 64))
    names = sorted(p.name for p in (tmp_path / "d").iterdir())
    assert names == (["m.onnx", "m.onnx.data"] if external else ["m.onnx"])
    (tmp_path / "elsewhere").mkdir()
    for n in names:
        shutil.copy(tmp_path / "d" / n, tmp_path / "elsewhere" / n)
    diff = ex.compare_onnx(m, tmp_path / "elsewhere" / "m.onnx", (64, 64))
    assert diff["max_abs_diff"] < 1e-4
    if external:  # back to one file: the stale data file goes
        monkeypatch.setattr(ex, "PROTOBUF_LIMIT", 2**31)
        ex.export_onnx(m, tmp_path / "d" / "m.onnx", (64, 64))
        assert sorted(p.name for p in (tmp_path / "d").iterdir()) == ["m.onnx"]


def test_adaptive_pooling_with_uneven_windows_exports_as_matrix_products(tmp_path):
    import onnx

    from mtprune.export import PoolByMatmul, export_onnx, pools_by_matmul

    x = torch.randn(2, 5, 13, 65)
    for out in ((6, 3), (2, 2), (1, 6)):
        ref = torch.nn.functional.adaptive_avg_pool2d(x, out)
        assert torch.allclose(PoolByMatmul(out, (13, 65))(x), ref, atol=1e-6)
    m = tiny("pspnet_resnet18")  # 64² input: 8² features, pyramid bins 1, 2, 3, 6 (3 and 6 do not divide 8)
    swapped = pools_by_matmul(m, (64, 64))
    kinds = {n: type(q).__name__ for n, q in swapped.named_modules() if "pool" in n.split(".")[-1]}
    assert sorted(k for k in kinds.values() if k == "PoolByMatmul") == ["PoolByMatmul"] * 2
    assert not any(isinstance(q, PoolByMatmul) for q in m.modules())  # the model itself is left as it was
    ops = {n.op_type for n in onnx.load(export_onnx(m, tmp_path / "p.onnx", (64, 64))).graph.node}
    assert "MatMul" in ops and not ops & {"GatherND", "Where"}
    deeplab = tiny("deeplabv3_resnet18")  # its only adaptive pooling is global: nothing to swap
    assert pools_by_matmul(deeplab, (64, 64)) is deeplab
