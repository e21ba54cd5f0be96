"""A COCO-format instance set made of real photographs, as users bring one: objects cut out of scikit-learn's two
bundled photos (china.jpg, flower.jpg) along polygons, pasted at varied scales onto real textures cropped from
their object-free parts. It has what a user's set has and the digit scenes lack: polygon segmentations, category ids
that are not 1..n (3, 7, 11, 20, 42), an image without objects, JPEG and PNG files of different sizes.

`write_photo_objects(out)` writes train/ and val/ image folders with train.json and val.json, the same for the same
seed. The slow test in tests/train/test_detection.py trains on it from scratch through `gcvit detect train`.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

# each object: category id, name, photo, outline polygon in the photo's pixels (640 x 427)
_OBJECTS = [
    (
        3,
        "pagoda",
        "china",
        [
            (196, 24),
            (208, 24),
            (320, 110),
            (300, 124),
            (316, 170),
            (336, 184),
            (330, 250),
            (356, 270),
            (370, 340),
            (350, 380),
            (300, 400),
            (180, 410),
            (90, 390),
            (70, 340),
            (80, 280),
            (60, 260),
            (90, 236),
            (84, 190),
            (76, 170),
            (110, 124),
            (96, 110),
        ],
    ),
    (7, "dahlia", "flower", [(306 + 136 * np.cos(a), 234 + 136 * np.sin(a)) for a in np.linspace(0, 2 * np.pi, 24)]),
    (11, "tree", "china", [(536, 140), (580, 124), (630, 140), (639, 426), (524, 426), (530, 300), (544, 220)]),
    (20, "bush", "china", [(0, 320), (60, 330), (120, 344), (200, 356), (240, 380), (250, 426), (0, 426)]),
    (42, "bud", "flower", [(366 + 80 * np.cos(a), 426 - 64 * np.sin(a)) for a in np.linspace(0, np.pi, 12)]),
]
# object-free parts of the photos (x0, y0, x1, y1): green bokeh left and right of the dahlia, the sky over the lake
_TEXTURES = [("flower", (0, 0, 160, 427)), ("flower", (470, 0, 640, 300)), ("china", (390, 0, 640, 110))]


def _photos() -> dict[str, np.ndarray]:
    from sklearn.datasets import load_sample_images

    bundle = load_sample_images()
    return {Path(f).stem: image for f, image in zip(bundle.filenames, bundle.images)}


def _background(rng: np.random.Generator, photos: dict[str, np.ndarray], h: int, w: int) -> Image.Image:
    name, (x0, y0, x1, y1) = _TEXTURES[int(rng.integers(len(_TEXTURES)))]
    cw, ch = int(rng.integers((x1 - x0) // 2, x1 - x0 + 1)), int(rng.integers((y1 - y0) // 2, y1 - y0 + 1))
    cx, cy = int(rng.integers(x0, x1 - cw + 1)), int(rng.integers(y0, y1 - ch + 1))
    crop = Image.fromarray(photos[name][cy : cy + ch, cx : cx + cw]).resize((w, h), Image.BICUBIC)
    return crop.transpose(Image.FLIP_LEFT_RIGHT) if rng.random() < 0.5 else crop


def _scene(rng: np.random.Generator, photos: dict[str, np.ndarray], empty: bool) -> tuple[Image.Image, list[dict]]:
    h, w = (int(v) for v in rng.integers(224, 385, 2))
    canvas = _background(rng, photos, h, w)
    placed: list[tuple[float, float, float, float]] = []
    objects = []
    for _ in range(0 if empty else int(rng.integers(1, 4))):
        category, _name, photo, outline = _OBJECTS[int(rng.integers(len(_OBJECTS)))]
        poly = np.array(outline, dtype=np.float64)
        x0, y0 = poly.min(0)
        x1, y1 = poly.max(0)
        scale = rng.uniform(0.3, 0.55) * min(h, w) / max(x1 - x0, y1 - y0)
        ow, oh = (x1 - x0) * scale, (y1 - y0) * scale
        for _try in range(30):  # a place that overlaps no placed object
            ox, oy = rng.uniform(0, w - ow), rng.uniform(0, h - oh)
            if all(ox + ow <= a0 or a1 <= ox or oy + oh <= b0 or b1 <= oy for a0, b0, a1, b1 in placed):
                break
        else:
            continue
        placed.append((ox, oy, ox + ow, oy + oh))
        patch = Image.fromarray(photos[photo][int(y0) : int(np.ceil(y1)), int(x0) : int(np.ceil(x1))])
        patch = patch.resize((max(1, round(ow)), max(1, round(oh))), Image.BICUBIC)
        target = (poly - [x0, y0]) * scale + [ox, oy]  # the outline where the object lands
        mask = Image.new("L", (w, h), 0)
        ImageDraw.Draw(mask).polygon([tuple(p) for p in target], fill=255)
        layer = Image.new("RGB", (w, h))
        layer.paste(patch, (round(ox), round(oy)))
        canvas = Image.composite(layer, canvas, mask)
        bx0, by0 = target.min(0).clip(0)
        bx1, by1 = np.minimum(target.max(0), [w, h])
        objects.append(
            {
                "category_id": category,
                "segmentation": [[round(float(v), 2) for v in target.reshape(-1)]],
                "bbox": [round(float(v), 2) for v in (bx0, by0, bx1 - bx0, by1 - by0)],
                "area": float(np.asarray(mask).astype(bool).sum()),
                "iscrowd": 0,
            }
        )
    return canvas, objects


def write_photo_objects(out: str | Path, n_train: int = 64, n_val: int = 16, seed: int = 0) -> dict[str, Path]:
    """Write the set under `out`; returns {"train_ann", "train_images", "val_ann", "val_images"}. Every third image
    is a JPEG, the others PNG; the first image of each split has no object."""
    out = Path(out)
    photos = _photos()
    categories = [{"id": c, "name": name, "supercategory": "photo"} for c, name, *_ in _OBJECTS]
    paths: dict[str, Path] = {}
    for split, n in (("train", n_train), ("val", n_val)):
        rng = np.random.default_rng([seed, 0 if split == "train" else 1])
        folder = out / split
        folder.mkdir(parents=True, exist_ok=True)
        images, annotations = [], []
        for i in range(n):
            image, objects = _scene(rng, photos, empty=i == 0)
            name = f"{split}_{i:03d}." + ("jpg" if i % 3 == 2 else "png")
            image.save(folder / name, quality=92) if name.endswith("jpg") else image.save(folder / name)
            image_id = 1000 + i  # ids of any value, as users' sets have
            images.append({"id": image_id, "file_name": name, "height": image.height, "width": image.width})
            for obj in objects:
                annotations.append({"id": len(annotations) + 1, "image_id": image_id, **obj})
        ann = out / f"{split}.json"
        ann.write_text(json.dumps({"images": images, "annotations": annotations, "categories": categories}))
        paths[f"{split}_ann"], paths[f"{split}_images"] = ann, folder
    return paths
