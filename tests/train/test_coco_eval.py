"""COCO AP through pycocotools: perfect detections score 1, misplaced ones less, none 0; original category ids."""

from __future__ import annotations

import pytest
import torch

from gcvit.data.coco import CocoInstances
from gcvit.data.digit_scenes import write_digit_scenes
from gcvit.train.coco_eval import STATS, coco_ap, to_coco_results


@pytest.fixture(scope="module")
def scenes(tmp_path_factory: pytest.TempPathFactory) -> CocoInstances:
    paths = write_digit_scenes(tmp_path_factory.mktemp("scenes"), n_train=0, n_val=6, size=64, seed=1)
    return CocoInstances(paths["val_ann"], paths["val_images"])


def _outputs(ds: CocoInstances, shift: float = 0.0) -> list[dict[str, torch.Tensor]]:
    """The ground truth as a Mask R-CNN's outputs (mask probabilities 0.9 / 0.1), boxes moved right by `shift` px."""
    outputs = []
    for i in range(len(ds)):
        _, target = ds.load(i)
        boxes = target["boxes"].as_subclass(torch.Tensor).clone()
        boxes[:, 0::2] += shift
        masks = target["masks"].float()[:, None] * 0.8 + 0.1
        if shift:
            masks = torch.roll(masks, int(shift), dims=-1)
        outputs.append({"boxes": boxes, "labels": target["labels"], "scores": torch.ones(len(boxes)), "masks": masks})
    return outputs


def test_perfect_detections_score_one_and_keep_the_category_ids(scenes: CocoInstances) -> None:
    results = to_coco_results(_outputs(scenes), scenes.ids, scenes.category_ids)
    truth = scenes.coco.dataset["annotations"]
    assert {r["category_id"] for r in results} == {a["category_id"] for a in truth}  # ids 1..10, not labels
    assert len(results) == len(truth) and results[0]["bbox"] == truth[0]["bbox"]  # XYWH, as COCO writes them
    ap = coco_ap(scenes.coco, results)
    for iou_type in ("bbox", "segm"):
        assert ap[iou_type]["AP"] == pytest.approx(1.0) and ap[iou_type]["AP50"] == pytest.approx(1.0)
        present = {str(a["category_id"] - 1) for a in truth}
        assert all(ap[iou_type]["per_category"][name] == pytest.approx(1.0) for name in present)
        assert set(ap[iou_type]) == {*STATS, "per_category"}


def test_misplaced_and_missing_detections_score_less(scenes: CocoInstances) -> None:
    shifted = coco_ap(scenes.coco, to_coco_results(_outputs(scenes, shift=4.0), scenes.ids, scenes.category_ids))
    assert 0.0 < shifted["bbox"]["AP"] < 0.9 and shifted["bbox"]["AP50"] > shifted["bbox"]["AP75"]
    nudged = coco_ap(scenes.coco, to_coco_results(_outputs(scenes, shift=1.0), scenes.ids, scenes.category_ids))
    assert 0.0 < nudged["segm"]["AP"] < 0.9  # thin strokes: one pixel costs much of their IoU
    none = coco_ap(scenes.coco, [])
    assert none["bbox"]["AP"] == 0.0 and none["segm"]["AP50"] == 0.0
    half = to_coco_results(_outputs(scenes)[:3], scenes.ids[:3], scenes.category_ids)  # half the images found
    assert 0.2 < coco_ap(scenes.coco, half, ("bbox",))["bbox"]["AP"] < 0.8
