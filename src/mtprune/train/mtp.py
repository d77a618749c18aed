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
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from mtprune.checkpoint import SCORES_FILE
from mtprune.config import Config
from mtprune.data.from_config import make_dataset
from mtprune.errors import UsageError
from mtprune.io import save_tensors
from mtprune.method import (
    alm_coupling,
    eq7_backward,
    eq8_backward,
    eq9_backward,
    eq10_update,
    joint_seg_backward,
    relative_gap,
    soft_threshold_,
)
from mtprune.method.sparsity import budget_alpha, l1_shrink, median_abs
from mtprune.models.base import BACKBONE, DECODER, SegmentationModel
from mtprune.train.diagnostics import report_sparsity, round_diagnostics, shrink_check
from mtprune.train.distributed import DistEnv, autocast
from mtprune.train.engine import (
    STAGE_TASKS,
    ClsNet,
    Evaluator,
    SegNet,
    StageRun,
    clip,
    convert_sync_bn,
    initial_model,
    lr_at,
    no_evaluation,
    place_model,
    prunable_gammas,
    revert_sync_bn,
    seg_loss,
    set_lr,
    set_train_mode,
    sgd,
    sync_buffers,
    to_device,
    training_stream,
    warn_crop,
    wrap_ddp,
)
from mtprune.train.streams import BatchStream
from mtprune.train.teacher import cls_task

#: the ℓ1 weight of each part's γ, named in the sparsity warning
ALPHA_KEYS = {BACKBONE: "sparse_mtp.alpha1", DECODER: "sparse_mtp.alpha2"}


def check_mtp_config(cfg: Config) -> None:
    """The numeric conditions of ``sparse_mtp`` (its enums are checked when the config loads)."""
    c = cfg.sparse_mtp
    if c.rho < 1.0:
        raise UsageError(f"sparse_mtp.rho must be ≥ 1 (Eq. 10), got {c.rho}")
    limit = 2.0 * (1.0 + cfg.optim.momentum)
    lr = max(c.lr_cls, c.lr_seg) * max(c.gamma_lr, 1.0)  # the γ learn at gamma_lr × the rate
    if lr * max(c.mu_max, c.mu0) >= limit:
        raise UsageError(
            f"sparse_mtp: lr × mu_max = {lr * max(c.mu_max, c.mu0):.3g} ≥ {limit:.3g}: "
            "SGD on the μ/2‖W1−W3‖² term diverges; lower mu_max (or the learning rates, or gamma_lr)"
        )


@dataclass
class ALMState:
    """The ALM multipliers E (one tensor per backbone parameter) and μ, with the running loss sums of the
    current round: what ``sparse-mtp`` keeps across a resume besides weights and optimisers."""

    E: list[torch.Tensor]
    mu: float
    sum_cls: float = 0.0
    sum_seg: float = 0.0

    def state_tensors(self) -> dict[str, torch.Tensor]:
        return {f"alm.E.{i}": e for i, e in enumerate(self.E)}

    def state_meta(self) -> dict[str, Any]:
        return {"mu": self.mu, "sum_cls": self.sum_cls, "sum_seg": self.sum_seg}

    def load_state(self, tensors: dict[str, torch.Tensor], meta: dict[str, Any]) -> None:
        for i, e in enumerate(self.E):
            e.copy_(tensors[f"alm.E.{i}"])
        self.mu, self.sum_cls, self.sum_seg = float(meta["mu"]), float(meta["sum_cls"]), float(meta["sum_seg"])


def _no_check(loss: torch.Tensor, what: str) -> None:
    return None


