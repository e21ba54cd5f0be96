"""Image transforms for training and evaluation, and batch-level MixUp / CutMix, built on torchvision's v2 API.

Per-sample transforms take a PIL image (any mode: it is made RGB first, `to_rgb`) or a uint8 tensor (3, H, W) and
return a normalised float tensor (3, H, W). `MixupCutmix` works on a whole batch after collation.
"""

from __future__ import annotations

import math
import os
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np
import torch
from PIL import Image, ImageOps
from torch import Tensor
from torchvision.transforms import v2

from gcvit.data.randaugment import RandAugment

Size = int | tuple[int, int]
_INTERPOLATIONS = ("nearest", "bilinear", "bicubic")
_TRAIN_INTERPOLATIONS = (*_INTERPOLATIONS, "random")  # random: bilinear or bicubic, drawn per crop and per op
_CROP_MODES = ("center", "squash")


def to_hw(img_size: Size) -> tuple[int, int]:
    """An image size as (H, W).

    Args:
        img_size: one int for a square, or (H, W).

    Returns:
        (H, W), both positive ints.
    """
    if isinstance(img_size, int) and not isinstance(img_size, bool):
        hw: tuple[int, ...] = (img_size, img_size)
    elif isinstance(img_size, Sequence) and len(img_size) == 2 and all(isinstance(s, int) for s in img_size):
        hw = tuple(img_size)
    else:
        raise ValueError(f"img_size must be an int or a pair (H, W) of ints, got {img_size!r}")
    if min(hw) <= 0:
        raise ValueError(f"img_size must be positive, got {img_size!r}")
    return hw[0], hw[1]


def _interpolation(name: str) -> v2.InterpolationMode:
    if name not in _INTERPOLATIONS:
        raise ValueError(f"interpolation must be one of {_INTERPOLATIONS}, got {name!r}")
    return v2.InterpolationMode(name)


def to_rgb(image: Image.Image) -> Image.Image:
    """`image` as 8-bit RGB: alpha dropped, grey and palette images expanded, and 16-bit, 32-bit integer and float
    images scaled to 0-255 (PIL's own conversion clips them: a 16-bit photo would come out white). 16-bit modes span
    0-65535; for 32-bit integer and float images the largest finite value tells the range: up to 1 (floats only),
    255, 65535, or the value itself. Negative values become 0; NaN and -inf 0, +inf the top."""
    if image.mode == "RGB":
        return image
    if image.mode.startswith("I;16") or image.mode in ("I", "F"):
        values = np.asarray(image, dtype=np.float64)
        top = float(values.max(initial=0.0, where=np.isfinite(values)))
        values = np.nan_to_num(values, nan=0.0, posinf=top, neginf=0.0)
        if image.mode.startswith("I;16"):
            full = 65535.0
        else:
            full = next(r for r in (1.0, 255.0, 65535.0, top) if top <= r and (r > 1.0 or image.mode == "F"))
        return Image.fromarray(np.clip(values * (255.0 / full) + 0.5, 0, 255).astype(np.uint8)).convert("RGB")
    return image.convert("RGB")


def load_rgb(path: str | os.PathLike[str]) -> Image.Image:
    """The image at `path` as 8-bit RGB (`to_rgb`), upright: turned as its EXIF orientation says (phone photos are
    stored sideways)."""
    with Image.open(path) as image:
        ImageOps.exif_transpose(image, in_place=True)
        image.load()
        return to_rgb(image) if image.mode != "RGB" else image.copy()


class _RGBInput:
    """The first step of both transforms: a PIL image in any mode becomes RGB (`to_rgb`); a tensor must be an image
    (3, H, W). Anything else is refused by name, not deep inside torchvision."""

    def __call__(self, image: Image.Image | Tensor) -> Image.Image | Tensor:
        if isinstance(image, Image.Image):
            return to_rgb(image)
        if isinstance(image, Tensor) and image.ndim == 3 and image.shape[0] == 3:
            return image
        got = f"a tensor of shape {tuple(image.shape)}" if isinstance(image, Tensor) else type(image).__name__
        raise ValueError(f"expected a PIL image or a (3, H, W) tensor (RGB, channels first); got {got}")


