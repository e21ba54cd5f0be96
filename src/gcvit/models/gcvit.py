"""GC ViT: Global Context Vision Transformer (Hatamizadeh et al., ICML 2023, arXiv 2206.09959).

A four-stage hierarchical transformer (strides 4, 8, 16, 32). Blocks alternate local window attention with global
window attention, whose queries come from a small CNN (the global query generator) that shrinks the whole stage's
map to one window, shared by every window of that image. Module names, order of operations and state-dict keys are
those of NVIDIA's release, so official checkpoints load strictly; `convert_timm` maps timm's keys onto them.

Beyond the official classifier, any input size from 32 px works: maps are padded to window multiples with padded
keys masked out, and the global query map is resized bicubically to the window size (as NVIDIA's detection
backbone does). At the native size both steps are no-ops and the computation is the official one.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from gcvit.layers import (
    DropPath,
    FeatExtract,
    Mlp,
    ReduceSize,
    WindowAttention,
    WindowAttentionGlobal,
    map_view,
    pad_to_window_multiple,
    padding_key_mask,
    window_view,
)
from gcvit.models.base import PyramidClassifier, check_config, check_images, init_weights, stem_conv

MIN_INPUT_SIZE = 32


@dataclass(frozen=True)
class GCViTConfig:
    embed_dim: int = 64  # channels of stage 0; stage i has embed_dim * 2**i
    depths: tuple[int, ...] = (3, 4, 19, 5)  # blocks per stage; block j is local when j is even, global when odd
    num_heads: tuple[int, ...] = (2, 4, 8, 16)  # attention heads per stage
    window_size: tuple[int, ...] = (7, 7, 14, 7)  # window side per stage, in tokens
    mlp_ratio: float = 3.0  # MLP hidden width / channels
    qkv_bias: bool = True
    layer_scale: float | None = None  # initial value of gamma1/gamma2; None: no layer scale
    drop_rate: float = 0.0  # dropout after the stem, the attention projection and the MLP
    attn_drop_rate: float = 0.0  # dropout on attention weights
    drop_path_rate: float = 0.2  # stochastic depth, rising linearly from 0 over all blocks
    img_size: tuple[int, int] = (224, 224)  # native input size (H, W); other sizes run too
    global_query_pools: tuple[int, ...] | None = None  # max-pools per stage in the global query generator; None: derive
    in_chans: int = 3
    num_classes: int = 1000  # 0: no head, the model returns pooled features
    norm_eps: float = 1e-5

    def __post_init__(self) -> None:
        check_config(self, per_stage=("depths", "num_heads", "window_size"), optional_per_stage=("global_query_pools",))

    @property
    def pools(self) -> tuple[int, ...]:
        """Max-pool steps of each stage's global query generator: `global_query_pools`, written out in every
        variant; None (configs saved before they were) derives them at `img_size` (`query_pools`)."""
        if self.global_query_pools is not None:
            return self.global_query_pools
        return query_pools(self.window_size, self.img_size)


def query_pools(window_size: tuple[int, ...], img_size: tuple[int, int]) -> tuple[int, ...]:
    """The max-pool steps that bring each stage's map at `img_size` down to its window (3, 2, 0, 0 for the official
    224 px models). They fix the module structure (the state-dict keys), so a model keeps them at any input size;
    a model built for another native size asks for that size's pools explicitly."""
    pools = []
    for i, ws in enumerate(window_size):
        side = min(img_size) / 2 ** (i + 2)  # map side of stage i
        pools.append(max(0, math.floor(math.log2(side / ws) + 1e-9)) if side > ws else 0)
    return tuple(pools)


class PatchEmbed(nn.Module):
    """Stem: 3x3 conv stride 2 (in_chans -> C), then ReduceSize keeping C: stride 4 in all. NCHW in, NHWC out."""

    def __init__(self, in_chans: int, dim: int, eps: float) -> None:
        super().__init__()
        self.proj = nn.Conv2d(in_chans, dim, 3, 2, 1)
        self.conv_down = ReduceSize(dim, keep_dim=True, eps=eps)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv_down(stem_conv(x, self.proj).permute(0, 2, 3, 1))  # NCHW -> NHWC


