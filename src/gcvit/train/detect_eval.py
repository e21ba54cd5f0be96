"""Evaluating a trained detector (COCO box and mask AP, written to eval.json) and predicting with it (PNGs with the
boxes, masks, class names and scores drawn, and predictions.json in COCO's results format with the original
category ids)."""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn
from torchvision.utils import draw_bounding_boxes, draw_segmentation_masks

from gcvit.atomic import atomic_write_bytes
from gcvit.data.coco import CocoInstances
from gcvit.data.transforms import load_rgb
from gcvit.loading import load
from gcvit.train.coco_eval import MASK_THRESHOLD, coco_ap, to_coco_results
from gcvit.train.detection import TO_FLOAT, collate, detect_each

logger = logging.getLogger(__name__)

PathLike = str | os.PathLike[str]
DRAW_SIDE = 384  # px: the shorter side below which predict enlarges an image before drawing on it


def load_detector(model: PathLike | nn.Module, device: str | torch.device = "cpu") -> nn.Module:
    """A detector in eval mode: one given as it is, else a detection run, checkpoint or saved folder (`gcvit.load`)."""
    detector = model if isinstance(model, nn.Module) else load(model, device=device)
    if not hasattr(detector, "category_ids"):
        raise ValueError(
            f"{model} is not a detector (its config.json has no 'task': 'detection'); `gcvit eval` reads it"
        )
    return detector.to(device).eval()


def _run_val_data(run: Path) -> tuple[Path, Path]:
    """(annotations, images) a detection run validated on, from its config.yaml."""
    from gcvit.train.config import read_yaml
    from gcvit.train.detection import data_paths, detect_config_from

    paths = data_paths(detect_config_from(read_yaml(run / "config.yaml", check=False)))
    return paths["val_ann"], paths["val_images"]


@torch.no_grad()
def evaluate_detector(
    model: PathLike | nn.Module,
    annotations: PathLike | None = None,
    images: PathLike | None = None,
    *,
    out: PathLike | None = None,
    batch_size: int = 2,
    device: str | torch.device = "cpu",
) -> dict[str, dict[str, Any]]:
    """COCO box (and mask) AP of a detector on COCO-format data: the run's own validation data when `annotations`
    and `images` are not given. Written as JSON to `out` (default: RUN/eval.json for a run folder).

    Returns:
        {"bbox": {"AP": ..., "AP50": ..., "AP75": ..., "small": ..., "medium": ..., "large": ...,
        "per_category": {...}}, "segm": {...}} with COCO's 0-1 values.
    """
    if (annotations is None) != (images is None):
        raise ValueError("give both --ann and --images, or neither (the run's own validation data)")
    detector = load_detector(model, device)
    run = Path(model) if not isinstance(model, nn.Module) else None
    if annotations is None:
        if run is None or not (run / "config.yaml").is_file():
            raise ValueError("--ann and --images are needed: the model is not a run folder with its config.yaml")
        annotations, images = _run_val_data(run)
    masks = hasattr(detector, "roi_heads") and detector.roi_heads.has_mask()
    data = CocoInstances(annotations, images, TO_FLOAT, masks=False)
    known = set(detector.category_ids[1:])
    unknown = sorted(set(data.category_ids[1:]) - known)
    if unknown:
        raise ValueError(
            f"{annotations} has categories {unknown} the detector was not trained on (it knows {sorted(known)})"
        )
    loader = torch.utils.data.DataLoader(data, batch_size=batch_size, collate_fn=collate)
    results = []
    for batch_images, targets in loader:
        outputs = detect_each(detector, batch_images, device)
        results += to_coco_results(outputs, [t["image_id"] for t in targets], detector.category_ids)
    scores = coco_ap(data.coco, results, ("bbox", "segm") if masks else ("bbox",))
    target = Path(out) if out is not None else (run / "eval.json" if run is not None and run.is_dir() else None)
    if target is not None:
        atomic_write_bytes(target, json.dumps(scores, indent=2).encode())
    return scores


@torch.no_grad()
def predict_detections(
    inputs: Sequence[PathLike],
    model: PathLike | nn.Module,
    out_dir: PathLike,
    *,
    score_threshold: float = 0.5,
    device: str | torch.device = "cpu",
) -> list[dict[str, Any]]:
    """Detect objects in images (files, or folders searched for images); write OUT/<stem>.png with the detections
    drawn and OUT/predictions.json (COCO results, the original category ids, with "file_name" and "category_name"
    added; "image_id" is the image's index). Returns the results."""
    from gcvit.train.evaluate import image_inputs

    if not 0 <= score_threshold <= 1:
        raise ValueError(f"expected --score-threshold in [0, 1]; got {score_threshold}")
    files = image_inputs(inputs)
    detector = load_detector(model, device)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    results: list[dict[str, Any]] = []
    names = dict(zip(detector.category_ids[1:], detector.classes))  # category id -> class name
    for index, file in enumerate(files):
        try:
            image = torch.from_numpy(np.array(load_rgb(file))).permute(2, 0, 1)  # (3, H, W) uint8
        except (OSError, SyntaxError, ValueError) as e:
            logger.warning("skipped unreadable image %s: %s", file, e)
            continue
        output = detector([image.float().div(255).to(device)])[0]
        keep = output["scores"] >= score_threshold
        output = {k: v[keep].cpu() for k, v in output.items()}
        for r in to_coco_results([output], [index], detector.category_ids):
            results.append(r | {"file_name": str(file), "category_name": names[r["category_id"]]})
        atomic_write_bytes(out / f"{Path(file).stem}.png", _drawn(image, output, detector.classes))
    atomic_write_bytes(out / "predictions.json", json.dumps(results, indent=1).encode())
    return results


def _drawn(image: torch.Tensor, output: dict[str, torch.Tensor], classes: list[str]) -> bytes:
    """PNG bytes of `image` with masks (translucent), boxes, class names and scores drawn (torchvision.utils).
    Images shorter than DRAW_SIDE px are enlarged first by a whole factor (pixels repeated), so that the labels stay
    legible."""
    import io

    from PIL import Image

    factor = max(1, -(-DRAW_SIDE // min(image.shape[-2:])))
    if factor > 1:
        image = image.repeat_interleave(factor, -2).repeat_interleave(factor, -1)
    if "masks" in output and len(output["masks"]):
        masks = output["masks"][:, 0] > MASK_THRESHOLD
        masks = masks.repeat_interleave(factor, -2).repeat_interleave(factor, -1)
        image = draw_segmentation_masks(image, masks, alpha=0.45)
    labels = [f"{classes[int(k) - 1]} {s:.2f}" for k, s in zip(output["labels"], output["scores"])]
    if len(output["boxes"]):
        image = draw_bounding_boxes(
            image, output["boxes"] * factor, labels=labels, width=2, fill_labels=True, label_colors="white"
        )
    buffer = io.BytesIO()
    Image.fromarray(image.permute(1, 2, 0).numpy()).save(buffer, format="PNG")
    return buffer.getvalue()