def _to_normalized_tensor(mean: Sequence[float], std: Sequence[float]) -> list[v2.Transform]:
    """PIL or uint8 image -> float32 (3, H, W) in [0, 1] -> normalised."""
    if len(mean) != 3 or len(std) != 3:
        raise ValueError(f"mean and std must have 3 values (R, G, B), got mean={mean!r} std={std!r}")
    return [v2.ToImage(), v2.ToDtype(torch.float32, scale=True), v2.Normalize(mean=list(mean), std=list(std))]


@dataclass(frozen=True)
class RandAugmentSpec:
    """A parsed timm-style RandAugment string such as 'rand-m9-mstd0.5-inc1'."""

    magnitude: int  # m: 0..10, the fraction magnitude/10 of each op's largest strength
    num_ops: int = 2  # n: ops drawn per image (each applied with probability 0.5)
    magnitude_std: float = 0.0  # mstd: standard deviation of the magnitude, drawn per op
    increasing: bool = False  # inc1: the ops whose strength grows with the magnitude


def parse_randaugment(spec: str) -> RandAugmentSpec:
    """Parse 'rand-m<int>[-n<int>][-mstd<float>][-inc<0|1>]', timm's notation (`gcvit.data.randaugment`).

    Args:
        spec: the string, e.g. 'rand-m9-mstd0.5'.

    Returns:
        The parsed values.
    """
    parts = spec.split("-")
    if parts[0] != "rand" or len(parts) < 2:
        raise ValueError(f"RandAugment spec must look like 'rand-m9-mstd0.5', got {spec!r}")
    values: dict[str, str] = {}
    for part in parts[1:]:
        match = re.fullmatch(r"([a-z]+)(\d+(?:\.\d+)?)", part)
        if match is None or match.group(1) not in ("m", "n", "mstd", "inc"):
            raise ValueError(f"unknown part {part!r} in RandAugment spec {spec!r}; expected m<int>, n<int>, mstd, inc")
        values[match.group(1)] = match.group(2)
    if "m" not in values:
        raise ValueError(f"RandAugment spec {spec!r} has no magnitude; expected e.g. 'rand-m9'")
    if not values["m"].isdigit() or not 0 <= int(values["m"]) <= 10:
        raise ValueError(f"RandAugment magnitude must be an int in 0..10, got {values['m']!r} in {spec!r}")
    if not values.get("n", "2").isdigit():
        raise ValueError(f"RandAugment op count must be an int, got {values['n']!r} in {spec!r}")
    if values.get("inc", "0") not in ("0", "1"):
        raise ValueError(f"RandAugment inc must be 0 or 1, got {values['inc']!r} in {spec!r}")
    return RandAugmentSpec(
        int(values["m"]), int(values.get("n", "2")), float(values.get("mstd", "0")), values.get("inc") == "1"
    )


