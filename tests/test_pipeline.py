"""``mtprune run`` end to end on a tiny config: results.json rows, cost ratios, stage reuse, resume."""

from __future__ import annotations

import json
import math

import pytest
from tests.conftest import crash_at

from mtprune.cli import main
from mtprune.config import load_config
from mtprune.cost import count_macs, count_params
from mtprune.pipeline import run_pipeline

TINY = [
    "model.width=0.125",
    "data.cls.options={num_samples: 32, image_size: 32}",
    "data.cls.val_options={num_samples: 8}",
    "data.seg.options={num_samples: 16, image_size: 40}",
    "data.seg.val_options={num_samples: 4}",
    "data.cls.size=32",
    "data.seg.crop_size=[32,32]",
    "pretrain_cls.epochs=1",
    "pretrain_cls.batch_size=16",
    "train_seg.epochs=1",
    "train_seg.batch_size=4",
    "sparse_mtp.rounds=2",
    "sparse_mtp.steps_cls=1",
    "sparse_mtp.steps_seg=1",
    "sparse_mtp.cls_batch_size=8",
    "sparse_mtp.seg_batch_size=4",
    "sparse_slimming.epochs=0.5",
    "sparse_slimming.batch_size=4",
    "finetune.cls_epochs=0.5",
    "finetune.seg_epochs=1",
    "finetune.cls_batch_size=16",
    "finetune.seg_batch_size=4",
    "eval.every_epoch=true",
    "run.latency=false",
    "run.qualitative=2",
    "checkpoint_every=2",
]


def tiny_cfg(*extra: str):
    return load_config(overrides=TINY + list(extra))


def _strip(rows):
    return [{k: v for k, v in r.items() if not k.startswith("latency")} for r in rows]


def test_run_gives_a_row_per_method_with_correct_cost_ratios(tmp_path, capsys):
    cfg_path = tmp_path / "tiny.yaml"
    cfg_path.write_text(
        "run:\n  methods: [mtp, slimming, uniform, fpgm, thinet]\n  thinet_samples: 8\n  ratios: [0.5]\n"
        "  thresholds: [independent, unified]\n  without_cls_finetune: true\n  latency: false\n"
    )
    argv = ["run", str(cfg_path), "--out", str(tmp_path / "run")]
    for s in TINY:
        if not s.startswith("run."):
            argv += ["--set", s]
    argv += ["--set", "run.qualitative=2"]
    assert main(argv) == 0
    out = capsys.readouterr().out
    assert "results:" in out and "mtp 0.5×" in out
    rows = json.loads((tmp_path / "run" / "results.json").read_text())
    tags = [r["tag"] for r in rows]
    assert tags[0] == "dense"
    for t in (
        "mtp-0.5-independent",
        "mtp-0.5-unified",
        "slimming-0.5-independent",
        "uniform-0.5",
        "mtp-0.5-independent-nocls",
    ):
        assert t in tags
    keys = {
        "method",
        "ratio",
        "thresholds",
        "miou",
        "delta_miou",
        "params",
        "macs",
        "params_ratio",
        "macs_ratio",
        "latency_ms",
        "latency_ratio",
        "top1",
        "top5",
        "per_class",
    }
    dense = rows[0]
    from mtprune import load_model

    for r in rows:
        assert keys <= set(r)
        assert 0.0 <= r["miou"] <= 1.0 and 0.0 <= r["top1"] <= 1.0
        if r["method"] != "dense":
            assert r["delta_miou"] == pytest.approx(r["miou"] - dense["miou"])
            assert r["params_ratio"] == pytest.approx(r["params"] / dense["params"])
            assert 0.2 < r["macs_ratio"] < 0.9 and 0.2 < r["params_ratio"] < 0.9
            m = load_model(tmp_path / "run" / f"finetune-{r['tag']}")
            assert count_params(m) == r["params"] and count_macs(m, (32, 32)) == r["macs"]
    report = (tmp_path / "run" / "report.md").read_text()
    for heading in ("Comparison", "Table 4", "Table 1", "Tables 5/6", "Table 7", "Fig. 8", "Figs 5/7", "Fig. 4"):
        assert heading in report
    for png in ("miou_vs_macs.png", "channels_0.5.png", "miou_vs_epochs.png", "qualitative.png"):
        assert (tmp_path / "run" / "plots" / png).stat().st_size > 1000


