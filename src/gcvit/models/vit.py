"""Vision Transformer (Dosovitskiy et al., ICLR 2021, arXiv 2010.11929), built from the layers GC ViT uses.

Images are cut into p x p patches (a strided conv), a class token is prepended, a learned position embedding is
added, and pre-norm blocks of global self-attention (`gcvit.layers.GlobalAttention`) and MLP (`gcvit.layers.Mlp`)
follow; a final norm, then the head reads the class token. One scale (stride p), and every token attends to every
token: cost quadratic in (H/p)(W/p).

Two options from insightface's face-recognition ViT:
- `norm_layer="bn"`: BatchNorm1d over the channels (statistics over batch and tokens) instead of LayerNorm, for
  every norm of the model (`TokenBatchNorm`, keys `norm*.weight/bias/running_mean/running_var`).
- `mask_ratio`: during training only, a random subset of that fraction of the patch tokens is dropped (per image)
  before the blocks; the class token always stays. In eval mode nothing is dropped, so outputs are deterministic.

State-dict keys are timm 1.0.31's (`cls_token`, `pos_embed`, `patch_embed.proj`, `blocks.{i}.attn.qkv`, `norm`,
`head`), so `convert_timm` is the identity apart from checks. Other input sizes: the position embedding's grid is
resized bicubically to the patch grid (sides must be multiples of the patch size).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from gcvit.layers import DropPath, GlobalAttention, Mlp
from gcvit.models.base import check_config, check_images, init_weights, replace_head
from gcvit.models.folder import HubMixin

NORM_LAYERS = ("ln", "bn")


@dataclass(frozen=True)
class ViTConfig:
    embed_dim: int = 768  # token width C
    depth: int = 12  # blocks
    num_heads: int = 12  # attention heads
    patch_size: int = 16  # side of a patch (the model's only stride)
    mlp_ratio: float = 4.0  # MLP hidden width / channels
    qkv_bias: bool = True
    norm_layer: str = "ln"  # 'ln' LayerNorm, or 'bn' BatchNorm1d over channels (insightface style)
    mask_ratio: float = 0.0  # fraction of patch tokens dropped at random in training; 0: off
    drop_rate: float = 0.0  # dropout after the position embedding, the attention projection and in the MLP
    attn_drop_rate: float = 0.0  # dropout on attention weights
    drop_path_rate: float = 0.0  # stochastic depth, rising linearly from 0 over the blocks
    img_size: tuple[int, int] = (224, 224)  # native input size (H, W): the position embedding's grid
    in_chans: int = 3
    num_classes: int = 1000  # 0: no head, the model returns the class token's features
    norm_eps: float = 1e-6

    def __post_init__(self) -> None:
        check_config(self, counts=("depth", "num_heads", "patch_size"))
        if self.norm_layer not in NORM_LAYERS:
            raise ValueError(f"norm_layer must be one of {NORM_LAYERS}; got {self.norm_layer!r}")
        if not 0 <= self.mask_ratio < 1:
            raise ValueError(f"mask_ratio must be in [0, 1); got {self.mask_ratio}")

    @property
    def grid_size(self) -> tuple[int, int]:
        """Patch grid (rows, cols) at the native size."""
        return (self.img_size[0] // self.patch_size, self.img_size[1] // self.patch_size)


# --- helpers ---------------------------------------------------------------------------------------------------


def random_token_subset(x: torch.Tensor, keep: int) -> torch.Tensor:
    """Keep `keep` tokens of each sequence, chosen uniformly at random per image, in their original order.

    x (B, L, C) -> (B, keep, C).
    """
    B, L, C = x.shape
    ids = torch.rand(B, L, device=x.device).argsort(dim=1)[:, :keep].sort(dim=1).values  # (B, keep)
    return x.gather(1, ids[:, :, None].expand(B, keep, C))  # (B, keep, C)


def resize_pos_embed(pos_embed: torch.Tensor, old_grid: tuple[int, int], new_grid: tuple[int, int]) -> torch.Tensor:
    """Bicubically resize the patch part of a (1, 1 + h*w, C) position embedding to another grid; the class
    token's entry is kept. Antialiased, as timm does (on load and for dynamic sizes): PyTorch's antialiased bicubic
    also uses another cubic (a = -0.5), so it differs from the plain one when enlarging too."""
    if old_grid == new_grid:
        return pos_embed
    cls_pos, grid = pos_embed[:, :1], pos_embed[:, 1:]
    C = grid.shape[-1]
    grid = grid.reshape(1, *old_grid, C).permute(0, 3, 1, 2)  # (1, h*w, C) -> NCHW (1, C, h, w)
    grid = F.interpolate(grid.float(), size=new_grid, mode="bicubic", align_corners=False, antialias=True)
    grid = grid.to(pos_embed.dtype)
    grid = grid.permute(0, 2, 3, 1).reshape(1, new_grid[0] * new_grid[1], C)  # NCHW -> (1, h'*w', C)
    return torch.cat([cls_pos, grid], dim=1)


# --- leaf modules ----------------------------------------------------------------------------------------------


class TokenBatchNorm(nn.BatchNorm1d):
    """BatchNorm1d over the channels of a token sequence: (B, L, C) in and out, statistics over B and L."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return super().forward(x.transpose(1, 2)).transpose(1, 2)  # (B, L, C) -> (B, C, L) -> (B, L, C)


