"""Detectors on a GC ViT, Swin or ResNet-50 backbone: torchvision's Faster R-CNN and Mask R-CNN with torchvision's
FPN, so that the backbones are compared on the same detector.

torchvision's defaults are the official GC ViT Mask R-CNN's (`../shared/GCVIT_SPEC.md`, "Dense prediction"): an FPN
of 256 channels over the four maps plus an extra max-pool level (strides 4 to 64); RPN anchors of 32 to 512 px (scale
8 at each stride), ratios 0.5, 1, 2; RoIAlign 7 x 7 into two shared 1024-wide FC layers; a mask head of four 3 x 3
convolutions to 28 x 28 masks. Images are normalised with ImageNet's mean and std, resized so that the shorter side
is `min_size` (the longer at most `max_size`: 800 and 1333 officially), and padded to a multiple of 32.
Cascade Mask R-CNN is not built.
"""

from __future__ import annotations

import os
from collections import OrderedDict
from collections.abc import Sequence
from typing import Any

import torch
from torch import nn
from torchvision.models.detection import FasterRCNN, MaskRCNN
from torchvision.models.detection._utils import BalancedPositiveNegativeSampler
from torchvision.models.detection.anchor_utils import AnchorGenerator
from torchvision.models.detection.faster_rcnn import FastRCNNPredictor, TwoMLPHead
from torchvision.models.detection.mask_rcnn import MaskRCNNHeads, MaskRCNNPredictor
from torchvision.ops import FeaturePyramidNetwork
from torchvision.ops.feature_pyramid_network import LastLevelMaxPool

from gcvit.models.backbone import create_backbone
from gcvit.models.pretrained import IMAGENET_MEAN, IMAGENET_STD
from gcvit.models.registry import create_model, resolve_name

ARCHS = ("faster_rcnn", "mask_rcnn")
FPN_CHANNELS = 256
ANCHOR_SIZES = (32, 64, 128, 256, 512)  # px, one size per FPN level (strides 4 to 64), the official anchors


class SeededSampler(BalancedPositiveNegativeSampler):
    """torchvision's positive/negative sampler (the same counts and rule) that can draw each image's sample from its
    own seed instead of the global generator, and counts what it sampled.

    Drawn from per-image seeds, the anchors and RoIs an image trains on do not depend on which process or batch it
    lands in, which is what makes a 2-process run equal a 1-process one (`gcvit.train.detection`). `seeds`: one int
    per image of the next forward pass, or None (the global generator, as torchvision). After a call, `sampled` and
    `positives` hold the totals over the batch, the denominators of torchvision's mean losses."""

    def __init__(self, batch_size_per_image: int, positive_fraction: float, salt: int) -> None:
        super().__init__(batch_size_per_image, positive_fraction)
        self.salt = salt  # one sampler's draws differ from the other's for the same image seed
        self.seeds: list[int] | None = None
        self.sampled = self.positives = 0

    def __call__(self, matched_idxs: list[torch.Tensor]) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
        if self.seeds is not None and len(self.seeds) != len(matched_idxs):
            raise ValueError(f"expected one sampling seed per image ({len(matched_idxs)}); got {len(self.seeds)}")
        pos_masks, neg_masks = [], []
        self.sampled = self.positives = 0
        for i, matched in enumerate(matched_idxs):
            positive = torch.where(matched >= 1)[0]
            negative = torch.where(matched == 0)[0]
            num_pos = min(positive.numel(), int(self.batch_size_per_image * self.positive_fraction))
            num_neg = min(negative.numel(), self.batch_size_per_image - num_pos)
            if self.seeds is None:  # as torchvision: the device's global generator
                pos = positive[torch.randperm(positive.numel(), device=positive.device)[:num_pos]]
                neg = negative[torch.randperm(negative.numel(), device=negative.device)[:num_neg]]
            else:
                generator = torch.Generator().manual_seed((self.seeds[i] * 1_000_003 + self.salt) % 2**63)
                pos = positive[torch.randperm(positive.numel(), generator=generator)[:num_pos].to(positive.device)]
                neg = negative[torch.randperm(negative.numel(), generator=generator)[:num_neg].to(negative.device)]
            pos_mask = torch.zeros_like(matched, dtype=torch.uint8)
            neg_mask = torch.zeros_like(matched, dtype=torch.uint8)
            pos_mask[pos], neg_mask[neg] = 1, 1
            pos_masks.append(pos_mask)
            neg_masks.append(neg_mask)
            self.sampled += num_pos + num_neg
            self.positives += num_pos
        return pos_masks, neg_masks


