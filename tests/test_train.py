"""Tests for gcvit.train: config, optimizer groups, schedule, checkpoints, a short digits run, eval and predict."""

from __future__ import annotations

import argparse
import copy
import csv
import dataclasses
import itertools
import json
import math
import os
import random
import re
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
import torch

pytest.importorskip("sklearn")
pytest.importorskip("yaml")

import gcvit
from gcvit.data import DataError, split_image_folder
from gcvit.models.folder import read_config
from gcvit.train import TrainConfig, resolve_config, train
from gcvit.train import checkpoint as ckpt
from gcvit.train.evaluate import evaluate, predict
from gcvit.train.optim import build_optimizer, build_scheduler, layer_id, param_groups
from tests.conftest import TINY

# the same model as command-line flags: --model-override embed_dim=16 ...
TINY_FLAGS = [a for k, v in TINY.items() for a in ("--model-override", f"{k}={json.dumps(v)}")]


@pytest.fixture(autouse=True)
def _one_thread() -> Iterator[None]:
    """One torch thread: tiny models barely gain from two, and two thrash when other jobs share the CPU."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


# ---------------------------------------------------------------- config


def test_flags_override_yaml_override_recipe(tmp_path: Path) -> None:
    path = tmp_path / "c.yaml"
    path.write_text("recipe: official\nbatch_size: 1024\nepochs: 7\nlr: 1.0e-3\n")
    cfg = resolve_config(path, {"epochs": 30})
    assert cfg.epochs == 30 and cfg.lr == 1e-3 and cfg.batch_size == 1024  # flag > yaml > recipe
    assert cfg.ema == 0.9998 and cfg.mixup == 0.8 and cfg.cutmix == 1.0 and cfg.warmup_epochs == 20
    assert cfg.randaugment == "rand-m9-mstd0.5-inc1" and cfg.random_erasing == 0.25 and cfg.min_lr == 5e-6


def test_the_official_recipe_is_the_papers_every_value() -> None:
    """GCVIT_SPEC.md's ImageNet-1K recipe, every value (a mutation review found crop_scale, among others, unchecked):
    lr 5e-3 at batch 4096 scaled linearly; the bf16 autocast and colour jitter off are this package's choices."""
    from gcvit.train.config import official_recipe

    assert official_recipe(4096) == {
        "img_size": 224,
        "lr": 5e-3,
        "min_lr": 5e-6,
        "warmup_lr": 1e-6,
        "warmup_epochs": 20.0,
        "epochs": 310,
        "cooldown_epochs": 10,
        "weight_decay": 0.05,
        "clip_grad": 5.0,
        "ema": 0.9998,
        "randaugment": "rand-m9-mstd0.5-inc1",
        "mixup": 0.8,
        "cutmix": 1.0,
        "label_smoothing": 0.1,
        "random_erasing": 0.25,
        "color_jitter": None,
        "hflip": 0.5,
        "crop_scale": 0.08,
        "amp": "bf16",
        "warmup_prefix": False,  # the cosine counts from step 0, the warmup overlapping it (timm's default)
        "decay_bias_tables": True,  # the official run decayed them (its exemption list was never read)
        "train_interpolation": "random",  # timm's train_interpolation default
        "ema_warmup": False,  # NVIDIA's ModelEma decays at 0.9998 from the first step
        "keep_best": "ema",  # best/ chosen on the EMA's accuracy
    }
    assert official_recipe(1024)["lr"] == pytest.approx(1.25e-3)


def test_none_flags_turn_settings_off_and_model_overrides_merge(tmp_path: Path) -> None:
    """`--ema none` (and the other 'none' switches) override the YAML file, the recipe and a resumed run instead of
    being dropped; `--model-override` changes single fields of the YAML file's model instead of replacing it."""
    from gcvit.cli.train import _overrides, add_subcommands

    path = tmp_path / "c.yaml"
    path.write_text("recipe: official\nclip_grad: 1.0\nmodel_overrides: {embed_dim: 32, depths: [1, 1, 2, 1]}\n")
    parser = argparse.ArgumentParser()
    add_subcommands(parser.add_subparsers())
    flags = [
        "train",
        "--ema",
        "none",
        "--clip-grad",
        "none",
        "--time-limit",
        "none",
        "--model-override",
        "embed_dim=48",
    ]
    given = _overrides(parser.parse_args(flags))
    assert given == {"ema": None, "clip_grad": None, "time_limit": None, "model_overrides": {"embed_dim": 48}}
    cfg = resolve_config(path, given, base={"time_limit": 60.0})
    assert cfg.ema is None and cfg.clip_grad is None and cfg.time_limit is None
    assert cfg.model_overrides == {"embed_dim": 48, "depths": [1, 1, 2, 1]}
    assert _overrides(parser.parse_args(["train"])) == {}  # flags not given leave everything as it was


def test_official_recipe_scales_lr_with_batch() -> None:
    assert resolve_config(None, {"recipe": "official", "batch_size": 4096}).lr == pytest.approx(5e-3)
    assert resolve_config(None, {"recipe": "official", "batch_size": 512}).lr == pytest.approx(5e-3 / 8)


def test_official_recipe_is_the_papers_imagenet_run() -> None:
    """224 px, 310 epochs of warmup + cosine then 10 at min_lr, and no colour jitter on top of RandAugment (timm's
    transform ignores the 0.4 while RandAugment is on)."""
    cfg = resolve_config(None, {"recipe": "official", "data": "folder", "data_dir": "/data/imagenet"})
    assert (cfg.img_size, cfg.epochs, cfg.cooldown_epochs, cfg.color_jitter) == (224, 310, 10, None)


def test_cooldown_epochs_run_at_min_lr_after_the_schedule(tmp_path: Path, caplog) -> None:
    """The run lasts epochs + cooldown_epochs; the cooldown's optimizer steps all use min_lr. A warmup longer than
    the run is named in a warning."""
    with caplog.at_level("WARNING", logger="gcvit.train.loop"):
        result = train(_cfg(tmp_path, epochs=1, cooldown_epochs=1, warmup_epochs=0.5, ema=None, batch_size=256))
    assert result.epochs_done == 2 and [row["epoch"] for row in result.history] == [1, 2]
    assert result.history[1]["lr"] == pytest.approx(1e-5)  # min_lr
    assert "is not below epochs" not in caplog.text
    with caplog.at_level("WARNING", logger="gcvit.train.loop"):
        train(_cfg(tmp_path, epochs=1, warmup_epochs=3, ema=None, batch_size=256, out_dir=str(tmp_path / "w")))
    assert "warmup_epochs (3) is not below epochs (1)" in caplog.text
    with caplog.at_level("WARNING", logger="gcvit.train.loop"):  # equal: the lr peaks at the very end, no decay
        train(_cfg(tmp_path, epochs=1, warmup_epochs=1, ema=None, batch_size=256, out_dir=str(tmp_path / "w1")))
    assert "warmup_epochs (1) is not below epochs (1)" in caplog.text


def test_the_loop_follows_each_setting_into_training(tmp_path: Path, monkeypatch) -> None:
    """Settings whose loss no other fast test would see (a mutation review): best/ is chosen on the EMA's accuracy
    with keep_best 'ema' (the spec's), fractional warmup epochs round to steps, each epoch reshuffles (set_epoch),
    gradients are clipped, the mixer smooths labels by label_smoothing, and the time limit stops the run."""
    from gcvit.train import loop
    from gcvit.train.data import _EpochSampler

    calls: dict[str, list] = {"top1": [50.0, 30.0, 40.0, 45.0], "epochs": [], "clip": [], "warmup": [], "smooth": []}

    def validate(model, loader, device, info):  # the model, then the EMA, each epoch
        return {"loss": 1.0, "top1": calls["top1"].pop(0), "top5": 100.0}

    def set_epoch(self, epoch):
        calls["epochs"].append(epoch)
        self.inner.set_epoch(epoch)

    def clip(parameters, max_norm):
        calls["clip"].append(max_norm)

    def scheduler(optimizer, total, warmup, *args, **kwargs):
        calls["warmup"].append((total, warmup))
        return build_scheduler(optimizer, total, warmup, *args, **kwargs)

    def mixer(*args, label_smoothing):
        calls["smooth"].append(label_smoothing)
        return gcvit.data.mixup_cutmix(*args, label_smoothing=label_smoothing)

    monkeypatch.setattr(loop, "validate", validate)
    monkeypatch.setattr(_EpochSampler, "set_epoch", set_epoch)
    monkeypatch.setattr(torch.nn.utils, "clip_grad_norm_", clip)
    monkeypatch.setattr(loop, "build_scheduler", scheduler)
    monkeypatch.setattr(loop, "mixup_cutmix", mixer)
    cfg = _cfg(
        tmp_path,
        epochs=2,
        batch_size=256,
        warmup_epochs=0.5,
        clip_grad=2.5,
        label_smoothing=0.2,
        ema=0.9,
        keep_best="ema",
    )
    result = train(cfg)
    assert calls["clip"] == [2.5] * 10  # 5 optimizer steps an epoch
    assert calls["warmup"] == [(10, 2)]  # round(0.5 * 5): 2 steps, not int(0.5) * 5 = 0
    assert calls["epochs"] == [0, 1] and calls["smooth"] == [0.2]
    assert result.best_top1 == 45.0 and ckpt.read_training_state(tmp_path / "run" / "best")["epoch"] == 2  # not raw 50
    monkeypatch.undo()
    stopped = train(_cfg(tmp_path, epochs=3, batch_size=256, ema=None, time_limit=1e-9, out_dir=str(tmp_path / "t")))
    assert stopped.epochs_done == 1


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


