"""Segmentation trains through the shared loop: `gcvit segment train|eval|predict` on a few digit scenes writes the
same run folder as the other tasks, scores mIoU, and resumes bit-identically after a kill inside a checkpoint."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from gcvit.cli import main
from gcvit.train import checkpoint as ckpt
from gcvit.train.segmentation import SegmentConfig, official_segment_recipe, segment_config_from


@pytest.fixture
def cache(tmp_path_factory: pytest.TempPathFactory, monkeypatch: pytest.MonkeyPatch) -> Path:
    folder = tmp_path_factory.getbasetemp() / "gcvit_cache"  # scenes written once per worker
    monkeypatch.setenv("GCVIT_CACHE", str(folder))
    return folder


def _segment_train(run: Path, cache: Path, *extra: str, env: dict[str, str] | None = None):
    args = [sys.executable, "-m", "gcvit.cli", "segment", "train", "--scenes", "8", "--epochs", "2", "--batch-size"]
    args += ["4", "--warmup-iters", "2", "--drop-path", "0", "--device", "cpu", "--no-progress", "--out-dir", str(run)]
    full_env = {**os.environ, "GCVIT_CACHE": str(cache), "OMP_NUM_THREADS": "1", **(env or {})}
    return subprocess.run([*args, *extra], env=full_env, capture_output=True, text=True, timeout=900)


def test_a_segmentation_run_killed_inside_a_checkpoint_resumes_bit_identically(cache: Path, tmp_path: Path) -> None:
    whole = _segment_train(tmp_path / "whole", cache)
    assert whole.returncode == 0, whole.stderr
    assert "done: 2 epochs, best mIoU" in whole.stdout
    killed = _segment_train(tmp_path / "cut", cache, env={"GCVIT_TEST_KILL_AT": "write:2"})
    assert killed.returncode == -9, killed.stderr
    resumed = _segment_train(tmp_path / "cut", cache, "--resume", str(tmp_path / "cut"))
    assert resumed.returncode == 0, resumed.stderr
    assert f"resumed from {tmp_path / 'cut' / 'last'} after epoch 1" in resumed.stderr
    a, b = ckpt.read_weights(tmp_path / "whole" / "last"), ckpt.read_weights(tmp_path / "cut" / "last")
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_segment_eval_and_predict_write_what_they_say(cache: Path, tmp_path: Path, capsys) -> None:
    run = tmp_path / "run"
    assert main(["segment", "train", "--scenes", "8", "--epochs", "1", "--batch-size", "4", "--out-dir", str(run)]) == 0
    config = json.loads((run / "last" / "config.json").read_text())
    assert config["task"] == "segmentation" and config["classes"][:2] == ["background", "0"]
    assert config["config"]["window_size"] == [8, 8, 8, 8] and config["crop_size"] == 128
    assert main(["segment", "eval", str(run)]) == 0
    scores = json.loads((run / "eval.json").read_text())
    assert set(scores) >= {"mIoU", "pixel_accuracy", "per_class"} and 0 <= scores["mIoU"] <= 1
    assert set(scores["per_class"]) == {"background", *map(str, range(10))}
    # a window as large as the image is the whole image
    assert (
        main(["segment", "eval", str(run), "--mode", "slide", "--window", "128", "--out", str(tmp_path / "s.json")])
        == 0
    )
    assert json.loads((tmp_path / "s.json").read_text())["mIoU"] == pytest.approx(scores["mIoU"], abs=1e-9)
    images = next((cache / "segmentation_scenes").iterdir()) / "val" / "images"
    assert main(["segment", "predict", str(images), "--model", str(run), "--out-dir", str(tmp_path / "pred")]) == 0
    labels = Image.open(tmp_path / "pred" / "val_00000_labels.png")
    assert labels.mode == "L" and labels.size == (128, 128) and int(np.asarray(labels).max()) <= 10
    assert (tmp_path / "pred" / "val_00000_overlay.png").is_file()
    capsys.readouterr()
    assert main(["segment", "train", "--train-images", "a"]) == 2
    assert "give all four of --train-images --train-masks --val-images --val-masks" in capsys.readouterr().err


def test_segmentation_settings_are_checked_and_the_official_recipe_is_the_standard_one(cache: Path) -> None:
    cfg = SegmentConfig()
    assert (cfg.num_classes, cfg.img_size, cfg.window_size, cfg.flip, cfg.lr) == (11, 128, 8, 0.0, 1e-3)
    with pytest.raises(ValueError, match="--num-classes is needed with image and mask folders"):
        SegmentConfig(train_images="a", train_masks="b", val_images="c", val_masks="d")
    with pytest.raises(ValueError, match="num_classes must be at most 255"):
        SegmentConfig(train_images="a", train_masks="b", val_images="c", val_masks="d", num_classes=300)
    official = segment_config_from(
        {
            "recipe": "official",
            "train_images": "a",
            "train_masks": "b",
            "val_images": "c",
            "val_masks": "d",
            "num_classes": 150,
            "pretrained": True,
        }
    )
    assert (official.lr, official.weight_decay, official.warmup_iters, official.iters) == (6e-5, 0.01, 1500, 160_000)
    assert (official.batch_size, official.img_size, official.head_channels) == (16, 512, 512)
    assert official_segment_recipe()["poly_power"] == 1.0 and not official.decay_bias_tables
