"""`--recipe official` follows NVIDIA's timm-based ImageNet run (GCVIT_SPEC.md, "Training recipe"): the cosine
counted from step 0 with the warmup overlapping it, every group starting at warmup_lr, min_lr through the cooldown,
bilinear or bicubic drawn per crop and per RandAugment op, and the relative-position bias tables decayed."""

from __future__ import annotations

import argparse
import math
import random

import numpy as np
import pytest
import torch
from PIL import Image
from torchvision.transforms import v2

import gcvit
from gcvit.data import eval_transform, train_transform
from gcvit.data.randaugment import RandAugment
from gcvit.train import TrainConfig, resolve_config
from gcvit.train.optim import build_optimizer, build_scheduler, param_groups
from tests.conftest import TINY

# The official schedule (configs/gc_vit_*.yml), scaled down to 10 optimizer steps per epoch.
STEPS_PER_EPOCH = 10
EPOCHS, WARMUP_EPOCHS, COOLDOWN_EPOCHS = 310, 20, 10
TOTAL, WARMUP = EPOCHS * STEPS_PER_EPOCH, WARMUP_EPOCHS * STEPS_PER_EPOCH  # 3100 and 200 steps
LR, MIN_LR, WARMUP_LR = 5e-3, 5e-6, 1e-6
MEAN, STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)


def _spec_lr(step: int) -> float:
    """GCVIT_SPEC.md written out: a straight line from warmup_lr towards lr over the warmup, the cosine counted
    from step 0 over `epochs` (the warmup overlaps it), then min_lr through the cooldown."""
    if step < WARMUP:
        return WARMUP_LR + step * (LR - WARMUP_LR) / WARMUP
    if step < TOTAL:
        return MIN_LR + 0.5 * (LR - MIN_LR) * (1 + math.cos(math.pi * step / TOTAL))
    return MIN_LR


def _lrs(optimizer: torch.optim.Optimizer, steps: int, advance) -> list[list[float]]:
    """Every group's lr before each of `steps` optimizer steps; `advance(step)` moves the schedule on."""
    seen = []
    for step in range(steps):
        seen.append([g["lr"] for g in optimizer.param_groups])
        optimizer.step()
        advance(step + 1)
    return seen


def _ours(model: torch.nn.Module, layer_decay: float | None, warmup_prefix: bool, steps: int) -> list[list[float]]:
    optimizer = build_optimizer(model, LR, 0.05, layer_decay)
    scheduler = build_scheduler(optimizer, TOTAL, WARMUP, LR, MIN_LR, WARMUP_LR, warmup_prefix=warmup_prefix)
    return _lrs(optimizer, steps, lambda _: scheduler.step())


def _groups(count: int, lrs: list[float] | None = None) -> list[dict]:
    """`count` parameter groups for timm's scheduler, each with its own lr (default LR) and no 'lr_scale'."""
    return [{"params": [torch.nn.Parameter(torch.zeros(1))], "lr": LR if lrs is None else lrs[i]} for i in range(count)]


def _timms(groups: list[dict], warmup_prefix: bool, steps: int) -> list[list[float]]:
    """timm's CosineLRScheduler as NVIDIA's scheduler factory builds it (`lr_ep: False`: per update), each group's
    lr its own base value."""
    cosine_lr = pytest.importorskip("timm.scheduler.cosine_lr")
    optimizer = torch.optim.AdamW(groups, lr=LR)
    scheduler = cosine_lr.CosineLRScheduler(
        optimizer,
        t_initial=TOTAL - WARMUP if warmup_prefix else TOTAL,
        lr_min=MIN_LR,
        cycle_limit=1,
        warmup_t=WARMUP,
        warmup_lr_init=WARMUP_LR,
        warmup_prefix=warmup_prefix,
        t_in_epochs=False,
    )
    return _lrs(optimizer, steps, lambda update: scheduler.step_update(num_updates=update))


# ---------------------------------------------------------------- the schedule


