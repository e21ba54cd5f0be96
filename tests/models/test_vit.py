"""ViT: timm equivalence, other sizes, the BatchNorm variant, random token masking, the model interface."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

import gcvit
from gcvit.models.vit import TokenBatchNorm, random_token_subset
from tests.conftest import assert_checkpointing_keeps_gradients, assert_loads_timm_checkpoint, randomize_

timm = pytest.importorskip("timm")

# a ViT for 32 px inputs: 4x4 patches, an 8x8 grid
SMALL = {"embed_dim": 32, "depth": 2, "num_heads": 2, "patch_size": 4, "num_classes": 10}


@pytest.mark.parametrize(
    "name",
    ["vit_tiny", "vit_small", "vit_base"],
)
def test_timm_checkpoint_gives_timm_logits(name: str, tmp_path: Path) -> None:
    assert_loads_timm_checkpoint(name, f"{name}_patch16_224", tmp_path)


def test_timm_224_checkpoint_loads_at_another_size(tmp_path: Path) -> None:
    """A 224 px checkpoint loads into a ViT built for 384 px: its position embedding is resized on load (reported),
    and the logits equal timm's own 384 px model filled from the same checkpoint; the 224 px model run on 384 px
    images (resized at run time) equals timm's with dynamic_img_size."""
    from timm.models.vision_transformer import checkpoint_filter_fn

    checkpoint = randomize_(timm.create_model("vit_tiny_patch16_224")).state_dict()
    path = tmp_path / "vit_tiny_224.pth"
    torch.save(checkpoint, path)
    reference = timm.create_model("vit_tiny_patch16_224", img_size=384).eval()
    reference.load_state_dict(checkpoint_filter_fn(dict(checkpoint), reference))
    model = gcvit.create_model("vit_tiny", img_size=384).eval()
    report = gcvit.load_checkpoint(model, path)
    assert report.resized == ["pos_embed: (1, 197, 192) -> (1, 577, 192)"]
    native = gcvit.create_model("vit_tiny").eval()
    gcvit.load_checkpoint(native, path)
    dynamic = timm.create_model("vit_tiny_patch16_224", dynamic_img_size=True).eval()
    dynamic.load_state_dict(checkpoint)
    x = torch.randn(2, 3, 384, 384)
    with torch.no_grad():
        assert (model(x) - reference(x)).abs().max().item() < 1e-4
        assert (native(x) - dynamic(x)).abs().max().item() < 1e-4


def test_timm_vit_with_other_parts_is_refused() -> None:
    sd = timm.create_model("vit_tiny_patch16_224", global_pool="avg", num_classes=0).state_dict()
    model = gcvit.create_model("vit_tiny")
    with pytest.raises(ValueError, match=r"expected a plain timm ViT .* \['fc_norm\.bias', 'fc_norm\.weight'\]"):
        gcvit.models.weights.load_state_dict_into(model, sd, "avg-pooled")


def test_other_sizes_resize_the_position_embedding() -> None:
    model = randomize_(gcvit.create_model("vit_tiny", img_size=64, **SMALL)).eval()
    assert model.pos_embed.shape == (1, 1 + 16 * 16, 32)
    x = torch.randn(2, 3, 96, 32)
    with torch.no_grad():
        tokens = model.forward_features(x)
        (feat,) = model.forward_intermediates(x)
        logits = model(x)
        single = torch.cat([model(x[i : i + 1]) for i in range(2)])
    assert tokens.shape == (2, 1 + 24 * 8, 32)
    assert feat.shape == (2, 32, 24, 8)  # NCHW at stride 4 (the patch size)
    assert torch.equal(feat.flatten(2).transpose(1, 2), tokens[:, 1:])
    assert model.feature_info == [{"num_chs": 32, "reduction": 4, "module": "norm"}]
    assert (single - logits).abs().max().item() < 1e-5
    assert torch.equal(model.forward_head(tokens, pre_logits=True), tokens[:, 0])
    with pytest.raises(ValueError, match=r"multiples of the patch size 4; got \(34, 32\)"):
        model(torch.randn(1, 3, 34, 32))


