"""Convolutional parts of GC ViT: squeeze-excitation, the fused-MBConv residual block, downsampling and the
feature extractor of the global query generator.

Layouts: `SqueezeExcite`, `FusedMBConv` and `FeatExtract` work on NCHW maps; `ReduceSize` takes and returns NHWC.
Attribute names follow NVIDIA's checkpoints (`conv.0`, `conv.2.fc.0`, `reduction`, ...): they are state-dict keys.
"""

from __future__ import annotations

import torch
from torch import nn

from gcvit.layers.fused import conv2d_gelu, is_plain


class SqueezeExcite(nn.Module):
    """Channel gating: global average pool -> Linear -> GELU -> Linear -> sigmoid -> scale (Hu et al. 2018)."""

    def __init__(self, dim: int, ratio: float = 0.25) -> None:
        super().__init__()
        hidden = int(dim * ratio)
        self.fc = nn.Sequential(
            nn.Linear(dim, hidden, bias=False), nn.GELU(), nn.Linear(hidden, dim, bias=False), nn.Sigmoid()
        )

    def gate(self, x: torch.Tensor) -> torch.Tensor:
        """NCHW -> the per-channel gate (B, C)."""
        return self.fc(_spatial_mean(x))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * self.gate(x)[:, :, None, None]  # NCHW


def _spatial_mean(x: torch.Tensor) -> torch.Tensor:
    """NCHW -> (B, C) mean over H and W. For a bf16 map on the CPU PyTorch's `mean` first copies the whole map to fp32;
    `sum` accumulates in fp32 without that copy (20x faster for the stem's 112x112 map). bf16 has fp32's range, so the
    sum cannot overflow (fp16's could, and GPUs reduce without the copy anyway)."""
    if x.dtype == torch.bfloat16 and x.device.type == "cpu":
        return x.sum((2, 3)) / (x.shape[2] * x.shape[3])
    return x.mean((2, 3))


class FusedMBConv(nn.Sequential):
    """x + (depthwise 3x3 -> GELU -> SE -> pointwise 1x1)(x), no biases. A Sequential, so its state-dict keys are
    NVIDIA's (`conv.0`, `conv.2.fc.0`, ...). The depthwise convolution and its GELU run as one kernel in CPU
    inference; the SE gating, the pointwise convolution and the residual add run as one batched matmul."""

    def __init__(self, dim: int) -> None:
        super().__init__(
            nn.Conv2d(dim, dim, 3, 1, 1, groups=dim, bias=False),
            nn.GELU(),
            SqueezeExcite(dim),
            nn.Conv2d(dim, dim, 1, 1, 0, bias=False),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """NCHW (best channels-last) -> NCHW, channels-last when the modules are plain (`is_plain`); hooked or
        replaced modules are called one after the other."""
        dw, act, se, pw = self
        y = conv2d_gelu(x, dw, act)  # (B, C, H, W)
        if not is_plain(pw, se, kinds=(SqueezeExcite,)) or not _is_pointwise(pw):
            return x + pw(se(y))
        B, C, H, W = y.shape
        # pw(y * gate) = y @ (gate * pw's weight), one weight per image: the gate scales the small weight instead of
        # the map (no pass over it, and in training no gated copy kept for the backward); baddbmm adds the residual
        gate = se.gate(y)  # (B, C), in the autocast dtype under autocast
        weight = gate[:, :, None] * pw.weight.view(-1, C).t().to(gate.dtype)  # (B, C, C)
        out = torch.baddbmm(_nhwc(x), _nhwc(y), weight)  # (B, H*W, C)
        return out.view(B, H, W, C).permute(0, 3, 1, 2)


def _is_pointwise(conv: nn.Conv2d) -> bool:
    """A bias-free 1x1 convolution of stride 1 over all channels: what the fused product computes."""
    return (
        conv.kernel_size == (1, 1)
        and conv.stride == (1, 1)
        and conv.padding in ((0, 0), "valid")
        and conv.dilation == (1, 1)
        and conv.groups == 1
        and conv.bias is None
    )


def _nhwc(x: torch.Tensor) -> torch.Tensor:
    """NCHW (B, C, H, W) -> (B, H*W, C): a view of a channels-last map, a copy otherwise."""
    return x.permute(0, 2, 3, 1).flatten(1, 2)


class ReduceSize(nn.Module):
    """LayerNorm -> FusedMBConv (residual inside) -> strided 3x3 conv (C -> 2C, or C -> C with keep_dim) -> LayerNorm.

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
        x = self.conv(x)  # x + block(x)
        x = self.reduction(x).permute(0, 2, 3, 1)  # NCHW -> NHWC
        return self.norm2(x)


class FeatExtract(nn.Module):
    """FusedMBConv (x + block(x)), then 3x3 max-pool with stride 2 unless keep_dim. NCHW in and out."""

    def __init__(self, dim: int, keep_dim: bool = False) -> None:
        super().__init__()
        self.conv = FusedMBConv(dim)
        self.pool = nn.Identity() if keep_dim else nn.MaxPool2d(kernel_size=3, stride=2, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.pool(self.conv(x))  # x + block(x), pooled
