"""Several seeds of one run: mean ± std of every model, and the paired per-seed differences the paper's
claims are about (MTP − Slimming, MTP − Uniform, independent − unified, with − without classification
fine-tuning). A paired difference uses the same seed's two models, so the seed-to-seed swing of the
dense net cancels out of it.
"""

from __future__ import annotations

import os
import statistics
from pathlib import Path
from typing import Any

from mtprune.io import write_json, write_text
from mtprune.layout import DENSE, display_name, row_budget, variant_tag
from mtprune.pruning.methods import METHODS
from mtprune.report.tables import Row, _table

#: the row keys summarised over seeds
_KEYS = ("miou", "delta_miou", "params_ratio", "macs_ratio", "latency_ratio", "top1", "miou_pruned", "top1_pruned")


def _stats(values: list[float]) -> dict[str, Any]:
    return {
        "mean": statistics.fmean(values),
        "std": statistics.stdev(values) if len(values) > 1 else 0.0,
        "n": len(values),
        "values": values,
    }


def _pairs(rows: list[Row]) -> list[tuple[str, str, str]]:
    """(label, tag a, tag b) for every difference a − b whose two models the run has."""
    tags = {r["tag"] for r in rows}
    out = []
    for r in rows:
        if r["method"] == DENSE:
            continue
        m, p, th, cls = r["method"], row_budget(r), r["thresholds"], bool(r.get("cls_finetune", True))
        name = display_name(r)
        if m == "mtp":
            for other in (m for m in METHODS if m != "mtp"):
                b = variant_tag(other, p, th, cls)
                if b in tags:
                    out.append((f"{name} − {other}", r["tag"], b))
        for other_th in ("unified", "layerwise"):
            if th == "independent" and variant_tag(m, p, other_th, cls) in tags:
                out.append((f"{name}: independent − {other_th}", r["tag"], variant_tag(m, p, other_th, cls)))
        if cls and variant_tag(m, p, th, False) in tags:
            out.append((f"{name}: with − without cls FT", r["tag"], variant_tag(m, p, th, False)))
    return out


def summarize_seeds(per_seed: dict[int, list[Row]]) -> dict[str, Any]:
    """``{"seeds", "models": {tag: {"name", key: stats}}, "paired": [{"label", "a", "b", "miou": stats}]}``
    from each seed's ``results.json`` rows; a model missing from a seed is summarised over the others."""
    seeds = sorted(per_seed)
    models: dict[str, dict[str, Any]] = {}
    for s in seeds:
        for r in per_seed[s]:
            m = models.setdefault(r["tag"], {"name": display_name(r), "row": r, "by_seed": {}})
            m["by_seed"][s] = r
    out_models: dict[str, dict[str, Any]] = {}
    for tag, m in models.items():
        entry: dict[str, Any] = {"name": m["name"], "seeds": sorted(m["by_seed"])}
        for k in _KEYS:
            vals = [r[k] for r in m["by_seed"].values() if r.get(k) is not None]
            if vals:
                entry[k] = _stats(vals)
        out_models[tag] = entry
    paired = []
    for label, a, b in _pairs([m["row"] for m in models.values()]):
        common = [s for s in seeds if s in models[a]["by_seed"] and s in models[b]["by_seed"]]
        diffs = [
            models[a]["by_seed"][s]["miou"] - models[b]["by_seed"][s]["miou"]
            for s in common
            if models[a]["by_seed"][s].get("miou") is not None and models[b]["by_seed"][s].get("miou") is not None
        ]
        if diffs:
            paired.append({"label": label, "a": a, "b": b, "seeds": common, "miou": _stats(diffs)})
    return {"seeds": seeds, "models": out_models, "paired": paired}


def _ms(st: dict[str, Any] | None, scale: float = 100.0, fmt: str = ".2f", signed: bool = False) -> str:
    if not st:
        return "–"
    f = ("+" if signed else "") + fmt
    return f"{scale * st['mean']:{f}} ± {scale * st['std']:{fmt}}"


def render_seeds(summary: dict[str, Any], title: str = "mtprune run — seeds") -> str:
    seeds = summary["seeds"]
    pruned = any("miou_pruned" in m for m in summary["models"].values())  # run.eval_pruned
    body = [
        [
            m["name"],
            str(len(m["seeds"])),
            _ms(m.get("miou")),
            _ms(m.get("delta_miou"), signed=True) if tag != "dense" else "",
            _ms(m.get("params_ratio"), 1.0, ".3f"),
            _ms(m.get("macs_ratio"), 1.0, ".3f"),
            _ms(m.get("latency_ratio"), 1.0, ".2f"),
            _ms(m.get("top1"), fmt=".1f"),
        ]
        + ([_ms(m.get("miou_pruned")), _ms(m.get("top1_pruned"), fmt=".1f")] if pruned else [])
        for tag, m in summary["models"].items()
    ]
    head = ["model", "seeds", "mIoU %", "Δ", "params ×", "MACs ×", "latency ×", "top-1 %"]
    head += ["mIoU before FT %", "top-1 before FT %"] if pruned else []
    parts = [
        f"# {title}\n",
        f"Seeds {', '.join(map(str, seeds))}: mean ± sample std over seeds; mIoU, Δ and top-1 in %, × against "
        "the same seed's dense model. Each seed's full report is in its `seed-<k>/` folder.\n",
        _table(head, body),
    ]
    if summary["paired"]:
        prow = [
            [
                p["label"],
                " ".join(f"{100 * v:+.2f}" for v in p["miou"]["values"]),
                _ms(p["miou"], signed=True),
                f"{sum(v > 0 for v in p['miou']['values'])}/{p['miou']['n']}",
            ]
            for p in summary["paired"]
        ]
        parts += [
            "## Paired differences (same seed), mIoU points\n",
            _table(["difference", "per seed", "mean ± std", "seeds > 0"], prow),
        ]
    return "\n".join(parts)


def write_seeds_summary(out: str | os.PathLike, per_seed: dict[int, list[Row]], title: str) -> dict[str, Any]:
    """``out/summary.json`` and ``out/summary.md``; returns the summary."""
    out = Path(out)
    summary = summarize_seeds(per_seed)
    write_json(out / "summary.json", summary)
    write_text(out / "summary.md", render_seeds(summary, title))
    return summary