def test_the_official_schedule_is_the_specs_formula_at_each_landmark() -> None:
    """Step 0 at warmup_lr, the warmup a line towards the peak that the lr never reaches: at step = warmup it
    resumes on the cosine counted from step 0, cos(pi * 20/310), 98.98% of the peak; halfway through the 310 epochs
    the mean of lr and min_lr; the 10 cooldown epochs at min_lr."""
    lrs = [g[0] for g in _ours(torch.nn.Linear(2, 2), None, warmup_prefix=False, steps=TOTAL + 100)]
    landmarks = {
        0: 1e-6,
        WARMUP - 1: 1e-6 + 199 * (5e-3 - 1e-6) / 200,
        WARMUP: 5e-6 + 0.5 * (5e-3 - 5e-6) * (1 + math.cos(math.pi * 20 / 310)),
        WARMUP + 1: 5e-6 + 0.5 * (5e-3 - 5e-6) * (1 + math.cos(math.pi * 201 / 3100)),
        TOTAL // 2: (5e-3 + 5e-6) / 2,
        TOTAL - 1: 5e-6 + 0.5 * (5e-3 - 5e-6) * (1 + math.cos(math.pi * 3099 / 3100)),
        TOTAL: 5e-6,
        TOTAL + 99: 5e-6,  # the last cooldown step
    }
    for step, expected in landmarks.items():
        assert lrs[step] == pytest.approx(expected, rel=1e-12, abs=0), step
    assert lrs[WARMUP] / LR == pytest.approx(0.98977, abs=1e-5)  # "about 99.0% of the peak"
    assert max(lrs) < LR  # never at the peak itself
    assert lrs == pytest.approx([_spec_lr(step) for step in range(TOTAL + 100)], rel=1e-12, abs=0)


def test_the_official_schedule_is_timms_cosine_without_warmup_prefix_at_every_step() -> None:
    """Every step of the scaled-down 320 epochs, cooldown included, against timm's own scheduler."""
    ours = _ours(torch.nn.Linear(2, 2), None, warmup_prefix=False, steps=TOTAL + COOLDOWN_EPOCHS * STEPS_PER_EPOCH)
    theirs = _timms(_groups(len(ours[0])), False, len(ours))
    np.testing.assert_allclose(ours, theirs, rtol=1e-12, atol=0)


def test_the_default_schedule_keeps_its_prefix_warmup() -> None:
    """Without the switch nothing changes: the warmup reaches the peak at step = warmup and the cosine runs over the
    remaining steps (timm's warmup_prefix=True over total - warmup), so the two forms part at the end of warmup."""
    ours = _ours(torch.nn.Linear(2, 2), None, warmup_prefix=True, steps=TOTAL + 50)
    theirs = _timms(_groups(len(ours[0])), True, len(ours))
    np.testing.assert_allclose(ours, theirs, rtol=1e-12, atol=0)
    optimizer = build_optimizer(torch.nn.Linear(2, 2), LR, 0.05, None)
    default = build_scheduler(optimizer, TOTAL, WARMUP, LR, MIN_LR, WARMUP_LR)  # what loop.py calls today
    lrs = [g[0] for g in _lrs(optimizer, WARMUP + 2, lambda _: default.step())]
    assert lrs[WARMUP] == pytest.approx(LR) and lrs[WARMUP + 1] == pytest.approx(
        MIN_LR + 0.5 * (LR - MIN_LR) * (1 + math.cos(math.pi / (TOTAL - WARMUP)))
    )


def test_with_layer_decay_every_group_starts_at_warmup_lr() -> None:
    """Layer decay gives each group its own peak lr * lr_scale; in the official form every group still starts at
    warmup_lr before the first step (the spec), and each follows timm's scheduler with that peak as its base lr
    (cooldown included). The default form keeps scaling the whole schedule, warmup_lr too."""
    model = gcvit.create_model("gcvit_xxtiny", num_classes=3, img_size=32, **TINY)
    steps = TOTAL + 30
    ours = _ours(model, 0.5, warmup_prefix=False, steps=steps)
    scales = [g["lr_scale"] for g in param_groups(model, 0.05, 0.5)]
    assert len(set(scales)) == 6 and min(scales) == pytest.approx(0.5**5)  # stem, four blocks, head
    assert ours[0] == pytest.approx([WARMUP_LR] * len(scales), rel=1e-12, abs=0)
    peaks = [LR * s for s in scales]
    assert ours[WARMUP] == pytest.approx(
        [MIN_LR + 0.5 * (p - MIN_LR) * (1 + math.cos(math.pi * WARMUP / TOTAL)) for p in peaks], rel=1e-12, abs=0
    )
    assert ours[-1] == [pytest.approx(MIN_LR)] * len(scales)
    np.testing.assert_allclose(ours, _timms(_groups(len(peaks), peaks), False, steps), rtol=1e-12, atol=0)
    default = _ours(model, 0.5, warmup_prefix=True, steps=1)
    assert default[0] == pytest.approx([WARMUP_LR * s for s in scales])  # today's behaviour, unchanged


