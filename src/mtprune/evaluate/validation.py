"""Validation of a stage's model as the configuration describes it: what every training stage reports
when it ends (``eval.final``), what fine-tuning logs per epoch (``eval.every_epoch``, Fig. 4) and what a
run's ``eval-*`` stages measure."""

from __future__ import annotations

import dataclasses
import json
import sys
from typing import Any

from torch.utils.data import Subset

from mtprune.config import Config
from mtprune.data.check import check_dataset
from mtprune.data.from_config import has_validation, make_dataset
from mtprune.errors import DataError
from mtprune.evaluate.inference import build_eval_loader, evaluate_classification, evaluate_segmentation
from mtprune.models.base import SegmentationModel
from mtprune.train.distributed import DistEnv
from mtprune.train.teacher import teacher_net, uses_teacher


def _first(ds: Any, n: int | None) -> Any:
    return Subset(ds, range(min(n, len(ds)))) if n else ds


def final_metrics(
    model: SegmentationModel, cfg: Config, env: DistEnv, tasks: tuple[str, ...], force: bool = False
) -> dict[str, Any]:
    """Validation metrics of the stage's model (mIoU and/or top-1/top-5), when ``eval.final`` is set
    (or ``force``): the :data:`~mtprune.train.engine.Evaluator` the stage runner gives training."""
    if not (cfg.eval.final or force):
        return {}
    out: dict[str, Any] = {}
    model.eval()
    if "seg" in tasks:
        ds = make_dataset(cfg, "seg", train=False)
        loader = build_eval_loader(
            _first(ds, cfg.eval.max_images),
            1,
            cfg.data.workers,
            distributed=env.distributed,
            skip_bad=cfg.data.skip_bad,
        )
        r = evaluate_segmentation(
            model,
            loader,
            ds.num_classes,
            scales=tuple(cfg.eval.scales),
            flip=cfg.eval.flip,
            device=env.device,
            class_names=list(ds.class_names),
            progress=False,
        )
        out.update(miou=r["miou"], pixel_acc=r["pixel_acc"], per_class=r["per_class"])
    if "cls" in tasks and has_validation(cfg, "cls") and not (uses_teacher(cfg) and cfg.data.cls.target != "logits"):
        # a teacher's set: top-1 / top-5 are the agreement with the teacher's top-1 (its logits)
        teacher = teacher_net(cfg, model, env.device) if uses_teacher(cfg) else None
        ds = make_dataset(cfg, "cls", train=False)
        loader = build_eval_loader(
            _first(ds, cfg.eval.max_images),
            32,
            cfg.data.workers,
            distributed=env.distributed,
            skip_bad=cfg.data.skip_bad,
        )
        r = evaluate_classification(model, loader, device=env.device, progress=False, teacher=teacher)
        out.update(top1=r["top1"], top5=r["top5"])
    return out


_checked: set[str] = set()  # the validation sets this process has decoded once already


def check_validation_data(cfg: Config, tasks: tuple[str, ...]) -> None:
    """Decode the validation split(s) of ``tasks`` once, before a stage trains for hours only to fail on
    a bad file at its final evaluation: the first problem is one :class:`~mtprune.errors.DataError` line
    (with ``data.skip_bad`` a note says how many samples the evaluation will skip)."""
    for task in tasks:
        if not has_validation(cfg, task):
            continue
        d = cfg.data.seg if task == "seg" else cfg.data.cls
        key = json.dumps([task, dataclasses.asdict(d), cfg.seed], sort_keys=True, default=str)
        if key in _checked:
            continue
        ds = make_dataset(cfg, task, train=False)
        report = check_dataset(ds, num_workers=cfg.data.workers, progress=False)
        if report.problems and not cfg.data.skip_bad:
            more = f" (and {len(report.problems) - 1} more)" if len(report.problems) > 1 else ""
            raise DataError(
                f"data.{task} validation split '{d.val_split}': {report.problems[0]}{more}; found before training: "
                "fix or remove the file, or pass --skip-bad (data.skip_bad=true)"
            )
        if report.problems:
            print(f"data.{task} validation: {len(report.problems)} bad sample(s) will be skipped", file=sys.stderr)
        _checked.add(key)
