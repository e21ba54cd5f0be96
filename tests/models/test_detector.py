"""`gcvit.create_detector`: torchvision's Faster R-CNN and Mask R-CNN on GC ViT, Swin and ResNet-50 backbones with
torchvision's FPN; they train (finite losses, gradients reaching the backbone) and detect."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

import gcvit
from gcvit.models.detector import FPNBackbone

SMALL = {"min_size": 128, "max_size": 192}


def _targets(n: int, masks: bool) -> list[dict[str, torch.Tensor]]:
    targets = []
    for i in range(n):
        boxes = torch.tensor([[10.0, 20.0, 60.0, 90.0], [70.0, 30.0, 120.0, 110.0]]) + i
        target = {"boxes": boxes, "labels": torch.tensor([1, 3])}
        if masks:
            m = torch.zeros(2, 128, 160, dtype=torch.uint8)
            for k, (x0, y0, x1, y1) in enumerate(boxes.int().tolist()):
                m[k, y0:y1, x0:x1] = 1
            target["masks"] = m
        targets.append(target)
    return targets


def test_mask_rcnn_on_gc_vit_trains_and_detects() -> None:
    torch.manual_seed(0)
    detector = gcvit.create_detector(
        "mask_rcnn", backbone="gcvit_xxtiny", num_classes=3, backbone_overrides={"window_size": 8}, **SMALL
    )
    assert isinstance(detector.backbone, FPNBackbone) and detector.backbone.out_channels == 256
    assert detector.roi_heads.box_predictor.cls_score.out_features == 4  # 3 classes and the background
    images = [torch.rand(3, 128, 160), torch.rand(3, 128, 160)]
    losses = detector(images, _targets(2, masks=True))
    assert set(losses) == {"loss_classifier", "loss_box_reg", "loss_mask", "loss_objectness", "loss_rpn_box_reg"}
    assert all(torch.isfinite(v) for v in losses.values())
    sum(losses.values()).backward()
    stem = detector.backbone.body.patch_embed.proj.weight
    assert stem.grad is not None and stem.grad.abs().sum() > 0  # the losses reach the GC ViT backbone
    detector.eval()
    with torch.no_grad():
        out = detector([torch.rand(3, 100, 140)])
    assert set(out[0]) == {"boxes", "labels", "scores", "masks"}
    n = len(out[0]["boxes"])
    assert out[0]["masks"].shape == (n, 1, 100, 140)  # in the input's own pixels
    assert out[0]["labels"].min().item() >= 1 if n else True


@pytest.mark.parametrize("backbone", ["swin_tiny", "resnet50"])
def test_faster_rcnn_on_the_other_backbones(backbone: str) -> None:
    overrides = {"depths": (1, 1, 1, 1)} if backbone == "swin_tiny" else None
    detector = gcvit.create_detector(
        "faster_rcnn", backbone=backbone, num_classes=3, backbone_overrides=overrides, **SMALL
    )
    losses = detector([torch.rand(3, 128, 160)], [{k: v for k, v in _targets(1, masks=False)[0].items()}])
    assert "loss_mask" not in losses and all(torch.isfinite(v) for v in losses.values())
    detector.eval()
    with torch.no_grad():
        assert set(detector([torch.rand(3, 96, 96)])[0]) == {"boxes", "labels", "scores"}


def test_a_detectors_weights_give_back_its_backbone(tmp_path: Path) -> None:
    torch.manual_seed(0)
    detector = gcvit.create_detector("faster_rcnn", backbone="gcvit_xxtiny", num_classes=1, **SMALL)
    torch.save({"state_dict": detector.state_dict()}, tmp_path / "detector.pth")
    backbone = gcvit.create_backbone("gcvit_xxtiny", pretrained=str(tmp_path / "detector.pth")).eval()
    detector.eval()
    x = torch.rand(1, 3, 96, 96)
    with torch.no_grad():
        assert all(torch.equal(a, b) for a, b in zip(backbone(x), detector.backbone.body(x)))


def test_bad_arguments_are_named() -> None:
    with pytest.raises(ValueError, match=r"expected arch among \('faster_rcnn', 'mask_rcnn'\); got 'cascade'"):
        gcvit.create_detector("cascade", num_classes=2)
    with pytest.raises(ValueError, match="expected num_classes of at least 1"):
        gcvit.create_detector("mask_rcnn", num_classes=0)
    with pytest.raises(ValueError, match="expected a GC ViT or Swin name, or 'resnet50'"):
        gcvit.create_detector("mask_rcnn", backbone="vit_small", num_classes=2)
