from __future__ import annotations

import json

import pytest
import torch

from mtprune import load_model
from mtprune.cli import main
from mtprune.cost.runtimes import onnxruntime_installed


def test_version_and_help(capsys):
    with pytest.raises(SystemExit) as e:
        main(["--version"])
    assert e.value.code == 0
    assert "mtprune" in capsys.readouterr().out
    with pytest.raises(SystemExit):
        main(["--help"])
    out = capsys.readouterr().out
    for cmd in ("init", "cost", "prune"):
        assert cmd in out


def test_init_prune_cost_roundtrip(tmp_path, capsys):
    dense = tmp_path / "dense"
    assert (
        main(
            [
                "init",
                "--model",
                "deeplabv3_resnet18",
                "--num-classes",
                "5",
                "--width",
                "0.25",
                "--cls-classes",
                "7",
                "--out",
                str(dense),
            ]
        )
        == 0
    )
    out = tmp_path / "p50"
    assert (
        main(
            [
                "prune",
                "--checkpoint",
                str(dense),
                "--method",
                "uniform",
                "--ratio",
                "0.5",
                "--size",
                "64",
                "64",
                "--out",
                str(out),
                "--json",
            ]
        )
        == 0
    )
    summary = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert summary["after"]["params"] < summary["before"]["params"]
    assert summary["after"]["macs"] < summary["before"]["macs"]
    plan = json.loads((out / "plan.json").read_text())
    assert plan["method"] == "uniform" and plan["ratio"] == 0.5
    model = load_model(out)
    for name, lp in plan["layers"].items():
        assert model.get_submodule(name).out_channels == lp["kept_count"] == lp["channels"] // 2
    assert main(["cost", "--checkpoint", str(out), "--size", "64", "64", "--json"]) == 0
    cost = json.loads(capsys.readouterr().out)
    assert cost["params"] == summary["after"]["params"] and cost["macs"] == summary["after"]["macs"]
    assert cost["size"] == [64, 64]
    with torch.no_grad():
        assert model(torch.zeros(1, 3, 32, 32)).shape == (1, 5, 32, 32)


def test_cost_keys_with_latency(capsys):
    assert (
        main(
            [
                "cost",
                "--model",
                "bisenet_resnet18",
                "--num-classes",
                "3",
                "--width",
                "0.125",
                "--size",
                "32",
                "32",
                "--latency",
                "--json",
            ]
        )
        == 0
    )
    cost = json.loads(capsys.readouterr().out)
    assert {"params", "macs", "size", "latency_ms", "latency_iqr_ms", "device"} <= set(cost)
    assert cost["latency_ms"] > 0


def test_cost_best_and_per_layer(capsys):
    base = ["cost", "--model", "deeplabv3_resnet18", "--num-classes", "3", "--width", "0.125", "--size", "32", "32"]
    assert main([*base, "--latency", "--runtime", "best", "--per-layer", "--json"]) == 0
    cost = json.loads(capsys.readouterr().out)
    assert len(cost["configs"]) == 4 + onnxruntime_installed()
    assert cost["best"]["setup"] in [c["setup"] for c in cost["configs"]]  # timed again alone: its own figures
    fastest = min(cost["configs"], key=lambda c: c["latency_ms"])
    assert cost["latency_ms"] == cost["best"]["latency_ms"] and cost["best"]["setup"] == fastest["setup"]
    assert sum(r["macs"] for r in cost["layers"]) == cost["macs"]
    assert {"name", "kind", "in_channels", "out_channels", "out_size", "ms", "gmacs_per_s"} <= set(cost["layers"][0])
    assert main([*base, "--latency", "--runtime", "eager,channels-last"]) == 0
    text = capsys.readouterr().out.splitlines()
    assert sum("← fastest" in ln for ln in text) == 1  # the winner of the round-robin, marked once
    (alone,) = [ln for ln in text if ln.startswith("fastest ")]
    assert "timed alone:" in alone and " ms median" in alone
    assert main([*base, "--per-layer", "--top", "3"]) == 0
    text = capsys.readouterr().out
    by_kind = next(ln for ln in text.splitlines() if "by kind:" in ln)  # kinds ordered by time: any order
    assert "Conv2d" in by_kind and "BatchNorm2d" in by_kind and "outside modules" in by_kind
    assert main([*base, "--runtime", "best"]) == 2
    assert "--runtime / --timing: only when nets are timed" in capsys.readouterr().err
    assert main([*base, "--latency", "--best"]) == 2
    assert "--best is now --runtime best" in capsys.readouterr().err