def test_interrupted_run_reuses_finished_stages_and_gives_the_same_results(tmp_path, monkeypatch):
    cfg = tiny_cfg("run.methods=[mtp, uniform]")
    full = run_pipeline(cfg, tmp_path / "full")

    undo = crash_at(monkeypatch, 3, stage="sparse-mtp")
    with pytest.raises(KeyboardInterrupt):
        run_pipeline(cfg, tmp_path / "cut")
    stamp = (tmp_path / "cut" / "train-seg" / "model" / "model.safetensors").stat().st_mtime_ns
    undo()
    again = run_pipeline(cfg, tmp_path / "cut")
    assert (tmp_path / "cut" / "train-seg" / "model" / "model.safetensors").stat().st_mtime_ns == stamp  # reused
    assert _strip(again) == _strip(full)


def test_shipped_configs_are_valid():
    from pathlib import Path

    from mtprune.cli.run_cmds import demo_config_path
    from mtprune.pipeline import check_run_config

    root = Path(__file__).resolve().parents[1] / "configs"
    files = sorted(root.rglob("*.yaml")) + [demo_config_path()]
    assert len(files) >= 6
    for f in files:
        cfg = load_config(f)
        check_run_config(cfg)
        assert cfg.sparse_mtp.rho >= 1.0
    voc = load_config(root / "paper" / "voc_deeplabv3_r101.yaml")
    assert (voc.train_seg.lr, voc.finetune.lr_seg, voc.sparse_mtp.alpha1) == (0.007, 0.0007, 1.0e-3)
    assert voc.data.seg.crop_size == [513, 513] and voc.run.ratios == [0.25, 0.5]


def test_seeds_share_the_pretraining_and_summarise_paired_differences(tmp_path, capsys):
    out = tmp_path / "seeds"
    argv = ["run", "-", "--out", str(out), "--seeds", "0", "1"]
    cfg_path = tmp_path / "tiny.yaml"
    cfg_path.write_text("run:\n  methods: [mtp, slimming, uniform]\n  ratios: [0.5]\n  latency: false\n")
    argv[1] = str(cfg_path)
    for s in TINY:
        argv += ["--set", s]
    assert main(argv) == 0
    printed = capsys.readouterr().out
    assert "Paired differences" in printed and "summary.md" in printed
    assert (out / "pretrain-cls" / "done.json").is_file()
    assert not (out / "seed-0" / "pretrain-cls").exists() and not (out / "seed-1" / "pretrain-cls").exists()
    for s in (0, 1):  # both seeds started from the shared backbone, and ran with their own seed
        done = json.loads((out / f"seed-{s}" / "train-seg" / "model" / "arch.json").read_text())
        assert done["meta"]["init"] == str(out / "pretrain-cls")
        assert "seed: " + str(s) in (out / f"seed-{s}" / "config.yaml").read_text()
    rows = {s: {r["tag"]: r for r in json.loads((out / f"seed-{s}" / "results.json").read_text())} for s in (0, 1)}
    summary = json.loads((out / "summary.json").read_text())
    assert summary["seeds"] == [0, 1]
    mt = summary["models"]["mtp-0.5-independent"]["miou"]
    assert mt["n"] == 2 and mt["values"] == [rows[s]["mtp-0.5-independent"]["miou"] for s in (0, 1)]
    pair = next(
        p for p in summary["paired"] if p["a"] == "mtp-0.5-independent" and p["b"] == "slimming-0.5-independent"
    )
    want = [rows[s]["mtp-0.5-independent"]["miou"] - rows[s]["slimming-0.5-independent"]["miou"] for s in (0, 1)]
    assert pair["miou"]["values"] == pytest.approx(want)
    assert pair["miou"]["mean"] == pytest.approx(sum(want) / 2)
    assert "mtp 0.5× (independent) − slimming" in (out / "summary.md").read_text()


def test_without_cls_finetune_for_some_methods_only():
    from mtprune.errors import UsageError
    from mtprune.layout import variants
    from mtprune.pipeline import check_run_config

    c = tiny_cfg("run.methods=[mtp, uniform]", "run.without_cls_finetune=[mtp]")
    check_run_config(c)
    assert [v.tag for v in variants(c.run)] == ["mtp-0.5-independent", "mtp-0.5-independent-nocls", "uniform-0.5"]
    assert len(variants(tiny_cfg("run.methods=[mtp, uniform]", "run.without_cls_finetune=true").run)) == 4
    with pytest.raises(UsageError, match="'slimming' is not one of run.methods"):
        check_run_config(tiny_cfg("run.methods=[mtp, uniform]", "run.without_cls_finetune=[slimming]"))


