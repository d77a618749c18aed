"""ThiNet (Luo et al., ICCV 2017): prune the channels whose removal least changes the *next* layer's output.

For a prunable conv with ``n`` output channels, each of its channels ``c`` contributes ``x̂_c`` to the
output of every layer that consumes it (the next conv; a concatenation's following conv; several
consumers when the output branches — BiSeNet's ``conv_head16`` feeds the FFM and an auxiliary head).
At a sampled output location and output channel ``o`` of a conv consumer with weight ``W``,
``x̂_c = Σ_k W[o, c, k]·x[c, patch_k]`` (``x``: the consumer's input, stride/padding/dilation respected).

- **Statistics** (:func:`thinet_statistics`): forward hooks on the consumers record, on ``num_samples``
  training images, the input patches at ``locations_per_image`` random output locations per image (10,
  as in ThiNet). ThiNet samples one output channel per location; here every output channel of each
  sampled location is used (more equations for the same forward cost). The statistics kept per
  (layer, consumer) are the Gram matrix ``G = X̂ᵀX̂`` (n × n) of the contributions over all sampled
  (location, output channel) pairs, computed without forming ``X̂``: with ``A = W_cᵀW_c`` and the
  patches' second moment ``S = PᵀP`` (both over (channel, kernel tap)), ``G[c, c'] = Σ_{k,k'} A ⊙ S``.
  Consumers are found with Torch-Pruning's dependency graph (the ``prune_conv_in_channels`` /
  ``prune_linear_in_channels`` items of the layer's pruning group, whose indices map the layer's
  channels onto the consumer's input channels).
- **Greedy selection** (:func:`greedy_order`, ThiNet's Algorithm 1): ``T = ∅``; repeatedly add the
  channel ``i`` minimising ``‖Σ_{j∈T∪{i}} x̂_j‖²`` — summed over the consumers, ``1ᵀ_{T∪{i}} G 1_{T∪{i}}``,
  so each step costs O(n) with ``v = G 1_T``. The order in which channels enter ``T`` is the score
  (first removed = lowest), so the plan's "remove the ⌊p·n⌋ lowest" is ThiNet's greedy set for every p.
  Equal increments: the higher channel index goes first, as in the plan's tie rule.
- **Rescaling** (:func:`thinet_rescale`, ThiNet's Eq. 6): after physical removal, the kept input channels
  of each consumer are multiplied by the least-squares scales ``s = argmin ‖ŷ − Σ_{c kept} s_c x̂_c‖²``
  (``ŷ = Σ_c x̂_c`` the dense contribution), i.e. ``s = 1 + G_KK⁻¹ G_KR 1`` (a tiny ridge towards
  ``s = 1`` keeps it defined for channels never active on the sample). The pruned net then no longer
  equals the masked net, by design.

Departures from the paper, for a one-shot tool: all prunable layers are scored (and rescaled) from the
statistics of the dense net in one pass, not layer by layer with fine-tuning in between.
"""

from __future__ import annotations

import bisect
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
import torch_pruning as tp
from torch import nn

from mtprune.config import THINET_SAMPLES
from mtprune.errors import UsageError
from mtprune.models.base import PrunableLayer, SegmentationModel, eval_mode
from mtprune.pruning.apply import build_dependency_graph

#: memory bound (elements) of one (C·K)² matrix of the Gram shortcut; above it the direct product is used
_GRAM_TRICK_MAX = 64_000_000


@dataclass
class ConsumerStats:
    """One consumer of a prunable layer's output channels."""

    name: str  # module name of the consumer (a Conv2d or Linear)
    in_channels: int  # its input channels in the dense model
    idxs: list[int]  # the consumer input channel that each of the layer's channels feeds
    gram: torch.Tensor  # n × n float64: Σ over sampled (location, output channel) of x̂ x̂ᵀ
    locations: int  # sampled output locations (rows of X̂ = locations × output channels)


@dataclass
class ThiNetStats:
    """What :func:`thinet_statistics` measured: per prunable conv, its consumers' Gram matrices."""

    layers: dict[str, list[ConsumerStats]] = field(default_factory=dict)
    images: int = 0
    locations_per_image: int = 0
    seed: int = 0

    def gram(self, layer: str) -> torch.Tensor:
        """Σ over the consumers of ``layer`` of their Gram matrices (the greedy's objective)."""
        return torch.stack([c.gram for c in self.layers[layer]]).sum(0)


