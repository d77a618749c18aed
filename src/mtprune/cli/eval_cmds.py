"""``mtprune eval``: mIoU / per-class IoU / pixel accuracy, or top-1 / top-5, of a checkpoint on a dataset."""

from __future__ import annotations

import argparse
import json
import sys
from dataclasses import dataclass, field, fields
from typing import Any

import torch

from mtprune.checkpoint import load_model
from mtprune.config import load_config
from mtprune.data import DATASETS
from mtprune.data.from_config import eval_dataset
from mtprune.errors import MtpruneError, UsageError
from mtprune.evaluate.inference import build_eval_loader, evaluate_classification, evaluate_segmentation
from mtprune.train.teacher import TEACHER, teacher_net


@dataclass(frozen=True)
class EvalRequest:
    """What ``mtprune eval`` measures: the checkpoint, the split, how (test-time scales, flip, batches,
    device) and how it reports."""

    checkpoint: str
    dataset: str
    root: str | None = None
    split: str | None = None
    task: str | None = None
    teacher: str | None = None
    scales: list[float] = field(default_factory=lambda: [1.0])
    flip: bool = False
    resize: list[int] | None = None
    json: bool = False
    skip_bad: bool = False
    device: str = "cpu"
    amp: bool = False
    batch_size: int = 1
    workers: int = 0
    num_samples: int | None = None
    image_size: list[int] | None = None
    num_classes: int | None = None
    seed: int | None = None


def _default_split(splits: tuple[str, ...]) -> str:
    for s in ("val", "validation"):
        if s in splits:
            return s
    return splits[-1]


def _pair(values: list[int] | None, flag: str) -> int | tuple[int, int] | None:
    if values is None:
        return None
    if len(values) not in (1, 2) or min(values) < 1:
        raise UsageError(f"{flag} takes one or two positive sizes (H [W]), got {' '.join(map(str, values))}")
    return values[0] if len(values) == 1 else (values[0], values[1])


def _positive_float(text: str) -> float:
    try:
        v = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"invalid scale '{text}' (a positive number)") from None
    if not v > 0 or v == float("inf"):
        raise argparse.ArgumentTypeError(f"scale {text} must be a positive number")
    return v


def _fmt(v: float | None) -> str:
    return "—" if v is None else f"{100 * v:6.2f}"


def _dataset(req: EvalRequest) -> tuple[Any, str, str, bool]:
    """The split ``--dataset/--root/--split`` name, checked against the flags: (dataset, task, split, in memory)."""
    spec = DATASETS[req.dataset]
    if req.task is not None and req.dataset != "synthetic" and req.task != spec.task:
        raise UsageError(f"dataset {req.dataset} is a '{spec.task}' dataset; --task {req.task} does not apply")
    task = req.task or spec.task
    split = req.split or _default_split(spec.splits)
    in_memory = req.dataset == "synthetic" and req.root is None
    if req.root is None and not in_memory:
        raise UsageError(f"--root DIR is needed for dataset {req.dataset}")
    synth = {
        "num_samples": req.num_samples,
        "image_size": _pair(req.image_size, "--image-size"),
        "num_classes": req.num_classes,
        "seed": req.seed,
    }
    given = [k for k, v in synth.items() if v is not None]
    if given and not in_memory:
        flags = ", ".join("--" + k.replace("_", "-") for k in given)
        raise UsageError(f"{flags}: only for the in-memory synthetic set (--dataset synthetic without --root)")
    if req.resize is not None and task != "seg":
        raise UsageError("--resize applies to segmentation evaluation only")
    kw: dict[str, Any] = {k: v for k, v in synth.items() if v is not None}
    return (
        eval_dataset(req.dataset, req.root, split, task, _pair(req.resize, "--resize"), **kw),
        task,
        split,
        in_memory,
    )


