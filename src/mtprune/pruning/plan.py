"""From channel scores to a pruning plan: which channels of each prunable layer are kept.

The plan is plain data (layer name → kept channel indices), saved as ``plan.json``; applying it is
:mod:`mtprune.pruning.apply`.

Thresholds (paper, Sec. 3, Algorithm 1 lines 9–10):

- ``independent``: the backbone's and the decoder's channels are ranked separately — τ1 is the
  p-quantile of all prunable backbone scores, τ2 of all prunable decoder scores;
- ``unified``: one ranking (one quantile) over both parts (the ablation of Table 4);
- ``layerwise`` (beyond the paper): each layer ranked on its own, ⌊p·n_l⌋ of every layer removed — the
  per-layer counts of ``uniform`` with the method's scores choosing *which* channels go: it separates how
  many channels a layer loses from which ones.

Exactly ⌊p·n⌋ lowest-scored channels of a ranking of n channels are removed. Ties are broken by a fixed
rule — among equal scores, the channel with the larger *relative* index ``i / n_layer`` goes first, then
the later layer, then the larger index — so a net whose scores are all equal (a fresh net, γ = 1) loses
close to p of every layer rather than whole layers. Per-layer scorers (``uniform``) remove ⌊p·n_l⌋
channels of every layer. Afterwards every layer keeps at least ``min_channels``, and with ``round_to K``
its kept count is rounded up to a multiple of K (at most all its channels), keeping the best-scored;
:func:`with_counts` grows chosen layers the same way (``--round-to auto``: counts the hardware likes).
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from typing import Any

import torch

from mtprune.errors import UsageError
from mtprune.models.base import BACKBONE, DECODER, PrunableLayer
from mtprune.version import __version__

THRESHOLDS = ("independent", "unified", "layerwise")

PLAN_FILE = "plan.json"  # where a plan is written: `mtprune prune --out`, a run's prune stage


@dataclass
class LayerPlan:
    part: str
    channels: int  # channels before pruning
    kept: list[int]  # kept channel indices, ascending


@dataclass
class PruningPlan:
    """Which channels each prunable conv keeps, with the settings and thresholds that chose them."""

    method: str
    ratio: float
    thresholds: str
    round_to: int | str  # a multiple K, or "auto": the counts the hardware at hand likes (``rounding``)
    min_channels: int
    layers: dict[str, LayerPlan]
    tau: dict[str, float] = field(default_factory=dict)  # per ranking: the score of the last removed channel
    model: dict[str, Any] = field(default_factory=dict)  # the dense model's arch (build_model arguments)
    target: dict[str, Any] | None = None  # pruned to a budget: {"macs": 0.5, "size": [H, W], "reached": 0.497, …}
    rounding: dict[str, Any] | None = None  # round_to "auto": per changed layer {"from", "to", "ms_from", "ms_to"}

    def removed_fraction(self, part: str | None = None) -> float:
        ls = [lp for lp in self.layers.values() if part is None or lp.part == part]
        total = sum(lp.channels for lp in ls)
        return 1.0 - sum(len(lp.kept) for lp in ls) / total if total else 0.0

    def to_dict(self) -> dict[str, Any]:
        return {
            "format": "mtprune-plan",
            "mtprune_version": __version__,
            "model": self.model,
            "method": self.method,
            "ratio": self.ratio,
            "thresholds": self.thresholds,
            "round_to": self.round_to,
            "min_channels": self.min_channels,
            "tau": self.tau,
            **({"target": self.target} if self.target is not None else {}),
            **({"rounding": self.rounding} if self.rounding is not None else {}),
            "removed_fraction": {
                "all": self.removed_fraction(),
                BACKBONE: self.removed_fraction(BACKBONE),
                DECODER: self.removed_fraction(DECODER),
            },
            "layers": {
                name: {"part": lp.part, "channels": lp.channels, "kept_count": len(lp.kept), "kept": lp.kept}
                for name, lp in self.layers.items()
            },
        }

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> PruningPlan:
        try:
            layers = {
                n: LayerPlan(v["part"], int(v["channels"]), [int(i) for i in v["kept"]]) for n, v in d["layers"].items()
            }
            return cls(
                method=d["method"],
                ratio=float(d["ratio"]),
                thresholds=d["thresholds"],
                round_to=d["round_to"] if d["round_to"] == "auto" else int(d["round_to"]),
                min_channels=int(d["min_channels"]),
                layers=layers,
                tau=dict(d.get("tau", {})),
                model=dict(d.get("model", {})),
                target=d.get("target"),
                rounding=d.get("rounding"),
            )
        except (KeyError, TypeError, ValueError) as e:
            raise UsageError(f"not a valid pruning plan ({type(e).__name__}: {e})") from None


def plan_overlap(a: PruningPlan | dict[str, Any], b: PruningPlan | dict[str, Any]) -> dict[str, float]:
    """Jaccard overlap |A ∩ B| / |A ∪ B| of the kept channels of two plans of one net, per part and overall
    (``all``): 1.0 when they keep the same channels, 0.0 when they share none. Plans as objects or dicts."""
    pa, pb = (p if isinstance(p, PruningPlan) else PruningPlan.from_dict(p) for p in (a, b))
    if set(pa.layers) != set(pb.layers):
        raise UsageError("plan_overlap: the two plans are of different nets (their prunable layers differ)")
    out = {}
    for part in (BACKBONE, DECODER, None):
        inter = union = 0
        for name, la in pa.layers.items():
            if part is None or la.part == part:
                ka, kb = set(la.kept), set(pb.layers[name].kept)
                inter, union = inter + len(ka & kb), union + len(ka | kb)
        if union:
            out[part or "all"] = inter / union
    return out


def check_ratio(ratio: float) -> float:
    if not (isinstance(ratio, int | float) and 0.0 < float(ratio) < 1.0):
        raise UsageError(f"--ratio must be in (0, 1), the fraction of prunable channels removed (got {ratio})")
    return float(ratio)


def percentile_threshold(scores: torch.Tensor, ratio: float) -> float:
    """τ: the p-quantile of a part's scores as the paper defines it — the score below which the
    ⌊p·n⌋ removed channels lie (the largest removed score). Returns -inf when nothing is removed."""
    k = math.floor(ratio * scores.numel())
    return float(scores.sort().values[k - 1]) if k > 0 else float("-inf")


def _rank_removed(entries: list[tuple[float, float, int, int]], ratio: float) -> list[tuple[int, int]]:
    """The ⌊p·n⌋ lowest of ``(score, -relative index, -layer, -index)`` tuples → (layer, index) removed."""
    k = math.floor(ratio * len(entries))
    order = sorted(entries)[:k]
    return [(-li, -ci) for _, _, li, ci in order]


def compute_plan(
    scores: dict[str, torch.Tensor],
    layers: list[PrunableLayer],
    ratio: float,
    scope: str,
    thresholds: str = "independent",
    min_channels: int = 1,
    round_to: int = 1,
    method: str = "",
) -> PruningPlan:
    """Turn per-channel ``scores`` of the prunable ``layers`` into a :class:`PruningPlan` (see module doc)."""
    ratio = check_ratio(ratio)
    if thresholds not in THRESHOLDS:
        raise UsageError(f"unknown thresholds '{thresholds}'; choose from {', '.join(THRESHOLDS)}")
    if min_channels < 1:
        raise UsageError(f"min_channels must be ≥ 1 (got {min_channels})")
    if round_to < 1:
        raise UsageError(f"--round-to must be ≥ 1 (got {round_to})")
    removed: dict[int, set[int]] = {i: set() for i in range(len(layers))}
    tau: dict[str, float] = {}

    def entries(idx: list[int]) -> list[tuple[float, float, int, int]]:
        out = []
        for li in idx:
            s = scores[layers[li].conv].tolist()
            n = len(s)
            out += [(v, -(ci / n), -li, -ci) for ci, v in enumerate(s)]
        return out

    if scope == "global" and thresholds != "layerwise":
        groups = (
            {part: [i for i, lay in enumerate(layers) if lay.part == part] for part in (BACKBONE, DECODER)}
            if thresholds == "independent"
            else {"all": list(range(len(layers)))}
        )
        for gname, idx in groups.items():
            if not idx:
                continue
            for li, ci in _rank_removed(entries(idx), ratio):
                removed[li].add(ci)
            tau[gname] = percentile_threshold(torch.cat([scores[layers[i].conv].flatten() for i in idx]), ratio)
    elif scope in ("global", "layer"):  # per layer: a per-layer scorer, or layerwise thresholds
        for li in range(len(layers)):
            for lj, ci in _rank_removed(entries([li]), ratio):
                removed[lj].add(ci)
    else:
        raise ValueError(f"unknown scorer scope {scope!r}")

    plan_layers: dict[str, LayerPlan] = {}
    for li, layer in enumerate(layers):
        s = scores[layer.conv]
        n = s.numel()
        kept = [c for c in range(n) if c not in removed[li]]
        target = max(len(kept), min(min_channels, n))
        if round_to > 1:
            target = min(n, math.ceil(target / round_to) * round_to)
        plan_layers[layer.conv] = LayerPlan(layer.part, n, _restored(kept, s, target))
    return PruningPlan(method, ratio, thresholds, round_to, min_channels, plan_layers, tau)


def _restored(kept: list[int], scores: torch.Tensor, count: int) -> list[int]:
    """``kept`` grown to ``count`` channels by the best-scored removed ones (ties: lower index first)."""
    if count <= len(kept):
        return kept
    removed = set(range(scores.numel())) - set(kept)
    back = sorted(removed, key=lambda c: (-float(scores[c]), c))[: count - len(kept)]
    return sorted(kept + back)


def with_counts(plan: PruningPlan, scores: dict[str, torch.Tensor], counts: dict[str, int]) -> PruningPlan:
    """``plan`` with each layer named in ``counts`` keeping that many channels — never fewer than it keeps,
    never more than it has: the best-scored removed channels come back, as with ``round_to``."""
    layers = dict(plan.layers)
    for name, count in counts.items():
        lp = layers[name]
        layers[name] = LayerPlan(lp.part, lp.channels, _restored(lp.kept, scores[name], min(count, lp.channels)))
    return dataclasses.replace(plan, layers=layers)
