"""Semantic segmentation: inference at any size (whole image or sliding window, optionally several scales and a flip),
the confusion-matrix metrics (mIoU, pixel accuracy, per-class IoU and accuracy), `gcvit segment eval` (RUN/eval.json)
and `gcvit segment predict` (a colour overlay and a PNG of class indices per image).

Sliding-window inference is mmsegmentation's `slide` mode: windows of `window` px every `stride` px (the last ones
flush with the right and bottom edges, images smaller than a window padded), the logits of overlapping windows
averaged. Multi-scale inference resizes the image by each ratio, infers, resizes the logits back and averages the
softmax over scales (and the flip). mIoU is the mean over the classes that occur in the labels or the predictions
(a class absent from both has no IoU), as mmsegmentation's.
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from gcvit.atomic import atomic_write_bytes
from gcvit.data.transforms import load_rgb
from gcvit.loading import load
from gcvit.train.segmentation import confusion, data_paths, scores, segment_config_from

logger = logging.getLogger(__name__)

PathLike = str | os.PathLike[str]


def _forward(model: nn.Module, images: torch.Tensor) -> torch.Tensor:
    """Logits (B, K, H, W) of images (B, 3, H, W) in [0, 1]: normalised with the model's mean and std."""
    mean = torch.tensor(model.mean, device=images.device).view(1, 3, 1, 1)
    std = torch.tensor(model.std, device=images.device).view(1, 3, 1, 1)
    return model((images - mean) / std)


def slide_logits(model: nn.Module, image: torch.Tensor, window: int, stride: int) -> torch.Tensor:
    """Logits (1, K, H, W) of one image (1, 3, H, W) from windows of `window` px every `stride` px, averaged where
    they overlap; an image smaller than a window is padded (with zeros after normalisation) and cropped back."""
    if not 0 < stride <= window:
        raise ValueError(f"expected 0 < stride <= window; got stride {stride}, window {window}")
    _, _, H, W = image.shape
    padded = F.pad(image, (0, max(window - W, 0), 0, max(window - H, 0)))
    Hp, Wp = padded.shape[-2:]
    rows = list(range(0, max(Hp - window, 0) + 1, stride))
    cols = list(range(0, max(Wp - window, 0) + 1, stride))
    if rows[-1] + window < Hp:
        rows.append(Hp - window)  # the last row of windows flush with the bottom edge
    if cols[-1] + window < Wp:
        cols.append(Wp - window)
    total = counts = None
    for y in rows:
        for x in cols:
            logits = _forward(model, padded[..., y : y + window, x : x + window])
            if total is None:
                total = logits.new_zeros(1, logits.shape[1], Hp, Wp)
                counts = logits.new_zeros(1, 1, Hp, Wp)
            total[..., y : y + window, x : x + window] += logits
            counts[..., y : y + window, x : x + window] += 1
    return (total / counts)[..., :H, :W]


@torch.no_grad()
def infer(
    model: nn.Module,
    image: torch.Tensor,
    *,
    mode: str = "whole",
    window: int = 512,
    stride: int = 341,
    scales: Sequence[float] = (1.0,),
    flip: bool = False,
) -> torch.Tensor:
    """Class probabilities (K, H, W) of one image (3, H, W) in [0, 1]: `mode` 'whole' (the image at once) or
    'slide' (windows, `slide_logits`), averaged over `scales` (ratios of the image's size) and, with `flip`, the
    horizontally flipped image."""
    if mode not in ("whole", "slide"):
        raise ValueError(f"expected mode 'whole' or 'slide'; got {mode!r}")
    H, W = image.shape[-2:]
    probs = None
    for ratio in scales:
        size = (max(1, round(H * ratio)), max(1, round(W * ratio)))
        scaled = image[None] if ratio == 1 else F.interpolate(image[None], size, mode="bilinear", align_corners=False)
        for flipped in (False, True) if flip else (False,):
            x = scaled.flip(-1) if flipped else scaled
            logits = _forward(model, x) if mode == "whole" else slide_logits(model, x, window, stride)
            logits = logits.flip(-1) if flipped else logits
            if logits.shape[-2:] != (H, W):
                logits = F.interpolate(logits, (H, W), mode="bilinear", align_corners=False)
            p = logits.float().softmax(1)[0]
            probs = p if probs is None else probs + p
    return probs / (len(scales) * (2 if flip else 1))


def load_segmenter(model: PathLike | nn.Module, device: str | torch.device = "cpu") -> nn.Module:
    """A segmenter in eval mode: one given as it is, else a segmentation run, checkpoint or saved folder."""
    segmenter = model if isinstance(model, nn.Module) else load(model, device=device)
    if getattr(segmenter, "task", None) != "segmentation":
        raise ValueError(f"{model} is not a segmenter (its config.json has no 'task': 'segmentation')")
    return segmenter.to(device).eval()


