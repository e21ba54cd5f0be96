"""Swin Transformer: timm equivalence, the shifted-window mask, other input sizes, the model interface."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import torch

import gcvit
from gcvit.models.swin import SwinBlock, SwinConfig, shifted_window_mask, window_shift
from tests.conftest import (
    assert_checkpointing_keeps_gradients,
    assert_loads_timm_checkpoint,
    assert_padding_is_masked,
    assert_same_logits,
    randomize_,
)

timm = pytest.importorskip("timm")

# a small Swin with shifted windows in both stages (maps 16 and 8 at 64 px, windows of 4)
SMALL = {"embed_dim": 16, "depths": (2, 2), "num_heads": (1, 2), "window_size": (4, 4), "num_classes": 10}


def _timm_small() -> torch.nn.Module:
    from timm.models.swin_transformer import SwinTransformer

    return SwinTransformer(
        img_size=64, patch_size=4, window_size=4, embed_dim=16, depths=(2, 2), num_heads=(1, 2), num_classes=10
    )


@pytest.mark.parametrize(
    "name",
    [
        "swin_tiny",
        "swin_small",
        "swin_base",
    ],
)
def test_timm_checkpoint_gives_timm_logits(name: str, tmp_path: Path) -> None:
    assert_loads_timm_checkpoint(name, f"{name}_patch4_window7_224", tmp_path)


def test_small_swin_with_shifts_in_every_stage_matches_timm() -> None:
    reference = randomize_(_timm_small()).eval()
    model = gcvit.create_model("swin_tiny", img_size=64, **SMALL).eval()
    gcvit.models.weights.load_state_dict_into(model, reference.state_dict(), "timm")
    assert_same_logits(model, reference, 64)


def test_microsoft_checkpoint_layout_converts() -> None:
    """Microsoft's release merges patches at the end of a stage and names the head `head`."""
    reference = randomize_(_timm_small()).eval()
    ms = {}
    for key, value in reference.state_dict().items():
        key = re.sub(r"^layers\.(\d+)\.downsample\.", lambda m: f"layers.{int(m[1]) - 1}.downsample.", key)
        ms[key.replace("head.fc.", "head.")] = value
    ms["layers.0.blocks.1.attn_mask"] = torch.zeros(16, 16, 16)
    ms["layers.0.blocks.0.attn.relative_position_index"] = torch.zeros(16, 16, dtype=torch.long)
    model = gcvit.create_model("swin_tiny", img_size=64, **SMALL).eval()
    report = gcvit.models.weights.load_state_dict_into(model, ms, "microsoft")
    assert report.format == "microsoft"
    assert_same_logits(model, reference, 64)


def test_mismatched_checkpoint_names_the_keys() -> None:
    reference = _timm_small()
    sd = {k: v for k, v in reference.state_dict().items() if not k.startswith("layers.1.downsample.norm")}
    model = gcvit.create_model("swin_tiny", img_size=64, **SMALL)
    with pytest.raises(gcvit.CheckpointError, match=r"2 missing: layers\.1\.downsample\.norm\.weight"):
        gcvit.models.weights.load_state_dict_into(model, sd, "cut")


def _block(shifted: bool) -> SwinBlock:
    cfg = SwinConfig(embed_dim=8, depths=(2,), num_heads=(2,), window_size=(4,), drop_path_rate=0.0)
    return randomize_(SwinBlock(8, 2, 4, shifted, cfg, 0.0), scale=0.2).eval()


def _out_at(block: SwinBlock, x: torch.Tensor, mask: torch.Tensor | None, shift: tuple[int, int]) -> torch.Tensor:
    with torch.no_grad():
        return block(x, shift, mask)[0, 0, 0]  # token (0, 0)


def test_shifted_window_mask_isolates_wrapped_tokens() -> None:
    """On an 8x8 map with 4x4 windows shifted by 2, token (0, 0) shares its window with the tokens that wrapped
    around from rows/columns 6-7, but attends only to rows 0-1 x columns 0-1."""
    block = _block(shifted=True)
    shift = window_shift(8, 8, 4, shifted=True)
    assert shift == (2, 2)
    mask = shifted_window_mask(8, 8, 4, shift, torch.device("cpu"), torch.float32)
    x = torch.randn(1, 8, 8, 8)
    base = _out_at(block, x, mask, shift)
    outside = [(6, 6), (0, 7), (7, 1), (3, 3), (2, 0)]  # same shifted window (first three) or another window
    inside = [(1, 1), (0, 1), (1, 0)]
    for (r, c), changes in [(p, False) for p in outside] + [(p, True) for p in inside]:
        y = x.clone()
        y[0, r, c] += 5.0 * torch.randn(8)  # not a constant: LayerNorm would remove it
        diff = (_out_at(block, y, mask, shift) - base).abs().max().item()
        assert (diff > 1e-3) if changes else (diff == 0.0), ((r, c), diff)
    # without the mask the wrapped-around token (6, 6) would leak into token (0, 0)
    y = x.clone()
    y[0, 6, 6] += 5.0 * torch.randn(8)
    assert (_out_at(block, y, None, shift) - _out_at(block, x, None, shift)).abs().max().item() > 1e-3


