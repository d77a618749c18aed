"""``sparse-mtp``: sparse multi-task training by inexact augmented Lagrange multipliers (Algorithm 1).

Each round: ``steps_cls`` SGD steps on Eq. 7 (W1 = backbone copy + classification head, on
classification batches), then the segmentation steps, then Eq. 10 (``E ← E + μ(W1 − W3)``,
``μ ← min(ρμ, mu_max)``). Segmentation steps come in two modes:

- ``alternating`` — Algorithm 1 as written: ``steps_seg`` steps on Eq. 8 (W2, the decoder), then
  ``steps_seg`` steps on Eq. 9 (W3, the segmentation backbone copy), each with its own forward/backward;
- ``joint`` — ``steps_seg`` steps on :func:`~mtprune.method.joint_seg_objective`: one forward/backward
  gives Eq. 8's gradient for W2 and Eq. 9's for W3 (they share ``λ ℓseg``), and both are stepped.
  The paper's text only says W1, W2, W3 are "updated alternately" (Sec. 3) and lists Eq. 8 and Eq. 9 as
  separate lines of Algorithm 1; it does not say whether each line is one step or many, or whether
  they see the same batches. ``joint`` is the Jacobi variant of the same block-coordinate scheme and
  costs one segmentation pass instead of two.

Stability: an SGD step on ``μ/2‖W1 − W3‖²`` multiplies the gap by ``1 − lr·μ``; with momentum β it
diverges once ``lr·μ ≥ 2(1 + β)``, so ``mu_max`` is checked against the learning rates up front.

BatchNorm running statistics are buffers, not parameters: W1's are estimated on classification
batches, W3's (and W2's) on segmentation batches, and the constraint W1 = W3 ties parameters only
(γ and β included). The exported model takes its backbone — parameters *and* running statistics —
from W1 (``backbone_from: w1``, the default; Algorithm 1 line 9 scores the backbone with γ1 of W1) or
from W3; the pruning scores are always γ1 of W1 and γ2 of W2, saved in ``model/scores.safetensors``.
"""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from safetensors.torch import save_file

from mtprune.config import Config
from mtprune.data.from_config import make_dataset
from mtprune.errors import UsageError
from mtprune.io import atomic_path
from mtprune.method import (
    add_alm_grad_,
    alm_coupling,
    eq7_objective,
    eq8_objective,
    eq9_objective,
    eq10_update,
    joint_seg_objective,
    relative_gap,
    soft_threshold_,
)
from mtprune.models.base import BACKBONE, DECODER, SegmentationModel
from mtprune.train.distributed import DistEnv
from mtprune.train.engine import (
    ClsNet,
    Evaluator,
    SegNet,
    StageRun,
    autocast,
    clip,
    convert_sync_bn,
    initial_model,
    lr_at,
    no_evaluation,
    place_model,
    prunable_gammas,
    revert_sync_bn,
    seg_loss,
    set_train_mode,
    sgd,
    sync_buffers,
    to_device,
    wrap_ddp,
)
from mtprune.train.streams import BatchStream

SPARSE_BELOW = 1e-2  # a γ below this counts as "pruned away" in the round logs


def sparsity(gammas: list[torch.nn.Parameter]) -> float:
    """Fraction of |γ| below 1e-2."""
    g = torch.cat([x.detach().abs().flatten() for x in gammas])
    return float((g < SPARSE_BELOW).float().mean())


