"""timm 1.0.31's GC ViT, randomly weighted and loaded through this project, gives the same logits."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

import gcvit
from tests.conftest import assert_loads_timm_checkpoint, randomize_

timm = pytest.importorskip("timm")


@pytest.mark.parametrize("name", ["gcvit_xxtiny", "gcvit_xtiny", "gcvit_tiny", "gcvit_small", "gcvit_base"])
def test_timm_checkpoint_gives_timm_logits(name: str, tmp_path: Path) -> None:
    assert_loads_timm_checkpoint(name, name, tmp_path)


def test_timm_pretrained_path_in_create_model(tmp_path: Path) -> None:
    """create_model(pretrained=<timm file>, num_classes=10): converted backbone, fresh 10-class head."""
    reference = randomize_(timm.create_model("gcvit_xxtiny")).eval()
    path = tmp_path / "timm.pth"
    torch.save(reference.state_dict(), path)
    model = gcvit.create_model("gcvit_xxtiny", pretrained=path, num_classes=10).eval()
    assert model.head.weight.shape == (10, 512)
    x = torch.randn(1, 3, 224, 224)
    with torch.no_grad():
        expected = reference.forward_head(reference.forward_features(x), pre_logits=True)
        got = model.forward_head(model.forward_features(x), pre_logits=True)
    assert (got - expected).abs().max().item() < 1e-4
