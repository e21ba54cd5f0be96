"""Digit scenes: the embedded detection and instance-segmentation data, made reproducibly from scikit-learn's digits.

Each scene is a `size` x `size` RGB image: a smooth two-colour background with low-frequency texture and grain, and
2 to 5 of the bundled 8 x 8 digits, each scaled to 15-40% of the side (bicubic), in a colour that stands out from its
background, placed so that two boxes overlap by at most a third. A digit's mask is its stroke (where the upscaled
digit is more than half ink); a later digit occludes the earlier ones, whose masks lose what it covers, and their boxes
are the masks' extents. Training scenes draw their digits from the first 80% of scikit-learn's samples, validation
scenes from the rest, so no digit image is in both. `write_digit_scenes` writes them as COCO JSON plus PNGs (masks as
RLE), the format `CocoInstances` reads; `write_segmentation_scenes` writes the same scenes with semantic masks (each
pixel's topmost digit), the folders `SegmentationFolder` reads.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from gcvit.atomic import atomic_write_bytes

CATEGORY_IDS = list(range(1, 11))  # category id of digit d: d + 1 (COCO's ids start at 1)
SEGMENTATION_CLASSES = ["background"] + [str(d) for d in range(10)]  # semantic label of digit d: d + 1
TRAIN_FRACTION = 0.8  # of scikit-learn's 1797 digit samples: the first 80% for training scenes, the rest for validation


def _digits(split: str) -> tuple[np.ndarray, np.ndarray]:
    """(images (n, 8, 8) in [0, 1], labels (n,)) of scikit-learn's digits for 'train' or 'val' scenes."""
    from sklearn.datasets import load_digits

    digits = load_digits()
    cut = int(len(digits.target) * TRAIN_FRACTION)
    part = slice(0, cut) if split == "train" else slice(cut, None)
    return digits.images[part] / 16.0, digits.target[part]


def _background(rng: np.random.Generator, size: int) -> np.ndarray:
    """(size, size, 3) float in [0, 1]: a gradient between two colours, a low-frequency texture and fine grain."""
    a, b = rng.uniform(0, 1, 3), rng.uniform(0, 1, 3)
    angle = rng.uniform(0, 2 * np.pi)
    yy, xx = np.mgrid[0:size, 0:size] / max(size - 1, 1)
    t = (np.cos(angle) * xx + np.sin(angle) * yy - min(0, np.cos(angle)) - min(0, np.sin(angle))) / 1.5
    image = a + (b - a) * t[..., None]
    coarse = rng.uniform(-0.15, 0.15, (4, 4, 3)).astype(np.float32)
    texture = np.stack(
        [np.asarray(Image.fromarray(coarse[..., c]).resize((size, size), Image.BICUBIC)) for c in range(3)], -1
    )
    return np.clip(image + texture + rng.normal(0, 0.03, image.shape), 0, 1)


def _ink(digit: np.ndarray, side: int) -> np.ndarray:
    """A digit (8, 8) in [0, 1] scaled to (side, side) bicubically: its ink in [0, 1]."""
    big = Image.fromarray((digit * 255).astype(np.uint8)).resize((side, side), Image.BICUBIC)
    return np.clip(np.asarray(big, dtype=np.float32) / 255 * 1.3, 0, 1)


def _overlap(box: tuple[int, int, int, int], boxes: list[tuple[int, int, int, int]]) -> float:
    """The largest share of `box`'s or another box's area that their intersection covers."""
    x0, y0, x1, y1 = box
    worst = 0.0
    for a0, b0, a1, b1 in boxes:
        inter = max(0, min(x1, a1) - max(x0, a0)) * max(0, min(y1, b1) - max(y0, b0))
        worst = max(worst, inter / min((x1 - x0) * (y1 - y0), (a1 - a0) * (b1 - b0)))
    return worst


def digit_scenes(n: int, split: str = "train", size: int = 128, seed: int = 0) -> Iterator[tuple[np.ndarray, list]]:
    """`n` scenes: (image (size, size, 3) uint8, objects), each object (digit, mask (size, size) bool), in drawing
    order; the same for the same arguments."""
    if split not in ("train", "val"):
        raise ValueError(f"expected split 'train' or 'val'; got {split!r}")
    if size < 32:
        raise ValueError(f"expected a scene size of at least 32 px; got {size}")
    images, labels = _digits(split)
    rng = np.random.default_rng([seed, 0 if split == "train" else 1])
    for _ in range(n):
        canvas = _background(rng, size)
        objects: list[tuple[int, np.ndarray]] = []
        boxes: list[tuple[int, int, int, int]] = []
        for _ in range(int(rng.integers(2, 6))):
            side = int(rng.uniform(0.15, 0.4) * size)
            for _try in range(20):  # a place where it hides at most a third of another digit, or none
                x, y = (int(v) for v in rng.integers(0, size - side, 2))
                if _overlap((x, y, x + side, y + side), boxes) <= 1 / 3:
                    break
            else:
                continue
            k = int(rng.integers(len(labels)))
            ink = _ink(images[k], side)
            region = canvas[y : y + side, x : x + side]
            colour = np.where(region.mean((0, 1)) > 0.5, rng.uniform(0, 0.25, 3), rng.uniform(0.75, 1, 3))
            canvas[y : y + side, x : x + side] = region * (1 - ink[..., None]) + colour * ink[..., None]
            mask = np.zeros((size, size), bool)
            mask[y : y + side, x : x + side] = ink > 0.5
            for _, other in objects:
                other &= ~mask  # occluded by the new digit
            objects.append((int(labels[k]), mask))
            boxes.append((x, y, x + side, y + side))
        kept = [(d, m) for d, m in objects if m.sum() >= 4]  # a digit hidden almost whole is no object
        yield (canvas * 255).round().astype(np.uint8), kept