# ---------------------------------------------------------------- weight decay of the bias tables


def test_bias_tables_are_decayed_only_when_asked() -> None:
    """Today's groups exempt the relative-position bias tables (`no_weight_decay()`); decay_bias_tables=True (the
    official run) decays them at the full weight decay, and leaves every other exemption (norms, biases, ViT's
    position embedding and class token) as it was."""
    for name in ("gcvit_xxtiny", "swin_tiny", "vit_tiny"):
        model = gcvit.create_model(name, num_classes=3, img_size=32, **(TINY if name == "gcvit_xxtiny" else {}))
        names = {id(p): n for n, p in model.named_parameters()}
        for decay_tables in (False, True):
            optimizer = build_optimizer(model, LR, 0.05, None, decay_bias_tables=decay_tables)
            decay = {names[id(p)]: g["weight_decay"] for g in optimizer.param_groups for p in g["params"]}
            tables = [n for n in decay if n.endswith("relative_position_bias_table")]
            assert bool(tables) == (name != "vit_tiny"), name
            for n, p in model.named_parameters():
                exempt = p.ndim <= 1 or n in {"pos_embed", "cls_token"} or (n in tables and not decay_tables)
                assert decay[n] == (0.0 if exempt else 0.05), (name, n, decay_tables)


# ---------------------------------------------------------------- random interpolation


def _noise_image(size: tuple[int, int] = (40, 40)) -> Image.Image:
    return Image.fromarray(np.random.default_rng(0).integers(0, 256, (*size, 3), dtype=np.uint8))


def _whole_image_crop(interpolation: str) -> v2.Compose:
    """A train transform whose crop is always the whole square image, so only the resampling filter varies."""
    return train_transform(16, MEAN, STD, interpolation=interpolation, scale=(1.0, 1.0), ratio=(1.0, 1.0), hflip=0)


def test_random_interpolation_draws_bilinear_or_bicubic_for_each_crop() -> None:
    """Each image's crop is exactly the bilinear or the bicubic one, both occur within one seeded run of the same
    transform (a draw per image, not per transform), and the two differ."""
    image = _noise_image()
    bilinear, bicubic = _whole_image_crop("bilinear")(image), _whole_image_crop("bicubic")(image)
    assert not torch.equal(bilinear, bicubic)
    transform = _whole_image_crop("random")
    torch.manual_seed(0)
    picks = []
    for _ in range(40):
        out = transform(image)
        matches = [name for name, ref in (("bilinear", bilinear), ("bicubic", bicubic)) if torch.equal(out, ref)]
        assert len(matches) == 1
        picks.append(matches[0])
    assert 10 <= picks.count("bilinear") <= 30, picks  # Binomial(40, 1/2)


