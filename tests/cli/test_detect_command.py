"""`gcvit detect scenes|train|eval|predict` end to end on a few digit scenes (one short epoch: the numbers are not
judged here, the files and formats are)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from PIL import Image

from gcvit.cli import main


def test_detect_commands_write_what_they_say(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys) -> None:
    monkeypatch.setenv("GCVIT_CACHE", str(tmp_path / "cache"))
    assert main(["detect", "scenes", "--out", str(tmp_path / "sc"), "--train", "8", "--val", "2", "--size", "96"]) == 0
    assert "wrote 8 train scenes" in capsys.readouterr().out
    run = tmp_path / "run"
    data = [
        *("--train-ann", str(tmp_path / "sc" / "train.json"), "--train-images", str(tmp_path / "sc" / "train")),
        *("--val-ann", str(tmp_path / "sc" / "val.json"), "--val-images", str(tmp_path / "sc" / "val")),
    ]
    args = ["detect", "train", *data, "--img-size", "96", "--window-size", "8", "--epochs", "1", "--batch-size", "4"]
    assert main([*args, "--out-dir", str(run), "--no-progress"]) == 0
    assert "done: 1 epochs, best box AP" in capsys.readouterr().out
    assert main(["detect", "eval", str(run)]) == 0
    scores = json.loads((run / "eval.json").read_text())
    assert set(scores) == {"bbox", "segm"} and set(scores["bbox"]) >= {"AP", "AP50", "AP75", "small", "medium", "large"}
    out = tmp_path / "pred"
    assert (
        main(
            [
                "detect",
                "predict",
                str(tmp_path / "sc" / "val"),
                "--model",
                str(run),
                "--out-dir",
                str(out),
                "--score-threshold",
                "0",
            ]
        )
        == 0
    )
    predictions = json.loads((out / "predictions.json").read_text())
    assert sorted(p.name for p in out.glob("*.png")) == ["val_00000.png", "val_00001.png"]
    assert Image.open(out / "val_00000.png").size == (384, 384)  # a 96 px scene drawn 4x as large
    assert predictions and {p["category_id"] for p in predictions} <= set(range(1, 11))
    assert all(len(p["bbox"]) == 4 and "segmentation" in p for p in predictions)
    capsys.readouterr()
    assert main(["detect", "train", "--train-ann", "a.json"]) == 2
    assert "give all four of --train-ann --train-images --val-ann --val-images" in capsys.readouterr().err
    assert main(["detect", "eval", str(run), "--ann", "x.json"]) == 2
    assert "give both --ann and --images" in capsys.readouterr().err
