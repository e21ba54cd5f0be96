"""Layers shared by every model of the package: one concept per file."""

from gcvit.layers.attention import WindowAttention, WindowAttentionGlobal
from gcvit.layers.conv import FeatExtract, FusedMBConv, ReduceSize, SqueezeExcite
from gcvit.layers.drop import DropPath
from gcvit.layers.kernel_cache import forget_prepared
from gcvit.layers.mlp import Mlp
from gcvit.layers.rel_pos import relative_position_index, resize_bias_table
from gcvit.layers.self_attention import GlobalAttention
from gcvit.layers.window import (
    map_view,
    pad_to_window_multiple,
    padding_key_mask,
    window_partition,
    window_reverse,
    window_view,
)

__all__ = [
    "DropPath",
    "FeatExtract",
    "FusedMBConv",
    "GlobalAttention",
    "Mlp",
    "ReduceSize",
    "SqueezeExcite",
    "WindowAttention",
    "WindowAttentionGlobal",
    "forget_prepared",
    "map_view",
    "pad_to_window_multiple",
    "padding_key_mask",
    "relative_position_index",
    "resize_bias_table",
    "window_partition",
    "window_reverse",
    "window_view",
]
