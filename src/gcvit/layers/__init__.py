"""Layers shared by every model of the package: one concept per file."""

from gcvit.layers.attention import (
    AttentionRoute,
    WindowAttention,
    WindowAttentionGlobal,
    attention_route,
    get_attention_route,
    set_attention_route,
    window_attention,
    window_attention_probs,
)
from gcvit.layers.conv import FeatExtract, FusedMBConv, ReduceSize, SqueezeExcite
from gcvit.layers.drop import DropPath
from gcvit.layers.fused import onednn_kernels
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
    "AttentionRoute",
    "DropPath",
    "FeatExtract",
    "FusedMBConv",
    "GlobalAttention",
    "Mlp",
    "ReduceSize",
    "SqueezeExcite",
    "WindowAttention",
    "WindowAttentionGlobal",
    "attention_route",
    "forget_prepared",
    "get_attention_route",
    "map_view",
    "onednn_kernels",
    "pad_to_window_multiple",
    "padding_key_mask",
    "relative_position_index",
    "resize_bias_table",
    "set_attention_route",
    "window_attention",
    "window_attention_probs",
    "window_partition",
    "window_reverse",
    "window_view",
]