def samplers(detector: nn.Module) -> tuple[SeededSampler, SeededSampler]:
    """(the RPN's anchor sampler, the RoI heads' proposal sampler) of a detector made by `create_detector`."""
    return detector.rpn.fg_bg_sampler, detector.roi_heads.fg_bg_sampler


class FPNBackbone(nn.Module):
    """A backbone returning a list of NCHW maps (`out_channels` each) under torchvision's FPN with an extra
    max-pool level: images -> OrderedDict '0'..'3', 'pool' of FPN_CHANNELS maps, what torchvision's detectors take."""

    def __init__(self, body: nn.Module, in_channels: Sequence[int], channels: int = FPN_CHANNELS) -> None:
        super().__init__()
        self.body = body
        self.fpn = FeaturePyramidNetwork(list(in_channels), channels, extra_blocks=LastLevelMaxPool())
        self.out_channels = channels

    def forward(self, x: torch.Tensor) -> OrderedDict[str, torch.Tensor]:
        maps = self.body(x)
        return self.fpn(OrderedDict((str(i), m) for i, m in enumerate(maps)))


class _Pyramid(nn.Module):
    """A classifier of this package (Swin) as a body: its `forward_intermediates`, the four stage maps."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        return self.model.forward_intermediates(x)

    def no_weight_decay(self) -> set[str]:
        return {f"model.{name}" for name in self.model.no_weight_decay()}

    def set_grad_checkpointing(self, enable: bool = True) -> None:
        self.model.set_grad_checkpointing(enable)


class _ResNet50(nn.Module):
    """torchvision's ResNet-50 as a body: the outputs of layer1..layer4 (256, 512, 1024, 2048 channels), with frozen
    batch norm as torchvision's detection models use it."""

    def __init__(self, pretrained: bool, frozen_stages: int) -> None:
        super().__init__()
        from torchvision.models import ResNet50_Weights, resnet50
        from torchvision.ops import FrozenBatchNorm2d

        weights = ResNet50_Weights.IMAGENET1K_V1 if pretrained else None
        net = resnet50(weights=weights, norm_layer=FrozenBatchNorm2d)
        self.stem = nn.Sequential(net.conv1, net.bn1, net.relu, net.maxpool)
        self.layers = nn.ModuleList([net.layer1, net.layer2, net.layer3, net.layer4])
        for module in ([self.stem] if frozen_stages >= 0 else []) + list(self.layers[: max(frozen_stages, 0)]):
            for p in module.parameters():
                p.requires_grad_(False)

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        x = self.stem(x)
        maps = []
        for layer in self.layers:
            x = layer(x)
            maps.append(x)
        return maps


def pyramid_body(
    backbone: str,
    *,
    pretrained: bool | str | os.PathLike[str] = False,
    frozen_stages: int = -1,
    **overrides: Any,
) -> tuple[nn.Module, list[int]]:
    """(body returning four NCHW maps, their channels) for a GC ViT name (`create_backbone`, windows 24 unless
    `window_size` says otherwise), a Swin name (its classifier's pyramid), or 'resnet50' (torchvision's)."""
    if backbone == "resnet50":
        if overrides or not isinstance(pretrained, bool):
            raise ValueError("resnet50 takes pretrained=True/False (torchvision's ImageNet weights) and no overrides")
        return _ResNet50(pretrained, frozen_stages), [256, 512, 1024, 2048]
    family = resolve_name(backbone).family
    if family == "gcvit":
        body = create_backbone(backbone, pretrained=pretrained, frozen_stages=frozen_stages, **overrides)
        return body, list(body.out_channels)
    if family == "swin":
        if frozen_stages != -1:
            raise ValueError("frozen_stages goes with GC ViT and resnet50 backbones")
        model = create_model(backbone, pretrained=pretrained, num_classes=0, **overrides)
        return _Pyramid(model), [model.cfg.embed_dim * 2**i for i in range(len(model.cfg.depths))]
    raise ValueError(f"expected a GC ViT or Swin name, or 'resnet50', as a backbone; got {backbone!r}")