def test_random_interpolation_draws_a_filter_for_each_randaugment_op() -> None:
    """Two rotations of 30 degrees (each in a random direction) per image: the result is exactly one sequence of
    explicit rotations, and sequences mixing bilinear and bicubic occur, so each op draws its own filter. A fixed
    interpolation never mixes."""
    image, fill = _noise_image((24, 24)), (124, 116, 104)
    filters = (Image.Resampling.BILINEAR, Image.Resampling.BICUBIC)
    candidates = {
        (f1, f2): [
            np.asarray(image.rotate(a1, f1, fillcolor=fill).rotate(a2, f2, fillcolor=fill))
            for a1 in (30.0, -30.0)
            for a2 in (30.0, -30.0)
        ]
        for f1 in filters
        for f2 in filters
    }
    bicubic_only = {(Image.Resampling.BICUBIC, Image.Resampling.BICUBIC)}
    for interpolation, allowed in (("random", set(candidates)), ("bicubic", bicubic_only)):
        ra = RandAugment(10, 2, 0.0, True, prob=1.0, fill=fill, interpolation=interpolation, ops=["Rotate"])
        seen = []
        for seed in range(24):
            torch.manual_seed(seed)
            out = np.asarray(ra(image))
            matches = [pair for pair, outs in candidates.items() if any(np.array_equal(out, o) for o in outs)]
            assert len(matches) == 1, (interpolation, seed, matches)
            seen.append(matches[0])
        assert set(seen) == allowed, (interpolation, seen)


def test_random_interpolation_replays_under_a_torch_seed_whatever_pythons_random() -> None:
    """The draws come from torch's generator, which the training data wrapper seeds per sample: the same torch seed
    gives the same images with Python's `random` in any state, another seed other images."""
    image = _noise_image((48, 64))
    transform = train_transform(32, MEAN, STD, interpolation="random", randaugment="rand-m9-mstd0.5-inc1")

    def run(torch_seed: int, python_seed: int) -> list[torch.Tensor]:
        torch.manual_seed(torch_seed)
        random.seed(python_seed)
        return [transform(image) for _ in range(8)]

    first, again, other = run(0, 0), run(0, 1), run(1, 0)
    assert all(torch.equal(a, b) for a, b in zip(first, again))
    assert not any(torch.equal(a, b) for a, b in zip(first, other))


def test_evaluation_stays_bicubic_and_the_training_data_takes_the_configs_interpolation() -> None:
    """'random' is for training only; `build_datasets` gives the train transform cfg.train_interpolation and the
    eval transform the model's."""
    pytest.importorskip("sklearn")
    from gcvit.train.data import build_datasets

    with pytest.raises(ValueError, match="interpolation must be one of"):
        eval_transform(16, MEAN, STD, interpolation="random")
    cfg = TrainConfig(model="gcvit_xxtiny", img_size=32, train_interpolation="random")
    data = build_datasets(cfg, MEAN, STD, 1.0, "bicubic")
    crop = data.train.transform.transforms[1]
    assert isinstance(crop, v2.RandomChoice)
    assert [t.interpolation for t in crop.transforms] == [v2.InterpolationMode.BILINEAR, v2.InterpolationMode.BICUBIC]
    (resize,) = [t for t in data.val.transform.transforms if isinstance(t, v2.Resize)]
    assert resize.interpolation == v2.InterpolationMode.BICUBIC
    plain = build_datasets(TrainConfig(model="gcvit_xxtiny", img_size=32), MEAN, STD, 1.0, "bicubic")
    assert plain.train.transform.transforms[1].interpolation == v2.InterpolationMode.BICUBIC


# ---------------------------------------------------------------- the recipes


def test_the_official_recipe_switches_all_three_and_the_default_keeps_todays_values() -> None:
    official = resolve_config(None, {"recipe": "official"})
    assert (official.warmup_prefix, official.decay_bias_tables, official.train_interpolation) == (False, True, "random")
    default = resolve_config(None, {})
    assert (default.warmup_prefix, default.decay_bias_tables, default.train_interpolation) == (True, False, "bicubic")
    with pytest.raises(ValueError, match="train_interpolation must be 'bicubic', 'bilinear' or 'random'"):
        TrainConfig(train_interpolation="nearest")


def test_the_new_fields_are_command_line_flags() -> None:
    from gcvit.cli.train import _overrides, add_subcommands

    parser = argparse.ArgumentParser()
    add_subcommands(parser.add_subparsers())
    flags = ["train", "--no-warmup-prefix", "--decay-bias-tables", "--train-interpolation", "random"]
    given = _overrides(parser.parse_args(flags))
    assert given == {"warmup_prefix": False, "decay_bias_tables": True, "train_interpolation": "random"}
