"""The paper's figures for one run (matplotlib, Agg backend, PNG):

- mIoU against MACs per method (Table 2's trade-off);
- channels kept per prunable layer for each method, decoder shaded (Figs 5/7);
- validation mIoU against fine-tuning epochs (Fig. 4; needs ``eval.every_epoch``);
- a qualitative grid: input / ground truth / dense / Network Slimming / MTP (Fig. 8).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import torch
from matplotlib.figure import Figure
from safetensors import safe_open

from mtprune.data import normalization
from mtprune.io import atomic_path
from mtprune.layout import (
    DENSE,
    EVAL_DENSE,
    PLOTS_DIR,
    QUALITATIVE_FILE,
    budget_key,
    color,
    display_name,
    eval_dir,
    finetune_dir,
    has_thresholds,
    prune_dir,
    sparse_dirs,
)
from mtprune.pruning.plan import PLAN_FILE

Row = dict[str, Any]


def _figure(figsize: tuple[float, float], rows: int = 1, cols: int = 1, **kw: Any) -> tuple[Figure, Any]:
    """A figure not registered with pyplot (no global backend state, safe in any process)."""
    fig = Figure(figsize=figsize)
    return fig, fig.subplots(rows, cols, **kw)


def _save(fig: Any, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=110, bbox_inches="tight")


def plot_miou_vs_macs(rows: list[Row], path: Path) -> None:
    fig, ax = _figure((5.5, 4))
    groups: dict[str, list[Row]] = {}
    for r in rows:
        if r["miou"] is None or not r.get("macs") or not r.get("cls_finetune", True) and r["method"] != DENSE:
            continue
        unified = has_thresholds(r) and r["thresholds"] != "independent"
        key = r["method"] + (f" ({r['thresholds']})" if unified else "")
        groups.setdefault(key, []).append(r)
    for key, rs in groups.items():
        rs = sorted(rs, key=lambda r: r["macs"])
        base = key.split(" ")[0]
        ax.plot(
            [r["macs"] / 1e9 for r in rs],
            [100 * r["miou"] for r in rs],
            marker="o" if base != DENSE else "*",
            color=color(base),
            label=key,
            ms=10 if base == DENSE else 6,
            ls="--" if "unified" in key else ":" if "layerwise" in key else "-",
        )
    ax.set_xlabel("GMACs")
    ax.set_ylabel("mIoU (%)")
    ax.set_title("mIoU against MACs")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    _save(fig, path)


def plot_channels(plans: dict[str, dict[str, Any]], path: Path) -> None:
    """Fraction of channels kept per prunable layer, one line per method; the decoder's layers shaded."""
    fig, ax = _figure((9, 3.5))
    first = next(iter(plans.values()))
    names = list(first["layers"])
    dec = [i for i, n in enumerate(names) if first["layers"][n]["part"] == "decoder"]
    if dec:
        ax.axvspan(min(dec) - 0.5, max(dec) + 0.5, color="khaki", alpha=0.5, label="decoder")
    for label, plan in plans.items():
        kept = [plan["layers"][n]["kept_count"] / plan["layers"][n]["channels"] for n in names]
        ax.plot(range(len(names)), kept, ".-", label=label, color=color(label.split(" ")[0]), lw=1)
    ax.set_xlabel("prunable layer (backbone → decoder)")
    ax.set_ylabel("fraction of channels kept")
    ax.set_ylim(0, 1.05)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8, ncol=3)
    _save(fig, path)