@dataclass
class SparseMTP:
    """The three variables of Algorithm 1 and one SGD step on each sub-problem: :meth:`w1_step` (Eq. 7),
    :meth:`seg_step` (Eq. 8, Eq. 9, or both from one pass in ``joint`` mode) and :meth:`end_round` (Eq. 10).
    ``model.backbone`` is W3, ``model.decoder`` W2, ``backbone1`` (a copy) W1."""

    cfg: Config
    env: DistEnv
    model: SegmentationModel
    check: Callable[[torch.Tensor, str], None] = _no_check  # called on each loss before its backward
    backbone1: torch.nn.Module = field(init=False)

    def __post_init__(self) -> None:
        c, model = self.cfg.sparse_mtp, self.model
        self.backbone1 = copy.deepcopy(model.backbone)
        self.cls_task = cls_task(self.cfg, model, self.env.device)  # Eq. 7's ℓcls: labels or a teacher's outputs
        self.cls_net = ClsNet(self.backbone1, model.cls_head, self.cls_task.output)
        self.seg_net = SegNet(model)
        self.w1, self.w3 = list(self.backbone1.parameters()), list(model.backbone.parameters())
        self.alm = ALMState([torch.zeros_like(p) for p in self.w1], c.mu0)
        bns = [
            n.removeprefix("backbone.") for lay in model.prunable_layers() if lay.part == BACKBONE for n in lay.scored
        ]
        self.gamma1 = [self.backbone1.get_submodule(n).weight for n in bns]
        self.gamma3, self.gamma2 = prunable_gammas(model, BACKBONE), prunable_gammas(model, DECODER)
        self.opt1 = sgd(self.cls_net.parameters(), c.lr_cls, self.cfg, self.gamma1, c.gamma_lr)
        self.opt2 = sgd(model.decoder.parameters(), c.lr_seg, self.cfg, self.gamma2, c.gamma_lr)
        self.opt3 = sgd(model.backbone.parameters(), c.lr_seg, self.cfg, self.gamma3, c.gamma_lr)
        self.ddp_cls, self.ddp_seg = wrap_ddp(self.cls_net, self.env), wrap_ddp(self.seg_net, self.env)
        self.l1_alpha = self._l1_alpha()  # α1 (backbone), α2 (decoder): as configured, or from l1_budget
        # the ℓ1 terms: in the gradient (subgradient) or as a soft-threshold after each step (proximal)
        grad = c.l1 in ("subgradient", "polarization")
        self.alpha1, self.alpha2 = (self.l1_alpha[BACKBONE], self.l1_alpha[DECODER]) if grad else (0.0, 0.0)
        self.polar_t = c.t if c.l1 == "polarization" else None  # the polarization term in place of ℓ1

    def _l1_alpha(self) -> dict[str, float]:
        """α1 and α2: ``alpha1`` / ``alpha2``, or with ``l1_budget`` the α whose shrink budget is l1_budget ×
        the part's median |γ| in the net the stage starts from (docs/method.md, "Choosing α")."""
        c = self.cfg.sparse_mtp
        if c.l1_budget is None:
            return {BACKBONE: c.alpha1, DECODER: c.alpha2}
        unit, parts = self.shrink({BACKBONE: 1.0, DECODER: 1.0}), self.parts()
        return {part: budget_alpha(c.l1_budget, median_abs(parts[part]), unit[part]) for part in unit}

    def w1_step(self, x: torch.Tensor, y: torch.Tensor, lr: float) -> float:
        """One SGD step of W1 on Eq. 7 (classification batch ``x, y``); returns the classification loss."""
        set_lr(self.opt1, lr)
        with autocast(self.env.device, self.cfg.optim.amp):
            logits = self.ddp_cls(x)
        loss = self.cls_task.loss(logits, x, y)
        self.check(loss, "classification (Eq. 7)")
        self.opt1.zero_grad(set_to_none=True)
        eq7_backward(loss, self.w1, self.w3, self.alm.E, self.alm.mu, self.gamma1, self.alpha1, self.polar_t)
        clip(self.cls_net.parameters(), self.cfg)
        self.opt1.step()
        self._proximal([self.gamma1], lr * self.cfg.sparse_mtp.gamma_lr * self.l1_alpha[BACKBONE])
        self.alm.sum_cls += float(loss.detach())
        return float(loss.detach())

    def seg_step(self, x: torch.Tensor, y: torch.Tensor, lr: float, sub: str) -> float:
        """One SGD step on a segmentation batch: ``sub`` ``"w2"`` (Eq. 8), ``"w3"`` (Eq. 9) or ``"w2w3"``
        (both, from one forward/backward: ``joint`` mode); returns the segmentation loss."""
        for opt in (self.opt2, self.opt3):
            set_lr(opt, lr)
        with autocast(self.env.device, self.cfg.optim.amp):
            outputs = self.ddp_seg(x)
        loss = seg_loss(outputs, y, self.cfg.sparse_mtp.aux_weight)
        self.check(loss, "segmentation (Eq. 8/9)")
        self.opt2.zero_grad(set_to_none=True)
        self.opt3.zero_grad(set_to_none=True)
        lam, a2, E, mu = self.cfg.sparse_mtp.lam, self.alpha2, self.alm.E, self.alm.mu
        if sub == "w2w3":
            joint_seg_backward(loss, self.w1, self.w3, E, mu, self.gamma2, self.gamma3, a2, lam, self.polar_t)
        elif sub == "w2":
            eq8_backward(loss, self.gamma2, a2, lam, self.polar_t)
        else:
            eq9_backward(loss, self.w1, self.w3, E, mu, self.gamma3, a2, lam, self.polar_t)
        clip(self.seg_net.parameters(), self.cfg)
        stepped = {"w2": [(self.opt2, self.gamma2)], "w3": [(self.opt3, self.gamma3)]}
        for opt, gam in stepped.get(sub, stepped["w2"] + stepped["w3"]):
            opt.step()
            self._proximal([gam], lr * self.cfg.sparse_mtp.gamma_lr * self.l1_alpha[DECODER])
        if sub != "w3":
            self.alm.sum_seg += float(loss.detach())
        return float(loss.detach())

    def _proximal(self, gammas: list[list[torch.nn.Parameter]], threshold: float) -> None:
        if self.cfg.sparse_mtp.l1 == "proximal":
            for g in gammas:
                soft_threshold_(g, threshold)

    def end_round(self, rnd: int) -> dict[str, Any]:
        """Eq. 10 after round ``rnd`` (``E ← E + μ(W1 − W3)``, ``μ ← min(ρμ, mu_max)``); the round's record."""
        c = self.cfg.sparse_mtp
        gap = relative_gap(self.w1, self.w3)
        with torch.no_grad():
            alm_value = float(alm_coupling(self.w1, self.w3, self.alm.E, self.alm.mu))
        self.alm.mu = eq10_update(self.alm.E, self.w1, self.w3, self.alm.mu, c.rho, c.mu_max)
        record = {
            "round": rnd + 1,
            "gap": gap,
            "cls_loss": self.alm.sum_cls / max(c.steps_cls, 1),
            "seg_loss": self.alm.sum_seg / max(c.steps_seg, 1),
            "mu": self.alm.mu,
            "alm": alm_value,
            **round_diagnostics(self.parts(), self.cfg),
        }
        self.alm.sum_cls = self.alm.sum_seg = 0.0
        return record

    def shrink(self, alpha: dict[str, float] | None = None) -> dict[str, float]:
        """Each part's ℓ1 shrink budget over the stage (:func:`~mtprune.method.sparsity.l1_shrink`): α1 over
        W1's classification steps (the backbone's scores), α2 over W2's segmentation steps (the decoder's);
        ``alpha``: other α than the stage's."""
        c, beta = self.cfg.sparse_mtp, self.cfg.optim.momentum
        alpha = alpha or self.l1_alpha
        n_cls, n_seg = c.rounds * c.steps_cls, c.rounds * c.steps_seg
        lrs_cls = [lr_at("linear", c.lr_cls, i, n_cls) for i in range(n_cls)]
        lrs_seg = [lr_at("poly", c.lr_seg, i, n_seg) for i in range(n_seg)]
        return {
            BACKBONE: l1_shrink(alpha[BACKBONE], lrs_cls, c.l1, beta, c.gamma_lr),
            DECODER: l1_shrink(alpha[DECODER], lrs_seg, c.l1, beta, c.gamma_lr),
        }

    def parts(self) -> dict[str, list[torch.Tensor]]:
        """The γ the scores are read from, per part: γ1 of W1 (backbone), γ2 of W2 (decoder)."""
        return {BACKBONE: list(self.gamma1), DECODER: list(self.gamma2)}

    def scores(self) -> dict[str, torch.Tensor]:
        """The pruning scores (Algorithm 1, line 9): |γ1| of W1 for the backbone, |γ2| of W2 for the decoder."""
        out = {}
        for lay in self.model.prunable_layers():
            net, prefix = (self.backbone1, "backbone.") if lay.part == BACKBONE else (self.model, "")
            gammas = [net.get_submodule(n.removeprefix(prefix)).weight.detach().abs() for n in lay.scored]
            out[lay.bn] = torch.stack(gammas).sum(0).cpu().contiguous()  # a tied group: the sum of its |γ|
        return out

    def exported(self) -> SegmentationModel:
        """The net to prune: decoder W2 and classification head, backbone (parameters and running
        statistics) from W1 (``backbone_from: w1``) or W3."""
        if self.cfg.sparse_mtp.backbone_from == "w3":
            return self.model
        out = copy.deepcopy(self.model)
        out.backbone.load_state_dict(self.backbone1.state_dict())
        return out


