"""gcvit.train.resume: a run SIGKILLed anywhere resumes bit for bit; what a resume refuses, and what it keeps."""

from __future__ import annotations

import csv
import dataclasses
import os
import random
import re
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import pytest
import torch

pytest.importorskip("sklearn")
pytest.importorskip("yaml")

from gcvit.train import TrainConfig, train
from gcvit.train import checkpoint as ckpt
from tests.conftest import TINY
from tests.train.helpers import SHAPES, assert_same_weights, run_gcvit, run_train, tiny_config, train_args

pytestmark = pytest.mark.usefixtures("one_thread")  # one torch thread (tests/conftest.py)


@pytest.mark.parametrize("point", ["swap", pytest.param("write", marks=pytest.mark.slow)])
def test_resume_after_sigkill_mid_checkpoint_is_bit_identical(uninterrupted: Path, tmp_path: Path, point: str) -> None:
    run = tmp_path / "run"
    killed = run_train(run, env={"GCVIT_TEST_KILL_AT": f"{point}:2"})
    assert killed.returncode == -9, killed.stderr
    assert not (run / "last").exists() if point == "swap" else (run / "last").exists()
    resumed = run_train(run, "--resume", str(run))
    assert resumed.returncode == 0, resumed.stderr
    assert "resumed from" in resumed.stderr
    assert_same_weights(uninterrupted / "last", run / "last")
    assert sorted(p.name for p in run.iterdir() if p.name.startswith(("last", "best"))) == ["best", "last"]


@pytest.mark.slow
def test_resume_with_workers_is_bit_identical(tmp_path: Path) -> None:
    a, b = tmp_path / "a", tmp_path / "b"
    assert run_train(a, "--num-workers", "2").returncode == 0
    assert run_train(b, "--num-workers", "2", env={"GCVIT_TEST_KILL_AT": "write:1"}).returncode == -9
    assert run_train(b, "--num-workers", "2", "--resume", str(b)).returncode == 0
    assert_same_weights(a / "last", b / "last")


def _kill_when(run_dir: Path, ready: Callable[[], bool], delay: float, *extra: str) -> tuple[int, str]:
    """Start `gcvit train` on run_dir, wait until ready() holds, sleep `delay` seconds, SIGKILL it.

    Returns (returncode, stderr); the caller asserts -9, i.e. that the process was still running when killed."""
    log = run_dir.parent / f"{run_dir.name}.stderr"
    with log.open("w") as err:
        proc = subprocess.Popen(train_args(run_dir, *extra), stdout=subprocess.DEVNULL, stderr=err, text=True)
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
    killed = run_train(run, *resume, env={"GCVIT_TEST_KILL_AT": f"write:{at}"})
    assert killed.returncode == -9, killed.stderr
    assert f"resumed from {run / 'last'} after epoch {epoch} " in killed.stderr, killed.stderr
    assert list(run.glob("last.tmp-*")), "the kill did not land inside the checkpoint write"
    assert ckpt.read_training_state(run / "last")["epoch"] == at - 1

    done = run_train(run, *resume)
    assert done.returncode == 0, done.stderr
    assert f"resumed from {run / 'last'} after epoch {at - 1} " in done.stderr, done.stderr
    assert_same_weights(uninterrupted / "last", run / "last")
    assert_same_weights(uninterrupted / "best", run / "best")
    assert _history(run) == _history(uninterrupted)
    assert sorted(p.name for p in run.iterdir() if p.name.startswith(("last", "best"))) == ["best", "last"]


def test_a_resume_rewrites_metrics_the_kill_left_an_epoch_behind(tmp_path: Path) -> None:
    """Killed after the last epoch's checkpoint but before its CSV row: the resume, with no epoch left to run, writes
    metrics.csv and the plots from the checkpoint's history."""
    train(tiny_config(tmp_path, epochs=2))
    csv_path = tmp_path / "run" / "metrics.csv"
    full = csv_path.read_text()
    csv_path.write_text("".join(full.splitlines(keepends=True)[:2]))  # header and epoch 1
    (tmp_path / "run" / "plots" / "loss.png").unlink()
    result = train(None, resume=tmp_path / "run")
    assert result.epochs_done == 2 and csv_path.read_text() == full
    assert (tmp_path / "run" / "plots" / "loss.png").is_file()


