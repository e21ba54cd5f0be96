"""What the package's models share: the input check, the initialisation, and the classifier end of a four-stage
pyramid (GC ViT, Swin)."""

from __future__ import annotations

import dataclasses

import torch
from torch import nn

from gcvit.models.folder import HubMixin


def check_images(x: torch.Tensor, in_chans: int) -> None:
    """Raise a ValueError naming what was expected unless x is a 4-D float tensor with `in_chans` channels (NCHW)."""
    if not isinstance(x, torch.Tensor) or x.ndim != 4 or not x.is_floating_point():
        got = f"{tuple(x.shape)} {x.dtype}" if isinstance(x, torch.Tensor) else type(x).__name__
        raise ValueError(f"expected a 4-D float tensor (B, {in_chans}, H, W); got {got}")
    if x.shape[1] != in_chans:
        raise ValueError(f"expected {in_chans} channels in dim 1 (NCHW); got shape {tuple(x.shape)}")


def stem_conv(x: torch.Tensor, conv: nn.Conv2d) -> torch.Tensor:
    """`conv(x)` on the images, channels-last: the convolution runs 1.7-2.6x faster on the CPU and the NHWC view of
    its output is contiguous (LayerNorm reads it without a copy). A training step would keep a channels-last copy of
    the images alive for the weight gradient, next to the caller's, so there NCHW images stay as they are (the
    training loop hands over channels-last batches). Under torch.func transforms (vmap) the images stay as they are:
    vmap cannot query a channels-last layout. torch.jit.trace keeps them too: it traces again under no_grad to
    check its graph, which must not change with the grad mode."""
    keep = torch._C._are_functorch_transforms_active() or torch.jit.is_tracing()
    if not (torch.is_grad_enabled() and conv.weight.requires_grad) and not keep:
        x = x.contiguous(memory_format=torch.channels_last)
    return conv(x)  # (B, C, H', W')


def check_config(
    cfg: object, counts: tuple[str, ...] = (), per_stage: tuple[str, ...] = (), optional_per_stage: tuple[str, ...] = ()
) -> None:
    """Raise a ValueError naming the first field of a model config outside its range: `counts` and embed_dim,
    in_chans must be positive integers; `per_stage` fields tuples of them, one value per stage (the first of them,
    depths, sets the stage count); `optional_per_stage` fields None or one integer >= 0 per stage; num_classes >= 0,
    img_size (H, W), a multiple of patch_size where there is one; dropout and drop path rates in [0, 1); mlp_ratio
    giving at least one hidden unit."""

    def is_count(v: object, least: int = 1) -> bool:
        return isinstance(v, int) and not isinstance(v, bool) and v >= least

    def check(field: str, ok: bool, expected: str) -> None:
        if not ok:
            raise ValueError(f"{type(cfg).__name__}.{field} must be {expected}; got {getattr(cfg, field)!r}")

    for field in ("embed_dim", "in_chans", *counts):
        check(field, is_count(getattr(cfg, field)), "a positive integer")
    for field in per_stage + tuple(f for f in optional_per_stage if getattr(cfg, f) is not None):
        v = getattr(cfg, field)
        if field in per_stage:
            check(field, isinstance(v, tuple) and len(v) > 0 and all(map(is_count, v)), "a tuple of positive integers")
        else:
            check(field, isinstance(v, tuple) and all(is_count(i, 0) for i in v), "None or a tuple of integers >= 0")
        stages = getattr(cfg, per_stage[0])
        if len(v) != len(stages):
            raise ValueError(
                f"{type(cfg).__name__}.{field} needs one value per stage: {per_stage[0]}={stages} makes {len(stages)} "
                f"stages; got {v!r}"
            )
    n = cfg.num_classes
    check("num_classes", isinstance(n, int) and not isinstance(n, bool) and n >= 0, "an integer >= 0")
    size = cfg.img_size
    check("img_size", isinstance(size, tuple) and len(size) == 2 and all(map(is_count, size)), "(H, W) in pixels")
    patch = getattr(cfg, "patch_size", None)  # Swin, ViT: the native size must cut into whole patches
    check("img_size", patch is None or not any(s % patch for s in size), f"a multiple of patch_size {patch}")
    for field in ("drop_rate", "attn_drop_rate", "drop_path_rate"):
        v = getattr(cfg, field)
        check(field, isinstance(v, (int, float)) and 0 <= v < 1, "in [0, 1)")
    check("mlp_ratio", cfg.mlp_ratio > 0, "positive")
    check("mlp_ratio", int(cfg.embed_dim * cfg.mlp_ratio) >= 1, f"at least 1 / embed_dim ({cfg.embed_dim})")


