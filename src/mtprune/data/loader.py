"""Data loaders with seeded workers, and the ``--skip-bad`` wrapper.

:func:`build_loader` gives every worker a seed derived from ``seed`` (and the rank), so a run's
augmentations are reproducible; it uses a :class:`DistributedSampler` when asked (the caller calls
``loader.sampler.set_epoch(epoch)``) and pins memory when CUDA is available. Nothing here downloads.

:class:`SkipBadSamples` wraps a dataset so that a bad sample (:class:`BadSampleError`) is skipped —
replaced by the next good one, so batches keep their size — and counted, across worker processes.
Without it a bad sample stops the run with its one-line message.
"""

from __future__ import annotations

import logging
import random
from collections.abc import Callable
from typing import Any

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset, DistributedSampler

from mtprune.data.base import BadSampleError, DatasetView

log = logging.getLogger("mtprune.data")


def seed_worker(worker_id: int) -> None:
    """``worker_init_fn``: seed ``random`` and NumPy from the worker's torch seed (which the loader's
    generator determines)."""
    seed = torch.initial_seed() % 2**32
    np.random.seed(seed)
    random.seed(seed)


class SkipBadSamples(DatasetView):
    """A dataset view that skips bad samples, counting them (in memory shared with the workers).

    Attributes of the wrapped dataset (``num_classes``, ``class_names``, ``task``...) are forwarded.
    """

    def __init__(self, dataset: Dataset) -> None:
        super().__init__(dataset)
        self._bad = torch.zeros(len(dataset), dtype=torch.bool).share_memory_()  # type: ignore[arg-type]

    def __getitem__(self, index: int) -> Any:
        n = len(self)
        for k in range(n):
            j = (index + k) % n
            if self._bad[j]:
                continue
            try:
                return self.dataset[j]
            except BadSampleError as e:
                self._bad[j] = True
                log.warning("skipping bad sample: %s", e)
        raise BadSampleError(f"every one of the {n} samples is bad; e.g. {self.problems()[0]}")

    @property
    def num_skipped(self) -> int:
        """How many distinct bad samples have been met so far (by any worker)."""
        return int(self._bad.sum())

    def skipped_indices(self) -> list[int]:
        return [int(i) for i in torch.nonzero(self._bad).flatten()]

    def problems(self) -> list[str]:
        """The one-line message of each skipped sample (re-read in this process)."""
        out = []
        for i in self.skipped_indices():
            inspect = getattr(self.dataset, "inspect", None)
            if inspect is not None:
                out.extend(str(p) for p in inspect(i).problems)
            else:
                out.append(f"sample {i}")
        return out or ["no readable sample"]

    def report(self) -> str:
        """``skipped N bad samples`` (with the first message), for the run's log."""
        n = self.num_skipped
        if not n:
            return "skipped 0 bad samples"
        first = self.problems()[0]
        return f"skipped {n} bad sample{'s' if n != 1 else ''} (first: {first})"


def build_loader(
    dataset: Dataset,
    batch_size: int,
    shuffle: bool,
    seed: int = 0,
    num_workers: int = 0,
    distributed: bool = False,
    drop_last: bool = False,
    pin_memory: bool | None = None,
    collate_fn: Callable[[list[Any]], Any] | None = None,
    rank: int | None = None,
    world_size: int | None = None,
) -> DataLoader:
    """A :class:`DataLoader` with seeded workers (``worker_init_fn`` + a seeded ``generator``).

    ``distributed``: a :class:`DistributedSampler` (``rank``/``world_size`` default to the process
    group's; call ``loader.sampler.set_epoch(epoch)`` every epoch); each rank's augmentations get
    their own seed. ``pin_memory=None`` pins when CUDA is available.
    """
    sampler = None
    offset = 0
    if distributed:
        sampler = DistributedSampler(
            dataset, num_replicas=world_size, rank=rank, shuffle=shuffle, seed=seed, drop_last=drop_last
        )
        offset = sampler.rank
        shuffle = False
    generator = torch.Generator()
    generator.manual_seed(int(seed) + 1_000_003 * offset)
    if pin_memory is None:
        pin_memory = torch.cuda.is_available()
    return DataLoader(
        dataset,
        batch_size=batch_size,
        shuffle=shuffle,
        sampler=sampler,
        num_workers=num_workers,
        collate_fn=collate_fn,
        pin_memory=pin_memory,
        drop_last=drop_last,
        worker_init_fn=seed_worker,
        generator=generator,
    )
