"""``mtprune export --checkpoint DIR --onnx FILE [--size H W] [--dynamic]``."""

from __future__ import annotations

import argparse
import json

from mtprune.checkpoint import load_model
from mtprune.cli.args import positive_int
from mtprune.export import compare_onnx, export_onnx, ort_latency, unaligned_convs


def _export(args: argparse.Namespace) -> int:
    model = load_model(args.checkpoint)
    size = tuple(args.size)
    path = export_onnx(model, args.onnx, size, dynamic=args.dynamic, opset=args.opset, exporter=args.exporter)
    unaligned = unaligned_convs(model, 8)
    out = {"onnx": str(path), "size": list(size), "dynamic": args.dynamic, "unaligned_convs": len(unaligned)}
    if args.check:
        out.update(compare_onnx(model, path, size))
    if args.latency:
        out.update(ort_latency(path, size, runs=args.runs, threads=args.threads or None))
    if args.json:
        print(json.dumps(out))
    else:
        print(f"wrote {path} ({size[0]}×{size[1]}{', dynamic axes' if args.dynamic else ''})")
        if "max_abs_diff" in out:
            print(
                f"  ONNX Runtime vs PyTorch: max |Δ| = {out['max_abs_diff']:.2e} "
                f"({out['max_rel_diff']:.2e} of max |logit|)"
            )
        if "latency_ms" in out:
            print(f"  ONNX Runtime CPU latency: {out['latency_ms']:.2f} ms (IQR {out['latency_iqr_ms']:.2f})")
        if unaligned:
            print(
                f"  note: {len(unaligned)} convolutions have channel counts that are not multiples of 8 "
                f"(e.g. {unaligned[0]}); ONNX Runtime runs such nets slower — re-prune with --round-to 8 "
                '(measured: bench/README.md, "ONNX Runtime, dense against pruned")'
            )
    return 0


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("export", help="export a dense or pruned checkpoint to ONNX (needs the export extra)")
    p.add_argument("--checkpoint", required=True, metavar="DIR", help="model directory or stage folder")
    p.add_argument("--onnx", required=True, metavar="FILE", help="output .onnx file")
    p.add_argument(
        "--size", type=positive_int, nargs=2, default=[512, 512], metavar=("H", "W"), help="example input size"
    )
    p.add_argument("--dynamic", action="store_true", help="dynamic batch, height and width")
    p.add_argument("--opset", type=int, default=18, help="ONNX opset (default 18)")
    p.add_argument("--exporter", default="dynamo", choices=["dynamo", "torchscript"], help="torch.onnx exporter")
    p.add_argument("--check", action="store_true", help="compare ONNX Runtime's output with PyTorch's")
    p.add_argument("--latency", action="store_true", help="time ONNX Runtime on CPU (batch 1)")
    p.add_argument("--runs", type=int, default=20, help="timed runs (default 20)")
    p.add_argument("--threads", type=int, default=0, help="ONNX Runtime intra-op threads (default: its own)")
    p.add_argument("--json", action="store_true", help="print one JSON object")
    p.set_defaults(func=_export)