def replace_head(model: nn.Module, num_classes: int, like: torch.Tensor) -> None:
    """A fresh Linear(model.num_features, num_classes) head on `like`'s device and dtype (nn.Identity for 0), with the
    class count recorded where save_pretrained (`cfg`) and visualize (`pretrained_cfg`, set by create_model) read it.
    The old head's class names (`classes`, set by gcvit.load, and an ImageNet `label_set`) go with it."""
    model.num_classes = num_classes
    model.cfg = dataclasses.replace(model.cfg, num_classes=num_classes)
    if getattr(model, "pretrained_cfg", None) is not None:
        model.pretrained_cfg = dataclasses.replace(model.pretrained_cfg, num_classes=num_classes, label_set="")
    if "classes" in vars(model):
        del model.classes
    n = model.num_features
    model.head = nn.Linear(n, num_classes, device=like.device, dtype=like.dtype) if num_classes else nn.Identity()
    model.head.apply(init_weights)


def init_weights(module: nn.Module) -> None:
    """Linear weights truncated normal (std 0.02) with zero bias; LayerNorm and BatchNorm 1 and 0 (official GC ViT,
    Swin and timm ViT initialisation)."""
    if isinstance(module, nn.Linear):
        nn.init.trunc_normal_(module.weight, std=0.02)
        if module.bias is not None:
            nn.init.zeros_(module.bias)
    elif isinstance(module, (nn.LayerNorm, nn.BatchNorm1d)):
        nn.init.ones_(module.weight)
        nn.init.zeros_(module.bias)


class PyramidClassifier(HubMixin, nn.Module):
    """Features and average-pool head of a four-stage hierarchical model. Subclasses set `patch_embed` (NCHW images
    -> NHWC stride-4 map), `pos_drop`, `norm` (the final norm), `head`, `num_features` (8C), `num_classes`, and define
    `stages` and `_check_input`."""

    patch_embed: nn.Module
    pos_drop: nn.Module
    norm: nn.Module
    head: nn.Module
    num_features: int
    num_classes: int

    @property
    def stages(self) -> nn.ModuleList:
        """The four stages, each NHWC (B, H, W, C) -> NHWC, downsampling included."""
        raise NotImplementedError

    def _check_input(self, x: torch.Tensor) -> None:
        raise NotImplementedError

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        """Images (B, 3, H, W) -> normalised last-stage map NCHW (B, 8C, H/32, W/32)."""
        self._check_input(x)
        x = self.pos_drop(self.patch_embed(x))  # NHWC (B, H/4, W/4, C)
        for stage in self.stages:
            x = stage(x)
        return self.norm(x).permute(0, 3, 1, 2)  # NHWC -> NCHW

    def set_grad_checkpointing(self, enable: bool = True) -> None:
        """Recompute each block's activations in the backward pass, trading compute for memory."""
        for stage in self.stages:
            stage.grad_checkpointing = enable

    def forward_head(self, x: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
        """Last-stage map NCHW (B, 8C, h, w) -> logits (B, num_classes), or pooled features (B, 8C) if pre_logits."""
        x = x.mean((2, 3))  # (B, 8C)
        return x if pre_logits else self.head(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Images (B, 3, H, W) -> logits (B, num_classes)."""
        return self.forward_head(self.forward_features(x))

    def reset_classifier(self, num_classes: int) -> None:
        """Replace the head with a fresh Linear(8C, num_classes); 0 removes it."""
        replace_head(self, num_classes, like=self.norm.weight)

    def no_weight_decay(self) -> set[str]:
        """Names of parameters that should get no weight decay beyond norms and biases: the bias tables."""
        return {n for n, _ in self.named_parameters() if n.endswith("relative_position_bias_table")}
