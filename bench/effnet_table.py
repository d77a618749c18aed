"""The real-ImageNet benchmark's table (issue 28), from the seeds of an ``mtprune run`` folder.

Per model: mIoU (val), params ×, MACs ×, latency ×, teacher agreement (top-1 of the backbone against the
ImageNet teacher on CamVid's validation frames), mIoU and agreement right after pruning (before fine-tuning),
sparsity the sparse stage reached (backbone / decoder) and the plan overlap with Uniform's at the same budget —
mean ± std over the seeds present — and the paired per-seed mIoU differences of every method against Uniform.

    python bench/effnet_table.py runs/effnet                                   # a run folder's seed-K/results.json
    python bench/effnet_table.py bench/results/effnet_full_seed*_cpu_*.json  # kept rows: the seed from each name
"""

from __future__ import annotations

import json
import re
import statistics
import sys
from pathlib import Path
from typing import Any


def _ms(values: list[float], scale: float = 100.0, fmt: str = ".1f") -> str:
    if not values:
        return "–"
    mean = statistics.fmean(values) * scale
    if len(values) == 1:
        return f"{mean:{fmt}}"
    return f"{mean:{fmt}} ± {statistics.stdev(values) * scale:{fmt}}"


def _uniform_tag(row: dict[str, Any]) -> str | None:
    t = row.get("target")
    return f"uniform-{''.join(f'{k}{v:g}' for k, v in t.items())}" if t else None


def _results(paths: list[Path]) -> dict[int, Path]:
    """seed → its results.json: a run folder's ``seed-K/results.json``, or files named ``…seedK…`` (bench/results)."""
    found: dict[int, Path] = {}
    for path in paths:
        if path.is_dir():
            found |= {
                int(s.name[5:]): s / "results.json" for s in path.glob("seed-*") if (s / "results.json").is_file()
            }
        elif m := re.search(r"seed-?(\d+)", path.name):
            found[int(m.group(1))] = path
        else:
            raise SystemExit(f"effnet_table: {path}: neither a run folder nor a results file named …seedK…")
    return dict(sorted(found.items()))


def main(argv: list[str] | None = None) -> int:
    results = _results([Path(a) for a in (argv or sys.argv[1:])])
    by_tag: dict[str, dict[int, dict[str, Any]]] = {}
    for seed, path in results.items():
        for r in json.loads(path.read_text()):
            by_tag.setdefault(r["tag"], {})[seed] = r
    print(f"seeds: {', '.join(str(s) for s in results)}\n")
    head = ["model", "mIoU %", "params ×", "MACs ×", "latency ×", "agree top-1 %", "mIoU before FT %",
            "agree before FT %", "sparse bb / dec %", "overlap w/ uniform"]  # fmt: skip
    print("| " + " | ".join(head) + " |")
    print("|" + "---|" * len(head))
    for tag, rows in by_tag.items():
        rs = list(rows.values())

        def col(key: str, rows: list[dict[str, Any]] = rs) -> list[float]:
            return [r[key] for r in rows if r.get(key) is not None]

        sparse = [r["sparsity"] for r in rs if r.get("sparsity")]
        sp = (
            f"{_ms([x['backbone'] for x in sparse], fmt='.0f')} / {_ms([x['decoder'] for x in sparse], fmt='.0f')}"
            if sparse
            else "–"
        )
        ut = _uniform_tag(rs[0])
        overlap = [r["plan_overlap"][ut]["all"] for r in rs if ut and ut in r.get("plan_overlap", {})]
        print(
            f"| {tag} | {_ms(col('miou'), fmt='.2f')} | {_ms(col('params_ratio'), 1, '.3f')} | "
            f"{_ms(col('macs_ratio'), 1, '.3f')} | {_ms(col('latency_ratio'), 1, '.2f')} | {_ms(col('top1'))} | "
            f"{_ms(col('miou_pruned'), fmt='.2f')} | {_ms(col('top1_pruned'))} | {sp} | {_ms(overlap, 1, '.2f')} |"
        )
    print("\npaired per-seed mIoU differences (points):\n")
    for tag, rows in by_tag.items():
        for other in _pairs(tag, next(iter(rows.values()))):
            if other in by_tag:
                _paired(tag, other, rows, by_tag[other])
    return 0


def _pairs(tag: str, row: dict[str, Any]) -> list[str]:
    """The rows ``tag`` is read against: Uniform at the same budget; for MTP also Slimming at the same budget and
    thresholds, and itself without the classification fine-tuning (Table 1); unified against independent."""
    ut = _uniform_tag(row)
    out = [ut] if ut and ut != tag else []
    if tag.startswith("mtp-") and not tag.endswith("-nocls"):
        out += [tag.replace("mtp-", "slimming-", 1), f"{tag}-nocls"]
    if "-unified" in tag:
        out.append(tag.replace("-unified", "-independent"))
    return out


def _paired(tag: str, other: str, rows: dict[int, dict[str, Any]], others: dict[int, dict[str, Any]]) -> None:
    diffs = [100 * (rows[s]["miou"] - others[s]["miou"]) for s in sorted(rows) if s in others]
    if diffs:
        per, wins = " ".join(f"{d:+.2f}" for d in diffs), sum(d > 0 for d in diffs)
        print(f"- {tag} − {other}: {per} (mean {statistics.fmean(diffs):+.2f}, {wins}/{len(diffs)} > 0)")


if __name__ == "__main__":
    raise SystemExit(main())
