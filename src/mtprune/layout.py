"""The layout of a run folder, in one place: stage folder names, variant tags, display names.

    pretrain-cls/   train-seg/   eval-dense/                     the dense baseline (shared)
    sparse-mtp/     sparse-slimming/                             sparse training, when a method needs it
    prune-<tag>/    finetune-<tag>/    eval-<tag>/               per method × ratio × thresholds
    latency/                                                     every model timed against dense
    results.json    report.md    plots/                          the comparison
    seed-<k>/   summary.json   summary.md                        with several seeds

``<tag>`` is ``<method>-<ratio>[-<thresholds>][-nocls]`` (:func:`variant_tag`). The pipeline writes this
layout; the report and the command line read it through these names.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from mtprune.pruning.methods import METHODS, get_method

PRETRAIN = "pretrain-cls"
TRAIN_SEG = "train-seg"
EVAL_DENSE = "eval-dense"
LATENCY = "latency"
RESULTS_FILE = "results.json"
SEED_LOG = "run.log"  # a seed's output when seeds run as processes of their own (``run --jobs``)
REPORT_FILE = "report.md"
PLOTS_DIR = "plots"
#: what an eval stage keeps for the report's qualitative figure: validation images, labels, predictions
QUALITATIVE_FILE = "qualitative.safetensors"
DENSE = "dense"  # the dense model's method, tag and display name
#: the ``thresholds`` of a row whose method ranks channels per layer (no threshold choice), and of dense
PER_LAYER = "layer"
NO_THRESHOLDS = "-"


#: how much a variant prunes: a ratio (the fraction of prunable channels removed) or a target
#: ``{"macs": 0.5}`` (the fraction of the dense net's MACs or params its pruned net keeps at most)
Budget = float | dict[str, float]


@dataclass(frozen=True)
class Variant:
    """One model a run compares: a method at a budget (a ratio, or a ``target``) with a threshold mode, with
    or without the classification fine-tuning."""

    method: str
    ratio: float | None  # None for a target: the prune stage finds it
    thresholds: str
    cls_finetune: bool = True
    target: tuple[str, float] | None = None

    @property
    def budget(self) -> Budget:
        return {self.target[0]: self.target[1]} if self.target else float(self.ratio or 0.0)

    @property
    def tag(self) -> str:
        return variant_tag(self.method, self.budget, self.thresholds, self.cls_finetune)

    def as_dict(self) -> dict[str, Any]:
        return {
            "method": self.method,
            "ratio": self.ratio,
            "target": dict([self.target]) if self.target else None,
            "thresholds": self.thresholds,
            "cls_finetune": self.cls_finetune,
            "tag": self.tag,
        }


def _budget_text(budget: Budget) -> str:
    return "".join(f"{k}{v:g}" for k, v in budget.items()) if isinstance(budget, dict) else f"{budget:g}"


def variant_tag(method: str, budget: Budget, thresholds: str, cls_finetune: bool = True) -> str:
    """``<method>-<ratio | metric+X>[-<thresholds>][-nocls]`` (``mtp-0.5-independent``, ``uniform-macs0.5``):
    the name of a variant's stage folders and results row."""
    tag = f"{method}-{_budget_text(budget)}" + (f"-{thresholds}" if get_method(method).global_thresholds else "")
    return tag + ("" if cls_finetune else "-nocls")


def row_budget(row: dict[str, Any]) -> Budget:
    """The budget a results row was pruned to: its ``target`` if it has one, else its ratio."""
    return dict(row["target"]) if row.get("target") else float(row["ratio"])


def budget_key(row: dict[str, Any]) -> tuple[str, float]:
    """A sortable key of the budget: rows with equal keys compare methods at one cost (or one ratio)."""
    b = row_budget(row)
    return next(iter(b.items())) if isinstance(b, dict) else ("ratio", b)


def variants(run: Any) -> list[Variant]:
    """Every model a ``run`` section compares: method × (ratio or target) × thresholds (+ the variant
    without classification fine-tuning)."""
    budgets: list[tuple[float | None, tuple[str, float] | None]] = [(r, None) for r in run.ratios]
    budgets += [(None, next(iter(t.items()))) for t in run.targets]
    out = []
    for method in run.methods:
        modes = run.thresholds if get_method(method).global_thresholds else [PER_LAYER]
        nocls = run.without_cls_finetune
        both = nocls is True or (isinstance(nocls, list) and method in nocls)
        for ratio, target in budgets:
            for th in modes:
                for cls_ft in [True, False] if both else [True]:
                    out.append(Variant(method, ratio, th, cls_ft, target))
    return out


def sparse_dirs() -> list[str]:
    """The sparse-training stage folders a run can have (one per method that trains before pruning)."""
    return sorted({m.sparse_stage for m in METHODS.values() if m.sparse_stage})


def source_dir(method: str) -> str:
    """The stage folder whose model ``method`` prunes: its sparse stage, or the dense ``train-seg``."""
    return get_method(method).sparse_stage or TRAIN_SEG


def prune_dir(tag: str) -> str:
    """The prune stage of a variant (shared by its with / without classification fine-tuning variants)."""
    return f"prune-{tag.removesuffix('-nocls')}"


def finetune_dir(tag: str) -> str:
    return f"finetune-{tag}"


def eval_dir(tag: str) -> str:
    return EVAL_DENSE if tag == DENSE else f"eval-{tag}"


def model_dir(tag: str) -> str:
    """The stage folder holding the final model of row ``tag``."""
    return TRAIN_SEG if tag == DENSE else finetune_dir(tag)


def seed_dir(seed: int) -> str:
    return f"seed-{seed}"


def has_thresholds(row: dict[str, Any]) -> bool:
    """True when the row's method chose its channels with independent / unified thresholds."""
    return row["thresholds"] not in (PER_LAYER, NO_THRESHOLDS)


def budget_label(row: dict[str, Any]) -> str:
    """``0.5×`` (the kept fraction of a ratio, the paper's naming) or ``macs 0.5×`` (a target)."""
    b = row_budget(row)
    if isinstance(b, dict):
        metric, x = next(iter(b.items()))
        return f"{metric} {x:g}×"
    return f"{1 - b:.2g}×"


def display_name(row: dict[str, Any]) -> str:
    """``mtp 0.5× (independent)``, ``uniform 0.5×``, ``slimming 0.75× (unified), no cls FT``, ``dense``."""
    if row["method"] == DENSE:
        return DENSE
    s = f"{row['method']} {budget_label(row)}"
    if has_thresholds(row):
        s += f" ({row['thresholds']})"
    return s + ("" if row.get("cls_finetune", True) else ", no cls FT")


def color(method: str) -> str | None:
    """The method's colour in the figures (dense: black)."""
    return "black" if method == DENSE else (METHODS[method].color if method in METHODS else None)
