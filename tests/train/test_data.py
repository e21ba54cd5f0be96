"""gcvit.train.data: the training data takes the config's augmentation, each sample drawn from its own seed; an
image folder with unreadable files trains and names them."""

from __future__ import annotations

import copy
from pathlib import Path

import pytest
import torch

pytest.importorskip("sklearn")
pytest.importorskip("yaml")

from gcvit.models.folder import read_config
from gcvit.train import TrainConfig
from gcvit.train import checkpoint as ckpt
from tests.train.helpers import BAD_FILES, SHAPES, run_train

pytestmark = pytest.mark.usefixtures("one_thread")  # one torch thread (tests/conftest.py)


def test_the_training_data_takes_the_configs_augmentation_and_reshuffles_each_epoch() -> None:
    """crop_scale, hflip and the RandAugment spec reach the training transform (digits flipped at p=0.5 would be
    a different task); the loader's order is shuffled and changes with the epoch, each sample keyed by its epoch."""
    from torchvision.transforms import v2

    from gcvit.data.randaugment import INCREASING_OPS, RandAugment
    from gcvit.train.data import build_datasets, train_loader

    cfg = TrainConfig(img_size=32, crop_scale=0.75, hflip=0.0, randaugment="rand-m7-mstd0.5-inc1", random_erasing=0.3)
    steps = build_datasets(cfg, (0.5, 0.25, 0.125), (0.5, 0.5, 0.5), 1.0, "bicubic").train.transform.transforms
    crop = next(t for t in steps if isinstance(t, v2.RandomResizedCrop))
    assert crop.scale == (0.75, 1.0) and tuple(crop.size) == (32, 32)
    assert not any(isinstance(t, v2.RandomHorizontalFlip) for t in steps)
    ra = next(t for t in steps if isinstance(t, RandAugment))
    assert (ra.magnitude, ra.magnitude_std, ra.geometry.fill) == (7, 0.5, (128, 64, 32))  # the mean colour
    assert ra.ops == list(INCREASING_OPS.items())
    erasing = next(t for t in steps if isinstance(t, v2.RandomErasing))
    assert erasing.p == 0.3
    erasing = copy.copy(erasing)
    erasing.p = 1.0
    torch.manual_seed(0)
    erased = erasing(torch.zeros(3, 32, 32))
    assert (erased != 0).float().mean() > 0.02 and erased[erased != 0].std() > 0.5  # timm's 'pixel': normal noise

    loader = train_loader(list(range(100)), 10, seed=0, num_workers=0, rank=0, world_size=1)
    orders = []
    for epoch in (0, 1):
        loader.sampler.set_epoch(epoch)
        keys = list(loader.sampler)
        assert {e for e, _ in keys} == {epoch}
        orders.append([i for _, i in keys])
    assert sorted(orders[0]) == list(range(100)) and orders[0] != list(range(100)) and orders[0] != orders[1]


def test_a_seed_of_any_allowed_size_trains(tmp_path: Path) -> None:
    """Seeds up to 2**32 - 1 are allowed; the per-image augmentation seed derived from them must not overflow."""
    from gcvit.train.data import SeededAugment

    images = SeededAugment([torch.rand(3)] * 4, seed=2**32 - 1)
    assert images[(5, 3)].shape == (3,)


def test_seeded_augment_draws_each_sample_from_its_own_seed_and_leaves_the_callers_stream() -> None:
    """Sample (epoch, index) draws what torch.manual_seed((seed * S + epoch) * S + index) would give (runs started by
    earlier versions resume with the same augmentations), and the caller's random stream goes on as if untouched."""
    from gcvit.train.data import _SEED_STRIDE, SeededAugment

    class Draws:
        def __getitem__(self, index: int) -> torch.Tensor:
            return torch.rand(4)

        def __len__(self) -> int:
            return 10

    images = SeededAugment(Draws(), seed=7)
    torch.manual_seed(123)
    got = [images[(epoch, index)] for epoch, index in ((0, 0), (0, 9), (3, 9))]
    after = torch.rand(2)
    for (epoch, index), drawn in zip(((0, 0), (0, 9), (3, 9)), got):
        torch.manual_seed((7 * _SEED_STRIDE + epoch) * _SEED_STRIDE + index)
        assert torch.equal(drawn, torch.rand(4))
    torch.manual_seed(123)
    assert torch.equal(after, torch.rand(2))
    assert not torch.equal(got[0], got[1]) and not torch.equal(got[1], got[2])


def test_image_folder_with_bad_files_trains_and_names_them(shapes: Path, tmp_path: Path) -> None:
    run = tmp_path / "run"
    done = run_train(run, "--data-dir", str(shapes), "--batch-size", "8", "--epochs", "2")
    assert done.returncode == 0, done.stderr
    assert "skipped 3 unreadable image files" in done.stderr, done.stderr
    for name in BAD_FILES:
        assert str(shapes / name) in done.stderr, name
    assert "done: 2 epochs" in done.stdout
    assert ckpt.read_training_state(run / "last")["epoch"] == 2
    assert read_config(run / "last")["classes"] == list(SHAPES)

    strict = tmp_path / "strict"
    stopped = run_train(strict, "--data-dir", str(shapes), "--batch-size", "8", "--epochs", "2", "--strict-data")
    assert stopped.returncode == 2, stopped.stderr
    assert "gcvit: error:" in stopped.stderr and "3 of 39 image files cannot be read" in stopped.stderr
    for name in BAD_FILES:
        assert str(shapes / name) in stopped.stderr, name
    assert not (strict / "last").exists() and not list(strict.glob("last*"))
    assert "epoch 1/2" not in stopped.stderr
