"""GC ViT as the backbone of detectors and segmenters: NVIDIA's detection backbone, for every GC ViT variant.

The module structure and state-dict keys are those of the official detection code (`../shared/GCVIT_SPEC.md`,
"Dense prediction"): the classifier's stem and stages, no final `norm` and no `head`, and one LayerNorm per output
stage, `norm0`..`norm3`, applied to each stage's map before its downsampling. Windows are 24 in every stage by
default. The global query generator keeps the 224 px geometry: max-pools 3, 2, 1, 0, so that every stage's query map
is as large as the last stage's map, and it is resized bicubically to the window. Unlike the official code, the map
padded to window multiples has its padded keys masked out of attention, as in the classifier, so the maps at any size
do not depend on the padding; at sizes that need no padding (768 x 768, 768 x 1536 with windows 24) the two agree.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path

import torch
from torch import nn

from gcvit.models.base import check_images, init_weights
from gcvit.models.folder import checkpoint_folder, chosen_weights, read_config
from gcvit.models.gcvit import MIN_INPUT_SIZE, GCViT, GCViTConfig, PatchEmbed, build_levels
from gcvit.models.registry import model_settings, pretrained_source, resolve_name
from gcvit.models.weights import CheckpointError, load_state_dict_into, read_state_dict, resolve

DETECTION_WINDOW = 24  # the official detection backbone's window in every stage


class GCViTBackbone(nn.Module):
    """Images (B, 3, H, W) -> a list of NCHW maps, one per `out_indices` stage: C, 2C, 4C, 8C channels at strides 4,
    8, 16, 32 (sizes rounded up), each normalised by its own `norm{i}`."""

    def __init__(self, cfg: GCViTConfig, out_indices: Sequence[int] = (0, 1, 2, 3), frozen_stages: int = -1) -> None:
        super().__init__()
        stages = len(cfg.depths)
        out_indices = tuple(out_indices)
        if (
            not out_indices
            or any(not 0 <= i < stages for i in out_indices)
            or len(set(out_indices)) != len(out_indices)
        ):
            raise ValueError(f"expected out_indices among 0..{stages - 1}, each once; got {out_indices}")
        if not -1 <= frozen_stages <= stages:
            raise ValueError(f"expected frozen_stages from -1 (none) to {stages}; got {frozen_stages}")
        self.cfg = cfg
        self.out_indices = tuple(sorted(out_indices))
        self.frozen_stages = frozen_stages
        self.patch_embed = PatchEmbed(cfg.in_chans, cfg.embed_dim, cfg.norm_eps)
        self.pos_drop = nn.Dropout(cfg.drop_rate)
        self.levels = build_levels(cfg)
        self.out_channels = [cfg.embed_dim * 2**i for i in self.out_indices]  # of each returned map
        for i, channels in zip(self.out_indices, self.out_channels):
            self.add_module(f"norm{i}", nn.LayerNorm(channels, eps=cfg.norm_eps))
        self.apply(init_weights)
        self._freeze()

    @staticmethod
    def convert_checkpoint(state_dict: dict[str, torch.Tensor]) -> tuple[dict[str, torch.Tensor], str]:
        """Official or timm keys -> (official keys, format name), as the classifier's."""
        return GCViT.convert_checkpoint(state_dict)

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        """Images (B, 3, H, W), any H, W >= 32 -> the maps of the `out_indices` stages, NCHW."""
        check_images(x, self.cfg.in_chans)
        if min(x.shape[2:]) < MIN_INPUT_SIZE:
            raise ValueError(f"expected H and W of at least {MIN_INPUT_SIZE} px; got {tuple(x.shape[2:])}")
        x = self.pos_drop(self.patch_embed(x))  # NHWC (B, H/4, W/4, C)
        maps = []
        for i, level in enumerate(self.levels):
            x = level.forward_blocks(x)  # NHWC, before downsampling
            if i in self.out_indices:
                maps.append(getattr(self, f"norm{i}")(x).permute(0, 3, 1, 2))  # NHWC -> NCHW (a channels-last view)
            if i == self.out_indices[-1]:
                break  # later stages make no output
            if level.downsample is not None:
                x = level.downsample(x)
        return maps

    def _frozen_modules(self) -> list[nn.Module]:
        """mmdet's count: 0 the stem, k >= 1 the stem and the first k stages (downsampling included)."""
        if self.frozen_stages < 0:
            return []
        return [self.patch_embed, *self.levels[: self.frozen_stages]]

    def _freeze(self) -> None:
        for module in self._frozen_modules():
            module.eval()
            for p in module.parameters():
                p.requires_grad_(False)

    def train(self, mode: bool = True) -> GCViTBackbone:
        """As nn.Module.train, the frozen stages staying in eval mode (their dropout and drop path off)."""
        super().train(mode)
        for module in self._frozen_modules():
            module.eval()
        return self

    def set_grad_checkpointing(self, enable: bool = True) -> None:
        """Recompute each block's activations in the backward pass, trading compute for memory."""
        for level in self.levels:
            level.grad_checkpointing = enable

    def no_weight_decay(self) -> set[str]:
        """The relative-position bias tables, as the classifier's (`PyramidClassifier.no_weight_decay`)."""
        return {n for n, _ in self.named_parameters() if n.endswith("relative_position_bias_table")}