class GlobalQueryGen(nn.Module):
    """FeatExtract blocks (the first `pools` of them max-pool) shrink the stage map to about one window; the result
    is resized bicubically to exactly ws x ws when the input size is not the native one."""

    def __init__(self, dim: int, num_heads: int, window_size: int, pools: int) -> None:
        super().__init__()
        self.num_heads = num_heads
        self.window_size = window_size
        self.to_q_global = nn.Sequential(*[FeatExtract(dim, keep_dim=k >= pools) for k in range(max(1, pools))])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x NCHW (B, C, H, W) -> global query (B, heads, N, hd)."""
        ws = self.window_size
        x = self.to_q_global(x)
        if x.shape[-2:] != (ws, ws):
            x = F.interpolate(x, size=(ws, ws), mode="bicubic", align_corners=False)
        B, C = x.shape[:2]
        x = x.permute(0, 2, 3, 1).reshape(B, ws * ws, self.num_heads, C // self.num_heads)  # NHWC -> (B, N, heads, hd)
        return x.transpose(1, 2)  # (B, heads, N, hd)


class GCViTBlock(nn.Module):
    """x + drop_path(gamma1 * attn(windows(norm1(x)))), then x + drop_path(gamma2 * mlp(norm2(x))). NHWC."""

    def __init__(
        self,
        dim: int,
        num_heads: int,
        window_size: int,
        use_global: bool,
        cfg: GCViTConfig,
        drop_path: float,
    ) -> None:
        super().__init__()
        self.window_size = window_size
        self.norm1 = nn.LayerNorm(dim, eps=cfg.norm_eps)
        attention = WindowAttentionGlobal if use_global else WindowAttention
        self.attn = attention(dim, num_heads, window_size, cfg.qkv_bias, cfg.attn_drop_rate, cfg.drop_rate)
        self.drop_path = DropPath(drop_path)
        self.norm2 = nn.LayerNorm(dim, eps=cfg.norm_eps)
        self.mlp = Mlp(dim, int(dim * cfg.mlp_ratio), cfg.drop_rate)
        self.gamma1: nn.Parameter | None = None
        self.gamma2: nn.Parameter | None = None
        if cfg.layer_scale is not None:
            self.gamma1 = nn.Parameter(torch.full((dim,), float(cfg.layer_scale)))
            self.gamma2 = nn.Parameter(torch.full((dim,), float(cfg.layer_scale)))

    def forward(self, x: torch.Tensor, q_global: torch.Tensor, pad_mask: torch.Tensor | None) -> torch.Tensor:
        """x (B, H, W, C), q_global (B, heads, N, hd), pad_mask (nW, 1, 1, N) or None -> (B, H, W, C). In training,
        each branch runs only for the images that stochastic depth keeps (`DropPath.residual`)."""

        def attention(x: torch.Tensor, rows: torch.Tensor | None) -> torch.Tensor:
            return self._attention(x, q_global if rows is None else q_global.index_select(0, rows), pad_mask)

        x = self.drop_path.residual(x, attention)
        return self.drop_path.residual(x, lambda x, rows: self._mlp(x))

    def _attention(self, x: torch.Tensor, q_global: torch.Tensor, pad_mask: torch.Tensor | None) -> torch.Tensor:
        """gamma1 * attn(windows(norm1(x))): x (B, H, W, C) -> windows in map order, (B, nH, ws, nW_w, ws, C), or
        (B, H, W, C) where the map was padded.

        Padding comes before norm1 (the official code pads after it): padded tokens are masked out as keys and
        dropped as queries, so their values never reach a real token. Partition and reverse cost no passes of
        their own: norm1 writes its output window by window, and the residual add reads the windows in map order.
        """
        B, H, W, C = x.shape
        ws = self.window_size
        xp = pad_to_window_multiple(x, ws)  # (B, Hp, Wp, C)
        Hp, Wp = xp.shape[1:3]
        y = self.norm1(window_view(xp, ws))  # (B, nH, nW_w, ws, ws, C), contiguous
        y = self.attn(y.view(B, Hp // ws * (Wp // ws), ws * ws, C), q_global, pad_mask)  # (B, nW, N, C)
        y = map_view(y, ws, Hp, Wp)  # (B, nH, ws, nW_w, ws, C) view
        if self.gamma1 is not None:
            y = y * self.gamma1
        if (Hp, Wp) != (H, W):
            y = y.reshape(B, Hp, Wp, C)[:, :H, :W]  # (B, H, W, C)
        return y

    def _mlp(self, x: torch.Tensor) -> torch.Tensor:
        """gamma2 * mlp(norm2(x)), x (B, H, W, C)."""
        y = self.mlp(self.norm2(x))
        return y if self.gamma2 is None else y * self.gamma2


class GCViTLayer(nn.Module):
    """One stage: global query from the stage input, blocks alternating local/global, then ReduceSize (stages 0-2)."""

    def __init__(self, i: int, cfg: GCViTConfig, drop_path: list[float]) -> None:
        super().__init__()
        dim, heads, ws = cfg.embed_dim * 2**i, cfg.num_heads[i], cfg.window_size[i]
        self.window_size = ws
        self.blocks = nn.ModuleList(
            [GCViTBlock(dim, heads, ws, j % 2 == 1, cfg, drop_path[j]) for j in range(cfg.depths[i])]
        )
        self.downsample = ReduceSize(dim, eps=cfg.norm_eps) if i < len(cfg.depths) - 1 else None
        self.q_global_gen = GlobalQueryGen(dim, heads, ws, cfg.pools[i])
        self.grad_checkpointing = False

    def forward_blocks(self, x: torch.Tensor) -> torch.Tensor:
        """NHWC (B, H, W, C) -> NHWC (B, H, W, C): the stage's map before downsampling."""
        _, H, W, _ = x.shape
        q_global = self.q_global_gen(x.permute(0, 3, 1, 2))  # NHWC -> NCHW view; -> (B, heads, N, hd)
        pad_mask = padding_key_mask(H, W, self.window_size, x.device, x.dtype)
        for blk in self.blocks:
            if self.grad_checkpointing and torch.is_grad_enabled():
                x = checkpoint(blk, x, q_global, pad_mask, use_reentrant=False)
            else:
                x = blk(x, q_global, pad_mask)
        return x

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.forward_blocks(x)
        return x if self.downsample is None else self.downsample(x)


