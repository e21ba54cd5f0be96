"""Semantic segmentation data: folders of images and masks paired by name, ADE20K's layout, and the transforms of the
standard UPerNet recipe (mmseg's ADE20K pipeline) on torchvision's v2 API.

A mask is a PNG of class indices, 8-bit grey ('L') or palette ('P': the palette's indices are the labels), of its
image's size; 255 marks pixels to ignore. With `reduce_zero_label` (ADE20K's convention) label 0 ("other") is ignored
and every other label moves down by one. Everything is checked once when the dataset is made: what cannot be used
(an image without a mask, an unreadable file, a mask of another size) is counted and said once, or refused with
`strict_data`; a mask of colours, or a label that is no class, is always refused, naming the file.
"""

from __future__ import annotations

import logging
import os
from collections import Counter
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image
from torchvision import tv_tensors
from torchvision.transforms import v2

from gcvit.data.datasets import IMG_EXTENSIONS, DataError, image_files
from gcvit.data.transforms import load_rgb

logger = logging.getLogger(__name__)

IGNORE_INDEX = 255  # the mask value that losses and metrics skip (mmseg's ignore_index)
ADE20K_NUM_CLASSES = 150  # with reduce_zero_label: ADE20K's label 0 ("other") is ignored
ADE20K_FOLDERS = {
    "train_images": "images/training",
    "train_masks": "annotations/training",
    "val_images": "images/validation",
    "val_masks": "annotations/validation",
}
MASK_MODES = ("L", "P")
# uint8 image -> float32 in [0, 1]; the mask keeps its int64 labels
TO_FLOAT = v2.ToDtype({tv_tensors.Image: torch.float32, "others": None}, scale=True)


def read_class_names(path: str | os.PathLike[str]) -> list[str]:
    """Class names from a text file, one a line (label 0 first); blank lines ignored, spaces around a name dropped."""
    path = Path(path)
    try:
        names = [line.strip() for line in path.read_text().splitlines() if line.strip()]
    except (OSError, UnicodeDecodeError) as e:
        raise DataError(f"{path} cannot be read ({e}); expected a text file of class names, one a line") from None
    if not names:
        raise DataError(f"{path} holds no class names; expected one a line")
    return names


def ade20k_paths(root: str | os.PathLike[str]) -> dict[str, Path]:
    """The image and mask folders of ADE20K (SceneParsing's ADEChallengeData2016) as {"train_images",
    "train_masks", "val_images", "val_masks"}; `root` is that folder or one that holds it. Read them with
    `num_classes=ADE20K_NUM_CLASSES, reduce_zero_label=True`."""
    root = Path(root)
    base = root / "ADEChallengeData2016" if (root / "ADEChallengeData2016").is_dir() else root
    if not base.is_dir():
        raise DataError(f"{root} is not a folder; expected ADE20K's ADEChallengeData2016 or a folder holding it")
    paths = {key: base / sub for key, sub in ADE20K_FOLDERS.items()}
    for key, path in paths.items():
        if not path.is_dir():
            raise DataError(
                f"{base} has no {ADE20K_FOLDERS[key]}; expected ADE20K's ADEChallengeData2016 layout "
                f"({', '.join(ADE20K_FOLDERS.values())})"
            )
    return paths


def _upright_size(path: Path) -> tuple[int, int]:
    """(H, W) of the image at `path` as `load_rgb` turns it (EXIF orientations 5-8 swap the sides); the header only."""
    with Image.open(path) as image:
        W, H = image.size
        turned = image.getexif().get(0x0112, 1) in (5, 6, 7, 8)
    return (W, H) if turned else (H, W)


def _by_stem(folder: Path, extensions: tuple[str, ...]) -> dict[str, Path]:
    """The files of `folder` (recursively) keyed by their path inside it without the extension; a DataError naming
    both files where two share a key (a.jpg and a.png)."""
    found: dict[str, Path] = {}
    for path in image_files(folder, extensions):
        key = path.relative_to(folder).with_suffix("").as_posix()
        if key in found:
            raise DataError(f"{found[key]} and {path} share the name {key!r}; expected one image per mask")
        found[key] = path
    return found


