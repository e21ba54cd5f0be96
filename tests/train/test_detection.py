"""Detection trains through the shared loop: `gcvit.train.train(DetectConfig(...))` on the digit scenes writes the
same run folder as classification (last/, best/, metrics.csv, plots), scores COCO AP, and resumes bit-identically."""

from __future__ import annotations

import csv
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from gcvit.data.coco import CocoInstances
from gcvit.train import checkpoint as ckpt
from gcvit.train.detection import DetectConfig, scene_paths, train_sizes, train_transform
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
    assert cfg.window_size == 8 and cfg.img_size == 128 and cfg.epochs == 10 and cfg.lr_steps == (9,)
    paths = scene_paths(cfg)
    assert len(json.loads(paths["train_ann"].read_text())["images"]) == 8
    assert len(json.loads(paths["val_ann"].read_text())["images"]) == 2


def _detect_train(run: Path, cache: Path, *extra: str, nproc: int = 0, env: dict[str, str] | None = None):
    """`gcvit detect train` on 8 digit scenes for 2 epochs in a subprocess (under torchrun with nproc processes)."""
    launch = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={nproc}"]
    args = [*(launch if nproc else [sys.executable]), "-m", "gcvit.cli", "detect", "train", "--scenes", "8"]
    args += ["--epochs", "2"]
    args += ["--batch-size", "4", "--warmup-iters", "2", "--drop-path", "0", "--device", "cpu", "--no-progress"]
    full_env = {**os.environ, "GCVIT_CACHE": str(cache), "OMP_NUM_THREADS": "1", **(env or {})}
    args += ["--out-dir", str(run), *extra]
    return subprocess.run(args, env=full_env, capture_output=True, text=True, timeout=900)


def test_a_detection_run_killed_inside_a_checkpoint_resumes_bit_identically(scenes_cache: Path, tmp_path: Path) -> None:
    whole = _detect_train(tmp_path / "whole", scenes_cache)
    assert whole.returncode == 0, whole.stderr
    killed = _detect_train(tmp_path / "cut", scenes_cache, env={"GCVIT_TEST_KILL_AT": "write:2"})
    assert killed.returncode == -9, killed.stderr
    assert ckpt.read_training_state(tmp_path / "cut" / "last")["epoch"] == 1
    resumed = _detect_train(tmp_path / "cut", scenes_cache, "--resume", str(tmp_path / "cut"))
    assert resumed.returncode == 0, resumed.stderr
    assert f"resumed from {tmp_path / 'cut' / 'last'} after epoch 1" in resumed.stderr
    a, b = ckpt.read_weights(tmp_path / "whole" / "last"), ckpt.read_weights(tmp_path / "cut" / "last")
    assert all(torch.equal(a[k], b[k]) for k in a)


@pytest.mark.slow
def test_two_process_detection_matches_one_process(scenes_cache: Path, tmp_path: Path) -> None:
    """Each image's anchors and RoIs come from its own seed and each loss is a mean over the whole batch, so two
    processes of 2 images a step train the same weights as one process of 4."""
    one = _detect_train(tmp_path / "one", scenes_cache, nproc=1)
    assert one.returncode == 0, one.stderr
    two = _detect_train(tmp_path / "two", scenes_cache, nproc=2)
    assert two.returncode == 0, two.stderr
    assert two.stdout.count("done: 2 epochs") == 1, two.stdout
    wa, wb = ckpt.read_weights(tmp_path / "one" / "last"), ckpt.read_weights(tmp_path / "two" / "last")
    worst = max((wa[k].float() - wb[k].float()).abs().max().item() for k in wa)
    assert worst < 1e-5, worst


@pytest.mark.parametrize("scale_aug", ["multiscale", "lsj"])
def test_scale_augmentations_keep_boxes_masks_and_labels_together(scenes_cache: Path, scale_aug: str) -> None:
    cfg = DetectConfig(scenes=8, img_size=200, scale_aug=scale_aug, flip=0.5)
    paths = scene_paths(cfg)
    data = CocoInstances(paths["train_ann"], paths["train_images"], train_transform(cfg))
    sizes, kept = set(), 0
    for i in range(len(data)):
        for draw in range(6):
            torch.manual_seed(draw)
            image, target = data[i]
            boxes, masks, labels = target["boxes"], target["masks"], target["labels"]
            assert image.dtype == torch.float32 and isinstance(target["seed"], int)
            assert len(boxes) == len(masks) == len(labels)
            assert (boxes[:, 2:] > boxes[:, :2]).all()  # no empty box left
            H, W = image.shape[-2:]
            assert masks.shape[-2:] == (H, W) and boxes[:, 2].le(W).all() and boxes[:, 3].le(H).all()
            sizes.add((H, W))
            kept += len(boxes)
    assert kept > 0
    if scale_aug == "lsj":
        assert sizes == {(200, 200)} and train_sizes(cfg) == (200,)  # every image cropped or padded to the square
    else:  # half the images cropped to random sizes; the detector then resizes to one of train_sizes
        assert len(sizes) > 3 and (128, 128) in sizes
        assert train_sizes(cfg) == tuple(round(200 * s / 800) for s in range(480, 801, 32))


@pytest.mark.slow
def test_a_photo_set_trains_from_scratch_and_eval_reports_its_ap(tmp_path: Path) -> None:
    """The issue's user set: real photographs' objects on real textures (tests/data/photo_objects.py), category ids
    3, 7, 11, 20, 42, polygons, an image without objects, JPEG and PNG; 15 minutes of training on the 2-core CPU."""
    from tests.data.photo_objects import write_photo_objects

    paths = write_photo_objects(tmp_path / "set")
    run = tmp_path / "run"
    data = [
        a
        for k in ("train_ann", "train_images", "val_ann", "val_images")
        for a in (f"--{k.replace('_', '-')}", str(paths[k]))
    ]
    args = [*data, "--model", "gcvit_xxtiny", "--img-size", "256", "--time-limit", "900", "--out-dir", str(run)]
    done = subprocess.run(
        [sys.executable, "-m", "gcvit.cli", "detect", "train", *args, "--no-progress"], capture_output=True, text=True
    )
    assert done.returncode == 0, done.stderr
    evaluated = subprocess.run(
        [sys.executable, "-m", "gcvit.cli", "detect", "eval", str(run)], capture_output=True, text=True
    )
    assert evaluated.returncode == 0, evaluated.stderr
    scores = json.loads((run / "eval.json").read_text())
    assert set(scores["bbox"]["per_category"]) == {"pagoda", "dahlia", "tree", "bush", "bud"}
    assert scores["bbox"]["AP50"] > 0.3 and scores["segm"]["AP50"] > 0.3, scores


def test_bf16_autocast_and_gradient_checkpointing_train_a_detector(scenes_cache: Path, tmp_path: Path) -> None:
    done = train(_config(tmp_path / "run", epochs=1, amp="bf16", grad_checkpointing=True))
    assert done.epochs_done == 1 and 0.0 <= done.best_top1 <= 1.0
    weights = ckpt.read_weights(tmp_path / "run" / "last").values()
    assert all(v.dtype == torch.float32 for v in weights if v.is_floating_point())  # autocast leaves fp32 weights
    with pytest.raises(ValueError, match="amp='fp16' needs CUDA"):
        train(_config(tmp_path / "fp16", epochs=1, amp="fp16", device="cpu"))