def build_levels(cfg: GCViTConfig) -> nn.ModuleList:
    """The stages (`levels`), stochastic depth rising linearly from 0 to drop_path_rate over all blocks."""
    dpr = torch.linspace(0, cfg.drop_path_rate, sum(cfg.depths), device="cpu").tolist()
    starts = [sum(cfg.depths[:i]) for i in range(len(cfg.depths))]
    return nn.ModuleList([GCViTLayer(i, cfg, dpr[s : s + d]) for i, (s, d) in enumerate(zip(starts, cfg.depths))])


class GCViT(PyramidClassifier):
    """GC ViT classifier and backbone. Input NCHW float images; see `forward` and `forward_intermediates`;
    `save_pretrained(dir)` writes a folder that `gcvit.load(dir)` loads."""

    def __init__(self, cfg: GCViTConfig) -> None:
        super().__init__()
        self.cfg = cfg
        self.num_classes = cfg.num_classes
        self.num_features = cfg.embed_dim * 2 ** (len(cfg.depths) - 1)
        self.patch_embed = PatchEmbed(cfg.in_chans, cfg.embed_dim, cfg.norm_eps)
        self.pos_drop = nn.Dropout(cfg.drop_rate)
        self.levels = build_levels(cfg)
        self.norm = nn.LayerNorm(self.num_features, eps=cfg.norm_eps)
        self.head: nn.Module = nn.Linear(self.num_features, cfg.num_classes) if cfg.num_classes else nn.Identity()
        last = len(cfg.depths) - 1
        self.feature_info = [  # "module": the module whose output (NHWC) is the map, as hook-based extractors need
            {
                "num_chs": cfg.embed_dim * 2**i,
                "reduction": 2 ** (i + 2),
                "module": "norm" if i == last else f"levels.{i}.blocks.{cfg.depths[i] - 1}",
            }
            for i in range(len(cfg.depths))
        ]
        self.apply(init_weights)

    @staticmethod
    def convert_checkpoint(state_dict: dict[str, torch.Tensor]) -> tuple[dict[str, torch.Tensor], str]:
        """Official or timm state dict -> (official keys, format name); `load_checkpoint` calls it."""
        if is_timm_state_dict(state_dict):
            return convert_timm(dict(state_dict)), "timm"
        return dict(state_dict), "official"

    @property
    def stages(self) -> nn.ModuleList:
        return self.levels

    def _check_input(self, x: torch.Tensor) -> None:
        check_images(x, self.cfg.in_chans)
        if min(x.shape[2:]) < MIN_INPUT_SIZE:
            raise ValueError(f"expected H and W of at least {MIN_INPUT_SIZE} px; got {tuple(x.shape[2:])}")

    def forward_intermediates(self, x: torch.Tensor) -> list[torch.Tensor]:
        """Feature pyramid for detection and segmentation.

        Args:
            x: images (B, 3, H, W).
        Returns:
            Four NCHW maps, each stage's output before its downsampling, with C, 2C, 4C, 8C channels at strides
            4, 8, 16, 32 (sizes rounded up); the last one passes through the final `norm`, as in timm.
        """
        self._check_input(x)
        x = self.pos_drop(self.patch_embed(x))  # NHWC (B, H/4, W/4, C)
        feats = []
        for level in self.levels:
            x = level.forward_blocks(x)
            if level.downsample is None:
                x = self.norm(x)
            feats.append(x.permute(0, 3, 1, 2))  # NHWC -> NCHW (a channels-last view)
            if level.downsample is not None:
                x = level.downsample(x)
        return feats