def plot_miou_vs_epochs(curves: dict[str, list[tuple[float, float]]], path: Path) -> None:
    fig, ax = _figure((5.5, 4))
    for label, pts in curves.items():
        ax.plot([p[0] for p in pts], [100 * p[1] for p in pts], "o-", label=label, color=color(label.split("-")[0]))
    ax.set_xlabel("segmentation fine-tuning epoch")
    ax.set_ylabel("val mIoU (%)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    _save(fig, path)


def _palette(n: int) -> np.ndarray:
    rng = np.random.default_rng(3)
    pal = rng.integers(40, 255, size=(max(n, 1), 3), dtype=np.uint8)
    pal[0] = (0, 0, 0)
    return pal


def _colorize(mask: np.ndarray, pal: np.ndarray) -> np.ndarray:
    img = np.full((*mask.shape, 3), 255, dtype=np.uint8)  # ignore = white
    ok = mask < len(pal)
    img[ok] = pal[mask[ok]]
    return img


def plot_qualitative(
    images: list[torch.Tensor],
    masks: list[torch.Tensor],
    preds: dict[str, list[torch.Tensor]],
    num_classes: int,
    mean: tuple[float, ...],
    std: tuple[float, ...],
    path: Path,
) -> None:
    cols = ["input", "ground truth", *preds]
    fig, axes = _figure((2.2 * len(cols), 2.2 * len(images)), len(images), len(cols), squeeze=False)
    pal = _palette(num_classes)
    for i, (img, mask) in enumerate(zip(images, masks, strict=True)):
        x = img.permute(1, 2, 0).numpy() * np.array(std) + np.array(mean)
        panels = [np.clip(x, 0, 1), _colorize(mask.numpy(), pal)]
        panels += [_colorize(p[i].numpy(), pal) for p in preds.values()]
        for j, panel in enumerate(panels):
            axes[i, j].imshow(panel)
            axes[i, j].axis("off")
            if i == 0:
                axes[i, j].set_title(cols[j], fontsize=9)
    _save(fig, path)


def make_plots(out: Path, cfg: Any, rows: list[Row]) -> dict[str, str]:
    """Draw every figure the run's folders allow; returns caption → relative path."""
    plots: dict[str, str] = {}
    if any(r.get("macs") for r in rows):
        plot_miou_vs_macs(rows, out / PLOTS_DIR / "miou_vs_macs.png")
        plots["mIoU against MACs"] = f"{PLOTS_DIR}/miou_vs_macs.png"
    for kind, x in sorted({budget_key(r) for r in rows if r["method"] != DENSE}):
        plans = _plans(out, [r for r in rows if r["method"] != DENSE and budget_key(r) == (kind, x)])
        if plans:
            name = f"{PLOTS_DIR}/channels_{x:g}.png" if kind == "ratio" else f"{PLOTS_DIR}/channels_{kind}{x:g}.png"
            plot_channels(plans, out / name)
            what = f"ratio {x:g}" if kind == "ratio" else f"{kind} target {x:g}×"
            plots[f"Channels kept per layer at {what} (decoder shaded; Figs 5/7)"] = name
    curves = _curves(out, rows)
    if curves:
        plot_miou_vs_epochs(curves, out / PLOTS_DIR / "miou_vs_epochs.png")
        plots["Validation mIoU during segmentation fine-tuning (Fig. 4)"] = f"{PLOTS_DIR}/miou_vs_epochs.png"
    if plot_gamma(_gamma_distributions(out), out / PLOTS_DIR / "gamma.png"):
        plots["|γ| of the prunable layers before and after sparse training, per part"] = f"{PLOTS_DIR}/gamma.png"
    q = _qualitative(out, rows)
    if q:
        plots["Qualitative results (Fig. 8)"] = q
    return plots


def _gamma_distributions(out: Path) -> dict[str, dict[str, dict[str, list[float]]]]:
    """stage → {"before", "after"} → part → |γ| quantiles, from each sparse stage's done.json."""
    found = {}
    for stage in sparse_dirs():
        done = out / stage / "done.json"
        if done.is_file():
            dist = json.loads(done.read_text()).get("metrics", {}).get("gamma_distribution")
            if dist:
                found[stage] = dist
    return found


def plot_gamma(dists: dict[str, dict[str, dict[str, list[float]]]], path: Path) -> bool:
    """The cumulative distribution of |γ| per part (one panel each), before (dashed) and after each sparse
    stage: a stage that chose channels moves a share of them to ≈ 0. False when there is nothing to draw."""
    parts = sorted({p for d in dists.values() for when in d.values() for p in when})
    if not parts:
        return False
    fig, axes = _figure((5.0 * len(parts), 3.6), 1, len(parts), squeeze=False)
    for ax, part in zip(axes[0], parts, strict=True):
        for stage, d in dists.items():
            for when, style in (("before", "--"), ("after", "-")):
                q = d.get(when, {}).get(part)
                if q:
                    y = np.linspace(0, 1, len(q))
                    ax.plot(q, y, style, color=color(stage.removeprefix("sparse-")), label=f"{stage} {when}")
        ax.set_title(part)
        ax.set_xlabel("|γ|")
        ax.set_ylabel("fraction of channels")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    _save(fig, path)
    return True


def _plans(out: Path, rows: list[Row]) -> dict[str, dict[str, Any]]:
    """The plan of every (classification fine-tuned) pruned row, by label."""
    plans = {}
    for r in rows:
        p = out / prune_dir(r["tag"]) / PLAN_FILE
        if r.get("cls_finetune", True) and r["method"] != DENSE and p.is_file():
            label = r["method"] + (f" ({r['thresholds']})" if r["thresholds"] in ("unified", "layerwise") else "")
            plans[label] = json.loads(p.read_text())
    return plans


def _curves(out: Path, rows: list[Row]) -> dict[str, list[tuple[float, float]]]:
    """Validation mIoU against fine-tuning epoch of every pruned row that logged it."""
    curves = {}
    for r in rows:
        log = out / finetune_dir(r["tag"]) / "metrics.jsonl"
        if r["method"] != DENSE and log.is_file():
            pts = [
                (d["epoch"], d["val_miou"]) for d in map(json.loads, log.read_text().splitlines()) if "val_miou" in d
            ]
            if pts:
                curves[r["tag"]] = pts
    return curves


def _qualitative_rows(rows: list[Row]) -> dict[str, str]:
    """label → eval folder of the models in the qualitative grid: dense, then Slimming and MTP at the
    largest ratio (independent thresholds first)."""
    chosen = {DENSE: EVAL_DENSE}
    for method in ("slimming", "mtp"):
        cands = [r for r in rows if r["method"] == method and r.get("cls_finetune", True)]
        if cands:
            r = sorted(cands, key=lambda r: (r["ratio"] != max(x["ratio"] for x in cands), r["thresholds"]))[0]
            chosen[display_name(r)] = eval_dir(r["tag"])
    return chosen


def _qualitative(out: Path, rows: list[Row]) -> str | None:
    """The grid of validation images, labels and each chosen model's predictions, from the files the
    eval stages kept (``run.qualitative`` images); None when the dense model's are not there."""
    dense = out / EVAL_DENSE / QUALITATIVE_FILE
    if not dense.is_file():
        return None
    with safe_open(str(dense), "pt") as f:
        n = len([k for k in f.keys() if k.startswith("image.")])  # noqa: SIM118 (safe_open has no __iter__)
        images = [f.get_tensor(f"image.{i}") for i in range(n)]
        masks = [f.get_tensor(f"mask.{i}") for i in range(n)]
        num_classes = int(f.metadata()["num_classes"])
    preds = {}
    for label, d in _qualitative_rows(rows).items():
        path = out / d / QUALITATIVE_FILE
        if path.is_file():
            with safe_open(str(path), "pt") as f:
                preds[label] = [f.get_tensor(f"pred.{i}") for i in range(n)]
    if not images:
        return None
    mean, std = normalization(None)
    plot_qualitative(images, masks, preds, num_classes, mean, std, out / PLOTS_DIR / "qualitative.png")
    return f"{PLOTS_DIR}/qualitative.png"
