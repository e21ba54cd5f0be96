"""Evaluating a model on a dataset and predicting with it.

`evaluate` and `predict` take whatever `gcvit.load` takes (a run, checkpoint or saved folder, a weights file with
config.json beside it, a URL, a hub repo id; a registered name gets its pretrained weights) or a loaded model; the
model's `pretrained_cfg` says how to prepare the images and its `classes` name the outputs.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from gcvit.data import DigitsDataset, ImageFolderDataset, eval_transform, split_image_folder
from gcvit.data.datasets import check_val_fraction, image_files
from gcvit.data.transforms import load_rgb
from gcvit.figures import subplots
from gcvit.loading import load
from gcvit.models.folder import EMA_FILE, MODEL_FILE, default_classes
from gcvit.models.registry import is_model_name
from gcvit.train.distributed import require_cuda
from gcvit.train.metrics import describe_data, plot_title, wrap_title

logger = logging.getLogger(__name__)

PathLike = str | os.PathLike[str]


def load_model(model: PathLike | nn.Module, device: str | torch.device = "cpu") -> nn.Module:
    """`model` in eval mode on `device`: a loaded model as it is, a registered name with its pretrained weights,
    anything else as `gcvit.load` reads it."""
    require_cuda(device)
    if isinstance(model, nn.Module):
        return model.to(device).eval()
    text = str(model)
    if not Path(text).exists() and is_model_name(text):
        return load(text, pretrained=True, device=device)
    return load(text, device=device)


def classes_of(model: nn.Module) -> list[str]:
    """The class names of the model's outputs: those it was loaded with, else `default_classes`."""
    return list(getattr(model, "classes", None) or default_classes(model))


def preprocess(model: nn.Module) -> Any:
    """The evaluation transform of the model's `pretrained_cfg`: PIL image -> normalised (3, H, W) tensor."""
    pc = model.pretrained_cfg
    return eval_transform(
        pc.img_size, pc.mean, pc.std, interpolation=pc.interpolation, crop_pct=pc.crop_pct, crop_mode=pc.crop_mode
    )


@dataclass
class EvalReport:
    top1: float  # %
    top5: float  # %
    per_class: dict[str, float]  # class name -> accuracy (%)
    confusion: np.ndarray  # (K, K) counts, rows = true class, columns = predicted
    num_samples: int
    confusion_png: Path | None = None


def _dataset(data: str | PathLike, model: nn.Module, val_fraction: float, seed: int, split: bool) -> Any:
    """'digits' (its val split), or a folder of class sub-folders using the model's class names (its seeded val
    split if `split`)."""
    transform, classes = preprocess(model), classes_of(model)
    if str(data) == "digits":
        if len(classes) != 10:
            raise ValueError(
                f"the model has {len(classes)} classes and the digits 10: pass --data with the model's images"
            )
        return DigitsDataset("val", model.pretrained_cfg.img_size, val_fraction, seed, transform)
    if split:
        return split_image_folder(data, val_fraction, seed, val_transform=transform, classes=classes)[1]
    return ImageFolderDataset(data, transform, classes=classes)


def describe_model(model: nn.Module) -> tuple[str, str]:
    """(run, weights) of a plot title: ('runs/faces', 'EMA weights (best/, epoch 31)') for a run's checkpoint;
    (name, 'pretrained weights') for a registered model with its tag's weights, (name, 'random weights') for one
    without; (name, where its weights came from) otherwise."""
    pc, name = model.pretrained_cfg, getattr(model, "model_name", type(model).__name__)
    source = Path(pc.url)
    if source.suffix != ".safetensors" or pc.url.startswith(("http://", "https://")):
        if not pc.url:
            return name, "random weights"
        return name, "pretrained weights" if pc.top1 is not None else pc.url
    folder = source.parent
    in_run = folder.name in ("best", "last") or folder.name.startswith(("best.old-", "last.old-"))
    run = folder.parent if in_run else folder
    kind = {EMA_FILE: "EMA weights", MODEL_FILE: "raw weights" if (folder / EMA_FILE).is_file() else "weights"}
    where = [f"{folder.name}/"] if in_run else []
    if pc.epoch is not None:
        where.append(f"epoch {pc.epoch}")
    weights = kind.get(source.name, source.name)
    return str(run), f"{weights} ({', '.join(where)})" if where else weights


