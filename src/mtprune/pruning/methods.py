"""The pruning methods a run compares, one description each: what it trains before pruning (a sparse
stage, or none), which scorer ranks the channels and so whether thresholds (independent / unified)
apply, and how the report draws it. ``mtprune prune``, :func:`mtprune.pruning.prune` (through the
scorer), the pipeline and the report all read :data:`METHODS`.

Adding a method is one :func:`register_method` entry plus its scorer
(:func:`~mtprune.pruning.scores.register_scorer`, which also says what inputs the scorer needs).
"""

from __future__ import annotations

from dataclasses import dataclass

from mtprune.errors import UsageError
from mtprune.pruning.scores import Scorer, get_scorer


@dataclass(frozen=True)
class Method:
    name: str
    scorer: str  # a key of SCORERS
    sparse_stage: str | None  # the training stage whose model it prunes; None: the dense train-seg model
    color: str  # matplotlib colour in the report's figures
    help: str

    @property
    def score(self) -> Scorer:
        return get_scorer(self.scorer)

    @property
    def global_thresholds(self) -> bool:
        """True when the scores rank channels across layers, so independent / unified thresholds differ."""
        return self.score.scope == "global"


METHODS: dict[str, Method] = {}


def register_method(method: Method) -> Method:
    METHODS[method.name] = method
    return method


def scorer_of(name: str) -> str:
    """The scorer that method ``name`` uses (``mtp`` → ``bn``); a scorer's own name stands for itself."""
    if name in METHODS:
        return METHODS[name].scorer
    return get_scorer(name).name


def get_method(name: str) -> Method:
    if name not in METHODS:
        raise UsageError(f"unknown method '{name}' (choose from {', '.join(METHODS)})")
    return METHODS[name]


register_method(Method("mtp", "bn", "sparse-mtp", "tab:red", "MTP: |γ1| of W1, |γ2| of W2 after sparse-mtp"))
register_method(Method("slimming", "bn", "sparse-slimming", "tab:blue", "Network Slimming: |γ| after sparse-slimming"))
register_method(Method("uniform", "uniform", None, "tab:gray", "the same fraction of every layer (filter ℓ1 norm)"))
register_method(Method("fpgm", "fpgm", None, "tab:green", "FPGM: filters nearest each layer's geometric median"))
register_method(Method("thinet", "thinet", None, "tab:purple", "ThiNet: greedy reconstruction of the next layer"))
