"""`gcvit.create_backbone`: NVIDIA's detection backbone (windows 24, global-query pools 3, 2, 1, 0, norm0..norm3)
against an independent implementation, timm's GC ViT built at 768 px with windows 24 (whose stages are the same
computation there: no padding, every query map already 24 x 24); its loaders; padding; frozen stages."""

from __future__ import annotations

from pathlib import Path

import pytest
import timm
import torch
import torch.nn.functional as F

import gcvit
from gcvit.layers import relative_position_index
from gcvit.models.backbone import GCViTBackbone
from gcvit.models.gcvit import convert_timm
from tests.conftest import assert_padding_is_masked, randomize_


@pytest.fixture(scope="module")
def official(tmp_path_factory: pytest.TempPathFactory) -> tuple[torch.nn.Module, dict[str, torch.Tensor], Path]:
    """(timm's gcvit_xxtiny at 768 px with windows 24, an official-format detection-backbone state dict of the same
    weights plus random norm0..3, that state dict saved as a .pth)."""
    torch.manual_seed(0)
    reference = randomize_(timm.create_model("gcvit_xxtiny", img_size=768, window_size=24, num_classes=0)).eval()
    state = {k: v for k, v in convert_timm(reference.state_dict()).items() if not k.startswith(("norm.", "head."))}
    for level, depth in enumerate((2, 2, 6, 2)):  # timm keeps no index; the official file holds them, for 24
        for block in range(depth):
            state[f"levels.{level}.blocks.{block}.attn.relative_position_index"] = relative_position_index(24)
    for i, channels in enumerate((64, 128, 256, 512)):
        state[f"norm{i}.weight"] = 1 + 0.1 * torch.randn(channels)
        state[f"norm{i}.bias"] = 0.1 * torch.randn(channels)
    path = tmp_path_factory.mktemp("official") / "gcvit_xxtiny_det_backbone.pth"
    torch.save({"state_dict": state}, path)
    return reference, state, path


def _reference_maps(reference: torch.nn.Module, state: dict[str, torch.Tensor], x: torch.Tensor) -> list[torch.Tensor]:
    """timm's stage maps (each stage's last block's NHWC output: timm's last stage ends in its final norm) through
    the official per-stage LayerNorms, as NCHW."""
    maps: list[torch.Tensor] = []
    hooks = [s.blocks[-1].register_forward_hook(lambda m, i, out: maps.append(out)) for s in reference.stages]
    reference(x)
    for hook in hooks:
        hook.remove()
    norms = [(state[f"norm{i}.weight"], state[f"norm{i}.bias"]) for i in range(len(maps))]
    return [F.layer_norm(m, m.shape[-1:], w, b).permute(0, 3, 1, 2) for m, (w, b) in zip(maps, norms)]


def test_an_official_detection_backbone_loads_strictly_and_gives_its_maps(official) -> None:
    reference, state, path = official
    backbone = gcvit.create_backbone("gcvit_xxtiny", pretrained=str(path)).eval()
    assert backbone.cfg.window_size == (24, 24, 24, 24) and backbone.cfg.global_query_pools == (3, 2, 1, 0)
    assert backbone.out_channels == [64, 128, 256, 512] and set(backbone.state_dict()) == set(state)
    x = torch.randn(1, 3, 768, 768)
    with torch.no_grad():
        ours, expected = backbone(x), _reference_maps(reference, state, x)
    assert [tuple(m.shape) for m in ours] == [(1, 64, 192, 192), (1, 128, 96, 96), (1, 256, 48, 48), (1, 512, 24, 24)]
    for a, b in zip(ours, expected):
        assert (a - b).abs().max().item() < 1e-4


def test_a_detectors_checkpoint_gives_its_backbone(official, tmp_path: Path) -> None:
    _, state, _ = official
    for prefix in ("backbone.", "backbone.body."):  # mmdet's, torchvision's
        detector = {f"{prefix}{k}": v for k, v in state.items()} | {"rpn_head.conv.weight": torch.zeros(1)}
        torch.save({"state_dict": detector}, tmp_path / "det.pth")
        backbone = gcvit.create_backbone("gcvit_xxtiny", pretrained=str(tmp_path / "det.pth"))
        assert torch.equal(backbone.state_dict()["norm2.weight"], state["norm2.weight"])
    del state["norm3.bias"]
    torch.save(state, tmp_path / "broken.pth")
    with pytest.raises(gcvit.CheckpointError, match=r"missing: norm3.bias"):
        gcvit.create_backbone("gcvit_xxtiny", pretrained=str(tmp_path / "broken.pth"))


def test_a_classification_checkpoint_is_fitted(tmp_path: Path) -> None:
    torch.manual_seed(0)
    classifier = randomize_(gcvit.create_model("gcvit_xxtiny"))
    path = gcvit.save_checkpoint(classifier, tmp_path / "cls.safetensors")
    torch.manual_seed(1)
    backbone = gcvit.create_backbone("gcvit_xxtiny", pretrained=str(path))
    own, theirs = backbone.state_dict(), classifier.state_dict()
    key = "levels.2.blocks.0.attn.relative_position_bias_table"
    assert theirs[key].shape == (27**2, 8) and own[key].shape == (47**2, 8)  # 14 -> 24: resized bicubically
    conv = "levels.0.q_global_gen.to_q_global.0.conv.0.weight"
    assert torch.equal(own[conv], theirs[conv]) and torch.equal(
        own["patch_embed.proj.weight"], theirs["patch_embed.proj.weight"]
    )
    assert torch.equal(own["norm0.weight"], torch.ones(64))  # fresh
    assert not any(k.startswith(("norm.", "head.")) for k in own)


