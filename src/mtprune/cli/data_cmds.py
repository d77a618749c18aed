"""``mtprune make-data`` and ``mtprune check-data``."""

from __future__ import annotations

import argparse
import json
import shutil
import sys
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from tqdm import tqdm

from mtprune.data import DATASETS, build_dataset, check_dataset, format_report
from mtprune.data.synthetic import META_FILE, SHAPE_CLASSES, write_synthetic
from mtprune.errors import DataError, UsageError


def register(sub: argparse._SubParsersAction) -> None:
    make = sub.add_parser(
        "make-data",
        help="write the synthetic dataset to disk (VOC layout + a classification tree)",
        description="Write the synthetic textured-shapes world to OUT: the segmentation set in the VOC 2012 "
        "layout (VOCdevkit/VOC2012/...), the classification set as cls/{train,val}/<class>/*.png and "
        "synthetic.json. Read it back with --dataset synthetic --root OUT (or --dataset voc).",
    )
    make.add_argument("name", choices=["synthetic"], help="what to generate")
    make.add_argument("--out", required=True, type=Path, help="output folder (new or empty)")
    make.add_argument("--num-train", type=int, default=500, help="segmentation training images (default 500)")
    make.add_argument("--num-val", type=int, default=100, help="segmentation validation images (default 100)")
    make.add_argument(
        "--size", type=int, nargs=2, default=[64, 64], metavar=("H", "W"), help="image height and width (default 64 64)"
    )
    make.add_argument("--seed", type=int, default=0, help="generator seed (default 0)")
    make.add_argument(
        "--num-classes", type=int, default=6, help="segmentation classes including background, 2..11 (default 6)"
    )
    make.add_argument("--cls-classes", type=int, default=10, help="classification classes, 2..10 (default 10)")
    make.add_argument("--num-cls-train", type=int, default=2000, help="classification training images (default 2000)")
    make.add_argument("--num-cls-val", type=int, default=500, help="classification validation images (default 500)")
    make.add_argument("--force", action="store_true", help="regenerate over a synthetic dataset already in OUT")
    make.set_defaults(func=make_data)

    check = sub.add_parser(
        "check-data",
        help="decode every sample of a dataset and report sizes, class pixels and problems",
        description="Walk a dataset, decode every image and mask, print the number of samples, image sizes "
        "and pixels per class, then one 'PROBLEM: <file>: <what> (<value>)' line per problem. "
        "Exit 0 when clean, 1 when there are problems or the layout is wrong.",
    )
    check.add_argument("--dataset", required=True, choices=list(DATASETS), help="dataset layout")
    check.add_argument("--root", required=True, type=Path, help="dataset root folder")
    check.add_argument(
        "--split", default=None, help="split to check (default: every standard split present under the root)"
    )
    check.add_argument(
        "--task",
        choices=["seg", "cls"],
        default="seg",
        help="for --dataset synthetic: the segmentation or the classification set",
    )
    check.add_argument("--workers", type=int, default=0, help="decoding worker processes (default 0)")
    check.add_argument("--json", action="store_true", help="print the report as JSON")
    check.set_defaults(func=check_data)


def _progress(it: Iterable[Any], total: int, desc: str) -> Iterable[Any]:
    return tqdm(it, total=total, desc=desc, unit="img", file=sys.stderr, disable=None, leave=False)


def make_data(args: argparse.Namespace) -> int:
    out: Path = args.out
    for flag in ("num_train", "num_val", "num_cls_train", "num_cls_val"):
        if getattr(args, flag) < 0:
            raise UsageError(f"--{flag.replace('_', '-')} must be >= 0")
    if min(args.size) < 8:
        raise UsageError(f"--size must be at least 8 8, got {args.size[0]} {args.size[1]}")
    if not 2 <= args.num_classes <= len(SHAPE_CLASSES) + 1:
        raise UsageError(f"--num-classes must be in 2..{len(SHAPE_CLASSES) + 1}, got {args.num_classes}")
    if not 2 <= args.cls_classes <= len(SHAPE_CLASSES):
        raise UsageError(f"--cls-classes must be in 2..{len(SHAPE_CLASSES)}, got {args.cls_classes}")
    if out.exists() and not out.is_dir():
        raise DataError(f"{out}: exists and is not a folder")
    if out.is_dir() and any(out.iterdir()):
        if not (out / META_FILE).is_file():
            raise DataError(f"{out}: folder is not empty and holds no synthetic dataset; choose a new folder")
        if not args.force:
            raise DataError(f"{out}: holds a synthetic dataset already; pass --force to regenerate it")

        for sub in ("VOCdevkit", "cls"):
            if (out / sub).is_dir():
                shutil.rmtree(out / sub)
        (out / META_FILE).unlink()
    h, w = args.size
    meta = write_synthetic(
        out,
        num_train=args.num_train,
        num_val=args.num_val,
        image_size=(h, w),
        num_classes=args.num_classes,
        seed=args.seed,
        cls_classes=args.cls_classes,
        num_cls_train=args.num_cls_train,
        num_cls_val=args.num_cls_val,
        progress=_progress,
    )
    voc = out / "VOCdevkit" / "VOC2012"
    print(
        f"wrote {voc}: {args.num_train} train + {args.num_val} val images {w}x{h}, "
        f"{args.num_classes} classes ({', '.join(meta['class_names'])}), "
        "JPEGImages/*.jpg, SegmentationClass/*.png (palette), ImageSets/Segmentation/{train,val,trainval}.txt"
    )
    print(
        f"wrote {out / 'cls'}: {args.num_cls_train} train + {args.num_cls_val} val images {w}x{h}, "
        f"{args.cls_classes} classes, {{train,val}}/<class>/*.png"
    )
    print(f"wrote {out / META_FILE} (seed {args.seed})")
    print(f"check it with: mtprune check-data --dataset synthetic --root {out}")
    return 0


def check_data(args: argparse.Namespace) -> int:
    if args.workers < 0:
        raise UsageError(f"--workers must be >= 0, got {args.workers}")
    kw: dict[str, Any] = {"task": args.task} if args.dataset == "synthetic" else {}
    if not args.root.is_dir():
        raise DataError(f"expected dataset root directory {args.root} ({args.dataset}) not found")
    if args.split is not None:
        datasets = [build_dataset(args.dataset, args.root, args.split, **kw)]
        notes: list[str] = []
    else:
        datasets, notes, errors = [], [], []
        for split in DATASETS[args.dataset].splits:
            try:
                datasets.append(build_dataset(args.dataset, args.root, split, **kw))
            except DataError as e:
                errors.append(e)
                notes.append(f"split {split} not checked: {e}")
        if not datasets:
            raise errors[0]
    reports = [check_dataset(ds, num_workers=args.workers) for ds in datasets]
    ok = all(r.ok for r in reports)
    if args.json:
        print(json.dumps({"ok": ok, "reports": [r.to_json() for r in reports], "notes": notes}, indent=2))
    else:
        print("\n\n".join(format_report(r) for r in reports))
        for note in notes:
            print(f"note: {note}")
    return 0 if ok else 1