# --- consumers ---------------------------------------------------------------------------------------
def find_consumers(
    model: nn.Module, dg: tp.DependencyGraph, conv_names: Iterable[str]
) -> dict[str, list[tuple[str, list[int]]]]:
    """For each conv, ``[(consumer name, consumer input channel of each output channel), …]``."""
    names = {id(m): n for n, m in model.named_modules()}
    in_handlers = (tp.prune_conv_in_channels, tp.prune_linear_in_channels)
    out: dict[str, list[tuple[str, list[int]]]] = {}
    for name in conv_names:
        conv = model.get_submodule(name)
        n = conv.out_channels
        group = dg.get_pruning_group(conv, tp.prune_conv_out_channels, idxs=list(range(n)))
        found: dict[str, list[int]] = {}
        for item in group.items:
            dep = item.dep
            mod = dep.target.module
            if mod is conv or dep.handler not in in_handlers:
                continue
            cname = names[id(mod)]
            idxs = [int(i) for i in item.idxs]
            roots = getattr(item, "root_idxs", None)
            roots = list(range(len(idxs))) if roots is None else [int(r) for r in roots]
            mapping: list[int | None] = [None] * n
            for i, r in zip(idxs, roots, strict=True):
                if r is None or not 0 <= r < n or mapping[r] is not None:
                    raise UsageError(f"thinet: cannot map the channels of '{name}' onto its consumer '{cname}'")
                mapping[r] = i
            if any(i is None for i in mapping):
                raise UsageError(f"thinet: cannot map the channels of '{name}' onto its consumer '{cname}'")
            if isinstance(mod, nn.Conv2d) and mod.groups != 1:
                if mod.groups == mod.in_channels == mod.out_channels:
                    continue  # a depthwise conv follows the channels (pruned with them): its consumers count
                raise UsageError(f"thinet: consumer '{cname}' of '{name}' is a grouped conv (not supported)")
            found[cname] = mapping  # type: ignore[assignment]
        if not found:
            raise UsageError(f"thinet: '{name}' has no conv or linear consumer in the dependency graph")
        out[name] = list(found.items())
    return out


# --- contributions -------------------------------------------------------------------------------
def _conv_geometry(mod: nn.Conv2d, name: str) -> tuple[tuple[int, int], ...]:
    if mod.padding_mode != "zeros" or isinstance(mod.padding, str):
        raise UsageError(f"thinet: consumer '{name}' uses padding {mod.padding!r}/{mod.padding_mode} (not supported)")
    return tuple(mod.kernel_size), tuple(mod.stride), tuple(mod.padding), tuple(mod.dilation)  # type: ignore[return-value]


