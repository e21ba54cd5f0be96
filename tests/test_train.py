"""Tests for gcvit.train: config, optimizer groups, schedule, checkpoints, a short digits run, eval and predict."""

from __future__ import annotations

import argparse
import csv
import itertools
import json
import math
import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch

pytest.importorskip("sklearn")
pytest.importorskip("yaml")

import gcvit
from gcvit.data import DataError
from gcvit.train import TrainConfig, resolve_config, train
from gcvit.train import checkpoint as ckpt
from gcvit.train.evaluate import evaluate, load_run, predict
from gcvit.train.optim import build_optimizer, build_scheduler, layer_id, param_groups

TINY = {
    "embed_dim": 16,
    "depths": [1, 1, 1, 1],
    "num_heads": [1, 1, 2, 2],
    "window_size": [4, 4, 4, 2],
    "mlp_ratio": 2.0,
    "global_query_pools": None,
}


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
    cfg = resolve_config(path, {"epochs": 3, "seed": None})
    assert cfg.epochs == 3 and cfg.lr == 1e-3 and cfg.batch_size == 1024  # flag > yaml > recipe
    assert cfg.ema == 0.9998 and cfg.mixup == 0.8 and cfg.cutmix == 1.0 and cfg.warmup_epochs == 20
    assert cfg.randaugment == "rand-m9-mstd0.5-inc1" and cfg.random_erasing == 0.25 and cfg.min_lr == 5e-6


def test_official_recipe_scales_lr_with_batch() -> None:
    assert resolve_config(None, {"recipe": "official", "batch_size": 4096}).lr == pytest.approx(5e-3)
    assert resolve_config(None, {"recipe": "official", "batch_size": 512}).lr == pytest.approx(5e-3 / 8)


def test_bad_config_values_are_named(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="amp"):
        TrainConfig(amp="fp8")
    with pytest.raises(ValueError, match="unknown training option"):
        resolve_config(None, {"learning_rate": 1.0})
    (tmp_path / "c.yaml").write_text("epochz: 3\n")
    with pytest.raises(ValueError, match="epochz"):
        resolve_config(tmp_path / "c.yaml")


# ---------------------------------------------------------------- optimizer and schedule


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
    meta = {"model": "x"}
    ckpt.write_checkpoint(tmp_path, "last", {"w": torch.ones(2)}, meta, {"epoch": 1})
    assert ckpt.find_checkpoint(tmp_path) == tmp_path / "last"
    # a crash between moving the old folder aside and renaming the new one in: both halves are on disk
    os.replace(tmp_path / "last", tmp_path / "last.old-123")
    (tmp_path / "last.tmp-123").mkdir()
    (tmp_path / "last.tmp-123" / ckpt.MODEL_FILE).write_bytes(b"half")
    assert ckpt.find_checkpoint(tmp_path) == tmp_path / "last.old-123"
    ckpt.clean_stale(tmp_path)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["last"]
    assert ckpt.read_training_state(tmp_path / "last")["epoch"] == 1


# ---------------------------------------------------------------- training


def _cfg(tmp_path: Path, **kw: object) -> TrainConfig:
    values = {"model_overrides": TINY, "epochs": 2, "batch_size": 64, "out_dir": str(tmp_path / "run"), "amp": "none"}
    return TrainConfig(**(values | kw))  # type: ignore[arg-type]


def test_bad_data_fails_before_training(tmp_path: Path) -> None:
    with pytest.raises(DataError, match="does not exist"):
        train(_cfg(tmp_path, data="folder", data_dir=str(tmp_path / "missing")))
    assert not (tmp_path / "run" / "last").exists()


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
        }
    rows = list(csv.DictReader((run / "metrics.csv").open()))
    assert [int(r["epoch"]) for r in rows] == list(range(1, 13))
    assert set(rows[0]) == {"epoch", "train_loss", "val_loss", "val_top1", "val_top5", "ema_top1", "lr", "epoch_time"}
    assert (run / "plots" / "loss.png").is_file() and (run / "plots" / "accuracy.png").is_file()
    assert resolve_config(run / "config.yaml") == cfg
    config = json.loads((run / "best" / "config.json").read_text())
    assert config["classes"] == [str(d) for d in range(10)] and config["img_size"] == [32, 32]

    model, meta = load_run(run)
    assert meta.classes[3] == "3" and not model.training
    report = evaluate(run / "best", "digits", out_dir=tmp_path / "eval")
    assert report.top1 == pytest.approx(result.best_top1)
    assert report.confusion.sum() == 360 and report.confusion_png and report.confusion_png.is_file()
    assert set(report.per_class) == set(meta.classes)

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


# ---------------------------------------------------------------- resume after SIGKILL


def _cli(run_dir: Path, *extra: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    args = [
        sys.executable,
        "-m",
        "gcvit.cli_train",
        "train",
        "--out-dir",
        str(run_dir),
        "--epochs",
        "3",
        "--batch-size",
        "64",
        "--model-override",
        "embed_dim=16",
        "--model-override",
        "depths=[1,1,1,1]",
        "--model-override",
        "num_heads=[1,1,2,2]",
        "--model-override",
        "window_size=[4,4,4,2]",
        "--model-override",
        "global_query_pools=null",
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


# ---------------------------------------------------------------- distributed


def _torchrun(run_dir: Path, nproc: int) -> subprocess.CompletedProcess[str]:
    args = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        f"--nproc-per-node={nproc}",
        "-m",
        "gcvit.cli_train",
        "train",
        "--out-dir",
        str(run_dir),
        "--epochs",
        "2",
        "--batch-size",
        "64",
        "--model-override",
        "embed_dim=16",
        "--model-override",
        "depths=[1,1,1,1]",
        "--model-override",
        "num_heads=[1,1,2,2]",
        "--model-override",
        "window_size=[4,4,4,2]",
        "--model-override",
        "global_query_pools=null",
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
    wa = ckpt.read_weights(tmp_path / "one" / "last")
    wb = ckpt.read_weights(tmp_path / "two" / "last")
    worst = max((wa[k].float() - wb[k].float()).abs().max().item() for k in wa)
    assert worst < 1e-5, worst


# ---------------------------------------------------------------- command line


def test_cli_parses_every_config_field() -> None:
    from gcvit.cli_train import _overrides, add_subcommands

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
        "layer_decay": 0.75,
        "data_dir": "x",
        "data": "folder",
        "strict_data": True,
        "model_overrides": {"depths": [1, 1, 2, 1]},
        "pretrained": True,
        "amp": "fp16",
    }
    args = parser.parse_args(["predict", "a.png", "--model", "runs/x", "--topk", "3"])
    assert args.topk == 3 and args.inputs == ["a.png"]