def make_norm(kind: str, dim: int, eps: float) -> nn.Module:
    """LayerNorm ('ln') or `TokenBatchNorm` ('bn') over channels."""
    return nn.LayerNorm(dim, eps=eps) if kind == "ln" else TokenBatchNorm(dim, eps=eps)


class PatchEmbed(nn.Module):
    """Conv p x p stride p: NCHW (B, 3, H, W) -> tokens (B, H/p * W/p, C), row-major, and the grid (H/p, W/p)."""

    def __init__(self, in_chans: int, dim: int, patch_size: int) -> None:
        super().__init__()
        self.proj = nn.Conv2d(in_chans, dim, patch_size, patch_size)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, tuple[int, int]]:
        x = self.proj(x)  # NCHW (B, C, h, w)
        grid = (x.shape[2], x.shape[3])
        return x.flatten(2).transpose(1, 2), grid  # (B, h*w, C)


# --- block -----------------------------------------------------------------------------------------------------


class ViTBlock(nn.Module):
    """Pre-norm block: x + drop_path(attn(norm1(x))), then x + drop_path(mlp(norm2(x))). Tokens (B, L, C)."""

    def __init__(self, cfg: ViTConfig, drop_path: float) -> None:
        super().__init__()
        dim = cfg.embed_dim
        self.norm1 = make_norm(cfg.norm_layer, dim, cfg.norm_eps)
        self.attn = GlobalAttention(dim, cfg.num_heads, cfg.qkv_bias, cfg.attn_drop_rate, cfg.drop_rate)
        self.drop_path = DropPath(drop_path, skip_dropped=cfg.norm_layer != "bn")  # batch norm mixes images
        self.norm2 = make_norm(cfg.norm_layer, dim, cfg.norm_eps)
        self.mlp = Mlp(dim, int(dim * cfg.mlp_ratio), cfg.drop_rate)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.drop_path.residual(x, lambda x, rows: self.attn(self.norm1(x)))
        return self.drop_path.residual(x, lambda x, rows: self.mlp(self.norm2(x)))


# --- model -----------------------------------------------------------------------------------------------------


