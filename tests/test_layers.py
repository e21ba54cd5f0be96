"""Layers with two routes (a fused kernel where it pays, plain PyTorch elsewhere) must agree on both."""

from __future__ import annotations

import copy

import pytest
import torch

from gcvit.layers import DropPath, FusedMBConv, WindowAttention, WindowAttentionGlobal, padding_key_mask
from gcvit.layers import attention as attention_module
from gcvit.layers.attention import _fused_kernel_pays
from gcvit.layers.fused import _onednn_pays, conv2d_gelu, linear


def _windows(B: int, nW: int, N: int, C: int, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    return torch.randn(B, nW, N, C, dtype=dtype)  # (B, nW, N, C)


@pytest.fixture(params=["per_head", "batched"])
def plain_route(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> str:
    """Sends the plain (unfused) path head by head, or all heads batched, whatever the size."""
    monkeypatch.setattr(attention_module, "_PER_HEAD_MIN_SCORES", 0 if request.param == "per_head" else 2**62)
    return request.param


@pytest.mark.parametrize("kind", ["local", "global"])
@pytest.mark.parametrize("padded", [False, True])
def test_plain_path_equals_fused_kernel_with_gradients(kind: str, padded: bool, plain_route: str) -> None:
    """Training on the CPU (the bias needs a gradient) takes the plain path, head by head or batched; it equals the
    fused kernel in outputs and in every gradient (input, global query, bias table), with and without the padding
    mask."""
    torch.manual_seed(0)
    B, ws, heads, C = 3, 4, 4, 32
    H, W = (6, 7) if padded else (8, 8)
    cls = WindowAttentionGlobal if kind == "global" else WindowAttention
    attn = cls(dim=C, num_heads=heads, window_size=ws)
    x = _windows(B, 4, ws * ws, C).requires_grad_()
    q_global = torch.randn(B, heads, ws * ws, C // heads, requires_grad=True)
    pad_mask = padding_key_mask(H, W, ws, x.device, x.dtype)
    assert (pad_mask is not None) == padded

    def run(fused: bool) -> tuple[torch.Tensor, ...]:
        attn.zero_grad()
        x.grad = q_global.grad = None
        table = attn.relative_position_bias_table
        table.requires_grad_(not fused)  # a bias without gradient lets the fused CPU kernel run
        out = attn(x, q_global, pad_mask)
        (out * torch.linspace(-1, 1, out.numel()).view_as(out)).sum().backward()
        table.requires_grad_(True)
        grads = [x.grad, q_global.grad if kind == "global" else torch.zeros(1)]
        return out.detach(), *grads

    table = attn.relative_position_bias_table
    table.requires_grad_(True)
    assert not _fused_kernel_pays(x, attn.relative_position_bias())
    plain = run(fused=False)
    # bias gradient of the plain path against autograd through PyTorch's reference (math) attention
    bias_grad = table.grad.clone()
    fused = run(fused=True)
    for a, b in zip(plain, fused):
        assert (a - b).abs().max().item() < 1e-5
    with torch.nn.attention.sdpa_kernel(torch.nn.attention.SDPBackend.MATH):
        attn.zero_grad()
        out = attn(x, q_global, pad_mask)  # the math backend returns the mask's gradient
        (out * torch.linspace(-1, 1, out.numel()).view_as(out)).sum().backward()
    assert bias_grad.abs().max() > 0
    assert (bias_grad - table.grad).abs().max().item() < 1e-6


def test_bf16_on_cpu_takes_the_plain_path_and_stays_close(plain_route: str) -> None:
    """bf16 on the CPU uses two bf16 matmuls (faster than the fused kernel for 49-token windows); its output stays
    within bf16 rounding of the fp32 result."""
    torch.manual_seed(0)
    attn = WindowAttention(dim=64, num_heads=2, window_size=7).eval()
    x = _windows(2, 4, 49, 64)
    with torch.no_grad():
        ref = attn(x)
        assert _fused_kernel_pays(x, attn.relative_position_bias())
        with torch.autocast("cpu", dtype=torch.bfloat16):
            low = attn(x)
            assert not _fused_kernel_pays(x.bfloat16(), attn.relative_position_bias())
    assert low.dtype == torch.bfloat16
    assert (low.float() - ref).abs().max().item() < 0.05 * ref.abs().max().item()


@pytest.mark.parametrize("gelu", [False, True])
def test_onednn_linear_equals_f_linear(gelu: bool) -> None:
    """Inference takes oneDNN's fused linear(+GELU) on the CPU; fp32 training its forward with F.linear's backward;
    values and gradients agree with F.linear."""
    torch.manual_seed(0)
    layer = torch.nn.Linear(64, 96)
    x = torch.randn(2, 5, 7, 64)  # any leading dims, as in (B, nW, N, C) windows
    ref = layer(x)
    ref = torch.nn.functional.gelu(ref) if gelu else ref
    with torch.no_grad():
        assert _onednn_pays(x, layer) == torch.backends.mkldnn.is_available()
        out = linear(x, layer, gelu=gelu)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            low = linear(x, layer, gelu=gelu)
    assert out.shape == ref.shape == (2, 5, 7, 96)
    assert (out - ref).abs().max().item() < 1e-5
    assert low.dtype == torch.bfloat16
    assert (low.float() - ref).abs().max().item() < 0.02 * ref.abs().max().item()
    assert not _onednn_pays(x, layer)  # grad mode with trainable weights: the training route (oneDNN forward)
    x.requires_grad_()
    weights = torch.linspace(-1, 1, ref.numel()).view_as(ref)
    plain = torch.nn.functional.linear(x, layer.weight, layer.bias)
    plain = torch.nn.functional.gelu(plain) if gelu else plain
    expected = torch.autograd.grad((plain * weights).sum(), [x, *layer.parameters()])
    out = linear(x, layer, gelu=gelu)
    assert out.grad_fn is not None and (out - ref).abs().max().item() < 1e-5
    for got, want in zip(torch.autograd.grad((out * weights).sum(), [x, *layer.parameters()]), expected):
        assert (got - want).abs().max().item() < 1e-5


def test_training_linear_supports_double_backward() -> None:
    """The oneDNN training route keeps F.linear's second derivatives (gradient penalties, Hessian-vector products)."""
    torch.manual_seed(0)
    layer = torch.nn.Linear(16, 8)
    x = torch.randn(4, 16, requires_grad=True)

    def hvp(f: object) -> list[torch.Tensor]:
        (gx,) = torch.autograd.grad(f(x).pow(2).sum(), x, create_graph=True)
        return torch.autograd.grad(gx.pow(2).sum(), [x, *layer.parameters()])

    got = hvp(lambda t: linear(t, layer))
    want = hvp(lambda t: torch.nn.functional.linear(t, layer.weight, layer.bias))
    for a, b in zip(got, want):
        assert b.abs().max() > 0 and (a - b).abs().max().item() < 1e-4 * b.abs().max().item()


@pytest.mark.parametrize("groups", [1, 16])
def test_onednn_conv_gelu_equals_conv_then_gelu(groups: int) -> None:
    torch.manual_seed(0)
    conv = torch.nn.Conv2d(16, 16, 3, 1, 1, groups=groups, bias=False)
    x = torch.randn(2, 16, 9, 11).contiguous(memory_format=torch.channels_last)
    ref = torch.nn.functional.gelu(conv(x))
    with torch.no_grad():
        out = conv2d_gelu(x, conv)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            low = conv2d_gelu(x, conv)
    assert out.shape == ref.shape and (out - ref).abs().max().item() < 1e-5
    assert low.dtype == torch.bfloat16 and (low.float() - ref).abs().max().item() < 0.02 * ref.abs().max().item()


@pytest.mark.parametrize("autocast", [False, True])
def test_prepared_weights_follow_in_place_updates(autocast: bool) -> None:
    """The packed (and, under autocast, bf16) copy of a weight kept for the fused kernel is refreshed when the weight
    changes in place (EMA, loading), and stays out of deepcopy and the state dict."""
    layer = torch.nn.Linear(8, 4)
    x = torch.randn(3, 8)
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
        before = linear(x, layer)
        layer.weight.mul_(2)
        layer.bias.zero_()
        after = linear(x, layer)
        assert (after.float() - layer(x).float()).abs().max().item() < 1e-5  # MKL and oneDNN round differently
        twin = copy.deepcopy(layer)  # an opaque oneDNN tensor in the module would make this raise
        assert torch.equal(linear(x, twin), after)
    assert not torch.equal(before, after)
    assert set(layer.state_dict()) == {"weight", "bias"}


@pytest.mark.parametrize("channels_last", [False, True])
def test_fused_mbconv_equals_its_modules_in_sequence(channels_last: bool) -> None:
    """x + pw(se(gelu(dw(x)))), the block as NVIDIA's modules define it, in outputs and in every gradient: the SE
    gate folded into per-image pointwise weights and the residual inside baddbmm change nothing but rounding."""
    torch.manual_seed(0)
    block = FusedMBConv(16)
    x = torch.randn(3, 16, 9, 11)
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    dw, gelu, se, pw = block

    def grads(out: torch.Tensor) -> list[torch.Tensor]:
        weights = torch.linspace(-1, 1, out.numel()).view_as(out)
        return torch.autograd.grad((out * weights).sum(), [x, *block.parameters()])

    x.requires_grad_()
    ref = x + pw(se(gelu(dw(x))))
    out = block(x)
    assert out.shape == ref.shape == (3, 16, 9, 11)
    assert (out - ref).abs().max().item() < 1e-5
    for a, b in zip(grads(out), grads(ref)):
        assert b.abs().max() > 0 and (a - b).abs().max().item() < 1e-5
    with torch.no_grad():  # inference: the fused depthwise kernel; bf16 takes the SE mean as a sum
        assert (block(x) - ref).abs().max().item() < 1e-5
        with torch.autocast("cpu", dtype=torch.bfloat16):
            low = block(x)
    assert low.dtype == torch.bfloat16
    assert (low.float() - ref).abs().max().item() < 0.02 * ref.abs().max().item()


def _drop_path_run(model: torch.nn.Module, x: torch.Tensor, keep: list[bool], monkeypatch: pytest.MonkeyPatch):
    """Output and parameter gradients of one training forward and backward with every DropPath drawing `keep`."""
    monkeypatch.setattr(DropPath, "draw", lambda self, batch: torch.tensor(keep))
    model.zero_grad(set_to_none=True)
    out = model(x)
    out.pow(2).sum().backward()
    return out.detach(), {n: p.grad for n, p in model.named_parameters()}


def _skip_and_mask_forms(name: str, size: int) -> tuple[torch.nn.Module, torch.nn.Module]:
    """A 10-class model in training mode with drop path 0.4, and a copy whose DropPaths run the mask form."""
    import gcvit

    torch.manual_seed(0)
    model = gcvit.create_model(name, img_size=size, num_classes=10, drop_path_rate=0.4).train()
    reference = copy.deepcopy(model)
    for module in reference.modules():
        if isinstance(module, DropPath):
            module.skip_dropped = False
    return model, reference


@pytest.mark.parametrize(
    "name, size", [("gcvit_xxtiny", 112), ("gcvit_xxtiny", 64), ("swin_tiny", 72), ("vit_tiny", 32)]
)
@pytest.mark.parametrize("keep", [[True, False, True], [False, False, False], [True, True, True]])
def test_drop_path_skipping_dropped_images_equals_the_mask_form(
    name: str, size: int, keep: list[bool], monkeypatch: pytest.MonkeyPatch
) -> None:
    """With the same draw, running each residual branch on the kept images alone gives the outputs and gradients of
    the textbook form (branch on every image, times mask / (1 - p)), padded maps (64, 72 px) included; when every
    image is dropped, every parameter still gets a gradient (zero for the branches)."""
    model, reference = _skip_and_mask_forms(name, size)
    x = torch.randn(3, 3, size, size)
    out, grads = _drop_path_run(model, x, keep, monkeypatch)
    ref_out, ref_grads = _drop_path_run(reference, x, keep, monkeypatch)
    assert (out - ref_out).abs().max().item() < 1e-4
    for n, g in ref_grads.items():
        assert grads[n] is not None, n
        assert torch.allclose(grads[n], g, atol=1e-5, rtol=1e-3), n


@pytest.mark.parametrize("name, size", [("gcvit_xxtiny", 64), ("swin_tiny", 72), ("vit_tiny", 32)])
def test_drop_path_under_bf16_autocast_equals_the_mask_form(
    name: str, size: int, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Under autocast a branch returns bf16 while the residual stream may be fp32: the kept rows are added with the
    dtype x + y would have, as in the mask form."""
    model, reference = _skip_and_mask_forms(name, size)
    x = torch.randn(3, 3, size, size)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out, grads = _drop_path_run(model, x, [True, False, True], monkeypatch)
        ref_out, ref_grads = _drop_path_run(reference, x, [True, False, True], monkeypatch)
    assert out.dtype == ref_out.dtype
    assert (out.float() - ref_out.float()).abs().max().item() < 0.05 * ref_out.float().abs().max().item()
    for n, g in ref_grads.items():
        assert grads[n] is not None and grads[n].dtype == g.dtype, n


def test_drop_path_runs_the_branch_on_kept_images_only(monkeypatch: pytest.MonkeyPatch) -> None:
    import gcvit

    model = gcvit.create_model("gcvit_xxtiny", img_size=64, num_classes=10, drop_path_rate=0.4).train()
    seen: list[int] = []
    model.levels[0].blocks[1].mlp.register_forward_hook(lambda m, args, out: seen.append(args[0].shape[0]))
    monkeypatch.setattr(DropPath, "draw", lambda self, batch: torch.tensor([False, True, False, True]))
    model(torch.randn(4, 3, 64, 64))
    assert seen == [2]
    model.eval()
    model(torch.randn(4, 3, 64, 64))  # no stochastic depth in eval mode
    assert seen == [2, 4]


def test_drop_path_replays_its_draw_under_gradient_checkpointing() -> None:
    """Checkpointing re-runs each block in the backward pass; the CPU generator it restores gives the same draw."""
    import gcvit

    model = gcvit.create_model("gcvit_xxtiny", img_size=64, num_classes=10, drop_path_rate=0.5).train()
    x = torch.randn(4, 3, 64, 64)
    grads = []
    for checkpointing in (False, True):
        model.set_grad_checkpointing(checkpointing)
        model.zero_grad(set_to_none=True)
        torch.manual_seed(3)
        model(x).pow(2).sum().backward()
        grads.append({n: p.grad.clone() for n, p in model.named_parameters()})
    for n, g in grads[0].items():
        assert torch.allclose(grads[1][n], g, atol=1e-5, rtol=1e-3), n


def test_drop_path_rejects_a_probability_outside_0_1() -> None:
    with pytest.raises(ValueError, match=r"drop path probability must be in \[0, 1\]; got 1.5"):
        DropPath(1.5)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_model_made_in_inference_mode_runs_and_follows_new_weights(dtype: torch.dtype) -> None:
    """Parameters made under `torch.inference_mode()` have no version counter, so nothing prepared from them may be
    kept: the model runs, equals one made normally, and a state dict loaded in inference mode takes effect."""
    import gcvit

    torch.manual_seed(0)
    normal = gcvit.create_model("gcvit_xxtiny", img_size=64, num_classes=10).eval()
    other = gcvit.create_model("gcvit_xxtiny", img_size=64, num_classes=10).eval()
    x = torch.randn(2, 3, 64, 64)
    with torch.inference_mode(), torch.autocast("cpu", dtype=torch.bfloat16, enabled=dtype == torch.bfloat16):
        made_here = gcvit.create_model("gcvit_xxtiny", img_size=64, num_classes=10).eval()
        made_here.load_state_dict(normal.state_dict())
        assert made_here.head.weight.is_inference()
        out = made_here(x)
        assert (out.float() - normal(x).float()).abs().max().item() < 1e-4
        made_here.load_state_dict(other.state_dict())  # in place, in inference mode
        assert (made_here(x).float() - other(x).float()).abs().max().item() < 1e-4
