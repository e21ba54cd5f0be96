"""Global multi-head self-attention (ViT, Dosovitskiy et al. 2021): every token attends to every token.

The counterpart of `WindowAttention` without windows: `qkv` Linear(C, 3C) and `proj` Linear(C, C) under the same
names, run through `torch.nn.functional.scaled_dot_product_attention` with the 4-D (B, heads, L, hd) layout. Cost is
quadratic in the token count L.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class GlobalAttention(nn.Module):
    """Self-attention over a whole token sequence (B, L, C) -> (B, L, C); no positional bias, no mask."""

    def __init__(
        self, dim: int, num_heads: int, qkv_bias: bool = True, attn_drop: float = 0.0, proj_drop: float = 0.0
    ) -> None:
        super().__init__()
        if dim % num_heads:
            raise ValueError(f"dim {dim} must be divisible by num_heads {num_heads}")
        self.num_heads = num_heads
        self.head_dim = dim // num_heads
        self.scale = self.head_dim**-0.5
        self.attn_drop = attn_drop
        self.qkv = nn.Linear(dim, 3 * dim, bias=qkv_bias)
        self.proj = nn.Linear(dim, dim)
        self.proj_drop = nn.Dropout(proj_drop)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x (B, L, C) -> (B, L, C)."""
        B, L, C = x.shape
        qkv = self.qkv(x).view(B, L, 3, self.num_heads, self.head_dim)  # (B, L, 3, heads, hd)
        q, k, v = qkv.permute(2, 0, 3, 1, 4).unbind(0)  # each (B, heads, L, hd)
        out = F.scaled_dot_product_attention(
            q, k, v, dropout_p=self.attn_drop if self.training else 0.0, scale=self.scale
        )  # (B, heads, L, hd)
        out = out.transpose(1, 2).reshape(B, L, C)  # (B, L, C)
        return self.proj_drop(self.proj(out))
