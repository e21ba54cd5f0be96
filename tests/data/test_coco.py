"""COCO-format instances as users bring them (`CocoInstances`) and the embedded digit scenes written in that format."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from torchvision.transforms import v2

from gcvit.data import DataError
from gcvit.data.coco import CocoInstances, read_annotations
from gcvit.data.digit_scenes import CATEGORY_IDS, _digits, digit_scenes, write_digit_scenes


def _users_set(root: Path) -> Path:
    """Four images of different modes and sizes; category ids 3, 7, 42; a polygon, an RLE mask, a crowd region, an
    image without objects, a zero-size box, a degenerate polygon, an image named but absent."""
    (root / "images").mkdir(parents=True)
    Image.fromarray(np.full((40, 60, 3), 90, np.uint8)).save(root / "images" / "rgb.jpg")
    Image.fromarray(np.full((50, 30), 120, np.uint8), "L").save(root / "images" / "grey.png")
    Image.fromarray(np.full((32, 32), 40000, np.uint16)).save(root / "images" / "deep.png")
    Image.new("CMYK", (20, 24), (0, 50, 100, 0)).save(root / "images" / "cmyk.jpg")
    rle_mask = np.zeros((50, 30), np.uint8, order="F")
    rle_mask[10:20, 5:15] = 1
    from pycocotools import mask as mask_utils

    rle = mask_utils.encode(rle_mask)
    rle["counts"] = rle["counts"].decode()
    data = {
        "images": [
            {"id": 1, "file_name": "rgb.jpg", "height": 40, "width": 60},
            {"id": 2, "file_name": "grey.png", "height": 50, "width": 30},
            {"id": 3, "file_name": "deep.png"},  # no size recorded: read from the file
            {"id": 4, "file_name": "cmyk.jpg", "height": 24, "width": 20},
            {"id": 5, "file_name": "gone.png", "height": 10, "width": 10},
        ],
        "annotations": [
            {
                "id": 1,
                "image_id": 1,
                "category_id": 42,
                "bbox": [10, 5, 20, 10],
                "segmentation": [[10, 5, 30, 5, 30, 15, 10, 15]],
            },
            {"id": 2, "image_id": 1, "category_id": 3, "bbox": [0, 0, 0, 5], "segmentation": [[0, 0, 0, 5, 1, 5]]},
            {"id": 3, "image_id": 2, "category_id": 7, "bbox": [5, 10, 10, 10], "segmentation": rle},
            {"id": 4, "image_id": 2, "category_id": 3, "bbox": [0, 0, 30, 50], "segmentation": rle, "iscrowd": 1},
            {"id": 5, "image_id": 4, "category_id": 3, "bbox": [2, 2, 5, 5], "segmentation": [[2, 2, 7, 2]]},
        ],
        "categories": [{"id": 42, "name": "cat"}, {"id": 3, "name": "bird"}, {"id": 7, "name": "dog"}],
    }
    (root / "ann.json").write_text(json.dumps(data))
    return root / "ann.json"


def test_a_users_coco_set_is_read_as_coco_reads_it(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    ann = _users_set(tmp_path)
    with caplog.at_level(logging.WARNING):
        ds = CocoInstances(ann, tmp_path / "images")
    assert ds.classes == ["bird", "dog", "cat"] and ds.category_ids == [0, 3, 7, 42]  # labels 1..3 in id order
    warning = caplog.records[-1].getMessage()
    assert "1 boxes of zero or negative size" in warning and "1 crowd regions" in warning
    assert "1 degenerate or missing masks" in warning and "1 images absent or unreadable" in warning
    assert len(ds) == 4  # gone.png skipped; the grey, 16-bit and CMYK images kept, with or without objects
    image, target = ds[0]
    assert image.shape == (3, 40, 60) and image.dtype == torch.uint8
    assert target["boxes"].tolist() == [[10.0, 5.0, 30.0, 15.0]] and target["labels"].tolist() == [3]  # cat: id 42
    assert target["masks"].shape == (1, 40, 60) and target["masks"][0, 7, 20] == 1 and target["masks"][0, 20, 20] == 0
    image, target = ds[1]  # the RLE mask; the crowd region left out
    assert image.shape == (3, 50, 30) and target["labels"].tolist() == [2]
    assert int(target["masks"].sum()) == 100 and target["masks"][0, 15, 10] == 1
    for index, size in ((2, (32, 32)), (3, (24, 20))):  # 16-bit grey, CMYK; the second has no object left
        image, target = ds[index]
        assert image.shape == (3, *size) and len(target["boxes"]) == len(target["labels"]) == len(target["masks"])
    assert ds[3][1]["boxes"].shape == (0, 4) and ds[3][1]["masks"].shape == (0, 24, 20)
    with pytest.raises(DataError, match=r"gone.png is named in ann.json but absent \(--strict-data\)"):
        CocoInstances(ann, tmp_path / "images", strict_data=True)


def test_flips_move_boxes_and_masks_with_the_image(tmp_path: Path) -> None:
    ds = CocoInstances(_users_set(tmp_path), tmp_path / "images", v2.RandomHorizontalFlip(p=1.0))
    _, target = ds[0]
    assert target["boxes"].tolist() == [[30.0, 5.0, 50.0, 15.0]]  # x -> 60 - x
    ys, xs = torch.nonzero(target["masks"][0], as_tuple=True)
    assert xs.min().item() >= 29 and xs.max().item() <= 50 and ys.min().item() >= 5


def test_annotations_that_are_not_coco_are_named(tmp_path: Path) -> None:
    (tmp_path / "images").mkdir()
    Image.new("RGB", (8, 8)).save(tmp_path / "images" / "a.png")
    cases = [
        ("{not json", "is not JSON"),
        ("[1, 2]", "expected a JSON object with 'images', 'annotations' and 'categories'"),
        ('{"images": [], "annotations": []}', "it has no 'categories' list"),
        ('{"images": [{"id": 1}], "annotations": [], "categories": []}', r"images\[0\] lacks 'file_name'"),
    ]
    for text, message in cases:
        (tmp_path / "bad.json").write_text(text)
        with pytest.raises(DataError, match=message):
            read_annotations(tmp_path / "bad.json")
    data = {
        "images": [{"id": 1, "file_name": "a.png"}],
        "annotations": [{"id": 1, "image_id": 1, "category_id": 9, "bbox": [0, 0, 2, 2]}],
        "categories": [{"id": 1, "name": "x"}],
    }
    (tmp_path / "ann.json").write_text(json.dumps(data))
    with pytest.raises(DataError, match=r"category id 9, which 'categories' does not list \(it lists \[1\]\)"):
        CocoInstances(tmp_path / "ann.json", tmp_path / "images", masks=False)
    data["annotations"][0]["category_id"] = 1
    data["images"][0] |= {"height": 9, "width": 8}
    (tmp_path / "ann.json").write_text(json.dumps(data))
    with pytest.raises(DataError, match=r"image 1 is recorded as 9x8 \(height x width\) but .*a.png is 8x8"):
        CocoInstances(tmp_path / "ann.json", tmp_path / "images", masks=False)
    with pytest.raises(DataError, match="does not exist; expected a COCO-format annotations JSON"):
        CocoInstances(tmp_path / "none.json", tmp_path / "images")


def test_digit_scenes_are_reproducible_and_their_masks_are_their_strokes() -> None:
    first = list(digit_scenes(6, "train", size=96, seed=3))
    again = list(digit_scenes(6, "train", size=96, seed=3))
    assert all(np.array_equal(a[0], b[0]) for a, b in zip(first, again))
    assert not np.array_equal(first[0][0], next(digit_scenes(1, "val", size=96, seed=3))[0])
    counts = [len(objects) for _, objects in first]
    assert all(1 <= n <= 5 for n in counts) and sum(counts) >= 12
    for image, objects in first:
        for digit, mask in objects:
            assert 0 <= digit <= 9 and mask.sum() >= 4
        union = np.zeros(image.shape[:2], int)
        for _, mask in objects:
            union += mask
        assert union.max() <= 1  # occlusion: no pixel belongs to two digits
    train, val = _digits("train")[0], _digits("val")[0]
    assert len(train) + len(val) == 1797 and not any((train == v).all((1, 2)).any() for v in val[:50])


def test_written_digit_scenes_read_back_as_coco(tmp_path: Path) -> None:
    paths = write_digit_scenes(tmp_path, n_train=5, n_val=3, size=64, seed=0)
    ds = CocoInstances(paths["train_ann"], paths["train_images"])
    assert len(ds) == 5 and ds.classes == [str(d) for d in range(10)] and ds.category_ids[1:] == CATEGORY_IDS
    scenes = list(digit_scenes(5, "train", size=64, seed=0))
    for i, (image, objects) in enumerate(scenes):
        read, target = ds[i]
        assert np.array_equal(read.permute(1, 2, 0).numpy(), image)
        assert target["labels"].tolist() == [d + 1 for d, _ in objects]
        assert all(np.array_equal(m.numpy().astype(bool), mask) for m, (_, mask) in zip(target["masks"], objects))
        for box, (_, mask) in zip(target["boxes"].tolist(), objects):
            ys, xs = np.nonzero(mask)
            assert box == [xs.min(), ys.min(), xs.max() + 1, ys.max() + 1]
    assert json.loads(paths["val_ann"].read_text())["images"][0]["file_name"] == "val_00000.png"


def test_the_photo_set_reads_with_its_polygons_ids_and_empty_image(tmp_path: Path) -> None:
    from tests.data.photo_objects import write_photo_objects

    paths = write_photo_objects(tmp_path, n_train=6, n_val=2)
    again = write_photo_objects(tmp_path / "again", n_train=6, n_val=2)
    assert paths["train_ann"].read_text() == again["train_ann"].read_text()  # reproducible
    data = CocoInstances(paths["train_ann"], paths["train_images"], masks=True)
    assert data.category_ids == [0, 3, 7, 11, 20, 42] and data.classes == ["pagoda", "dahlia", "tree", "bush", "bud"]
    sizes = set()
    for i in range(len(data)):
        image, target = data[i]
        sizes.add(tuple(image.shape[-2:]))
        assert len(target["boxes"]) == len(target["masks"]) == len(target["labels"])
        for box, mask in zip(target["boxes"], target["masks"]):
            ys, xs = torch.nonzero(mask, as_tuple=True)  # the polygon's mask lies in its box
            assert xs.min() >= box[0] - 1 and xs.max() <= box[2] and ys.min() >= box[1] - 1 and ys.max() <= box[3]
    assert len(data[0][1]["boxes"]) == 0 and len(sizes) > 1
    assert {p.suffix for p in paths["train_images"].iterdir()} == {".png", ".jpg"}