def train_transform(
    img_size: Size,
    mean: Sequence[float],
    std: Sequence[float],
    *,
    interpolation: str = "bicubic",
    scale: tuple[float, float] = (0.08, 1.0),
    ratio: tuple[float, float] = (3 / 4, 4 / 3),
    hflip: float = 0.5,
    randaugment: str | None = None,
    color_jitter: float | None = None,
    random_erasing: float = 0.0,
) -> v2.Compose:
    """The training augmentation: random resized crop, flip, RandAugment, colour jitter, normalise, random erasing.

    timm's recipe turns colour jitter off when RandAugment is on; pass `color_jitter=None` to match it.

    Args:
        img_size: output size, int or (H, W).
        mean, std: per-channel normalisation of [0, 1] values (R, G, B).
        interpolation: 'bicubic', 'bilinear' or 'nearest', for the crop and RandAugment's geometric ops; or
            'random' (timm's `train_interpolation`, the official recipe's): each crop, and each geometric op RandAugment
            applies, resamples with bilinear or bicubic, drawn from torch's RNG like every other choice here.
        scale, ratio: area fraction and aspect-ratio ranges of the random crop.
        hflip: probability of a horizontal flip.
        randaugment: timm-style spec (see `parse_randaugment`), or None for none.
        color_jitter: brightness, contrast and saturation strength, or None for none.
        random_erasing: probability of erasing one rectangle with per-pixel normal noise (timm's 'pixel' mode).

    Returns:
        A callable: PIL image (or uint8 (3, h, w)) -> float32 tensor (3, H, W).
    """
    if interpolation not in _TRAIN_INTERPOLATIONS:
        raise ValueError(f"interpolation must be one of {_TRAIN_INTERPOLATIONS}, got {interpolation!r}")
    modes = ("bilinear", "bicubic") if interpolation == "random" else (interpolation,)
    crops = [
        v2.RandomResizedCrop(to_hw(img_size), scale=scale, ratio=ratio, interpolation=_interpolation(m)) for m in modes
    ]
    steps: list[Callable] = [_RGBInput(), crops[0] if len(crops) == 1 else v2.RandomChoice(crops)]
    if hflip > 0:
        steps.append(v2.RandomHorizontalFlip(p=hflip))
    if randaugment is not None:
        ra = parse_randaugment(randaugment)
        fill = [min(255, round(255 * m)) for m in mean]  # the mean colour, where ops uncover empty pixels
        steps.append(
            RandAugment(
                ra.magnitude, ra.num_ops, ra.magnitude_std, ra.increasing, fill=fill, interpolation=interpolation
            )
        )
    if color_jitter is not None and color_jitter > 0:
        steps.append(v2.ColorJitter(brightness=color_jitter, contrast=color_jitter, saturation=color_jitter))
    steps += _to_normalized_tensor(mean, std)
    if random_erasing > 0:
        steps.append(v2.RandomErasing(p=random_erasing, value="random"))
    steps.append(v2.ToPureTensor())
    return v2.Compose(steps)


def eval_transform(
    img_size: Size,
    mean: Sequence[float],
    std: Sequence[float],
    *,
    interpolation: str = "bicubic",
    crop_pct: float = 0.875,
    crop_mode: str = "center",
) -> v2.Compose:
    """The evaluation transform: resize to img_size / crop_pct, centre-crop img_size, normalise.

    'center' keeps the aspect ratio: the shorter side goes to floor(img_size / crop_pct) (for a square img_size),
    or each side to floor(side / crop_pct) (for (H, W)). 'squash' resizes both sides to floor(side / crop_pct)
    without keeping the aspect ratio, then centre-crops, as timm does; with crop_pct=1.0 that is a straight resize
    to (H, W).

    Args:
        img_size: output size, int or (H, W).
        mean, std: per-channel normalisation of [0, 1] values (R, G, B).
        interpolation: 'bicubic', 'bilinear' or 'nearest'.
        crop_pct: fraction of the resized image kept by the crop, in (0, 1].
        crop_mode: 'center' or 'squash'.

    Returns:
        A callable: PIL image (or uint8 (3, h, w)) -> float32 tensor (3, H, W).
    """
    if crop_mode not in _CROP_MODES:
        raise ValueError(f"crop_mode must be one of {_CROP_MODES}, got {crop_mode!r}")
    if not 0 < crop_pct <= 1:
        raise ValueError(f"crop_pct must be in (0, 1], got {crop_pct}")
    h, w = to_hw(img_size)
    mode = _interpolation(interpolation)
    scaled = (math.floor(h / crop_pct), math.floor(w / crop_pct))
    if crop_mode == "center" and h == w:
        resize = v2.Resize(scaled[0], interpolation=mode)  # int size: the shorter side, aspect ratio kept
    else:
        resize = v2.Resize(scaled, interpolation=mode)
    return v2.Compose(
        [_RGBInput(), resize, v2.CenterCrop((h, w)), *_to_normalized_tensor(mean, std), v2.ToPureTensor()]
    )


