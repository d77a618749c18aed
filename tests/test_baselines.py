"""The FPGM and ThiNet baselines: hand-checked scores, ThiNet's greedy and rescaling, CLI end to end."""

from __future__ import annotations

import copy
import itertools
import json
import math

import pytest
import torch
import torch_pruning as tp
from torch import nn

from mtprune import load_model
from mtprune.cli import main
from mtprune.errors import UsageError
from mtprune.models.base import DECODER, PrunableLayer
from mtprune.pruning import apply_plan, compute_plan, make_plan, mask_plan, thinet_rescale, thinet_statistics
from mtprune.pruning.plan import LayerPlan, PruningPlan
from mtprune.pruning.scores import fpgm_scores
from mtprune.pruning.thinet import contribution_gram, greedy_order, least_squares_scales

LAYER = [PrunableLayer("0", "1", DECODER)]


# --- FPGM ------------------------------------------------------------------------------------------
def test_fpgm_removes_the_geometric_median_first_and_sums_distances():
    # an equilateral triangle a, b, c (radius r) and its centre, the geometric median of the four filters,
    # placed in a random 2-D plane of the 3×3×3 weight space and shifted (distances do not change)
    g = torch.Generator().manual_seed(0)
    basis, _ = torch.linalg.qr(torch.randn(27, 2, generator=g, dtype=torch.float64))
    shift = torch.randn(27, generator=g, dtype=torch.float64)
    r = 1.5
    angles = (0.3, 0.3 + 2 * math.pi / 3, 0.3 + 4 * math.pi / 3)
    pts = [r * torch.tensor([math.cos(t), math.sin(t)], dtype=torch.float64) for t in angles]
    centre = sum(pts) / 3
    filters = [pts[0], centre, pts[1], pts[2]]  # the median is channel 1 (not the tie-break's favourite)
    conv = nn.Conv2d(3, 4, 3, bias=False).double()
    with torch.no_grad():
        conv.weight.copy_(torch.stack([basis @ f + shift for f in filters]).reshape(4, 3, 3, 3))
    model = nn.Sequential(conv)
    s = fpgm_scores(model, LAYER)["0"]
    d = lambda i, j: float((filters[i] - filters[j]).norm())  # noqa: E731
    hand = [sum(d(i, j) for j in range(4) if j != i) for i in range(4)]
    assert s.tolist() == pytest.approx(hand, rel=1e-10)
    assert s.tolist() == pytest.approx(
        [r * (1 + 2 * math.sqrt(3)), 3 * r, r * (1 + 2 * math.sqrt(3))] + [r * (1 + 2 * math.sqrt(3))], rel=1e-10
    )  # a vertex: r + 2·√3·r; the centre: 3r
    plan = compute_plan(fpgm_scores(model, LAYER), LAYER, 0.25, "layer")
    assert plan.layers["0"].kept == [0, 2, 3]  # the median goes first


# --- ThiNet on hand-built layers ------------------------------------------------------------------
def _conv_pair(seed: int = 0, cout: int = 4) -> nn.Sequential:
    torch.manual_seed(seed)
    m = nn.Sequential(
        nn.Conv2d(3, cout, 3, padding=1, bias=False),
        nn.BatchNorm2d(cout),
        nn.ReLU(),
        nn.Conv2d(cout, 3, 3, stride=2, padding=2, dilation=2, bias=False),
    ).double()
    with torch.no_grad():
        m[1].weight.uniform_(0.5, 1.5)
        m[1].bias.uniform_(-0.2, 0.5)
    return m.eval()


def _conv_linear(seed: int = 0) -> nn.Sequential:
    torch.manual_seed(seed)
    m = nn.Sequential(
        nn.Conv2d(3, 4, 3, padding=1, bias=False),
        nn.BatchNorm2d(4),
        nn.ReLU(),
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
        nn.Linear(4, 3, bias=False),
    ).double()
    return m.eval()


def _images(n: int = 6, size: int = 9, seed: int = 1) -> torch.Tensor:
    return torch.randn(n, 3, size, size, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)


def _brute_error(m: nn.Sequential, x: torch.Tensor, keep: list[int]) -> float:
    """‖Σ_{c∈keep} x̂_c‖² over every output location and channel, by running the consumer on masked inputs."""
    with torch.no_grad():
        a = m[:3](x)
        mask = torch.zeros(a.shape[1], dtype=a.dtype)
        mask[keep] = 1.0
        shape = (1, -1) + (1,) * (a.dim() - 2)
        return float(m[3:](a * mask.view(shape)).pow(2).sum())


