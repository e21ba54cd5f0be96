"""NVIDIA's detection backbone (NVlabs/GCVit detection/models/gc_vit.py) re-implemented in plain modules with the
official order of operations and state-dict keys, independently of `gcvit.models`: the reference of the backbone
tests (any size, where timm's GC ViT takes only its build size) and of benchmarks/detection.py.

The official code zero-pads each map to window multiples after norm1 and lets the padded tokens attend as keys;
`mask_padded_keys=True` hides them, as `gcvit.create_backbone` does. At sizes that need no padding the two agree.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from gcvit.models.gcvit import GCViTConfig


class RefSqueezeExcite(nn.Module):
    """avg pool -> Linear -> GELU -> Linear -> sigmoid -> scale, NCHW (the official `SE`)."""

    def __init__(self, dim: int) -> None:
        super().__init__()
        self.avg_pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Sequential(
            nn.Linear(dim, dim // 4, bias=False), nn.GELU(), nn.Linear(dim // 4, dim, bias=False), nn.Sigmoid()
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, C = x.shape[:2]
        return x * self.fc(self.avg_pool(x).view(B, C)).view(B, C, 1, 1)  # (B, C, H, W)


def ref_mbconv(dim: int) -> nn.Sequential:
    """depthwise 3x3 -> GELU -> SE -> pointwise 1x1, no biases (keys conv.0, conv.2.fc.0, conv.2.fc.2, conv.3)."""
    return nn.Sequential(
        nn.Conv2d(dim, dim, 3, 1, 1, groups=dim, bias=False),
        nn.GELU(),
        RefSqueezeExcite(dim),
        nn.Conv2d(dim, dim, 1, 1, 0, bias=False),
    )


class RefReduceSize(nn.Module):
    """NHWC -> LayerNorm -> x + mbconv(x) -> strided 3x3 conv -> LayerNorm -> NHWC (halved H and W)."""

    def __init__(self, dim: int, keep_dim: bool, eps: float) -> None:
        super().__init__()
        dim_out = dim if keep_dim else 2 * dim
        self.conv = ref_mbconv(dim)
        self.reduction = nn.Conv2d(dim, dim_out, 3, 2, 1, bias=False)
        self.norm2 = nn.LayerNorm(dim_out, eps=eps)
        self.norm1 = nn.LayerNorm(dim, eps=eps)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.norm1(x.contiguous()).permute(0, 3, 1, 2)  # NHWC -> NCHW
        x = x + self.conv(x)
        x = self.reduction(x).permute(0, 2, 3, 1)  # NCHW -> NHWC
        return self.norm2(x)


class RefFeatExtract(nn.Module):
    """NCHW: x + mbconv(x), then a 3x3 max-pool of stride 2 unless keep_dim."""

    def __init__(self, dim: int, keep_dim: bool) -> None:
        super().__init__()
        self.conv = ref_mbconv(dim)
        self.pool = nn.Identity() if keep_dim else nn.MaxPool2d(kernel_size=3, stride=2, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x.contiguous()
        return self.pool(x + self.conv(x))


class RefGlobalQueryGen(nn.Module):
    """The stage map (NCHW) -> FeatExtract blocks (the first `pools` max-pool) -> bicubic resize to ws x ws ->
    the global query (B, 1, heads, N, hd)."""

    def __init__(self, dim: int, heads: int, ws: int, pools: int) -> None:
        super().__init__()
        self.to_q_global = nn.Sequential(*[RefFeatExtract(dim, keep_dim=k >= pools) for k in range(max(1, pools))])
        self.heads, self.ws = heads, ws

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.to_q_global(x)
        B, C, H, W = x.shape
        if (H, W) != (self.ws, self.ws):
            x = F.interpolate(x, size=(self.ws, self.ws), mode="bicubic")  # align_corners False
        x = x.permute(0, 2, 3, 1)  # NCHW -> NHWC (B, ws, ws, C)
        x = x.reshape(B, 1, self.ws * self.ws, self.heads, C // self.heads)  # (B, 1, N, heads, hd)
        return x.permute(0, 1, 3, 2, 4)  # (B, 1, heads, N, hd)


def ref_position_index(ws: int) -> torch.Tensor:
    """(N, N): row i, column j holds the bias-table row of the offset between tokens i and j (Swin's convention)."""
    coords = torch.stack(torch.meshgrid(torch.arange(ws), torch.arange(ws), indexing="ij")).flatten(1)  # (2, N)
    rel = (coords[:, :, None] - coords[:, None, :]).permute(1, 2, 0) + (ws - 1)  # (N, N, 2), offsets from 0
    return rel[..., 0] * (2 * ws - 1) + rel[..., 1]


class RefWindowAttention(nn.Module):
    """Window attention with relative-position bias; queries from the windows (local) or the stage's global query."""

    def __init__(self, dim: int, heads: int, ws: int, global_query: bool, qkv_bias: bool) -> None:
        super().__init__()
        self.heads, self.scale, self.global_query = heads, (dim // heads) ** -0.5, global_query
        self.relative_position_bias_table = nn.Parameter(torch.zeros((2 * ws - 1) ** 2, heads))
        self.register_buffer("relative_position_index", ref_position_index(ws))
        self.qkv = nn.Linear(dim, dim * (2 if global_query else 3), bias=qkv_bias)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor, q_global: torch.Tensor, key_mask: torch.Tensor | None) -> torch.Tensor:
        """x (B*nW, N, C), q_global (B, 1, heads, N, hd), key_mask (B*nW, 1, 1, N) or None -> (B*nW, N, C)."""
        Bw, N, C = x.shape
        hd = C // self.heads
        if self.global_query:
            k, v = self.qkv(x).reshape(Bw, N, 2, self.heads, hd).permute(2, 0, 3, 1, 4)  # 2 x (B*nW, heads, N, hd)
            q = q_global.repeat(1, Bw // q_global.shape[0], 1, 1, 1)  # (B, nW, heads, N, hd), image-major
            q = q.reshape(Bw, self.heads, N, hd)  # (B*nW, heads, N, hd)
        else:
            q, k, v = self.qkv(x).reshape(Bw, N, 3, self.heads, hd).permute(2, 0, 3, 1, 4)  # 3 x (B*nW, heads, N, hd)
        attn = (q * self.scale) @ k.transpose(-2, -1)  # (B*nW, heads, N, N)
        bias = self.relative_position_bias_table[self.relative_position_index.view(-1)].view(N, N, -1)  # (N, N, heads)
        attn = attn + bias.permute(2, 0, 1).contiguous().unsqueeze(0)  # + (1, heads, N, N)
        if key_mask is not None:
            attn = attn + key_mask
        x = (attn.softmax(-1) @ v).transpose(1, 2).reshape(Bw, N, C)  # (B*nW, heads, N, hd) -> (B*nW, N, C)
        return self.proj(x)


class RefMlp(nn.Module):
    def __init__(self, dim: int, hidden: int) -> None:
        super().__init__()
        self.fc1, self.act, self.fc2 = nn.Linear(dim, hidden), nn.GELU(), nn.Linear(hidden, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.act(self.fc1(x)))


def ref_key_mask(B: int, H: int, W: int, ws: int) -> torch.Tensor | None:
    """(B*nW, 1, 1, N): 0 for the real keys of each window, -inf for the padded ones; None where nothing is padded."""
    Hp, Wp = -(-H // ws) * ws, -(-W // ws) * ws
    if (Hp, Wp) == (H, W):
        return None
    real = torch.zeros(Hp, Wp, dtype=torch.bool)
    real[:H, :W] = True
    real = real.view(Hp // ws, ws, Wp // ws, ws).permute(0, 2, 1, 3).reshape(-1, ws * ws)  # (nW, N)
    mask = torch.zeros(real.shape).masked_fill_(~real, float("-inf"))
    return mask.repeat(B, 1).view(-1, 1, 1, ws * ws)  # (B*nW, 1, 1, N), image-major


class RefBlock(nn.Module):
    """x + gamma1 * attn(windows(pad(norm1(x)))), then x + gamma2 * mlp(norm2(x)); NHWC, in eval mode."""

    def __init__(self, dim: int, heads: int, ws: int, global_query: bool, cfg: GCViTConfig) -> None:
        super().__init__()
        self.ws = ws
        self.norm1 = nn.LayerNorm(dim, eps=cfg.norm_eps)
        self.attn = RefWindowAttention(dim, heads, ws, global_query, cfg.qkv_bias)
        self.norm2 = nn.LayerNorm(dim, eps=cfg.norm_eps)
        self.mlp = RefMlp(dim, int(dim * cfg.mlp_ratio))
        scaled = cfg.layer_scale is not None
        self.gamma1: nn.Parameter | float = nn.Parameter(torch.full((dim,), cfg.layer_scale)) if scaled else 1.0
        self.gamma2: nn.Parameter | float = nn.Parameter(torch.full((dim,), cfg.layer_scale)) if scaled else 1.0

    def forward(self, x: torch.Tensor, q_global: torch.Tensor, key_mask: torch.Tensor | None) -> torch.Tensor:
        B, H, W, C = x.shape
        ws = self.ws
        shortcut = x
        x = F.pad(self.norm1(x), (0, 0, 0, (ws - W % ws) % ws, 0, (ws - H % ws) % ws))  # zeros after norm1
        Hp, Wp = x.shape[1:3]
        x = x.view(B, Hp // ws, ws, Wp // ws, ws, C).permute(0, 1, 3, 2, 4, 5)  # (B, nH, nW_w, ws, ws, C)
        x = self.attn(x.contiguous().view(-1, ws * ws, C), q_global, key_mask)  # (B*nW, N, C)
        x = x.view(B, Hp // ws, Wp // ws, ws, ws, C).permute(0, 1, 3, 2, 4, 5)  # (B, nH, ws, nW_w, ws, C)
        x = x.contiguous().view(B, Hp, Wp, C)
        if (Hp, Wp) != (H, W):
            x = x[:, :H, :W].contiguous()  # (B, H, W, C)
        x = shortcut + self.gamma1 * x  # the official code multiplies by 1.0 too when there is no layer scale
        return x + self.gamma2 * self.mlp(self.norm2(x))


class RefLayer(nn.Module):
    """One stage: global query from the stage input, blocks local/global alternately, then ReduceSize (0-2)."""

    def __init__(self, i: int, cfg: GCViTConfig) -> None:
        super().__init__()
        dim, heads, ws = cfg.embed_dim * 2**i, cfg.num_heads[i], cfg.window_size[i]
        self.ws = ws
        self.blocks = nn.ModuleList([RefBlock(dim, heads, ws, j % 2 == 1, cfg) for j in range(cfg.depths[i])])
        self.downsample = RefReduceSize(dim, False, cfg.norm_eps) if i < len(cfg.depths) - 1 else None
        self.q_global_gen = RefGlobalQueryGen(dim, heads, ws, cfg.pools[i])

    def forward(self, x: torch.Tensor, mask_padded_keys: bool) -> tuple[torch.Tensor, torch.Tensor]:
        """NHWC (B, H, W, C) -> (the input of the next stage, this stage's map before downsampling), NHWC."""
        q_global = self.q_global_gen(x.permute(0, 3, 1, 2))  # NHWC -> NCHW; -> (B, 1, heads, N, hd)
        B, H, W, _ = x.shape
        key_mask = ref_key_mask(B, H, W, self.ws) if mask_padded_keys else None
        for blk in self.blocks:
            x = blk(x, q_global, key_mask)
        return (x if self.downsample is None else self.downsample(x)), x


class RefPatchEmbed(nn.Module):
    def __init__(self, in_chans: int, dim: int, eps: float) -> None:
        super().__init__()
        self.proj = nn.Conv2d(in_chans, dim, 3, 2, 1)
        self.conv_down = RefReduceSize(dim, True, eps)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv_down(self.proj(x).permute(0, 2, 3, 1))  # NCHW -> NHWC (B, H/4, W/4, C)


class OfficialDetectionBackbone(nn.Module):
    """NVIDIA's detection backbone: images NCHW -> four NCHW maps, each stage's map before its downsampling through
    its own LayerNorm `norm{i}`. `mask_padded_keys=True` hides the padded keys from attention (ours does): then the
    maps are ours, at any size."""

    def __init__(self, cfg: GCViTConfig) -> None:
        super().__init__()
        self.patch_embed = RefPatchEmbed(cfg.in_chans, cfg.embed_dim, cfg.norm_eps)
        self.levels = nn.ModuleList([RefLayer(i, cfg) for i in range(len(cfg.depths))])
        for i in range(len(cfg.depths)):
            self.add_module(f"norm{i}", nn.LayerNorm(cfg.embed_dim * 2**i, eps=cfg.norm_eps))

    def forward(self, x: torch.Tensor, mask_padded_keys: bool = False) -> list[torch.Tensor]:
        x = self.patch_embed(x)  # NHWC
        maps = []
        for i, level in enumerate(self.levels):
            x, stage_map = level(x, mask_padded_keys)
            maps.append(getattr(self, f"norm{i}")(stage_map).permute(0, 3, 1, 2).contiguous())  # NHWC -> NCHW
        return maps