# --- checkpoint conversion -------------------------------------------------------------------------------------

_TIMM_CONV_BLOCK = [  # inside timm's MbConvBlock -> inside the official `conv` Sequential
    (r"conv_dw\.", "0."),
    (r"se\.fc1\.", "2.fc.0."),
    (r"se\.fc2\.", "2.fc.2."),
    (r"conv_pw\.", "3."),
]


def _timm_key(key: str) -> str:
    """One timm GlobalContextVit key -> its official name."""
    rules = [
        (r"^stem\.conv1\.", "patch_embed.proj."),
        (r"^stem\.down\.", "patch_embed.conv_down."),
        (r"^stages\.(\d+)\.downsample\.", lambda m: f"levels.{int(m[1]) - 1}.downsample."),
        (
            r"^stages\.(\d+)\.global_block\.blocks\.conv(\d+)\.",
            lambda m: f"levels.{m[1]}.q_global_gen.to_q_global.{int(m[2]) - 1}.conv.",
        ),
        (r"^stages\.(\d+)\.norm\.", "norm."),
        (r"^stages\.(\d+)\.blocks\.", r"levels.\1.blocks."),
        (r"^head\.fc\.", "head."),
        (r"\.conv_block\.", ".conv."),
        (r"\.attn\.rel_pos\.", ".attn."),
        (r"\.ls1\.gamma$", ".gamma1"),
        (r"\.ls2\.gamma$", ".gamma2"),
    ]
    for pattern, repl in rules:
        key = re.sub(pattern, repl, key)
    if ".conv." in key:
        head, tail = key.split(".conv.", 1)
        for pattern, repl in _TIMM_CONV_BLOCK:
            tail = re.sub("^" + pattern, repl, tail)
        key = f"{head}.conv.{tail}"
    return key