@pytest.mark.parametrize("build", [_conv_pair, _conv_linear])
def test_thinet_gram_and_greedy_match_brute_force(build):
    m, x = build(), _images()
    st = thinet_statistics(m, LAYER, images=x, locations_per_image=10_000)  # every location: exact sums
    (cs,) = st.layers["0"]
    gram = cs.gram
    # 1ᵀ_T G 1_T is the consumer-output error of every subset T of the 4 channels
    for k in range(5):
        for t in itertools.combinations(range(4), k):
            ones = torch.zeros(4, dtype=torch.float64)
            ones[list(t)] = 1.0
            assert float(ones @ gram @ ones) == pytest.approx(_brute_error(m, x, list(t)), rel=1e-9, abs=1e-12)
    # ThiNet's greedy (Algorithm 1) by brute force: at each step the channel whose addition hurts least
    chosen: list[int] = []
    for _ in range(4):
        errs = {i: _brute_error(m, x, chosen + [i]) for i in range(4) if i not in chosen}
        chosen.append(min(errs, key=lambda i: (errs[i], -i)))
    assert greedy_order(gram) == chosen
    # choose 2: the plan removes exactly the greedy's first two
    plan = make_plan_for(m, x, 0.5)
    assert sorted(set(range(4)) - set(plan.layers["0"].kept)) == sorted(chosen[:2])


def make_plan_for(m: nn.Module, x: torch.Tensor, ratio: float) -> PruningPlan:
    from mtprune.pruning.scores import thinet_scores

    return compute_plan(thinet_scores(m, LAYER, images=x, locations_per_image=10_000), LAYER, ratio, "layer")


def test_thinet_removes_silent_channels_first():
    m, x = _conv_pair(seed=2, cout=6), _images()
    with torch.no_grad():
        m[3].weight[:, 2] = 0.0  # the next layer ignores channel 2
        m[1].weight[4] = 0.0  # channel 4 is always ReLU(0) = 0
        m[1].bias[4] = 0.0
    st = thinet_statistics(m, LAYER, images=x)
    order = greedy_order(st.gram("0"))
    assert order[:2] == [4, 2]  # both contribute nothing; equal increments: the higher index first
    assert st.gram("0")[2].abs().max() == 0 and st.gram("0")[4].abs().max() == 0


def test_gram_shortcut_equals_direct_product():
    g = torch.Generator().manual_seed(0)
    w = torch.randn(5, 4, 9, generator=g, dtype=torch.float64)
    p = torch.randn(30, 4, 9, generator=g, dtype=torch.float64)
    xh = torch.einsum("ock,mck->moc", w, p).reshape(-1, 4)
    for method in ("trick", "direct", "auto"):
        assert torch.allclose(contribution_gram(w, p, method), xh.T @ xh, rtol=1e-12, atol=1e-12)


def test_least_squares_rescaling_reduces_reconstruction_error():
    m, x = _conv_pair(seed=3, cout=6), _images(n=8, size=11)
    st = thinet_statistics(m, LAYER, images=x, locations_per_image=10_000)
    order = greedy_order(st.gram("0"))
    kept = sorted(order[3:])  # remove 3 of 6
    plan = PruningPlan("thinet", 0.5, "independent", 1, 1, {"0": LayerPlan(DECODER, 6, kept)})
    dense_out = m(x).detach()
    pruned = copy.deepcopy(m)
    dg = tp.DependencyGraph().build_dependency(pruned, example_inputs=x[:1])
    dg.get_pruning_group(pruned[0], tp.prune_conv_out_channels, idxs=order[:3]).prune()
    assert pruned[3].in_channels == 3
    with torch.no_grad():
        err_plain = float((pruned(x) - dense_out).pow(2).sum())
        thinet_rescale(pruned, plan, st)
        err_scaled = float((pruned(x) - dense_out).pow(2).sum())
    # the errors the Gram matrix predicts: ‖X_R 1‖² without rescaling, the least-squares residual with it
    gram = st.gram("0").double()
    drop = sorted(order[:3])
    assert err_plain == pytest.approx(float(gram[drop][:, drop].sum()), rel=1e-9)
    s = least_squares_scales(gram, kept)
    res = torch.ones(6, dtype=torch.float64)
    res[kept] = 1.0 - s
    assert err_scaled == pytest.approx(float(res @ gram @ res), rel=1e-6)
    assert err_plain == pytest.approx(13.30042, rel=1e-5)
    assert err_scaled == pytest.approx(12.67457, rel=1e-5)


