"""Beyond the paper (issue 31): distillation from the dense net while fine-tuning, the polarization
regulariser, γ rescaled before fine-tuning, and mean-normalised scores for a unified threshold."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file
from tests.conftest import tiny
from tests.test_train import TINY, cfg

from mtprune.checkpoint import save_model
from mtprune.errors import UsageError
from mtprune.method import channel_wise_distill, pixel_kl, polarization_penalty, sparsity_penalty
from mtprune.pipeline import run_stage
from mtprune.pruning import make_plan, normalize_scores, prune
from mtprune.pruning.rescale import median_gammas, rescale_gamma_


@pytest.mark.parametrize("loss", [pixel_kl, channel_wise_distill])
def test_a_distillation_loss_of_identical_logits_is_zero(loss):
    t = torch.randn(2, 5, 6, 7)
    assert float(loss(t, t, 2.0)) == pytest.approx(0.0, abs=1e-6)
    assert float(loss(t + 3.0, t, 1.0)) == pytest.approx(0.0, abs=1e-5) if loss is pixel_kl else True  # shift-free
    assert float(loss(torch.randn(2, 5, 6, 7), t, 1.0)) > 0


def test_the_distillation_gradients_match_autograd():
    torch.manual_seed(0)
    n, c, h, w, temp = 2, 4, 3, 5, 2.0
    s, t = torch.randn(n, c, h, w, requires_grad=True), torch.randn(n, c, h, w)
    pixel_kl(s, t, temp).backward()
    by_hand = temp * (torch.softmax(s.detach() / temp, 1) - torch.softmax(t / temp, 1)) / (n * h * w)
    assert torch.allclose(s.grad, by_hand, atol=1e-6)
    s.grad = None
    channel_wise_distill(s, t, temp).backward()
    soft = lambda z: torch.softmax(z.reshape(n, c, -1) / temp, -1).reshape(n, c, h, w)  # noqa: E731
    by_hand = temp * (soft(s.detach()) - soft(t)) / (n * c)
    assert torch.allclose(s.grad, by_hand, atol=1e-6)


def test_polarization_gradient_by_hand_on_a_known_vector():
    g1 = torch.tensor([0.5, -0.2, 0.05], requires_grad=True)
    g2 = torch.tensor([1.0, 0.3], requires_grad=True)
    alpha, t = 0.1, 1.2
    pen = polarization_penalty([g1, g2], alpha, t)
    flat = [0.5, -0.2, 0.05, 1.0, 0.3]
    mean = sum(flat) / 5  # 0.33
    assert float(pen.detach()) == pytest.approx(alpha * (t * sum(map(abs, flat)) - sum(abs(v - mean) for v in flat)))
    pen.backward()
    signs = [1.0 if v > mean else -1.0 for v in flat]  # 0.5 +, -0.2 −, 0.05 −, 1.0 +, 0.3 −
    hand = [alpha * (t * (1.0 if v > 0 else -1.0) - sg + sum(signs) / 5) for v, sg in zip(flat, signs, strict=True)]
    assert torch.allclose(torch.cat([g1.grad, g2.grad]), torch.tensor(hand), atol=1e-6)
    assert sparsity_penalty([g1], alpha, None).item() == pytest.approx(alpha * 0.75)  # without t: ℓ1


def _shrunk_pruned_net(num_classes: int = 5, cls_classes: int = 7):
    """A tiny DeepLabv3-R18 whose γ all shrank to 0.1× (as after sparse training), pruned uniformly to 0.5×, and
    its dense original."""
    dense = tiny("deeplabv3_resnet18", num_classes, cls_classes)
    net = tiny("deeplabv3_resnet18", num_classes, cls_classes)
    with torch.no_grad():
        for lay in net.prunable_layers():
            net.get_submodule(lay.bn).weight.mul_(0.1)
    prune(net, "uniform", 0.5)
    return dense, net.eval()


def test_rescaling_gamma_leaves_the_logits_equal_and_brings_the_medians_back():
    dense, net = _shrunk_pruned_net()
    x = torch.randn(2, 3, 48, 48)
    with torch.no_grad():
        before = net(x)
    reference = median_gammas(dense)
    done = rescale_gamma_(net, reference, (48, 48))
    with torch.no_grad():
        after = net(x)
    assert torch.allclose(after, before, rtol=1e-5, atol=1e-5 * float(before.abs().max()))
    assert len(done) >= 4  # the convs that feed only convs through a ReLU: rescaled
    for bn, s in done.items():
        assert s > 1 and float(net.get_submodule(bn).weight.detach().abs().median()) == pytest.approx(
            reference[bn], rel=1e-5
        )
    conv1 = "backbone.layer1.0.bn1"  # feeds conv2 through the block's ReLU: rescaled
    assert conv1 in done
    not_done = [lay.bn for lay in net.prunable_layers() if lay.bn not in done]
    assert all(float(net.get_submodule(b).weight.abs().median()) < reference[b] for b in not_done)


def test_mean_normalised_scores_keep_a_layer_whose_gamma_all_shrank():
    model = tiny("deeplabv3_resnet18")
    small = model.prunable_layers()[3].bn
    with torch.no_grad():
        model.get_submodule(small).weight.mul_(0.01)  # a whole layer shrank together
    name = model.prunable_layers()[3].conv
    plain = make_plan(model, "bn", 0.3, "unified")
    mean = make_plan(model, "bn", 0.3, "unified", normalize="mean")
    total = model.get_submodule(name).out_channels
    assert len(plain.layers[name].kept) == 1  # raw |γ|: the layer goes (down to min_channels)
    assert len(mean.layers[name].kept) > total // 3  # within its own scale: it keeps channels
    scores = normalize_scores({"a": torch.tensor([1.0, 3.0]), "b": torch.tensor([0.01, 0.03])}, "mean")
    assert torch.equal(scores["a"], scores["b"]) and torch.equal(scores["a"], torch.tensor([0.5, 1.5]))
    with pytest.raises(UsageError, match="normalize 'max'"):
        normalize_scores({}, "max")


def test_prune_cli_takes_normalize(tmp_path, capsys):
    from mtprune.cli import main

    save_model(tiny("deeplabv3_resnet18"), tmp_path / "d")
    base = ["prune", "--checkpoint", str(tmp_path / "d"), "--method", "bn", "--ratio", "0.3", "--size", "32", "32"]
    assert main([*base, "--thresholds", "unified", "--normalize", "mean", "--out", str(tmp_path / "p")]) == 0
    plan = json.loads((tmp_path / "p" / "plan.json").read_text())
    assert plan["cost"]["normalize"] == "mean"


FT = [*TINY, "finetune.cls_epochs=0", "finetune.seg_epochs=1", "finetune.seg_batch_size=4"]


def test_a_distillation_fine_tune_with_weight_0_is_the_plain_one(tmp_path):
    dense, net = _shrunk_pruned_net(6, 10)  # the embedded synthetic sets' classes
    save_model(dense, tmp_path / "dense")
    save_model(net, tmp_path / "pruned")
    init = str(tmp_path / "pruned")
    run_stage("finetune", cfg(*FT), tmp_path / "plain", init=init)
    zero = [f"finetune.distill.teacher={tmp_path / 'dense'}", "finetune.distill.weight=0"]
    run_stage("finetune", cfg(*FT, *zero), tmp_path / "zero", init=init)
    a, b = (
        load_file(str(tmp_path / "plain" / "model" / "model.safetensors")),
        load_file(str(tmp_path / "zero" / "model" / "model.safetensors")),
    )
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    kd = [
        f"finetune.distill.teacher={tmp_path / 'dense'}",
        "finetune.distill.weight=1.0",
        "finetune.distill.kind=channel",
    ]
    run_stage("finetune", cfg(*FT, *kd, "finetune.distill.temperature=2"), tmp_path / "kd", init=init)
    c = load_file(str(tmp_path / "kd" / "model" / "model.safetensors"))
    assert not all(torch.equal(a[k], c[k]) for k in a)  # the teacher's term moved the weights
    done = json.loads((tmp_path / "kd" / "done.json").read_text())
    assert done["metrics"]["distill_teacher_ms_per_step"] > 0
    logged = [json.loads(x) for x in (tmp_path / "kd" / "metrics.jsonl").read_text().splitlines() if x.strip()]
    assert all(r["teacher_ms"] > 0 for r in logged if r.get("phase") == "seg")
    with pytest.raises(UsageError, match="finetune.distill.teacher DIR"):
        run_stage("finetune", cfg(*FT, "finetune.distill.weight=1.0"), tmp_path / "no", init=init)


def test_rescale_gamma_before_fine_tuning_and_polarization_in_slimming(tmp_path):
    dense, net = _shrunk_pruned_net(6, 10)
    save_model(dense, tmp_path / "dense")
    save_model(net, tmp_path / "pruned")
    extra = [f"finetune.distill.teacher={tmp_path / 'dense'}", "finetune.rescale_gamma=true"]
    run_stage("finetune", cfg(*FT, *extra), tmp_path / "ft", init=str(tmp_path / "pruned"))
    done = json.loads((tmp_path / "ft" / "done.json").read_text())
    assert done["metrics"]["rescaled_layers"] >= 4
    pol = ["sparse_slimming.l1=polarization", "sparse_slimming.t=1.4", "sparse_slimming.alpha=0.01"]
    run_stage("sparse-slimming", cfg(*pol, "sparse_slimming.epochs=1", "sparse_slimming.batch_size=4"), tmp_path / "s")
    assert (tmp_path / "s" / "done.json").is_file()
    run_stage("sparse-mtp", cfg("sparse_mtp.l1=polarization", "sparse_mtp.t=1.4"), tmp_path / "m")
    assert json.loads((tmp_path / "m" / "done.json").read_text())["metrics"]["sparse_backbone"] >= 0
    with pytest.raises(UsageError, match="sparse_slimming.l1"):
        cfg("sparse_slimming.l1=elastic")
