"""Transformer MLP: Linear -> GELU -> Dropout -> Linear -> Dropout."""

from __future__ import annotations

import torch
from torch import nn

from gcvit.layers.fused import linear


class Mlp(nn.Module):
    def __init__(self, dim: int, hidden_dim: int, drop: float = 0.0) -> None:
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden_dim)
        self.act = nn.GELU()
        self.fc2 = nn.Linear(hidden_dim, dim)
        self.drop = nn.Dropout(drop)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.drop(linear(x, self.fc1, self.act))  # (..., hidden)
        return self.drop(linear(h, self.fc2))