def _rounds(run: StageRun, mtp: SparseMTP, cls_stream: BatchStream, seg_stream: BatchStream) -> None:
    """Algorithm 1's loop from ``run.step`` on: each round ``steps_cls`` Eq. 7 steps, the segmentation
    steps, then Eq. 10; resumable at any step."""
    cfg, env, c = run.cfg, run.env, run.cfg.sparse_mtp
    seg_passes = 2 if c.mode == "alternating" else 1
    per_round = c.steps_cls + seg_passes * c.steps_seg
    while run.step < run.total:
        rnd, k = divmod(run.step, per_round)
        if k < c.steps_cls:
            lr = lr_at("linear", c.lr_cls, rnd * c.steps_cls + k, c.rounds * c.steps_cls)
            loss = mtp.w1_step(*to_device(next(cls_stream), cfg, env), lr)
            record: dict[str, Any] = {"phase": "w1", "loss": loss, "lr": lr}
        else:
            j = k - c.steps_cls
            sub = "w2w3" if c.mode == "joint" else ("w2" if j < c.steps_seg else "w3")
            lr = lr_at("poly", c.lr_seg, rnd * c.steps_seg + (j % c.steps_seg), c.rounds * c.steps_seg)
            loss = mtp.seg_step(*to_device(run.seg_batch(next(seg_stream)), cfg, env), lr, sub)
            record = {"phase": sub, "loss": loss, "lr": lr}
        if k == per_round - 1:  # end of the round
            run.log({"step": run.step + 1, **mtp.end_round(rnd)})
            record["mu"] = mtp.alm.mu
        run.after_step(record)