def _teacher(req: EvalRequest, model: Any) -> Any:
    """``--dataset teacher``: the frozen teacher ``--teacher DIR`` (checked against the model), giving logits."""
    if req.dataset != TEACHER:
        if req.teacher:
            raise UsageError("--teacher applies to --dataset teacher only")
        return None
    if not req.teacher:
        raise UsageError("--dataset teacher needs --teacher DIR: the net whose top-1 the model is compared with")
    cfg = load_config(overrides=[f"data.cls.dataset={TEACHER}", f"data.cls.teacher={req.teacher}"])
    return teacher_net(cfg, model, req.device)


def _evaluate(req: EvalRequest, model: Any, dataset: Any, task: str) -> dict[str, Any]:
    teacher = _teacher(req, model)
    loader = build_eval_loader(dataset, req.batch_size, req.workers, skip_bad=req.skip_bad)
    if task != "seg":
        return evaluate_classification(model, loader, device=req.device, amp=req.amp, teacher=teacher)
    return evaluate_segmentation(
        model,
        loader,
        dataset.num_classes,
        ignore_index=dataset.ignore_index,
        scales=req.scales,
        flip=req.flip,
        device=req.device,
        class_names=dataset.class_names,
        amp=req.amp,
    )


def _eval(args: argparse.Namespace) -> int:
    return evaluate(EvalRequest(**{f.name: getattr(args, f.name) for f in fields(EvalRequest)}))


def evaluate(req: EvalRequest) -> int:
    """Measure as ``req`` says and print (a table, or one JSON object)."""
    if req.batch_size < 1:
        raise UsageError(f"--batch-size must be >= 1, got {req.batch_size}")
    if req.workers < 0:
        raise UsageError(f"--workers must be >= 0, got {req.workers}")
    if req.device == "cuda" and not torch.cuda.is_available():
        raise UsageError("--device cuda: CUDA is not available on this machine")
    dataset, task, split, in_memory = _dataset(req)
    model = load_model(req.checkpoint, device=req.device)
    model_classes = model.num_classes if task == "seg" else model.cls_classes
    what = "segmentation" if task == "seg" else "classification"
    if model_classes != dataset.num_classes and dataset.num_classes is not None:  # None: a teacher's classes
        hint = " (pass --num-classes N for the in-memory synthetic set)" if in_memory else ""
        raise MtpruneError(
            f"checkpoint {req.checkpoint} has {model_classes} {what} classes, dataset {req.dataset} ({split}) "
            f"has {dataset.num_classes}{hint}"
        )
    res = _evaluate(req, model, dataset, task)
    return _report(req, res, model, task, split)