def run_sparse_mtp(
    cfg: Config, out: Path, env: DistEnv, init: str | None, evaluate: Evaluator = no_evaluation
) -> dict[str, Any]:
    c = cfg.sparse_mtp
    if c.mode not in ("joint", "alternating"):
        raise UsageError(f"sparse_mtp.mode must be joint or alternating, got '{c.mode}'")
    if c.l1 not in ("subgradient", "proximal"):
        raise UsageError(f"sparse_mtp.l1 must be subgradient or proximal, got '{c.l1}'")
    if c.backbone_from not in ("w1", "w3"):
        raise UsageError(f"sparse_mtp.backbone_from must be w1 or w3, got '{c.backbone_from}'")
    if c.rho < 1.0:
        raise UsageError(f"sparse_mtp.rho must be ≥ 1 (Eq. 10), got {c.rho}")
    limit = 2.0 * (1.0 + cfg.optim.momentum)
    if max(c.lr_cls, c.lr_seg) * max(c.mu_max, c.mu0) >= limit:
        raise UsageError(
            f"sparse_mtp: lr × mu_max = {max(c.lr_cls, c.lr_seg) * max(c.mu_max, c.mu0):.3g} ≥ {limit:.3g}: "
            "SGD on the μ/2‖W1−W3‖² term diverges; lower mu_max (or the learning rates)"
        )
    seg_ds, cls_ds = make_dataset(cfg, "seg", True), make_dataset(cfg, "cls", True)
    model = place_model(initial_model(cfg, init, seg_ds.num_classes, cls_ds.num_classes), cfg, env)
    convert_sync_bn([model.backbone, model.decoder], cfg, env)
    backbone1 = copy.deepcopy(model.backbone)  # W1; model.backbone is W3, model.decoder W2
    cls_net, seg_net = ClsNet(backbone1, model.cls_head), SegNet(model)
    w1, w3 = list(backbone1.parameters()), list(model.backbone.parameters())
    E = [torch.zeros_like(p) for p in w1]
    bb_bns = [lay.bn.removeprefix("backbone.") for lay in model.prunable_layers() if lay.part == BACKBONE]
    gamma1 = [backbone1.get_submodule(n).weight for n in bb_bns]
    gamma3, gamma2 = prunable_gammas(model, BACKBONE), prunable_gammas(model, DECODER)
    opt1 = sgd(cls_net.parameters(), c.lr_cls, cfg)
    opt2 = sgd(model.decoder.parameters(), c.lr_seg, cfg)
    opt3 = sgd(model.backbone.parameters(), c.lr_seg, cfg)
    ddp_cls, ddp_seg = wrap_ddp(cls_net, env), wrap_ddp(seg_net, env)
    cls_stream = BatchStream(cls_ds, c.cls_batch_size, cfg.seed + 1, env, cfg.data.workers)
    seg_stream = BatchStream(seg_ds, c.seg_batch_size, cfg.seed, env, cfg.data.workers)
    seg_passes = 2 if c.mode == "alternating" else 1
    per_round = c.steps_cls + seg_passes * c.steps_seg
    total_cls, total_seg = c.rounds * c.steps_cls, c.rounds * c.steps_seg

    alm = {"mu": c.mu0, "sum_cls": 0.0, "sum_seg": 0.0}
    l1_grad = c.l1 == "subgradient"
    a1, a2 = (c.alpha1, c.alpha2) if l1_grad else (0.0, 0.0)

    run = StageRun("sparse-mtp", cfg, out, env)
    run.total = c.rounds * per_round
    run.modules = {"model": model, "backbone1": backbone1}
    run.optimizers = {"w1": opt1, "w2": opt2, "w3": opt3}
    run.streams = {"cls": cls_stream, "seg": seg_stream}
    run.extra_tensors = lambda: {f"alm.E.{i}": e for i, e in enumerate(E)}
    run.extra_meta = lambda: dict(alm)

    def restore(tensors: dict[str, torch.Tensor], meta: dict[str, Any]) -> None:
        for i, e in enumerate(E):
            e.copy_(tensors[f"alm.E.{i}"])
        alm.update(meta)

    run.restore_extra = restore
    run.start()
    run.progress()
    try:
        set_train_mode(model, cfg)
        set_train_mode(backbone1, cfg)
        while run.step < run.total:
            rnd, k = divmod(run.step, per_round)
            mu = alm["mu"]
            if k < c.steps_cls:  # Eq. 7: W1 on classification
                lr = lr_at("linear", c.lr_cls, rnd * c.steps_cls + k, total_cls)
                for g in opt1.param_groups:
                    g["lr"] = lr
                x, y = to_device(next(cls_stream), cfg, env)
                with autocast(cfg, env):
                    logits = ddp_cls(x)
                loss = F.cross_entropy(logits.float(), y)
                run.check_finite(loss, "classification (Eq. 7)")
                obj = eq7_objective(loss, w1, w3, E, mu, gamma1, a1, coupling=False)
                opt1.zero_grad(set_to_none=True)
                obj.backward()
                add_alm_grad_(w1, w3, E, mu, +1.0)  # Eq. 7's ALM terms: + E + μ(W1 − W3)
                clip(cls_net.parameters(), cfg)
                opt1.step()
                if not l1_grad:
                    soft_threshold_(gamma1, lr * c.alpha1)
                alm["sum_cls"] += float(loss.detach())
                record = {"phase": "w1", "loss": float(loss.detach()), "lr": lr}
            else:
                j = k - c.steps_cls
                sub = "w2w3" if c.mode == "joint" else ("w2" if j < c.steps_seg else "w3")
                it = rnd * c.steps_seg + (j % c.steps_seg)
                lr = lr_at("poly", c.lr_seg, it, total_seg)
                for opt in (opt2, opt3):
                    for g in opt.param_groups:
                        g["lr"] = lr
                x, y = to_device(next(seg_stream), cfg, env)
                with autocast(cfg, env):
                    outputs = ddp_seg(x)
                loss = seg_loss(outputs, y, c.aux_weight)
                run.check_finite(loss, "segmentation (Eq. 8/9)")
                if sub == "w2w3":
                    obj = joint_seg_objective(loss, w1, w3, E, mu, gamma2, gamma3, a2, c.lam, coupling=False)
                    stepped = [(opt2, gamma2), (opt3, gamma3)]
                elif sub == "w2":
                    obj = eq8_objective(loss, gamma2, a2, c.lam)
                    stepped = [(opt2, gamma2)]
                else:
                    obj = eq9_objective(loss, w1, w3, E, mu, gamma3, a2, c.lam, coupling=False)
                    stepped = [(opt3, gamma3)]
                opt2.zero_grad(set_to_none=True)
                opt3.zero_grad(set_to_none=True)
                obj.backward()
                if sub != "w2":
                    add_alm_grad_(w3, w1, E, mu, -1.0)  # Eq. 9's ALM terms: − E − μ(W1 − W3)
                clip(seg_net.parameters(), cfg)
                for opt, gam in stepped:
                    opt.step()
                    if not l1_grad:
                        soft_threshold_(gam, lr * c.alpha2)
                if sub != "w3":
                    alm["sum_seg"] += float(loss.detach())
                record = {"phase": sub, "loss": float(loss.detach()), "lr": lr}
            if k == per_round - 1:  # end of the round
                gap = relative_gap(w1, w3)
                with torch.no_grad():
                    alm_value = float(alm_coupling(w1, w3, E, mu))
                alm["mu"] = eq10_update(E, w1, w3, mu, c.rho, c.mu_max)  # Eq. 10
                round_rec = {
                    "round": rnd + 1,
                    "gap": gap,
                    "cls_loss": alm["sum_cls"] / max(c.steps_cls, 1),
                    "seg_loss": alm["sum_seg"] / max(c.steps_seg, 1),
                    "mu": alm["mu"],
                    "alm": alm_value,
                    "sparse_backbone": sparsity(gamma1),
                    "sparse_decoder": sparsity(gamma2),
                }
                alm["sum_cls"] = alm["sum_seg"] = 0.0
                run.log({"step": run.step + 1, **round_rec})
                record["mu"] = alm["mu"]
            run.after_step(record)

    finally:
        run.close_progress()
    sync_buffers(model, env)
    sync_buffers(backbone1, env)
    revert_sync_bn(model)
    revert_sync_bn(backbone1)
    exported = _export(model, backbone1, c.backbone_from)
    scores = {
        lay.bn: (
            backbone1.get_submodule(lay.bn.removeprefix("backbone.")).weight
            if lay.part == BACKBONE
            else model.get_submodule(lay.bn).weight
        )
        .detach()
        .abs()
        .cpu()
        .contiguous()
        for lay in model.prunable_layers()
    }

    def write_scores(model_dir: Path) -> None:
        with atomic_path(model_dir / "scores.safetensors") as tmp:
            save_file(scores, str(tmp), metadata={"what": "gamma1 of W1 (backbone), gamma2 of W2 (decoder)"})

    metrics = {
        "gap": relative_gap(w1, w3),
        "mu": alm["mu"],
        "sparse_backbone": sparsity(gamma1),
        "sparse_decoder": sparsity(gamma2),
    }
    metrics.update(evaluate(exported, cfg, env, ("seg", "cls"), False))
    return run.finish(
        exported, metrics, meta={"init": init, "backbone_from": c.backbone_from}, extra_files=write_scores
    )


def _export(model: SegmentationModel, backbone1: torch.nn.Module, source: str) -> SegmentationModel:
    """The net to prune: decoder W2 and classification head, backbone from W1 or W3."""
    if source == "w3":
        return model
    exported = copy.deepcopy(model)
    exported.backbone.load_state_dict(backbone1.state_dict())
    return exported