def run_sparse_mtp(
    cfg: Config, out: Path, env: DistEnv, init: str | None, evaluate: Evaluator = no_evaluation
) -> dict[str, Any]:
    """The ``sparse-mtp`` stage in folder ``out``, from the model at ``init``; returns its final metrics."""
    check_mtp_config(cfg)
    c = cfg.sparse_mtp
    seg_ds, cls_ds = make_dataset(cfg, "seg", True), make_dataset(cfg, "cls", True)
    warn_crop(seg_ds, cfg, env)
    model = place_model(initial_model(cfg, init, seg_ds.num_classes, cls_ds.num_classes), cfg, env)
    model.prunable_layers()  # traced (and kept) before SyncBatchNorm replaces the BNs the trace looks for
    convert_sync_bn([model.backbone, model.decoder], cfg, env)
    run = StageRun("sparse-mtp", cfg, out, env)
    mtp = SparseMTP(cfg, env, model, check=run.check_finite)
    cls_stream = training_stream(cls_ds, c.cls_batch_size, cfg.seed + 1, cfg, env, "sparse_mtp.cls_batch_size")
    seg_stream = training_stream(seg_ds, c.seg_batch_size, cfg.seed, cfg, env, "sparse_mtp.seg_batch_size")
    run.total = c.rounds * (c.steps_cls + (2 if c.mode == "alternating" else 1) * c.steps_seg)
    run.modules = {"model": model, "backbone1": mtp.backbone1}
    run.optimizers = {"w1": mtp.opt1, "w2": mtp.opt2, "w3": mtp.opt3}
    run.streams = {"cls": cls_stream, "seg": seg_stream}
    run.extra = mtp.alm
    before = {part: [g.detach().clone() for g in gs] for part, gs in mtp.parts().items()}  # the dense net's
    budget = cfg.sparse_mtp.l1_budget
    start = shrink_check("sparse-mtp", before, mtp.shrink(), cfg, ALPHA_KEYS, budget) if env.is_main else {}
    start["l1_alpha"] = dict(mtp.l1_alpha)
    run.start()
    try:
        set_train_mode(model, cfg)
        set_train_mode(mtp.backbone1, cfg)
        _rounds(run, mtp, cls_stream, seg_stream)
    finally:
        run.close_progress()
    for m in (model, mtp.backbone1):
        sync_buffers(m, env)
        revert_sync_bn(m)
    return _finish(run, mtp, evaluate, init, before, start)


def _finish(
    run: StageRun,
    mtp: SparseMTP,
    evaluate: Evaluator,
    init: str | None,
    before: dict[str, list[torch.Tensor]],
    start: dict[str, Any],
) -> dict[str, Any]:
    """Export the net to prune with its scores (``model/scores.safetensors``) and the final metrics."""
    exported, scores = mtp.exported(), mtp.scores()

    def write_scores(model_dir: Path) -> None:
        save_tensors(model_dir / SCORES_FILE, scores, {"what": "gamma1 of W1 (backbone), gamma2 of W2 (decoder)"})

    metrics = {"gap": relative_gap(mtp.w1, mtp.w3), "mu": mtp.alm.mu}
    if run.env.is_main:
        metrics.update(report_sparsity("sparse-mtp", before, mtp.parts(), run.cfg, ALPHA_KEYS, start))
    metrics.update(evaluate(exported, run.cfg, run.env, STAGE_TASKS["sparse-mtp"], False))
    meta = {"init": init, "backbone_from": run.cfg.sparse_mtp.backbone_from}
    return run.finish(exported, metrics, meta=meta, extra_files=write_scores)