class MixupCutmix:
    """Batch MixUp / CutMix with label smoothing: (images (B, 3, H, W), labels (B,)) -> (images, targets (B, K)).

    With both alphas > 0, each batch gets CutMix with probability `switch_prob`, else MixUp. With both 0 the images
    pass unchanged and the targets are (smoothed) one-hot. Smoothing is applied after mixing, which equals mixing
    smoothed one-hot targets: each row sums to 1. Pairs are consecutive samples (torchvision's roll by one), so the
    batch must be shuffled.
    """

    def __init__(
        self,
        num_classes: int,
        mixup_alpha: float,
        cutmix_alpha: float,
        switch_prob: float = 0.5,
        label_smoothing: float = 0.0,
    ) -> None:
        if num_classes < 1:
            raise ValueError(f"num_classes must be >= 1, got {num_classes}")
        if mixup_alpha < 0 or cutmix_alpha < 0:
            raise ValueError(f"alphas must be >= 0, got mixup_alpha={mixup_alpha} cutmix_alpha={cutmix_alpha}")
        if not 0 <= switch_prob <= 1:
            raise ValueError(f"switch_prob must be in [0, 1], got {switch_prob}")
        if not 0 <= label_smoothing < 1:
            raise ValueError(f"label_smoothing must be in [0, 1), got {label_smoothing}")
        self.num_classes = num_classes
        self.label_smoothing = label_smoothing
        mixes: list[v2.Transform] = []
        if mixup_alpha > 0:
            mixes.append(v2.MixUp(alpha=mixup_alpha, num_classes=num_classes))
        if cutmix_alpha > 0:
            mixes.append(v2.CutMix(alpha=cutmix_alpha, num_classes=num_classes))
        self.mix: v2.Transform | None = None
        if len(mixes) == 2:
            self.mix = v2.RandomChoice(mixes, p=[1 - switch_prob, switch_prob])
        elif mixes:
            self.mix = mixes[0]

    def __call__(self, images: Tensor, labels: Tensor) -> tuple[Tensor, Tensor]:
        """Mix one batch.

        Args:
            images: float (B, 3, H, W).
            labels: int64 (B,) class indices in [0, num_classes).

        Returns:
            (mixed images (B, 3, H, W), soft targets float32 (B, num_classes), rows summing to 1).
        """
        if images.ndim != 4 or labels.ndim != 1 or labels.shape[0] != images.shape[0]:
            raise ValueError(
                f"expected images (B, C, H, W) and labels (B,), got {tuple(images.shape)} and {tuple(labels.shape)}"
            )
        if not images.is_floating_point() or len(images) == 0:
            raise ValueError(f"expected a batch of float images (normalised); got {images.dtype}, {len(images)} images")
        if labels.dtype.is_floating_point or labels.dtype == torch.bool:
            raise ValueError(f"labels must be int class indices in [0, {self.num_classes}), got {labels.dtype}")
        labels = labels.long()  # int32 (from NumPy) and other integer types: one_hot takes int64 only
        if labels.min() < 0 or labels.max() >= self.num_classes:
            raise ValueError(f"labels must be int class indices in [0, {self.num_classes}), got {labels.tolist()}")
        if self.mix is None:
            targets = torch.nn.functional.one_hot(labels, self.num_classes).float()
        else:
            images, targets = self.mix(images, labels)
        if self.label_smoothing > 0:
            targets = targets * (1 - self.label_smoothing) + self.label_smoothing / self.num_classes
        return images, targets


def mixup_cutmix(
    num_classes: int,
    mixup_alpha: float,
    cutmix_alpha: float,
    switch_prob: float = 0.5,
    label_smoothing: float = 0.0,
) -> MixupCutmix:
    """Build the batch mixer; see `MixupCutmix`.

    Args:
        num_classes: K, the width of the soft targets.
        mixup_alpha: Beta(alpha, alpha) parameter of MixUp; 0 turns MixUp off.
        cutmix_alpha: Beta(alpha, alpha) parameter of CutMix; 0 turns CutMix off.
        switch_prob: probability of CutMix rather than MixUp when both are on.
        label_smoothing: epsilon; targets become (1 - eps) * mixed_one_hot + eps / K.

    Returns:
        A callable (images (B, 3, H, W), labels (B,)) -> (images (B, 3, H, W), targets (B, K)).
    """
    return MixupCutmix(num_classes, mixup_alpha, cutmix_alpha, switch_prob, label_smoothing)