def _report(req: EvalRequest, res: dict[str, Any], model: Any, task: str, split: str) -> int:
    skipped_line = None
    if req.skip_bad:
        n = res["num_skipped"]
        skipped_line = f"skipped {n} bad sample{'s' if n != 1 else ''}"
        if n:
            skipped_line += f" (first: {res['skipped'][0]})"
    if req.json:
        out = {
            **res,
            "checkpoint": str(req.checkpoint),
            "model": model.name,
            "dataset": req.dataset,
            "split": split,
            "task": task,
        }
        print(json.dumps(out))
        if skipped_line:
            print(skipped_line, file=sys.stderr)
        return 0

    head = f"{model.name} from {req.checkpoint} on {req.dataset} {split}: {res['num_images']} images"
    if task == "seg":
        tta = f"scales {' '.join(f'{s:g}' for s in res['scales'])}" + (", flip" if res["flip"] else "")
        print(f"{head} ({tta})")
        width = max([len("pixel accuracy"), *(len(n) for n in res["per_class"])])
        print(f"  {'class':<{width}}  IoU %")
        for name, iou in res["per_class"].items():
            print(f"  {name:<{width}}  {_fmt(iou)}")
        print(f"  {'mIoU':<{width}}  {_fmt(res['miou'])}")
        print(f"  {'pixel accuracy':<{width}}  {_fmt(res['pixel_acc'])}")
        if any(v is None for v in res["per_class"].values()):
            print("  (—: class neither in the targets nor predicted; not part of the mIoU)")
    elif req.dataset == TEACHER:
        print(f"{head} (backbone + classification head against the teacher {req.teacher})")
        print(f"  top-1  {_fmt(res['top1'])} %  (the net's top-1 = the teacher's)")
        print(f"  top-5  {_fmt(res['top5'])} %  (the teacher's top-1 in the net's top 5)")
    else:
        print(f"{head} (backbone + classification head, {model.cls_classes} classes)")
        print(f"  top-1  {_fmt(res['top1'])} %")
        print(f"  top-5  {_fmt(res['top5'])} %")
    if skipped_line:
        print(skipped_line)
    return 0


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "eval",
        help="evaluate a checkpoint: per-class IoU, mIoU, pixel accuracy (or top-1/top-5 on a cls dataset)",
        description="Evaluate a checkpoint on a dataset split. Segmentation: per-class IoU, mIoU (mean over "
        "the classes present in the targets or the predictions) and pixel accuracy, optionally with "
        "multi-scale (--scales) and flip (--flip) testing. Classification datasets (imagefolder, synthetic "
        "--task cls): top-1/top-5 of backbone + classification head; --dataset teacher --root FOLDER --teacher DIR: "
        "agreement with a teacher's top-1 on any images. --json prints one object with fractions "
        "in [0, 1] (miou, per_class, pixel_acc; or top1, top5).",
    )
    p.add_argument("--checkpoint", required=True, metavar="DIR", help="model directory (arch.json + model.safetensors)")
    p.add_argument("--dataset", required=True, choices=list(DATASETS), help="dataset layout")
    p.add_argument("--root", metavar="DIR", help="dataset root (omit for the in-memory synthetic set)")
    p.add_argument("--split", help="split (default: val, or validation for ade20k)")
    p.add_argument("--task", choices=["seg", "cls"], help="for --dataset synthetic: segmentation (default) or cls")
    p.add_argument(
        "--scales", type=_positive_float, nargs="+", default=[1.0], metavar="S",
        help="test scales, e.g. 0.5 0.75 1.0 1.25 1.5 1.75 (default 1.0)",
    )  # fmt: skip
    p.add_argument("--flip", action="store_true", help="also run the horizontally flipped image")
    p.add_argument(
        "--resize",
        type=int,
        nargs="+",
        metavar="N",
        help="segmentation: resize images and masks "
        "(shorter side N, or H W) before evaluating, for reduced-resolution protocols",
    )
    p.add_argument(
        "--teacher",
        metavar="DIR",
        help="--dataset teacher: the checkpoint whose top-1 is the target (top1 = agreement with it, top5 = its "
        "top-1 within the net's top 5), on every image under --root",
    )
    p.add_argument("--json", action="store_true", help="print one JSON object")
    p.add_argument("--skip-bad", action="store_true", help="skip unreadable samples (and say how many)")
    p.add_argument("--device", default="cpu", choices=["cpu", "cuda"], help="device (default cpu)")
    p.add_argument("--amp", action="store_true", help="bfloat16 autocast (CUDA only)")
    p.add_argument("--batch-size", type=int, default=1, metavar="N", help="images per batch (default 1)")
    p.add_argument("--workers", type=int, default=0, metavar="N", help="data loading processes (default 0)")
    g = p.add_argument_group("in-memory synthetic set (--dataset synthetic without --root)")
    g.add_argument("--num-samples", type=int, metavar="N", help="images (default: the generator's)")
    g.add_argument("--image-size", type=int, nargs="+", metavar="N", help="image size: N, or H W (default 64)")
    g.add_argument("--num-classes", type=int, metavar="N", help="classes (default 6 for seg, 10 for cls)")
    g.add_argument("--seed", type=int, metavar="S", help="generator seed (default 0)")
    p.set_defaults(func=_eval)