def test_bad_config_values_are_named(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="amp"):
        TrainConfig(amp="fp8")
    with pytest.raises(ValueError, match="unknown training option"):
        resolve_config(None, {"learning_rate": 1.0})
    (tmp_path / "c.yaml").write_text("epochz: 3\n")
    with pytest.raises(ValueError, match="epochz"):
        resolve_config(tmp_path / "c.yaml")
    with pytest.raises(
        ValueError, match=r"model_overrides: unknown field\(s\) \['embed'\] for swin_tiny; .*SwinConfig"
    ):
        TrainConfig(model="swin_tiny", model_overrides={"embed": 48})
    with pytest.raises(ValueError, match="model_overrides may not set img_size; use the training option img_size"):
        TrainConfig(model_overrides={"img_size": 64})
    with pytest.raises(ValueError, match=r"min_lr \(1e-05\) and warmup_lr \(1e-06\) must not exceed lr \(5e-06\)"):
        TrainConfig(lr=5e-6)
    with pytest.raises(ValueError, match="give data_dir .* or train_dir and val_dir, not both"):
        TrainConfig(data="folder", data_dir="a", val_dir="b")
    for field, value in (("hflip", 2.0), ("random_erasing", 1.5), ("seed", -1), ("time_limit", -5.0)):
        with pytest.raises(ValueError, match=f"^{field} must be"):
            TrainConfig(**{field: value})
    for field, value in (("warmup_epochs", "inf"), ("lr", float("inf")), ("min_lr", "nan"), ("mixup", "inf")):
        with pytest.raises(ValueError, match=f"^{field} must be a finite number; got {value!r}"):
            TrainConfig(**{field: value})
    assert TrainConfig(time_limit="inf").time_limit == float("inf")  # no limit
    for batch, message in ((None, "int; got None"), ("abc", "int; got .abc."), (0, ">= 1, got 0")):
        with pytest.raises(ValueError, match=f"^batch_size must be {message}"):
            resolve_config(None, {"recipe": "official", "batch_size": batch})


# ---------------------------------------------------------------- optimizer and schedule


@pytest.mark.parametrize(
    ("name", "kw", "layers"),
    [
        ("swin_tiny", {"depths": (1, 1, 2, 1)}, 5),
        ("vit_tiny", {"depth": 3, "patch_size": 8}, 3),
    ],
)
def test_layer_decay_falls_off_block_by_block_for_swin_and_vit(name: str, kw: dict, layers: int) -> None:
    """Swin and ViT get one lr level per block, as GC ViT does: stem lowest, head 1.0, blocks in between."""
    model = gcvit.create_model(name, num_classes=3, img_size=32, **kw)
    by_name = {id(p): n for n, p in model.named_parameters()}
    scale = {by_name[id(p)]: g["lr_scale"] for g in param_groups(model, 0.05, 0.5) for p in g["params"]}
    assert sorted(set(scale.values())) == pytest.approx([0.5**k for k in range(layers + 1, -1, -1)])
    assert scale["patch_embed.proj.weight"] == pytest.approx(0.5 ** (layers + 1)) and scale["head.weight"] == 1.0
    first, last = ("layers.0.blocks.0", "layers.3.blocks.0") if name == "swin_tiny" else ("blocks.0", "blocks.2")
    assert scale[f"{first}.attn.qkv.weight"] == pytest.approx(0.5**layers)
    assert scale[f"{last}.mlp.fc2.weight"] == pytest.approx(0.5)
    if name == "swin_tiny":  # patch merging opening stage 3 goes with the block before it (stage 2's last)
        assert scale["layers.3.downsample.reduction.weight"] == scale["layers.2.blocks.1.attn.qkv.weight"]


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


def test_ema_copies_integer_buffers_and_averages_the_rest_as_torch_does() -> None:
    """torch's EMA function averages integer buffers in float and truncates (decay 0.9999 turned relative-position
    index k into k - 1); ours copies them, and gives torch's values for every floating tensor."""
    from torch.optim.swa_utils import AveragedModel, get_ema_multi_avg_fn

    from gcvit.train.ema import ema_update

    model = gcvit.create_model("gcvit_xxtiny", num_classes=3, img_size=32, **TINY)
    ours = AveragedModel(model, multi_avg_fn=ema_update(0.9999, False), use_buffers=True)
    torchs = AveragedModel(model, multi_avg_fn=get_ema_multi_avg_fn(0.9999), use_buffers=True)
    for _ in range(3):
        with torch.no_grad():
            for p in model.parameters():
                p.add_(torch.randn_like(p) * 0.01)
        ours.update_parameters(model)
        torchs.update_parameters(model)
    a, b, now = ours.module.state_dict(), torchs.module.state_dict(), model.state_dict()
    integers = [k for k in a if not a[k].is_floating_point()]
    assert any("relative_position_index" in k for k in integers)
    assert all(torch.equal(a[k], now[k]) for k in integers)
    assert not all(torch.equal(b[k], now[k]) for k in integers)  # what torch's function does
    assert all(torch.equal(a[k], b[k]) for k in a if a[k].is_floating_point())


def test_no_weight_decay_groups_and_layer_ids() -> None:
    model = gcvit.create_model("gcvit_xxtiny", num_classes=10, img_size=32, **TINY)
    groups = param_groups(model, 0.05, layer_decay=0.5)
    names = {id(p): n for n, p in model.named_parameters()}
    for g in groups:
        for p in g["params"]:
            decays = g["weight_decay"] > 0
            assert decays == (p.ndim > 1 and not names[id(p)].endswith("relative_position_bias_table"))
    assert sum(len(g["params"]) for g in groups) == len(list(model.parameters()))
    blocks_before, n = [0, 1, 2, 3], 4
    assert layer_id("patch_embed.proj.weight", n, blocks_before) == 0
    assert layer_id("levels.2.blocks.0.attn.qkv.weight", n, blocks_before) == 3
    assert layer_id("head.weight", n, blocks_before) == 5
    scales = {g["lr_scale"] for g in groups}
    assert max(scales) == 1.0 and min(scales) == pytest.approx(0.5**5)


def test_optimizer_is_fused_adamw_with_the_per_tensor_updates() -> None:
    """build_optimizer takes PyTorch's fused AdamW on the CPU; five steps over the layer-decay groups (decay and no
    decay, scaled lrs) land where the per-tensor loop lands."""
    torch.manual_seed(0)
    model = gcvit.create_model(
        "gcvit_xxtiny", depths=(1, 1, 2, 1), embed_dim=16, num_heads=(1, 2, 2, 4), img_size=32, drop_path_rate=0.0
    )
    reference = copy.deepcopy(model)
    start = model.patch_embed.proj.weight.detach().clone()
    opt = build_optimizer(model, 1e-2, 0.05, 0.75)
    twin = dict(zip(model.parameters(), reference.parameters()))
    groups = [
        {**{k: v for k, v in g.items() if k not in ("fused", "foreach")}, "params": [twin[p] for p in g["params"]]}
        for g in opt.param_groups
    ]  # the same groups, each taking the constructor's per-tensor loop
    ref_opt = torch.optim.AdamW(groups, fused=False, foreach=False)
    assert (
        opt.defaults["fused"]
        and len({g["lr"] for g in groups}) > 2
        and {g["weight_decay"] for g in groups} == {0, 0.05}
    )
    for _ in range(5):  # both take the model's gradients: Adam turns rounding noise in near-zero gradients into
        # lr-sized steps (the key bias gets none mathematically), so each side's own backward would part them
        opt.zero_grad()
        model(torch.randn(4, 3, 32, 32)).square().mean().backward()
        for p, q in twin.items():
            q.grad = None if p.grad is None else p.grad.clone()
        opt.step()
        ref_opt.step()
    for (name, p), q in zip(model.named_parameters(), reference.parameters()):
        torch.testing.assert_close(p, q, rtol=1e-5, atol=1e-7, msg=lambda m, name=name: f"{name}: {m}")
    assert (model.patch_embed.proj.weight - start).abs().max() > 1e-3  # the steps moved the weights