class SegmentationFolder(torch.utils.data.Dataset):
    """(image, mask) pairs of an image folder and a mask folder, matched by file name without the extension
    (images/a.jpg with masks/a.png; sub-folders alike).

    Before the transform the image is a `tv_tensors.Image` (3, H, W) uint8 (any mode Pillow reads, made 8-bit RGB
    and upright) and the mask a `tv_tensors.Mask` (H, W) int64 of labels 0..num_classes-1 or 255 (ignored).
    `transform(image, mask)` is a torchvision.transforms.v2 transform (`seg_train_transform`, `seg_eval_transform`).

    Attributes:
        classes: class names, index = label (`class_names`, or "0", "1", ...).
        pairs: (image, mask) paths of every usable pair, sorted by name.
        dropped: what was left out, by kind, with counts (also said in one warning).
        skipped: one line per file left out, naming it and what was expected.
    """

    def __init__(
        self,
        images: str | os.PathLike[str],
        masks: str | os.PathLike[str],
        transform: Callable[..., Any] | None = None,
        *,
        num_classes: int,
        reduce_zero_label: bool = False,
        strict_data: bool = False,
        class_names: Sequence[str] | None = None,
    ) -> None:
        self.images, self.masks = Path(images), Path(masks)
        for folder, what in ((self.images, "images"), (self.masks, "masks (PNGs of class indices)")):
            if not folder.is_dir():
                raise DataError(f"{folder} is not a folder; expected the folder of the {what}")
        if not 1 <= num_classes <= 255 - reduce_zero_label:
            raise DataError(f"num_classes must be 1..{255 - reduce_zero_label} (labels are 8-bit, 255 ignored)")
        if class_names is not None and len(class_names) != num_classes:
            raise DataError(f"class_names has {len(class_names)} names; expected num_classes={num_classes}")
        self.num_classes, self.reduce_zero_label = num_classes, reduce_zero_label
        self.classes = list(class_names) if class_names is not None else [str(i) for i in range(num_classes)]
        self.transform = transform
        self.dropped: Counter[str] = Counter()
        self.skipped: list[str] = []
        self.pairs = self._usable_pairs(strict_data)
        self._report()

    def _usable_pairs(self, strict: bool) -> list[tuple[Path, Path]]:
        images, masks = _by_stem(self.images, IMG_EXTENSIONS), _by_stem(self.masks, (".png",))
        for key in sorted(set(masks) - set(images)):
            self._drop("masks without an image (ignored)", f"{masks[key]} has no image of that name in {self.images}")
        for key in sorted(set(images) - set(masks)):
            why = f"{images[key]} has no mask; expected {self.masks / key}.png"
            self._drop("images without a mask", why, strict)
        pairs = [(images[k], masks[k]) for k in sorted(set(images) & set(masks))]
        if not pairs:
            raise DataError(
                f"{self.images} and {self.masks} hold no image and mask of the same name; expected e.g. "
                f"{self.images}/a.jpg with {self.masks}/a.png"
            )
        with ThreadPoolExecutor(min(8, os.cpu_count() or 1)) as pool:  # decoding masks releases the GIL
            problems = list(pool.map(lambda pair: self._check_pair(*pair), pairs))
        for problem in problems:
            if problem is not None:
                self._drop(*problem, strict)
        usable = [pair for pair, problem in zip(pairs, problems) if problem is None]
        if not usable:
            raise DataError(f"none of the {len(pairs)} image-mask pairs of {self.images} and {self.masks} is usable")
        return usable

    def _drop(self, what: str, why: str, strict: bool = False) -> None:
        if strict:
            raise DataError(f"{why} (--strict-data)")
        self.dropped[what] += 1
        self.skipped.append(why)

    def _check_pair(self, image: Path, mask: Path) -> tuple[str, str] | None:
        """None for a usable pair, else (kind, message) of one to leave out; a DataError for a mask that holds no
        class indices or a label that is no class."""
        try:
            with Image.open(mask) as m:
                mode = m.mode
                labels = np.asarray(m) if mode in MASK_MODES else None  # P: the palette's indices
        except (OSError, SyntaxError) as e:
            return "unreadable masks", f"{mask} is unreadable ({e}); expected a PNG of class indices"
        if labels is None:
            raise DataError(f"{mask}: expected a mask of class indices (mode L or P); got {mode}")
        self._check_labels(mask, labels)
        try:
            H, W = _upright_size(image)
        except (OSError, SyntaxError, ValueError) as e:
            return "unreadable images", f"{image} is unreadable ({e}); expected an image Pillow opens"
        if labels.shape != (H, W):
            h, w = labels.shape
            why = f"{mask} is {h}x{w} (height x width) but its image {image} is {H}x{W}; expected the image's size"
            return "masks of another size than their image", why
        return None

    def _check_labels(self, mask: Path, labels: np.ndarray) -> None:
        present = np.flatnonzero(np.bincount(labels.ravel(), minlength=256))
        top = self.num_classes if self.reduce_zero_label else self.num_classes - 1  # the largest label in the file
        bad = present[(present > top) & (present != IGNORE_INDEX)]
        if len(bad):
            label = int(bad[0])
            if self.reduce_zero_label:
                raise DataError(
                    f"{mask} holds label {label} (class {label - 1} after reduce_zero_label), but num_classes is "
                    f"{self.num_classes}: expected labels 1..{top}, 0 or 255 (ignored)"
                )
            raise DataError(
                f"{mask} holds label {label}, but num_classes is {self.num_classes}: expected labels 0..{top} or "
                f"255 (ignored)"
            )

    def _report(self) -> None:
        if self.dropped:
            said = ", ".join(f"{n} {what}" for what, n in sorted(self.dropped.items()))
            logger.warning(
                "%s, %s: left out %s (--strict-data refuses them); first: %s",
                self.images,
                self.masks,
                said,
                self.skipped[0],
            )

    def __len__(self) -> int:
        return len(self.pairs)

    def load(self, index: int) -> tuple[tv_tensors.Image, tv_tensors.Mask]:
        """The image (3, H, W) uint8 and its mask (H, W) int64 before the transform."""
        image_path, mask_path = self.pairs[index]
        try:
            rgb = np.array(load_rgb(image_path))
        except (OSError, SyntaxError, ValueError) as e:
            raise DataError(f"{image_path} could not be decoded ({e}); expected an image Pillow reads") from None
        with Image.open(mask_path) as m:
            labels = np.asarray(m).astype(np.int64)
        if self.reduce_zero_label:  # 0 -> 255 (ignored), k -> k - 1, 255 stays
            labels = np.where((labels == 0) | (labels == IGNORE_INDEX), IGNORE_INDEX, labels - 1)
        if labels.shape != rgb.shape[:2]:
            raise DataError(f"{mask_path} no longer has the size of {image_path} (changed on disk?)")
        image = tv_tensors.Image(torch.from_numpy(rgb).permute(2, 0, 1))  # HWC -> CHW
        return image, tv_tensors.Mask(torch.from_numpy(labels))

    def __getitem__(self, index: int) -> tuple[Any, Any]:
        image, mask = self.load(index)
        return self.transform(image, mask) if self.transform is not None else (image, mask)