def test_the_maps_at_other_sizes_do_not_depend_on_the_padding(monkeypatch: pytest.MonkeyPatch) -> None:
    import gcvit.models.gcvit as module

    torch.manual_seed(0)
    backbone = randomize_(gcvit.create_backbone("gcvit_xxtiny", window_size=8)).eval()
    x = torch.randn(1, 3, 200, 136)  # stage maps 50x34, 25x17, 13x9, 7x5: every one padded to multiples of 8
    assert [tuple(m.shape[2:]) for m in backbone(x)] == [(50, 34), (25, 17), (13, 9), (7, 5)]
    assert_padding_is_masked(backbone, x, module, monkeypatch.setattr)


def test_frozen_stages_and_out_indices() -> None:
    backbone = gcvit.create_backbone("gcvit_xxtiny", frozen_stages=1, out_indices=(1, 2), window_size=(8, 8, 8, 4))
    backbone.train()
    assert not backbone.patch_embed.training and not backbone.levels[0].training and backbone.levels[1].training
    frozen = [n for n, p in backbone.named_parameters() if not p.requires_grad]
    assert frozen and all(n.startswith(("patch_embed.", "levels.0.")) for n in frozen)
    assert all(p.requires_grad for n, p in backbone.named_parameters() if n.startswith("levels.1."))
    maps = backbone(torch.randn(2, 3, 64, 96))
    assert [tuple(m.shape) for m in maps] == [(2, 128, 8, 12), (2, 256, 4, 6)] and backbone.out_channels == [128, 256]
    assert not hasattr(backbone, "norm0") and hasattr(backbone, "norm1")
    assert backbone.no_weight_decay() and all(n.endswith("bias_table") for n in backbone.no_weight_decay())


def test_bad_arguments_are_named() -> None:
    with pytest.raises(ValueError, match="create_backbone builds GC ViT; got 'swin_tiny'"):
        gcvit.create_backbone("swin_tiny")
    with pytest.raises(ValueError, match=r"expected out_indices among 0..3, each once; got \(4,\)"):
        gcvit.create_backbone("gcvit_xxtiny", out_indices=(4,))
    with pytest.raises(ValueError, match="expected frozen_stages from -1"):
        gcvit.create_backbone("gcvit_xxtiny", frozen_stages=5)
    with pytest.raises(ValueError, match="unknown model"):
        gcvit.create_backbone("gcvit_tinyy")
    assert isinstance(gcvit.create_backbone("gcvit_nano"), GCViTBackbone)


def test_gradient_checkpointing_gives_the_same_gradients() -> None:
    torch.manual_seed(0)
    backbone = gcvit.create_backbone("gcvit_xxtiny", window_size=7, drop_path_rate=0.0)
    x = torch.randn(1, 3, 120, 100)

    def grads() -> dict[str, torch.Tensor]:
        backbone.zero_grad()
        sum((m.square().mean() for m in backbone(x)), torch.zeros(())).backward()
        return {n: p.grad.clone() for n, p in backbone.named_parameters() if p.grad is not None}

    plain = grads()
    backbone.set_grad_checkpointing(True)
    checkpointed = grads()
    assert plain.keys() == checkpointed.keys() and len(plain) > 100
    assert all(torch.allclose(plain[k], checkpointed[k], atol=1e-7, rtol=1e-5) for k in plain)


def test_a_folder_of_this_package_loads_with_its_own_query_pools(tmp_path: Path) -> None:
    torch.manual_seed(0)
    classifier = randomize_(gcvit.create_model("gcvit_nano"))  # the digits model: one query pool, in stage 0
    classifier.save_pretrained(tmp_path / "saved")
    backbone = gcvit.create_backbone("gcvit_nano", pretrained=tmp_path / "saved", window_size=8)
    assert backbone.cfg.global_query_pools == classifier.cfg.global_query_pools == (1, 0, 0, 0)
    mine = backbone.state_dict()
    shared = [
        k for k in classifier.state_dict() if not k.startswith(("norm.", "head.")) and "relative_position" not in k
    ]
    assert len(shared) > 50 and all(torch.equal(mine[k], classifier.state_dict()[k]) for k in shared)
    assert [m.shape[1] for m in backbone(torch.randn(1, 3, 96, 128))] == backbone.out_channels
    with pytest.raises(FileNotFoundError, match="holds no checkpoint"):
        gcvit.create_backbone("gcvit_nano", pretrained=tmp_path)


@pytest.mark.parametrize(("size", "masked"), [((768, 1536), False), ((200, 296), True)])
def test_the_official_backbones_maps_at_any_size(size: tuple[int, int], masked: bool) -> None:
    """Against NVIDIA's detection backbone re-implemented in plain modules (tests/models/official_detection_backbone):
    an official-format state dict loads strictly into both; at 768 x 1536 (no padding, a non-square query map
    resized to the window) the maps agree as they are; at a size that needs padding, with the official padded keys
    masked as ours are."""
    from tests.models.official_detection_backbone import OfficialDetectionBackbone

    torch.manual_seed(0)
    ours = randomize_(gcvit.create_backbone("gcvit_xxtiny", window_size=24)).eval()
    reference = OfficialDetectionBackbone(ours.cfg).eval()
    reference.load_state_dict(ours.state_dict(), strict=True)
    x = torch.randn(1, 3, *size)
    with torch.no_grad():
        mine, theirs = ours(x), reference(x, mask_padded_keys=masked)
    assert [m.shape for m in mine] == [t.shape for t in theirs]
    assert max((m - t).abs().max().item() for m, t in zip(mine, theirs)) < 1e-4
