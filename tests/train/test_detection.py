"""Detection trains through the shared loop: `gcvit.train.train(DetectConfig(...))` on the digit scenes writes the
same run folder as classification (last/, best/, metrics.csv, plots), scores COCO AP, and resumes bit-identically."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import pytest
import torch

from gcvit.train import checkpoint as ckpt
from gcvit.train.detection import DetectConfig, scene_paths
from gcvit.train.loop import train


@pytest.fixture
def scenes_cache(tmp_path_factory: pytest.TempPathFactory, monkeypatch: pytest.MonkeyPatch) -> Path:
    cache = tmp_path_factory.getbasetemp() / "gcvit_cache"  # shared by the tests of a worker: scenes written once
    monkeypatch.setenv("GCVIT_CACHE", str(cache))
    return cache


def _config(out: Path, **kw) -> DetectConfig:
    kw.setdefault("lr_steps", (1, 2))  # the same schedule whether the run is cut after epoch 1 or not
    return DetectConfig(scenes=8, batch_size=4, warmup_iters=2, out_dir=str(out), **kw)


def test_a_detector_trains_and_resumes_through_the_shared_loop(scenes_cache: Path, tmp_path: Path) -> None:
    whole = train(_config(tmp_path / "whole", epochs=2))
    assert whole.epochs_done == 2 and 0.0 <= whole.best_top1 <= 1.0
    with open(tmp_path / "whole" / "metrics.csv") as f:
        rows = list(csv.DictReader(f))
    assert list(rows[0])[:7] == [
        "epoch",
        "train_loss",
        "val_bbox_AP",
        "val_bbox_AP50",
        "val_segm_AP",
        "val_segm_AP50",
        "ema_bbox_AP",
    ]
    config = json.loads((tmp_path / "whole" / "last" / "config.json").read_text())
    assert config["task"] == "detection" and config["category_ids"] == list(range(11))
    assert config["classes"] == [str(d) for d in range(10)] and config["model"] == "gcvit_nano"
    assert (tmp_path / "whole" / "plots" / "ap.png").is_file()

    train(_config(tmp_path / "cut", epochs=1))
    resumed = train(_config(tmp_path / "cut", epochs=2), resume=tmp_path / "cut")
    assert resumed.epochs_done == 2
    a, b = ckpt.read_weights(tmp_path / "whole" / "last"), ckpt.read_weights(tmp_path / "cut" / "last")
    assert all(torch.equal(a[k], b[k]) for k in a)  # bit-identical to the uninterrupted run
    again = train(None, resume=tmp_path / "cut")  # its config.yaml says it is a detection run
    assert again.epochs_done == 2


def test_detection_settings_are_checked(scenes_cache: Path, tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="give all four of --train-ann --train-images --val-ann --val-images"):
        DetectConfig(train_ann="a.json")
    with pytest.raises(ValueError, match="arch must be one of"):
        DetectConfig(arch="cascade_mask_rcnn")
    cfg = _config(tmp_path, lr_steps=None)
    assert cfg.window_size == 8 and cfg.img_size == 128 and cfg.lr_steps == (8, 11)
    paths = scene_paths(cfg)
    assert len(json.loads(paths["train_ann"].read_text())["images"]) == 8
    assert len(json.loads(paths["val_ann"].read_text())["images"]) == 2
