"""What a run on the user's own folder does by default: the model and size it picks, where it writes, what it says
before it starts, which weights best/ keeps, and how Ctrl-C and impossible batches end."""

from __future__ import annotations

import json
import os
import random
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

pytest.importorskip("sklearn")
pytest.importorskip("yaml")

import gcvit
from gcvit.models.folder import read_config
from gcvit.train import TrainConfig, resolve_config, train
from gcvit.train import checkpoint as ckpt
from gcvit.train.ema import ema_decay
from gcvit.train.evaluate import evaluate
from gcvit.train.loop import best_epoch, kept_weights
from tests.conftest import TINY

STRIPES = ("blue", "green", "red")
HUE = {"red": (0, 1, 2), "green": (1, 0, 2), "blue": (2, 1, 0)}  # which channel is bright


def _stripes(root: Path, per_class: int, seed: int = 0) -> Path:
    """Three classes of 24x24 images, stripes of random orientation, period and shades, in reds, greens or blues
    (easy to learn in a few steps, told apart by few random networks)."""
    from PIL import Image

    rng = random.Random(seed)
    for name in STRIPES:
        (root / name).mkdir(parents=True)
        for i in range(per_class):
            period, horizontal = rng.randint(3, 6), rng.random() < 0.5
            a, b = ((rng.randrange(120, 256), rng.randrange(0, 90), rng.randrange(0, 90)) for _ in range(2))
            a, b = (tuple(c[j] for j in HUE[name]) for c in (a, b))
            image = Image.new("RGB", (24, 24))
            for y in range(24):
                for x in range(24):
                    along = y if horizontal else x
                    image.putpixel((x, y), a if (along // period) % 2 else b)
            image.save(root / name / f"{i:02d}.png")
    return root


@pytest.fixture(scope="module")
def stripes(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return _stripes(tmp_path_factory.mktemp("data") / "stripes", 20)


def _gcvit(*args: str, cwd: Path | None = None) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "gcvit.cli", *args]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=600, cwd=cwd, env=env)


# ---------------------------------------------------------------- defaults that follow the data and the model


def test_the_small_models_are_registered_and_listed() -> None:
    names = gcvit.list_models("gcvit_*")
    assert "gcvit_nano" in names and "gcvit_micro" in names
    nano, micro = gcvit.create_model("gcvit_nano", num_classes=10), gcvit.create_model("gcvit_micro")
    assert nano.cfg.img_size == (32, 32) and micro.cfg.img_size == (64, 64)
    assert round(sum(p.numel() for p in nano.parameters()) / 1e6, 2) == 1.39  # the digits model, as trained
    x = torch.randn(2, 3, 96, 80)  # other sizes run, as with every variant
    assert micro.eval()(x).shape == (2, 1000)


def test_defaults_follow_the_data_and_the_model(stripes: Path, tmp_path: Path) -> None:
    digits = TrainConfig()
    assert (digits.model, digits.img_size, digits.out_dir) == ("gcvit_nano", 32, "runs/digits")
    folder = TrainConfig(data_dir=str(stripes))
    assert (folder.model, folder.img_size, folder.out_dir) == ("gcvit_micro", 64, "runs/stripes")
    tiny = TrainConfig(data_dir=str(stripes), model="gcvit_tiny")
    assert tiny.img_size == 224  # its native size; on the digits every model trains at 32 px
    assert TrainConfig(model="gcvit_tiny").img_size == 32
    assert TrainConfig(data_dir=str(stripes), pretrained=True).model == "gcvit_xxtiny"
    official = resolve_config(None, {"recipe": "official", "data_dir": str(stripes)})
    assert (official.model, official.img_size) == ("gcvit_xxtiny", 224)
    assert TrainConfig(data_dir=str(stripes), img_size=48).img_size == 48  # given: kept
    # a run's own checkpoint as --pretrained: its model and its size
    saved = tmp_path / "saved"
    gcvit.create_model("gcvit_micro", num_classes=2, img_size=96).save_pretrained(saved)
    again = TrainConfig(data_dir=str(stripes), pretrained=str(saved))
    assert (again.model, again.img_size) == ("gcvit_micro", 96)


def test_a_folder_holding_train_and_val_is_that_split(stripes: Path, tmp_path: Path) -> None:
    """Not two classes named train and val, as it used to be (exit 0, a train-vs-val classifier, no warning)."""
    import shutil

    root = tmp_path / "download"
    shutil.copytree(stripes, root / "train")
    _stripes(root / "validation", 4, seed=1)
    cfg = TrainConfig(data_dir=str(root))
    assert cfg.data_dir is None and cfg.train_dir == str(root / "train") and cfg.val_dir == str(root / "validation")
    assert cfg.out_dir == "runs/download"
    run = tmp_path / "run"
    train(TrainConfig(data_dir=str(root), out_dir=str(run), epochs=1, batch_size=8, model_overrides=TINY, amp="none"))
    meta = read_config(run / "last")
    assert meta["classes"] == list(STRIPES)
    assert evaluate(run, root / "validation").num_samples == 12


# ---------------------------------------------------------------- which weights best/ keeps


def test_best_keeps_the_better_of_raw_and_ema_weights_and_the_official_recipe_the_ema() -> None:
    lagging = {"epoch": 3, "val_top1": 81.7, "ema_top1": 68.3}
    assert kept_weights(lagging, "better") == ("model.safetensors", 81.7)
    assert kept_weights(lagging, "ema") == ("ema.safetensors", 68.3)
    assert kept_weights({"epoch": 1, "val_top1": 90.0, "ema_top1": 90.0}, "better") == ("ema.safetensors", 90.0)
    assert kept_weights({"epoch": 1, "val_top1": 90.0, "ema_top1": None}, "ema") == ("model.safetensors", 90.0)
    history = [
        {"epoch": 1, "val_top1": 50.0, "ema_top1": 40.0},
        {"epoch": 2, "val_top1": 70.0, "ema_top1": 72.0},
        {"epoch": 3, "val_top1": 72.0, "ema_top1": 71.0},
    ]
    assert best_epoch(history, "better") == (2, "ema.safetensors", 72.0)  # the first epoch of the best
    assert best_epoch(history, "ema") == (2, "ema.safetensors", 72.0)
    assert best_epoch(history[:1] + history[2:], "better") == (3, "model.safetensors", 72.0)
    assert resolve_config(None, {"recipe": "official"}).keep_best == "ema"
    assert TrainConfig().keep_best == "better"
    with pytest.raises(ValueError, match=r"keep_best must be one of \('better', 'ema'\), got 'raw'"):
        TrainConfig(keep_best="raw")


def test_ema_warmup_follows_timms_model_ema_v3() -> None:
    from timm.utils.model_ema import ModelEmaV3

    timm_ema = ModelEmaV3(torch.nn.Linear(1, 1), decay=0.99, use_warmup=True, warmup_power=0.75)
    for step in (1, 2, 10, 100, 463, 465, 10_000):
        # timm counts the copy as step 1 (its decay there is 0); AveragedModel passes the averages done so far
        assert ema_decay(0.99, step, True) == pytest.approx(timm_ema.get_decay(step + 1), abs=1e-12)
    assert ema_decay(0.99, 5, False) == 0.99
    assert ema_decay(0.99, 10_000, True) == 0.99
    assert resolve_config(None, {"recipe": "official"}).ema_warmup is False  # NVIDIA's ModelEma has none


def test_a_short_run_keeps_raw_weights_when_the_ema_lags_and_eval_takes_them(stripes: Path, tmp_path: Path) -> None:
    """An EMA at 0.9999 without warmup barely moves from the random start in a few steps: best/ keeps the raw
    weights, records them in config.json, and `evaluate` (as `gcvit eval`) scores those, not the EMA."""
    run = tmp_path / "run"
    cfg = TrainConfig(
        data_dir=str(stripes),
        out_dir=str(run),
        epochs=3,
        batch_size=8,
        lr=3e-3,
        warmup_epochs=0,
        model_overrides=TINY,
        ema=0.9999,
        ema_warmup=False,
        amp="none",
    )
    result = train(cfg)
    epoch, weights, top1 = best_epoch(result.history, "better")
    assert weights == "model.safetensors" and result.best_weights == weights and result.best_epoch == epoch
    assert all(row["val_top1"] > row["ema_top1"] for row in result.history)
    meta = read_config(run / "best")
    assert (meta["weights"], meta["epoch"], meta["val_top1"]) == (weights, epoch, top1)
    kept = evaluate(run, stripes, split=True).top1  # the run's val split, as `gcvit eval RUN` scores it
    assert kept == pytest.approx(top1)
    assert kept >= evaluate(run / "last" / "model.safetensors", stripes, split=True).top1


# ---------------------------------------------------------------- what a run says, and how it ends


def test_a_run_says_what_it_is_about_to_do(stripes: Path, tmp_path: Path) -> None:
    done = _gcvit(
        "train", "--data-dir", str(stripes), "--model", "gcvit_xxtiny", "--img-size", "32", "--epochs", "1",
        "--batch-size", "8", "--out-dir", str(tmp_path / "run"), "--amp", "none",
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    err = done.stderr
    assert "model gcvit_xxtiny: 11.48 M parameters, from scratch, input 32x32 px" in err, err
    assert f"data {stripes} (val split 0.2, seed 0): 3 classes, 48 training and 12 validation images" in err
    for name in STRIPES:  # images per class in train and val
        assert re.search(rf"^  {name} +16 +4$", err, re.MULTILINE), err
    assert "schedule: 1 epochs, 6 steps of batch 8 each" in err
    assert "threads, amp none; run folder" in err
    assert "note: 11.5 M parameters from scratch on 48 images will likely overfit; --model gcvit_micro" in err
    assert "top5" not in err  # 3 classes: top-5 is always 100
    assert "it/s" not in err and "\r" not in err  # no progress bars when stderr is no terminal
    assert re.search(r"done: 1 epochs, best val top-1 [\d.]+% \((EMA|raw) weights, epoch 1\)", done.stdout)


def test_a_batch_larger_than_the_data_names_the_flag(stripes: Path, tmp_path: Path) -> None:
    with pytest.raises(ValueError, match=r"48 training images make no full batch of 64: lower --batch-size"):
        train(TrainConfig(data_dir=str(stripes), out_dir=str(tmp_path / "r"), model_overrides=TINY, batch_size=64))


def test_ctrl_c_ends_with_one_line_and_exit_130_and_the_run_resumes(stripes: Path, tmp_path: Path) -> None:
    run = tmp_path / "run"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    args = [sys.executable, "-m", "gcvit.cli", "train", "--data-dir", str(stripes), "--out-dir", str(run)]
    # far more epochs than the run reaches: it is stopped by the signal, never by its end (30 epochs of 0.3 s once
    # finished before a loaded machine's poll saw the first checkpoint)
    args += ["--epochs", "1000", "--batch-size", "8", "--amp", "none"]
    args += [a for k, v in TINY.items() for a in ("--model-override", f"{k}={json.dumps(v)}")]
    proc = subprocess.Popen(args, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
    deadline = time.monotonic() + 300
    while ckpt.find_checkpoint(run) is None and time.monotonic() < deadline and proc.poll() is None:
        time.sleep(0.2)
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 130, err
    assert "Traceback" not in err
    last = err.strip().splitlines()[-1]
    saved = ckpt.read_training_state(run / "last")["epoch"]
    assert last == (
        f"gcvit: interrupted after epoch {saved}; checkpoint {run / 'last'}; resume with `gcvit train --resume {run}`"
    )
    resumed = _gcvit("train", "--resume", str(run), "--epochs", str(saved + 1))
    assert resumed.returncode == 0, resumed.stderr
    assert f"done: {saved + 1} epochs" in resumed.stdout