def test_batchnorm_variant() -> None:
    model = randomize_(gcvit.create_model("vit_tiny", img_size=32, norm_layer="bn", **SMALL))
    norms = [m for m in model.modules() if isinstance(m, (TokenBatchNorm, torch.nn.LayerNorm))]
    assert len(norms) == 2 * 2 + 1 and all(isinstance(m, TokenBatchNorm) for m in norms)
    assert "blocks.0.norm1.running_mean" in model.state_dict()
    x = torch.randn(4, 3, 32, 32)
    model.train()
    with torch.no_grad():
        batch = model(x)
        alone = model(x[:1])
    assert (batch[:1] - alone).abs().max().item() > 1e-3  # training: statistics of the batch
    assert model.norm.num_batches_tracked.item() == 2
    model.eval()
    with torch.no_grad():
        batch = model(x)
        alone = model(x[:1])
    assert (batch[:1] - alone).abs().max().item() < 1e-5  # eval: running statistics
    with pytest.raises(ValueError, match=r"norm_layer must be one of \('ln', 'bn'\); got 'rms'"):
        gcvit.create_model("vit_tiny", norm_layer="rms")


def test_token_masking_in_training_only() -> None:
    model = randomize_(gcvit.create_model("vit_tiny", img_size=32, mask_ratio=0.25, **SMALL))
    plain = gcvit.create_model("vit_tiny", img_size=32, **SMALL)
    plain.load_state_dict(model.state_dict())
    x = torch.randn(3, 3, 32, 32)
    model.train()
    plain.train()
    with torch.no_grad():
        first, second = model.forward_features(x), model.forward_features(x)
        unmasked = plain.forward_features(x)
    assert first.shape == (3, 1 + 48, 32)  # 64 patch tokens, 16 dropped, plus the class token
    assert unmasked.shape == (3, 1 + 64, 32)
    assert (first - second).abs().max().item() > 1e-3  # a new random subset every call
    model.eval()
    plain.eval()
    with torch.no_grad():
        a, b, ref = model(x), model(x), plain(x)
    assert torch.equal(a, b) and torch.equal(a, ref)  # eval: every token, deterministic
    with pytest.raises(ValueError, match=r"mask_ratio must be in \[0, 1\); got 1.0"):
        gcvit.create_model("vit_tiny", mask_ratio=1.0)


def test_random_token_subset_keeps_distinct_tokens_in_order() -> None:
    x = torch.arange(2 * 10, dtype=torch.float32).view(2, 10, 1).expand(2, 10, 3)  # token i holds its index
    kept = random_token_subset(x, 6)
    assert kept.shape == (2, 6, 3)
    for b in range(2):
        ids = kept[b, :, 0] - 10 * b
        assert ids.unique().numel() == 6 and torch.all(ids[1:] > ids[:-1])
        assert torch.equal(kept[b, :, 0], kept[b, :, 2])
    torch.manual_seed(1)
    picks = {tuple((random_token_subset(x, 6)[0, :, 0]).tolist()) for _ in range(5)}
    assert len(picks) > 1


def test_training_step_and_gradient_checkpointing() -> None:
    model = randomize_(gcvit.create_model("vit_tiny", img_size=32, drop_path_rate=0.0, **SMALL))
    x, y = torch.randn(2, 3, 32, 32), torch.tensor([1, 2])
    assert_checkpointing_keeps_gradients(model, x, y)
    assert model.no_weight_decay() == {"pos_embed", "cls_token"}
    model.reset_classifier(0)
    assert isinstance(model.head, torch.nn.Identity) and model(x).shape == (2, 32)


def test_registry_names() -> None:
    assert gcvit.list_models("vit_*") == ["vit_base", "vit_small", "vit_tiny"]
    with pytest.raises(ValueError, match=r"unknown model 'vit_smal'; did you mean vit_small"):
        gcvit.create_model("vit_smal")
    with torch.device("meta"):
        model = gcvit.create_model("vit_small")
    assert isinstance(model, gcvit.VisionTransformer) and model.cfg.embed_dim == 384 and model.cfg.num_heads == 6


def test_demo_runs_a_vit_on_the_photos_cropped_to_its_patch_grid(capsys: pytest.CaptureFixture[str]) -> None:
    from gcvit.cli import main

    assert main(["demo", "--model", "vit_tiny", "--pretrained", "false"]) == 0  # 'false': random weights
    out = capsys.readouterr().out
    assert "windows global attention" in out and "own size (416, 640)" in out and "(random weights" in out


def test_feature_info_module_outputs_the_map() -> None:
    """The module `feature_info` names outputs the normalised tokens whose patch part is forward_intermediates' map."""
    model = gcvit.create_model("vit_tiny", img_size=32, patch_size=4, depth=2, num_classes=3).eval()
    (info,) = model.feature_info
    seen = []
    model.get_submodule(info["module"]).register_forward_hook(lambda m, i, o: seen.append(o))
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        model(x)
        (feat,) = model.forward_intermediates(x)
    tokens = seen[0][:, 1:]  # (B, L, C) without the class token
    assert torch.equal(tokens.transpose(1, 2).reshape(feat.shape), feat)