def create_backbone(
    name: str,
    *,
    pretrained: bool | str | os.PathLike[str] = False,
    window_size: int | Sequence[int] = DETECTION_WINDOW,
    out_indices: Sequence[int] = (0, 1, 2, 3),
    frozen_stages: int = -1,
    **overrides: object,
) -> GCViTBackbone:
    """NVIDIA's detection backbone for a GC ViT variant (see the module docstring), in train mode.

    Args:
        name: a GC ViT `arch` or `arch.tag` (`gcvit.list_models("gcvit*")`).
        pretrained: False; True for the tag's official ImageNet weights; or a checkpoint path or URL: a
            classification checkpoint (official, timm or this package's: bias tables resized bicubically to the
            windows, `norm` and `head` dropped, `norm0..3` freshly initialised), an official detection-backbone state
            dict (loaded strictly), or a detector's checkpoint holding the backbone under `backbone.` (mmdet) or
            `backbone.body.` (torchvision, `gcvit.create_detector`); or a folder of this package (a run of `gcvit
            train` or `gcvit detect train`, a checkpoint or `save_pretrained` folder), whose global-query pools the
            backbone keeps (the query map is resized to the window whatever the pools).
        window_size: one window side for every stage, or one per stage.
        out_indices: the stages whose maps are returned.
        frozen_stages: -1 trains everything; 0 freezes the stem; k >= 1 the stem and the first k stages (frozen parts
            stay in eval mode), as mmdet's ResNet counts.
        overrides: other GCViTConfig fields (drop_path_rate, global_query_pools, ...).
    """
    spec = resolve_name(name)
    if spec.family != "gcvit":
        raise ValueError(f"create_backbone builds GC ViT; got {name!r} (create_detector takes Swin and ResNet-50)")
    stages = len(overrides.get("depths", spec.config.depths))  # type: ignore[arg-type]
    windows = (window_size,) * stages if isinstance(window_size, int) else tuple(window_size)
    weights = None
    if isinstance(pretrained, (str, os.PathLike)) and Path(pretrained).is_dir():  # a folder of this package's
        folder = checkpoint_folder(Path(pretrained))
        saved = read_config(folder)
        weights = chosen_weights(folder, saved, None)
        pools = saved.get("config", {}).get("global_query_pools")
        if pools is not None:  # its query generator's modules: the digits models pool once, in stage 0 only
            overrides.setdefault("global_query_pools", tuple(pools))
    overrides.setdefault("global_query_pools", tuple(range(stages - 1, -1, -1)))  # 3, 2, 1, 0: the 224 px geometry
    config, _ = model_settings(name, num_classes=0, window_size=windows, **overrides)
    backbone = GCViTBackbone(config, out_indices, frozen_stages)
    if weights is not None:
        load_backbone_weights(backbone, read_state_dict(weights), str(weights))
    elif pretrained is not False and pretrained is not None:
        source, sha = pretrained_source(name, pretrained)
        load_backbone_weights(backbone, read_state_dict(resolve(source, sha)), source)
    return backbone


def load_backbone_weights(backbone: GCViTBackbone, state_dict: dict[str, torch.Tensor], source: str) -> None:
    """Load a classification, detection-backbone or detector state dict (see `create_backbone`) into `backbone`."""
    for prefix in ("backbone.body.", "backbone."):  # a detector's: its backbone alone
        if any(k.startswith(prefix) for k in state_dict):
            state_dict = {k.removeprefix(prefix): v for k, v in state_dict.items() if k.startswith(prefix)}
            break
    state_dict, fmt = backbone.convert_checkpoint(state_dict)
    norms = tuple(f"norm{i}." for i in range(len(backbone.cfg.depths)))
    classifier = not any(k.startswith(norms) for k in state_dict)
    if classifier:  # its final norm and head have no place here; norm0..3 stay fresh
        state_dict = {k: v for k, v in state_dict.items() if not k.startswith(("norm.", "head."))}
    report = load_state_dict_into(backbone, state_dict, source, strict=not classifier)
    missing = [k for k in report.missing if not k.startswith(norms)]
    if missing or report.unexpected or report.mismatched:
        keys = missing + report.unexpected + report.mismatched
        raise CheckpointError(f"{source} ({fmt} classification format) does not fit the GC ViT backbone: {keys[:20]}")
