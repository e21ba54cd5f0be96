"""Loading trained runs, evaluating them and predicting with them.

`load_run` accepts a run folder (uses best/, else last/), a checkpoint folder (best/ or last/) or a .safetensors
file with a config.json next to it; `predict` also takes a model name (ImageNet weights and class names).
"""

from __future__ import annotations

import logging
import os
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

import gcvit
from gcvit.data import DigitsDataset, ImageFolderDataset, eval_transform, split_image_folder
from gcvit.data.datasets import check_val_fraction, image_files
from gcvit.data.transforms import load_rgb
from gcvit.figures import subplots
from gcvit.hub import EMA_FILE, build_from_config, chosen_weights
from gcvit.train import checkpoint as ckpt
from gcvit.train.distributed import require_cuda
from gcvit.train.metrics import describe_data, plot_title, wrap_title

logger = logging.getLogger(__name__)

PathLike = str | os.PathLike[str]


@dataclass
class RunMeta:
    """What a checkpoint says about its model's inputs and outputs."""

    model: str
    classes: list[str]  # label i -> name; class indices as strings when unknown
    img_size: tuple[int, int]
    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    interpolation: str = "bicubic"
    crop_pct: float = 1.0
    crop_mode: str = "center"
    source: str = ""  # the file the weights came from
    extra: dict[str, Any] = field(default_factory=dict)

    @classmethod
    def from_model(cls, name: str, model: nn.Module, classes: list[str], source: str) -> RunMeta:
        """The preprocessing recorded in a registry-built model's `pretrained_cfg`."""
        pc = model.pretrained_cfg
        size, mean, std = tuple(pc.img_size), tuple(pc.mean), tuple(pc.std)
        return cls(name, classes, size, mean, std, pc.interpolation, pc.crop_pct, pc.crop_mode, source=source)


def _checkpoint_folder(path: Path) -> tuple[Path, Path | None]:
    """(folder holding config.json, the weights file named) for a run folder (its best/, else last/), a checkpoint
    folder or a .safetensors file; the file is None for a folder, whose config.json says which weights to load."""
    if path.is_file():
        if not (path.parent / ckpt.CONFIG_FILE).is_file():
            raise FileNotFoundError(
                f"{path} has no config.json beside it; expected a run folder, a checkpoint folder or a .safetensors "
                "file that `gcvit train` or save_pretrained wrote"
            )
        return path.parent, path
    if not path.is_dir():
        raise FileNotFoundError(f"{path} does not exist; expected a run folder, a checkpoint folder or a .safetensors")
    if not (path / ckpt.CONFIG_FILE).is_file():
        candidates = (ckpt.find_checkpoint(path, name, weights_only=True) for name in ("best", "last"))
        found = next((c for c in candidates if c is not None), None)
        if found is None:
            raise FileNotFoundError(
                f"{path} holds no checkpoint (best/ or last/ with model.safetensors and config.json)"
            )
        path = found
    return path, None


def load_run(
    path: PathLike, *, ema: bool | None = None, device: str | torch.device = "cpu"
) -> tuple[nn.Module, RunMeta]:
    """Rebuild a trained model from its checkpoint, in eval mode.

    Args:
        path: a run folder (its best/, else last/), a checkpoint folder, or a .safetensors file with config.json beside.
        ema: load the EMA weights (True) or the raw ones (False); None: the weights the checkpoint chose (see
            `gcvit.hub.chosen_weights`).
        device: where to put the model.

    Returns:
        (model, meta): meta gives the class names and the preprocessing; meta.extra the "epoch" and "val_top1" of
        the checkpoint where its config.json records them.
    """
    folder, weights = _checkpoint_folder(Path(path))
    if weights is not None and ema is not None:
        raise ValueError(f"ema goes with a folder; {weights} names its weights itself")
    config = ckpt.read_model_config(folder)
    weights = weights or chosen_weights(folder, config, ema)
    model = build_from_config(config, str(folder / ckpt.CONFIG_FILE), origin=str(weights))  # classes, preprocessing
    gcvit.load_checkpoint(model, weights)
    meta = RunMeta.from_model(config["model"], model, model.classes, source=str(weights))
    meta.extra = {k: config[k] for k in ("epoch", "val_top1") if k in config}
    return model.to(device).eval(), meta


def _from_name(name: str, device: str | torch.device) -> tuple[nn.Module, RunMeta]:
    """A registered model with its pretrained weights; ImageNet-1K heads get the class names, others indices."""
    from gcvit.hub import default_classes

    model = gcvit.create_model(name, pretrained=True)
    return model.to(device).eval(), RunMeta.from_model(name, model, default_classes(model), source=name)


def load_model(
    model: PathLike | nn.Module, device: str | torch.device = "cpu", meta: RunMeta | None = None
) -> tuple[nn.Module, RunMeta]:
    """A run/checkpoint path, a registered model name, or (model, meta) already built."""
    require_cuda(device)
    if isinstance(model, nn.Module):
        if meta is None:
            raise ValueError("pass meta= (class names and preprocessing) along with a model object")
        return model.to(device).eval(), meta
    if Path(model).exists():
        return load_run(model, device=device)
    if str(model).split(".")[0] in gcvit.list_models():
        return _from_name(str(model), device)
    raise unknown_model(str(model))


