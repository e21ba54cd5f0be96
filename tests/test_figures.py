"""The PNGs of training, evaluation and `gcvit compare` are drawn without pyplot: the process's matplotlib backend and
pyplot's figures stay as the user left them (each plot used to call matplotlib.use("Agg"), which turned a notebook's
inline plots off after `gcvit.train()`)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from gcvit.compare_families import ModelResult, plot
from gcvit.train.evaluate import plot_confusion
from gcvit.train.metrics import plot_history

plt = pytest.importorskip("matplotlib.pyplot")


def _result(name: str, top1: float) -> ModelResult:
    return ModelResult(name, "", 1.0, 0.1, 100.0, 50.0, 10.0, 2, 0.1, top1, top1 - 1, "", "", "", "")


def test_plots_leave_the_backend_and_pyplot_figures_alone(tmp_path: Path) -> None:
    before = plt.get_backend()
    plt.switch_backend("svg")  # a backend the plots do not use
    mine = plt.figure()
    try:
        history = [
            {"epoch": e, "train_loss": 2.0 / e, "val_loss": 1.5 / e, "val_top1": 40.0 + e, "val_top5": 90.0}
            for e in (1, 2, 3)
        ]
        written = plot_history(tmp_path / "plots", history)
        written.append(plot_confusion(np.array([[5, 1], [0, 6]]), ["cat", "dog"], tmp_path / "confusion.png"))
        plot([_result("gcvit_xxtiny", 90.0), _result("swin_tiny", 80.0)], tmp_path / "compare.png")
        written.append(tmp_path / "compare.png")
        assert plt.get_backend() == "svg" and plt.get_fignums() == [mine.number]
        assert [p.name for p in written] == ["loss.png", "accuracy.png", "confusion.png", "compare.png"]
        for path in written:
            with Image.open(path) as image:
                assert image.format == "PNG" and np.asarray(image.convert("L")).std() > 5  # drawn, not blank
    finally:
        plt.close(mine)
        plt.switch_backend(before)