def test_adamw_settings_and_where_the_global_query_generator_and_downsampling_decay() -> None:
    """AdamW (0.9, 0.999), eps 1e-8 (the spec's); a stage's global query generator takes its first block's lr level,
    its downsampling its last block's."""
    opt = build_optimizer(torch.nn.Linear(2, 2), 1e-3, 0.05, None)
    assert opt.defaults["betas"] == (0.9, 0.999) and opt.defaults["eps"] == 1e-8
    assert opt.defaults["weight_decay"] == pytest.approx(0.01)  # PyTorch's, unused: every group sets its own
    assert [g["weight_decay"] for g in opt.param_groups] == [0.05, 0.0]  # the weight, then the bias
    blocks_before, n = [0, 2, 4, 10], 12  # depths 2, 2, 6, 2
    assert layer_id("levels.1.q_global_gen.to_q_global.0.conv.0.weight", n, blocks_before) == 3
    assert layer_id("levels.1.blocks.0.mlp.fc1.weight", n, blocks_before) == 3
    assert layer_id("levels.1.downsample.reduction.weight", n, blocks_before) == 4
    assert layer_id("levels.1.blocks.1.mlp.fc1.weight", n, blocks_before) == 4
    assert layer_id("levels.3.downsample.norm.weight", n, blocks_before) == 12
    assert layer_id("norm.weight", n, blocks_before) == 13


def test_the_schedule_keeps_each_groups_layer_decay_and_warms_up_linearly() -> None:
    """Every step, each group's lr is the schedule's factor times lr times its layer-decay scale (a scheduler that
    forgot the scales would train every layer at the head's lr); warmup is a straight line from warmup_lr to lr."""
    from gcvit.train.optim import lr_factor

    model = gcvit.create_model("gcvit_xxtiny", num_classes=3, img_size=32, **TINY)
    opt = build_optimizer(model, 1e-3, 0.05, 0.5)
    scales = [g["lr_scale"] for g in opt.param_groups]
    assert min(scales) == pytest.approx(0.5**5) and max(scales) == 1.0  # TINY: four blocks
    sched = build_scheduler(opt, total_steps=100, warmup_steps=10, lr=1e-3, min_lr=0.0, warmup_lr=5e-4)
    for step in range(30):
        factor = lr_factor(step, 100, 10, 1e-3, 0.0, 5e-4)
        assert [g["lr"] for g in opt.param_groups] == pytest.approx([factor * 1e-3 * k for k in scales]), step
        if step == 5:
            assert factor * 1e-3 == pytest.approx(7.5e-4)  # halfway from 5e-4 to 1e-3
        assert factor <= 1.0
        opt.step()
        sched.step()


def test_warmup_then_cosine_per_step() -> None:
    opt = build_optimizer(torch.nn.Linear(2, 2), 1e-3, 0.05, None)
    sched = build_scheduler(opt, total_steps=100, warmup_steps=10, lr=1e-3, min_lr=1e-5, warmup_lr=1e-6)
    lrs = []
    for _ in range(100):
        lrs.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
    assert lrs[0] == pytest.approx(1e-6) and lrs[10] == pytest.approx(1e-3)
    assert all(a <= b for a, b in itertools.pairwise(lrs[:11]))
    assert all(a >= b for a, b in itertools.pairwise(lrs[10:]))
    assert lrs[-1] == pytest.approx(1e-5 + 0.5 * (1e-3 - 1e-5) * (1 + math.cos(math.pi * 89 / 90)))


# ---------------------------------------------------------------- atomic checkpoints


def test_checkpoint_swap_is_atomic_and_recoverable(tmp_path: Path) -> None:
    meta, state = {"model": "x"}, {k: None for k in ckpt.STATE_KEYS} | {"epoch": 1}
    ckpt.write_checkpoint(tmp_path, "last", {"w": torch.ones(2)}, meta, state)
    assert ckpt.find_checkpoint(tmp_path) == tmp_path / "last"
    # a crash between moving the old folder aside and renaming the new one in: both halves are on disk
    os.replace(tmp_path / "last", tmp_path / "last.old-123")
    (tmp_path / "last.tmp-123").mkdir()
    (tmp_path / "last.tmp-123" / ckpt.MODEL_FILE).write_bytes(b"half")
    assert ckpt.find_checkpoint(tmp_path) == tmp_path / "last.old-123"
    (tmp_path / ".metrics.k2j_x.tmp.csv").write_text("epoch\n")  # atomic writes a kill interrupted
    (tmp_path / "plots").mkdir()
    (tmp_path / "plots" / ".loss.abc.tmp.png").write_bytes(b"")
    ckpt.clean_stale(tmp_path)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["last", "plots"] and not any((tmp_path / "plots").iterdir())
    assert ckpt.read_training_state(tmp_path / "last")["epoch"] == 1