# Transforms: mmseg's ADE20K training pipeline, step by step, on an image and its mask together.


class RandomRescale(v2.Transform):
    """mmseg's `Resize(img_scale=scale, ratio_range=ratio_range, keep_ratio=True)`: draw r in ratio_range; resize,
    keeping the aspect ratio, to the largest size whose longer side is at most max(scale) * r and shorter side at
    most min(scale) * r. The image is resized bilinearly (antialiased), the mask to the nearest label. torchvision's
    ScaleJitter bounds height and width instead of the longer and shorter sides, so it shrinks portrait images more."""

    def __init__(self, scale: tuple[int, int], ratio_range: tuple[float, float] = (0.5, 2.0)) -> None:
        super().__init__()
        self.scale, self.ratio_range = scale, ratio_range

    def make_params(self, flat_inputs: list[Any]) -> dict[str, Any]:
        H, W = v2.query_size(flat_inputs)
        lo, hi = self.ratio_range
        r = lo + float(torch.rand(())) * (hi - lo)
        longer, shorter = int(max(self.scale) * r), int(min(self.scale) * r)
        factor = min(longer / max(H, W), shorter / min(H, W))
        return {"size": [int(H * factor + 0.5), int(W * factor + 0.5)]}  # mmcv rounds half up

    def transform(self, inpt: Any, params: dict[str, Any]) -> Any:
        return self._call_kernel(v2.functional.resize, inpt, size=params["size"], antialias=True)