def test_rescaling_recovers_a_redundant_channel_exactly():
    m, x = _conv_pair(seed=4, cout=5), _images(n=4, size=11)
    with torch.no_grad():  # channel 4 repeats channel 1's activations; the next conv reads it at half weight
        m[0].weight[4] = m[0].weight[1]
        m[1].weight[4], m[1].bias[4] = m[1].weight[1], m[1].bias[1]
        m[1].running_mean[4], m[1].running_var[4] = m[1].running_mean[1], m[1].running_var[1]
        m[3].weight[:, 4] = 0.5 * m[3].weight[:, 1]
    st = thinet_statistics(m, LAYER, images=x)  # 10 sampled locations per image
    kept = [0, 1, 2, 3]
    s = least_squares_scales(st.gram("0"), kept)
    assert s.tolist() == pytest.approx([1.0, 1.5, 1.0, 1.0], abs=1e-6)
    pruned = copy.deepcopy(m)
    dg = tp.DependencyGraph().build_dependency(pruned, example_inputs=x[:1])
    dg.get_pruning_group(pruned[0], tp.prune_conv_out_channels, idxs=[4]).prune()
    plan = PruningPlan("thinet", 0.2, "independent", 1, 1, {"0": LayerPlan(DECODER, 5, kept)})
    with torch.no_grad():
        err_plain = float((pruned(x) - m(x)).pow(2).sum())
        thinet_rescale(pruned, plan, st)
        err_scaled = float((pruned(x) - m(x)).pow(2).sum())
    assert err_plain > 1.0 and err_scaled < 1e-9 * err_plain  # every location, not only the sampled ones


def test_rescaling_helps_on_a_real_consumer_and_is_deterministic():
    from tests.conftest import tiny

    m = tiny("deeplabv3_resnet18", width=0.125)
    x = torch.randn(8, 3, 64, 64, generator=torch.Generator().manual_seed(5))
    st = thinet_statistics(m, m.prunable_layers(), images=x, seed=3)
    again = thinet_statistics(m, m.prunable_layers(), images=x, seed=3)
    split = thinet_statistics(m, m.prunable_layers(), images=list(x.split(3)), seed=3)
    for name, cons in st.layers.items():
        assert all(torch.equal(a.gram, b.gram) for a, b in zip(cons, again.layers[name], strict=True))
        # other batch sizes: the same statistics up to float rounding (conv kernels block batches differently)
        for a, b in zip(cons, split.layers[name], strict=True):
            assert torch.allclose(a.gram, b.gram, rtol=1e-4, atol=1e-5 * float(a.gram.abs().max()))
    full = make_plan(m, "thinet", 0.5, stats=st)
    # prune only the ASPP projection (consumer: the head conv), so the consumer's other inputs are unchanged
    layers = {n: LayerPlan(lp.part, lp.channels, list(range(lp.channels))) for n, lp in full.layers.items()}
    layers["decoder.aspp.project.0"] = full.layers["decoder.aspp.project.0"]
    plan = PruningPlan("thinet", 0.5, "independent", 1, 1, layers)
    outs = {}

    def run(model: nn.Module) -> torch.Tensor:
        h = model.decoder.head[0].register_forward_hook(lambda mod, i, o: outs.__setitem__("y", o.detach()))
        with torch.no_grad():
            model(x)
        h.remove()
        return outs["y"]

    dense = run(m)
    plain = apply_plan(copy.deepcopy(m), plan)
    scaled = thinet_rescale(apply_plan(copy.deepcopy(m), plan), plan, st)
    e_plain, e_scaled = float((run(plain) - dense).pow(2).mean()), float((run(scaled) - dense).pow(2).mean())
    assert e_scaled < 0.9 * e_plain


def test_thinet_without_images_is_a_usage_error():
    from tests.conftest import tiny

    with pytest.raises(UsageError, match="thinet needs training images"):
        make_plan(tiny("deeplabv3_resnet18", width=0.125), "thinet", 0.5)


# --- CLI end to end ---------------------------------------------------------------------------------
FAMILIES = ["deeplabv3_resnet18", "pspnet_resnet18", "bisenet_resnet18"]


@pytest.fixture(scope="module")
def dense_dirs(tmp_path_factory):
    root = tmp_path_factory.mktemp("dense")
    out = {}
    for fam in FAMILIES:
        torch.manual_seed(0)
        assert main(["init", "--model", fam, "--num-classes", "4", "--width", "0.125", "--out", str(root / fam)]) == 0
        out[fam] = root / fam
    return out