def _run_val_data(run: Path) -> tuple[Path, Path]:
    """(images, masks) a segmentation run validated on, from its config.yaml."""
    from gcvit.train.config import read_yaml

    paths = data_paths(segment_config_from(read_yaml(run / "config.yaml", check=False)))
    return paths["val_images"], paths["val_masks"]


@torch.no_grad()
def evaluate_segmenter(
    model: PathLike | nn.Module,
    images: PathLike | None = None,
    masks: PathLike | None = None,
    *,
    out: PathLike | None = None,
    mode: str = "whole",
    window: int | None = None,
    stride: int | None = None,
    scales: Sequence[float] = (1.0,),
    flip: bool = False,
    device: str | torch.device = "cpu",
) -> dict[str, Any]:
    """mIoU, pixel accuracy and per-class IoU and accuracy of a segmenter on images with masks (default: the run's
    validation data), written to `out` (default RUN/eval.json when `model` is a run folder). `window` and `stride`
    of the sliding window default to the run's crop size and two thirds of it."""
    from gcvit.data.segmentation import SegmentationFolder

    segmenter = load_segmenter(model, device)
    if (images is None) != (masks is None):
        raise ValueError("give both --images and --masks, or neither (the run's validation data)")
    run = Path(model) if not isinstance(model, nn.Module) else None
    if images is None:
        if run is None or not (run / "config.yaml").is_file():
            raise ValueError("a segmenter without its run folder needs --images and --masks")
        images, masks = _run_val_data(run)
    data = SegmentationFolder(
        images, masks, num_classes=len(segmenter.classes), reduce_zero_label=segmenter.reduce_zero_label
    )
    window = window or segmenter.crop_size
    stride = stride or max(1, window * 2 // 3)
    total = torch.zeros(len(segmenter.classes), len(segmenter.classes), dtype=torch.int64)
    for i in range(len(data)):
        image, mask = data[i]
        x = image.to(device).float() / 255
        probs = infer(segmenter, x, mode=mode, window=window, stride=stride, scales=scales, flip=flip)
        total += confusion(probs.argmax(0), mask.to(device), len(segmenter.classes))
    result = scores(total, segmenter.classes)
    result["settings"] = {"mode": mode, "window": window, "stride": stride, "scales": list(scales), "flip": flip}
    target = Path(out) if out is not None else (run / "eval.json" if run is not None and run.is_dir() else None)
    if target is not None:
        atomic_write_bytes(target, json.dumps(result, indent=2).encode())
    return result


def palette(num_classes: int) -> np.ndarray:
    """(K, 3) uint8 colours, one per class: class 0 black, the rest spread over the hue circle, reproducibly."""
    rng = np.random.default_rng(0)
    colours = rng.integers(40, 256, (num_classes, 3), dtype=np.uint8)
    colours[0] = 0
    return colours


@torch.no_grad()
def predict_segmentation(
    inputs: Sequence[PathLike],
    model: PathLike | nn.Module,
    out_dir: PathLike,
    *,
    mode: str = "whole",
    window: int | None = None,
    stride: int | None = None,
    device: str | torch.device = "cpu",
) -> list[dict[str, Any]]:
    """For each image (files, or every image in the folders given): OUT/<stem>_overlay.png (the classes' colours
    over the image) and OUT/<stem>_labels.png (class indices, mode L). Returns one record per image: file, size and
    the share of its pixels each predicted class covers."""
    from PIL import Image

    from gcvit.train.evaluate import image_inputs

    segmenter = load_segmenter(model, device)
    window = window or segmenter.crop_size
    stride = stride or max(1, window * 2 // 3)
    files = image_inputs(inputs)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    colours = palette(len(segmenter.classes))
    records = []
    for file in files:
        rgb = np.asarray(load_rgb(file))
        x = torch.from_numpy(rgb).permute(2, 0, 1).to(device).float() / 255
        labels = infer(segmenter, x, mode=mode, window=window, stride=stride).argmax(0).cpu().numpy().astype(np.uint8)
        overlay = (0.5 * rgb + 0.5 * colours[labels]).round().astype(np.uint8)
        for suffix, array in (("overlay", overlay), ("labels", labels)):
            buffer = _png(Image.fromarray(array))
            atomic_write_bytes(out / f"{Path(file).stem}_{suffix}.png", buffer)
        counts = np.bincount(labels.reshape(-1), minlength=len(segmenter.classes)) / labels.size
        shares = {segmenter.classes[k]: float(v) for k, v in enumerate(counts) if v > 0}
        records.append({"file": str(file), "size": list(labels.shape), "classes": shares})
    return records


def _png(image: Any) -> bytes:
    import io

    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()
