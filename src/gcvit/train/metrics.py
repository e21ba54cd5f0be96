"""Per-epoch metrics: RUN/metrics.csv (rewritten whole from the run's history, so a resumed run stays consistent),
TensorBoard when installed, and PNG plots in RUN/plots/."""

from __future__ import annotations

import csv
import io
import logging
from pathlib import Path
from typing import Any

from gcvit.atomic import atomic_write_bytes
from gcvit.figures import subplots

logger = logging.getLogger(__name__)

COLUMNS = ("epoch", "train_loss", "val_loss", "val_top1", "val_top5", "ema_top1", "lr", "epoch_time")


def write_csv(path: Path, history: list[dict[str, Any]]) -> None:
    """Write every epoch's row (atomically)."""
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=COLUMNS, extrasaction="ignore")
    writer.writeheader()
    for row in history:
        writer.writerow({k: ("" if row.get(k) is None else row[k]) for k in COLUMNS})
    atomic_write_bytes(path, buf.getvalue().encode())


class TensorBoard:
    """Scalars to RUN/tb/ when tensorboard is installed; silently nothing otherwise."""

    def __init__(self, log_dir: Path) -> None:
        try:
            from torch.utils.tensorboard import SummaryWriter
        except ImportError:  # tensorboard is optional
            self.writer = None
            return
        self.writer = SummaryWriter(str(log_dir))

    def log(self, row: dict[str, Any]) -> None:
        if self.writer is None:
            return
        for key in COLUMNS[1:]:
            if row.get(key) is not None:
                self.writer.add_scalar(key, row[key], row["epoch"])
        self.writer.flush()

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()


def plot_history(plot_dir: Path, history: list[dict[str, Any]]) -> list[Path]:
    """loss.png and accuracy.png from the history; returns the files written ([] without matplotlib)."""
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        logger.info("matplotlib is not installed: no plots")
        return []
    plot_dir.mkdir(parents=True, exist_ok=True)
    epochs = [r["epoch"] for r in history]
    written = []
    for name, keys, ylabel in (
        ("loss", ("train_loss", "val_loss"), "loss"),
        ("accuracy", ("val_top1", "val_top5", "ema_top1"), "accuracy (%)"),
    ):
        fig, ax = subplots(figsize=(6, 4))
        for key in keys:
            points = [(e, r[key]) for e, r in zip(epochs, history) if r.get(key) is not None]
            if points:
                ax.plot(*zip(*points), marker=".", label=key)
        ax.set_xlabel("epoch")
        ax.set_ylabel(ylabel)
        ax.grid(alpha=0.3)
        ax.legend()
        fig.tight_layout()
        buf = io.BytesIO()
        fig.savefig(buf, format="png", dpi=100)
        atomic_write_bytes(plot_dir / f"{name}.png", buf.getvalue())
        written.append(plot_dir / f"{name}.png")
    return written