def sample_patches(
    x: torch.Tensor, mod: nn.Module, channels: torch.Tensor, per_image: int, gen: torch.Generator, name: str = ""
) -> torch.Tensor:
    """Input patches of consumer ``mod`` at ``per_image`` random output locations of each image of ``x``
    (without replacement; all locations when fewer), restricted to input ``channels`` → [M, C, K]."""
    if isinstance(mod, nn.Linear):
        rows = x.reshape(-1, x.shape[-1])[:, channels.to(x.device)]
        return _store(rows.detach().unsqueeze(-1))
    (kh, kw), (sh, sw), (ph, pw), (dh, dw) = _conv_geometry(mod, name)
    b, _, h, w = x.shape
    ho = (h + 2 * ph - dh * (kh - 1) - 1) // sh + 1
    wo = (w + 2 * pw - dw * (kw - 1) - 1) // sw + 1
    m = min(per_image, ho * wo)
    pos = torch.rand(b, ho * wo, generator=gen).argsort(1)[:, :m]  # [B, m]
    r = (pos // wo)[..., None] * sh + torch.arange(kh) * dh  # [B, m, kh], padded coordinates
    c = (pos % wo)[..., None] * sw + torch.arange(kw) * dw  # [B, m, kw]
    xp = F.pad(x.detach()[:, channels.to(x.device)], (pw, pw, ph, ph))
    bi = torch.arange(b)[:, None, None, None]
    dev = xp.device
    p = xp[bi.to(dev), :, r[..., :, None].to(dev), c[..., None, :].to(dev)]  # [B, m, kh, kw, C]
    return _store(p.reshape(b * m, kh * kw, -1).transpose(1, 2))


def _store(p: torch.Tensor) -> torch.Tensor:
    """Patches kept on the CPU in float32 (float64 stays float64)."""
    return p.to("cpu", torch.promote_types(p.dtype, torch.float32)).contiguous()


def consumer_weight(mod: nn.Module) -> torch.Tensor:
    """The consumer's weight as [out, in, kernel taps] (a linear layer has one tap)."""
    w = mod.weight.detach().cpu()
    return w.reshape(w.shape[0], w.shape[1], -1)


def contribution_gram(weight: torch.Tensor, patches: torch.Tensor, method: str = "auto") -> torch.Tensor:
    """``G = X̂ᵀX̂`` (float64, C × C) of the contributions ``x̂_c[m, o] = Σ_k W[o, c, k]·P[m, c, k]``.

    ``weight``: [O, C, K] (the consumer's weights on the candidate channels); ``patches``: [M, C, K].
    ``method``: ``"trick"`` (``Σ_{k,k'} (WᵀW ⊙ PᵀP)``, O((M+O)·(CK)²)), ``"direct"`` (forms X̂ in chunks,
    O(M·O·C·(K+C))) or ``"auto"`` (the cheaper one that fits in memory). Computed in float32 unless the
    inputs are float64; accumulated in float64.
    """
    o, c, k = weight.shape
    m = patches.shape[0]
    dt = torch.float64 if torch.float64 in (weight.dtype, patches.dtype) else torch.float32
    wt, pt = weight.to(dt), patches.to(dt)
    if method == "auto":
        trick_cost, direct_cost = (m + o) * (c * k) ** 2, m * o * c * (k + c)
        method = "trick" if (c * k) ** 2 <= _GRAM_TRICK_MAX and trick_cost <= direct_cost else "direct"
    if m == 0:
        return torch.zeros(c, c, dtype=torch.float64)
    if method == "trick":
        wf, pf = wt.reshape(o, c * k), pt.reshape(m, c * k)
        prod = (wf.T @ wf) * (pf.T @ pf)
        return prod.reshape(c, k, c, k).sum((1, 3)).to(torch.float64)
    if method != "direct":
        raise ValueError(f"unknown gram method {method!r}")
    g = torch.zeros(c, c, dtype=torch.float64)
    chunk = max(1, 4_000_000 // max(1, o * c))
    for s in range(0, m, chunk):
        xh = torch.einsum("ock,mck->moc", wt, pt[s : s + chunk]).reshape(-1, c)
        g += (xh.T @ xh).to(torch.float64)
    return g


# --- statistics ------------------------------------------------------------------------------------
def _batches(images: torch.Tensor | Iterable[torch.Tensor], num_samples: int, batch_size: int) -> list[torch.Tensor]:
    if isinstance(images, torch.Tensor):
        images = [images] if images.dim() == 4 else [images.unsqueeze(0)]
    out: list[torch.Tensor] = []
    left = num_samples
    for item in images:
        if left <= 0:
            break
        t = torch.as_tensor(item)
        t = t.unsqueeze(0) if t.dim() == 3 else t
        if t.dim() != 4:
            raise UsageError(f"thinet: images must be [B, 3, H, W] batches or [3, H, W] images, got {tuple(t.shape)}")
        t = t[:left]
        left -= t.shape[0]
        out += list(t.split(batch_size))
    return [b for b in out if b.shape[0] > 0]


@torch.no_grad()
def thinet_statistics(
    model: nn.Module,
    layers: list[PrunableLayer],
    images: torch.Tensor | Iterable[torch.Tensor] | None = None,
    num_samples: int = THINET_SAMPLES,
    locations_per_image: int = 10,
    seed: int = 0,
    batch_size: int = 8,
    dg: tp.DependencyGraph | None = None,
    forward: Callable[[nn.Module, torch.Tensor], Any] | None = None,
    **_: Any,
) -> ThiNetStats:
    """Run ``model`` (eval mode) on up to ``num_samples`` images and return every prunable layer's
    consumer Gram matrices (see the module doc). Deterministic given ``seed``.

    ``images``: normalised image batches ([B, 3, H, W]) or images, a tensor or any iterable of them.
    ``dg`` / ``forward``: for models that are not a :class:`SegmentationModel` (tests); by default the
    graph is :func:`~mtprune.pruning.apply.build_dependency_graph` and the forward runs the segmentation
    outputs with the auxiliary heads (so their consumers are measured too).
    """
    if num_samples < 1 or locations_per_image < 1:
        raise UsageError("thinet: num_samples and locations_per_image must be ≥ 1")
    batches = _batches(images, num_samples, batch_size) if images is not None else []
    if not batches:
        raise UsageError("thinet needs training images (none were given or the dataset is empty)")
    seg = isinstance(model, SegmentationModel)
    if dg is None:
        dg = build_dependency_graph(model) if seg else _plain_graph(model, batches[0][:1])
    if forward is None:
        forward = (lambda m, x: m.seg_outputs(x, aux=True)) if seg else (lambda m, x: m(x))
    # consumer → the prunable layers feeding it, with the consumer input channel of each of their channels
    feeds: dict[str, list[tuple[str, list[int]]]] = {}
    for lname, cons in find_consumers(model, dg, [lay.conv for lay in layers]).items():
        for cname, idxs in cons:
            feeds.setdefault(cname, []).append((lname, idxs))
    union = {c: torch.tensor(sorted({i for _, idxs in fs for i in idxs})) for c, fs in feeds.items()}
    patches = _record_patches(model, batches, union, locations_per_image, seed, forward)
    stats = ThiNetStats({lay.conv: [] for lay in layers}, sum(b.shape[0] for b in batches), locations_per_image, seed)
    for cname, fs in feeds.items():
        if patches[cname]:  # else a consumer the forward does not run (e.g. only in the classification head)
            _add_grams(stats, model.get_submodule(cname), cname, fs, union[cname], torch.cat(patches.pop(cname)))
    for lname, cs in stats.layers.items():
        if not cs:
            raise UsageError(f"thinet: no consumer of '{lname}' ran in the segmentation forward")
    return stats


def _plain_graph(model: nn.Module, example: torch.Tensor) -> tp.DependencyGraph:
    """Torch-Pruning's graph of a plain module (not a :class:`SegmentationModel`), traced in eval mode."""
    with eval_mode(model), torch.enable_grad():
        return tp.DependencyGraph().build_dependency(model, example_inputs=example)


def _record_patches(
    model: nn.Module,
    batches: list[torch.Tensor],
    union: dict[str, torch.Tensor],
    locations: int,
    seed: int,
    forward: Callable[[nn.Module, torch.Tensor], Any],
) -> dict[str, list[torch.Tensor]]:
    """Run ``model`` (eval mode) on ``batches``; each consumer's sampled input patches (its channels ``union``)."""
    patches: dict[str, list[torch.Tensor]] = {c: [] for c in union}
    gens = {c: torch.Generator().manual_seed(seed * 1_000_003 + k) for k, c in enumerate(sorted(union))}

    def hook_for(cname: str) -> Callable[..., None]:
        def hook(mod: nn.Module, inputs: tuple[Any, ...]) -> None:
            patches[cname].append(sample_patches(inputs[0], mod, union[cname], locations, gens[cname], cname))

        return hook

    handles = [model.get_submodule(c).register_forward_pre_hook(hook_for(c)) for c in union]
    p = next(model.parameters())
    try:
        with eval_mode(model):
            for b in batches:
                forward(model, b.to(p.device, p.dtype))
    finally:
        for h in handles:
            h.remove()
    return patches


def _add_grams(
    stats: ThiNetStats,
    mod: nn.Module,
    cname: str,
    feeds: list[tuple[str, list[int]]],
    union: torch.Tensor,
    patches: torch.Tensor,
) -> None:
    """Each feeding layer's contribution Gram matrix at consumer ``cname`` (``patches``: over ``union``)."""
    w = consumer_weight(mod)
    pos = {int(i): k for k, i in enumerate(union.tolist())}
    for lname, idxs in feeds:
        sel = torch.tensor([pos[i] for i in idxs])
        g = contribution_gram(w[:, idxs], patches[:, sel])
        stats.layers[lname].append(ConsumerStats(cname, w.shape[1], list(idxs), g, patches.shape[0]))


# --- greedy selection and rescaling -----------------------------------------------------------------
def greedy_order(gram: torch.Tensor) -> list[int]:
    """ThiNet's greedy removal order: each step adds the channel minimising ``1ᵀ_T G 1_T`` (ties: higher index)."""
    g = gram.detach().to(torch.float64).cpu().numpy()
    n = g.shape[0]
    v = np.zeros(n)
    diag = np.diagonal(g).copy()
    taken = np.zeros(n, dtype=bool)
    order: list[int] = []
    for _ in range(n):
        inc = 2.0 * v + diag
        inc[taken] = np.inf
        i = n - 1 - int(np.argmin(inc[::-1]))
        order.append(i)
        taken[i] = True
        v += g[:, i]
    return order


def order_to_scores(order: list[int]) -> torch.Tensor:
    """Scores from a removal order: the t-th channel removed scores t (higher = more important)."""
    s = torch.empty(len(order), dtype=torch.float64)
    s[torch.tensor(order, dtype=torch.long)] = torch.arange(len(order), dtype=torch.float64)
    return s


def thinet_scores(
    model: nn.Module, layers: list[PrunableLayer], stats: ThiNetStats | None = None, **kw: Any
) -> dict[str, torch.Tensor]:
    """Per-layer ThiNet scores (the greedy removal rank); ``stats`` from :func:`thinet_statistics`, or
    the keyword arguments of :func:`thinet_statistics` (``images``, ``num_samples``, …) to measure them."""
    if stats is None:
        stats = thinet_statistics(model, layers, **kw)
    out = {}
    for lay in layers:
        if lay.conv not in stats.layers:
            raise UsageError(f"thinet: the statistics have no entry for '{lay.conv}'")
        out[lay.conv] = order_to_scores(greedy_order(stats.gram(lay.conv)))
    return out


def least_squares_scales(gram: torch.Tensor, kept: list[int], ridge: float = 1e-6) -> torch.Tensor:
    """ThiNet's Eq. 6 on the Gram matrix: scales ``s`` of the kept channels minimising
    ``‖Σ_c x̂_c − Σ_{c∈kept} s_c x̂_c‖² + λ‖s − 1‖²`` (``λ = ridge · mean diag G_KK``) → float64 [len(kept)]."""
    g = gram.to(torch.float64)
    n = g.shape[0]
    k = torch.tensor(sorted(kept), dtype=torch.long)
    r = torch.tensor(sorted(set(range(n)) - set(kept)), dtype=torch.long)
    if r.numel() == 0:
        return torch.ones(k.numel(), dtype=torch.float64)
    gkk = g[k][:, k]
    b = g[k][:, r].sum(1)
    lam = ridge * float(gkk.diagonal().mean()) + 1e-30
    delta = torch.linalg.solve(gkk + lam * torch.eye(k.numel(), dtype=torch.float64), b)
    return 1.0 + delta


@torch.no_grad()
def thinet_rescale(model: nn.Module, plan: Any, stats: ThiNetStats, ridge: float = 1e-6) -> nn.Module:
    """After :func:`~mtprune.pruning.apply.apply_plan`: multiply each consumer's kept input channels by
    the least-squares scales of :func:`least_squares_scales` (in place; returns ``model``)."""
    removed_in: dict[str, set[int]] = {}
    for lname, cons in stats.layers.items():
        lp = plan.layers.get(lname)
        if lp is None:
            continue
        drop = set(range(lp.channels)) - set(lp.kept)
        for cs in cons:
            removed_in.setdefault(cs.name, set()).update(cs.idxs[c] for c in drop)
    for lname, cons in stats.layers.items():
        lp = plan.layers.get(lname)
        if lp is None or len(lp.kept) == lp.channels:
            continue
        for cs in cons:
            mod = model.get_submodule(cs.name)
            rem = sorted(removed_in[cs.name])
            have = mod.in_features if isinstance(mod, nn.Linear) else mod.in_channels
            if have != cs.in_channels - len(rem):
                raise UsageError(
                    f"thinet_rescale: '{cs.name}' has {have} input channels, expected "
                    f"{cs.in_channels - len(rem)} after the plan (apply the plan first)"
                )
            kept = sorted(lp.kept)
            new = [cs.idxs[c] - bisect.bisect_left(rem, cs.idxs[c]) for c in kept]
            s = least_squares_scales(cs.gram, kept, ridge).to(mod.weight.dtype).to(mod.weight.device)
            shape = [1, -1] + [1] * (mod.weight.dim() - 2)
            idx = torch.tensor(new, device=mod.weight.device)
            mod.weight[:, idx] *= s.view(shape)
    return model