def test_layerwise_thresholds_are_a_variant_paired_with_independent_and_uniform():
    from mtprune.layout import variants
    from mtprune.pipeline import check_run_config
    from mtprune.report.seeds import _pairs

    c = tiny_cfg("run.methods=[mtp, uniform]", "run.thresholds=[independent, layerwise]")
    check_run_config(c)
    vs = variants(c.run)
    assert [v.tag for v in vs] == ["mtp-0.5-independent", "mtp-0.5-layerwise", "uniform-0.5"]
    rows = [v.as_dict() for v in vs]
    pairs = {(a, b) for _, a, b in _pairs(rows)}
    assert pairs == {
        ("mtp-0.5-independent", "uniform-0.5"),
        ("mtp-0.5-layerwise", "uniform-0.5"),
        ("mtp-0.5-independent", "mtp-0.5-layerwise"),
    }


def test_run_config_rejects_too_few_latency_rounds_before_training(monkeypatch):
    from mtprune.errors import UsageError
    from mtprune.pipeline import check_run_config

    check_run_config(tiny_cfg("run.latency=true", "run.timing.runs=20"))
    check_run_config(tiny_cfg("run.latency=false", "run.timing.runs=5"))  # not timed: not checked
    with pytest.raises(UsageError, match="run.timing.runs: 5 is below 20"):
        check_run_config(tiny_cfg("run.latency=true", "run.timing.runs=5"))
    with pytest.raises(UsageError, match="run.timing.threads: 0 must be ≥ 1"):
        check_run_config(tiny_cfg("run.latency=true", "run.timing.threads=0"))
    import mtprune.pipeline.run as run_mod

    if run_mod.can_cache():
        check_run_config(tiny_cfg("run.timing.host_memory=cached"))
    monkeypatch.setattr(run_mod, "can_cache", lambda: False)  # as off glibc (musl, macOS)
    with pytest.raises(UsageError, match="run.timing.host_memory: cached needs glibc"):
        check_run_config(tiny_cfg("run.timing.host_memory=cached"))
    with pytest.raises(UsageError, match="host_memory"):  # not one of system | cached
        check_run_config(tiny_cfg("run.timing.host_memory=lots"))


def test_latency_stage_times_every_model_against_dense_and_is_reused(tmp_path, monkeypatch):
    from tests.conftest import tiny

    import mtprune.pipeline.stages as pl
    from mtprune.checkpoint import save_model
    from mtprune.pipeline import execute
    from mtprune.pruning import prune

    dense, pruned = tiny("deeplabv3_resnet18"), tiny("deeplabv3_resnet18")
    prune(pruned, "uniform", 0.5)
    save_model(dense, tmp_path / "d")
    save_model(pruned, tmp_path / "p")
    cfg = tiny_cfg("run.latency=true", "run.timing.threads=1", "run.timing.runtime=eager")
    lat = execute(pl.latency({"dense": tmp_path / "d", "uniform-0.5": tmp_path / "p"}, cfg, tmp_path / "latency"))
    assert lat["dense"]["ratio"] == 1.0 and lat["uniform-0.5"]["ratio"] > 0
    assert lat["uniform-0.5"]["latency_ms"] > 0 and lat["dense"]["latency_device"] == "cpu (1 threads)"
    calls = []
    monkeypatch.setattr(pl, "latency_against", lambda *a, **k: calls.append(a) or {})
    again = execute(pl.latency({"dense": tmp_path / "d", "uniform-0.5": tmp_path / "p"}, cfg, tmp_path / "latency"))
    assert again == lat and not calls  # the same models: reused
    # the same tags but another model behind one of them: timed again (here by the stub, which returns {})
    other = tiny("deeplabv3_resnet18", seed=5)
    prune(other, "uniform", 0.5)
    save_model(other, tmp_path / "p")
    both = {"dense": tmp_path / "d", "uniform-0.5": tmp_path / "p"}
    assert execute(pl.latency(both, cfg, tmp_path / "latency")) == {}
    assert len(calls) == 1
    # another set of models: timed again
    assert execute(pl.latency({"dense": tmp_path / "d"}, cfg, tmp_path / "latency")) == {}
    assert len(calls) == 2
    # a stage an older mtprune timed (every model in one round-robin): timed again
    recipe = json.loads((tmp_path / "latency" / "recipe.json").read_text())
    (tmp_path / "latency" / "recipe.json").write_text(json.dumps({k: v for k, v in recipe.items() if k != "timed"}))
    assert execute(pl.latency({"dense": tmp_path / "d"}, cfg, tmp_path / "latency")) == {}
    assert len(calls) == 3