def unknown_model(model: str) -> FileNotFoundError:
    """The error for a model that is no path and no registered name, with the close names."""
    from gcvit.models.registry import close_names

    return FileNotFoundError(
        f"{model!r} is neither a run folder, a checkpoint nor a model name{close_names(model)} (gcvit models)"
    )


def preprocess(meta: RunMeta) -> Any:
    return eval_transform(
        meta.img_size,
        meta.mean,
        meta.std,
        interpolation=meta.interpolation,
        crop_pct=meta.crop_pct,
        crop_mode=meta.crop_mode,
    )


@dataclass
class EvalReport:
    top1: float  # %
    top5: float  # %
    per_class: dict[str, float]  # class name -> accuracy (%)
    confusion: np.ndarray  # (K, K) counts, rows = true class, columns = predicted
    num_samples: int
    confusion_png: Path | None = None


def _dataset(data: str | PathLike, meta: RunMeta, val_fraction: float, seed: int, split: bool) -> Any:
    """'digits' (its val split), or a folder of class sub-folders using the checkpoint's class names (its seeded val
    split if `split`)."""
    transform = preprocess(meta)
    if str(data) == "digits":
        if len(meta.classes) != 10:
            raise ValueError(
                f"the model has {len(meta.classes)} classes and the digits 10: pass --data with the model's images"
            )
        return DigitsDataset("val", meta.img_size, val_fraction, seed, transform)
    if split:
        return split_image_folder(data, val_fraction, seed, val_transform=transform, classes=meta.classes)[1]
    return ImageFolderDataset(data, transform, classes=meta.classes)


def describe_model(meta: RunMeta) -> tuple[str, str]:
    """(run, weights) of a plot title: ('runs/faces', 'EMA weights (best/, epoch 31)') for a run's checkpoint;
    (name, 'pretrained weights') for a registered model; (name, its source) for a model given with its meta."""
    source = Path(meta.source)
    if source.suffix != ".safetensors":
        return meta.model, "pretrained weights" if meta.source == meta.model else meta.source
    folder = source.parent
    in_run = folder.name in ("best", "last") or folder.name.startswith(("best.old-", "last.old-"))
    run = folder.parent if in_run else folder
    kind = {EMA_FILE: "EMA weights", ckpt.MODEL_FILE: "raw weights" if (folder / EMA_FILE).is_file() else "weights"}
    where = [f"{folder.name}/"] if in_run else []
    if meta.extra.get("epoch") is not None:
        where.append(f"epoch {meta.extra['epoch']}")
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
    meta: RunMeta | None = None,
) -> EvalReport:
    """Top-1, top-5, per-class accuracy and the confusion matrix of a trained model on a dataset.

    Args:
        model: a run folder, checkpoint folder or .safetensors (see `load_run`), or a model with `meta`.
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
    net, meta = load_model(model, device, meta)
    dataset = _dataset(data, meta, val_fraction, seed, split)
    loader = torch.utils.data.DataLoader(dataset, batch_size=batch_size, num_workers=num_workers)
    k = len(meta.classes)
    confusion = np.zeros((k, k), dtype=np.int64)
    top5 = 0
    for images, labels in loader:
        logits = net(images.to(device)).float().cpu()
        top = logits.topk(min(5, k), dim=-1).indices
        top5 += int((top == labels[:, None]).any(-1).sum())
        np.add.at(confusion, (labels.numpy(), top[:, 0].numpy()), 1)
    n = int(confusion.sum())
    per_class = {c: 100.0 * confusion[i, i] / max(1, confusion[i].sum()) for i, c in enumerate(meta.classes)}
    report = EvalReport(100.0 * np.trace(confusion) / n, 100.0 * top5 / n, per_class, confusion, n)
    if out_dir is not None:
        run, weights = describe_model(meta)
        title = plot_title(run, describe_data(data, split), weights) if title is None else title
        report.confusion_png = plot_confusion(confusion, meta.classes, Path(out_dir) / plot_name, title=title)
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


def _image_files(inputs: Sequence[PathLike]) -> list[Path]:
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
    meta: RunMeta | None = None,
    skipped: list[tuple[str, str]] | None = None,
) -> list[tuple[str, list[tuple[str, float]]]]:
    """Classify images; files that cannot be read as images are skipped, as in training.

    Args:
        inputs: image files and/or folders (searched recursively for images).
        model: a run folder, checkpoint folder, .safetensors with config.json, a model name (pretrained weights;
            ImageNet-1K class names), or a model object with `meta`.
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
    files = _image_files(inputs)  # a mistyped path fails before any weights are downloaded
    net, meta = load_model(model, device, meta)
    transform = preprocess(meta)
    k = min(topk, len(meta.classes))
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
            results.append((str(f), [(meta.classes[c], p) for c, p in zip(i, v)]))
    if not results:
        raise ValueError(f"no readable images in {', '.join(map(str, inputs))}")
    return results
