"""The paper's tables for one run, as Markdown: Table 2/3 form, Table 4 (unified vs independent),
Tables 5/6 (per-class IoU), Table 7 (top-1/top-5), Table 1 (with vs without classification fine-tuning)."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

from mtprune.io import write_text
from mtprune.layout import DENSE, LATENCY, REPORT_FILE, budget_key, budget_label, display_name, sparse_dirs
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
                _latency_cell(r),
            ]
        )
    return _table(["model", "mIoU % (Δ)", "params", "MACs", _latency_header(rows)], body)


def _latency_cell(r: Row) -> str:
    """``ms (ratio×) setup``: the net's median and paired ratio, in the setup it was fastest in."""
    if not r.get("latency_ms"):
        return "–"
    setup = f" {r['latency_setup']}" if r.get("latency_setup") else ""
    return f"{r['latency_ms']:.2f} ms ({_x(r['latency_ratio'])}){setup}"


def _latency_header(rows: list[Row]) -> str:
    """``latency at H×W``: the size the nets were timed at (the run's cost size)."""
    size = next((r["latency_size"] for r in rows if r.get("latency_size")), None)
    return f"latency at {size[0]}×{size[1]}" if size else "latency"


def thresholds_table(rows: list[Row]) -> str | None:
    """Table 4: unified against independent thresholds for the same method and ratio (or target)."""
    pairs: dict[tuple[str, tuple[str, float]], dict[str, Row]] = {}
    for r in rows:
        if r["thresholds"] in ("independent", "unified") and r.get("cls_finetune", True):
            pairs.setdefault((r["method"], budget_key(r)), {})[r["thresholds"]] = r
    body = []
    for (method, _), d in sorted(pairs.items()):
        if len(d) == 2:
            u, i = d["unified"], d["independent"]
            body.append(
                [
                    f"{method} {budget_label(u)}",
                    _pct(u["miou"]),
                    _x(u["macs_ratio"]),
                    _pct(i["miou"]),
                    _x(i["macs_ratio"]),
                ]
            )
    if not body:
        return None
    return _table(["model", "unified mIoU %", "unified MACs", "independent mIoU %", "independent MACs"], body)


#: plans this alike prune (nearly) the same channels: their mIoU difference is fine-tuning noise
SAME_PLAN = 0.9


def overlap_table(rows: list[Row]) -> str | None:
    """The Jaccard overlap of the kept channels of every pair of models at one ratio or target."""
    names = {r["tag"]: display_name(r) for r in rows}
    seen, body = set(), []
    for r in rows:
        for other, ov in (r.get("plan_overlap") or {}).items():
            pair = tuple(sorted((r["tag"], other)))
            if pair in seen or other not in names:
                continue
            seen.add(pair)
            flag = f"≥ {SAME_PLAN:g}: same channels" if ov.get("all", 0.0) >= SAME_PLAN else ""
            cells = [_num(ov.get(k)) for k in ("all", "backbone", "decoder")]
            body.append([names[pair[0]], names[pair[1]], *cells, flag])
    if not body:
        return None
    return _table(["model", "model", "overlap", "backbone", "decoder", ""], body)


def _num(x: float | None) -> str:
    return "–" if x is None else f"{x:.3f}"


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
    by: dict[tuple[str, tuple[str, float], str], dict[bool, Row]] = {}
    for r in rows:
        if r["method"] != DENSE:
            by.setdefault((r["method"], budget_key(r), r["thresholds"]), {})[bool(r.get("cls_finetune", True))] = r
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


def render_report(
    rows: list[Row], plots: dict[str, str], title: str = "mtprune run", warnings: list[str] | None = None
) -> str:
    parts = [
        f"# {title}\n",
        "mIoU, top-1 and top-5 in %, on the validation splits; Δ against the dense model; ×: ratio to the "
        "dense model. Params of the deployed segmentation net; MACs = FLOPs / 2 at the cost size; latency: "
        "median of batch-1 runs as run.timing says, each model timed against dense pair by pair, each in the setup "
        "named beside it (its fastest of run.timing's runtimes); × is the ratio to dense paired per round.\n",
        "## Comparison (Tables 2/3 form)\n",
        main_table(rows),
    ]
    if warnings:
        parts += ["## Warnings\n", "\n".join(f"- {w}" for w in warnings) + "\n"]
    extended = {display_name(r): r["extra_seg_steps"] for r in rows if r.get("extra_seg_steps")}
    if extended:
        parts.append(
            "\nBudget: equal segmentation steps after `train-seg` (`run.equal_seg_steps`); fine-tuning extended by "
            + ", ".join(f"{n} steps for {m}" for m, n in extended.items())
            + ".\n"
        )
    for title_, table in (
        ("Unified vs independent thresholds (Table 4)", thresholds_table(rows)),
        (
            f"Plan overlap (Jaccard of the kept channels; pairs ≥ {SAME_PLAN:g} prune the same channels, so their "
            "mIoU difference is fine-tuning noise)",
            overlap_table(rows),
        ),
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
    title = f"mtprune run — {cfg.model.name}, {cfg.data.seg.dataset}"
    warnings = stage_warnings(out) + slower_than_dense(rows, cfg.run.round_to)
    write_text(path, render_report(rows, plots, title=title, warnings=warnings))
    return path


def slower_than_dense(rows: list[Row], round_to: int | str) -> list[str]:
    """One warning when pruned models are no faster than the dense one although they do less work (a latency
    ratio ≥ 1 at a MACs ratio < 0.95): at counts off the runtime's channel blocks the kernels leave their fast
    paths (docs/deployment-speed.md); ``round_to: auto`` prunes to counts they like."""
    slow = [
        r
        for r in rows
        if r.get("latency_ratio") is not None and r.get("macs_ratio") is not None
        if r["latency_ratio"] >= 1.0 and r["macs_ratio"] < 0.95
    ]
    if not slow:
        return []
    hint = "" if round_to == "auto" else "; run.round_to: auto prunes to counts the runtime's kernels are fast at"
    worst = max(slow, key=lambda r: r["latency_ratio"])
    lat, macs = [r["latency_ratio"] for r in slow], [r["macs_ratio"] for r in slow]
    if len(slow) == 1:
        what = (
            f"{display_name(worst)} is {worst['latency_ratio']:.2f}× the dense net's latency at {macs[0]:.2f}× its MACs"
        )
    else:
        what = (
            f"{len(slow)} pruned models are no faster than the dense net at less work ({min(lat):.2f}–{max(lat):.2f}× "
            f"its latency at {min(macs):.2f}–{max(macs):.2f}× its MACs; slowest: {display_name(worst)})"
        )
    return [f"warning: {what}{hint} (docs/deployment-speed.md)"]


def stage_warnings(out: Path) -> list[str]:
    """The warnings the run's sparse stages (sparse training that did not separate) and its latency stage (a
    ratio timed on a busy machine) wrote in their done.json."""
    found = []
    for stage in sparse_dirs():
        done = out / stage / "done.json"
        if done.is_file():
            found += json.loads(done.read_text()).get("metrics", {}).get("warnings", [])
    latency = out / LATENCY / "done.json"
    if latency.is_file():
        found += json.loads(latency.read_text()).get("warnings", [])
    return found