def test_regular_window_block_sees_exactly_its_window() -> None:
    block = _block(shifted=False)
    x = torch.randn(1, 8, 8, 8)
    base = _out_at(block, x, None, (0, 0))
    for (r, c), changes in [((3, 3), True), ((0, 3), True), ((4, 4), False), ((0, 4), False), ((7, 7), False)]:
        y = x.clone()
        y[0, r, c] += 5.0 * torch.randn(8)  # not a constant: LayerNorm would remove it
        diff = (_out_at(block, y, None, (0, 0)) - base).abs().max().item()
        assert (diff > 1e-3) if changes else (diff == 0.0), ((r, c), diff)


def test_mask_counts() -> None:
    mask = shifted_window_mask(8, 8, 4, (2, 2), torch.device("cpu"), torch.float32)
    allowed = (mask == 0).sum((1, 2, 3)).tolist()  # per window, of 16 x 16 pairs
    assert allowed == [256, 2 * 64, 2 * 64, 4 * 16]  # 1, 2, 2 and 4 regions of equal size
    assert shifted_window_mask(8, 8, 4, (0, 0), torch.device("cpu"), torch.float32) is None
    pad = shifted_window_mask(5, 5, 4, (0, 0), torch.device("cpu"), torch.float32)
    assert pad is not None and pad.shape == (4, 1, 16, 16)
    assert (pad[3, 0, 0] == 0).sum().item() == 1  # real token (4, 4) sees only itself in its padded window
    assert window_shift(7, 7, 7, shifted=True) == (0, 0)  # one window: no shift (timm and the official code)


def test_output_does_not_depend_on_padding_content(monkeypatch: pytest.MonkeyPatch) -> None:
    import gcvit.models.swin as module

    model = gcvit.create_model("swin_tiny", img_size=64, **SMALL | {"window_size": (3, 3)}).eval()
    x = torch.randn(2, 3, 64, 96)  # maps 16x24 and 8x12: padded to multiples of 3
    assert_padding_is_masked(model, x, module, monkeypatch.setattr)


def test_other_sizes_pyramid_and_interface() -> None:
    model = gcvit.create_model("swin_tiny", embed_dim=24, num_classes=5).eval()
    x = torch.randn(2, 3, 96, 160)  # stage maps 24x40, 12x20, 6x10, 3x5: padding to 7 everywhere
    with torch.no_grad():
        feats = model.forward_intermediates(x)
        logits = model(x)
        single = torch.cat([model(x[i : i + 1]) for i in range(2)])
    assert [tuple(f.shape) for f in feats] == [(2, 24, 24, 40), (2, 48, 12, 20), (2, 96, 6, 10), (2, 192, 3, 5)]
    assert [i["reduction"] for i in model.feature_info] == [4, 8, 16, 32]
    assert [i["num_chs"] for i in model.feature_info] == [f.shape[1] for f in feats]
    assert logits.shape == (2, 5) and torch.isfinite(logits).all()
    assert (single - logits).abs().max().item() < 1e-4
    with torch.no_grad():
        pooled = model.forward_head(model.forward_features(x), pre_logits=True)
    assert pooled.shape == (2, 192)
    assert all(n.endswith("relative_position_bias_table") for n in model.no_weight_decay())
    assert len(model.no_weight_decay()) == sum(model.cfg.depths)
    model.reset_classifier(3)
    assert model.head.weight.shape == (3, 192) and model.num_classes == 3
    with pytest.raises(ValueError, match=r"multiples of the patch size 4 \(any multiple of 32 works\); got \(66, 64\)"):
        model(torch.randn(1, 3, 66, 64))


def test_training_step_and_gradient_checkpointing() -> None:
    model = randomize_(gcvit.create_model("swin_tiny", img_size=64, **SMALL | {"drop_path_rate": 0.0}))
    x, y = torch.randn(2, 3, 64, 64), torch.tensor([1, 2])
    assert_checkpointing_keeps_gradients(model, x, y)


def test_registry_names_and_errors() -> None:
    assert gcvit.list_models("swin_*") == ["swin_base", "swin_small", "swin_tiny"]
    with pytest.raises(ValueError, match=r"unknown model 'swin_tiyn'; did you mean swin_tiny"):
        gcvit.create_model("swin_tiyn")
    with pytest.raises(TypeError, match=r"unknown override\(s\) \['depth'\]; expected fields of SwinConfig"):
        gcvit.create_model("swin_tiny", depth=3)
    with torch.device("meta"):
        model = gcvit.create_model("swin_small", num_classes=7)
    assert isinstance(model, gcvit.SwinTransformer) and model.num_classes == 7
    assert model.pretrained_cfg.num_classes == 7 and model.pretrained_cfg.mean == (0.485, 0.456, 0.406)
    assert model.cfg.depths == (2, 2, 18, 2)
