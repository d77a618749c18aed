"""``--round-to auto`` (issue 19): counts the device at hand likes, from a table of conv timings. The clock is
replaced by arithmetic (multiples of 16 channels run at twice the speed), so every choice is exact."""

from __future__ import annotations

import copy
import json

import pytest
import torch
from tests.conftest import randomize_bn

from mtprune.cli import main
from mtprune.cost.tables import ConvShape, LatencyTable
from mtprune.errors import UsageError
from mtprune.models import build_model
from mtprune.pruning import apply_plan, make_plan, mask_plan
from mtprune.pruning.fit import MULTIPLE, latency_fit

SIZE = (32, 32)


def fake_ms(s: ConvShape) -> float:
    """Work × 2 for each of the input and output counts that is not a multiple of 16."""
    slow = (1 if s.cin % 16 == 0 else 2) * (1 if s.cout % 16 == 0 else 2)
    return s.cin * s.cout * s.height * s.width * s.kernel[0] * s.kernel[1] / s.groups * 1e-6 * slow


def fake_ratio(a: list[ConvShape], b: list[ConvShape]) -> float:
    return sum(map(fake_ms, b)) / sum(map(fake_ms, a))


def _net():
    return randomize_bn(build_model("deeplabv3_resnet18", 5, 10, 0.5))  # 32 … 256 channels, irregular γ