@torch.no_grad()
def evaluate(
    model: PathLike | nn.Module,
    data: str | PathLike = "digits",
    *,
    batch_size: int = 128,
    num_workers: int = 0,
    device: str | torch.device = "cpu",
    out_dir: PathLike | None = None,
    plot_name: str = "confusion.png",
    title: str | None = None,
    val_fraction: float = 0.2,
    seed: int = 0,
    split: bool = False,
) -> EvalReport:
    """Top-1, top-5, per-class accuracy and the confusion matrix of a trained model on a dataset.

    Args:
        model: what `load_model` takes: a loaded model, a name (its pretrained weights), or what `gcvit.load` reads.
        data: 'digits' (the validation split of `seed` / `val_fraction`, as in training) or an image folder whose
            sub-folders are the checkpoint's class names (all of it, or with `split` its val split, as in training).
        out_dir: write the confusion matrix here as `plot_name` (needs matplotlib); None: no file.
        title: the plot's title; None: the run, the data and the weights (`describe_model`, `describe_data`).

    Returns:
        An EvalReport.
    """
    if batch_size < 1:
        raise ValueError(f"expected batch_size of at least 1; got {batch_size}")
    if split or str(data) == "digits":
        check_val_fraction(val_fraction)  # before any image is decoded
    net = load_model(model, device)
    classes = classes_of(net)
    dataset = _dataset(data, net, val_fraction, seed, split)
    loader = torch.utils.data.DataLoader(dataset, batch_size=batch_size, num_workers=num_workers)
    k = len(classes)
    confusion = np.zeros((k, k), dtype=np.int64)
    top5 = 0
    for images, labels in loader:
        logits = net(images.to(device)).float().cpu()
        top = logits.topk(min(5, k), dim=-1).indices
        top5 += int((top == labels[:, None]).any(-1).sum())
        np.add.at(confusion, (labels.numpy(), top[:, 0].numpy()), 1)
    n = int(confusion.sum())
    per_class = {c: 100.0 * confusion[i, i] / max(1, confusion[i].sum()) for i, c in enumerate(classes)}
    report = EvalReport(100.0 * np.trace(confusion) / n, 100.0 * top5 / n, per_class, confusion, n)
    if out_dir is not None:
        run, weights = describe_model(net)
        title = plot_title(run, describe_data(data, split), weights) if title is None else title
        report.confusion_png = plot_confusion(confusion, classes, Path(out_dir) / plot_name, title=title)
    return report


def plot_confusion(
    confusion: np.ndarray, classes: Sequence[str], path: Path, *, title: str | None = None
) -> Path | None:
    """Write the confusion matrix as a PNG, with `title` above it (wrapped); None without matplotlib."""
    k = len(classes)
    try:
        fig, ax = subplots(figsize=(max(4, 0.5 * k + 2), max(4, 0.5 * k + 2)))
    except ImportError:
        return None
    ax.imshow(confusion, cmap="Blues")
    if k <= 30:
        ax.set_xticks(range(k), classes, rotation=90)
        ax.set_yticks(range(k), classes)
        for (i, j), v in np.ndenumerate(confusion):
            if v:
                ax.text(
                    j,
                    i,
                    str(v),
                    ha="center",
                    va="center",
                    fontsize=7,
                    color="white" if v > confusion.max() / 2 else "black",
                )
    ax.set_xlabel("predicted")
    ax.set_ylabel("true")
    if title:
        ax.set_title(wrap_title(title, fig), fontsize=9)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=100)
    return path


def image_inputs(inputs: Sequence[PathLike]) -> list[Path]:
    """The image files that predict commands take: files as given, folders searched for images."""
    files: list[Path] = []
    for item in inputs:
        p = Path(item)
        if p.is_dir():
            files += image_files(p)  # as training lists a class folder: links followed, hidden entries skipped
        elif p.is_file():
            files.append(p)
        else:
            raise FileNotFoundError(f"{p} does not exist; expected image files or folders of images")
    return files


@torch.no_grad()
def predict(
    inputs: Sequence[PathLike],
    model: PathLike | nn.Module,
    *,
    topk: int = 5,
    batch_size: int = 32,
    device: str | torch.device = "cpu",
    skipped: list[tuple[str, str]] | None = None,
) -> list[tuple[str, list[tuple[str, float]]]]:
    """Classify images; files that cannot be read as images are skipped, as in training.

    Args:
        inputs: image files and/or folders (searched recursively for images).
        model: what `load_model` takes: a loaded model, a model name (pretrained weights; ImageNet-1K class names),
            or what `gcvit.load` reads (a run, checkpoint or saved folder, .safetensors with config.json, ...).
        topk: predictions per image.
        skipped: a list that receives (file, reason) for each skipped file, for the caller to report (as `gcvit
            predict` does); None: each is logged as a warning.

    Returns:
        [(file, [(class name, probability), ...]), ...] in file order, best first.

    Raises:
        ValueError: no input could be read.
    """
    if topk < 1:
        raise ValueError(f"expected topk of at least 1; got {topk}")
    if batch_size < 1:
        raise ValueError(f"expected batch_size of at least 1; got {batch_size}")
    files = image_inputs(inputs)  # a mistyped path fails before any weights are downloaded
    net = load_model(model, device)
    transform, classes = preprocess(net), classes_of(net)
    k = min(topk, len(classes))
    results = []
    for start in range(0, len(files), batch_size):
        chunk, images = [], []
        for f in files[start : start + batch_size]:
            try:
                images.append(transform(load_rgb(f)))
                chunk.append(f)
            except Exception as e:  # unreadable, corrupt or a decompression bomb: skipped, as in training
                if skipped is None:
                    logger.warning("skipped unreadable image %s: %s", f, e)
                else:
                    skipped.append((str(f), str(e)))
        if not images:
            continue
        probs = net(torch.stack(images).to(device)).float().softmax(-1).cpu()
        values, indices = probs.topk(k, dim=-1)
        for f, v, i in zip(chunk, values.tolist(), indices.tolist()):
            results.append((str(f), [(classes[c], p) for c, p in zip(i, v)]))
    if not results:
        raise ValueError(f"no readable images in {', '.join(map(str, inputs))}")
    return results