def _rle(mask: np.ndarray) -> dict[str, Any]:
    from pycocotools import mask as mask_utils

    rle = mask_utils.encode(np.asfortranarray(mask.astype(np.uint8)))
    return {"size": [int(v) for v in rle["size"]], "counts": rle["counts"].decode("ascii")}


def coco_json(scenes: list[tuple[np.ndarray, list]], names: list[str]) -> dict[str, Any]:
    """COCO instances of `scenes` whose images are saved as `names` (file names)."""
    images, annotations = [], []
    for image_id, ((image, objects), name) in enumerate(zip(scenes, names), start=1):
        images.append({"id": image_id, "file_name": name, "height": image.shape[0], "width": image.shape[1]})
        for digit, mask in objects:
            ys, xs = np.nonzero(mask)
            x0, y0 = int(xs.min()), int(ys.min())
            box = [x0, y0, int(xs.max()) + 1 - x0, int(ys.max()) + 1 - y0]
            annotations.append(
                {
                    "id": len(annotations) + 1,
                    "image_id": image_id,
                    "category_id": CATEGORY_IDS[digit],
                    "bbox": box,
                    "area": int(mask.sum()),
                    "iscrowd": 0,
                    "segmentation": _rle(mask),
                }
            )
    categories = [{"id": CATEGORY_IDS[d], "name": str(d), "supercategory": "digit"} for d in range(10)]
    return {"images": images, "annotations": annotations, "categories": categories}


def write_digit_scenes(
    out_dir: str | Path, n_train: int = 400, n_val: int = 100, size: int = 128, seed: int = 0
) -> dict[str, Path]:
    """Write train/ and val/ PNG folders and train.json, val.json (COCO instances) under `out_dir`; returns the paths
    as {"train_ann", "train_images", "val_ann", "val_images"}. Files are written atomically: a run cut short
    leaves no half-written file."""
    out = Path(out_dir)
    paths = {}
    for split, n in (("train", n_train), ("val", n_val)):
        folder = out / split
        folder.mkdir(parents=True, exist_ok=True)
        scenes = list(digit_scenes(n, split, size, seed))
        names = [f"{split}_{i:05d}.png" for i in range(n)]
        for (image, _), name in zip(scenes, names):
            buffer = _png(image)
            atomic_write_bytes(folder / name, buffer)
        ann = out / f"{split}.json"
        atomic_write_bytes(ann, json.dumps(coco_json(scenes, names)).encode())
        paths[f"{split}_ann"], paths[f"{split}_images"] = ann, folder
    return paths


def semantic_mask(objects: list[tuple[int, np.ndarray]], size: int) -> np.ndarray:
    """(size, size) uint8 labels of a scene's objects: 0 background, digit d -> d + 1. The objects' masks are
    disjoint (a later digit already took what it covers from the earlier ones), so each pixel gets its topmost digit."""
    labels = np.zeros((size, size), np.uint8)
    for digit, mask in objects:
        labels[mask] = digit + 1
    return labels


def write_segmentation_scenes(
    out_dir: str | Path, n_train: int = 400, n_val: int = 100, size: int = 128, seed: int = 0
) -> dict[str, Path]:
    """Write the scenes of `digit_scenes` for semantic segmentation: train/images, train/masks, val/images and
    val/masks under `out_dir`, PNGs of one name per scene; masks in mode 'L' with labels 0..10
    (`SEGMENTATION_CLASSES`). Returns {"train_images", "train_masks", "val_images", "val_masks"}. Files are written
    atomically: a run cut short leaves no half-written file."""
    out = Path(out_dir)
    paths = {}
    for split, n in (("train", n_train), ("val", n_val)):
        images, masks = out / split / "images", out / split / "masks"
        for i, (image, objects) in enumerate(digit_scenes(n, split, size, seed)):
            name = f"{split}_{i:05d}.png"
            atomic_write_bytes(images / name, _png(image))
            atomic_write_bytes(masks / name, _png(semantic_mask(objects, size)))
        paths[f"{split}_images"], paths[f"{split}_masks"] = images, masks
    return paths


def _png(image: np.ndarray) -> bytes:
    import io

    buffer = io.BytesIO()
    Image.fromarray(image).save(buffer, format="PNG")
    return buffer.getvalue()