def test_latency_stage_times_with_the_configured_host_memory_and_reports_page_faults(tmp_path, monkeypatch):
    from tests.conftest import tiny

    import mtprune.pipeline.stages as pl
    from mtprune.checkpoint import save_model
    from mtprune.cost.host_memory import can_cache, host_memory
    from mtprune.pipeline import execute

    if not can_cache():
        pytest.skip("cached host memory needs glibc")
    save_model(tiny("deeplabv3_resnet18"), tmp_path / "d")
    save_model(tiny("deeplabv3_resnet18", seed=3), tmp_path / "p")
    models = {"dense": tmp_path / "d", "other": tmp_path / "p"}
    lat = execute(
        pl.latency(models, tiny_cfg("run.timing.threads=1", "run.timing.runtime=eager"), tmp_path / "latency")
    )
    assert {e["host_memory"] for e in lat.values()} == {"system"}
    assert all(isinstance(e["page_faults"], int) and e["page_faults"] >= 0 for e in lat.values())
    seen: list[str] = []
    real = pl.latency_against
    monkeypatch.setattr(pl, "latency_against", lambda *a, **k: seen.append(host_memory()) or real(*a, **k))
    cached = tiny_cfg("run.timing.threads=1", "run.timing.runtime=eager", "run.timing.host_memory=cached")
    lat = execute(pl.latency(models, cached, tmp_path / "latency"))  # another setting: timed again, cached
    assert seen == ["cached"] and {e["host_memory"] for e in lat.values()} == {"cached"}
    assert host_memory() == "system"  # left as it was after the stage


def test_run_rows_take_the_paired_latency_of_the_latency_stage(tmp_path):
    cfg = tiny_cfg(
        "run.methods=[uniform]",
        "run.pretrain=false",
        "run.latency=true",
        "run.timing.threads=1",
        "run.timing.runtime=eager",
        "run.qualitative=0",
    )
    rows = run_pipeline(cfg, tmp_path / "r", progress=lambda m: None)
    lat = json.loads((tmp_path / "r" / "latency" / "done.json").read_text())["latency"]
    assert sorted(lat) == ["dense", "uniform-0.5"]
    for r in rows:
        assert r["latency_ratio"] == lat[r["tag"]]["ratio"] and r["latency_ms"] == lat[r["tag"]]["latency_ms"]
        assert r["latency_setup"] == lat[r["tag"]]["setup"] == "eager" and r["latency_size"] == [32, 32]
    assert rows[0]["latency_ratio"] == 1.0
    report = (tmp_path / "r" / "report.md").read_text()
    assert "| latency at 32×32 |" in report and " eager |" in report  # the size and the setup beside the column
    assert json.loads((tmp_path / "r" / "results.json").read_text())[1]["latency_ratio"] == rows[1]["latency_ratio"]
    # a rerun with one more model re-times them all and says so; a rerun with the same models reuses
    said: list[str] = []
    more = tiny_cfg(
        "run.methods=[uniform, fpgm]",
        "run.pretrain=false",
        "run.latency=true",
        "run.timing.threads=1",
        "run.timing.runtime=eager",
        "run.qualitative=0",
    )
    run_pipeline(more, tmp_path / "r", progress=said.append)
    assert "[latency] running" in said and "[train-seg] reused" in said
    said.clear()
    run_pipeline(more, tmp_path / "r", progress=said.append)
    assert "[latency] reused" in said


def test_a_run_times_its_nets_at_the_timing_size_and_counts_macs_at_the_cost_size(tmp_path):
    from tests.conftest import tiny

    import mtprune.pipeline.stages as pl
    from mtprune.checkpoint import save_model
    from mtprune.errors import UsageError
    from mtprune.pipeline import execute

    save_model(tiny("deeplabv3_resnet18"), tmp_path / "d")
    save_model(tiny("deeplabv3_resnet18", seed=3), tmp_path / "p")
    cfg = tiny_cfg("run.timing.size=[48, 40]", "run.timing.runtime=eager,fold-bn", "run.timing.threads=1")
    assert pl.timing_size(cfg) == (48, 40) and pl.cost_size(cfg) == (32, 32)
    lat = execute(pl.latency({"dense": tmp_path / "d", "p": tmp_path / "p"}, cfg, tmp_path / "latency"))
    done = json.loads((tmp_path / "latency" / "done.json").read_text())
    assert done["size"] == [48, 40] and {e["setup"] for e in lat.values()} <= {"eager", "fold-bn"}
    with pytest.raises(UsageError, match="run.timing.size: \\[48\\] is not \\[H, W\\]"):
        tiny_cfg("run.timing.size=[48]")


