"""RandAugment as timm defines it for `rand-m<M>-n<N>-mstd<S>-inc<0|1>` (the official GC ViT recipe uses
`rand-m9-mstd0.5-inc1`), drawing from torch's random generator so that seeded runs repeat exactly.

What makes it timm's rather than torchvision's `v2.RandAugment`:
- N ops drawn with replacement from 15 (no identity op; Invert and SolarizeAdd included), and each applied with
  probability 0.5, so a quarter of the images pass through untouched at N = 2;
- each application draws its magnitude from a normal around M with standard deviation S (`mstd`), clipped to 0..10;
- `inc1` picks the ops whose strength grows with the magnitude: posterize keeps 4 - int(4 m/10) bits (1 at m = 9),
  solarize's threshold falls to 256 - int(256 m/10), and colour, contrast, brightness and sharpness move by a
  factor of 1 +- 0.9 m/10 in a random direction. `inc0` keeps timm's original ops (posterize int(4 m/10) bits,
  solarize at int(256 m/10), enhance factors 0.1 + 1.8 m/10).
Geometric ops (rotate up to 30 degrees, shear up to 0.3, translate up to 0.45 of the side, each in a random
direction) fill uncovered pixels with the mean colour and resample with the pipeline's interpolation; 'random'
(timm's default, the official recipe's) draws bilinear or bicubic for each application of a geometric op.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
from PIL import Image, ImageEnhance, ImageOps
from torchvision.transforms import v2

_MAX_MAGNITUDE = 10.0
_RESAMPLES = {  # interpolation name -> the resampling filters a geometric op draws from
    "nearest": (Image.Resampling.NEAREST,),
    "bilinear": (Image.Resampling.BILINEAR,),
    "bicubic": (Image.Resampling.BICUBIC,),
    "random": (Image.Resampling.BILINEAR, Image.Resampling.BICUBIC),  # timm's _RANDOM_INTERPOLATION
}

Op = Callable[[Image.Image, float, "_Geometry"], Image.Image]


class _Geometry:
    """Fill colour and resampling of the geometric ops."""

    def __init__(self, fill: tuple[int, int, int], resample: Image.Resampling | tuple[Image.Resampling, ...]) -> None:
        self.fill = fill
        self.resamples = resample if isinstance(resample, tuple) else (resample,)  # one filter, or those to draw from

    def resample(self) -> Image.Resampling:
        """The filter of one op: the only one, or one drawn uniformly from torch's RNG ('random'); a single filter
        draws nothing, so the fixed interpolations keep their random stream."""
        if len(self.resamples) == 1:
            return self.resamples[0]
        return self.resamples[int(torch.randint(len(self.resamples), ()).item())]

    def affine(self, img: Image.Image, matrix: tuple[float, ...]) -> Image.Image:
        return img.transform(img.size, Image.Transform.AFFINE, matrix, self.resample(), fillcolor=self.fill)


def _signed(value: float) -> float:
    """`value` or `-value`, each with probability 1/2."""
    return -value if torch.rand(()).item() < 0.5 else value


def _solarize_add(img: Image.Image, add: int, threshold: int = 128) -> Image.Image:
    lut = [min(255, v + add) if v < threshold else v for v in range(256)]
    return img.point(lut * len(img.getbands()))


def _posterize(img: Image.Image, bits: int) -> Image.Image:
    """Keep the top `bits` bits of every channel; 0 bits leave black (Pillow 13 refuses 0, older ones gave black)."""
    if bits <= 0:
        return Image.new(img.mode, img.size)
    return img if bits >= 8 else ImageOps.posterize(img, bits)


def _enhance(kind: type) -> Callable[[Image.Image, float], Image.Image]:
    return lambda img, factor: kind(img).enhance(factor)


_COLOR, _CONTRAST = _enhance(ImageEnhance.Color), _enhance(ImageEnhance.Contrast)
_BRIGHTNESS, _SHARPNESS = _enhance(ImageEnhance.Brightness), _enhance(ImageEnhance.Sharpness)

# op(image, level in [0, 1], geometry)
_SHARED: dict[str, Op] = {
    "AutoContrast": lambda img, level, g: ImageOps.autocontrast(img),
    "Equalize": lambda img, level, g: ImageOps.equalize(img),
    "Invert": lambda img, level, g: ImageOps.invert(img),
    "Rotate": lambda img, level, g: img.rotate(_signed(30.0 * level), g.resample(), fillcolor=g.fill),
    "SolarizeAdd": lambda img, level, g: _solarize_add(img, int(110 * level)),
    "ShearX": lambda img, level, g: g.affine(img, (1, _signed(0.3 * level), 0, 0, 1, 0)),
    "ShearY": lambda img, level, g: g.affine(img, (1, 0, 0, _signed(0.3 * level), 1, 0)),
    "TranslateXRel": lambda img, level, g: g.affine(img, (1, 0, _signed(0.45 * level) * img.size[0], 0, 1, 0)),
    "TranslateYRel": lambda img, level, g: g.affine(img, (1, 0, 0, 0, 1, _signed(0.45 * level) * img.size[1])),
}
INCREASING_OPS: dict[str, Op] = _SHARED | {
    "PosterizeIncreasing": lambda img, level, g: _posterize(img, 4 - int(4 * level)),
    "SolarizeIncreasing": lambda img, level, g: ImageOps.solarize(img, 256 - int(256 * level)),
    "ColorIncreasing": lambda img, level, g: _COLOR(img, 1.0 + _signed(0.9 * level)),
    "ContrastIncreasing": lambda img, level, g: _CONTRAST(img, 1.0 + _signed(0.9 * level)),
    "BrightnessIncreasing": lambda img, level, g: _BRIGHTNESS(img, 1.0 + _signed(0.9 * level)),
    "SharpnessIncreasing": lambda img, level, g: _SHARPNESS(img, 1.0 + _signed(0.9 * level)),
}
ORIGINAL_OPS: dict[str, Op] = _SHARED | {
    "Posterize": lambda img, level, g: _posterize(img, int(4 * level)),
    "Solarize": lambda img, level, g: ImageOps.solarize(img, int(256 * level)),
    "Color": lambda img, level, g: _COLOR(img, 0.1 + 1.8 * level),
    "Contrast": lambda img, level, g: _CONTRAST(img, 0.1 + 1.8 * level),
    "Brightness": lambda img, level, g: _BRIGHTNESS(img, 0.1 + 1.8 * level),
    "Sharpness": lambda img, level, g: _SHARPNESS(img, 0.1 + 1.8 * level),
}


class RandAugment:
    """timm's RandAugment on RGB PIL images (uint8 (3, H, W) tensors are converted and returned as tensors).

    Args:
        magnitude: M, 0..10.
        num_ops: N ops per image, drawn with replacement.
        magnitude_std: S, per-application noise of the magnitude (normal; `inf`: uniform in 0..M).
        increasing: timm's `inc1` op set.
        prob: probability that a drawn op is applied.
        fill: RGB fill of pixels the geometric ops uncover (timm: the mean colour).
        interpolation: 'nearest', 'bilinear' or 'bicubic' for the geometric ops, or 'random': bilinear or bicubic,
            drawn for each op applied.
        ops: names of the ops to draw from (a subset of the set's); None: all of them.
    """

    def __init__(
        self,
        magnitude: float,
        num_ops: int = 2,
        magnitude_std: float = 0.0,
        increasing: bool = False,
        prob: float = 0.5,
        fill: Sequence[int] = (128, 128, 128),
        interpolation: str = "bicubic",
        ops: Sequence[str] | None = None,
    ) -> None:
        if interpolation not in _RESAMPLES:
            raise ValueError(f"interpolation must be one of {tuple(_RESAMPLES)}, got {interpolation!r}")
        if not 0 <= magnitude <= _MAX_MAGNITUDE or num_ops < 0 or magnitude_std < 0 or not 0 <= prob <= 1:
            raise ValueError(
                f"expected magnitude in 0..10, num_ops >= 0, magnitude_std >= 0, prob in [0, 1]; got {magnitude}, "
                f"{num_ops}, {magnitude_std}, {prob}"
            )
        self.magnitude, self.num_ops, self.magnitude_std, self.prob = magnitude, num_ops, magnitude_std, prob
        available = INCREASING_OPS if increasing else ORIGINAL_OPS
        unknown = sorted(set(ops or ()) - set(available))
        if unknown or (ops is not None and not ops):
            raise ValueError(f"ops must be a non-empty subset of {sorted(available)}, got {ops!r}")
        self.ops = [(name, op) for name, op in available.items() if ops is None or name in ops]
        r, g, b = (int(c) for c in fill)
        self.geometry = _Geometry((r, g, b), _RESAMPLES[interpolation])

    def _level(self) -> float:
        m = self.magnitude
        if self.magnitude_std == float("inf"):
            m = m * torch.rand(()).item()
        elif self.magnitude_std > 0:
            m = m + self.magnitude_std * torch.randn(()).item()
        return min(max(m, 0.0), _MAX_MAGNITUDE) / _MAX_MAGNITUDE

    def __call__(self, img: Image.Image | torch.Tensor) -> Image.Image | torch.Tensor:
        tensor = isinstance(img, torch.Tensor)
        pil = v2.functional.to_pil_image(img) if tensor else img
        for index in torch.randint(len(self.ops), (self.num_ops,)).tolist():
            if torch.rand(()).item() >= self.prob:
                continue
            pil = self.ops[index][1](pil, self._level(), self.geometry)
        return v2.functional.pil_to_tensor(pil) if tensor else pil

    def __repr__(self) -> str:
        return (
            f"RandAugment(magnitude={self.magnitude}, num_ops={self.num_ops}, magnitude_std={self.magnitude_std}, "
            f"ops={[name for name, _ in self.ops]}, prob={self.prob})"
        )