@pytest.mark.parametrize(
    "argv, needle",
    [
        (["--ratio", "1.5"], "ratio 1.5 outside (0, 1)"),
        (["--ratio", "0"], "outside (0, 1)"),
        (["--ratio", "half"], "invalid ratio 'half'"),
        (["--method", "magic"], "invalid choice: 'magic'"),
        (["--model", "unet"], "unknown model 'unet'"),
    ],
)
def test_prune_bad_arguments_one_line_exit_2_nothing_written(tmp_path, capsys, argv, needle):
    base = {"--model": "deeplabv3_resnet18", "--method": "bn", "--ratio": "0.5"}
    base.update(dict(zip(argv[::2], argv[1::2], strict=True)))
    args = ["prune", "--num-classes", "5", "--width", "0.25", "--out", str(tmp_path / "out")]
    for k, v in base.items():
        args += [k, v]
    try:
        code = main(args)
    except SystemExit as e:  # argparse-level errors
        code = e.code
    err = capsys.readouterr().err.strip()
    assert code == 2
    assert len(err.splitlines()) == 1 and needle in err
    assert not (tmp_path / "out").exists()


def test_checkpoint_of_another_arch_is_one_line_exit_1(tmp_path, capsys):
    assert (
        main(
            [
                "init",
                "--model",
                "deeplabv3_resnet18",
                "--num-classes",
                "5",
                "--width",
                "0.25",
                "--out",
                str(tmp_path / "a"),
            ]
        )
        == 0
    )
    assert (
        main(
            [
                "init",
                "--model",
                "deeplabv3_resnet18",
                "--num-classes",
                "5",
                "--width",
                "0.5",
                "--out",
                str(tmp_path / "b"),
            ]
        )
        == 0
    )
    (tmp_path / "a" / "model.safetensors").write_bytes((tmp_path / "b" / "model.safetensors").read_bytes())
    capsys.readouterr()
    code = main(["cost", "--checkpoint", str(tmp_path / "a"), "--size", "32", "32"])
    err = capsys.readouterr().err.strip()
    assert code == 1 and len(err.splitlines()) == 1
    assert "tensor 'backbone.conv1.weight' has shape (32, 3, 7, 7), arch.json expects (16, 3, 7, 7)" in err


def dense_and_pruned(tmp_path, capsys, size=("32", "32")) -> list[str]:
    """A tiny dense checkpoint ``d`` and its uniform 0.5× prune ``p``: ``cost --checkpoint p --against d --size``."""
    main(["init", "--model", "deeplabv3_resnet18", "--num-classes", "3", "--width", "0.125",
          "--out", str(tmp_path / "d")])  # fmt: skip
    main(["prune", "--checkpoint", str(tmp_path / "d"), "--method", "uniform", "--ratio", "0.5", "--size", *size,
          "--out", str(tmp_path / "p")])  # fmt: skip
    capsys.readouterr()
    return ["cost", "--checkpoint", str(tmp_path / "p"), "--against", str(tmp_path / "d"), "--size", *size]


