"""Channel importance scores: one function per method, registered by name.

A scorer maps a model and its prunable layers to one score per output channel of each layer (higher =
more important) and says whether its scores are comparable across layers:

- ``scope = "global"``: one ranking over all channels of a part (or of the whole net), so the
  thresholds (independent / unified) decide how many channels each layer loses — ``bn`` (|γ|, the
  paper's score; Network Slimming after ``sparse-slimming``, MTP after ``sparse-mtp``).
- ``scope = "layer"``: each layer loses the same fraction of its own channels — ``uniform`` (filter
  ℓ1 norm picks which), ``fpgm`` (filters nearest the layer's geometric median first) and ``thinet``
  (greedy reconstruction of the next layer's output on training images; :mod:`mtprune.pruning.thinet`).
"""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file
from torch import nn

from mtprune.checkpoint import SCORES_FILE, resolve_checkpoint
from mtprune.config import THINET_SAMPLES, Config
from mtprune.data.from_config import sample_images
from mtprune.errors import CheckpointError, DataError, UsageError
from mtprune.models.base import PrunableLayer
from mtprune.pruning.thinet import thinet_scores as _thinet_scores

ScoreFn = Callable[..., dict[str, torch.Tensor]]
#: ``inputs(source, cfg, samples)`` → the keyword arguments a scorer needs beyond the model: ``source``
#: the checkpoint or stage folder pruned (or None), ``cfg`` the configuration describing the training
#: data, ``samples`` how many training images to use (None: the scorer's default)
InputsFn = Callable[[Path | None, Config, int | None], dict[str, Any]]
Scope = Literal["global", "layer"]


def _no_inputs(source: Path | None, cfg: Config, samples: int | None) -> dict[str, Any]:
    return {}


@dataclass(frozen=True)
class Scorer:
    name: str
    scope: Scope  # "global": one ranking per part (thresholds matter); "layer": each layer alike
    fn: ScoreFn
    help: str
    inputs: InputsFn = _no_inputs  # what fn needs beyond the model, and how to get it


SCORERS: dict[str, Scorer] = {}


def register_scorer(name: str, scope: Scope, help: str, inputs: InputsFn = _no_inputs) -> Callable[[ScoreFn], ScoreFn]:
    """Decorator registering ``fn(model, layers, **kw) -> {conv_name: scores}`` as scorer ``name``;
    ``inputs`` gets the ``kw`` it needs (stored γ, training images)."""
    if scope not in ("global", "layer"):
        raise ValueError(f"scope must be 'global' or 'layer', got {scope!r}")

    def deco(fn: ScoreFn) -> ScoreFn:
        SCORERS[name] = Scorer(name, scope, fn, help, inputs)
        return fn

    return deco


def scorer_inputs(name: str, source: str | os.PathLike | None, cfg: Config, samples: int | None = None) -> dict:
    """The keyword inputs scorer ``name`` needs to score the model of ``source`` (see :data:`InputsFn`)."""
    return get_scorer(name).inputs(Path(source) if source is not None else None, cfg, samples)


def stored_gammas(source: Path | None, cfg: Config, samples: int | None) -> dict[str, Any]:
    """``bn``'s input: the γ a ``sparse-mtp`` stage stored beside its model (``scores.safetensors``: γ1 of
    W1 for the backbone, γ2 of W2 for the decoder; Algorithm 1, line 9), when ``source`` has them."""
    if source is None:
        return {}
    path = resolve_checkpoint(source) / SCORES_FILE
    if not path.is_file():
        return {}
    try:
        scores = load_file(str(path))
    except (SafetensorError, OSError) as e:
        raise CheckpointError(f"{path}: truncated or corrupt scores file ({str(e).splitlines()[0]})") from None
    bad = next((k for k, v in scores.items() if not torch.isfinite(v.float()).all()), None)
    if bad is not None:
        raise CheckpointError(f"{path}: '{bad}' holds a non-finite score (NaN or inf): the sparse stage diverged")
    return {"scores": scores}


