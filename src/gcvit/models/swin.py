"""Swin Transformer (Liu et al., ICCV 2021, arXiv 2103.14030), built from the layers GC ViT uses.

A four-stage hierarchical transformer (strides 4, 8, 16, 32): a 4x4 patch embedding, then stages of blocks that
attend inside non-overlapping ws x ws windows, every second block with the windows shifted by ws // 2 (a cyclic
shift of the map plus an attention mask that keeps tokens from attending across the wrap-around), patch merging
(2x2 neighbours concatenated, LayerNorm, Linear 4C -> 2C) at the start of stages 1-3, a final LayerNorm and average
pooling. Attention is `gcvit.layers.WindowAttention` (relative-position bias), the MLP is `gcvit.layers.Mlp`.

State-dict keys follow timm 1.0.31 (`layers.{i}.downsample`, `layers.{i}.blocks.{j}`) except that the head is a bare
Linear `head` as in every model of this package; `convert_timm` maps timm's and Microsoft's checkpoints onto them.

Any input size whose sides are multiples of the patch size runs: maps are padded to window multiples and padded
keys are masked out, and a stage whose map fits in one window does not shift (as in timm and the official code). At
sizes where every stage map is a window multiple (224 with window 7) the computation is timm's.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from gcvit.layers import DropPath, Mlp, WindowAttention, pad_to_window_multiple, window_partition, window_reverse
from gcvit.models.base import PyramidClassifier, check_config, check_images, init_weights, stem_conv

MIN_INPUT_SIZE = 32


@dataclass(frozen=True)
class SwinConfig:
    embed_dim: int = 96  # channels of stage 0; stage i has embed_dim * 2**i
    depths: tuple[int, ...] = (2, 2, 6, 2)  # blocks per stage; block j uses shifted windows when j is odd
    num_heads: tuple[int, ...] = (3, 6, 12, 24)  # attention heads per stage
    window_size: tuple[int, ...] = (7, 7, 7, 7)  # window side per stage, in tokens
    patch_size: int = 4  # side of the patches embedded by the stem (stride of stage 0)
    mlp_ratio: float = 4.0  # MLP hidden width / channels
    qkv_bias: bool = True
    drop_rate: float = 0.0  # dropout after the attention projection and in the MLP
    attn_drop_rate: float = 0.0  # dropout on attention weights
    drop_path_rate: float = 0.1  # stochastic depth, rising linearly from 0 over all blocks
    img_size: tuple[int, int] = (224, 224)  # native input size (H, W); other sizes run too
    in_chans: int = 3
    num_classes: int = 1000  # 0: no head, the model returns pooled features
    norm_eps: float = 1e-5

    def __post_init__(self) -> None:
        check_config(self, counts=("patch_size",), per_stage=("depths", "num_heads", "window_size"))


# --- helpers ---------------------------------------------------------------------------------------------------


def window_shift(H: int, W: int, window_size: int, shifted: bool) -> tuple[int, int]:
    """Cyclic shift (rows, columns) of a block: ws // 2 along each side longer than one window, else 0."""
    s = window_size // 2 if shifted else 0
    return (s if H > window_size else 0, s if W > window_size else 0)


