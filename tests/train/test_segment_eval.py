"""Segmentation inference and metrics (`gcvit.train.segment_eval`): the confusion-matrix scores against a hand
computation, sliding-window inference against whole-image inference, scales and flip."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from gcvit.train.segment_eval import confusion, infer, scores, slide_logits


def test_miou_of_a_hand_made_prediction_equals_the_hand_computed_value() -> None:
    label = torch.tensor([[0, 0, 1, 1], [0, 2, 2, 255], [1, 1, 2, 255]])
    pred = torch.tensor([[0, 1, 1, 1], [0, 2, 1, 0], [1, 0, 2, 2]])
    # labels (ignoring 255): 0 at (0,0),(0,1),(1,0) = 3; 1 at (0,2),(0,3),(2,0),(2,1) = 4; 2 at (1,1),(1,2),(2,2) = 3
    # predictions on those pixels: (0,0)0 (0,1)1 (1,0)0 | (0,2)1 (0,3)1 (2,0)1 (2,1)0 | (1,1)2 (1,2)1 (2,2)2
    # class 0: tp 2, labelled 3, predicted 3 ((0,0),(1,0),(2,1)) -> IoU 2 / (3 + 3 - 2) = 0.5
    # class 1: tp 3, labelled 4, predicted 5 ((0,1),(0,2),(0,3),(2,0),(1,2)) -> IoU 3 / 6 = 0.5
    # class 2: tp 2, labelled 3, predicted 2 -> IoU 2 / 3
    matrix = confusion(pred, label, 4)
    assert matrix.sum() == 10 and matrix[3].sum() == 0
    result = scores(matrix, ["a", "b", "c", "d"])
    assert result["per_class"]["a"]["IoU"] == pytest.approx(0.5)
    assert result["per_class"]["b"]["IoU"] == pytest.approx(0.5)
    assert result["per_class"]["c"]["IoU"] == pytest.approx(2 / 3)
    assert result["per_class"]["d"] == {"IoU": None, "accuracy": None}  # in neither: left out of the mean
    assert result["mIoU"] == pytest.approx((0.5 + 0.5 + 2 / 3) / 3)
    assert result["pixel_accuracy"] == pytest.approx(7 / 10)
    assert result["per_class"]["b"]["accuracy"] == pytest.approx(3 / 4)


class _Local(nn.Module):
    """A segmenter whose logits at a pixel depend on that pixel alone: sliding windows cannot change them."""

    mean, std = (0.5, 0.5, 0.5), (0.25, 0.25, 0.25)

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.conv = nn.Conv2d(3, 5, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(x)


def test_sliding_windows_agree_with_the_whole_image() -> None:
    model = _Local().eval()
    image = torch.rand(3, 37, 53)
    whole = infer(model, image)
    for window, stride in ((16, 16), (16, 5), (64, 32)):  # tiled, overlapping, one window larger than the image
        assert torch.allclose(infer(model, image, mode="slide", window=window, stride=stride), whole, atol=1e-6)
    assert torch.allclose(whole.sum(0), torch.ones(37, 53))
    flipped = infer(model, image, flip=True, scales=(1.0,))
    assert torch.allclose(flipped, whole, atol=1e-6)  # a pixel-wise model is flip-equivariant
    assert infer(model, image, scales=(0.5, 1.0, 1.5)).shape == (5, 37, 53)
    with pytest.raises(ValueError, match="expected 0 < stride <= window"):
        slide_logits(model, image[None], 16, 17)
    with pytest.raises(ValueError, match="expected mode 'whole' or 'slide'"):
        infer(model, image, mode="tiles")