def test_a_failed_checkpoint_write_names_the_folder_and_keeps_the_previous_one(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    state = {k: None for k in ckpt.STATE_KEYS} | {"epoch": 1}
    ckpt.write_checkpoint(tmp_path, "last", {"w": torch.ones(2)}, {"model": "x"}, state)

    def full(*args: object, **kwargs: object) -> None:
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(ckpt, "atomic_torch_save", full)
    with pytest.raises(
        OSError,
        match=r"writing the checkpoint .*last failed \(No space left on device\); .*last "
        r"still holds the previous checkpoint",
    ):
        ckpt.write_checkpoint(tmp_path, "last", {"w": torch.zeros(2)}, {"model": "x"}, state | {"epoch": 2})
    assert sorted(p.name for p in tmp_path.iterdir()) == ["last"]  # no half-written last.tmp-*
    assert ckpt.read_training_state(tmp_path / "last")["epoch"] == 1


# ---------------------------------------------------------------- training


def _cfg(tmp_path: Path, **kw: object) -> TrainConfig:
    values = {"model_overrides": TINY, "epochs": 2, "batch_size": 64, "out_dir": str(tmp_path / "run"), "amp": "none"}
    return TrainConfig(**(values | kw))  # type: ignore[arg-type]


def test_bad_data_fails_before_training(tmp_path: Path) -> None:
    with pytest.raises(DataError, match="does not exist"):
        train(_cfg(tmp_path, data="folder", data_dir=str(tmp_path / "missing")))
    assert not (tmp_path / "run").exists()  # no empty run folder left behind
    out = tmp_path / "runs" / "a" / "b"  # nor the parents it made
    with pytest.raises(DataError, match="does not exist"):
        train(_cfg(tmp_path, data="folder", data_dir=str(tmp_path / "missing"), out_dir=str(out)))
    assert sorted(p.name for p in tmp_path.iterdir()) == []
    (tmp_path / "kept").mkdir()  # a folder that was there before stays
    with pytest.raises(DataError, match="does not exist"):
        train(_cfg(tmp_path, data="folder", data_dir=str(tmp_path / "missing"), out_dir=str(tmp_path / "kept")))
    assert (tmp_path / "kept").is_dir()
    with pytest.raises(DataError, match="does not exist"):  # nor one reached through a '..' after a new folder
        train(_cfg(tmp_path, data="folder", data_dir=str(tmp_path / "missing"), out_dir=str(tmp_path / "new/../kept")))
    assert (tmp_path / "kept").is_dir()


def test_nan_loss_stops_with_last_good_checkpoint(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from gcvit.train import loop

    cfg = _cfg(tmp_path, epochs=1)
    train(cfg)
    good = ckpt.read_weights(tmp_path / "run" / "last")
    monkeypatch.setattr(loop, "_soft_cross_entropy", lambda logits, targets: logits.sum() * float("nan"))
    with pytest.raises(loop.NonFiniteLossError, match="last good epoch"):
        train(_cfg(tmp_path, epochs=2), resume=tmp_path / "run")
    after = ckpt.read_weights(tmp_path / "run" / "last")
    assert all(torch.equal(good[k], after[k]) for k in good)
    with pytest.raises(loop.NonFiniteLossError, match="no epoch had finished, so no checkpoint was written"):
        train(_cfg(tmp_path, out_dir=str(tmp_path / "fresh")))
    assert not (tmp_path / "fresh" / "last").exists()


def test_weights_gone_nan_on_an_epochs_last_step_are_never_saved(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A step whose gradients are infinite leaves a finite loss behind it; the epoch-end check of the weights stops the
    run before they are checkpointed: last/ keeps epoch 1, and a first epoch writes nothing."""
    from gcvit.train import loop

    train(_cfg(tmp_path, epochs=1, ema=0.9, clip_grad=None))
    good = ckpt.read_weights(tmp_path / "run" / "last")
    step = loop._optimizer_step

    def poisoned(run: loop.Run) -> None:  # the epoch's last step: no later loss sees the damage
        if (run.step + 1) % len(run.train_loader) == 0:
            next(p for p in run.model.parameters() if p.grad is not None).grad.fill_(float("inf"))
        step(run)

    monkeypatch.setattr(loop, "_optimizer_step", poisoned)
    with pytest.raises(
        loop.NonFiniteLossError, match=r"weights became NaN or infinite during epoch 2 .* keeps epoch 1"
    ):
        train(_cfg(tmp_path, epochs=2, ema=0.9, clip_grad=None), resume=tmp_path / "run")
    after = ckpt.read_weights(tmp_path / "run" / "last")
    assert all(torch.equal(good[k], after[k]) for k in good)
    assert ckpt.read_training_state(tmp_path / "run" / "last")["epoch"] == 1
    with pytest.raises(loop.NonFiniteLossError, match="during epoch 1 .* no checkpoint was written"):
        train(_cfg(tmp_path, epochs=1, clip_grad=None, out_dir=str(tmp_path / "fresh")))
    assert not (tmp_path / "fresh" / "last").exists() and not (tmp_path / "fresh" / "best").exists()


def test_fp16_on_the_cpu_is_refused_before_anything_is_read_or_written(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="amp='fp16' needs CUDA; use 'bf16' or 'none' on the CPU"):
        train(_cfg(tmp_path, amp="fp16", device="cpu", data="folder", data_dir=str(tmp_path / "missing")))
    assert not (tmp_path / "run").exists()


def test_a_resume_rewrites_metrics_the_kill_left_an_epoch_behind(tmp_path: Path) -> None:
    """Killed after the last epoch's checkpoint but before its CSV row: the resume, with no epoch left to run, writes
    metrics.csv and the plots from the checkpoint's history."""
    train(_cfg(tmp_path, epochs=2))
    csv_path = tmp_path / "run" / "metrics.csv"
    full = csv_path.read_text()
    csv_path.write_text("".join(full.splitlines(keepends=True)[:2]))  # header and epoch 1
    (tmp_path / "run" / "plots" / "loss.png").unlink()
    result = train(None, resume=tmp_path / "run")
    assert result.epochs_done == 2 and csv_path.read_text() == full
    assert (tmp_path / "run" / "plots" / "loss.png").is_file()


def test_a_data_dir_alone_means_a_folder_and_digits_with_one_is_refused(tmp_path: Path) -> None:
    """A YAML file naming only data_dir used to train on the digits without a word."""
    import yaml

    path = tmp_path / "c.yaml"
    path.write_text(yaml.safe_dump({"data_dir": str(tmp_path)}))
    assert resolve_config(path).data == "folder" and TrainConfig().data == "digits"
    with pytest.raises(ValueError, match="data='digits' .* takes no data_dir, train_dir or val_dir"):
        TrainConfig(data="digits", data_dir=str(tmp_path))


def test_a_resumed_optimizer_stays_fused(tmp_path: Path) -> None:
    """Loading a state dict replaces each param group whole: a checkpoint from the per-tensor optimizer turned fused
    AdamW off again (and broke fp16's GradScaler, which steps a fused optimizer differently)."""
    from gcvit.train.optim import load_optimizer_state, param_groups

    model = gcvit.create_model("gcvit_xxtiny", img_size=32, num_classes=3, **TINY)
    old = torch.optim.AdamW(param_groups(model, 0.05, 0.75), lr=1e-3, foreach=False)
    model(torch.randn(2, 3, 32, 32)).sum().backward()
    old.step()
    new = build_optimizer(model, 1e-3, 0.05, 0.75)
    load_optimizer_state(new, old.state_dict())
    assert all(g["fused"] and g["foreach"] is None for g in new.param_groups)
    assert all(
        torch.equal(new.state[p]["exp_avg"], old.state[p]["exp_avg"]) for p in model.parameters() if p in old.state
    )
    scaler = torch.amp.GradScaler("cpu")  # the step fp16 training takes after clipping
    scaler.scale(model(torch.randn(2, 3, 32, 32)).sum()).backward()
    scaler.unscale_(new)
    scaler.step(new)


def test_a_cuda_index_is_honoured_or_refused(monkeypatch: pytest.MonkeyPatch) -> None:
    """--device cuda:1 in a single process trains on cuda:1 (it went to cuda:LOCAL_RANK, i.e. cuda:0); an index
    the machine lacks, or one that fights torchrun's LOCAL_RANK, is named. CUDA is simulated: two devices."""
    from gcvit.train import distributed as D

    chosen = []
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    monkeypatch.setattr(torch.cuda, "set_device", chosen.append)
    for name in ("WORLD_SIZE", "RANK", "LOCAL_RANK"):
        monkeypatch.delenv(name, raising=False)
    assert D.setup("cuda:1").device == torch.device("cuda", 1) and chosen == [1]
    assert D.setup("cuda").device == torch.device("cuda", 0)
    with pytest.raises(ValueError, match="device 'cuda:5': this machine has 2 CUDA devices"):
        D.setup("cuda:5")
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("LOCAL_RANK", "0")
    with pytest.raises(ValueError, match=r"under torchrun each process trains on cuda:LOCAL_RANK \(here cuda:0\)"):
        D.setup("cuda:1")


def test_cleanup_leaves_a_process_group_the_caller_started(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """train() under a process group of the caller's own (a notebook, another framework) must not destroy it."""
    import torch.distributed as dist

    from gcvit.train import distributed as D

    store = dist.FileStore(str(tmp_path / "store"), 1)
    dist.init_process_group("gloo", store=store, rank=0, world_size=1)
    try:
        monkeypatch.setenv("WORLD_SIZE", "2")  # what torchrun would say; setup finds the group already there
        monkeypatch.setenv("RANK", "0")
        info = D.setup("cpu")
        assert info.distributed and not info.owns_group
        D.cleanup(info)
        assert dist.is_initialized()
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


def test_model_overrides_change_fields_of_the_digits_model() -> None:
    """On the digits, `--model-override embed_dim=48` changes one field of the default digits model, as it does
    with configs/digits.yaml (it used to build the whole named variant instead)."""
    from gcvit.train.build import run_settings

    flags_only = run_settings(resolve_config(None, {"model_overrides": {"embed_dim": 48}}))[0]
    with_file = run_settings(resolve_config("configs/digits.yaml", {"model_overrides": {"embed_dim": 48}}))[0]
    default = run_settings(TrainConfig())[0]  # gcvit_nano: its pools written out, as every variant's
    # the file leaves the pools to be derived at its img_size (null); the flags ask for those of 32 px explicitly
    assert with_file.global_query_pools is None and flags_only.global_query_pools == (1, 0, 0, 0)
    assert flags_only == dataclasses.replace(with_file, global_query_pools=with_file.pools)
    assert flags_only == dataclasses.replace(default, embed_dim=48)


def test_digits_quick_run_reaches_95(tmp_path: Path) -> None:
    """The CI-sized digits run: the default small model, a short schedule, >= 95% val top-1."""
    cfg = TrainConfig(epochs=12, out_dir=str(tmp_path / "run"), ema=0.99)
    result = train(cfg)
    assert result.best_top1 >= 95.0, result.history
    run = tmp_path / "run"
    for name in ("last", "best"):
        assert {p.name for p in (run / name).iterdir()} == {
            "model.safetensors",
            "ema.safetensors",
            "config.json",
            "state.pt",
            "SHA256SUMS",
        }
    rows = list(csv.DictReader((run / "metrics.csv").open()))
    assert [int(r["epoch"]) for r in rows] == list(range(1, 13))
    assert set(rows[0]) == {"epoch", "train_loss", "val_loss", "val_top1", "val_top5", "ema_top1", "lr", "epoch_time"}
    assert (run / "plots" / "loss.png").is_file() and (run / "plots" / "accuracy.png").is_file()
    assert resolve_config(run / "config.yaml") == cfg
    config = json.loads((run / "best" / "config.json").read_text())
    assert config["classes"] == [str(d) for d in range(10)] and config["img_size"] == [32, 32]

    model = gcvit.load(run)
    assert model.classes[3] == "3" and not model.training
    report = evaluate(run / "best", "digits", out_dir=tmp_path / "eval")
    assert report.top1 == pytest.approx(result.best_top1)
    assert report.confusion.sum() == 360 and report.confusion_png and report.confusion_png.is_file()
    assert set(report.per_class) == set(model.classes)

    from gcvit.data import DigitsDataset

    val = DigitsDataset("val", 32)
    (tmp_path / "images").mkdir()
    files = []
    for i in range(4):
        val[i][0].save(tmp_path / "images" / f"{i}.png")
        files.append(tmp_path / "images" / f"{i}.png")
    out = predict([tmp_path / "images"], run / "best" / "ema.safetensors", topk=3)
    assert [Path(f).name for f, _ in out] == [f.name for f in files]
    assert all(len(top) == 3 and top[0][1] >= top[1][1] for _, top in out)
    assert sum(top[0][0] == str(val.targets[i]) for i, (_, top) in enumerate(out)) >= 3


def test_crash_between_last_and_best_writes_keeps_best_in_step(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A crash after one of an epoch's two checkpoints (last/, best/) is written and before the other: the resumed run
    still ends with best/ holding the best epoch's weights, as an uninterrupted run does."""
    full = train(_cfg(tmp_path / "a"))
    metric = [row["ema_top1"] for row in full.history]
    assert metric[1] > metric[0]  # epoch 2 is the best: both checkpoints are written after it

    class Crash(Exception):
        pass

    real, calls = ckpt.write_checkpoint, []

    def crash_on_second_write_of_epoch_2(*args: object, **kw: object) -> Path:
        calls.append(args[1])
        if args[4]["epoch"] == 2 and len(calls) == 4:  # type: ignore[index]
            raise Crash
        return real(*args, **kw)  # type: ignore[arg-type]

    monkeypatch.setattr(ckpt, "write_checkpoint", crash_on_second_write_of_epoch_2)
    with pytest.raises(Crash):
        train(_cfg(tmp_path / "b"))
    assert sorted(calls[2:]) == ["best", "last"]
    monkeypatch.setattr(ckpt, "write_checkpoint", real)
    resumed = train(_cfg(tmp_path / "b"), resume=tmp_path / "b" / "run")
    assert resumed.best_top1 == full.best_top1
    _same_weights(tmp_path / "a" / "run" / "last", tmp_path / "b" / "run" / "last")
    _same_weights(tmp_path / "a" / "run" / "best", tmp_path / "b" / "run" / "best")


# ---------------------------------------------------------------- resume after SIGKILL


def _cli_args(run_dir: Path, *extra: str) -> list[str]:
    return [
        sys.executable,
        "-m",
        "gcvit.cli",
        "train",
        "--out-dir",
        str(run_dir),
        "--epochs",
        "3",
        "--batch-size",
        "64",
        *TINY_FLAGS,
        "--ema",
        "0.9",
        "--mixup",
        "0.2",
        "--drop-path",
        "0.1",
        "--randaugment",
        "rand-m5",
        "--no-progress",
        "--threads",
        "1",  # robust timing on a busy machine
        *extra,
    ]


def _cli(run_dir: Path, *extra: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    args = _cli_args(run_dir, *extra)
    return subprocess.run(args, env={**os.environ, **(env or {})}, capture_output=True, text=True, timeout=600)


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory: pytest.TempPathFactory) -> Path:
    run = tmp_path_factory.mktemp("uninterrupted") / "run"
    done = _cli(run)
    assert done.returncode == 0, done.stderr
    return run


def _same_weights(a: Path, b: Path) -> None:
    for name in ("model.safetensors", "ema.safetensors"):
        wa, wb = gcvit.models.weights.read_state_dict(a / name), gcvit.models.weights.read_state_dict(b / name)
        assert wa.keys() == wb.keys()
        assert all(torch.equal(wa[k], wb[k]) for k in wa), f"{name} differs"


@pytest.mark.parametrize("point", ["swap", pytest.param("write", marks=pytest.mark.slow)])
def test_resume_after_sigkill_mid_checkpoint_is_bit_identical(uninterrupted: Path, tmp_path: Path, point: str) -> None:
    run = tmp_path / "run"
    killed = _cli(run, env={"GCVIT_TEST_KILL_AT": f"{point}:2"})
    assert killed.returncode == -9, killed.stderr
    assert not (run / "last").exists() if point == "swap" else (run / "last").exists()
    resumed = _cli(run, "--resume", str(run))
    assert resumed.returncode == 0, resumed.stderr
    assert "resumed from" in resumed.stderr
    _same_weights(uninterrupted / "last", run / "last")
    assert sorted(p.name for p in run.iterdir() if p.name.startswith(("last", "best"))) == ["best", "last"]


@pytest.mark.slow
def test_resume_with_workers_is_bit_identical(tmp_path: Path) -> None:
    a, b = tmp_path / "a", tmp_path / "b"
    assert _cli(a, "--num-workers", "2").returncode == 0
    assert _cli(b, "--num-workers", "2", env={"GCVIT_TEST_KILL_AT": "write:1"}).returncode == -9
    assert _cli(b, "--num-workers", "2", "--resume", str(b)).returncode == 0
    _same_weights(a / "last", b / "last")


def _kill_when(run_dir: Path, ready: Callable[[], bool], delay: float, *extra: str) -> tuple[int, str]:
    """Start `gcvit train` on run_dir, wait until ready() holds, sleep `delay` seconds, SIGKILL it.

    Returns (returncode, stderr); the caller asserts -9, i.e. that the process was still running when killed."""
    log = run_dir.parent / f"{run_dir.name}.stderr"
    with log.open("w") as err:
        proc = subprocess.Popen(_cli_args(run_dir, *extra), stdout=subprocess.DEVNULL, stderr=err, text=True)
        try:
            deadline = time.monotonic() + 600
            while not ready() and proc.poll() is None and time.monotonic() < deadline:
                time.sleep(0.02)
            time.sleep(delay)
            proc.send_signal(signal.SIGKILL)
        finally:
            proc.wait(timeout=60)
    return proc.returncode, log.read_text()


def _history(run_dir: Path) -> list[tuple[str, ...]]:
    """metrics.csv without the timing column: the same in every run that did the same steps."""
    rows = csv.DictReader((run_dir / "metrics.csv").open())
    return [tuple(v for k, v in row.items() if k != "epoch_time") for row in rows]


@pytest.mark.slow
def test_three_random_sigkills_then_resume_is_bit_identical(uninterrupted: Path, tmp_path: Path) -> None:
    """One 3-epoch run, SIGKILLed three times and resumed with --resume RUN each time, ends on the uninterrupted
    run's weights bit for bit: (1) at a random moment before the first checkpoint (the resume starts from scratch),
    (2) at a random moment of epoch 2, (3) inside a checkpoint write of a random later epoch (GCVIT_TEST_KILL_AT)."""
    rng = random.Random(1234)
    times = [float(r["epoch_time"]) for r in csv.DictReader((uninterrupted / "metrics.csv").open())]
    epoch_s = min(times)  # training time of one epoch (validation and checkpoint come on top)
    run = tmp_path / "run"
    resume = ("--resume", str(run))

    # 1: the model is built once config.yaml is written; kill within the first third of epoch 1's training
    delay = rng.uniform(0.0, 0.3) * epoch_s
    code, err = _kill_when(run, (run / "config.yaml").is_file, delay)
    assert code == -9, f"kill 1 (+{delay:.2f}s) found the process gone: rc {code}\n{err}"
    assert (run / "config.yaml").is_file() and ckpt.find_checkpoint(run) is None, f"kill 1 after a checkpoint\n{err}"

    # 2: resumed (no checkpoint: from scratch); kill after epoch 1's checkpoint plus a random share of epoch 2
    delay = rng.uniform(0.1, 0.9) * epoch_s
    code, err = _kill_when(run, (run / "last").is_dir, delay, *resume)
    assert code == -9, f"kill 2 (+{delay:.2f}s) found the process gone: rc {code}\n{err}"
    assert "no complete checkpoint" in err and "starting from scratch" in err, err
    found = ckpt.find_checkpoint(run)
    assert found is not None
    epoch = ckpt.read_training_state(found)["epoch"]
    assert 1 <= epoch < 3, epoch

    # 3: resumed; SIGKILL inside the write of a later epoch's checkpoint
    at = rng.randint(epoch + 1, 3)
    killed = _cli(run, *resume, env={"GCVIT_TEST_KILL_AT": f"write:{at}"})
    assert killed.returncode == -9, killed.stderr
    assert f"resumed from {run / 'last'} after epoch {epoch} " in killed.stderr, killed.stderr
    assert list(run.glob("last.tmp-*")), "the kill did not land inside the checkpoint write"
    assert ckpt.read_training_state(run / "last")["epoch"] == at - 1

    done = _cli(run, *resume)
    assert done.returncode == 0, done.stderr
    assert f"resumed from {run / 'last'} after epoch {at - 1} " in done.stderr, done.stderr
    _same_weights(uninterrupted / "last", run / "last")
    _same_weights(uninterrupted / "best", run / "best")
    assert _history(run) == _history(uninterrupted)
    assert sorted(p.name for p in run.iterdir() if p.name.startswith(("last", "best"))) == ["best", "last"]


# ---------------------------------------------------------------- image folders, fine-tuning, predict

SHAPES = ("circle", "square", "triangle")
BAD_FILES = ("square/truncated.jpg", "triangle/notes.png", "triangle/empty.png")


@pytest.fixture(scope="module")
def shapes(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """3 classes x 12 drawn 32x32 shapes (random colours, sizes, positions), plus three unreadable files: a truncated
    JPEG, a text file named .png and an empty .png."""
    from PIL import Image, ImageDraw

    root = tmp_path_factory.mktemp("shapes")
    rng = random.Random(0)
    for name in SHAPES:
        (root / name).mkdir()
        for i in range(12):
            bg = tuple(rng.randrange(0, 100) for _ in range(3))
            fg = tuple(rng.randrange(150, 256) for _ in range(3))
            image = Image.new("RGB", (32, 32), bg)
            draw = ImageDraw.Draw(image)
            r = rng.randint(7, 12)
            cx, cy = rng.randint(r + 1, 31 - r), rng.randint(r + 1, 31 - r)
            if name == "circle":
                draw.ellipse((cx - r, cy - r, cx + r, cy + r), fill=fg)
            elif name == "square":
                draw.rectangle((cx - r, cy - r, cx + r, cy + r), fill=fg)
            else:
                draw.polygon([(cx, cy - r), (cx - r, cy + r), (cx + r, cy + r)], fill=fg)
            image.save(root / name / f"{i:02d}.{'jpg' if i % 3 == 0 else 'png'}", quality=95)
    whole = root / "whole.jpg"
    Image.effect_noise((64, 64), 60).convert("RGB").save(whole, quality=95)
    data = whole.read_bytes()
    whole.unlink()
    (root / BAD_FILES[0]).write_bytes(data[: len(data) // 2])
    (root / BAD_FILES[1]).write_text("not an image, just text with a .png name\n")
    (root / BAD_FILES[2]).write_bytes(b"")
    return root


def test_image_folder_with_bad_files_trains_and_names_them(shapes: Path, tmp_path: Path) -> None:
    run = tmp_path / "run"
    done = _cli(run, "--data-dir", str(shapes), "--batch-size", "8", "--epochs", "2")
    assert done.returncode == 0, done.stderr
    assert "skipped 3 unreadable image files" in done.stderr, done.stderr
    for name in BAD_FILES:
        assert str(shapes / name) in done.stderr, name
    assert "done: 2 epochs" in done.stdout
    assert ckpt.read_training_state(run / "last")["epoch"] == 2
    assert read_config(run / "last")["classes"] == list(SHAPES)

    strict = tmp_path / "strict"
    stopped = _cli(strict, "--data-dir", str(shapes), "--batch-size", "8", "--epochs", "2", "--strict-data")
    assert stopped.returncode == 2, stopped.stderr
    assert "gcvit: error:" in stopped.stderr and "3 of 39 image files cannot be read" in stopped.stderr
    for name in BAD_FILES:
        assert str(shapes / name) in stopped.stderr, name
    assert not (strict / "last").exists() and not list(strict.glob("last*"))
    assert "epoch 1/2" not in stopped.stderr


def _gcvit(*args: str) -> subprocess.CompletedProcess[str]:
    cmd = [sys.executable, "-m", "gcvit.cli", *args]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=600)


def _predictions(stdout: str) -> list[tuple[str, list[tuple[str, float]]]]:
    """`gcvit predict` lines: FILE  label:p  label:p ..."""
    out = []
    for line in stdout.splitlines():
        file, *pairs = line.split("  ")
        out.append((file, [(label, float(p)) for label, p in (pair.rsplit(":", 1) for pair in pairs)]))
    return out


def test_fine_tune_digits_run_on_three_classes_then_eval_and_predict(
    uninterrupted: Path, shapes: Path, tmp_path: Path
) -> None:
    """One command fine-tunes a 10-class digits checkpoint on a 3-class folder; eval and predict take the new run."""
    pretrained = uninterrupted / "best" / "model.safetensors"
    run = tmp_path / "finetune"
    done = _cli(run, "--pretrained", str(pretrained), "--data-dir", str(shapes), "--batch-size", "8", "--epochs", "1")
    assert done.returncode == 0, done.stderr
    assert "done: 1 epochs" in done.stdout
    config = read_config(run / "best")
    assert config["classes"] == list(SHAPES) and config["num_classes"] == 3
    new, old = ckpt.read_weights(run / "last"), ckpt.read_weights(uninterrupted / "best")
    assert new["head.weight"].shape[0] == 3 and old["head.weight"].shape[0] == 10
    assert new["head.bias"].shape == (3,)
    assert new.keys() == old.keys()
    # the backbone starts from the digits weights: 3 small warm-up steps move it far less than digits training did
    arch = read_config(uninterrupted / "best")["config"]
    torch.manual_seed(0)  # the digits run's initial weights (seed 0)
    fresh = gcvit.create_model("gcvit_xxtiny", **arch).state_dict()
    backbone = [k for k in new if not k.startswith("head.")]
    moved = max((new[k] - old[k]).abs().max().item() for k in backbone)
    trained = max((old[k] - fresh[k]).abs().max().item() for k in backbone)
    assert moved < 0.01 < trained, (moved, trained)

    own = _gcvit("eval", str(run))  # no --data: the run's own seeded validation split, as trained
    assert own.returncode == 0, own.stderr
    assert 0 < int(own.stdout.split()[0]) < 33  # of the 33 readable shapes

    # the same folder under --data with a split asked for: the run's own split, not all 36 images
    split = _gcvit("eval", str(run), "--data", str(shapes), "--val-fraction", "0.2", "--seed", "0")
    assert split.returncode == 0, split.stderr
    assert split.stdout.splitlines()[0] == own.stdout.splitlines()[0]

    evaluated = _gcvit("eval", str(run), "--data", str(shapes))
    assert evaluated.returncode == 0, evaluated.stderr
    lines = evaluated.stdout.splitlines()
    assert re.fullmatch(r"36 images: top-1 \d+\.\d\d%", lines[0]), lines[0]  # 3 classes: no top-5
    assert [line.split()[0] for line in lines[1:4]] == list(SHAPES)
    assert "skipped 3 unreadable image files" in evaluated.stderr

    predicted = _gcvit("predict", str(shapes / "circle"), "--model", str(run))
    assert predicted.returncode == 0, predicted.stderr
    out = _predictions(predicted.stdout)
    assert sorted(Path(f).name for f, _ in out) == sorted(p.name for p in (shapes / "circle").iterdir())
    for _, top in out:
        assert sorted(label for label, _ in top) == list(SHAPES)
        assert top[0][1] >= top[1][1] >= top[2][1] and sum(p for _, p in top) == pytest.approx(1, abs=0.01)


def test_digits_command_then_predict_with_run(uninterrupted: Path, tmp_path: Path) -> None:
    folder = tmp_path / "digits"
    wrote = _gcvit("digits", "--out", str(folder), "--count", "5")
    assert wrote.returncode == 0, wrote.stderr
    assert f"wrote 5 held-out digits to {folder}" in wrote.stdout
    files = sorted(folder.iterdir())
    assert len(files) == 5 and all(f.suffix == ".png" for f in files)

    predicted = _gcvit("predict", str(folder), "--model", str(uninterrupted))
    assert predicted.returncode == 0, predicted.stderr
    out = _predictions(predicted.stdout)
    assert [Path(f) for f, _ in out] == files
    digits = [str(d) for d in range(10)]
    for _, top in out:
        assert len(top) == 5 and len({label for label, _ in top}) == 5 and all(label in digits for label, _ in top)
        assert all(a[1] >= b[1] for a, b in itertools.pairwise(top))
    correct = sum(top[0][0] == Path(f).stem.rsplit("_", 1)[1] for f, top in out)
    assert correct >= 3, predicted.stdout


# ---------------------------------------------------------------- distributed


def _torchrun(run_dir: Path, nproc: int) -> subprocess.CompletedProcess[str]:
    args = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        f"--nproc-per-node={nproc}",
        "-m",
        "gcvit.cli",
        "train",
        "--out-dir",
        str(run_dir),
        "--epochs",
        "2",
        "--batch-size",
        "64",
        *TINY_FLAGS,
        "--drop-path",
        "0",
        "--amp",
        "none",
        "--no-progress",
        "--device",
        "cpu",
    ]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    return subprocess.run(args, env=env, capture_output=True, text=True, timeout=600)


@pytest.mark.slow
def test_two_process_ddp_matches_one_process(tmp_path: Path) -> None:
    one, two = _torchrun(tmp_path / "one", 1), _torchrun(tmp_path / "two", 2)
    assert one.returncode == 0, one.stderr
    assert two.returncode == 0, two.stderr
    assert two.stdout.count("done: 2 epochs") == 1, two.stdout  # the first process reports, as it logs
    wa = ckpt.read_weights(tmp_path / "one" / "last")
    wb = ckpt.read_weights(tmp_path / "two" / "last")
    worst = max((wa[k].float() - wb[k].float()).abs().max().item() for k in wa)
    assert worst < 1e-5, worst


# ---------------------------------------------------------------- command line


def test_cli_parses_every_config_field() -> None:
    from gcvit.cli.train import _overrides, add_subcommands

    parser = argparse.ArgumentParser()
    add_subcommands(parser.add_subparsers(dest="command"))
    args = parser.parse_args(
        [
            "train",
            "--ema",
            "none",
            "--layer-decay",
            "0.75",
            "--data-dir",
            "x",
            "--strict-data",
            "--model-override",
            "depths=[1,1,2,1]",
            "--pretrained",
            "true",
            "--amp",
            "fp16",
        ]
    )
    given = _overrides(args)
    assert given == {
        "ema": None,  # 'none' given: turned off, not dropped
        "layer_decay": 0.75,
        "data_dir": "x",
        "data": "folder",
        "strict_data": True,
        "model_overrides": {"depths": [1, 1, 2, 1]},
        "pretrained": True,
        "amp": "fp16",
    }
    assert _overrides(parser.parse_args(["train", "--no-strict-data"])) == {"strict_data": False}  # over a YAML true
    args = parser.parse_args(["predict", "a.png", "--model", "runs/x", "--topk", "3"])
    assert args.topk == 3 and args.inputs == ["a.png"]


@pytest.mark.parametrize(
    ("values", "message"),
    [
        ({"lr": "1e-3"}, None),  # PyYAML reads 1e-3 as a string: it is a number all the same
        ({"epochs": "1"}, r"epochs must be int; got '1' \(str\)"),
        ({"epochs": 1.5}, r"epochs must be int; got 1.5 \(float\)"),
        ({"model_overrides": [1, 2]}, r"model_overrides must be dict\[str, Any\] or None; got \[1, 2\]"),
        ({"clip_grad": 0}, r"clip_grad must be > 0 or None, got 0.0"),
        ({"warmup_lr": -1}, r"warmup_lr must be >= 0, got -1.0"),
        ({"num_classes": 0}, r"num_classes must be >= 2 or None"),
        ({"crop_scale": 2}, r"crop_scale must be in \(0, 1\], got 2.0"),
        ({"device": "tpu"}, r"device must be cpu or cuda\[:N\], got 'tpu'"),
    ],
)
def test_config_values_are_typed_and_checked(tmp_path: Path, values: dict, message: str | None) -> None:
    import yaml

    path = tmp_path / "c.yaml"
    path.write_text(yaml.safe_dump(values))
    if message is None:
        assert resolve_config(path).lr == pytest.approx(1e-3)
    else:
        with pytest.raises(ValueError, match=message):
            resolve_config(path)


def test_malformed_yaml_names_the_file(tmp_path: Path) -> None:
    path = tmp_path / "bad.yaml"
    path.write_text("epochs: [1\n")
    with pytest.raises(ValueError, match=r"bad.yaml is not valid YAML"):
        resolve_config(path)


def test_sixteen_bit_images_keep_their_tones(tmp_path: Path) -> None:
    """PIL clips 16-bit values when converting to RGB; they are scaled instead."""
    import numpy as np
    from PIL import Image

    from gcvit.data import load_rgb

    ramp = np.tile(np.linspace(0, 65535, 8).astype(np.uint16), (4, 1))
    Image.fromarray(ramp).save(tmp_path / "g16.png")
    row = np.asarray(load_rgb(tmp_path / "g16.png"))[0, :, 0]
    assert row.tolist() == [0, 36, 73, 109, 146, 182, 219, 255]


def test_exif_rotated_photos_are_read_upright(tmp_path: Path) -> None:
    """A photo stored sideways with EXIF orientation 6 (as phones save them) is read as it is shown: upright."""
    import numpy as np
    from PIL import Image

    from gcvit.data import load_rgb

    upright = np.zeros((30, 10, 3), np.uint8)
    upright[:5] = 255  # a white band at the top
    stored = Image.fromarray(upright).transpose(Image.Transpose.ROTATE_90)  # (10, 30) on disk; shown turned back
    exif = Image.Exif()
    exif[0x0112] = 6  # Orientation: rotate 90 degrees clockwise to display
    stored.save(tmp_path / "phone.jpg", exif=exif, quality=95)
    image = np.asarray(load_rgb(tmp_path / "phone.jpg"))
    assert image.shape == (30, 10, 3) and image[:5].mean() > 200 and image[10:].mean() < 50


def test_resume_refuses_a_missing_run_and_changed_settings(uninterrupted: Path, tmp_path: Path) -> None:
    missing = _gcvit("train", "--resume", str(tmp_path / "typo"))
    assert missing.returncode == 2 and "expected a run folder holding config.yaml" in missing.stderr
    changed = _gcvit("train", "--resume", str(uninterrupted), "--epochs", "4", "--lr", "1e-4", "--no-progress")
    assert changed.returncode == 2
    assert "lr (0.002 -> 0.0001)" in changed.stderr and "start a new run from its weights" in changed.stderr
    moved = _gcvit("train", "--resume", str(uninterrupted), "--epochs", "4", "--out-dir", str(tmp_path / "elsewhere"))
    assert moved.returncode == 2 and "--out-dir does not apply to --resume" in moved.stderr


def test_resume_refuses_other_classes(shapes: Path, tmp_path: Path) -> None:
    """A class folder added or renamed since the run started is named; the head's outputs keep their classes."""
    data = tmp_path / "data"
    for name in SHAPES:
        shutil.copytree(shapes / name, data / name)
    cfg = _cfg(tmp_path, epochs=1, ema=None, data="folder", data_dir=str(data), batch_size=8, model_overrides=TINY)
    train(cfg)
    os.rename(data / SHAPES[2], data / "zebra")
    renamed = sorted([*SHAPES[:2], "zebra"])
    with pytest.raises(
        ValueError, match=re.escape(f"trained on the classes {sorted(SHAPES)}; the data now has {renamed}")
    ):
        train(dataclasses.replace(cfg, epochs=2), resume=tmp_path / "run")
    shutil.copytree(shapes / SHAPES[2], data / SHAPES[2])
    with pytest.raises(ValueError, match=r"the data now has \[.*'zebra'\]\. A resumed run keeps its classes"):
        train(dataclasses.replace(cfg, epochs=2), resume=tmp_path / "run")


def test_resume_accepts_the_same_model_spelled_out(tmp_path: Path) -> None:
    """A default digits run (model_overrides None: the digits model) resumes with configs/digits.yaml, which spells
    that model out; an override that changes the architecture is still refused."""
    run = tmp_path / "run"
    train(TrainConfig(epochs=1, out_dir=str(run)))
    other = TrainConfig(epochs=2, out_dir=str(run), model_overrides={"mlp_ratio": 3.0})
    with pytest.raises(ValueError, match=r"model_overrides \(None -> \{'mlp_ratio': 3.0\}\)"):
        train(other, resume=run)
    family = TrainConfig(epochs=2, out_dir=str(run), model="swin_tiny")  # checked before a Swin is built
    with pytest.raises(ValueError, match=r"model \('gcvit_nano' -> 'swin_tiny'\)"):
        train(family, resume=run)
    resumed = _gcvit("train", "--resume", str(run), "--config", "configs/digits.yaml", "--epochs", "2", "--no-progress")
    assert resumed.returncode == 0, resumed.stderr
    assert f"resumed from {run / 'last'} after epoch 1" in resumed.stderr


def test_resume_without_a_complete_last_checkpoint_spares_best(tmp_path: Path) -> None:
    """A run whose last/ (or last/state.pt) is gone is refused rather than started over on top of its best/; after
    a crash inside the first epoch's checkpoint (best/ holds epoch 1, no last/) it starts over as before."""
    train(_cfg(tmp_path, epochs=2, ema=None))
    run = tmp_path / "run"
    (run / "last" / "state.pt").unlink()
    best = (run / "best" / "model.safetensors").read_bytes()
    with pytest.raises(ValueError, match=r"has no complete last/ checkpoint .* holds epoch 2: starting over would"):
        train(_cfg(tmp_path, epochs=3, ema=None), resume=run)
    assert (run / "best" / "model.safetensors").read_bytes() == best
    first = tmp_path / "first"
    train(_cfg(tmp_path, epochs=1, ema=None, out_dir=str(first / "run")))
    shutil.rmtree(first / "run" / "last")
    assert train(_cfg(tmp_path, epochs=1, ema=None), resume=first / "run").epochs_done == 1


def test_resume_does_not_read_the_pretrained_source_again(tmp_path: Path) -> None:
    """A fine-tuning run resumes from its own checkpoint after its --pretrained file is deleted or replaced."""
    train(_cfg(tmp_path, epochs=1, ema=None, out_dir=str(tmp_path / "source")))
    weights = tmp_path / "weights"
    shutil.copytree(tmp_path / "source" / "last", weights)
    cfg = _cfg(tmp_path, epochs=1, ema=None, model_overrides=None, pretrained=str(weights / "model.safetensors"))
    train(cfg)
    shutil.rmtree(weights)
    resumed = train(dataclasses.replace(cfg, epochs=2), resume=tmp_path / "run")
    assert resumed.epochs_done == 2


def test_an_optimizer_state_of_other_parameter_groups_is_named_on_resume(tmp_path: Path) -> None:
    """Runs whose optimizer groups differ from this version's (Swin/ViT with --layer-decay before they got one lr
    level per block) are refused with a reason and a way on, not torch's bare message."""
    run = tmp_path / "run"
    train(_cfg(tmp_path, epochs=1, ema=None, batch_size=256))
    state = torch.load(run / "last" / "state.pt", weights_only=False)
    state["optimizer"]["param_groups"] = state["optimizer"]["param_groups"][:-1]
    torch.save(state, run / "last" / "state.pt")
    with pytest.raises(ValueError, match="optimizer state does not fit .* Start a new run from its weights"):
        train(_cfg(tmp_path, epochs=2, ema=None, batch_size=256), resume=run)


def test_a_resumed_run_keeps_what_its_saved_config_lacks_at_the_default() -> None:
    """A run saved before cooldown_epochs existed resumes without the official recipe's 10 cooldown epochs."""
    old = {k: v for k, v in TrainConfig(recipe="official", lr=1e-4, min_lr=0, warmup_lr=0).to_dict().items()}
    del old["cooldown_epochs"]
    assert resolve_config(None, {}, base=old).cooldown_epochs == 0
    assert resolve_config(None, {"recipe": "official"}).cooldown_epochs == 10


def test_unusable_class_counts_and_batches_fail_before_training(shapes: Path, tmp_path: Path) -> None:
    one = tmp_path / "one"
    (one / "circle").mkdir(parents=True)
    for f in (shapes / "circle").glob("*.png"):
        (one / "circle" / f.name).write_bytes(f.read_bytes())
    base = {"data": "folder", "epochs": 1, "amp": "none", "out_dir": str(tmp_path / "run")}
    with pytest.raises(DataError, match="at least 2 classes"):
        train(TrainConfig(**base, data_dir=str(one), batch_size=4), progress=False)
    with pytest.raises(ValueError, match=r"num_classes=5 but the data has 3 classes"):
        train(TrainConfig(**base, data_dir=str(shapes), batch_size=4, num_classes=5), progress=False)
    with pytest.raises(DataError, match="make no optimizer step of batch_size 64"):
        train(TrainConfig(**base, data_dir=str(shapes), batch_size=64, grad_accum=8), progress=False)


def test_predict_refuses_bad_topk_and_folders_without_images(uninterrupted: Path, tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="expected topk of at least 1; got 0"):
        predict([tmp_path], uninterrupted, topk=0)
    for size in (0, -1):  # -1 used to claim the folder held no readable images, 0 failed inside range()
        with pytest.raises(ValueError, match=f"expected batch_size of at least 1; got {size}"):
            predict([tmp_path], uninterrupted, batch_size=size)
    with pytest.raises(ValueError, match="no readable images in"):
        predict([tmp_path], uninterrupted)


def test_eval_checks_its_settings_before_reading_any_image(tmp_path: Path) -> None:
    """A bad batch size or split share is named first: before the model is loaded and every image decoded (hours
    on ImageNet), not after."""
    missing = tmp_path / "no_such_run"
    with pytest.raises(ValueError, match="expected batch_size of at least 1; got 0"):
        evaluate(missing, "digits", batch_size=0)
    with pytest.raises(ValueError, match=r"val_fraction must be in \(0, 1\), got 1.5"):
        evaluate(missing, tmp_path, split=True, val_fraction=1.5)
    with pytest.raises(ValueError, match=r"val_fraction must be in \(0, 1\), got 1.5"):
        split_image_folder(missing, 1.5)


def test_predict_lists_a_folder_as_training_does(uninterrupted: Path, tmp_path: Path) -> None:
    """Linked folders are followed; hidden files and folders (.ipynb_checkpoints, macOS ._ files) are skipped."""
    from PIL import Image

    real = tmp_path / "real"
    (real / ".ipynb_checkpoints").mkdir(parents=True)
    for i in range(2):
        Image.new("RGB", (8, 8), (40 * i, 0, 0)).save(real / f"d{i}.png")
    Image.new("RGB", (8, 8)).save(real / ".ipynb_checkpoints" / "d0-checkpoint.png")
    (real / "._d0.png").write_bytes(b"\x00\x05\x16\x07 AppleDouble")
    given = tmp_path / "given"
    given.mkdir()
    (given / "linked").symlink_to(real, target_is_directory=True)
    (given / "one.png").symlink_to(real / "d0.png")
    names = sorted(str(Path(path).relative_to(given)) for path, _ in predict([given], uninterrupted))
    assert names == ["linked/d0.png", "linked/d1.png", "one.png"]


def test_a_folder_run_resumes_from_another_working_directory(shapes: Path, tmp_path: Path) -> None:
    """config.yaml keeps absolute data paths: resuming elsewhere reads the same images, not a namesake folder."""
    (tmp_path / "shapes").symlink_to(shapes)
    args = [sys.executable, "-m", "gcvit.cli", "train", "--data-dir", "shapes", "--batch-size", "8", "--no-progress"]
    first = subprocess.run([*args, "--epochs", "1", "--out-dir", "run"], cwd=tmp_path, capture_output=True, text=True)
    assert first.returncode == 0, first.stderr
    elsewhere = tmp_path / "elsewhere"
    (elsewhere / "shapes" / "circle").mkdir(parents=True)  # a namesake folder that must not be read
    resume = [sys.executable, "-m", "gcvit.cli", "train", "--resume", str(tmp_path / "run"), "--epochs", "2"]
    second = subprocess.run([*resume, "--no-progress"], cwd=elsewhere, capture_output=True, text=True)
    assert second.returncode == 0, second.stderr
    assert "done: 2 epochs" in second.stdout


def test_damaged_run_files_and_a_missing_gpu_are_named(uninterrupted: Path, tmp_path: Path) -> None:

    run = tmp_path / "run"
    shutil.copytree(uninterrupted, run)
    (run / "last" / "state.pt").write_bytes((run / "last" / "state.pt").read_bytes()[:1000])
    resumed = _gcvit("train", "--resume", str(run), "--epochs", "4", "--no-progress")
    assert resumed.returncode == 2 and "state.pt is damaged and cannot be read" in resumed.stderr
    (run / "best" / "config.json").write_text('{"model": "gcvit_xxtiny",\n')
    with pytest.raises(ValueError, match=r"best/config.json is not valid JSON"):
        read_config(run / "best")
    (run / "best" / "config.json").write_text("[1, 2]")
    with pytest.raises(ValueError, match=r"best/config.json: expected a JSON object with the model's name"):
        read_config(run / "best")
    torch.save([1, 2], run / "last" / "state.pt")
    with pytest.raises(ValueError, match=r"last/state.pt holds a list; expected the training state"):
        ckpt.read_training_state(run / "last")
    state = ckpt.read_training_state(uninterrupted / "last")
    del state["optimizer"]
    torch.save(state, run / "last" / "state.pt")
    with pytest.raises(ValueError, match=r"last/state.pt lacks \['optimizer'\]; expected the training state"):
        ckpt.read_training_state(run / "last")
    if not torch.cuda.is_available():
        with pytest.raises(ValueError, match="no CUDA device is available here"):
            predict([tmp_path], uninterrupted, device="cuda")


def test_a_flipped_byte_in_a_checkpoint_is_found_on_resume(uninterrupted: Path, tmp_path: Path) -> None:
    """Truncation is caught by the readers; one changed byte in the tensors is not. state.pt records the weights'
    SHA-256, and its own zip entries carry CRC-32s that torch.load skips: both are checked on resume."""

    def flip(path: Path, at: int) -> None:
        data = bytearray(path.read_bytes())
        data[at] ^= 0x10
        path.write_bytes(bytes(data))

    run = tmp_path / "run"
    shutil.copytree(uninterrupted, run)
    weights = run / "last" / "model.safetensors"
    flip(weights, weights.stat().st_size - 100)  # in the last tensor's data
    with pytest.raises(ValueError, match=r"last/model.safetensors is damaged: its SHA-256 differs from the one"):
        train(resume=run)
    shutil.copy(uninterrupted / "last" / "model.safetensors", weights)
    state = run / "last" / "state.pt"
    flip(state, state.stat().st_size // 2)  # in some tensor of the optimizer state
    with pytest.raises(ValueError, match=r"last/state.pt is damaged and cannot be read"):
        train(resume=run)
    shutil.copy(uninterrupted / "last" / "state.pt", state)
    (run / "last" / "ema.safetensors").unlink()  # resuming needs none: state.pt holds the EMA
    assert train(resume=run).epochs_done == 3


def test_a_flipped_byte_in_the_weights_is_found_wherever_they_load(uninterrupted: Path, tmp_path: Path) -> None:
    """Evaluation reads best/ema.safetensors, which state.pt's digests (read on resume only) do not guard: each
    checkpoint lists its weights' SHA-256 in SHA256SUMS (sha256sum's format), and every loader of a local weights
    file checks against it."""
    run = tmp_path / "run"
    shutil.copytree(uninterrupted, run)
    for folder in (run / "best", run / "last"):
        assert (folder / "SHA256SUMS").read_text().split()[1::2] == ["model.safetensors", "ema.safetensors"]
        if shutil.which("sha256sum"):
            subprocess.run(["sha256sum", "--check", "--quiet", "SHA256SUMS"], cwd=folder, check=True)
    ema = run / "best" / "ema.safetensors"
    data = bytearray(ema.read_bytes())
    data[-100] ^= 0x10  # in the last tensor's data
    ema.write_bytes(bytes(data))
    damage = r"best/ema.safetensors is damaged: its SHA-256 differs from the one recorded in .*best/SHA256SUMS"
    with pytest.raises(ValueError, match=damage):
        gcvit.load(run)
    evaluated = _gcvit("eval", str(run))
    assert evaluated.returncode == 2 and re.search(damage, evaluated.stderr), evaluated.stderr
    model = gcvit.load(run, ema=False)  # the other weights file of the folder is sound
    assert not model.training
    with pytest.raises(ValueError, match=damage):  # as --pretrained, or gcvit.load_checkpoint in Python
        gcvit.load_checkpoint(model, ema)
    (run / "best" / "SHA256SUMS").unlink()  # checkpoints from before digests load as they did
    gcvit.load(run)


def test_eval_reads_a_run_whose_training_state_was_deleted(uninterrupted: Path, tmp_path: Path) -> None:
    """Deleting state.pt (the optimizer's moments, twice the weights' size) to save space leaves a run that still
    evaluates and predicts with its best/ weights; a run without weights is named."""

    run = tmp_path / "run"
    shutil.copytree(uninterrupted, run)
    for name in ("best", "last"):
        (run / name / "state.pt").unlink()
    model = gcvit.load(run)
    reference = gcvit.load(uninterrupted)
    x = torch.randn(2, 3, *model.pretrained_cfg.img_size)
    with torch.no_grad():
        assert torch.equal(model(x), reference(x))
    for name in ("best", "last"):
        (run / name / "model.safetensors").unlink()
    with pytest.raises(FileNotFoundError, match=r"holds no checkpoint \(best/ or last/ with model.safetensors"):
        gcvit.load(run)
