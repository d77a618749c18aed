"""Orchestration: the stage runner (:mod:`~mtprune.pipeline.runner`), the stages of a run
(:mod:`~mtprune.pipeline.stages`), the fine-tuning budget (:mod:`~mtprune.pipeline.budget`) and ``mtprune
run`` itself (:mod:`~mtprune.pipeline.run`) — Algorithm 1 end to end for every method, resumable, with a
report. The folder layout it writes is :mod:`mtprune.layout`.
"""

from mtprune.pipeline.budget import extended_seg_epochs, extra_seg_steps, finetune_budget, sparse_seg_steps
from mtprune.pipeline.run import check_run_config, run_command, run_pipeline, run_seeds, run_stage
from mtprune.pipeline.runner import Stage, execute

__all__ = [
    "Stage",
    "check_run_config",
    "execute",
    "extended_seg_epochs",
    "extra_seg_steps",
    "finetune_budget",
    "run_command",
    "run_pipeline",
    "run_seeds",
    "run_stage",
    "sparse_seg_steps",
]
