"""DataLoaders with seeded shuffling, seeded workers and optional distributed sampling.

Training loaders always shuffle through a `DistributedSampler` (one replica when not distributed), so the order of
epoch e depends only on (seed, e) and a resumed run sees the same order: call `set_epoch(loader, epoch)` at the start
of every epoch, or every epoch repeats the first one's order.
"""

from __future__ import annotations

import logging
import random
from collections.abc import Callable, Iterator, Sized
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
from torch.utils.data import DataLoader, Dataset, DistributedSampler, Sampler, SequentialSampler

logger = logging.getLogger(__name__)


def seed_worker(worker_id: int) -> None:
    """DataLoader `worker_init_fn`: seed `random` and NumPy from the worker's torch seed (base seed + worker id).

    Recent torch versions already do this; doing it here keeps augmentations reproducible whatever the version.
    """
    seed = torch.initial_seed() % 2**32
    random.seed(seed)
    np.random.seed(seed)


class _Strided(Sampler[int]):
    """Indices rank, rank + num_replicas, ... of range(n): one rank's share, no sample repeated."""

    def __init__(self, n: int, num_replicas: int, rank: int) -> None:
        if num_replicas < 1 or not 0 <= rank < num_replicas:  # a wrong rank would count another rank's share twice
            raise ValueError(f"expected num_replicas >= 1 and rank in [0, num_replicas); got {num_replicas} and {rank}")
        self.n, self.num_replicas, self.rank = n, num_replicas, rank

    def __iter__(self) -> Iterator[int]:
        return iter(range(self.rank, self.n, self.num_replicas))

    def __len__(self) -> int:
        return len(range(self.rank, self.n, self.num_replicas))


def _sampler(
    dataset: Dataset[Any], train: bool, seed: int, distributed: bool, num_replicas: int | None, rank: int | None
) -> Sampler[int]:
    """DistributedSampler for training or distributed runs; sequential order for single-process evaluation."""
    if distributed:
        if (num_replicas is None or rank is None) and not (dist.is_available() and dist.is_initialized()):
            raise RuntimeError(
                "distributed=True needs torch.distributed initialised (init_process_group) or num_replicas and rank"
            )
        if train:
            return DistributedSampler(dataset, num_replicas, rank, shuffle=True, seed=seed)
        # evaluation: every sample exactly once over all ranks (DistributedSampler would repeat up to
        # num_replicas - 1 of them to even out the ranks, and the summed metrics would count those twice)
        replicas = num_replicas if num_replicas is not None else dist.get_world_size()
        return _Strided(len(dataset), replicas, rank if rank is not None else dist.get_rank())  # type: ignore[arg-type]
    if train:
        return DistributedSampler(dataset, num_replicas=1, rank=0, shuffle=True, seed=seed)
    return SequentialSampler(dataset)  # type: ignore[arg-type]


def build_loader(
    dataset: Dataset[Any],
    batch_size: int,
    train: bool,
    num_workers: int = 0,
    seed: int = 0,
    distributed: bool = False,
    drop_last: bool | None = None,
    *,
    num_replicas: int | None = None,
    rank: int | None = None,
    pin_memory: bool = False,
    collate_fn: Callable[[list[Any]], Any] | None = None,
) -> DataLoader[Any]:
    """A DataLoader over `dataset`; its sampler is `loader.sampler` (use `set_epoch(loader, epoch)`).

    Randomness: the shuffle order comes from (seed, epoch); worker augmentations from a generator seeded with
    seed + rank (so ranks differ). With num_workers=0 augmentations use the main process's global torch RNG:
    seed it with `torch.manual_seed`.

    Args:
        dataset: a map-style dataset with `__len__`.
        batch_size: samples per batch (per process when distributed).
        train: shuffle, and drop the last incomplete batch unless drop_last says otherwise.
        num_workers: loader processes; 0 loads in the main process. Workers persist across epochs.
        seed: seed of the shuffle and of the workers' generators.
        distributed: split the data across ranks with `DistributedSampler` (shuffle=train).
        drop_last: drop the last incomplete batch; default: train.
        num_replicas, rank: for distributed; default: from the initialised process group.
        pin_memory: pin batches in page-locked memory (faster host-to-GPU copies).
        collate_fn: merges samples into a batch; default: torch's default_collate.

    Returns:
        The DataLoader.
    """
    if batch_size < 1 or num_workers < 0:
        raise ValueError(f"need batch_size >= 1 and num_workers >= 0, got {batch_size} and {num_workers}")
    if not isinstance(dataset, Sized):
        raise TypeError(f"build_loader needs a dataset with __len__, got {type(dataset).__name__}")
    drop_last = train if drop_last is None else drop_last
    sampler = _sampler(dataset, train, seed, distributed, num_replicas, rank)
    per_process = len(sampler)  # type: ignore[arg-type]
    if drop_last and per_process < batch_size:
        raise ValueError(
            f"{per_process} samples per process make no full batch of {batch_size} with drop_last=True; "
            "lower batch_size or pass drop_last=False"
        )
    rank_offset = getattr(sampler, "rank", 0)
    return DataLoader(
        dataset,
        batch_size=batch_size,
        sampler=sampler,
        num_workers=num_workers,
        collate_fn=collate_fn,
        pin_memory=pin_memory,
        drop_last=drop_last,
        worker_init_fn=seed_worker if num_workers > 0 else None,
        generator=torch.Generator().manual_seed(seed + rank_offset),
        persistent_workers=num_workers > 0,
    )


def set_epoch(loader: DataLoader[Any], epoch: int) -> None:
    """Tell the loader's sampler which epoch starts, so each epoch is shuffled differently (no-op for evaluation).

    Args:
        loader: a loader from `build_loader`.
        epoch: the epoch about to start, from 0.
    """
    sampler = loader.sampler
    if hasattr(sampler, "set_epoch"):
        sampler.set_epoch(epoch)
