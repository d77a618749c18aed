"""Validation of a stage's model as the configuration describes it: what every training stage reports
when it ends (``eval.final``), what fine-tuning logs per epoch (``eval.every_epoch``, Fig. 4) and what a
run's ``eval-*`` stages measure."""

from __future__ import annotations

from typing import Any

from torch.utils.data import Subset

from mtprune.config import Config
from mtprune.data.from_config import make_dataset
from mtprune.evaluate.inference import build_eval_loader, evaluate_classification, evaluate_segmentation
from mtprune.models.base import SegmentationModel
from mtprune.train.distributed import DistEnv


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
            _first(ds, cfg.eval.max_images), batch_size=1, num_workers=cfg.data.workers, distributed=env.distributed
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
    if "cls" in tasks:
        ds = make_dataset(cfg, "cls", train=False)
        loader = build_eval_loader(
            _first(ds, cfg.eval.max_images), batch_size=32, num_workers=cfg.data.workers, distributed=env.distributed
        )
        r = evaluate_classification(model, loader, device=env.device, progress=False)
        out.update(top1=r["top1"], top5=r["top5"])
    return out
