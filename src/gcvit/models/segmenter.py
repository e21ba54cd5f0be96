"""UPerNet semantic segmentation (Xiao et al., ECCV 2018, arXiv 1807.10221) on a GC ViT, Swin or ResNet-50 backbone:
the head of the GC ViT paper's ADE20K results (`../shared/GCVIT_SPEC.md`, "Dense prediction"; NVIDIA released no
segmentation code).

The head is mmsegmentation's UPerHead as Swin's ADE20K configs build it: pyramid pooling (PSPNet's PPM, pool scales
1, 2, 3, 6, 512 channels) on the last map; 1 x 1 laterals on the other three, summed top-down; 3 x 3 convolutions on
those three levels; all four levels upsampled to the stride-4 map, concatenated and fused by a 3 x 3 convolution;
Dropout2d(0.1) and a 1 x 1 classifier. An auxiliary FCN head on stage 2's map (one 3 x 3 convolution to 256
channels, Dropout2d(0.1), a 1 x 1 classifier) adds its cross-entropy with weight 0.4 in training. Every convolution
of the heads is mmcv's ConvModule (convolution without bias, BatchNorm, ReLU) and module names are mmseg's
(`decode_head.psp_modules`, `decode_head.lateral_convs`, `auxiliary_head.convs`, `conv_seg`, ...), so the
state-dict keys are mmseg's. mmseg trains with SyncBN; here the norms are BatchNorm2d, which a DDP run converts with
`torch.nn.SyncBatchNorm.convert_sync_batchnorm`. In training mode the batch needs at least 2 images (pool scale 1
leaves one value per channel to BatchNorm).

The backbone is the detectors' (`pyramid_body`): NVIDIA's detection backbone for a GC ViT name (windows 24 unless
`backbone_overrides` sets `window_size`), a Swin classifier's pyramid, or torchvision's ResNet-50.
Written here rather than taken from segmentation_models_pytorch: smp's UPerNet builds its encoder by name from its own
or timm's registry (a backbone of this package would have to become an smp encoder), its auxiliary output is a pooled
classification head, not the FCN head, and it refuses sizes that are not multiples of the output stride (32).
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from gcvit.models.detector import pyramid_body

ARCHS = ("upernet",)
POOL_SCALES = (1, 2, 3, 6)  # PPM's pooled map sides
AUX_INDEX = 2  # the auxiliary head reads stage 2's map (stride 16), mmseg's in_index
AUX_WEIGHT = 0.4  # the auxiliary cross-entropy's weight in the loss
IGNORE_INDEX = 255  # mask value of pixels that count in no loss


def _resize(x: torch.Tensor, size: Sequence[int]) -> torch.Tensor:
    """NCHW -> NCHW at `size` (h, w), bilinear with align_corners=False, as every resize of mmseg's heads."""
    return F.interpolate(x, size=tuple(size), mode="bilinear", align_corners=False)


def cross_entropy(logits: torch.Tensor, masks: torch.Tensor, ignore_index: int = IGNORE_INDEX) -> torch.Tensor:
    """Mean cross-entropy over the pixels not labelled `ignore_index`; 0 (not NaN) when every pixel is ignored.

    mmseg's default (`avg_non_ignore=False`) divides by all pixels instead; this is PyTorch's mean.

    Args:
        logits: (B, K, H, W).
        masks: (B, H, W) class indices in 0..K-1, or ignore_index.
    """
    total = F.cross_entropy(logits, masks, ignore_index=ignore_index, reduction="sum")
    return total / (masks != ignore_index).sum().clamp(min=1)