class VisionTransformer(HubMixin, nn.Module):
    """ViT classifier with the model interface of `GCViT`; input NCHW float images.

    `forward_features` returns the normalised token sequence (B, 1 + L, C), class token first (L: the patch tokens
    kept, all of them in eval mode); `forward_head` reads the class token. `forward_intermediates` returns the last
    block's normalised patch tokens as one NCHW map at stride p (no tokens dropped).
    """

    def __init__(self, cfg: ViTConfig) -> None:
        super().__init__()
        self.cfg = cfg
        self.num_classes = cfg.num_classes
        self.num_features = cfg.embed_dim
        self.patch_embed = PatchEmbed(cfg.in_chans, cfg.embed_dim, cfg.patch_size)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, cfg.embed_dim))
        self.pos_embed = nn.Parameter(torch.zeros(1, 1 + cfg.grid_size[0] * cfg.grid_size[1], cfg.embed_dim))
        self.pos_drop = nn.Dropout(cfg.drop_rate)
        dpr = torch.linspace(0, cfg.drop_path_rate, cfg.depth, device="cpu").tolist()
        self.blocks = nn.ModuleList([ViTBlock(cfg, dpr[i]) for i in range(cfg.depth)])
        self.norm = make_norm(cfg.norm_layer, cfg.embed_dim, cfg.norm_eps)
        self.head: nn.Module = nn.Linear(cfg.embed_dim, cfg.num_classes) if cfg.num_classes else nn.Identity()
        self.feature_info = [
            {"num_chs": cfg.embed_dim, "reduction": cfg.patch_size, "module": "norm"}  # forward_intermediates map
        ]
        self.grad_checkpointing = False
        nn.init.trunc_normal_(self.pos_embed, std=0.02)
        nn.init.normal_(self.cls_token, std=1e-6)
        self.apply(init_weights)

    @staticmethod
    def convert_checkpoint(state_dict: dict[str, torch.Tensor]) -> tuple[dict[str, torch.Tensor], str]:
        """Foreign state dict -> (this model's keys, format name); `load_checkpoint` calls it."""
        return convert_timm(dict(state_dict)), "timm"

    def _check_input(self, x: torch.Tensor) -> None:
        p = self.cfg.patch_size
        check_images(x, self.cfg.in_chans)
        if x.shape[2] % p or x.shape[3] % p or min(x.shape[2:]) < p:
            raise ValueError(
                f"expected H and W to be positive multiples of the patch size {p}; got {tuple(x.shape[2:])}"
            )

    def _embed(self, x: torch.Tensor, mask: bool) -> tuple[torch.Tensor, tuple[int, int]]:
        """Images -> (B, 1 + L, C) tokens with positions added (patch tokens subsampled when `mask`), and the grid."""
        self._check_input(x)
        x, grid = self.patch_embed(x)  # (B, h*w, C)
        pos = resize_pos_embed(self.pos_embed, self.cfg.grid_size, grid)  # (1, 1 + h*w, C)
        x = x + pos[:, 1:]
        if mask:
            x = random_token_subset(x, max(1, int(x.shape[1] * (1 - self.cfg.mask_ratio))))  # (B, L', C)
        cls = (self.cls_token + pos[:, :1]).expand(x.shape[0], -1, -1)  # (B, 1, C)
        return self.pos_drop(torch.cat([cls, x], dim=1)), grid  # (B, 1 + L', C)

    def _blocks(self, x: torch.Tensor) -> torch.Tensor:
        for blk in self.blocks:
            if self.grad_checkpointing and torch.is_grad_enabled():
                x = checkpoint(blk, x, use_reentrant=False)
            else:
                x = blk(x)
        return self.norm(x)

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        """Images (B, 3, H, W) -> normalised tokens (B, 1 + L, C), class token first; in training with mask_ratio > 0
        only a random subset of the patch tokens is kept."""
        x, _ = self._embed(x, mask=self.training and self.cfg.mask_ratio > 0)
        return self._blocks(x)

    def forward_intermediates(self, x: torch.Tensor) -> list[torch.Tensor]:
        """The last block's normalised patch tokens as a map: [NCHW (B, C, H/p, W/p)], all tokens (no masking)."""
        x, (h, w) = self._embed(x, mask=False)
        x = self._blocks(x)[:, 1:]  # (B, h*w, C)
        return [x.transpose(1, 2).reshape(x.shape[0], x.shape[2], h, w)]  # (B, C, h*w) -> NCHW (B, C, h, w)

    def forward_head(self, x: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
        """Tokens (B, 1 + L, C) -> logits (B, num_classes), or the class token's features (B, C) if pre_logits."""
        x = x[:, 0]  # (B, C)
        return x if pre_logits else self.head(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Images (B, 3, H, W), sides multiples of the patch size -> logits (B, num_classes)."""
        return self.forward_head(self.forward_features(x))

    def reset_classifier(self, num_classes: int) -> None:
        """Replace the head with a fresh Linear(C, num_classes); 0 removes it."""
        replace_head(self, num_classes, like=self.cls_token)

    def set_grad_checkpointing(self, enable: bool = True) -> None:
        """Recompute each block's activations in the backward pass, trading compute for memory."""
        self.grad_checkpointing = enable

    def no_weight_decay(self) -> set[str]:
        """Parameters that get no weight decay beyond norms and biases: the position embedding and class token."""
        return {"pos_embed", "cls_token"}

    def adapt_checkpoint(self, state_dict: dict[str, torch.Tensor]) -> list[str]:
        """Resize a checkpoint's position embedding, trained on a square grid, to this model's grid (bicubic, as at
        run time); `load_checkpoint` calls it. Returns what was resized."""
        pos = state_dict.get("pos_embed")
        if pos is None or pos.shape == self.pos_embed.shape or pos.ndim != 3 or pos.shape[2] != self.cfg.embed_dim:
            return []
        side = round((pos.shape[1] - 1) ** 0.5)
        if side * side != pos.shape[1] - 1:
            return []  # not a square grid: left for the shape check to name
        state_dict["pos_embed"] = resize_pos_embed(pos, (side, side), self.cfg.grid_size)
        return [f"pos_embed: {tuple(pos.shape)} -> {tuple(self.pos_embed.shape)}"]


# --- checkpoint conversion -------------------------------------------------------------------------------------


def convert_timm(state_dict: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """timm VisionTransformer state dict (class token, no pre-norm, token pooling) -> this model's keys.

    The names are the same; a timm model with parts this one lacks is refused with their names.
    """
    extra = sorted(k for k in state_dict if k.startswith(("norm_pre.", "fc_norm.", "reg_token", "attn_pool.")))
    if extra or any(".ls1." in k or ".q_norm." in k for k in state_dict):
        extra += sorted(k for k in state_dict if ".ls1." in k or ".q_norm." in k)[:4]
        raise ValueError(
            "expected a plain timm ViT (class token, no pre-norm, no layer scale, token pooling); "
            f"the checkpoint has {extra[:8]}"
        )
    return dict(state_dict)


# --- variants --------------------------------------------------------------------------------------------------

VARIANTS: dict[str, ViTConfig] = {
    "vit_tiny": ViTConfig(embed_dim=192, num_heads=3),
    "vit_small": ViTConfig(embed_dim=384, num_heads=6),
    "vit_base": ViTConfig(),
}

# A ViT sized for 32 px inputs (the bundled digits): 4x4 patches, an 8x8 grid (64 tokens + the class token).
DIGITS: dict[str, object] = {
    "embed_dim": 96,
    "depth": 6,
    "num_heads": 3,
    "patch_size": 4,
    "mlp_ratio": 2.0,
}