def test_resume_refuses_a_missing_run_and_changed_settings(uninterrupted: Path, tmp_path: Path) -> None:
    missing = run_gcvit("train", "--resume", str(tmp_path / "typo"))
    assert missing.returncode == 2 and "expected a run folder holding config.yaml" in missing.stderr
    changed = run_gcvit("train", "--resume", str(uninterrupted), "--epochs", "4", "--lr", "1e-4", "--no-progress")
    assert changed.returncode == 2
    assert "lr (0.002 -> 0.0001)" in changed.stderr and "start a new run from its weights" in changed.stderr
    moved = run_gcvit(
        "train", "--resume", str(uninterrupted), "--epochs", "4", "--out-dir", str(tmp_path / "elsewhere")
    )
    assert moved.returncode == 2 and "--out-dir does not apply to --resume" in moved.stderr


def test_resume_refuses_other_classes(shapes: Path, tmp_path: Path) -> None:
    """A class folder added or renamed since the run started is named; the head's outputs keep their classes."""
    data = tmp_path / "data"
    for name in SHAPES:
        shutil.copytree(shapes / name, data / name)
    cfg = tiny_config(
        tmp_path, epochs=1, ema=None, data="folder", data_dir=str(data), batch_size=8, model_overrides=TINY
    )
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
    resumed = run_gcvit(
        "train", "--resume", str(run), "--config", "configs/digits.yaml", "--epochs", "2", "--no-progress"
    )
    assert resumed.returncode == 0, resumed.stderr
    assert f"resumed from {run / 'last'} after epoch 1" in resumed.stderr


def test_resume_without_a_complete_last_checkpoint_spares_best(tmp_path: Path) -> None:
    """A run whose last/ (or last/state.pt) is gone is refused rather than started over on top of its best/; after
    a crash inside the first epoch's checkpoint (best/ holds epoch 1, no last/) it starts over as before."""
    train(tiny_config(tmp_path, epochs=2, ema=None))
    run = tmp_path / "run"
    (run / "last" / "state.pt").unlink()
    best = (run / "best" / "model.safetensors").read_bytes()
    with pytest.raises(ValueError, match=r"has no complete last/ checkpoint .* holds epoch 2: starting over would"):
        train(tiny_config(tmp_path, epochs=3, ema=None), resume=run)
    assert (run / "best" / "model.safetensors").read_bytes() == best
    first = tmp_path / "first"
    train(tiny_config(tmp_path, epochs=1, ema=None, out_dir=str(first / "run")))
    shutil.rmtree(first / "run" / "last")
    assert train(tiny_config(tmp_path, epochs=1, ema=None), resume=first / "run").epochs_done == 1


def test_resume_does_not_read_the_pretrained_source_again(tmp_path: Path) -> None:
    """A fine-tuning run resumes from its own checkpoint after its --pretrained file is deleted or replaced."""
    train(tiny_config(tmp_path, epochs=1, ema=None, out_dir=str(tmp_path / "source")))
    weights = tmp_path / "weights"
    shutil.copytree(tmp_path / "source" / "last", weights)
    cfg = tiny_config(tmp_path, epochs=1, ema=None, model_overrides=None, pretrained=str(weights / "model.safetensors"))
    train(cfg)
    shutil.rmtree(weights)
    resumed = train(dataclasses.replace(cfg, epochs=2), resume=tmp_path / "run")
    assert resumed.epochs_done == 2


def test_an_optimizer_state_of_other_parameter_groups_is_named_on_resume(tmp_path: Path) -> None:
    """Runs whose optimizer groups differ from this version's (Swin/ViT with --layer-decay before they got one lr
    level per block) are refused with a reason and a way on, not torch's bare message."""
    run = tmp_path / "run"
    train(tiny_config(tmp_path, epochs=1, ema=None, batch_size=256))
    state = torch.load(run / "last" / "state.pt", weights_only=False)
    state["optimizer"]["param_groups"] = state["optimizer"]["param_groups"][:-1]
    torch.save(state, run / "last" / "state.pt")
    with pytest.raises(ValueError, match="optimizer state does not fit .* Start a new run from its weights"):
        train(tiny_config(tmp_path, epochs=2, ema=None, batch_size=256), resume=run)


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
