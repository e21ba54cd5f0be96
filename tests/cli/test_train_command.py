"""`gcvit train`'s flags: every config field is a flag, 'none' turns a setting off, and flags not given change
nothing."""

from __future__ import annotations

import argparse
from pathlib import Path

import pytest

pytest.importorskip("sklearn")
pytest.importorskip("yaml")

from gcvit.train import resolve_config

pytestmark = pytest.mark.usefixtures("one_thread")  # one torch thread (tests/conftest.py)


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
