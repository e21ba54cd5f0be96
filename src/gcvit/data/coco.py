"""COCO-format instance annotations with their image folder, as detection and instance segmentation read them.

The annotations are read with pycocotools (polygon and RLE masks alike). Category ids of any value become labels 1..K
in id order (0 is the background of torchvision's detectors); `category_ids[label]` maps a label back to its id, so
every output carries the original ids. Crowd regions (`iscrowd`: 1) are left out of the training targets, as COCO's
evaluation ignores detections on them; images without objects are kept. What cannot be used is counted and said
once, or refused with `strict_data`: images named but absent or unreadable (skipped), boxes of zero or negative size
and degenerate polygons (dropped). Images of any mode (grey, CMYK, 16-bit, palette) are read as 8-bit RGB.
"""

from __future__ import annotations

import contextlib
import io
import json
import logging
import os
from collections import Counter
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image
from torchvision import tv_tensors

from gcvit.data.datasets import DataError
from gcvit.data.transforms import load_rgb
from gcvit.extras import install_hint

logger = logging.getLogger(__name__)

REQUIRED = {
    "images": ("id", "file_name"),
    "annotations": ("id", "image_id", "category_id", "bbox"),
    "categories": ("id",),
}


def read_annotations(path: str | os.PathLike[str]) -> dict[str, Any]:
    """A COCO instances JSON as a mapping; a DataError naming the file and the first key missing where it is no COCO
    file."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"{path} does not exist; expected a COCO-format annotations JSON")
    try:
        data = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise DataError(f"{path} is not JSON ({e}); expected COCO-format instance annotations") from None
    if not isinstance(data, dict):
        raise DataError(f"{path}: expected a JSON object with 'images', 'annotations' and 'categories'")
    for key, fields in REQUIRED.items():
        if not isinstance(data.get(key), list):
            raise DataError(f"{path} is not COCO instance annotations: it has no {key!r} list")
        for i, entry in enumerate(data[key]):
            missing = [f for f in fields if not isinstance(entry, dict) or f not in entry]
            if missing:
                raise DataError(f"{path}: {key}[{i}] lacks {missing[0]!r}; expected COCO's {list(fields)}")
    return data


def _coco(data: Mapping[str, Any]) -> Any:
    """pycocotools' COCO index of `data` (its 'creating index...' lines silenced)."""
    try:
        from pycocotools.coco import COCO
    except ImportError as e:
        raise ImportError(f"COCO annotations need pycocotools: {install_hint('detection')}") from e
    coco = COCO()
    coco.dataset = dict(data)
    with contextlib.redirect_stdout(io.StringIO()):
        coco.createIndex()
    return coco


def _polygons_ok(segmentation: Any) -> bool:
    """Whether a polygon segmentation has at least one polygon of three points (RLE is always usable)."""
    if isinstance(segmentation, list):
        return any(isinstance(p, list) and len(p) >= 6 for p in segmentation)
    return isinstance(segmentation, dict) and "counts" in segmentation and "size" in segmentation


