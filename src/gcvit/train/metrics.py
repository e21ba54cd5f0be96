"""Per-epoch metrics: RUN/metrics.csv (rewritten whole from the run's history, so a resumed run stays consistent),
TensorBoard when installed, and PNG plots in RUN/plots/."""

from __future__ import annotations

import csv
import io
import logging
import os
import textwrap
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from gcvit.atomic import atomic_write_bytes
from gcvit.figures import subplots

logger = logging.getLogger(__name__)

# classification's history columns; a task's rows hold the loop's (epoch, train_loss, lr, epoch_time) around its own
COLUMNS = ("epoch", "train_loss", "val_loss", "val_top1", "val_top5", "ema_top1", "lr", "epoch_time")


def write_csv(path: Path, history: list[dict[str, Any]]) -> None:
    """Write every epoch's row (atomically), the columns in the order of the rows' keys."""
    columns = list(history[0]) if history else list(COLUMNS)
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=columns, extrasaction="ignore")
    writer.writeheader()
    for row in history:
        writer.writerow({k: ("" if row.get(k) is None else row[k]) for k in columns})
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
        for key in list(row)[1:]:  # all but the epoch
            if row.get(key) is not None:
                self.writer.add_scalar(key, row[key], row["epoch"])
        self.writer.flush()

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()


def plot_title(*parts: str | None) -> str:
    """The title of a run's plots: its parts joined by ' · ', e.g. 'runs/faces · val split of /data/faces · EMA
    weights (best/, epoch 31)' (the run, the data, the weights); empty parts are left out."""
    return " · ".join(p for p in parts if p)


def describe_data(data: str | os.PathLike[str], split: bool) -> str:
    """The data of a plot title: 'val split of the digits', 'val split of /data/faces' (a folder's seeded val split),
    'all of /data/faces_val' (a folder whole)."""
    if str(data) == "digits":
        return "val split of the digits"
    return f"{'val split' if split else 'all'} of {data}"


def wrap_title(title: str, fig: Any, fontsize: float = 9) -> str:
    """`title` broken into lines that fit the width of `fig` at `fontsize` points (long paths would be cut off)."""
    chars = max(20, int(fig.get_figwidth() * 72 / (0.6 * fontsize)))  # an average glyph is about 0.6 em wide
    return textwrap.fill(title, chars, break_on_hyphens=False)


def plot_history(
    plot_dir: Path,
    history: list[dict[str, Any]],
    *,
    title: str | None = None,
    best_epoch: int | None = None,
    num_classes: int | None = None,
    panels: Sequence[tuple[str, tuple[str, ...], str]] | None = None,
) -> list[Path]:
    """loss.png and accuracy.png from the history; returns the files written ([] without matplotlib).

    Args:
        plot_dir: the folder (RUN/plots).
        history: a row per epoch, with the keys of COLUMNS (a missing or None value is not drawn).
        title: above both plots (see `plot_title`); None: none.
        best_epoch: the epoch whose weights best/ keeps, marked on the accuracy plot.
        num_classes: the classes of the head: top-5 is drawn only above 5 (with 5 or fewer it is 100%); None:
            whenever the history has it.
        panels: (file stem, history keys, y label) of each PNG; None: classification's loss.png and accuracy.png.
            best_epoch is marked on every panel but the first.
    """
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        logger.info("matplotlib is not installed: no plots")
        return []
    plot_dir.mkdir(parents=True, exist_ok=True)
    epochs = [r["epoch"] for r in history]
    top5 = ("val_top5",) if num_classes is None or num_classes > 5 else ()
    written = []
    panels = panels or (
        ("loss", ("train_loss", "val_loss"), "loss"),
        ("accuracy", ("val_top1", *top5, "ema_top1"), "accuracy (%)"),
    )
    for n, (name, keys, ylabel) in enumerate(panels):
        fig, ax = subplots(figsize=(6, 4))
        for key in keys:
            points = [(e, r[key]) for e, r in zip(epochs, history) if r.get(key) is not None]
            if points:
                ax.plot(*zip(*points), marker=".", label=key)
        if n > 0 and best_epoch is not None:
            ax.axvline(best_epoch, color="0.4", linestyle=":", label=f"kept in best/ (epoch {best_epoch})")
        ax.set_xlabel("epoch")
        ax.set_ylabel(ylabel)
        if title:
            ax.set_title(wrap_title(title, fig), fontsize=9)
        ax.grid(alpha=0.3)
        ax.legend()
        fig.tight_layout()
        buf = io.BytesIO()
        fig.savefig(buf, format="png", dpi=100)
        atomic_write_bytes(plot_dir / f"{name}.png", buf.getvalue())
        written.append(plot_dir / f"{name}.png")
    return written
