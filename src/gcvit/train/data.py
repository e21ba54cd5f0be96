"""Datasets and loaders for training, with augmentations that replay exactly on resume.

Each training sample's augmentation is drawn from a torch RNG seeded by (seed, epoch, sample index): the sampler
yields (epoch, index) pairs and the dataset wrapper seeds a forked RNG with them. So the augmentations of an epoch
depend only on the seed and the epoch, whatever the number of workers or processes, and a resumed run repeats them.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import torch
from torch.utils.data import DataLoader, Dataset, DistributedSampler, Sampler

from gcvit.data import (
    DigitsDataset,
    check_same_classes,
    eval_transform,
    split_image_folder,
    train_transform,
)
from gcvit.data import ImageFolderDataset as _Folder
from gcvit.data import build_loader as _build_loader
from gcvit.train.config import TrainConfig

_SEED_STRIDE = 1_000_003  # epochs and samples map to distinct seeds for any dataset below a million samples


class _EpochSampler(Sampler[tuple[int, int]]):
    """Wraps a DistributedSampler and yields (epoch, index), so workers know which epoch a sample belongs to."""

    def __init__(self, inner: DistributedSampler) -> None:
        self.inner = inner

    def set_epoch(self, epoch: int) -> None:
        self.inner.set_epoch(epoch)

    @property
    def epoch(self) -> int:
        return self.inner.epoch

    def __len__(self) -> int:
        return len(self.inner)

    def __iter__(self) -> Iterator[tuple[int, int]]:
        epoch = self.inner.epoch
        return ((epoch, i) for i in self.inner)


class SeededAugment(Dataset[tuple[Any, int]]):
    """Serves dataset[index] with its random transform drawn from torch's RNG seeded by (seed, epoch, index)."""

    def __init__(self, dataset: Any, seed: int) -> None:
        self.dataset, self.seed = dataset, seed

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, key: tuple[int, int]) -> tuple[Any, int]:
        epoch, index = key
        with torch.random.fork_rng(devices=[]):
            # The CPU generator alone, which the transforms draw from: torch.manual_seed also queues a seed, with a
            # stack trace, for every accelerator, 90 us a sample against 5 (5% of a digits epoch). Modulo 2**64 (what
            # manual_seed takes): the same seeds as before below that, no overflow above.
            torch.default_generator.manual_seed(((self.seed * _SEED_STRIDE + epoch) * _SEED_STRIDE + index) % 2**64)
            return self.dataset[index]


@dataclass
class TrainData:
    train: Any  # the training dataset (with its train transform)
    val: Any
    classes: list[str]


def build_datasets(
    cfg: TrainConfig,
    mean: tuple[float, ...],
    std: tuple[float, ...],
    crop_pct: float,
    interpolation: str,
    crop_mode: str = "center",
) -> TrainData:
    """The train and val datasets of the config; raises DataError (before any training) when the data is unusable."""
    t_train = train_transform(
        cfg.img_size,
        mean,
        std,
        interpolation=cfg.train_interpolation,  # the eval transform keeps the model's `interpolation`
        scale=(cfg.crop_scale, 1.0),
        hflip=cfg.hflip,
        randaugment=cfg.randaugment,
        color_jitter=cfg.color_jitter,
        random_erasing=cfg.random_erasing,
    )
    t_val = eval_transform(cfg.img_size, mean, std, interpolation=interpolation, crop_pct=crop_pct, crop_mode=crop_mode)
    if cfg.data == "digits":
        train = DigitsDataset("train", cfg.img_size, cfg.val_fraction, cfg.seed, t_train)
        val = DigitsDataset("val", cfg.img_size, cfg.val_fraction, cfg.seed, t_val)
    elif cfg.data_dir:
        train, val = split_image_folder(
            cfg.data_dir,
            cfg.val_fraction,
            cfg.seed,
            train_transform=t_train,
            val_transform=t_val,
            strict=cfg.strict_data,
        )
    else:
        train = _Folder(cfg.train_dir, t_train, strict=cfg.strict_data)  # type: ignore[arg-type]
        val = _Folder(cfg.val_dir, t_val, strict=cfg.strict_data)  # type: ignore[arg-type]
        check_same_classes(train, val)
    return TrainData(train, val, list(train.classes))


def train_loader(
    dataset: Any,
    batch_size: int,
    seed: int,
    num_workers: int,
    rank: int,
    world_size: int,
    pin_memory: bool = False,
    collate: Any = None,
) -> DataLoader[Any]:
    """Shuffled, drop-last loader of per-process batches with (seed, epoch, index)-seeded augmentations."""
    inner = DistributedSampler(dataset, num_replicas=world_size, rank=rank, shuffle=True, seed=seed)
    if len(inner) < batch_size:
        per = " per process" if world_size > 1 else ""
        raise ValueError(
            f"{len(inner)} training images{per} make no full batch of {batch_size}: lower --batch-size (batch_size) "
            f"to at most {len(inner) * world_size}"
        )
    return DataLoader(
        SeededAugment(dataset, seed),
        batch_size=batch_size,
        sampler=_EpochSampler(inner),
        num_workers=num_workers,
        drop_last=True,
        pin_memory=pin_memory,
        collate_fn=collate,
        persistent_workers=num_workers > 0,
        generator=torch.Generator().manual_seed(seed + rank),
    )


def eval_loader(
    dataset: Any, batch_size: int, num_workers: int, distributed: bool, collate: Any = None
) -> DataLoader[Any]:
    """Ordered loader; distributed runs split it across ranks, each sample on exactly one rank."""
    return _build_loader(
        dataset, batch_size, train=False, num_workers=num_workers, distributed=distributed, collate_fn=collate
    )
