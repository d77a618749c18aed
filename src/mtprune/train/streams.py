"""Resumable, deterministic batch streams.

Two properties make a run resumable bit for bit, whatever the number of data-loader workers:

- the order of samples is a function of ``(seed, epoch)`` only (:class:`EpochSampler`), and a stream
  records its position (epoch, samples consumed), so a resumed stream restarts at the next batch;
- the random augmentation of a sample is a function of ``(seed, epoch, index)`` only
  (:class:`SeededSamples` seeds torch's RNG around the transform), so it does not depend on which
  worker draws it or on what ran before.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from typing import Any

import torch
from torch.utils.data import DataLoader, Dataset, Sampler

from mtprune.data import seed_worker
from mtprune.train.distributed import DistEnv


class EpochSampler(Sampler):
    """Yields ``(epoch, index)`` keys of this rank's shard of an epoch, from sample ``start`` on."""

    def __init__(self, n: int, shuffle: bool, seed: int, epoch: int, start: int, rank: int = 0, world: int = 1):
        self.n, self.shuffle, self.seed, self.epoch, self.start = n, shuffle, seed, epoch, start
        self.rank, self.world = rank, world

    def shard(self) -> list[int]:
        if self.shuffle:
            g = torch.Generator().manual_seed(self.seed * 1_000_003 + self.epoch)
            order = torch.randperm(self.n, generator=g).tolist()
        else:
            order = list(range(self.n))
        per_rank = self.n // self.world  # drop the tail so every rank sees the same number of samples
        return order[: per_rank * self.world][self.rank :: self.world]

    def __iter__(self) -> Iterator[tuple[int, int]]:
        return iter([(self.epoch, i) for i in self.shard()[self.start :]])

    def __len__(self) -> int:
        return max(0, self.n // self.world - self.start)


class SeededSamples(Dataset):
    """Serves ``dataset[index]`` for a key ``(epoch, index)`` with torch's RNG seeded from the key."""

    def __init__(self, dataset: Dataset, seed: int) -> None:
        self.dataset, self.seed = dataset, seed

    def __len__(self) -> int:
        return len(self.dataset)  # type: ignore[arg-type]

    def __getitem__(self, key: tuple[int, int]) -> Any:
        epoch, index = key
        with torch.random.fork_rng(devices=[]):
            # the CPU generator only (what fork_rng saves): torch.manual_seed would also queue a seeding
            # of every accelerator backend, with a stack trace each: slow for every sample
            torch.default_generator.manual_seed((self.seed * 7_919 + epoch) * 1_000_003 + index)
            return self.dataset[index]


def epoch_steps(n: int, batch_size: int, world_size: int = 1) -> int:
    """Steps in an epoch of ``n`` samples: each process's shard (the tail dropped) in full batches."""
    steps = n // world_size // batch_size
    if steps < 1:
        raise ValueError(f"{n} samples are too few for batches of {batch_size} on {world_size} process(es)")
    return steps


class BatchStream:
    """An endless, resumable stream of training batches over epochs (``next(stream)``)."""

    def __init__(
        self, dataset: Dataset, batch_size: int, seed: int, env: DistEnv, workers: int = 0, shuffle: bool = True
    ) -> None:
        self.dataset = dataset
        self.n = len(dataset)  # type: ignore[arg-type]
        self.batch_size, self.seed, self.env, self.workers, self.shuffle = batch_size, seed, env, workers, shuffle
        self.steps_per_epoch = epoch_steps(self.n, batch_size, env.world_size)
        self.epoch, self.pos = 0, 0
        self._it: Iterator[Any] | None = None
        self.served = 0  # samples served by this process (not part of the state: a speed count)
        self.wait_s = 0.0  # seconds ``next`` waited for the loader

    def _loader(self) -> DataLoader:
        sampler = EpochSampler(
            self.n, self.shuffle, self.seed, self.epoch, self.pos, self.env.rank, self.env.world_size
        )
        # an own generator: creating the iterator must not draw from the global RNG (dropout uses it)
        gen = torch.Generator().manual_seed(self.seed * 1_000_003 + self.epoch)
        return DataLoader(
            SeededSamples(self.dataset, self.seed),
            batch_size=self.batch_size,
            sampler=sampler,
            num_workers=self.workers,
            drop_last=True,
            worker_init_fn=seed_worker,
            generator=gen,
            pin_memory=self.env.device.type == "cuda",
        )

    def __next__(self) -> Any:
        t0 = time.perf_counter()
        if self.pos + self.batch_size > self.steps_per_epoch * self.batch_size:
            self.epoch, self.pos, self._it = self.epoch + 1, 0, None
        if self._it is None:
            self._it = iter(self._loader())
        batch = next(self._it)
        self.pos += self.batch_size
        self.served += self.batch_size
        self.wait_s += time.perf_counter() - t0
        return batch

    def state_dict(self) -> dict[str, int]:
        return {"epoch": self.epoch, "pos": self.pos}

    def load_state_dict(self, state: dict[str, int]) -> None:
        self.epoch, self.pos, self._it = int(state["epoch"]), int(state["pos"]), None
