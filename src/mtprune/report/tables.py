"""The paper's tables for one run, as Markdown: Table 2/3 form, Table 4 (unified vs independent),
Tables 5/6 (per-class IoU), Table 7 (top-1/top-5), Table 1 (with vs without classification fine-tuning)."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from mtprune.io import write_text
from mtprune.layout import DENSE, REPORT_FILE, display_name
from mtprune.report.plots import make_plots

Row = dict[str, Any]


def _pct(x: float | None) -> str:
    return "–" if x is None else f"{100 * x:.2f}"


def _si(x: float) -> str:
    """1.23 G / 45.6 M / 7.8 k."""
    for div, unit in ((1e9, "G"), (1e6, "M"), (1e3, "k")):
        if abs(x) >= div:
            return f"{x / div:.3g} {unit}"
    return f"{x:.3g}"


def _x(x: float | None) -> str:
    return "–" if x is None else f"{x:.2f}×"


def _table(header: list[str], rows: list[list[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(r) + " |" for r in rows]
    return "\n".join(lines) + "\n"


def main_table(rows: list[Row]) -> str:
    """Table 2/3 form: mIoU with Δ, params ×, MACs ×, latency ×."""
    body = []
    for r in rows:
        if not r.get("cls_finetune", True) and r["method"] != DENSE:
            continue
        delta = (
            "" if r["method"] == DENSE else f" ({100 * r['delta_miou']:+.2f})" if r["delta_miou"] is not None else ""
        )
        body.append(
            [
                display_name(r),
                _pct(r["miou"]) + delta,
                f"{_si(r['params'])} ({_x(r['params_ratio'])})" if r.get("params") else "–",
                f"{_si(r['macs'])} ({_x(r['macs_ratio'])})" if r.get("macs") else "–",
                f"{r['latency_ms']:.2f} ms ({_x(r['latency_ratio'])})" if r.get("latency_ms") else "–",
            ]
        )
    return _table(["model", "mIoU % (Δ)", "params", "MACs", "latency"], body)


def thresholds_table(rows: list[Row]) -> str | None:
    """Table 4: unified against independent thresholds for the same method and ratio."""
    pairs: dict[tuple[str, float], dict[str, Row]] = {}
    for r in rows:
        if r["thresholds"] in ("independent", "unified") and r.get("cls_finetune", True):
            pairs.setdefault((r["method"], r["ratio"]), {})[r["thresholds"]] = r
    body = []
    for (method, ratio), d in sorted(pairs.items()):
        if len(d) == 2:
            u, i = d["unified"], d["independent"]
            body.append(
                [
                    f"{method} {1 - ratio:.2g}×",
                    _pct(u["miou"]),
                    _x(u["macs_ratio"]),
                    _pct(i["miou"]),
                    _x(i["macs_ratio"]),
                ]
            )
    if not body:
        return None
    return _table(["model", "unified mIoU %", "unified MACs", "independent mIoU %", "independent MACs"], body)


def per_class_table(rows: list[Row]) -> str | None:
    """Tables 5/6: IoU of every class, one row per model."""
    rows = [r for r in rows if r.get("per_class") and (r["method"] == DENSE or r.get("cls_finetune", True))]
    if not rows:
        return None
    classes = list(rows[0]["per_class"])
    body = [[display_name(r)] + [_pct(r["per_class"].get(c)) for c in classes] + [_pct(r["miou"])] for r in rows]
    return _table(["model", *classes, "mIoU"], body)


def topk_table(rows: list[Row]) -> str | None:
    """Table 7: top-1/top-5 of backbone + classification head (after fine-tuning)."""
    body = [[display_name(r), _pct(r.get("top1")), _pct(r.get("top5"))] for r in rows if r.get("top1") is not None]
    return _table(["model", "top-1 %", "top-5 %"], body) if body else None


def cls_finetune_table(rows: list[Row]) -> str | None:
    """Table 1: the same pruned model fine-tuned with and without classification epochs."""
    by: dict[tuple[str, float, str], dict[bool, Row]] = {}
    for r in rows:
        if r["method"] != DENSE:
            by.setdefault((r["method"], r["ratio"], r["thresholds"]), {})[bool(r.get("cls_finetune", True))] = r
    body = [
        [
            display_name(d[True]),
            _pct(d[True]["miou"]),
            _pct(d[False]["miou"]),
            f"{100 * (d[True]['miou'] - d[False]['miou']):+.2f}",
        ]
        for _, d in sorted(by.items())
        if len(d) == 2 and d[True]["miou"] is not None and d[False]["miou"] is not None
    ]
    return _table(["model", "with cls FT mIoU %", "without mIoU %", "Δ"], body) if body else None


def render_report(rows: list[Row], plots: dict[str, str], title: str = "mtprune run") -> str:
    parts = [
        f"# {title}\n",
        "mIoU, top-1 and top-5 in %, on the validation splits; Δ against the dense model; ×: ratio to the "
        "dense model. Params of the deployed segmentation net; MACs = FLOPs / 2 at the cost size; latency: "
        "median of batch-1 CPU runs, all models timed round-robin; × is the ratio to dense paired per round.\n",
        "## Comparison (Tables 2/3 form)\n",
        main_table(rows),
    ]
    extended = {display_name(r): r["extra_seg_steps"] for r in rows if r.get("extra_seg_steps")}
    if extended:
        parts.append(
            "\nBudget: equal segmentation steps after `train-seg` (`run.equal_seg_steps`); fine-tuning extended by "
            + ", ".join(f"{n} steps for {m}" for m, n in extended.items())
            + ".\n"
        )
    for title_, table in (
        ("Unified vs independent thresholds (Table 4)", thresholds_table(rows)),
        ("With vs without classification fine-tuning (Table 1)", cls_finetune_table(rows)),
        ("Per-class IoU (Tables 5/6)", per_class_table(rows)),
        ("Backbone top-1 / top-5 (Table 7)", topk_table(rows)),
    ):
        if table:
            parts += [f"## {title_}\n", table]
    if plots:
        parts.append("## Figures\n")
        for caption, path in plots.items():
            parts.append(f"**{caption}**\n\n![{caption}]({path})\n")
    return "\n".join(parts)


def write_report(out: str | os.PathLike, cfg: Any, rows: list[Row]) -> Path:
    """Write ``out/report.md`` and ``out/plots/*.png`` for a finished run."""
    out = Path(out)
    plots = make_plots(out, cfg, rows)
    path = out / REPORT_FILE
    write_text(path, render_report(rows, plots, title=f"mtprune run — {cfg.model.name}, {cfg.data.seg.dataset}"))
    return path