def training_images(source: Path | None, cfg: Config, samples: int | None) -> dict[str, Any]:
    """``thinet``'s input: ``samples`` images (default :data:`~mtprune.config.THINET_SAMPLES`) of the
    configured segmentation training set, drawn from ``cfg.seed``."""
    try:
        batches = sample_images(cfg, THINET_SAMPLES if samples is None else samples)
    except (DataError, UsageError) as e:
        raise UsageError(f"thinet needs training images: {e}") from None
    return {"images": batches, "num_samples": sum(b.shape[0] for b in batches), "seed": cfg.seed}


def get_scorer(name: str) -> Scorer:
    if name not in SCORERS:
        raise UsageError(f"unknown pruning method '{name}'; choose from {', '.join(sorted(SCORERS))}")
    return SCORERS[name]


@register_scorer("bn", "global", "|γ| of each prunable conv's BatchNorm (Network Slimming / MTP)", stored_gammas)
@torch.no_grad()
def bn_scores(
    model: nn.Module, layers: list[PrunableLayer], scores: dict[str, torch.Tensor] | None = None, **_: Any
) -> dict[str, torch.Tensor]:
    """|γ| of the BN after each prunable conv: the channel importance of the paper (Sec. 3).

    ``scores`` (BN name → γ), when given, replaces the model's own γ: ``sparse-mtp`` stores γ1 of W1 and
    γ2 of W2 there (Algorithm 1, line 9) even when the exported backbone is W3.
    """
    out = {}
    for layer in layers:
        if scores is not None:
            if layer.bn not in scores:
                raise UsageError(f"the scores file has no entry for '{layer.bn}'")
            out[layer.conv] = scores[layer.bn].detach().abs().float().cpu()
            continue
        total = None
        for name in layer.scored:  # a tied group (coupled: group) sums its BNs' |γ|
            bn = model.get_submodule(name)
            if not isinstance(bn, nn.BatchNorm2d) or bn.weight is None:
                raise UsageError(f"layer '{name}' is not an affine BatchNorm2d: it cannot give γ scores")
            g = bn.weight.detach().abs().float().cpu()
            total = g if total is None else total + g
        out[layer.conv] = total
    return out


@register_scorer("uniform", "layer", "same fraction of every layer; which channels by filter ℓ1 norm")
@torch.no_grad()
def l1_filter_scores(model: nn.Module, layers: list[PrunableLayer], **_: Any) -> dict[str, torch.Tensor]:
    """ℓ1 norm of each output filter of each prunable conv (Li et al., 2017)."""
    out = {}
    for layer in layers:
        w = model.get_submodule(layer.conv).weight.detach().float().cpu()
        out[layer.conv] = w.abs().flatten(1).sum(1)
    return out


@register_scorer("fpgm", "layer", "filters nearest the layer's geometric median first (FPGM, raw-weight distances)")
@torch.no_grad()
def fpgm_scores(model: nn.Module, layers: list[PrunableLayer], **_: Any) -> dict[str, torch.Tensor]:
    """FPGM (He et al., CVPR 2019): a filter's score is the sum of its Euclidean distances to the other
    filters of its layer (raw conv weights, one flattened vector per output filter). The lowest-scored
    filters lie nearest the layer's geometric median — the most replaceable — and go first.

    Torch-Pruning's ``FPGMImportance`` measures the distances on ``|W|^p`` (element-wise magnitudes), a
    departure from the paper; here the paper's raw-weight Euclidean distance is used (float64, exact).
    """
    out = {}
    for layer in layers:
        w = model.get_submodule(layer.conv).weight.detach().to(torch.float64).cpu().flatten(1)
        d = torch.cdist(w, w, compute_mode="donot_use_mm_for_euclid_dist")
        out[layer.conv] = d.sum(1)
    return out


@register_scorer(
    "thinet", "layer", "greedy reconstruction of the next layer's output on training images (ThiNet)", training_images
)
def thinet_scores(model: nn.Module, layers: list[PrunableLayer], **kw: Any) -> dict[str, torch.Tensor]:
    """ThiNet (Luo et al., ICCV 2017): the rank at which ThiNet's greedy removes each channel; see
    :mod:`mtprune.pruning.thinet`. Keyword arguments: ``images`` (normalised batches), ``num_samples``,
    ``locations_per_image``, ``seed``, ``batch_size`` — or ``stats`` measured beforehand."""
    return _thinet_scores(model, layers, **kw)
