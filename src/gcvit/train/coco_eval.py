"""COCO box and mask AP through pycocotools' COCOeval, never a hand-written AP.

`to_coco_results` turns a detector's outputs into COCO's results format (boxes as [x, y, w, h], the original category
ids, masks as RLE); `coco_ap` scores them against the annotations: AP (IoU 0.50:0.95), AP50, AP75 and AP for small,
medium and large objects, with COCO's 0-1 values, plus the AP of each category.
"""

from __future__ import annotations

import contextlib
import copy
import io
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch

# the names of COCOeval.stats[0:6] in eval.json: AP at IoU 0.50:0.95, 0.50 and 0.75; AP on small, medium, large objects
STATS = ("AP", "AP50", "AP75", "small", "medium", "large")
MASK_THRESHOLD = 0.5  # a Mask R-CNN's per-pixel probabilities -> the binary mask COCO scores


def to_coco_results(
    outputs: Sequence[dict[str, torch.Tensor]], image_ids: Sequence[int], category_ids: Sequence[int]
) -> list[dict[str, Any]]:
    """COCO results of a detector's outputs (torchvision's: "boxes" XYXY in the image's pixels, "labels" 1..K,
    "scores", "masks" (N, 1, H, W) probabilities) for the images `image_ids`; `category_ids[label]` is the id a
    label stands for."""
    from pycocotools import mask as mask_utils

    results = []
    for out, image_id in zip(outputs, image_ids):
        boxes = out["boxes"].detach().float().cpu().clone()  # the caller's stay XYXY
        boxes[:, 2:] -= boxes[:, :2]  # XYXY -> XYWH
        labels, scores = out["labels"].tolist(), out["scores"].tolist()
        rles = []
        if "masks" in out:
            binary = (out["masks"][:, 0] > MASK_THRESHOLD).cpu().numpy().astype(np.uint8)  # (N, H, W)
            for mask in binary:
                rle = mask_utils.encode(np.asfortranarray(mask))
                rles.append({"size": [int(s) for s in rle["size"]], "counts": rle["counts"].decode("ascii")})
        for k, (box, label, score) in enumerate(zip(boxes.tolist(), labels, scores)):
            result = {"image_id": int(image_id), "category_id": int(category_ids[label]), "bbox": box, "score": score}
            if rles:
                result["segmentation"] = rles[k]
            results.append(result)
    return results


def coco_ap(
    ground_truth: Any, results: list[dict[str, Any]], iou_types: Sequence[str] = ("bbox", "segm")
) -> dict[str, dict[str, Any]]:
    """{"bbox": {"AP": ..., "AP50": ..., "AP75": ..., "small": ..., "medium": ..., "large": ..., "per_category": {name:
    AP}}, "segm": {...}} of `results` (COCO results format) against `ground_truth` (pycocotools' COCO, e.g.
    `CocoInstances.coco`), over its images; values in 0-1 as COCO gives them, -1 where COCO has nothing to score
    (no object of that size, say). No results score 0."""
    from pycocotools.cocoeval import COCOeval

    scores = {}
    names = {c["id"]: str(c.get("name", c["id"])) for c in ground_truth.dataset["categories"]}
    for iou_type in iou_types:
        if not results:
            scores[iou_type] = {**dict.fromkeys(STATS, 0.0), "per_category": dict.fromkeys(names.values(), 0.0)}
            continue
        kept = results if iou_type == "bbox" else [r for r in results if "segmentation" in r]
        with contextlib.redirect_stdout(io.StringIO()):  # COCOeval prints its progress and table
            detections = ground_truth.loadRes(copy.deepcopy(kept))  # loadRes adds keys to the dicts it is given
            evaluator = COCOeval(ground_truth, detections, iou_type)
            evaluator.params.imgIds = sorted(ground_truth.getImgIds())
            evaluator.evaluate()
            evaluator.accumulate()
            evaluator.summarize()
        precision = evaluator.eval["precision"]  # (IoUs, recalls, categories, areas, max dets)
        per_category = {}
        for k, cat_id in enumerate(evaluator.params.catIds):
            p = precision[:, :, k, 0, -1]  # all areas, 100 detections
            per_category[names[cat_id]] = float(p[p > -1].mean()) if (p > -1).any() else -1.0
        scores[iou_type] = {**{s: float(v) for s, v in zip(STATS, evaluator.stats[:6])}, "per_category": per_category}
    return scores
