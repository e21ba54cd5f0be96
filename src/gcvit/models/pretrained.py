"""Pretrained weights: every tag's metadata in one typed table.

NVIDIA publishes GC ViT weights at huggingface.co/nvidia/GCViT as .pth.tar files holding {'state_dict': ...}, under
CC BY-NC-SA 4.0 (non-commercial). Their SHA-256 digests are not published next to them, so `sha256` is None until
known; the download code checks it whenever it is set.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
NVIDIA_URL = "https://huggingface.co/nvidia/GCViT/resolve/main/{}.pth.tar"
NVIDIA_LICENSE = "cc-by-nc-sa-4.0"


@dataclass(frozen=True)
class PretrainedCfg:
    url: str  # where the checkpoint lives (http(s):// or file://)
    sha256: str | None = None  # hex digest, or a prefix of at least 8 hex digits; None: not known
    top1: float | None = None  # official ImageNet-1K top-1 (%)
    img_size: tuple[int, int] = (224, 224)  # resolution it was trained and evaluated at (H, W)
    crop_pct: float = 0.875  # evaluation: resize to img_size / crop_pct, then centre-crop img_size
    crop_mode: str = "center"  # "center" crop, or "squash": resize straight to img_size
    interpolation: str = "bicubic"
    mean: tuple[float, float, float] = IMAGENET_MEAN
    std: tuple[float, float, float] = IMAGENET_STD
    num_classes: int = 1000
    label_set: str = "imagenet-1k"
    license: str = NVIDIA_LICENSE
    arch: dict[str, Any] = field(default_factory=dict)  # config fields this tag changes (window sizes, ...)
    epoch: int | None = None  # the training epoch of weights from a `gcvit train` checkpoint; None otherwise

    @property
    def file_name(self) -> str:
        return self.url.rsplit("/", 1)[-1]


def _in1k(file: str, top1: float, crop_pct: float) -> PretrainedCfg:
    return PretrainedCfg(url=NVIDIA_URL.format(file), top1=top1, crop_pct=crop_pct)


PRETRAINED: dict[str, dict[str, PretrainedCfg]] = {
    "gcvit_xxtiny": {"in1k": _in1k("gcvit_1k_xxtiny", 79.9, 1.0)},
    "gcvit_xtiny": {"in1k": _in1k("gcvit_1k_xtiny", 82.0, 0.875)},
    "gcvit_tiny": {"in1k": _in1k("gcvit_1k_tiny", 83.5, 1.0)},
    "gcvit_tiny2": {"in1k": _in1k("gcvit_1k_tiny2", 83.7, 0.875)},
    "gcvit_small": {"in1k": _in1k("gcvit_1k_small", 84.3, 0.875)},
    "gcvit_small2": {"in1k": _in1k("gcvit_1k_small2", 84.8, 0.875)},
    "gcvit_base": {"in1k": _in1k("gcvit_1k_base", 85.0, 1.0)},
    "gcvit_large": {
        "in1k": _in1k("gcvit_1k_large", 85.7, 1.0),
        "in21k_ft_in1k": PretrainedCfg(url=NVIDIA_URL.format("gcvit_21k_large_224"), top1=86.6, crop_pct=1.0),
        "in21k_ft_in1k_384": PretrainedCfg(
            url=NVIDIA_URL.format("gcvit_21k_large_384"),
            top1=87.4,
            img_size=(384, 384),
            crop_pct=1.0,
            crop_mode="squash",
            arch={"img_size": (384, 384), "window_size": (12, 12, 24, 12), "drop_path_rate": 0.1},
        ),
        "in21k_ft_in1k_512": PretrainedCfg(
            url=NVIDIA_URL.format("gcvit_21k_large_512"),
            top1=87.6,
            img_size=(512, 512),
            crop_pct=1.0,
            crop_mode="squash",
            arch={"img_size": (512, 512), "window_size": (16, 16, 32, 16), "drop_path_rate": 0.1},
        ),
    },
}
