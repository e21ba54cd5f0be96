"""Window partition and reverse, with padding of feature maps to a window multiple.

All maps here are channels-last (B, H, W, C). Windows come out image-major: every window of image 0, then image 1, ...
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def pad_to_window_multiple(x: torch.Tensor, window_size: int) -> torch.Tensor:
    """Zero-pad an NHWC map on the right and bottom so that H and W are multiples of `window_size`."""
    _, H, W, _ = x.shape
    pad_h = (window_size - H % window_size) % window_size
    pad_w = (window_size - W % window_size) % window_size
    if pad_h == 0 and pad_w == 0:
        return x
    return F.pad(x, (0, 0, 0, pad_w, 0, pad_h))  # pads C by (0, 0), W by (0, pad_w), H by (0, pad_h)


def window_partition(x: torch.Tensor, window_size: int) -> torch.Tensor:
    """(B, H, W, C) -> (B, nW, N, C) with N = window_size**2; H and W must be multiples of window_size."""
    B, H, W, C = x.shape
    ws = window_size
    x = x.view(B, H // ws, ws, W // ws, ws, C)  # (B, nH, ws, nW_w, ws, C)
    x = x.permute(0, 1, 3, 2, 4, 5)  # (B, nH, nW_w, ws, ws, C)
    return x.reshape(B, (H // ws) * (W // ws), ws * ws, C)  # (B, nW, N, C)


def window_view(x: torch.Tensor, window_size: int) -> torch.Tensor:
    """(B, H, W, C) -> (B, nH, nW_w, ws, ws, C) as a strided view, no copy. An op that writes a fresh output from it
    (LayerNorm does) lays that output out window by window, so partitioning costs no extra pass."""
    B, H, W, C = x.shape
    ws = window_size
    return x.view(B, H // ws, ws, W // ws, ws, C).permute(0, 1, 3, 2, 4, 5)  # (B, nH, nW_w, ws, ws, C)


def map_view(windows: torch.Tensor, window_size: int, H: int, W: int) -> torch.Tensor:
    """(B, nW, N, C) -> (B, nH, ws, nW_w, ws, C) as a strided view in map order, no copy: the inverse of
    `window_view`, to be consumed by an elementwise op (the residual add) that writes the map."""
    B, _, _, C = windows.shape
    ws = window_size
    return windows.view(B, H // ws, W // ws, ws, ws, C).permute(0, 1, 3, 2, 4, 5)  # (B, nH, ws, nW_w, ws, C)


def window_reverse(windows: torch.Tensor, window_size: int, H: int, W: int) -> torch.Tensor:
    """(B, nW, N, C) -> (B, H, W, C); the inverse of `window_partition`."""
    B, _, _, C = windows.shape
    ws = window_size
    x = windows.view(B, H // ws, W // ws, ws, ws, C)  # (B, nH, nW_w, ws, ws, C)
    x = x.permute(0, 1, 3, 2, 4, 5)  # (B, nH, ws, nW_w, ws, C)
    return x.reshape(B, H, W, C)


def padding_key_mask(H: int, W: int, window_size: int, device: torch.device, dtype: torch.dtype) -> torch.Tensor | None:
    """Additive attention mask hiding the padded tokens of an (H, W) map split into windows.

    Returns None when no padding is needed, else a (nW, 1, 1, N) tensor holding 0 for real keys and -inf for padded
    ones. Every window holds at least one real token, so no attention row is fully masked.
    """
    ws = window_size
    Hp, Wp = -(-H // ws) * ws, -(-W // ws) * ws
    if (Hp, Wp) == (H, W):
        return None
    real = torch.zeros(1, Hp, Wp, 1, device=device, dtype=torch.bool)
    real[:, :H, :W] = True
    real = window_partition(real, ws)  # (1, nW, N, 1)
    mask = torch.zeros(real.shape, device=device, dtype=dtype).masked_fill_(~real, float("-inf"))
    return mask.permute(1, 0, 3, 2)  # (nW, 1, 1, N)