def _outputs(model: nn.Module, x: torch.Tensor) -> list[torch.Tensor]:
    with torch.no_grad():
        seg = model.seg_outputs(x, aux=True)
        return [seg["out"], *seg["aux"], model.forward_cls(x)]


CLI_CASES = [
    *((fam, "fpgm", 0.4, []) for fam in FAMILIES),
    *((fam, "thinet", 0.5, ["--samples", "4"]) for fam in FAMILIES),
    ("deeplabv3_resnet18", "thinet", 0.5, ["--samples", "4", "--no-rescale"]),
]


@pytest.mark.parametrize("family, method, ratio, extra", CLI_CASES)
def test_prune_cli_end_to_end(tmp_path, capsys, dense_dirs, family, method, ratio, extra):
    out = tmp_path / "pruned"
    argv = [
        "prune",
        "--checkpoint",
        str(dense_dirs[family]),
        "--method",
        method,
        "--ratio",
        str(ratio),
        "--size",
        "64",
        "64",
        "--out",
        str(out),
        "--json",
        *extra,
    ]
    assert main(argv) == 0
    summary = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert summary["after"]["params"] < summary["before"]["params"]
    plan_d = json.loads((out / "plan.json").read_text())
    assert plan_d["method"] == method
    pruned = load_model(out)
    for name, lp in plan_d["layers"].items():
        assert lp["channels"] - lp["kept_count"] == math.floor(ratio * lp["channels"])
        assert pruned.get_submodule(name).out_channels == lp["kept_count"]
    plan = PruningPlan.from_dict(plan_d)
    masked = mask_plan(load_model(dense_dirs[family]).eval(), plan)
    x = torch.randn(2, 3, 64, 64, generator=torch.Generator().manual_seed(0))
    diff = max(float((a - b).abs().max()) for a, b in zip(_outputs(pruned.eval(), x), _outputs(masked, x), strict=True))
    if method == "thinet" and "--no-rescale" not in extra:
        assert summary["thinet"] == {"images": 4, "rescale": True}
        assert diff > 1e-6  # rescaled: no longer the masked net, by design
    else:
        assert diff < 1e-5  # the pruned net computes what the masked net computes


def test_thinet_cli_is_deterministic_and_reads_the_config(tmp_path, capsys, dense_dirs):
    kept = []
    for i in range(2):
        out = tmp_path / f"p{i}"
        argv = [
            "prune",
            "--checkpoint",
            str(dense_dirs["bisenet_resnet18"]),
            "--method",
            "thinet",
            "--ratio",
            "0.5",
            "--samples",
            "3",
            "--set",
            "data.seg.crop_size=[48,48]",
            "--set",
            "seed=7",
            "--size",
            "32",
            "32",
            "--out",
            str(out),
        ]
        assert main(argv) == 0
        kept.append({n: lp["kept"] for n, lp in json.loads((out / "plan.json").read_text())["layers"].items()})
    assert kept[0] == kept[1]
    assert "thinet: 3 training images, rescaled" in capsys.readouterr().out


@pytest.mark.parametrize(
    "extra, needle",
    [
        (["--set", "data.seg.options.num_samples=0"], "thinet needs training images"),
        (["--set", "data.seg.dataset=voc"], "thinet needs training images"),
        (["--samples", "0"], "--samples must be ≥ 1"),
    ],
)
def test_thinet_cli_without_data_is_one_line_exit_2(tmp_path, capsys, extra, needle):
    out = tmp_path / "out"
    argv = [
        "prune",
        "--model",
        "deeplabv3_resnet18",
        "--num-classes",
        "4",
        "--width",
        "0.125",
        "--method",
        "thinet",
        "--ratio",
        "0.5",
        "--out",
        str(out),
        *extra,
    ]
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and needle in err
    assert not out.exists()


def test_thinet_flags_with_another_method_are_refused(tmp_path, capsys):
    argv = [
        "prune",
        "--model",
        "deeplabv3_resnet18",
        "--num-classes",
        "4",
        "--width",
        "0.125",
        "--method",
        "fpgm",
        "--ratio",
        "0.5",
        "--samples",
        "8",
        "--out",
        str(tmp_path / "out"),
    ]
    assert main(argv) == 2
    assert "only with --method thinet" in capsys.readouterr().err
