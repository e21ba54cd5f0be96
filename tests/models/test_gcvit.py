"""The GC ViT model: structure, parameter counts, any input size, batching, padding, training features, errors."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

import gcvit
from gcvit.flops import count_macs
from gcvit.layers import WindowAttention, WindowAttentionGlobal, padding_key_mask, window_partition, window_reverse
from gcvit.models import VARIANTS
from gcvit.models.pretrained import PRETRAINED
from tests.conftest import assert_padding_is_masked

# Parameter counts of GCVIT_SPEC.md (millions); the 384/512 large models carry larger bias tables.
PARAMS_M = {
    "gcvit_xxtiny": 12.00,
    "gcvit_xtiny": 19.98,
    "gcvit_tiny": 28.22,
    "gcvit_tiny2": 34.54,
    "gcvit_small": 51.09,
    "gcvit_small2": 68.62,
    "gcvit_base": 90.32,
    "gcvit_large": 202.08,
    "gcvit_large.in21k_ft_in1k": 202.08,
    "gcvit_large.in21k_ft_in1k_384": 202.86,
    "gcvit_large.in21k_ft_in1k_512": 203.80,
}
ALL_ARCHS = [a for a in VARIANTS if a in PRETRAINED]  # the official variants (the small ones have no weights)
SMALL_ARCHS = ["gcvit_xxtiny", "gcvit_xtiny", "gcvit_tiny"]
LARGE_TAGS = ["gcvit_large.in21k_ft_in1k_384", "gcvit_large.in21k_ft_in1k_512"]


@pytest.mark.parametrize("name", list(PARAMS_M))
def test_parameter_count(name: str) -> None:
    with torch.device("meta"):
        model = gcvit.create_model(name)
    assert round(sum(p.numel() for p in model.parameters()) / 1e6, 2) == PARAMS_M[name]


@pytest.mark.parametrize(
    "name, gmacs",
    [("gcvit_xxtiny", 2.12), ("gcvit_xtiny", 2.91), ("gcvit_tiny", 4.76), ("gcvit_small", 8.53), ("gcvit_base", 14.82)],
)
def test_macs_match_the_counted_ones(name: str, gmacs: float) -> None:
    """The spec's counts of timm's port at 224 (torch's FLOP counter, multiply-adds)."""
    with torch.device("meta"):
        model = gcvit.create_model(name)
    assert round(count_macs(model, (224, 224)) / 1e9, 2) == gmacs


def test_macs_follow_the_input_channels() -> None:
    """Only the stem's 3x3 conv (stride 2, to 64 channels at 112x112) sees the input channels."""
    with torch.device("meta"):
        rgb, gray = (gcvit.create_model("gcvit_xxtiny", in_chans=c) for c in (3, 1))
    assert count_macs(rgb, (224, 224)) - count_macs(gray, (224, 224)) == 112 * 112 * 64 * 9 * 2


def test_list_models() -> None:
    names = gcvit.list_models()
    for arch in ALL_ARCHS:
        assert arch in names and f"{arch}.in1k" in names
    assert gcvit.list_models("gcvit_large.in21k*") == [
        "gcvit_large.in21k_ft_in1k",
        "gcvit_large.in21k_ft_in1k_384",
        "gcvit_large.in21k_ft_in1k_512",
    ]


def test_large_tags_carry_their_own_geometry() -> None:
    with torch.device("meta"):
        m384 = gcvit.create_model("gcvit_large.in21k_ft_in1k_384")
        m512 = gcvit.create_model("gcvit_large.in21k_ft_in1k_512")
    assert m384.cfg.window_size == (12, 12, 24, 12) and m384.cfg.img_size == (384, 384)
    assert m512.cfg.window_size == (16, 16, 32, 16) and m512.cfg.img_size == (512, 512)
    assert m384.pretrained_cfg.crop_mode == "squash" and m384.pretrained_cfg.url.endswith("gcvit_21k_large_384.pth.tar")
    assert m384.cfg.pools == (3, 2, 0, 0) == m512.cfg.pools


def test_official_key_names() -> None:
    keys = list(gcvit.create_model("gcvit_xxtiny").state_dict())
    assert len(keys) == 238
    for key in [
        "patch_embed.proj.bias",
        "patch_embed.conv_down.norm1.weight",
        "patch_embed.conv_down.conv.0.weight",
        "patch_embed.conv_down.conv.2.fc.0.weight",
        "patch_embed.conv_down.conv.2.fc.2.weight",
        "patch_embed.conv_down.conv.3.weight",
        "patch_embed.conv_down.reduction.weight",
        "levels.0.q_global_gen.to_q_global.2.conv.3.weight",
        "levels.2.q_global_gen.to_q_global.0.conv.0.weight",
        "levels.1.blocks.1.attn.relative_position_bias_table",
        "levels.1.blocks.1.attn.relative_position_index",
        "levels.2.downsample.norm2.bias",
        "levels.3.blocks.1.mlp.fc2.weight",
        "norm.weight",
        "head.bias",
    ]:
        assert key in keys, key
    assert not any(k.startswith("levels.3.downsample") for k in keys)
    assert not any(k.startswith("levels.0.q_global_gen.to_q_global.3") for k in keys)
    small = gcvit.create_model("gcvit_small").state_dict()
    assert "levels.0.blocks.0.gamma1" in small and "levels.0.blocks.0.gamma2" in small


def test_local_and_global_blocks_alternate() -> None:
    model = gcvit.create_model("gcvit_xxtiny")
    kinds = [type(b.attn) for b in model.levels[2].blocks]
    assert kinds == [WindowAttention, WindowAttentionGlobal] * 3
    assert model.levels[0].blocks[1].attn.qkv.out_features == 2 * 64


def _batched_vs_single(model: torch.nn.Module, size: tuple[int, int], batch: int = 3) -> float:
    x = torch.randn(batch, 3, *size)
    with torch.no_grad():
        together = model(x)
        apart = torch.cat([model(x[i : i + 1]) for i in range(batch)])
    return (together - apart).abs().max().item()


@pytest.mark.parametrize("name", ALL_ARCHS)
def test_batch_equals_one_image_at_a_time(name: str) -> None:
    from tests.conftest import randomize_

    model = randomize_(gcvit.create_model(name)).eval()
    for size in [(224, 224), (200, 320), (96, 96)]:
        assert _batched_vs_single(model, size) < 1e-4, size


@pytest.mark.slow
@pytest.mark.parametrize("name", LARGE_TAGS)
def test_batch_equals_one_image_at_a_time_large_tags(name: str) -> None:
    model = gcvit.create_model(name).eval()
    for size in [model.cfg.img_size, (200, 320), (96, 96)]:
        assert _batched_vs_single(model, size, batch=2) < 1e-4, size


def test_global_query_belongs_to_its_own_image() -> None:
    """Changing image 1 must not move image 0's logits (the batch-order bug of NVlabs #10 fails this)."""
    model = gcvit.create_model("gcvit_xxtiny").eval()
    x = torch.randn(2, 3, 224, 224)
    y = x.clone()
    y[1] = torch.randn(3, 224, 224)
    with torch.no_grad():
        assert torch.allclose(model(x)[0], model(y)[0], atol=1e-5)


def _forward_backward(model: torch.nn.Module, size: tuple[int, int]) -> None:
    x = torch.randn(2, 3, *size)
    out = model(x)
    assert out.shape == (2, model.num_classes)
    out.logsumexp(-1).mean().backward()
    grads = [p.grad for p in model.parameters() if p.requires_grad]
    assert all(g is not None and torch.isfinite(g).all() for g in grads)
    model.zero_grad(set_to_none=True)


SIZES = [(224, 224), (256, 256), (384, 384), (192, 288)]


@pytest.mark.parametrize("name", SMALL_ARCHS)
def test_forward_backward_and_pretrained_at_many_sizes(name: str, tmp_path) -> None:
    from tests.conftest import save_official

    ckpt = save_official(gcvit.create_model(name), tmp_path / "official.pth.tar")
    for size in SIZES:
        model = gcvit.create_model(name, pretrained=ckpt, img_size=size)
        assert model.cfg.img_size == size and model.pretrained_cfg.img_size == size
        _forward_backward(model, size)


@pytest.mark.slow
@pytest.mark.parametrize("name", [n for n in ALL_ARCHS if n not in SMALL_ARCHS] + LARGE_TAGS)
def test_forward_backward_and_pretrained_at_many_sizes_big(name: str, tmp_path) -> None:
    test_forward_backward_and_pretrained_at_many_sizes(name, tmp_path)


def test_feature_pyramid_and_info() -> None:
    model = gcvit.create_model("gcvit_xxtiny").eval()
    for H, W in [(224, 224), (200, 320), (33, 47)]:
        with torch.no_grad():
            feats = model.forward_intermediates(torch.randn(2, 3, H, W))
        assert len(feats) == 4
        for f, info in zip(feats, model.feature_info):
            r = info["reduction"]
            assert f.shape == (2, info["num_chs"], -(-H // r), -(-W // r))
    assert [i["num_chs"] for i in model.feature_info] == [64, 128, 256, 512]
    assert [i["reduction"] for i in model.feature_info] == [4, 8, 16, 32]
    x = torch.randn(1, 3, 224, 224)
    with torch.no_grad():
        last = model.forward_intermediates(x)[-1]
        assert torch.equal(last, model.forward_features(x))


@pytest.mark.parametrize("name", ["gcvit_xxtiny", "swin_tiny"])
def test_feature_info_modules_output_the_pyramid(name: str) -> None:
    """Hook-based feature extractors read `feature_info[i]["module"]`: that module's output (NHWC) is the pyramid's
    map i, before any downsampling (GC ViT's stages end with theirs)."""
    model = gcvit.create_model(name, img_size=64).eval()
    seen = {}
    for info in model.feature_info:
        module = model.get_submodule(info["module"])
        module.register_forward_hook(lambda m, i, o, key=info["module"]: seen.setdefault(key, o))
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        model(x)
        feats = model.forward_intermediates(x)
    for info, f in zip(model.feature_info, feats):
        assert torch.equal(seen[info["module"]].permute(0, 3, 1, 2), f), info


def test_other_stage_counts_build() -> None:
    """Three or five stages through create_model: the global query generators follow the new stages (the variant's
    four-stage pools used to be forced on them)."""
    three = gcvit.create_model("gcvit_xxtiny", depths=(2, 2, 6), num_heads=(2, 4, 8), window_size=(7, 7, 14))
    five = gcvit.create_model(
        "gcvit_xxtiny", depths=(1, 1, 1, 1, 1), num_heads=(2, 4, 8, 16, 32), window_size=(7, 7, 7, 7, 7)
    )
    assert three.cfg.pools == (3, 2, 0) and five.cfg.pools == (3, 2, 1, 0, 0)
    x = torch.randn(1, 3, 224, 224)
    with torch.no_grad():
        assert [f.shape[1:] for f in three.eval().forward_intermediates(x)] == [
            (64, 56, 56),
            (128, 28, 28),
            (256, 14, 14),
        ]
        assert five.eval()(x).shape == (1, 1000)


def test_padded_keys_are_masked_out() -> None:
    """Attention over a padded window equals attention over its real tokens only."""
    attn = WindowAttention(dim=32, num_heads=4, window_size=4).eval()
    H, W, ws = 6, 7, 4
    x = torch.randn(1, H, W, 32)
    padded = torch.nn.functional.pad(x, (0, 0, 0, 1, 0, 2))  # (1, 8, 8, 32)
    mask = padding_key_mask(H, W, ws, x.device, x.dtype)
    assert mask is not None and mask.shape == (4, 1, 1, 16)
    with torch.no_grad():
        out = window_reverse(attn(window_partition(padded, ws), None, mask), ws, 8, 8)[:, :H, :W]
        # reference: the bottom-right window holds real rows 4..5 and columns 4..6
        q = attn.qkv(x[:, 4:6, 4:7].reshape(1, 6, 32)).view(1, 6, 3, 4, 8).permute(2, 0, 3, 1, 4)
        rows, cols = torch.meshgrid(torch.arange(2), torch.arange(3), indexing="ij")
        idx = (rows * 4 + cols).flatten()  # positions of the real tokens inside the 4x4 window
        bias = attn.relative_position_bias()[0][:, idx][:, :, idx]
        ref = torch.softmax(q[0] @ q[1].transpose(-1, -2) * attn.scale + bias, -1) @ q[2]  # (1, heads, 6, hd)
        ref = attn.proj(ref.transpose(1, 2).reshape(1, 2, 3, 32))
    assert (out[:, 4:6, 4:7] - ref).abs().max().item() < 1e-5


def test_output_does_not_depend_on_padding_content(monkeypatch: pytest.MonkeyPatch) -> None:
    """Fill the padding with noise instead of zeros: the logits stay the same."""
    import gcvit.models.gcvit as module

    model = gcvit.create_model("gcvit_xxtiny").eval()
    x = torch.randn(2, 3, 96, 130)
    assert_padding_is_masked(model, x, module, monkeypatch.setattr)


def test_gradient_checkpointing_gives_same_gradients() -> None:
    model = gcvit.create_model("gcvit_xxtiny", drop_path_rate=0.0)
    x = torch.randn(2, 3, 96, 96)
    model(x).sum().backward()
    expected = {n: p.grad.clone() for n, p in model.named_parameters()}
    model.zero_grad()
    model.set_grad_checkpointing(True)
    model(x).sum().backward()
    for n, p in model.named_parameters():
        assert torch.allclose(p.grad, expected[n], atol=1e-5, rtol=1e-4), n


def test_drop_path_and_dropout_act_only_in_training() -> None:
    model = gcvit.create_model("gcvit_xxtiny", drop_path_rate=0.5, drop_rate=0.1, attn_drop_rate=0.1)
    x = torch.randn(2, 3, 64, 64)
    assert not torch.allclose(model(x), model(x))
    model.eval()
    with torch.no_grad():
        assert torch.equal(model(x), model(x))


def test_layer_scale_and_reset_classifier() -> None:
    model = gcvit.create_model("gcvit_small", layer_scale=0.5)
    assert torch.all(model.levels[1].blocks[0].gamma1 == 0.5)
    model.reset_classifier(7)
    assert model(torch.randn(1, 3, 64, 64)).shape == (1, 7)
    model.reset_classifier(0)
    assert model(torch.randn(1, 3, 64, 64)).shape == (1, 768)
    assert "levels.0.blocks.0.attn.relative_position_bias_table" in model.no_weight_decay()


@pytest.mark.parametrize(
    ("name", "kw"),
    [
        ("gcvit_xxtiny", {"depths": (1, 1, 2, 1)}),
        ("swin_tiny", {"depths": (1, 1, 2, 1)}),
        ("vit_tiny", {"patch_size": 8, "depth": 2}),
    ],
)
@pytest.mark.parametrize("grad", [True, False])
def test_torch_jit_trace_passes_its_check_and_reads_the_parameters(name: str, kw: dict, grad: bool) -> None:
    """torch.jit.trace re-traces under no_grad to check its graph: the graph must not depend on the grad mode or on
    kept copies. A traced model then follows new weights (the bias tables included: no gathered constant)."""
    import copy
    import warnings

    model = gcvit.create_model(name, img_size=64, **kw).eval()
    other = copy.deepcopy(model)
    for p in other.parameters():
        p.data.add_(torch.randn_like(p) * 0.05)
    x = torch.randn(2, 3, 64, 64)
    with warnings.catch_warnings(), torch.set_grad_enabled(grad):
        warnings.simplefilter("ignore", torch.jit.TracerWarning)
        model(x)  # a warm-up fills the kept copies, which the trace must not bake in
        traced = torch.jit.trace(model, x)
    with torch.no_grad():
        assert (traced(x) - model(x)).abs().max().item() < 1e-5
        traced.load_state_dict(other.state_dict())
        assert (traced(x) - other(x)).abs().max().item() < 1e-5


def test_torch_compile_full_graph_matches_eager() -> None:
    """The whole model traces into one graph (fullgraph=True fails on any graph break), with a dynamic batch."""
    model = gcvit.create_model("gcvit_xxtiny").eval()
    compiled = torch.compile(model, backend="aot_eager", fullgraph=True)
    with torch.no_grad(), torch._dynamo.config.patch(error_on_recompile=True):  # one graph for every batch size
        for batch in (2, 3, 5):
            x = torch.randn(batch, 3, 64, 64)
            torch._dynamo.mark_dynamic(x, 0)
            assert (compiled(x) - model(x)).abs().max().item() < 1e-5


def test_torch_compile_training_with_drop_path_is_one_graph() -> None:
    """In training, stochastic depth takes its mask form under compile (no shape that depends on a draw): one graph
    for forward and backward, with a dynamic batch."""
    torch._dynamo.reset()  # graphs of other tests' models share code objects with this one: not a recompile
    model = gcvit.create_model("gcvit_xxtiny", img_size=64, num_classes=10, drop_path_rate=0.5).train()
    compiled = torch.compile(model, backend="aot_eager", fullgraph=True)
    with torch._dynamo.config.patch(error_on_recompile=True):
        for batch in (4, 3):
            x = torch.randn(batch, 3, 64, 64)
            torch._dynamo.mark_dynamic(x, 0)
            compiled(x).pow(2).sum().backward()
    assert all(p.grad is not None for p in model.parameters())


@pytest.mark.slow
def test_torch_compile_inductor_matches_eager() -> None:
    model = gcvit.create_model("gcvit_xxtiny").eval()
    compiled = torch.compile(model)
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        assert (compiled(x) - model(x)).abs().max().item() < 1e-4


def test_unknown_model_names_close_matches() -> None:
    with pytest.raises(ValueError, match=r"unknown model 'gcvit_tinny'; did you mean gcvit_tiny"):
        gcvit.create_model("gcvit_tinny")
    with pytest.raises(ValueError, match=r"unknown model 'gcvit_tiny.in22k'"):
        gcvit.create_model("gcvit_tiny.in22k")
    with pytest.raises(TypeError, match=r"unknown override\(s\) \['windows'\]"):
        gcvit.create_model("gcvit_tiny", windows=(7, 7, 7, 7))


@pytest.mark.parametrize(
    ("x", "message"),
    [
        (torch.randn(3, 224, 224), r"expected a 4-D float tensor \(B, 3, H, W\); got \(3, 224, 224\)"),
        (torch.zeros(1, 3, 64, 64, dtype=torch.uint8), r"expected a 4-D float tensor .* torch.uint8"),
        (torch.randn(1, 1, 64, 64), r"expected 3 channels in dim 1 \(NCHW\); got shape \(1, 1, 64, 64\)"),
        (torch.randn(1, 3, 31, 64), r"expected H and W of at least 32 px; got \(31, 64\)"),
    ],
)
def test_bad_input_is_refused_clearly(x: torch.Tensor, message: str) -> None:
    model = gcvit.create_model("gcvit_xxtiny")
    with pytest.raises(ValueError, match=message):
        model(x)


def test_smallest_input_runs() -> None:
    model = gcvit.create_model("gcvit_xxtiny").eval()
    with torch.no_grad():
        assert torch.isfinite(model(torch.randn(2, 3, 32, 32))).all()


@pytest.mark.parametrize("name", ["gcvit_xxtiny", "swin_tiny", "vit_tiny"])
def test_empty_batch_gives_empty_outputs(name: str) -> None:
    """A batch of no images (the last shard of a filtered stream) gives empty logits and features of the right
    shapes, in inference and through a backward pass, at a padded size too; it used to fail in a reshape."""
    model = gcvit.create_model(name, img_size=64, num_classes=5)
    channels = [f["num_chs"] for f in model.feature_info]
    with torch.no_grad():
        for size in (64, 80):  # 80 px pads GC ViT and Swin windows
            assert model.eval()(torch.randn(0, 3, size, size)).shape == (0, 5)
            feats = model.forward_intermediates(torch.randn(0, 3, size, size))
            assert [tuple(f.shape[:2]) for f in feats] == [(0, c) for c in channels]
    x = torch.randn(0, 3, 64, 64, requires_grad=True)
    model.train()(x).sum().backward()
    assert x.grad.shape == x.shape and model.head.weight.grad is not None


@pytest.mark.parametrize("name", ["gcvit_xxtiny", "swin_tiny"])
def test_vmap_over_image_batches_equals_a_loop(name: str) -> None:
    """torch.func.vmap over a leading dimension of image batches (a stack of views, augmentations or crops) equals
    running each batch alone; the channels-last stem used to fail inside vmap."""
    from torch.func import vmap

    torch.manual_seed(0)
    model = gcvit.create_model(name, img_size=32, num_classes=10).eval()
    x = torch.randn(3, 2, 3, 32, 32)
    with torch.no_grad():
        out = vmap(model)(x)
        assert (out - torch.stack([model(xi) for xi in x])).abs().max().item() < 1e-4


@pytest.mark.parametrize(
    ("name", "overrides", "message"),
    [
        ("gcvit_xxtiny", {"num_classes": -1}, r"GCViTConfig.num_classes must be an integer >= 0; got -1"),
        ("gcvit_xxtiny", {"window_size": 7}, r"GCViTConfig.window_size must be a tuple of positive integers; got 7"),
        ("gcvit_xxtiny", {"window_size": (0, 7, 14, 7)}, r"window_size must be a tuple of positive integers"),
        ("gcvit_xxtiny", {"in_chans": 0}, r"GCViTConfig.in_chans must be a positive integer; got 0"),
        (
            "gcvit_xxtiny",
            {"depths": (1, 1)},
            r"GCViTConfig.num_heads needs one value per stage: depths=\(1, 1\) makes 2 stages; got \(2, 4, 8, 16\)",
        ),
        (
            "gcvit_xxtiny",
            {"global_query_pools": (1, 2)},
            r"global_query_pools needs one value per stage: depths=\(2, 2, 6, 2\) makes 4 stages; got \(1, 2\)",
        ),
        ("gcvit_xxtiny", {"global_query_pools": (0, -1, 0, 0)}, r"global_query_pools must be None or a tuple of int"),
        (
            "swin_tiny",
            {"window_size": (7, 7)},
            r"SwinConfig.window_size needs one value per stage: depths=\(2, 2, 6, 2\)",
        ),
        ("gcvit_xxtiny", {"drop_path_rate": -0.1}, r"GCViTConfig.drop_path_rate must be in \[0, 1\); got -0.1"),
        ("gcvit_xxtiny", {"img_size": 64.0}, r"expected img_size as an int or \(H, W\) of at least 32 px; got 64.0"),
        ("swin_tiny", {"mlp_ratio": 0}, r"SwinConfig.mlp_ratio must be positive; got 0"),
        ("vit_tiny", {"mlp_ratio": 0.001}, r"ViTConfig.mlp_ratio must be at least 1 / embed_dim \(192\); got 0.001"),
        ("swin_tiny", {"img_size": 34}, r"SwinConfig.img_size must be a multiple of patch_size 4; got \(34, 34\)"),
        ("vit_tiny", {"patch_size": 0}, r"ViTConfig.patch_size must be a positive integer; got 0"),
    ],
)
def test_bad_config_values_name_the_field(name: str, overrides: dict, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        gcvit.create_model(name, **overrides)


def test_models_command_lists_an_architecture_asked_for_by_name(capsys: pytest.CaptureFixture[str]) -> None:
    from gcvit.cli import main

    assert main(["models", "gcvit_xxtiny"]) == 0
    rows = [line.split()[0] for line in capsys.readouterr().out.splitlines()[2:] if line.strip()]
    assert rows[0] == "gcvit_xxtiny"


def test_a_folder_given_as_a_checkpoint_is_named(tmp_path: Path) -> None:
    with pytest.raises(IsADirectoryError, match="is a folder"):
        gcvit.create_model("gcvit_xxtiny", pretrained=tmp_path)
