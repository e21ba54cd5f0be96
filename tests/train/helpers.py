"""Plain helpers shared by the tests of gcvit.train: the tiny model as a config and as `gcvit train` flags, the
commands run as subprocesses, and a bit-for-bit comparison of two checkpoints."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import torch

import gcvit
from gcvit.train import TrainConfig
from tests.conftest import TINY

# the same model as command-line flags: --model-override embed_dim=16 ...
TINY_FLAGS = [a for k, v in TINY.items() for a in ("--model-override", f"{k}={json.dumps(v)}")]

SHAPES = ("circle", "square", "triangle")
BAD_FILES = ("square/truncated.jpg", "triangle/notes.png", "triangle/empty.png")


def tiny_config(tmp_path: Path, **kw: object) -> TrainConfig:
    values = {"model_overrides": TINY, "epochs": 2, "batch_size": 64, "out_dir": str(tmp_path / "run"), "amp": "none"}
    return TrainConfig(**(values | kw))  # type: ignore[arg-type]


def train_args(run_dir: Path, *extra: str) -> list[str]:
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


def run_train(run_dir: Path, *extra: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    args = train_args(run_dir, *extra)
    return subprocess.run(args, env={**os.environ, **(env or {})}, capture_output=True, text=True, timeout=600)


def run_gcvit(*args: str) -> subprocess.CompletedProcess[str]:
    cmd = [sys.executable, "-m", "gcvit.cli", *args]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=600)


def assert_same_weights(a: Path, b: Path) -> None:
    for name in ("model.safetensors", "ema.safetensors"):
        wa, wb = gcvit.models.weights.read_state_dict(a / name), gcvit.models.weights.read_state_dict(b / name)
        assert wa.keys() == wb.keys()
        assert all(torch.equal(wa[k], wb[k]) for k in wa), f"{name} differs"