def shifted_window_mask(
    H: int, W: int, window_size: int, shift: tuple[int, int], device: torch.device, dtype: torch.dtype
) -> torch.Tensor | None:
    """Additive attention mask of a (shifted) window block on an (H, W) map; None when nothing needs masking.

    The map is padded to window multiples (Hp, Wp), then rolled by -shift. A window that straddles the wrap-around
    holds tokens from up to four regions that are not neighbours in the image: a query may only attend to keys of
    its own region. A real query never attends to a padded key (padded queries are dropped after attention).

    Returns:
        (nW, 1, N, N) tensor, 0 where query i may attend to key j and -inf elsewhere; windows in image order.
    """
    ws = window_size
    Hp, Wp = -(-H // ws) * ws, -(-W // ws) * ws
    if shift == (0, 0) and (Hp, Wp) == (H, W):
        return None
    region = torch.zeros(1, Hp, Wp, 1, device=device)
    label = 0
    for rows in _regions(Hp, ws, shift[0]):
        for cols in _regions(Wp, ws, shift[1]):
            region[:, rows, cols] = label
            label += 1
    real = torch.zeros(1, Hp, Wp, 1, device=device)
    real[:, :H, :W] = 1
    real = torch.roll(real, shifts=(-shift[0], -shift[1]), dims=(1, 2))  # padding moves with the map
    region_w = window_partition(region, ws)[0, :, :, 0]  # (nW, N)
    real_w = window_partition(real, ws)[0, :, :, 0].bool()  # (nW, N)
    blocked = region_w[:, :, None] != region_w[:, None, :]  # (nW, N, N): query i, key j
    blocked |= real_w[:, :, None] & ~real_w[:, None, :]  # real query, padded key
    mask = torch.zeros(blocked.shape, device=device, dtype=dtype).masked_fill_(blocked, float("-inf"))
    return mask.unsqueeze(1)  # (nW, 1, N, N)


def _regions(size: int, window_size: int, shift: int) -> list[slice]:
    """Slices of one padded side that hold tokens which were neighbours before the cyclic shift."""
    if shift == 0:
        return [slice(0, size)]
    return [slice(0, size - window_size), slice(size - window_size, size - shift), slice(size - shift, size)]


# --- leaf modules ----------------------------------------------------------------------------------------------


class PatchEmbed(nn.Module):
    """Conv p x p stride p (in_chans -> C), then LayerNorm. NCHW in, NHWC out."""

    def __init__(self, in_chans: int, dim: int, patch_size: int, eps: float) -> None:
        super().__init__()
        self.proj = nn.Conv2d(in_chans, dim, patch_size, patch_size)
        self.norm = nn.LayerNorm(dim, eps=eps)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.norm(stem_conv(x, self.proj).permute(0, 2, 3, 1))  # NCHW -> NHWC


class PatchMerging(nn.Module):
    """2x2 neighbours concatenated (C -> 4C), LayerNorm, Linear 4C -> 2C without bias. NHWC (B, H, W, C) ->
    (B, ceil(H/2), ceil(W/2), 2C); odd sides are zero-padded."""

    def __init__(self, dim: int, eps: float) -> None:
        super().__init__()
        self.norm = nn.LayerNorm(4 * dim, eps=eps)
        self.reduction = nn.Linear(4 * dim, 2 * dim, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, H, W, C = x.shape
        x = F.pad(x, (0, 0, 0, W % 2, 0, H % 2))  # (B, Hp, Wp, C), even sides
        Hp, Wp = x.shape[1:3]
        x = x.view(B, Hp // 2, 2, Wp // 2, 2, C)  # (B, H/2, dy, W/2, dx, C)
        # channel order (dx, dy, C): the (0,0), (1,0), (0,1), (1,1) neighbours of the official concatenation
        x = x.permute(0, 1, 3, 4, 2, 5).reshape(B, Hp // 2, Wp // 2, 4 * C)  # (B, H/2, W/2, 4C)
        return self.reduction(self.norm(x))


# --- block and stage -------------------------------------------------------------------------------------------


class SwinBlock(nn.Module):
    """x + drop_path(unshift(attn(windows(shift(pad(norm1(x))))))), then x + drop_path(mlp(norm2(x))). NHWC."""

    def __init__(self, dim: int, num_heads: int, window_size: int, shifted: bool, cfg: SwinConfig, drop_path: float):
        super().__init__()
        self.window_size = window_size
        self.shifted = shifted
        self.norm1 = nn.LayerNorm(dim, eps=cfg.norm_eps)
        self.attn = WindowAttention(dim, num_heads, window_size, cfg.qkv_bias, cfg.attn_drop_rate, cfg.drop_rate)
        self.drop_path = DropPath(drop_path)
        self.norm2 = nn.LayerNorm(dim, eps=cfg.norm_eps)
        self.mlp = Mlp(dim, int(dim * cfg.mlp_ratio), cfg.drop_rate)

    def forward(self, x: torch.Tensor, shift: tuple[int, int], mask: torch.Tensor | None) -> torch.Tensor:
        """x (B, H, W, C), shift (rows, cols) from `window_shift`, mask (nW, 1, N, N) or None -> (B, H, W, C)."""
        x = self.drop_path.residual(x, lambda x, rows: self._attention(x, shift, mask))
        return self.drop_path.residual(x, lambda x, rows: self.mlp(self.norm2(x)))

    def _attention(self, x: torch.Tensor, shift: tuple[int, int], mask: torch.Tensor | None) -> torch.Tensor:
        """unshift(attn(windows(shift(pad(norm1(x)))))), cropped: x (B, H, W, C) -> (B, H, W, C)."""
        _, H, W, _ = x.shape
        ws = self.window_size
        y = pad_to_window_multiple(self.norm1(x), ws)  # (B, Hp, Wp, C)
        Hp, Wp = y.shape[1:3]
        if shift != (0, 0):
            y = torch.roll(y, shifts=(-shift[0], -shift[1]), dims=(1, 2))  # cyclic shift up and left
        y = self.attn(window_partition(y, ws), None, mask)  # (B, nW, N, C)
        y = window_reverse(y, ws, Hp, Wp)  # (B, Hp, Wp, C)
        if shift != (0, 0):
            y = torch.roll(y, shifts=shift, dims=(1, 2))  # back down and right
        return y[:, :H, :W]  # (B, H, W, C)


class SwinStage(nn.Module):
    """Patch merging (stages 1-3), then blocks alternating regular and shifted windows. NHWC in and out."""

    def __init__(self, i: int, cfg: SwinConfig, drop_path: list[float]) -> None:
        super().__init__()
        dim, heads, ws = cfg.embed_dim * 2**i, cfg.num_heads[i], cfg.window_size[i]
        self.window_size = ws
        self.downsample = PatchMerging(dim // 2, cfg.norm_eps) if i > 0 else None
        self.blocks = nn.ModuleList(
            [SwinBlock(dim, heads, ws, j % 2 == 1, cfg, drop_path[j]) for j in range(cfg.depths[i])]
        )
        self.grad_checkpointing = False

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.downsample is not None:
            x = self.downsample(x)  # (B, H/2, W/2, C)
        _, H, W, _ = x.shape
        masks: dict[tuple[int, int], torch.Tensor | None] = {}  # one per shift, shared by the stage's blocks
        for blk in self.blocks:
            shift = window_shift(H, W, self.window_size, blk.shifted)
            if shift not in masks:
                masks[shift] = shifted_window_mask(H, W, self.window_size, shift, x.device, x.dtype)
            if self.grad_checkpointing and torch.is_grad_enabled():
                x = checkpoint(blk, x, shift, masks[shift], use_reentrant=False)
            else:
                x = blk(x, shift, masks[shift])
        return x


# --- model -----------------------------------------------------------------------------------------------------


class SwinTransformer(PyramidClassifier):
    """Swin Transformer classifier and backbone, with the model interface of `GCViT`. Input NCHW float images."""

    def __init__(self, cfg: SwinConfig) -> None:
        super().__init__()
        self.cfg = cfg
        self.num_classes = cfg.num_classes
        self.num_features = cfg.embed_dim * 2 ** (len(cfg.depths) - 1)
        self.patch_embed = PatchEmbed(cfg.in_chans, cfg.embed_dim, cfg.patch_size, cfg.norm_eps)
        self.pos_drop = nn.Dropout(cfg.drop_rate)
        dpr = torch.linspace(0, cfg.drop_path_rate, sum(cfg.depths), device="cpu").tolist()
        starts = [sum(cfg.depths[:i]) for i in range(len(cfg.depths))]
        self.layers = nn.ModuleList(
            [SwinStage(i, cfg, dpr[s : s + d]) for i, (s, d) in enumerate(zip(starts, cfg.depths))]
        )
        self.norm = nn.LayerNorm(self.num_features, eps=cfg.norm_eps)
        self.head: nn.Module = nn.Linear(self.num_features, cfg.num_classes) if cfg.num_classes else nn.Identity()
        last = len(cfg.depths) - 1
        self.feature_info = [  # "module": the module whose output (NHWC) is the map, as hook-based extractors need
            {
                "num_chs": cfg.embed_dim * 2**i,
                "reduction": cfg.patch_size * 2**i,
                "module": "norm" if i == last else f"layers.{i}",
            }
            for i in range(len(cfg.depths))
        ]
        self.apply(init_weights)

    @staticmethod
    def convert_checkpoint(state_dict: dict[str, torch.Tensor]) -> tuple[dict[str, torch.Tensor], str]:
        """Foreign state dict -> (this model's keys, format name); `load_checkpoint` calls it."""
        return convert_checkpoint(state_dict)

    @property
    def stages(self) -> nn.ModuleList:
        return self.layers

    def _check_input(self, x: torch.Tensor) -> None:
        p = self.cfg.patch_size
        check_images(x, self.cfg.in_chans)
        H, W = x.shape[2:]
        if min(H, W) < MIN_INPUT_SIZE or H % p or W % p:
            raise ValueError(
                f"expected H and W of at least {MIN_INPUT_SIZE} px and multiples of the patch size {p} "
                f"(any multiple of 32 works); got {(H, W)}"
            )

    def forward_intermediates(self, x: torch.Tensor) -> list[torch.Tensor]:
        """Feature pyramid for detection and segmentation.

        Args:
            x: images (B, 3, H, W).
        Returns:
            Four NCHW maps, each stage's output, with C, 2C, 4C, 8C channels at strides 4, 8, 16, 32 (sizes rounded
            up); the last one passes through the final `norm`, as in timm.
        """
        self._check_input(x)
        x = self.pos_drop(self.patch_embed(x))  # NHWC (B, H/4, W/4, C)
        feats = []
        for i, stage in enumerate(self.layers):
            x = stage(x)
            out = self.norm(x) if i == len(self.layers) - 1 else x
            feats.append(out.permute(0, 3, 1, 2))  # NHWC -> NCHW (a channels-last view)
        return feats


# --- checkpoint conversion -------------------------------------------------------------------------------------


def convert_timm(state_dict: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """timm (1.0.x) or Microsoft Swin state dict -> this model's keys.

    timm: `head.fc.*` -> `head.*`. Microsoft's release merges patches at the end of a stage (`layers.{i}.downsample`,
    i = 0..2) where timm does at the start of the next (i + 1), and calls the head `head`. Mask and index buffers
    (`attn_mask`, `relative_position_index`) are dropped: the model computes them from its geometry.
    """
    microsoft = "layers.0.downsample.reduction.weight" in state_dict
    out = {}
    for key, value in state_dict.items():
        if key.endswith(("attn_mask", "relative_position_index")):
            continue
        if microsoft:
            key = re.sub(r"^layers\.(\d+)\.downsample\.", lambda m: f"layers.{int(m[1]) + 1}.downsample.", key)
        out[re.sub(r"^head\.fc\.", "head.", key)] = value
    return out


def convert_checkpoint(state_dict: dict[str, torch.Tensor]) -> tuple[dict[str, torch.Tensor], str]:
    """Any recognised Swin state dict -> (this model's keys, format name: 'timm', 'microsoft' or 'own')."""
    if "layers.0.downsample.reduction.weight" in state_dict:
        fmt = "microsoft"
    elif any(k.startswith("head.fc.") for k in state_dict) or any(k.endswith("attn_mask") for k in state_dict):
        fmt = "timm"
    else:
        fmt = "own"
    return convert_timm(dict(state_dict)), fmt


# --- variants --------------------------------------------------------------------------------------------------

VARIANTS: dict[str, SwinConfig] = {
    "swin_tiny": SwinConfig(drop_path_rate=0.2),
    "swin_small": SwinConfig(depths=(2, 2, 18, 2), drop_path_rate=0.3),
    "swin_base": SwinConfig(embed_dim=128, depths=(2, 2, 18, 2), num_heads=(4, 8, 16, 32), drop_path_rate=0.5),
}

# A Swin sized for 32 px inputs (the bundled digits): stage maps 8, 4, 2, 1 tokens per side, stage 0 with shifted
# 4x4 windows; about as many parameters as the digits GC ViT.
DIGITS: dict[str, object] = {
    "embed_dim": 32,
    "depths": (2, 2, 2, 2),
    "num_heads": (1, 2, 4, 8),
    "window_size": (4, 4, 2, 1),
    "mlp_ratio": 2.0,
}