class CatMaxRatioCrop(v2.Transform):
    """mmseg's `RandomCrop(crop_size, cat_max_ratio)`: a `size` x `size` crop (the image's side where shorter) at a
    random place, drawn again while it holds fewer than two classes (255 aside) or one class covers `cat_max_ratio`
    or more of its labelled pixels; after 10 such checks the last crop drawn is kept. Without a mask among the
    inputs the first crop is kept. (No torchvision transform looks at the mask to place a crop.)"""

    def __init__(self, size: int, cat_max_ratio: float = 0.75, ignore_index: int = IGNORE_INDEX) -> None:
        super().__init__()
        self.size, self.cat_max_ratio, self.ignore_index = size, cat_max_ratio, ignore_index

    def _draw(self, H: int, W: int) -> dict[str, int]:
        h, w = min(self.size, H), min(self.size, W)
        top, left = int(torch.randint(H - h + 1, ())), int(torch.randint(W - w + 1, ()))
        return {"top": top, "left": left, "height": h, "width": w}

    def _balanced(self, mask: torch.Tensor, crop: dict[str, int]) -> bool:
        """Whether the crop of `mask` holds two classes or more and none covers `cat_max_ratio` of its labels."""
        window = mask[..., crop["top"] : crop["top"] + crop["height"], crop["left"] : crop["left"] + crop["width"]]
        counts = torch.bincount(window.reshape(-1).long(), minlength=self.ignore_index + 1)
        counts = torch.cat([counts[: self.ignore_index], counts[self.ignore_index + 1 :]])
        counts = counts[counts > 0]
        return len(counts) > 1 and float(counts.max()) / float(counts.sum()) < self.cat_max_ratio

    def make_params(self, flat_inputs: list[Any]) -> dict[str, Any]:
        H, W = v2.query_size(flat_inputs)
        crop = self._draw(H, W)
        masks = [x for x in flat_inputs if isinstance(x, tv_tensors.Mask)]
        if masks and self.cat_max_ratio < 1:
            for _ in range(10):  # mmseg's 10 checks; the 11th crop drawn is kept unchecked
                if self._balanced(masks[0], crop):
                    break
                crop = self._draw(H, W)
        return crop

    def transform(self, inpt: Any, params: dict[str, Any]) -> Any:
        return self._call_kernel(v2.functional.crop, inpt, **params)


class PadTo(v2.Transform):
    """mmseg's `Pad(size=(size, size), pad_val=fill, seg_pad_val=255)`: pad right and bottom to at least `size` x
    `size`; the image with `fill`, the mask with 255 (ignored)."""

    def __init__(self, size: int, fill: int | Sequence[int] = 0, mask_fill: int = IGNORE_INDEX) -> None:
        super().__init__()
        self.size, self.fill, self.mask_fill = size, fill, mask_fill

    def make_params(self, flat_inputs: list[Any]) -> dict[str, Any]:
        H, W = v2.query_size(flat_inputs)
        return {"padding": [0, 0, max(0, self.size - W), max(0, self.size - H)]}  # left, top, right, bottom

    def transform(self, inpt: Any, params: dict[str, Any]) -> Any:
        if not any(params["padding"]):
            return inpt
        fill = self.mask_fill if isinstance(inpt, tv_tensors.Mask) else self.fill
        fill = list(fill) if isinstance(fill, Sequence) else fill
        return self._call_kernel(v2.functional.pad, inpt, padding=params["padding"], fill=fill)


class BrightnessShift(v2.Transform):
    """mmseg's brightness distortion: add one value drawn from [-delta, delta] to every channel of a uint8 image,
    clipped to 0..255 (torchvision's brightness multiplies instead). Masks pass unchanged."""

    _transformed_types = (tv_tensors.Image,)

    def __init__(self, delta: float = 32) -> None:
        super().__init__()
        self.delta = delta

    def make_params(self, flat_inputs: list[Any]) -> dict[str, Any]:
        return {"shift": (float(torch.rand(())) * 2 - 1) * self.delta}

    def transform(self, inpt: Any, params: dict[str, Any]) -> Any:
        if inpt.dtype != torch.uint8:
            raise ValueError(f"BrightnessShift expects a uint8 image (0..255); got {inpt.dtype}")
        shifted = (inpt.float() + params["shift"]).clamp(0, 255).to(torch.uint8)  # truncated, as mmseg's astype
        return tv_tensors.wrap(shifted, like=inpt)