def test_equal_seg_steps_extends_the_fine_tuning_of_shorter_sparse_stages(tmp_path):
    from mtprune.pipeline import extended_seg_epochs, extra_seg_steps
    from mtprune.train.engine import DONE_FILE

    # 16 images, batch 4: 4 steps an epoch. Sparse stages: mtp 3 rounds × 1 seg step = 3, slimming 0.5
    # epoch = 2, uniform none; fine-tuning 1 cls step (0.5 × 32/16) + 4 seg steps (1 epoch)
    c = tiny_cfg(
        "run.methods=[mtp, slimming, uniform]",
        "run.equal_seg_steps=true",
        "sparse_mtp.rounds=3",
        "eval.every_epoch=false",
        "run.qualitative=0",
    )
    assert extra_seg_steps(c) == {"mtp": 0, "slimming": 1, "uniform": 3}
    assert extra_seg_steps(tiny_cfg("run.methods=[mtp, uniform]")) == {"mtp": 0, "uniform": 0}  # off by default
    alt = tiny_cfg("run.methods=[mtp, uniform]", "run.equal_seg_steps=true", "sparse_mtp.mode=alternating")
    assert extra_seg_steps(alt) == {"mtp": 0, "uniform": 4}  # alternating: an Eq. 8 and an Eq. 9 pass a step
    rows = run_pipeline(c, tmp_path / "run")
    steps = {}
    for r in rows[1:]:
        steps[r["method"]] = json.loads((tmp_path / "run" / f"finetune-{r['tag']}" / DONE_FILE).read_text())["steps"]
        assert r["extra_seg_steps"] == {"mtp": 0, "slimming": 1, "uniform": 3}[r["method"]]
    assert steps == {"mtp": 1 + 4, "slimming": 1 + 4 + 1, "uniform": 1 + 4 + 3}
    report = (tmp_path / "run" / "report.md").read_text()
    assert "fine-tuning extended by 1 steps for slimming 0.5× (independent), 3 steps for uniform" in report
    # the epochs that give exactly the steps, whatever the rounding (3 steps an epoch: ceil(1.7 × 3) = 6)
    odd = tiny_cfg("finetune.seg_epochs=1.7", "finetune.seg_batch_size=5")
    for extra in (1, 2, 7, 100):
        e = extended_seg_epochs(odd, extra)
        assert math.ceil(e * 3) == 6 + extra


def test_a_rerun_with_a_changed_recipe_stops_at_the_first_changed_stage(tmp_path):
    from mtprune.errors import MtpruneError

    base = ("run.methods=[uniform]", "run.pretrain=false", "run.qualitative=0", "eval.every_epoch=false")
    run = tmp_path / "r"
    run_pipeline(tiny_cfg(*base), run, progress=lambda m: None)
    results = (run / "results.json").read_bytes()
    # more ratios in the same folder: the finished stages are reused, the new ones run
    said: list[str] = []
    rows = run_pipeline(tiny_cfg(*base, "run.ratios=[0.25, 0.5]"), run, progress=said.append)
    assert [r["tag"] for r in rows] == ["dense", "uniform-0.25", "uniform-0.5"]
    assert "[finetune-uniform-0.5] reused" in said and "[finetune-uniform-0.25] running" in said
    results = (run / "results.json").read_bytes()
    # a changed fine-tuning budget, pruning rule or evaluation: stopped at the first stage it changes
    for key, stage, shown in (
        ("finetune.seg_epochs=2", "finetune-uniform-0.25", "finetune.seg_epochs: 1.0 → 2.0"),
        ("run.round_to=8", "prune-uniform-0.25", "run.round_to: 1 → 8"),
        ("eval.max_images=2", "eval-dense", "eval.max_images: null → 2"),
    ):
        with pytest.raises(MtpruneError) as e:
            run_pipeline(tiny_cfg(*base, "run.ratios=[0.25, 0.5]", key), run, progress=lambda m: None)
        assert str(run / stage) in str(e.value) and shown in str(e.value)
        assert (run / "results.json").read_bytes() == results
    # keys outside every recipe (the latency settings, workers) change nothing
    run_pipeline(tiny_cfg(*base, "run.ratios=[0.25, 0.5]", "run.timing.runs=30"), run, progress=said.append)
    assert (run / "results.json").read_bytes() == results
