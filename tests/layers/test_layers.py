"""Layers with two routes (a fused kernel where it pays, plain PyTorch elsewhere) must agree on both."""

from __future__ import annotations

import copy
from collections.abc import Iterator

import pytest
import torch
import torch.nn.functional as F

from gcvit.layers import (
    FusedMBConv,
    WindowAttention,
    WindowAttentionGlobal,
    attention_route,
    get_attention_route,
    onednn_kernels,
    padding_key_mask,
    window_attention,
)
from gcvit.layers.cpu_attention import cpu_has_amx, fused_kernel_pays, score_width
from gcvit.layers.fused import _onednn_pays, conv2d_gelu, linear
from tests.conftest import randomize_


def _windows(B: int, nW: int, N: int, C: int, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    return torch.randn(B, nW, N, C, dtype=dtype)  # (B, nW, N, C)


@pytest.fixture(params=["per_head", "batched"])
def plain_route(request: pytest.FixtureRequest) -> Iterator[str]:
    """Sends the plain (unfused) path head by head, or all heads batched, whatever the size."""
    with attention_route(request.param):
        yield request.param


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
        table.requires_grad_(not fused)  # a bias without gradient lets PyTorch's fused CPU kernel run
        with attention_route("fused" if fused else plain_route):
            out = attn(x, q_global, pad_mask)
        (out * torch.linspace(-1, 1, out.numel()).view_as(out)).sum().backward()
        table.requires_grad_(True)
        grads = [x.grad, q_global.grad if kind == "global" else torch.zeros(1)]
        return out.detach(), *grads

    table = attn.relative_position_bias_table
    assert not fused_kernel_pays(x, attn.relative_position_bias(), False)  # training: the bias needs a gradient
    plain = run(fused=False)
    # bias gradient of the plain path against autograd through PyTorch's reference (math) attention
    bias_grad = table.grad.clone()
    fused = run(fused=True)
    for a, b in zip(plain, fused):
        assert (a - b).abs().max().item() < 1e-5
    with attention_route("fused"), torch.nn.attention.sdpa_kernel(torch.nn.attention.SDPBackend.MATH):
        attn.zero_grad()
        out = attn(x, q_global, pad_mask)  # the math backend returns the mask's gradient
        (out * torch.linspace(-1, 1, out.numel()).view_as(out)).sum().backward()
    assert bias_grad.abs().max() > 0
    assert (bias_grad - table.grad).abs().max().item() < 1e-6


def _reference(
    attn: torch.nn.Module, x: torch.Tensor, q_global: torch.Tensor, pad_mask: torch.Tensor | None
) -> torch.Tensor:
    """What a window-attention module must return, written out from its own weights: its projections around
    `window_attention`. x (B, nW, N, C), q_global (B, heads, N, hd) (global attention only) -> (B, nW, N, C)."""
    B, nW, N, C = x.shape
    P = attn.qkv.out_features // C  # 3 (q, k, v) or 2 (k, v)
    qkv = F.linear(x, attn.qkv.weight, attn.qkv.bias).view(B, nW, N, P, attn.num_heads, attn.head_dim)
    qkv = qkv.permute(3, 0, 1, 4, 2, 5)  # (P, B, nW, heads, N, hd)
    q, k, v = qkv if P == 3 else (q_global.unsqueeze(1), *qkv)  # global: (B, 1, heads, N, hd), one query per image
    out = window_attention(q, k, v, attn.relative_position_bias(), pad_mask, scale=attn.scale)  # (B, nW, heads, N, hd)
    return F.linear(out.transpose(2, 3).reshape(B, nW, N, C), attn.proj.weight, attn.proj.bias)  # (B, nW, N, C)


@pytest.mark.parametrize("route", ["plain", "fused", "batched", "per_head", "auto"])
@pytest.mark.parametrize("kind", ["local", "global"])
@pytest.mark.parametrize("padded", [False, True])
@pytest.mark.parametrize("training", [False, True])
def test_every_route_equals_the_reference_window_attention(route: str, kind: str, padded: bool, training: bool) -> None:
    """Every route a module can take (the plain reference itself, PyTorch's fused kernel, the batched and the per-head
    matmuls, and the one "auto" picks) returns `window_attention` of its own projections in fp32, with the learned
    bias and with and without the padding mask; in training, with the same gradients for the input, the global query
    and the bias table."""
    torch.manual_seed(0)
    B, ws, heads, C = 2, 4, 4, 32
    H, W = (6, 7) if padded else (8, 8)  # 6x7 is padded to 8x8: some keys of 3 of the 4 windows masked
    cls = WindowAttentionGlobal if kind == "global" else WindowAttention
    attn = randomize_(cls(dim=C, num_heads=heads, window_size=ws), 0.3).train(training)  # a bias worth the name
    x = _windows(B, 4, ws * ws, C).requires_grad_(training)
    q_global = torch.randn(B, heads, ws * ws, C // heads, requires_grad=training)
    pad_mask = padding_key_mask(H, W, ws, x.device, x.dtype)
    assert (pad_mask is not None) == padded
    with torch.set_grad_enabled(training):
        want = _reference(attn, x, q_global, pad_mask)
        with attention_route(route):
            got = attn(x, q_global, pad_mask)
    assert got.shape == want.shape == (B, 4, ws * ws, C)
    assert (got - want).abs().max().item() < 1e-5
    if training:
        weights = torch.linspace(-1, 1, want.numel()).view_as(want)
        inputs = [x, attn.relative_position_bias_table, *([q_global] if kind == "global" else [])]
        got_grads = torch.autograd.grad((got * weights).sum(), inputs)
        for a, b in zip(got_grads, torch.autograd.grad((want * weights).sum(), inputs)):
            scale = b.abs().max().item()  # the bias table's gradient sums over windows: up to about 50
            assert scale > 0 and (a - b).abs().max().item() < 1e-5 * max(1.0, scale)


def test_attention_route_names_a_known_route_and_is_restored() -> None:
    """`attention_route` takes one of the routes by name and gives the previous route back on leaving, even on an
    error; an unknown name is refused, naming the known ones."""
    before = get_attention_route()
    assert before.kind == "auto" and before.cpu_has_amx is None and before.pad_score_rows
    with pytest.raises(RuntimeError), attention_route("per_head", cpu_has_amx=True) as route:
        assert get_attention_route() is route and route.kind == "per_head" and route.cpu_has_amx
        raise RuntimeError
    assert get_attention_route() is before
    with pytest.raises(ValueError, match="'sdpa'.*'auto', 'plain', 'fused', 'batched', 'per_head'"):
        with attention_route("sdpa"):  # type: ignore[arg-type]
            pass
    assert get_attention_route() is before


@pytest.mark.cpu_bf16
def test_bf16_on_cpu_stays_close_to_fp32(plain_route: str) -> None:
    """bf16 on the CPU uses two bf16 matmuls, the softmax accumulating in fp32; its output stays within bf16
    rounding of the fp32 result."""
    assert get_attention_route().kind == plain_route  # the plain path, on any CPU (AMX or not)
    torch.manual_seed(0)
    attn = WindowAttention(dim=64, num_heads=2, window_size=7).eval()
    x = _windows(2, 4, 49, 64)
    with torch.no_grad():
        ref = attn(x)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            low = attn(x)
    assert low.dtype == torch.bfloat16
    assert (low.float() - ref).abs().max().item() < 0.05 * ref.abs().max().item()


@pytest.mark.parametrize("kind", ["local", "global"])
@pytest.mark.parametrize("padded", [False, True])
@pytest.mark.cpu_bf16
def test_bf16_padded_score_rows_equal_plain_rows(kind: str, padded: bool, plain_route: str) -> None:
    """bf16 inference pads 7x7 windows' score rows to 64 keys (-inf, zero after the softmax): the same attention as
    49-key rows up to bf16 rounding, with and without the padding mask."""
    torch.manual_seed(0)
    B, ws, heads, C = 2, 7, 2, 64
    H, W = (26, 27) if padded else (28, 28)
    attn = (WindowAttentionGlobal if kind == "global" else WindowAttention)(dim=C, num_heads=heads, window_size=ws)
    x = _windows(B, 16, ws * ws, C)
    q_global = torch.randn(B, heads, ws * ws, C // heads)
    pad_mask = padding_key_mask(H, W, ws, x.device, x.dtype)
    scores = torch.zeros(1, dtype=torch.bfloat16)
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        assert score_width(ws * ws, scores) == 64
        assert score_width(ws * ws, scores.float()) == 49  # fp32 keeps its rows
        assert score_width(64, scores) == 64
        wide = attn.eval()(x, q_global, pad_mask)
        with attention_route(plain_route, pad_score_rows=False):
            plain = attn(x, q_global, pad_mask)
    assert score_width(ws * ws, scores) == 49  # autograd (training) keeps them too
    assert wide.dtype == plain.dtype == torch.bfloat16 and torch.isfinite(wide).all()
    assert (wide.float() - plain.float()).abs().max().item() <= 2**-7 * plain.float().abs().max().item()


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
        out = linear(x, layer, torch.nn.GELU() if gelu else None)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            low = linear(x, layer, torch.nn.GELU() if gelu else None)
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
    out = linear(x, layer, torch.nn.GELU() if gelu else None)
    assert out.grad_fn is not None and (out - ref).abs().max().item() < 1e-5
    for got, want in zip(torch.autograd.grad((out * weights).sum(), [x, *layer.parameters()]), expected):
        assert (got - want).abs().max().item() < 1e-5


@pytest.mark.parametrize("shape", [(96, 32), (32, 96)])
def test_training_linear_weight_gradient_in_either_order(shape: tuple[int, int]) -> None:
    """A narrowing layer over many tokens (fc2) computes its weight gradient as (x^T grad)^T: the same gradient as
    F.linear's, laid out like the weight, as an optimizer's foreach kernels expect."""
    torch.manual_seed(0)
    layer = torch.nn.Linear(*shape)
    x = torch.randn(2, 1100, shape[0], requires_grad=True)  # 2200 tokens, above the switch at 2048
    weights = torch.randn(2, 1100, shape[1])
    plain = torch.autograd.grad((torch.nn.functional.linear(x, layer.weight, layer.bias) * weights).sum(), layer.weight)
    (linear(x, layer) * weights).sum().backward()
    assert layer.weight.grad.is_contiguous() and layer.weight.grad.shape == (shape[1], shape[0])
    assert (layer.weight.grad - plain[0]).abs().max().item() < 1e-4


@pytest.mark.parametrize("tokens", [4, 2200])  # 2200: a narrowing layer's weight gradient in the other order
def test_training_linear_supports_double_backward(tokens: int) -> None:
    """The oneDNN training route keeps F.linear's second derivatives (gradient penalties, Hessian-vector products)."""
    torch.manual_seed(0)
    layer = torch.nn.Linear(16, 8)
    x = torch.randn(tokens, 16, requires_grad=True)

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
        out = conv2d_gelu(x, conv, torch.nn.GELU())
        with torch.autocast("cpu", dtype=torch.bfloat16):
            low = conv2d_gelu(x, conv, torch.nn.GELU())
    assert out.shape == ref.shape and (out - ref).abs().max().item() < 1e-5
    assert low.dtype == torch.bfloat16 and (low.float() - ref).abs().max().item() < 0.02 * ref.abs().max().item()


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


def test_only_biases_trainable_get_their_gradients() -> None:
    """BitFit-style tuning: frozen weights, trainable biases, an input that needs no gradient. The layer must still
    record the graph for its bias."""
    import gcvit

    torch.manual_seed(0)
    model = gcvit.create_model("gcvit_xxtiny", img_size=64, num_classes=10, drop_path_rate=0.0).train()
    for name, p in model.named_parameters():
        p.requires_grad_(name.endswith(("mlp.fc1.bias", "mlp.fc2.bias")))
    x = torch.randn(2, 3, 64, 64)
    model(x).pow(2).sum().backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}
    assert len(grads) == 24 and all(g.abs().sum() > 0 for g in grads.values())
    reference = copy.deepcopy(model)
    reference.zero_grad(set_to_none=True)
    with onednn_kernels(False):
        reference(x).pow(2).sum().backward()
    for n, p in reference.named_parameters():
        if p.requires_grad:
            assert torch.allclose(grads[n], p.grad, atol=1e-5, rtol=1e-4), n


def test_torch_func_per_sample_gradients_and_ensembles() -> None:
    """torch.func's recipes run through every layer: per-sample gradients (vmap of grad of functional_call) equal
    one-image gradients, and a vmapped ensemble of two models equals each model run alone."""
    from torch.func import functional_call, grad, stack_module_state, vmap

    import gcvit

    torch.manual_seed(0)
    model = gcvit.create_model("gcvit_xxtiny", img_size=32, num_classes=10, drop_path_rate=0.0).train()
    params = {k: v.detach() for k, v in model.named_parameters()}
    x, y = torch.randn(2, 3, 32, 32), torch.tensor([1, 2])

    def loss(p: dict, xi: torch.Tensor, yi: torch.Tensor) -> torch.Tensor:
        return torch.nn.functional.cross_entropy(functional_call(model, p, (xi[None],)), yi[None])

    per_sample = vmap(grad(loss), in_dims=(None, 0, 0))(params, x, y)
    for i in range(2):
        model.zero_grad(set_to_none=True)
        loss(dict(model.named_parameters()), x[i], y[i]).backward()
        assert torch.allclose(per_sample["head.weight"][i], model.head.weight.grad, atol=1e-5)
        assert torch.allclose(
            per_sample["levels.0.blocks.0.mlp.fc1.weight"][i], model.levels[0].blocks[0].mlp.fc1.weight.grad, atol=1e-5
        )

    members = [gcvit.create_model("gcvit_xxtiny", img_size=32, num_classes=10).eval() for _ in range(2)]
    stacked, buffers = stack_module_state(members)
    with torch.no_grad():
        out = vmap(lambda p, b: functional_call(members[0], (p, b), (x,)), in_dims=(0, 0))(stacked, buffers)
        for i, member in enumerate(members):
            assert (out[i] - member(x)).abs().max().item() < 1e-4


def test_forward_mode_ad_through_the_fused_layers() -> None:
    """A forward-mode tangent through Mlp and FusedMBConv equals the one through plain PyTorch ops."""
    from torch.autograd import forward_ad

    from gcvit.layers import Mlp

    torch.manual_seed(0)
    for layer, shape in ((Mlp(8, 16), (2, 5, 8)), (FusedMBConv(8), (2, 8, 6, 6))):
        x, v = torch.randn(shape), torch.randn(shape)
        tangents = []
        for fast in (True, False):
            with onednn_kernels(fast), forward_ad.dual_level(), torch.no_grad():
                tangents.append(forward_ad.unpack_dual(layer(forward_ad.make_dual(x, v))).tangent)
        assert tangents[0] is not None and torch.allclose(tangents[0], tangents[1], atol=1e-5)


class _LoRA(torch.nn.Module):
    """A low-rank adapter around a Linear, as peft wraps one: base(x) + B(A(x))."""

    def __init__(self, base: torch.nn.Linear, rank: int = 4) -> None:
        super().__init__()
        self.base = base
        self.A = torch.nn.Linear(base.in_features, rank, bias=False)
        self.B = torch.nn.Linear(rank, base.out_features, bias=False)
        torch.nn.init.normal_(self.B.weight)

    @property
    def weight(self) -> torch.Tensor:  # what a wrapper exposes, and what a fused kernel must not read
        return self.base.weight

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.base(x) + self.B(self.A(x))


@pytest.mark.parametrize("grad", [False, True])
def test_hooks_wrappers_and_replaced_modules_are_called(grad: bool) -> None:
    """Fused kernels stand in for plain modules only: a forward hook on fc1 fires and its changed output counts, a
    LoRA-style wrapper and a replaced activation take effect, in inference and in training; in fused-MBConv, hooks
    on its convolutions fire and a replaced activation counts. They used to be bypassed silently."""
    from gcvit.layers import Mlp

    torch.manual_seed(0)
    mlp = Mlp(16, 32)
    t = torch.randn(2, 5, 16)
    with torch.set_grad_enabled(grad):
        calls = []
        handle = mlp.fc1.register_forward_hook(lambda m, i, o: calls.append(1) or o * 0)
        assert torch.allclose(mlp(t), mlp.fc2.bias.expand(2, 5, 16)) and calls == [1]
        handle.remove()
        mlp.act = torch.nn.Identity()
        assert (mlp(t) - mlp.fc2(mlp.fc1(t))).abs().max().item() < 1e-5
        mlp.act, mlp.fc1 = torch.nn.GELU(), _LoRA(mlp.fc1)
        want = mlp.fc2(torch.nn.functional.gelu(mlp.fc1(t)))
        assert (mlp(t) - want).abs().max().item() < 1e-5

        block = FusedMBConv(8)
        x = torch.randn(2, 8, 6, 6)
        seen = []
        block[0].register_forward_hook(lambda m, i, o: seen.append("dw"))
        handle = block[3].register_forward_hook(lambda m, i, o: seen.append("pw") or o * 0)
        assert torch.allclose(block(x), x) and seen == ["dw", "pw"]
        handle.remove()
        block[1] = torch.nn.Identity()
        assert (block(x) - (x + block[3](block[2](block[0](x))))).abs().max().item() < 1e-5


def test_dynamic_int8_quantisation_runs() -> None:
    """torch.ao's dynamic quantisation swaps every Linear for an int8 one; the model runs it (it used to read the
    swapped layer's weight as a tensor and fail) and stays close to the float model."""
    import gcvit

    torch.manual_seed(0)
    model = gcvit.create_model("gcvit_xxtiny", img_size=32, num_classes=10).eval()
    quantised = torch.ao.quantization.quantize_dynamic(copy.deepcopy(model), {torch.nn.Linear}, dtype=torch.qint8)
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        ref, low = model(x), quantised(x)
    assert (low - ref).abs().max().item() < 0.1 * ref.abs().max().item()


def test_global_query_at_another_size_is_the_bicubic_resize_of_the_pooled_map() -> None:
    """At a non-native size the generator's map (here 8x8 for a 7x7 window) is resized bicubically (the spec's
    resize), then split into heads: (B, heads, ws*ws, hd)."""
    from gcvit.models.gcvit import GlobalQueryGen

    torch.manual_seed(0)
    gen = randomize_(GlobalQueryGen(dim=8, num_heads=2, window_size=7, pools=3), 0.3).eval()
    x = torch.randn(2, 8, 64, 64)
    with torch.no_grad():
        pooled = gen.to_q_global(x)
        assert pooled.shape[-2:] == (8, 8)
        want = F.interpolate(pooled, size=(7, 7), mode="bicubic", align_corners=False)
        want = want.flatten(2).transpose(1, 2).reshape(2, 49, 2, 4).transpose(1, 2)
        assert (gen(x) - want).abs().max().item() < 1e-6


def test_squeeze_excite_gate_of_a_bf16_map_follows_fp32() -> None:
    """The bf16 route's spatial mean (a sum in fp32, divided by H*W) gives fp32's gate to bf16 rounding."""
    from gcvit.layers.conv import SqueezeExcite

    torch.manual_seed(0)
    se = randomize_(SqueezeExcite(32), 0.3).eval()
    x = torch.randn(2, 32, 28, 20) + 1.0  # a mean far from 0, and H != W
    with torch.no_grad():
        ref = se.gate(x)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            low = se.gate(x.bfloat16())
    assert (low.float() - ref).abs().max().item() < 1e-2


@pytest.mark.cpu_bf16
@pytest.mark.parametrize("kind", ["local", "global"])
def test_bf16_inference_takes_the_fused_kernel_only_on_amx(kind: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """On CPUs with AMX tiles, bf16 inference runs PyTorch's fused kernel (its bf16 matmuls use the tiles); without
    them, and in training, the plain path. Both stay within bf16 rounding of the fp32 result and of each other."""
    calls = []
    sdpa = F.scaled_dot_product_attention

    def spy(*args: object, **kwargs: object) -> torch.Tensor:
        calls.append(args[1].dtype)  # the keys: the projection's output, bf16 under autocast
        return sdpa(*args, **kwargs)

    monkeypatch.setattr(F, "scaled_dot_product_attention", spy)  # torch's own function, which the fused route calls
    torch.manual_seed(0)
    B, ws, heads, C = 2, 7, 2, 64
    cls = WindowAttentionGlobal if kind == "global" else WindowAttention
    attn = randomize_(cls(dim=C, num_heads=heads, window_size=ws)).eval()
    x = _windows(B, 4, ws * ws, C)
    q_global = torch.randn(B, heads, ws * ws, C // heads)
    with torch.no_grad():
        ref = attn(x, q_global)
    outs = {}
    for amx in (True, False):
        calls.clear()
        with attention_route(cpu_has_amx=amx), torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
            outs[amx] = attn(x, q_global).float()
        assert calls == ([torch.bfloat16] if amx else []), amx
        assert (outs[amx] - ref).abs().max().item() < 0.05 * ref.abs().max().item()
    assert (outs[True] - outs[False]).abs().max().item() < 0.05 * ref.abs().max().item()
    calls.clear()
    with attention_route(cpu_has_amx=True), torch.autocast("cpu", dtype=torch.bfloat16):  # training: the bias
        attn(x, q_global).float().sum().backward()  # needs its gradient
    assert calls == [] and attn.relative_position_bias_table.grad.abs().max() > 0
    assert get_attention_route().cpu_has_amx is None  # the real probe, read inside a compiled graph
    torch._dynamo.reset()
    compiled = torch.compile(attn, backend="eager", fullgraph=True)  # fails on a graph break
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        assert (compiled(x, q_global).float() - outs[cpu_has_amx()]).abs().max().item() < 1e-2
