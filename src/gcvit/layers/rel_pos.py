"""Relative-position bias of window attention (Swin Transformer, Liu et al. 2021): index and table resizing."""

from __future__ import annotations

import torch
import torch.nn.functional as F


def relative_position_index(window_size: int) -> torch.Tensor:
    """(N, N) long tensor: row i, column j holds the table row of the offset from token j to token i.

    Offsets (dy, dx) in [-(ws-1), ws-1] map to (dy + ws - 1) * (2ws - 1) + (dx + ws - 1), the Swin convention that
    official GC ViT checkpoints store.
    """
    ws = window_size
    coords = torch.stack(torch.meshgrid(torch.arange(ws), torch.arange(ws), indexing="ij")).flatten(1)  # (2, N)
    rel = coords[:, :, None] - coords[:, None, :]  # (2, N, N)
    rel = rel + (ws - 1)
    return rel[0] * (2 * ws - 1) + rel[1]


def resize_bias_table(table: torch.Tensor, new_window_size: int) -> torch.Tensor:
    """Bicubically resize a ((2ws-1)**2, heads) bias table to another window size."""
    side = round(table.shape[0] ** 0.5)
    if side * side != table.shape[0]:
        raise ValueError(f"a bias table has (2*ws-1)**2 rows; got {table.shape[0]}")
    new_side = 2 * new_window_size - 1
    if new_side == side:
        return table
    heads = table.shape[1]
    grid = table.T.reshape(1, heads, side, side).float()  # (1, heads, 2ws-1, 2ws-1)
    grid = F.interpolate(grid, size=(new_side, new_side), mode="bicubic", align_corners=False)
    return grid.reshape(heads, new_side * new_side).T.to(table.dtype).contiguous()  # ((2ws'-1)**2, heads)