def test_cost_against_prints_the_paired_ratios_and_each_nets_setup(tmp_path, capsys):
    args = dense_and_pruned(tmp_path, capsys)
    assert main([*args, "--latency", "--runtime", "best", "--timing", "threads=1", "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    for key in ("latency_ratio", "latency_ratio_iqr", "latency_ms", "against_latency_ms", "macs_ratio", "params_ratio"):
        assert out[key] > 0
    assert out["gap"] == out["latency_ratio"] - out["macs_ratio"] and out["macs_ratio"] < 0.7
    assert (
        out["config"]["layout"] in ("contiguous", "channels_last")
        and len(out["configs"]) == 4 + onnxruntime_installed()
    )
    assert main(args) == 0
    assert "MACs" in capsys.readouterr().out


def test_cost_against_per_layer_compares_both_nets_layer_by_layer_in_the_same_rounds(tmp_path, capsys):
    args = dense_and_pruned(tmp_path, capsys)
    assert main([*args, "--per-layer", "--runtime", "channels-last+fold-bn", "--timing", "threads=1", "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["layers_setup"] == {"layout": "channels_last", "fold_bn": True} and out["layers_runs"] == 20
    rows = {r["name"]: r for r in out["layers"]}
    assert "backbone.layer1.0.bn1" not in rows  # folded
    conv = rows["backbone.layer1.0.conv1"]
    assert conv["out_channels"] < conv["against_out_channels"] and conv["work_ratio"] < 0.7
    assert rows["(outside modules)"]["kind"] == "functional" and out["layers_ratio"] > 0
    ideal = sum(r["work_ratio"] * r["against_ms"] for r in out["layers"]) / sum(r["against_ms"] for r in out["layers"])
    assert out["layers_ideal_ratio"] == pytest.approx(ideal) and 0 < ideal < 1  # the floor the rows imply
    # with --runtime best: the layers in this net's fastest eager PyTorch setup
    assert (
        main([*args, "--latency", "--runtime", "best", "--per-layer", "--top", "4", "--timing", "threads=1", "--json"])
        == 0
    )
    out = json.loads(capsys.readouterr().out)
    eager = [c for c in out["configs"] if c["runtime"] == "torch" and not c["compile"]]
    fastest = min(eager, key=lambda c: c["latency_ms"])
    assert out["layers_setup"] == {"layout": fastest["layout"], "fold_bn": fastest["fold_bn"]}
    assert main([*args, "--per-layer", "--top", "4", "--timing", "threads=1"]) == 0
    text = capsys.readouterr().out
    assert "per layer, both nets in the same 20 rounds (contiguous;" in text and "by kind (against → this" in text
    assert text.count("→") >= 4 and "Conv2d" in text


def test_cost_onnxruntime_times_the_exported_net_alone_and_against_another(tmp_path, capsys):
    pytest.importorskip("onnxruntime")
    base = ["--size", "32", "32", "--timing", "threads=1"]
    main(["init", "--model", "deeplabv3_resnet18", "--num-classes", "3", "--width", "0.125",
          "--out", str(tmp_path / "d")])  # fmt: skip
    main(["prune", "--checkpoint", str(tmp_path / "d"), "--method", "uniform", "--ratio", "0.5", "--size", "32", "32",
          "--out", str(tmp_path / "p")])  # fmt: skip
    capsys.readouterr()
    one = ["cost", "--checkpoint", str(tmp_path / "p"), *base, "--latency"]
    assert main([*one, "--runtime", "onnxruntime", "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["latency_ms"] > 0
    assert main([*one, "--runtime", "onnxruntime"]) == 0
    assert "ONNX Runtime" in capsys.readouterr().out
    assert main([*one, "--runtime", "onnxruntime+fold-bn"]) == 2
    assert "ONNX Runtime folds BN and picks its layout" in capsys.readouterr().err
    assert main([*one, "--runtime", "best,onnxruntime", "--json"]) == 0
    best = json.loads(capsys.readouterr().out)
    assert [c["runtime"] for c in best["configs"]] == ["torch"] * 4 + ["onnxruntime"]
    against = [*one, "--against", str(tmp_path / "d"), "--runtime", "best,onnxruntime"]
    assert main([*against, "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert len(out["configs"]) == 5 and out["configs"][-1]["runtime"] == "onnxruntime"
    assert out["configs"][-1]["same_setup_ratio"] > 0 and out["gap"] == out["latency_ratio"] - out["macs_ratio"]
    assert main(against) == 0
    assert "ONNX Runtime (CPU)" in capsys.readouterr().out
