"""Convolutional parts of GC ViT: squeeze-excitation, the fused-MBConv residual block, downsampling and the
feature extractor of the global query generator.

Layouts: `SqueezeExcite`, `FusedMBConv` and `FeatExtract` work on NCHW maps; `ReduceSize` takes and returns NHWC.
Attribute names follow NVIDIA's checkpoints (`conv.0`, `conv.2.fc.0`, `reduction`, ...): they are state-dict keys.
"""

from __future__ import annotations

import torch
from torch import nn

from gcvit.layers.fused import conv2d_gelu


class SqueezeExcite(nn.Module):
    """Channel gating: global average pool -> Linear -> GELU -> Linear -> sigmoid -> scale (Hu et al. 2018)."""

    def __init__(self, dim: int, ratio: float = 0.25) -> None:
        super().__init__()
        hidden = int(dim * ratio)
        self.fc = nn.Sequential(
            nn.Linear(dim, hidden, bias=False), nn.GELU(), nn.Linear(hidden, dim, bias=False), nn.Sigmoid()
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        gate = self.fc(x.mean((2, 3)))  # (B, C)
        return x * gate[:, :, None, None]  # NCHW


class FusedMBConv(nn.Sequential):
    """Depthwise 3x3 -> GELU -> SE -> pointwise 1x1, no biases; callers add the residual. A Sequential, so its
    state-dict keys are NVIDIA's (`conv.0`, `conv.2.fc.0`, ...); the convolution and its GELU run as one kernel in
    CPU inference."""

    def __init__(self, dim: int) -> None:
        super().__init__(
            nn.Conv2d(dim, dim, 3, 1, 1, groups=dim, bias=False),
            nn.GELU(),
            SqueezeExcite(dim),
            nn.Conv2d(dim, dim, 1, 1, 0, bias=False),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """NCHW -> NCHW."""
        dw, _, se, pw = self
        return pw(se(conv2d_gelu(x, dw)))


class ReduceSize(nn.Module):
    """LayerNorm -> x + FusedMBConv(x) -> strided 3x3 conv (C -> 2C, or C -> C with keep_dim) -> LayerNorm.

    Halves H and W (ceil). Input and output NHWC.
    """

    def __init__(self, dim: int, keep_dim: bool = False, eps: float = 1e-5) -> None:
        super().__init__()
        dim_out = dim if keep_dim else 2 * dim
        self.norm1 = nn.LayerNorm(dim, eps=eps)
        self.conv = FusedMBConv(dim)
        self.reduction = nn.Conv2d(dim, dim_out, 3, 2, 1, bias=False)
        self.norm2 = nn.LayerNorm(dim_out, eps=eps)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.norm1(x).permute(0, 3, 1, 2)  # NHWC -> NCHW (a channels-last view)
        x = x + self.conv(x)
        x = self.reduction(x).permute(0, 2, 3, 1)  # NCHW -> NHWC
        return self.norm2(x)


class FeatExtract(nn.Module):
    """x + FusedMBConv(x), then 3x3 max-pool with stride 2 unless keep_dim. NCHW in and out."""

    def __init__(self, dim: int, keep_dim: bool = False) -> None:
        super().__init__()
        self.conv = FusedMBConv(dim)
        self.pool = nn.Identity() if keep_dim else nn.MaxPool2d(kernel_size=3, stride=2, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.pool(x + self.conv(x))
