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

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402

from mtprune.io import atomic_path  # noqa: E402

Row = dict[str, Any]
COLORS = {
    "dense": "black",
    "mtp": "tab:red",
    "slimming": "tab:blue",
    "uniform": "tab:gray",
    "fpgm": "tab:green",
    "thinet": "tab:purple",
}


def _save(fig: Any, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=110, bbox_inches="tight")
    plt.close(fig)


def plot_miou_vs_macs(rows: list[Row], path: Path) -> None:
    fig, ax = plt.subplots(figsize=(5.5, 4))
    groups: dict[str, list[Row]] = {}
    for r in rows:
        if r["miou"] is None or not r.get("macs") or not r.get("cls_finetune", True) and r["method"] != "dense":
            continue
        key = r["method"] + ("" if r["thresholds"] in ("layer", "-", "independent") else f" ({r['thresholds']})")
        groups.setdefault(key, []).append(r)
    for key, rs in groups.items():
        rs = sorted(rs, key=lambda r: r["macs"])
        base = key.split(" ")[0]
        ax.plot(
            [r["macs"] / 1e9 for r in rs],
            [100 * r["miou"] for r in rs],
            marker="o" if base != "dense" else "*",
            color=COLORS.get(base),
            label=key,
            ms=10 if base == "dense" else 6,
            ls="--" if "unified" in key else "-",
        )
    ax.set_xlabel("GMACs")
    ax.set_ylabel("mIoU (%)")
    ax.set_title("mIoU against MACs")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    _save(fig, path)


def plot_channels(plans: dict[str, dict[str, Any]], path: Path) -> None:
    """Fraction of channels kept per prunable layer, one line per method; the decoder's layers shaded."""
    fig, ax = plt.subplots(figsize=(9, 3.5))
    first = next(iter(plans.values()))
    names = list(first["layers"])
    dec = [i for i, n in enumerate(names) if first["layers"][n]["part"] == "decoder"]
    if dec:
        ax.axvspan(min(dec) - 0.5, max(dec) + 0.5, color="khaki", alpha=0.5, label="decoder")
    for label, plan in plans.items():
        kept = [plan["layers"][n]["kept_count"] / plan["layers"][n]["channels"] for n in names]
        ax.plot(range(len(names)), kept, ".-", label=label, color=COLORS.get(label.split(" ")[0]), lw=1)
    ax.set_xlabel("prunable layer (backbone → decoder)")
    ax.set_ylabel("fraction of channels kept")
    ax.set_ylim(0, 1.05)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8, ncol=3)
    _save(fig, path)


def plot_miou_vs_epochs(curves: dict[str, list[tuple[float, float]]], path: Path) -> None:
    fig, ax = plt.subplots(figsize=(5.5, 4))
    for label, pts in curves.items():
        ax.plot(
            [p[0] for p in pts], [100 * p[1] for p in pts], "o-", label=label, color=COLORS.get(label.split(" ")[0])
        )
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
    fig, axes = plt.subplots(len(images), len(cols), figsize=(2.2 * len(cols), 2.2 * len(images)), squeeze=False)
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
        plot_miou_vs_macs(rows, out / "plots" / "miou_vs_macs.png")
        plots["mIoU against MACs"] = "plots/miou_vs_macs.png"
    for ratio in sorted({r["ratio"] for r in rows if r["method"] != "dense"}):
        plans = {}
        for r in rows:
            if r["ratio"] == ratio and r.get("cls_finetune", True) and r["method"] != "dense":
                p = out / f"prune-{r['tag']}" / "plan.json"
                if p.is_file():
                    label = r["method"] + (f" ({r['thresholds']})" if r["thresholds"] == "unified" else "")
                    plans[label] = json.loads(p.read_text())
        if plans:
            name = f"plots/channels_{ratio:g}.png"
            plot_channels(plans, out / name)
            plots[f"Channels kept per layer at ratio {ratio:g} (decoder shaded; Figs 5/7)"] = name
    curves: dict[str, list[tuple[float, float]]] = {}
    for r in rows:
        log = out / f"finetune-{r['tag']}" / "metrics.jsonl"
        if r["method"] != "dense" and log.is_file():
            pts = [
                (d["epoch"], d["val_miou"]) for d in map(json.loads, log.read_text().splitlines()) if "val_miou" in d
            ]
            if pts:
                curves[r["tag"]] = pts
    if curves:
        plot_miou_vs_epochs(curves, out / "plots" / "miou_vs_epochs.png")
        plots["Validation mIoU during segmentation fine-tuning (Fig. 4)"] = "plots/miou_vs_epochs.png"
    q = _qualitative(out, cfg, rows)
    if q:
        plots["Qualitative results (Fig. 8)"] = q
    return plots


@torch.no_grad()
def _qualitative(out: Path, cfg: Any, rows: list[Row]) -> str | None:
    from mtprune.checkpoint import load_model
    from mtprune.data import normalization
    from mtprune.train.engine import make_dataset

    k = int(getattr(cfg.run, "qualitative", 0))
    if k <= 0:
        return None
    models = {"dense": out / "train-seg"}
    for method in ("slimming", "mtp"):
        cands = [r for r in rows if r["method"] == method and r.get("cls_finetune", True)]
        if cands:
            r = sorted(cands, key=lambda r: (r["ratio"] != max(x["ratio"] for x in cands), r["thresholds"]))[0]
            models[f"{method} {1 - r['ratio']:.2g}×"] = out / f"finetune-{r['tag']}"
    ds = make_dataset(cfg, "seg", train=False)
    n = min(k, len(ds))
    images, masks = zip(*(ds[i] for i in range(n)), strict=True)
    preds = {}
    for label, d in models.items():
        if not (d / "model").is_dir():
            continue
        m = load_model(d)
        preds[label] = [m(img[None]).argmax(1)[0] for img in images]
    mean, std = normalization(None)
    plot_qualitative(list(images), list(masks), preds, ds.num_classes, mean, std, out / "plots" / "qualitative.png")
    return "plots/qualitative.png"