class CocoInstances(torch.utils.data.Dataset):
    """(image, target) pairs of a COCO-format annotations JSON and its image folder.

    The image is a `tv_tensors.Image` (3, H, W) uint8; the target holds "boxes" (`tv_tensors.BoundingBoxes`, XYXY
    in pixels), "labels" (int64, 1..K), "masks" (`tv_tensors.Mask` (N, H, W) uint8, with `masks`) and "image_id"
    (the annotations' id). `transform(image, target)` is a torchvision.transforms.v2 transform (boxes and masks
    follow the image).
    """

    def __init__(
        self,
        annotations: str | os.PathLike[str],
        images: str | os.PathLike[str],
        transform: Callable[..., Any] | None = None,
        *,
        masks: bool = True,
        strict_data: bool = False,
    ) -> None:
        self.annotations_file = Path(annotations)
        self.root = Path(images)
        if not self.root.is_dir():
            raise DataError(f"{self.root} is not a folder; expected the folder of the images the annotations name")
        data = read_annotations(self.annotations_file)
        self.coco = _coco(data)
        self.transform = transform
        self.masks = masks
        categories = sorted(data["categories"], key=lambda c: c["id"])
        self.category_ids = [0] + [c["id"] for c in categories]  # label -> category id (0: background)
        self.classes = [str(c.get("name", c["id"])) for c in categories]  # label - 1 -> name
        self.label_of = {c["id"]: i + 1 for i, c in enumerate(categories)}
        unknown = sorted({a["category_id"] for a in data["annotations"]} - set(self.label_of))
        if unknown:
            raise DataError(
                f"{self.annotations_file}: annotations name category id {unknown[0]}, which 'categories' does not list "
                f"(it lists {sorted(self.label_of)})"
            )
        self.dropped: Counter[str] = Counter()
        self.ids = self._usable_images(data["images"], strict_data)
        self.targets = {i: self._annotations(i, strict_data) for i in self.ids}
        self._report()

    def _usable_images(self, images: list[dict[str, Any]], strict: bool) -> list[int]:
        usable = []
        for entry in images:
            path = self.root / entry["file_name"]
            try:
                with Image.open(path) as image:  # the header only: a file that is no image fails here
                    W, H = image.size
            except (OSError, SyntaxError, ValueError) as e:
                why = "absent" if not path.exists() else f"unreadable ({e})"
                if strict:
                    raise DataError(
                        f"{path} is named in {self.annotations_file.name} but {why} (--strict-data)"
                    ) from None
                self.dropped["images absent or unreadable"] += 1
                continue
            size = (entry.get("height", H), entry.get("width", W))
            if size != (H, W):  # masks are drawn at the recorded size: another one would misplace them
                raise DataError(
                    f"{self.annotations_file}: image {entry['id']} is recorded as {size[0]}x{size[1]} (height x width) "
                    f"but {path} is {H}x{W}"
                )
            self.coco.imgs[entry["id"]].update(height=H, width=W)
            usable.append(entry["id"])
        if not usable:
            raise DataError(
                f"none of the {len(images)} images of {self.annotations_file} could be read from {self.root}"
            )
        return usable

    def _annotations(self, image_id: int, strict: bool) -> list[dict[str, Any]]:
        kept = []
        for ann in self.coco.imgToAnns.get(image_id, []):
            if ann.get("iscrowd", 0):
                self.dropped["crowd regions (ignored, as COCO does)"] += 1
                continue
            w, h = ann["bbox"][2:]
            problem = None
            if not (w > 0 and h > 0):
                problem = "boxes of zero or negative size"
            elif self.masks and not _polygons_ok(ann.get("segmentation")):
                problem = "degenerate or missing masks"
            if problem:
                if strict:
                    raise DataError(
                        f"{self.annotations_file}: annotation {ann['id']} has {problem[:-2]} (--strict-data)"
                    )
                self.dropped[problem] += 1
                continue
            kept.append(ann)
        return kept

    def _report(self) -> None:
        if self.dropped:
            said = ", ".join(f"{n} {what}" for what, n in sorted(self.dropped.items()))
            logger.warning("%s: left out %s (--strict-data refuses them)", self.annotations_file, said)

    def __len__(self) -> int:
        return len(self.ids)

    def load(self, index: int) -> tuple[tv_tensors.Image, dict[str, Any]]:
        """The image and its target before the transform."""
        image_id = self.ids[index]
        entry = self.coco.imgs[image_id]
        image = tv_tensors.Image(torch.from_numpy(np.array(load_rgb(self.root / entry["file_name"]))).permute(2, 0, 1))
        H, W = image.shape[-2:]
        anns = self.targets[image_id]
        boxes = torch.tensor([a["bbox"] for a in anns], dtype=torch.float32).reshape(-1, 4)
        boxes[:, 2:] += boxes[:, :2]  # XYWH -> XYXY
        target: dict[str, Any] = {
            "boxes": tv_tensors.BoundingBoxes(boxes, format="XYXY", canvas_size=(H, W)),
            "labels": torch.tensor([self.label_of[a["category_id"]] for a in anns], dtype=torch.int64),
            "image_id": image_id,
        }
        if self.masks:
            masks = [self.coco.annToMask(a) for a in anns]  # polygons and RLE alike
            stacked = np.stack(masks) if masks else np.zeros((0, H, W), np.uint8)
            target["masks"] = tv_tensors.Mask(torch.from_numpy(stacked))
        return image, target

    def __getitem__(self, index: int) -> tuple[Any, dict[str, Any]]:
        image, target = self.load(index)
        return self.transform(image, target) if self.transform is not None else (image, target)
