"""The layout of a run folder, in one place: stage folder names, variant tags, display names.

    pretrain-cls/   train-seg/   eval-dense/                     the dense baseline (shared)
    sparse-mtp/     sparse-slimming/                             sparse training, when a method needs it
    prune-<tag>/    finetune-<tag>/    eval-<tag>/               per method × ratio × thresholds
    latency/                                                     every model timed round-robin
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
REPORT_FILE = "report.md"
PLOTS_DIR = "plots"
#: what an eval stage keeps for the report's qualitative figure: validation images, labels, predictions
QUALITATIVE_FILE = "qualitative.safetensors"
DENSE = "dense"  # the dense model's method, tag and display name
#: the ``thresholds`` of a row whose method ranks channels per layer (no threshold choice), and of dense
PER_LAYER = "layer"
NO_THRESHOLDS = "-"


@dataclass(frozen=True)
class Variant:
    """One model a run compares: a method at a ratio with a threshold mode, with or without the
    classification fine-tuning."""

    method: str
    ratio: float
    thresholds: str
    cls_finetune: bool = True

    @property
    def tag(self) -> str:
        return variant_tag(self.method, self.ratio, self.thresholds, self.cls_finetune)

    def as_dict(self) -> dict[str, Any]:
        return {
            "method": self.method,
            "ratio": self.ratio,
            "thresholds": self.thresholds,
            "cls_finetune": self.cls_finetune,
            "tag": self.tag,
        }


def variant_tag(method: str, ratio: float, thresholds: str, cls_finetune: bool = True) -> str:
    """``<method>-<ratio>[-<thresholds>][-nocls]``: the name of a variant's stage folders and results row."""
    tag = f"{method}-{ratio:g}" + (f"-{thresholds}" if get_method(method).global_thresholds else "")
    return tag + ("" if cls_finetune else "-nocls")


def variants(run: Any) -> list[Variant]:
    """Every model a ``run`` section compares: method × ratio × thresholds (+ the no-cls-fine-tuning variant)."""
    out = []
    for method in run.methods:
        modes = run.thresholds if get_method(method).global_thresholds else [PER_LAYER]
        nocls = run.without_cls_finetune
        both = nocls is True or (isinstance(nocls, list) and method in nocls)
        for ratio in run.ratios:
            for th in modes:
                for cls_ft in [True, False] if both else [True]:
                    out.append(Variant(method, ratio, th, cls_ft))
    return out


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


def display_name(row: dict[str, Any]) -> str:
    """``mtp 0.5× (independent)``, ``uniform 0.5×``, ``slimming 0.75× (unified), no cls FT``, ``dense``."""
    if row["method"] == DENSE:
        return DENSE
    s = f"{row['method']} {1 - row['ratio']:.2g}×"
    if has_thresholds(row):
        s += f" ({row['thresholds']})"
    return s + ("" if row.get("cls_finetune", True) else ", no cls FT")


def color(method: str) -> str | None:
    """The method's colour in the figures (dense: black)."""
    return "black" if method == DENSE else (METHODS[method].color if method in METHODS else None)