def photometric_distortion() -> v2.Compose:
    """mmseg's `PhotoMetricDistortion()` with its defaults, each step applied with probability 0.5: brightness
    +U(-32, 32); then "contrast" (mmseg multiplies pixel values by U(0.5, 1.5): torchvision's brightness factor)
    either first or last, chosen at random; saturation x U(0.5, 1.5) (torchvision blends with grey where mmseg
    scales HSV's S); hue shifted by up to 18 of OpenCV's 180 steps (0.1 of the circle)."""
    contrast = v2.RandomApply([v2.ColorJitter(brightness=(0.5, 1.5))], p=0.5)
    saturation = v2.RandomApply([v2.ColorJitter(saturation=(0.5, 1.5))], p=0.5)
    hue = v2.RandomApply([v2.ColorJitter(hue=18 / 180)], p=0.5)
    return v2.Compose(
        [
            v2.RandomApply([BrightnessShift(32)], p=0.5),
            v2.RandomChoice([v2.Compose([contrast, saturation, hue]), v2.Compose([saturation, hue, contrast])]),
        ]
    )


def seg_train_transform(
    crop_size: int,
    *,
    scale: tuple[int, int] | None = None,
    ratio_range: tuple[float, float] = (0.5, 2.0),
    cat_max_ratio: float = 0.75,
    flip: float = 0.5,
    photometric: bool = True,
    fill: int | Sequence[int] = 0,
) -> v2.Compose:
    """The training transform of the UPerNet ADE20K recipe (mmseg's config for Swin and GC ViT, crop 512), for
    (image uint8 (3, H, W), mask (H, W)) -> (image float32 (3, crop, crop) in [0, 1], mask (crop, crop)).

    mmseg step by step:
        Resize(img_scale=(2048, 512), ratio_range=(0.5, 2.0))  -> RandomRescale(scale, ratio_range)
        RandomCrop(crop_size=(512, 512), cat_max_ratio=0.75)    -> CatMaxRatioCrop(crop_size, cat_max_ratio)
        RandomFlip(prob=0.5)                                    -> v2.RandomHorizontalFlip(flip)
        PhotoMetricDistortion()                                 -> photometric_distortion()
        Normalize, Pad(size=(512, 512), pad_val=0, seg_pad_val=255) -> PadTo(crop_size, fill), then to float
    Normalisation is left to the model. mmseg pads after normalising, so its padded pixels are the mean colour: pass
    `fill` = the mean in 0..255 (ImageNet's (124, 116, 104)) for that; the default pads black. Padded mask pixels are
    255 (ignored) either way.

    Args:
        crop_size: side of the square crop (512 in the recipe).
        scale: (longer, shorter) base size before the random ratio; default (4 * crop_size, crop_size), the recipe's
            (2048, 512) scaled by crop_size / 512.
        ratio_range: the random ratio's range.
        cat_max_ratio: the largest share of a crop's labelled pixels one class may cover (1 turns the check off).
        flip: probability of a horizontal flip (0 where a mirrored image is no longer the class, as digits).
        photometric: whether to apply the photometric distortion.
        fill: the image's padding value, in 0..255 (one value or R, G, B).
    """
    if crop_size < 1:
        raise ValueError(f"crop_size must be positive; got {crop_size}")
    scale = scale if scale is not None else (4 * crop_size, crop_size)
    steps: list[Any] = [
        RandomRescale(scale, ratio_range),
        CatMaxRatioCrop(crop_size, cat_max_ratio),
        v2.RandomHorizontalFlip(flip),
    ]
    if photometric:
        steps.append(photometric_distortion())
    return v2.Compose([*steps, PadTo(crop_size, fill), TO_FLOAT])


def seg_eval_transform() -> v2.Transform:
    """(image uint8, mask) -> (image float32 in [0, 1], mask): evaluation resizes (mmseg: keep-ratio to (2048, 512))
    and normalises in the model's evaluation code, where predictions are mapped back to the mask's size."""
    return v2.ToDtype({tv_tensors.Image: torch.float32, "others": None}, scale=True)