def test_auto_counts_grow_to_where_the_table_says_it_is_faster_and_never_shrink(tmp_path):
    model = _net()
    table = LatencyTable(tmp_path / "t.json", measure=fake_ms)
    plain = make_plan(model, "bn", 0.5)
    plan = make_plan(model, "bn", 0.5, fit=latency_fit(model, SIZE, table))
    assert plan.round_to == "auto" and plan.rounding
    for name, lp in plan.layers.items():
        before = plain.layers[name]
        assert set(before.kept) <= set(lp.kept)
        r = plan.rounding.get(name)
        if r is None:
            assert len(lp.kept) == len(before.kept)
            continue
        assert (r["from"], r["to"]) == (len(before.kept), len(lp.kept)) and r["to"] > r["from"]
        assert r["ms_to"] < r["ms_from"] / (1 + 0.02) and r["to"] <= -(-r["from"] // MULTIPLE) * MULTIPLE
    # a BasicBlock's conv1 feeds conv2 (another width's output): both its own and conv2's input are 16-aligned
    assert all(r["to"] % 16 == 0 for r in plan.rounding.values())
    # the best-scored removed channels came back, and the pruned net is still the masked one
    name = next(iter(plan.rounding))
    s = model.get_submodule(name.replace("conv", "bn")).weight.detach().abs()
    back = sorted(set(plan.layers[name].kept) - set(plain.layers[name].kept))
    removed = sorted(set(range(s.numel())) - set(plain.layers[name].kept), key=lambda c: -float(s[c]))
    assert back == sorted(removed[: len(back)])
    pruned, masked = apply_plan(copy.deepcopy(model), plan), mask_plan(copy.deepcopy(model), plan)
    x = torch.randn(1, 3, *SIZE)
    with torch.no_grad():
        assert torch.allclose(pruned.eval()(x), masked.eval()(x), atol=1e-5)


def test_the_table_is_kept_so_a_second_fit_times_nothing(tmp_path):
    model = _net()
    first = LatencyTable(tmp_path / "t.json", measure=fake_ms)
    plan = make_plan(model, "bn", 0.5, fit=latency_fit(model, SIZE, first))
    assert first.measured > 0 and json.loads((tmp_path / "t.json").read_text())["format"] == "mtprune-latency-table"

    def no_clock(_shape):
        raise AssertionError("a shape in the table was timed again")

    second = LatencyTable(tmp_path / "t.json", measure=no_clock)
    again = make_plan(model, "bn", 0.5, fit=latency_fit(model, SIZE, second))
    assert second.measured == 0 and again.layers == plan.layers
    (tmp_path / "t.json").write_text("{not json")
    with pytest.raises(UsageError, match="t.json: not a latency table"):
        LatencyTable(tmp_path / "t.json")


def test_the_default_table_is_one_per_host_memory(tmp_path, monkeypatch):
    from mtprune.cost.host_memory import cached_host_memory, can_cache
    from mtprune.cost.tables import default_table_path

    if not can_cache():
        pytest.skip("cached host memory needs glibc")
    monkeypatch.setenv("MTPRUNE_CACHE", str(tmp_path))
    system = default_table_path("cpu", channels_last=True)
    with cached_host_memory():
        cached = default_table_path("cpu", channels_last=True)
    assert system.parent == cached.parent == tmp_path and system.name.endswith(f"_torch{torch.__version__}.json")
    assert cached.name == system.name.removesuffix(".json") + "_cached.json"
    assert default_table_path("cpu", channels_last=True) == system  # left: the system's again


def test_prune_cli_round_to_auto_reports_what_it_changed(tmp_path, capsys, monkeypatch):
    import mtprune.cost.tables as fit_mod

    monkeypatch.setattr(fit_mod, "time_conv", lambda s, *_, **__: fake_ms(s))
    monkeypatch.setattr(fit_mod, "time_pair", lambda a, b, *_, **__: fake_ratio(a, b))
    monkeypatch.setenv("MTPRUNE_CACHE", str(tmp_path / "cache"))
    d = str(tmp_path / "d")
    main(["init", "--model", "deeplabv3_resnet18", "--num-classes", "3", "--width", "0.5", "--out", d])
    capsys.readouterr()
    base = ["prune", "--checkpoint", d, "--method", "uniform", "--ratio", "0.4", "--size", "32", "32"]
    assert main([*base, "--round-to", "auto", "--out", str(tmp_path / "p")]) == 0
    out = capsys.readouterr()
    plan = json.loads((tmp_path / "p" / "plan.json").read_text())
    assert plan["round_to"] == "auto" and plan["rounding"]
    assert out.out.count("round-to auto: ") == len(plan["rounding"]) and "table " in out.err
    assert len(list((tmp_path / "cache").glob("latency-cpu*contiguous*.json"))) == 1
    with pytest.raises(SystemExit) as e:
        main([*base, "--round-to", "17x", "--out", str(tmp_path / "q")])
    assert e.value.code == 2 and "'17x' is not a multiple K or auto" in capsys.readouterr().err
    assert main([*base, "--timing", f"table={tmp_path / 't.json'}", "--out", str(tmp_path / "q")]) == 2
    assert (
        "only with --target latency=X or --round-to auto" in capsys.readouterr().err and not (tmp_path / "q").exists()
    )


def test_a_run_s_prune_stage_rounds_to_auto(tmp_path, monkeypatch):
    from tests.test_pipeline import tiny_cfg

    import mtprune.cost.tables as fit_mod
    import mtprune.pipeline.stages as pl
    from mtprune.checkpoint import save_model
    from mtprune.pipeline import execute

    monkeypatch.setattr(fit_mod, "time_conv", lambda s, *_, **__: fake_ms(s))
    monkeypatch.setattr(fit_mod, "time_pair", lambda a, b, *_, **__: fake_ratio(a, b))
    monkeypatch.setenv("MTPRUNE_CACHE", str(tmp_path / "cache"))
    cfg = tiny_cfg("run.round_to=auto", "run.timing.threads=1", "run.timing.runtime=eager")
    save_model(_net(), tmp_path / "d")
    execute(pl.pruning(tmp_path / "d", "uniform", 0.4, "independent", cfg, tmp_path / "p"))
    plan = json.loads((tmp_path / "p" / "plan.json").read_text())
    assert plan["round_to"] == "auto" and all(r["to"] > r["from"] for r in plan["rounding"].values())
    with pytest.raises(UsageError, match="round_to"):
        tiny_cfg("run.round_to=nearest")


def test_the_choice_keeps_n_unless_a_larger_count_is_clearly_faster():
    from mtprune.pruning.fit import _choose

    def pick(times: list[float]) -> int:
        table = LatencyTable("/nonexistent/t.json", measure=lambda s: times[s.cout - 10])
        own = lambda c: ConvShape(8, c, (1, 1), (1, 1), (0, 0), (1, 1), 1, 4, 4)  # noqa: E731
        return _choose(table, own, [], range(10, 10 + len(times)))[0]

    assert pick([1.03, 1.019, 1.0]) == 12  # 11 is within 2 % of n's time: no gain; 12 is 3 % faster
    assert pick([1.0, 0.99, 0.985]) == 10  # nothing 2 % faster than n: n stays
    assert pick([1.0, 0.97, 0.9, 0.905]) == 12  # the smallest count within 2 % of the fastest


def test_a_count_the_table_prefers_is_kept_only_if_a_paired_retiming_confirms_it(tmp_path):
    from mtprune.pruning.fit import _choose

    times = [1.0, 0.9]  # the table says 11 channels are 10 % faster than 10
    own = lambda c: ConvShape(8, c, (1, 1), (1, 1), (0, 0), (1, 1), 1, 4, 4)  # noqa: E731
    asked = []

    def retimed(ratio: float):
        def compare(a, b):
            asked.append(([s.cout for s in a], [s.cout for s in b]))
            return ratio

        return LatencyTable(tmp_path / f"{ratio}.json", measure=lambda s: times[s.cout - 10], compare=compare)

    assert _choose(retimed(0.99), own, [], range(10, 12)) == (10, {10: 1.0, 11: 0.9}, 0.99)  # not confirmed
    assert _choose(retimed(0.95), own, [], range(10, 12))[::2] == (11, 0.95)  # confirmed: 5 % faster, paired
    assert asked == [([10], [11]), ([10], [11])]
    table = retimed(0.95)
    table.ratio([own(10)], [own(11)]), table.save()
    again = LatencyTable(tmp_path / "0.95.json", measure=lambda s: 1 / 0, compare=lambda a, b: 1 / 0)
    assert again.ratio([own(10)], [own(11)]) == 0.95  # cached with the single times: not re-timed


def test_auto_on_bisenet_skips_the_auxiliary_heads_and_times_concatenations_whole(tmp_path):
    shapes = []

    def record(s: ConvShape) -> float:
        shapes.append(s)
        return fake_ms(s)

    model = randomize_bn(build_model("pspnet_resnet18", 5, 10, 0.5))
    plan = make_plan(
        model, "uniform", 0.5, fit=latency_fit(model, SIZE, LatencyTable(tmp_path / "p.json", measure=record))
    )
    pruned = apply_plan(copy.deepcopy(model), make_plan(model, "uniform", 0.5))
    neck = pruned.decoder.bottleneck.conv  # c5 and the four pyramid branches, concatenated
    timed_in = {s.cin for s in shapes if s.cout == neck.out_channels and s.kernel == (3, 3)}
    assert neck.in_channels in timed_in  # c5 + every branch: not one branch's count alone
    assert plan.layers.keys() == make_plan(model, "uniform", 0.5).layers.keys()
    bis = randomize_bn(build_model("bisenet_resnet18", 5, 10, 0.5))
    fitted = make_plan(
        bis, "bn", 0.5, fit=latency_fit(bis, (64, 64), LatencyTable(tmp_path / "b.json", measure=fake_ms))
    )
    assert fitted.rounding and not any(n.startswith("decoder.aux_heads") for n in fitted.rounding)  # training-only


def test_groups_are_found_on_a_model_whose_bns_are_sync_batchnorm():
    from mtprune.models.groups import discover_prunable_layers

    model = build_model("deeplabv3_resnet18", 5, 10, 0.25)
    parts = {"backbone": ["backbone"], "decoder": ["decoder"]}
    want = discover_prunable_layers(model, parts, exclude=["backbone.conv1"])
    synced = torch.nn.SyncBatchNorm.convert_sync_batchnorm(copy.deepcopy(model))
    assert discover_prunable_layers(synced, parts, exclude=["backbone.conv1"]) == want and len(want) > 10


def test_the_onnx_conv_graph_computes_a_layer_s_convs_chained_as_in_the_net():
    ort = pytest.importorskip("onnxruntime", reason="the export extra is not installed")
    from onnx import load_from_string, numpy_helper
    from torch.nn.functional import conv2d, relu

    from mtprune.cost.tables import conv_graph

    own = ConvShape(16, 24, (3, 3), (2, 2), (2, 2), (2, 2), 1, 17, 19)  # strided, dilated, odd size → 9 × 10
    uses = [
        ConvShape(24, 24, (3, 3), (1, 1), (1, 1), (1, 1), 24, 9, 10),  # depthwise, fed by own's output
        ConvShape(24, 5, (1, 1), (1, 1), (0, 0), (1, 1), 1, 9, 10),  # 1×1, fed by own's output
        ConvShape(40, 8, (1, 1), (1, 1), (0, 0), (1, 1), 1, 9, 10),
    ]  # a concatenation's: an input of its own
    graph = conv_graph([own, *uses])
    w = {t.name: torch.from_numpy(numpy_helper.to_array(t).copy()) for t in load_from_string(graph).graph.initializer}
    sess = ort.InferenceSession(graph, providers=["CPUExecutionProvider"])
    assert [i.name for i in sess.get_inputs()] == ["x0", "x3"]
    x0, x3 = torch.randn(1, 16, 17, 19), torch.randn(1, 40, 9, 10)
    outs = sess.run(None, {"x0": x0.numpy(), "x3": x3.numpy()})

    def conv(i, x):
        s = [own, *uses][i]
        return conv2d(x, w[f"w{i}"], w[f"b{i}"], s.stride, s.padding, s.dilation, s.groups)

    r0 = relu(conv(0, x0))
    refs = [conv(1, r0), conv(2, r0), conv(3, x3)]  # each pooled by the graph's sink
    assert len(outs) == 3
    for y, ref in zip(outs, refs, strict=True):
        ref = ref.mean(dim=(2, 3), keepdim=True)
        assert y.shape == tuple(ref.shape) and torch.allclose(torch.from_numpy(y), ref, rtol=1e-4, atol=1e-4)


def test_prune_round_to_auto_onnxruntime_times_the_convs_in_onnx_runtime(tmp_path, capsys, monkeypatch):
    pytest.importorskip("onnxruntime", reason="the export extra is not installed")
    import mtprune.cost.tables as fit_mod

    timed = []

    def ort_only(s, *_, runtime, **__):
        timed.append(runtime)
        return fake_ms(s)

    monkeypatch.setattr(fit_mod, "time_conv", ort_only)
    monkeypatch.setattr(
        fit_mod, "time_convs", lambda ss, *a, runtime, **k: sum(ort_only(s, runtime=runtime) for s in ss)
    )
    monkeypatch.setattr(fit_mod, "time_pair", lambda a, b, *_, **__: fake_ratio(a, b))
    monkeypatch.setenv("MTPRUNE_CACHE", str(tmp_path / "cache"))
    d = str(tmp_path / "d")
    main(["init", "--model", "deeplabv3_resnet18", "--num-classes", "3", "--width", "0.5", "--out", d])
    base = ["prune", "--checkpoint", d, "--method", "uniform", "--ratio", "0.4", "--size", "32", "32", "--round-to"]
    assert main([*base, "auto", "--runtime", "onnxruntime", "--out", str(tmp_path / "p")]) == 0
    assert "in ONNX Runtime (CPU)" in capsys.readouterr().err and set(timed) == {"onnxruntime"}
    (table,) = (tmp_path / "cache").glob("latency-cpu*onnxruntime*.json")
    assert json.loads(table.read_text())["runtime"] == "onnxruntime"
    assert json.loads((tmp_path / "p" / "plan.json").read_text())["rounding"]
    # the old flag names its new spelling, and nothing is written
    assert main([*base, "auto", "--onnxruntime", "--out", str(tmp_path / "q")]) == 2
    assert "--onnxruntime is now --runtime onnxruntime" in capsys.readouterr().err and not (tmp_path / "q").exists()
    assert main([*base, "1", "--runtime", "onnxruntime", "--out", str(tmp_path / "q")]) == 2
    assert "only with --target latency=X" in capsys.readouterr().err
    with pytest.raises(UsageError, match="CPU only"):
        LatencyTable(tmp_path / "t.json", device="cuda", runtime="onnxruntime")


def test_a_run_s_auto_rounding_times_in_the_runtime_its_config_names(tmp_path, monkeypatch):
    pytest.importorskip("onnxruntime", reason="the export extra is not installed")
    from tests.test_pipeline import tiny_cfg

    import mtprune.cost.tables as fit_mod
    import mtprune.pipeline.stages as pl
    from mtprune.checkpoint import save_model
    from mtprune.pipeline import execute

    timed = []
    monkeypatch.setattr(fit_mod, "time_conv", lambda s, *_, runtime, **__: timed.append(runtime) or fake_ms(s))
    monkeypatch.setattr(
        fit_mod, "time_convs", lambda ss, *_, runtime, **__: timed.append(runtime) or sum(map(fake_ms, ss))
    )
    monkeypatch.setattr(fit_mod, "time_pair", lambda a, b, *_, **__: fake_ratio(a, b))
    monkeypatch.setenv("MTPRUNE_CACHE", str(tmp_path / "cache"))
    cfg = tiny_cfg("run.round_to=auto", "run.timing.runtime=onnxruntime", "run.timing.threads=1")
    save_model(_net(), tmp_path / "d")
    stage = pl.pruning(tmp_path / "d", "uniform", 0.4, "independent", cfg, tmp_path / "p")
    assert stage.recipe["config"]["run.timing.runtime"] == "onnxruntime"
    execute(stage)
    assert timed and set(timed) == {"onnxruntime"} and list((tmp_path / "cache").glob("*onnxruntime*.json"))
    with pytest.raises(UsageError, match="round_to_runtime' is now run.timing.runtime"):
        tiny_cfg("run.round_to_runtime=tensorrt")
    with pytest.raises(UsageError, match="runtime 'tensorrt': choose one or several of eager"):
        tiny_cfg("run.timing.runtime=tensorrt")


def test_in_onnx_runtime_counts_are_rounded_up_to_its_block_for_free(tmp_path):
    model = _net()
    plain = make_plan(model, "bn", 0.5)
    flat = LatencyTable(tmp_path / "t.json", measure=lambda s: s.cin * s.cout * 1e-6)  # more channels: slower
    flat.block = 16  # as ort_block() finds on an AVX-512 CPU
    plan = make_plan(model, "bn", 0.5, fit=latency_fit(model, SIZE, flat))
    pruned = apply_plan(copy.deepcopy(model), plan)
    for name in plan.layers:
        n, got = len(plain.layers[name].kept), len(plan.layers[name].kept)
        r = plan.rounding.get(name)
        assert (got == n and n % 16 == 0) if r is None else (r["from"], r["to"]) == (n, got)
        if r is not None:  # no count is faster: only the layout moved it, to the next multiple
            assert got == -(-n // 16) * 16 and "multiple of 16" in r["why"]
    convs = [m for n, m in pruned.named_modules() if isinstance(m, torch.nn.Conv2d) and n.startswith("backbone.layer")]
    assert convs and all(m.in_channels % 16 == 0 for m in convs)  # a ResNet-18 of 32 … 256 channels
    assert sum(len(lp.kept) % 16 != 0 for lp in plain.layers.values()) > 5  # the plain plan had other counts


def test_onnx_runtime_s_block_is_read_off_its_optimiser_on_this_machine():
    pytest.importorskip("onnxruntime", reason="the export extra is not installed")
    import platform

    from mtprune.cost.tables import ort_block

    block = ort_block()
    assert block in (1, 4, 8, 16, 32)
    if platform.machine() in ("x86_64", "AMD64"):  # MLAS has blocked kernels on every AVX2 CPU: 8 or 16
        assert block in (8, 16)


def test_where_no_multiple_of_the_block_is_in_reach_counts_go_to_onnx_runtime_s_alignment(tmp_path):
    from mtprune.pruning.fit import _blocked, _count

    # LR-ASPP's 24-channel stage kept 19 (no multiple of 16 in 19 … 24): ORT ran its two consumers unblocked
    start, tried, why = _blocked(range(19, 25), 16, 4)
    assert (start, tried) == (20, [20, 24]) and "multiple of 4 channels between them" in why
    assert _blocked(range(20, 25), 16, 4) == (20, [20, 24], "")  # already aligned: kept, only aligned tried
    assert _blocked(range(37, 49), 16, 4)[:2] == (48, [48])  # a multiple of the block in reach: that first
    assert _blocked(range(19, 25), 16, 1) == (19, list(range(19, 25)), "")  # no alignment known: as before
    assert _blocked(range(19, 25), 1, 1) == (19, list(range(19, 25)), "")  # PyTorch: every count
    flat = LatencyTable(tmp_path / "t.json", measure=lambda s: s.cin * s.cout * 1e-6)  # more channels: slower
    flat.block, flat.align = 16, 4  # as ort_block() / ort_alignment() find on an AVX-512 CPU

    def own(c: int) -> ConvShape:
        return ConvShape(64, c, (1, 1), (1, 1), (0, 0), (1, 1), 1, 8, 8)

    def use(c: int) -> ConvShape:
        return ConvShape(c, 48, (1, 1), (1, 1), (0, 0), (1, 1), 1, 8, 8)

    chosen, why = _count(flat, own, [use], 19, 24)
    assert chosen == 20 and (why["from"], why["to"]) == (19, 20) and "multiple of 4" in why["why"]


def test_onnx_runtime_s_alignment_between_blocked_convs_is_finer_than_its_block():
    pytest.importorskip("onnxruntime", reason="the export extra is not installed")
    import platform

    from mtprune.cost.tables import ort_alignment, ort_block

    block, align = ort_block(), ort_alignment()
    assert block % align == 0
    if platform.machine() in ("x86_64", "AMD64"):  # MLAS pads a blocked conv's channels: finer than the block
        assert 1 < align < block


def test_a_count_nothing_beats_is_filled_to_the_kernels_multiple_only_if_that_is_not_slower(tmp_path):
    model = _net()
    plain = make_plan(model, "bn", 0.5)

    def padded(s: ConvShape) -> float:  # kernels that pad both channel counts to 16: the time of the padded work
        pad = lambda c: -(-c // 16) * 16  # noqa: E731
        return pad(s.cin) * pad(s.cout) * s.height * s.width * s.kernel[0] * s.kernel[1] * 1e-6

    free = LatencyTable(tmp_path / "free.json", measure=padded)
    free.fill = 16  # as vector_width() gives on an AVX-512 CPU
    plan = make_plan(model, "bn", 0.5, fit=latency_fit(model, SIZE, free))
    filled = {k: r for k, r in plan.rounding.items() if r["why"].startswith("free")}
    assert filled and all(r["to"] == -(-r["from"] // 16) * 16 and r["paired"] <= 1.02 for r in filled.values())
    assert all(len(lp.kept) % 16 == 0 for lp in plan.layers.values())  # every count took its free channels
    costly = LatencyTable(tmp_path / "costly.json", measure=lambda s: 1.05 ** (s.cin + s.cout))  # 5 % a channel
    costly.fill = 16
    again = make_plan(model, "bn", 0.5, fit=latency_fit(model, SIZE, costly))
    assert again.layers == plain.layers and not again.rounding  # more than 2 % slower: nothing filled
    assert any(len(lp.kept) % 16 for lp in plain.layers.values())


def test_an_expand_conv_s_count_is_timed_with_the_depthwise_conv_its_channels_run_through(tmp_path):
    def depthwise_likes_16(s: ConvShape) -> float:  # pointwise convs: pure work; depthwise: 4× slower off 16
        work = s.cin * s.cout * s.height * s.width * s.kernel[0] * s.kernel[1] / s.groups * 1e-6
        return work * (4 if s.groups > 1 and s.cin % 16 else 1)

    model = randomize_bn(build_model("deeplabv3_efficientnet_lite0", 5, 10, 0.5))
    plain = make_plan(model, "bn", 0.5)
    fit = latency_fit(model, (64, 64), LatencyTable(tmp_path / "e.json", measure=depthwise_likes_16))
    plan = make_plan(model, "bn", 0.5, fit=fit)
    expand = [n for n in plan.rounding if n.endswith("_expand_conv")]
    assert expand, plan.rounding  # counts grown for the depthwise conv after them: the expand conv alone is work
    assert all(plan.rounding[n]["to"] % 16 == 0 and plan.rounding[n]["from"] % 16 for n in expand)
    assert all(n.endswith("_expand_conv") for n in plan.rounding)  # nothing else has a depthwise conv after it
    assert sum(len(lp.kept) for lp in plan.layers.values()) > sum(len(lp.kept) for lp in plain.layers.values())
    pruned, masked = apply_plan(copy.deepcopy(model), plan), mask_plan(copy.deepcopy(model), plan)
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        assert torch.allclose(pruned.eval()(x), masked.eval()(x), atol=1e-5)
