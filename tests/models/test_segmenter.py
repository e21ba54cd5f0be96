"""`gcvit.create_segmenter`: mmseg's UPerNet (UPerHead with PPM, auxiliary FCN head on stage 2 weighted 0.4) on GC
ViT, Swin and ResNet-50 backbones; logits at the input's size for any size, losses that ignore label 255."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import gcvit
from gcvit.models.segmenter import UPerNet

pytestmark = pytest.mark.usefixtures("one_thread")

GCVIT = {"backbone": "gcvit_xxtiny", "backbone_overrides": {"window_size": 7}, "channels": 32, "aux_channels": 16}
# a Swin of a few layers: sizes that are not multiples of its patch size go through the padding
SWIN = {
    "backbone": "swin_tiny",
    "backbone_overrides": {"embed_dim": 16, "depths": (1, 1, 1, 1), "num_heads": (1, 1, 1, 1)},
    "channels": 32,
    "aux_channels": 16,
}
ODD_SIZES = [(97, 130), (64, 64), (113, 71)]


@pytest.fixture(scope="module")
def gc_vit_segmenter() -> UPerNet:
    torch.manual_seed(0)
    return gcvit.create_segmenter(num_classes=5, **GCVIT).eval()


@pytest.fixture(scope="module")
def swin_segmenter() -> UPerNet:
    torch.manual_seed(0)
    return gcvit.create_segmenter(num_classes=4, **SWIN).eval()


@pytest.mark.parametrize("size", ODD_SIZES)
def test_gc_vit_logits_have_the_input_size(gc_vit_segmenter: UPerNet, size: tuple[int, int]) -> None:
    with torch.no_grad():
        logits = gc_vit_segmenter(torch.randn(2, 3, *size))
    assert logits.shape == (2, 5, *size)
    assert torch.isfinite(logits).all()


@pytest.mark.parametrize("size", ODD_SIZES)
def test_swin_logits_have_the_input_size(swin_segmenter: UPerNet, size: tuple[int, int]) -> None:
    assert swin_segmenter.size_multiple == 4  # Swin's patch size: 97 x 130 is padded to 100 x 132, then cropped
    with torch.no_grad():
        logits = swin_segmenter(torch.randn(1, 3, *size))
    assert logits.shape == (1, 4, *size)


def test_resnet50_segments_any_size_and_has_nothing_to_checkpoint() -> None:
    model = gcvit.create_segmenter(backbone="resnet50", num_classes=3, channels=16, aux_channels=8).eval()
    with torch.no_grad():
        assert model(torch.randn(1, 3, 97, 130)).shape == (1, 3, 97, 130)
    assert model.no_weight_decay() == set()
    model.set_grad_checkpointing(False)  # nothing to turn off
    with pytest.raises(ValueError, match="no gradient checkpointing"):
        model.set_grad_checkpointing(True)


def test_the_head_is_mmsegs_standard_upernet(gc_vit_segmenter: UPerNet) -> None:
    model = gc_vit_segmenter
    stage_channels = model.backbone.out_channels  # gcvit_xxtiny: 64, 128, 256, 512
    assert (model.arch, model.backbone_name) == ("upernet", "gcvit_xxtiny")
    head = model.decode_head
    assert [branch[0].output_size for branch in head.psp_modules] == [1, 2, 3, 6]  # PPM's pool scales
    assert all(branch[1].conv.in_channels == stage_channels[3] for branch in head.psp_modules)
    assert head.bottleneck.conv.in_channels == stage_channels[3] + 4 * 32
    assert [c.conv.in_channels for c in head.lateral_convs] == stage_channels[:3]
    assert [c.conv.kernel_size for c in head.fpn_convs] == [(3, 3)] * 3
    assert head.fpn_bottleneck.conv.in_channels == 4 * 32
    assert isinstance(head.dropout, nn.Dropout2d) and head.dropout.p == 0.1
    assert head.conv_seg.out_channels == 5
    # the auxiliary FCN head reads stage 2's map and weighs 0.4
    aux = model.auxiliary_head
    assert (model.aux_index, model.aux_weight) == (2, 0.4)
    assert len(aux.convs) == 1 and aux.convs[0].conv.in_channels == stage_channels[2]
    assert aux.convs[0].conv.out_channels == 16 and aux.conv_seg.out_channels == 5
    assert isinstance(model.decode_head.bottleneck.bn, nn.BatchNorm2d)
    # mmseg's state-dict keys
    keys = set(model.state_dict())
    assert {"decode_head.psp_modules.3.1.conv.weight", "decode_head.fpn_bottleneck.bn.weight"} <= keys
    assert {"decode_head.conv_seg.weight", "auxiliary_head.convs.0.conv.weight", "auxiliary_head.conv_seg.bias"} <= keys


def test_the_standard_widths_by_default() -> None:
    model = gcvit.create_segmenter(backbone="gcvit_xxtiny", num_classes=150)
    assert model.decode_head.fpn_bottleneck.conv.out_channels == 512
    assert model.auxiliary_head.convs[0].conv.out_channels == 256


def test_losses_ignore_label_255_and_add_the_weighted_auxiliary_loss(gc_vit_segmenter: UPerNet) -> None:
    model = gc_vit_segmenter  # eval mode: no dropout, BatchNorm's running statistics
    images = torch.randn(2, 3, 97, 130)
    masks = torch.full((2, 97, 130), 255)
    masks[1, 40, 77] = 3  # the one labelled pixel
    with torch.no_grad():
        losses = model.losses(images, masks)
        logits = model(images)
        aux_logits = F.interpolate(
            model.auxiliary_head(model.backbone(images)[2]), size=(97, 130), mode="bilinear", align_corners=False
        )
    target = torch.tensor([3])
    assert set(losses) == {"loss", "loss_aux"}
    torch.testing.assert_close(losses["loss"], F.cross_entropy(logits[1:, :, 40, 77], target))
    torch.testing.assert_close(losses["loss_aux"], 0.4 * F.cross_entropy(aux_logits[1:, :, 40, 77], target))


def test_losses_average_over_labelled_pixels_and_are_zero_when_none_is(gc_vit_segmenter: UPerNet) -> None:
    images = torch.randn(1, 3, 64, 80)
    masks = torch.randint(0, 5, (1, 64, 80), dtype=torch.uint8)
    masks[0, :32] = 255
    with torch.no_grad():
        losses = gc_vit_segmenter.losses(images, masks)
        logits = gc_vit_segmenter(images)
        none = gc_vit_segmenter.losses(images, torch.full_like(masks, 255))
    torch.testing.assert_close(losses["loss"], F.cross_entropy(logits, masks.long(), ignore_index=255))
    assert none["loss"].item() == 0.0 and none["loss_aux"].item() == 0.0


def test_without_the_auxiliary_head_there_is_one_loss() -> None:
    model = gcvit.create_segmenter(num_classes=3, aux=False, **GCVIT).eval()
    assert model.auxiliary_head is None
    with torch.no_grad():
        losses = model.losses(torch.randn(1, 3, 64, 64), torch.zeros(1, 64, 64, dtype=torch.long))
    assert set(losses) == {"loss"}


def test_training_step_reaches_the_backbone_and_both_heads() -> None:
    model = gcvit.create_segmenter(num_classes=3, **GCVIT)  # train mode; BatchNorm needs 2 images
    images = torch.randn(2, 3, 65, 71)
    masks = torch.randint(0, 3, (2, 65, 71))
    losses = model.losses(images, masks)
    sum(losses.values()).backward()
    for name in (
        "backbone.patch_embed.proj.weight",
        "backbone.levels.0.blocks.0.attn.relative_position_bias_table",
        "decode_head.lateral_convs.0.conv.weight",
        "auxiliary_head.convs.0.conv.weight",
    ):
        grad = model.get_parameter(name).grad
        assert grad is not None and grad.abs().sum() > 0, name


def test_frozen_stages_reach_the_backbone() -> None:
    model = gcvit.create_segmenter(num_classes=3, frozen_stages=1, **GCVIT)
    assert not any(p.requires_grad for p in model.backbone.patch_embed.parameters())
    assert not any(p.requires_grad for p in model.backbone.levels[0].parameters())
    assert all(p.requires_grad for p in model.backbone.levels[1].parameters())


@pytest.mark.parametrize("which", ["gcvit", "swin"])
def test_no_weight_decay_names_every_bias_table_as_in_the_segmenter(
    which: str, gc_vit_segmenter: UPerNet, swin_segmenter: UPerNet
) -> None:
    model = gc_vit_segmenter if which == "gcvit" else swin_segmenter
    tables = {n for n, _ in model.named_parameters() if n.endswith("relative_position_bias_table")}
    assert tables and model.no_weight_decay() == tables


def test_grad_checkpointing_is_the_backbones() -> None:
    gc = gcvit.create_segmenter(num_classes=3, **GCVIT)
    gc.set_grad_checkpointing(True)
    assert all(level.grad_checkpointing for level in gc.backbone.levels)
    swin = gcvit.create_segmenter(num_classes=3, **SWIN)
    swin.set_grad_checkpointing(True)
    assert all(stage.grad_checkpointing for stage in swin.backbone.model.layers)
    swin.set_grad_checkpointing(False)
    assert not any(stage.grad_checkpointing for stage in swin.backbone.model.layers)


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"arch": "deeplabv3"}, r"expected arch among \('upernet',\); got 'deeplabv3'"),
        ({"num_classes": 0}, "expected num_classes of at least 1; got 0"),
        ({"num_classes": True}, "expected num_classes of at least 1"),
        ({"backbone": "gcvit_tinyy"}, "unknown model 'gcvit_tinyy'"),
        ({"backbone": "vit_tiny"}, "expected a GC ViT or Swin name, or 'resnet50'"),
        ({"channels": 0}, "expected channels of at least 1"),
        ({"dropout": 1.0}, r"expected dropout in \[0, 1\)"),
    ],
)
def test_bad_arguments_are_named(kwargs: dict, match: str) -> None:
    kwargs = {"num_classes": 3, **kwargs}
    arch = kwargs.pop("arch", "upernet")
    with pytest.raises(ValueError, match=match):
        gcvit.create_segmenter(arch, **kwargs)


def test_bad_inputs_are_named(gc_vit_segmenter: UPerNet) -> None:
    images = torch.randn(1, 3, 64, 64)
    with pytest.raises(ValueError, match=r"expected integer masks \(B, H, W\) = \(1, 64, 64\)"):
        gc_vit_segmenter.losses(images, torch.zeros(1, 64, 63, dtype=torch.long))
    with pytest.raises(ValueError, match="expected integer masks"):
        gc_vit_segmenter.losses(images, torch.zeros(1, 64, 64))
    with pytest.raises(ValueError, match="expected images as a 4-D tensor"):
        gc_vit_segmenter(torch.randn(3, 64, 64))


def test_create_segmenter_is_exported() -> None:
    from gcvit.models import create_segmenter
    from gcvit.models.segmenter import create_segmenter as defined

    assert gcvit.create_segmenter is create_segmenter is defined