def create_detector(
    arch: str,
    *,
    backbone: str = "gcvit_tiny",
    num_classes: int,
    pretrained_backbone: bool | str | os.PathLike[str] = False,
    min_size: int | Sequence[int] = 800,
    max_size: int = 1333,
    frozen_stages: int = -1,
    backbone_overrides: dict[str, Any] | None = None,
    fpn_channels: int = FPN_CHANNELS,
    box_head_width: int = 1024,
    mask_head_convs: int = 4,
    anchor_sizes: Sequence[int] = ANCHOR_SIZES,
    **detector_kwargs: Any,
) -> nn.Module:
    """torchvision's Faster R-CNN or Mask R-CNN on a GC ViT (or Swin, or ResNet-50) backbone with an FPN.

    Args:
        arch: 'faster_rcnn' or 'mask_rcnn'.
        backbone: a GC ViT name (NVIDIA's detection backbone, `create_backbone`), a Swin name, or 'resnet50'.
        num_classes: object classes, background not counted (torchvision's heads get num_classes + 1 outputs).
        pretrained_backbone: the backbone's weights, as `create_backbone` takes them (True: the tag's ImageNet
            weights); for resnet50 True or False (torchvision's ImageNet weights).
        min_size: the shorter side images are resized to; several values: one drawn per batch in training.
        max_size: the longest the longer side may become.
        frozen_stages: see `create_backbone` (GC ViT, resnet50).
        backbone_overrides: config fields of the backbone (window_size, drop_path_rate, ...).
        fpn_channels, box_head_width, mask_head_convs: the FPN's channels (the mask head's too), the width of the two
            box-head FC layers, the mask head's 3 x 3 convolutions; the defaults are the official Mask R-CNN's (256,
            1024, 4). Lighter heads suit small images with few objects on a CPU.
        anchor_sizes: the RPN's anchor size (px) at each of the five FPN levels, with ratios 0.5, 1, 2 each; the
            official ones by default. Small objects in small images need smaller anchors.
        detector_kwargs: other arguments of torchvision's FasterRCNN / MaskRCNN (box_score_thresh, ...).
    Returns:
        The detector in train mode: `model(images, targets)` gives the losses, `model.eval()(images)` the
        detections (boxes in input pixels, labels 1..num_classes, scores, and masks for Mask R-CNN).
    """
    if arch not in ARCHS:
        raise ValueError(f"expected arch among {ARCHS}; got {arch!r} (Cascade Mask R-CNN is not built)")
    if not isinstance(num_classes, int) or isinstance(num_classes, bool) or num_classes < 1:
        raise ValueError(
            f"expected num_classes of at least 1 (object classes, background not counted); got {num_classes!r}"
        )
    body, channels = pyramid_body(
        backbone, pretrained=pretrained_backbone, frozen_stages=frozen_stages, **(backbone_overrides or {})
    )
    sizes = (min_size,) if isinstance(min_size, int) else tuple(min_size)
    heads: dict[str, Any] = {}
    if (fpn_channels, box_head_width, mask_head_convs) != (FPN_CHANNELS, 1024, 4):  # else torchvision's own
        heads["box_head"] = TwoMLPHead(fpn_channels * 7 * 7, box_head_width)  # RoIAlign 7 x 7
        heads["box_predictor"] = FastRCNNPredictor(box_head_width, num_classes + 1)
        if arch == "mask_rcnn":
            heads["mask_head"] = MaskRCNNHeads(fpn_channels, (fpn_channels,) * mask_head_convs, 1)
            heads["mask_predictor"] = MaskRCNNPredictor(fpn_channels, fpn_channels, num_classes + 1)
    if tuple(anchor_sizes) != ANCHOR_SIZES:
        if len(anchor_sizes) != 5:
            raise ValueError(f"expected 5 anchor_sizes, one per FPN level (strides 4 to 64); got {anchor_sizes!r}")
        heads["rpn_anchor_generator"] = AnchorGenerator(tuple((int(a),) for a in anchor_sizes), ((0.5, 1.0, 2.0),) * 5)
    detector_cls = MaskRCNN if arch == "mask_rcnn" else FasterRCNN
    detector = detector_cls(
        FPNBackbone(body, channels, fpn_channels),
        # torchvision takes the class count or the predictors
        num_classes=None if "box_predictor" in heads else num_classes + 1,
        **heads,
        min_size=sizes,
        max_size=max_size,
        image_mean=list(IMAGENET_MEAN),
        image_std=list(IMAGENET_STD),
        **detector_kwargs,
    )
    for owner, salt in ((detector.rpn, 1), (detector.roi_heads, 2)):
        old = owner.fg_bg_sampler
        owner.fg_bg_sampler = SeededSampler(old.batch_size_per_image, old.positive_fraction, salt)
    detector.arch, detector.backbone_name = arch, backbone  # what a saved detector records
    return detector