class ConvModule(nn.Module):
    """Convolution (no bias: the norm has one) -> BatchNorm2d -> ReLU, NCHW, 'same' padding: mmcv's ConvModule as
    mmseg's heads build it, with its attribute names (`conv`, `bn`) and initialisation (He normal, fan out)."""

    def __init__(self, in_channels: int, out_channels: int, kernel_size: int) -> None:
        super().__init__()
        self.conv = nn.Conv2d(in_channels, out_channels, kernel_size, padding=kernel_size // 2, bias=False)
        self.bn = nn.BatchNorm2d(out_channels)
        self.activate = nn.ReLU(inplace=True)
        nn.init.kaiming_normal_(self.conv.weight, mode="fan_out", nonlinearity="relu")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.activate(self.bn(self.conv(x)))


def _classifier(channels: int, num_classes: int) -> nn.Conv2d:
    """mmseg's `conv_seg`: a 1 x 1 convolution, weights N(0, 0.01), bias 0."""
    conv = nn.Conv2d(channels, num_classes, 1)
    nn.init.normal_(conv.weight, std=0.01)
    nn.init.zeros_(conv.bias)
    return conv


class PPM(nn.ModuleList):
    """Pyramid pooling (PSPNet): per pool scale s, the map average-pooled to s x s, a 1 x 1 ConvModule to `channels`,
    upsampled back to the map's size."""

    def __init__(self, pool_scales: Sequence[int], in_channels: int, channels: int) -> None:
        super().__init__(
            nn.Sequential(nn.AdaptiveAvgPool2d(s), ConvModule(in_channels, channels, 1)) for s in pool_scales
        )

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:  # type: ignore[override]
        """NCHW (B, C, h, w) -> one (B, channels, h, w) map per pool scale."""
        return [_resize(branch(x), x.shape[2:]) for branch in self]


class UPerHead(nn.Module):
    """mmseg's UPerHead: the backbone's maps (strides 4..32) -> logits at the first map's size (stride 4)."""

    def __init__(
        self,
        in_channels: Sequence[int],
        channels: int,
        num_classes: int,
        dropout: float,
        pool_scales: Sequence[int] = POOL_SCALES,
    ) -> None:
        super().__init__()
        *lower, last = in_channels
        self.psp_modules = PPM(pool_scales, last, channels)
        self.bottleneck = ConvModule(last + len(pool_scales) * channels, channels, 3)
        self.lateral_convs = nn.ModuleList(ConvModule(c, channels, 1) for c in lower)
        self.fpn_convs = nn.ModuleList(ConvModule(channels, channels, 3) for _ in lower)
        self.fpn_bottleneck = ConvModule(len(in_channels) * channels, channels, 3)
        self.dropout = nn.Dropout2d(dropout)
        self.conv_seg = _classifier(channels, num_classes)

    def forward(self, maps: Sequence[torch.Tensor]) -> torch.Tensor:
        """NCHW maps, the last the smallest -> logits (B, num_classes, h0, w0), h0 x w0 the first map's size."""
        x = maps[-1]
        top = self.bottleneck(torch.cat([x, *self.psp_modules(x)], dim=1))  # (B, C3 + 4 channels, h3, w3) -> channels
        laterals = [conv(m) for conv, m in zip(self.lateral_convs, maps)] + [top]  # each (B, channels, hi, wi)
        for i in range(len(laterals) - 1, 0, -1):  # top-down: each level plus the upsampled sum from above
            laterals[i - 1] = laterals[i - 1] + _resize(laterals[i], laterals[i - 1].shape[2:])
        outs = [conv(lateral) for conv, lateral in zip(self.fpn_convs, laterals)] + [laterals[-1]]
        size = outs[0].shape[2:]
        fused = torch.cat([outs[0], *(_resize(o, size) for o in outs[1:])], dim=1)  # (B, levels * channels, h0, w0)
        return self.conv_seg(self.dropout(self.fpn_bottleneck(fused)))


class FCNHead(nn.Module):
    """mmseg's FCNHead as UPerNet's auxiliary head: one 3 x 3 ConvModule, no concatenation of its input, Dropout2d,
    a 1 x 1 classifier. NCHW (B, C, h, w) -> logits (B, num_classes, h, w)."""

    def __init__(self, in_channels: int, channels: int, num_classes: int, dropout: float) -> None:
        super().__init__()
        self.convs = nn.Sequential(ConvModule(in_channels, channels, 3))
        self.dropout = nn.Dropout2d(dropout)
        self.conv_seg = _classifier(channels, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv_seg(self.dropout(self.convs(x)))


class UPerNet(nn.Module):
    """A backbone returning four NCHW maps (strides 4..32), the UPerHead on all four and, if given, the auxiliary
    FCN head on map `aux_index`. Images (B, 3, H, W), normalised as the backbone's pretraining (ImageNet's mean and
    std) -> `forward`: logits (B, num_classes, H, W); `losses`: the training losses."""

    arch = "upernet"
    backbone_name = ""  # the name it was built from; `create_segmenter` records it
    aux_index = AUX_INDEX
    aux_weight = AUX_WEIGHT  # the auxiliary cross-entropy's weight in `losses`

    def __init__(
        self,
        backbone: nn.Module,
        in_channels: Sequence[int],
        num_classes: int,
        *,
        channels: int = 512,
        aux_channels: int | None = 256,
        dropout: float = 0.1,
        size_multiple: int = 1,
    ) -> None:
        """`aux_channels` None: no auxiliary head. `size_multiple`: images are zero-padded right and bottom to a
        multiple of it before the backbone (Swin's patch size, as mmseg's Swin pads) and the logits cropped back."""
        super().__init__()
        self.backbone = backbone
        self.decode_head = UPerHead(in_channels, channels, num_classes, dropout)
        self.auxiliary_head = (
            FCNHead(in_channels[self.aux_index], aux_channels, num_classes, dropout) if aux_channels else None
        )
        self.num_classes = num_classes
        self.size_multiple = size_multiple

    def _logits(self, images: torch.Tensor, aux: bool) -> tuple[torch.Tensor, torch.Tensor | None]:
        """(logits, auxiliary logits or None if not `aux`), both (B, num_classes, H, W) at the images' size."""
        if not isinstance(images, torch.Tensor) or images.ndim != 4:
            got = tuple(images.shape) if isinstance(images, torch.Tensor) else type(images).__name__
            raise ValueError(f"expected images as a 4-D tensor (B, 3, H, W); got {got}")
        H, W = images.shape[2:]
        m = self.size_multiple
        if H % m or W % m:
            images = F.pad(images, (0, -W % m, 0, -H % m))  # (B, 3, Hp, Wp), zeros right and bottom
        padded = images.shape[2:]
        maps = self.backbone(images)  # NCHW, strides 4, 8, 16, 32
        # each head's logits upsampled to the padded size, the padding cropped off: (B, num_classes, H, W)
        logits = _resize(self.decode_head(maps), padded)[:, :, :H, :W]
        if not aux or self.auxiliary_head is None:
            return logits, None
        return logits, _resize(self.auxiliary_head(maps[self.aux_index]), padded)[:, :, :H, :W]

    def forward(
        self, images: torch.Tensor, masks: torch.Tensor | None = None, ignore_index: int = IGNORE_INDEX
    ) -> torch.Tensor | dict[str, torch.Tensor]:
        """Images (B, 3, H, W), any H, W the backbone takes (GC ViT, Swin: from 32 px) -> logits (B, num_classes, H,
        W), upsampled bilinearly (align_corners=False) from stride 4; with `masks`, the training losses instead
        (`losses`), so that DistributedDataParallel, which syncs gradients of calls through `forward`, trains it."""
        if masks is not None:
            return self.losses(images, masks, ignore_index)
        return self._logits(images, aux=False)[0]

    def losses(
        self, images: torch.Tensor, masks: torch.Tensor, ignore_index: int = IGNORE_INDEX
    ) -> dict[str, torch.Tensor]:
        """The training losses: `sum(losses.values())` is what to minimise.

        Under DistributedDataParallel, call the wrapped model with the masks (`forward(images, masks)`) instead.

        Args:
            images: (B, 3, H, W), normalised.
            masks: (B, H, W) integer class indices 0..num_classes-1; `ignore_index` marks pixels of no class.
            ignore_index: the label whose pixels count in neither loss (255 as mmseg's).
        Returns:
            'loss': the cross-entropy of the logits `forward` returns, averaged over the pixels not ignored
            (`cross_entropy`); 'loss_aux' (with the auxiliary head): `aux_weight` (0.4) times the auxiliary
            head's, its logits upsampled to (H, W) the same way.
        """
        if masks.shape != (images.shape[0], *images.shape[2:]) or masks.is_floating_point():
            raise ValueError(
                f"expected integer masks (B, H, W) = {(images.shape[0], *images.shape[2:])}, the images' batch and "
                f"size; got {tuple(masks.shape)} {masks.dtype}"
            )
        logits, aux_logits = self._logits(images, aux=True)
        masks = masks.long()
        losses = {"loss": cross_entropy(logits, masks, ignore_index)}
        if aux_logits is not None:
            losses["loss_aux"] = self.aux_weight * cross_entropy(aux_logits, masks, ignore_index)
        return losses

    def _backbone_module(self, method: str) -> tuple[str, nn.Module] | None:
        """(key prefix, module) of the outermost module of the backbone that has `method`: the backbone itself for
        GC ViT, the classifier inside the body for Swin; None for ResNet-50."""
        for name, module in self.backbone.named_modules():
            if hasattr(module, method):
                return f"backbone.{name}." if name else "backbone.", module
        return None

    def no_weight_decay(self) -> set[str]:
        """The backbone's parameters exempt from weight decay (its relative-position bias tables), named as in this
        model, for `gcvit.train.optim.param_groups` (which exempts norms and biases anyway)."""
        found = self._backbone_module("no_weight_decay")
        if found is None:
            return set()
        prefix, module = found
        return {prefix + name for name in module.no_weight_decay()}

    def set_grad_checkpointing(self, enable: bool = True) -> None:
        """Recompute the backbone's block activations in the backward pass, trading compute for memory."""
        found = self._backbone_module("set_grad_checkpointing")
        if found is not None:
            found[1].set_grad_checkpointing(enable)
        elif enable:
            raise ValueError(
                f"the backbone {self.backbone_name or type(self.backbone).__name__} has no gradient checkpointing"
            )


def _size_multiple(body: nn.Module) -> int:
    """What the body needs image sides to be multiples of: Swin's patch size (its classifier sits in the body as
    `model`), 1 for GC ViT (which pads its own maps) and ResNet-50."""
    cfg = getattr(getattr(body, "model", None), "cfg", None)
    return int(getattr(cfg, "patch_size", 1))


def create_segmenter(
    arch: str = "upernet",
    *,
    backbone: str = "gcvit_tiny",
    num_classes: int,
    pretrained_backbone: bool | str | os.PathLike[str] = False,
    frozen_stages: int = -1,
    backbone_overrides: dict[str, Any] | None = None,
    channels: int = 512,
    aux: bool = True,
    aux_channels: int = 256,
    dropout: float = 0.1,
) -> UPerNet:
    """UPerNet (mmseg's standard config, see the module docstring) on a GC ViT, Swin or ResNet-50 backbone.

    Args:
        arch: 'upernet', the only one.
        backbone: a GC ViT name (NVIDIA's detection backbone, `create_backbone`), a Swin name, or 'resnet50'.
        num_classes: classes of the masks (ADE20K: 150); logits have one channel per class.
        pretrained_backbone: the backbone's weights, as `create_backbone` takes them (True: the tag's ImageNet
            weights); for resnet50 True or False (torchvision's ImageNet weights).
        frozen_stages: see `create_backbone` (GC ViT, resnet50).
        backbone_overrides: config fields of the backbone (window_size, drop_path_rate, ...); GC ViT's windows are
            24 otherwise (the detection backbone's), e.g. {"window_size": 7} for small images.
        channels: the UPerHead's width (512 officially).
        aux: add the auxiliary FCN head on stage 2's map (loss weight 0.4), as the official config does.
        aux_channels: the auxiliary head's width (256 officially).
        dropout: Dropout2d before each classifier (0.1 officially).
    Returns:
        The segmenter in train mode, with `arch` and `backbone_name` recorded: `model(images)` gives logits (B,
        num_classes, H, W) at the images' size, `model.losses(images, masks)` the training losses.
    """
    if arch not in ARCHS:
        raise ValueError(f"expected arch among {ARCHS}; got {arch!r}")
    if not isinstance(num_classes, int) or isinstance(num_classes, bool) or num_classes < 1:
        raise ValueError(f"expected num_classes of at least 1; got {num_classes!r}")
    for name, value in (("channels", channels), ("aux_channels", aux_channels)):
        if not isinstance(value, int) or isinstance(value, bool) or value < 1:
            raise ValueError(f"expected {name} of at least 1; got {value!r}")
    if not 0.0 <= dropout < 1.0:
        raise ValueError(f"expected dropout in [0, 1); got {dropout!r}")
    body, in_channels = pyramid_body(
        backbone, pretrained=pretrained_backbone, frozen_stages=frozen_stages, **(backbone_overrides or {})
    )
    model = UPerNet(
        body,
        in_channels,
        num_classes,
        channels=channels,
        aux_channels=aux_channels if aux else None,
        dropout=dropout,
        size_multiple=_size_multiple(body),
    )
    model.arch, model.backbone_name = arch, backbone  # what a saved segmenter records
    return model