def convert_timm(state_dict: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """timm GlobalContextVit state dict -> official GC ViT state dict (no relative_position_index: timm stores none).

    SE layers are 1x1 convs in timm, (out, in, 1, 1), and Linear layers here, (out, in).
    """
    out = {}
    for key, value in state_dict.items():
        new = _timm_key(key)
        if re.search(r"\.conv\.2\.fc\.[02]\.weight$", new) and value.ndim == 4:
            value = value.flatten(1)  # (out, in, 1, 1) -> (out, in)
        out[new] = value
    return out


def is_timm_state_dict(state_dict: dict[str, torch.Tensor]) -> bool:
    return any(k.startswith(("stem.", "stages.")) for k in state_dict)


# --- variants --------------------------------------------------------------------------------------------------

DIGITS: dict[str, object] = {  # the small 32 px model `gcvit train` fits to the bundled digits (1.5 M parameters)
    "embed_dim": 32,
    "depths": (1, 1, 2, 1),
    "num_heads": (1, 2, 4, 8),
    "window_size": (4, 4, 4, 2),
    "mlp_ratio": 2.0,
    "global_query_pools": (1, 0, 0, 0),  # at 32 px; a run at another size asks for that size's (`query_pools`)
}

_LAYER_SCALE = 1e-5
_POOLS = (3, 2, 0, 0)  # the official models': stage maps of 56, 28, 14 and 7 tokens a side at 224 px (and 384, 512)
VARIANTS: dict[str, GCViTConfig] = {
    # Two small models for small data sets, trained from scratch (no published weights). gcvit_nano is the digits
    # model (a global block only in stage 2); gcvit_micro has a local and a global block in every stage, windows of
    # 8 tokens in the two early stages, and runs at 64-128 px.
    "gcvit_nano": GCViTConfig(**DIGITS, img_size=(32, 32)),  # type: ignore[arg-type]
    "gcvit_micro": GCViTConfig(
        embed_dim=32,
        depths=(2, 2, 2, 2),
        num_heads=(1, 2, 4, 8),
        window_size=(8, 8, 4, 2),
        mlp_ratio=2.0,
        drop_path_rate=0.1,
        img_size=(64, 64),
        global_query_pools=(1, 0, 0, 0),
    ),
    "gcvit_xxtiny": GCViTConfig(global_query_pools=_POOLS, depths=(2, 2, 6, 2)),
    "gcvit_xtiny": GCViTConfig(global_query_pools=_POOLS, depths=(3, 4, 6, 5)),
    "gcvit_tiny": GCViTConfig(global_query_pools=_POOLS, depths=(3, 4, 19, 5)),
    "gcvit_tiny2": GCViTConfig(global_query_pools=_POOLS, depths=(3, 4, 29, 5), drop_path_rate=0.25),
    "gcvit_small": GCViTConfig(
        global_query_pools=_POOLS,
        embed_dim=96,
        num_heads=(3, 6, 12, 24),
        mlp_ratio=2,
        drop_path_rate=0.3,
        layer_scale=_LAYER_SCALE,
    ),
    "gcvit_small2": GCViTConfig(
        global_query_pools=_POOLS,
        embed_dim=96,
        depths=(3, 4, 23, 5),
        num_heads=(3, 6, 12, 24),
        drop_path_rate=0.35,
        layer_scale=_LAYER_SCALE,
    ),
    "gcvit_base": GCViTConfig(
        global_query_pools=_POOLS,
        embed_dim=128,
        num_heads=(4, 8, 16, 32),
        mlp_ratio=2,
        drop_path_rate=0.5,
        layer_scale=_LAYER_SCALE,
    ),
    "gcvit_large": GCViTConfig(
        global_query_pools=_POOLS,
        embed_dim=192,
        num_heads=(6, 12, 24, 48),
        mlp_ratio=2,
        drop_path_rate=0.5,
        layer_scale=_LAYER_SCALE,
    ),
}
