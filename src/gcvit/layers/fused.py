"""`nn.Linear` and `nn.Conv2d`, optionally followed by GELU, through oneDNN's fused CPU kernels.

PyTorch's CPU `F.linear` in fp32 runs MKL's gemm after copying the bias into the output, and GELU is a pass of its
own. oneDNN (`torch.ops.mkldnn._linear_pointwise` and `_convolution_pointwise`, the kernels inductor picks on CPUs)
applies the bias and the exact (erf) GELU inside the kernel and is faster on GC ViT's narrow layers: measured 1.1-1.6x
for the linear alone in fp32, and up to 3x for linear plus GELU in bf16; a depthwise convolution with its GELU
likewise. They have no autograd formula. An fp32 training step runs the linear's forward through oneDNN and its
backward through the same two matmuls and bias sum as `F.linear`'s (`_OneDNNLinear`: 1.04-1.28x for forward plus
backward on GC ViT's layers); GELU then stays a pass of its own, since its backward needs the pre-activation. Other
gradient cases (autocast, convolutions) keep PyTorch's ops, as do torch.compile and torch.export
(inductor fuses on its own), other devices and builds without oneDNN. All routes give the same values up to float
rounding.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch
import torch.nn.functional as F
from torch import nn
from torch.autograd import forward_ad
from torch.utils._python_dispatch import _get_current_dispatch_mode

from gcvit.layers.kernel_cache import PreparedCache

_ONEDNN = True  # the switch `onednn_kernels` sets; read as a plain value, so traced graphs see it too


@contextlib.contextmanager
def onednn_kernels(enabled: bool) -> Iterator[None]:
    """Let `linear` and `conv2d_gelu` use oneDNN's fused kernels where they pay (True, the default), or run
    PyTorch's standard ops everywhere (False) inside the `with` block, e.g. to compare the two; the previous
    setting comes back on leaving it. Not thread-local."""
    global _ONEDNN
    previous, _ONEDNN = _ONEDNN, bool(enabled)
    try:
        yield
    finally:
        _ONEDNN = previous


def _onednn_usable(x: torch.Tensor, layer: nn.Linear | nn.Conv2d) -> bool:
    """Whether oneDNN's kernels may run `layer` on `x` at all (gradients aside)."""
    if not _ONEDNN:
        return False
    if torch.compiler.is_compiling() or torch.compiler.is_exporting() or torch.jit.is_tracing():
        return False  # checked first: tracing must not step into the checks below
    if _get_current_dispatch_mode() is not None:
        return False  # FLOP counters, fake tensors and other dispatch modes must see the standard ops
    if torch._C._are_functorch_transforms_active() or _has_tangent(x):
        return False  # torch.func (vmap, grad, jvp) and forward-mode AD have no rules for oneDNN's ops
    if x.device.type != "cpu" or not torch.backends.mkldnn.is_available():
        return False
    return x.dtype in (torch.float32, torch.bfloat16) and layer.weight.dtype in (torch.float32, torch.bfloat16)


def _has_tangent(x: torch.Tensor) -> bool:
    """Whether `x` carries a forward-mode AD tangent (unpacked only inside a `forward_ad.dual_level()`)."""
    return getattr(forward_ad, "_current_level", 0) >= 0 and forward_ad.unpack_dual(x).tangent is not None


def is_plain(*modules: nn.Module, kinds: tuple[type, ...] = ()) -> bool:
    """Whether a fused kernel may stand in for calling these modules: each is exactly `nn.Linear`, `nn.Conv2d`, an
    exact `nn.GELU` or one of `kinds` (no subclass or wrapper: LoRA, quantized or parametrised layers), and no hook
    would see the call (`hooked`). Otherwise the modules are called, so that hooks fire and replacements take effect."""
    for m in modules:
        kind = type(m)
        if kind not in _PLAIN + kinds or (kind is nn.GELU and m.approximate != "none") or hooked(m):
            return False
    return True


def hooked(module: nn.Module) -> bool:
    """Whether a forward or backward hook would see a call of `module` (its own, or a global module hook)."""
    g = nn.modules.module
    return bool(
        module._forward_hooks
        or module._forward_pre_hooks
        or module._backward_hooks
        or module._backward_pre_hooks
        or g._global_forward_hooks
        or g._global_forward_pre_hooks
        or g._global_backward_hooks
        or g._global_backward_pre_hooks
    )


_PLAIN = (nn.Linear, nn.Conv2d, nn.GELU)


def _needs_grad(x: torch.Tensor, layer: nn.Linear | nn.Conv2d) -> bool:
    params = (layer.weight,) if layer.bias is None else (layer.weight, layer.bias)
    return torch.is_grad_enabled() and (x.requires_grad or any(p.requires_grad for p in params))


def _onednn_pays(x: torch.Tensor, layer: nn.Linear | nn.Conv2d) -> bool:
    """Whether the inference kernels (no autograd) run `layer` on `x`."""
    return _onednn_usable(x, layer) and not _needs_grad(x, layer)


class _OneDNNLinear(torch.autograd.Function):
    """F.linear with oneDNN's forward; the backward is `F.linear`'s: grad @ W, grad^T @ x and the bias sum."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        ctx.save_for_backward(x, weight)
        ctx.has_bias = bias is not None
        return torch.ops.mkldnn._linear_pointwise(x, weight, bias, "none", [], "")  # (..., out_features)

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> tuple[torch.Tensor | None, ...]:
        # plain differentiable ops: with create_graph=True autograd records them, so double backward works
        x, weight = ctx.saved_tensors
        grad_2d = grad.reshape(-1, grad.shape[-1])  # (tokens, out_features)
        grad_x = (grad_2d @ weight).view(x.shape) if ctx.needs_input_grad[0] else None
        grad_w = _weight_grad(grad_2d, x.reshape(-1, x.shape[-1])) if ctx.needs_input_grad[1] else None
        grad_b = grad_2d.sum(0) if ctx.has_bias and ctx.needs_input_grad[2] else None
        return grad_x, grad_w, grad_b


def _weight_grad(grad: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """grad^T @ x: grad (tokens, out), x (tokens, in) -> (out, in), contiguous.

    A layer that narrows (out < in, as an MLP's fc2) over many tokens gets (x^T @ grad)^T instead: MKL runs that
    product 1.14-1.26x faster on GC ViT's fc2 shapes, and the fc2's forward plus backward gets 2-8% faster
    (gcvit_tiny's stages 0-2 at batch 16: 50176 tokens 192->64, 12544 384->128, 3136 768->256). Widening layers
    run the other way round 1.13-1.27x slower. Below 2048 tokens the transposing copy (of weight size) costs more
    than the product saves (stage 3: 784 tokens 1536->512, 4% slower)."""
    if grad.shape[1] < x.shape[1] and grad.shape[0] >= 2048:
        return (x.t() @ grad).t().contiguous()
    return grad.t() @ x


def linear(x: torch.Tensor, layer: nn.Linear, act: nn.Module | None = None) -> torch.Tensor:
    """`act(layer(x))` (or `layer(x)`), fused where it pays: oneDNN's kernel, with an exact GELU `act` inside it.
    x (..., in_features) -> (..., out_features).

    Under CPU autocast the computation runs in the autocast dtype, as `F.linear` would. Modules that are not plain
    (`is_plain`: hooked, wrapped, subclassed, another activation) are called as they are.
    """
    if not is_plain(layer):
        return layer(x) if act is None else act(layer(x))
    if act is not None and not is_plain(act):
        return act(linear(x, layer))
    gelu = act is not None
    usable, needs_grad = _onednn_usable(x, layer), _needs_grad(x, layer)
    if (
        usable
        and needs_grad
        and x.dtype == layer.weight.dtype == torch.float32
        and not torch.is_autocast_enabled("cpu")
    ):
        y = _OneDNNLinear.apply(x, layer.weight, layer.bias)  # fp32 training: oneDNN forward, F.linear's backward
        return F.gelu(y) if gelu else y
    dtype = _compute_dtype(x) if usable and not needs_grad else None
    if dtype is None:
        y = F.linear(x, layer.weight, layer.bias)
        return F.gelu(y) if gelu else y
    weight, bias = _params(layer, dtype, pack=True)
    return torch.ops.mkldnn._linear_pointwise(
        x.to(dtype), weight, bias, "gelu" if gelu else "none", [], "none" if gelu else ""
    )  # (..., out_features)


def conv2d_gelu(x: torch.Tensor, conv: nn.Conv2d, act: nn.Module) -> torch.Tensor:
    """act(conv(x)), as one oneDNN kernel for a zero-padded plain `conv` and an exact GELU `act` (`is_plain`).
    x NCHW (best channels-last) -> NCHW, channels-last when fused."""
    plain = is_plain(conv, act) and conv.padding_mode == "zeros" and not isinstance(conv.padding, str)
    dtype = _compute_dtype(x) if plain and _onednn_pays(x, conv) else None
    if dtype is None:
        return act(conv(x))
    weight, bias = _params(conv, dtype)
    return torch.ops.mkldnn._convolution_pointwise(
        x.to(dtype),
        weight,
        bias,
        list(conv.padding),
        list(conv.stride),
        list(conv.dilation),
        conv.groups,
        "gelu",
        [],
        "none",
    )  # (B, C_out, H_out, W_out)


# asked once, at import (torch.compile cannot trace the probe): whether oneDNN has bf16 kernels on this CPU (AVX-512
# or AMX on x86, BF16 on Arm). Without them its bf16 ops fail ("bf16 path needs the cpu support ..."), while
# PyTorch's own ops still run bf16, slowly: an AVX2-only AMD EPYC.
_CPU_BF16 = bool(getattr(torch.ops.mkldnn, "_is_mkldnn_bf16_supported", lambda: False)())


def cpu_has_bf16() -> bool:
    """Whether oneDNN computes bf16 on this CPU (else bf16 runs through PyTorch's slow fallbacks)."""
    return _CPU_BF16


def _compute_dtype(x: torch.Tensor) -> torch.dtype | None:
    """The dtype the op would run in (CPU autocast's, else the input's), or None when oneDNN should not run it."""
    dtype = torch.get_autocast_dtype("cpu") if torch.is_autocast_enabled("cpu") else x.dtype
    if dtype == torch.bfloat16 and not cpu_has_bf16():
        return None
    return dtype if dtype in (torch.float32, torch.bfloat16) else None


def _params(
    layer: nn.Linear | nn.Conv2d, dtype: torch.dtype, pack: bool = False
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """The layer's weight and bias in `dtype`, the weight in oneDNN's blocked linear layout if `pack` (its kernels
    then skip reordering it on every call: 2-12% faster in fp32, 4-16% in bf16 on GC ViT's layers). The copies are
    kept while the parameters are unchanged (autocast would cast them again on every call), outside the module so that
    deepcopy and state dicts never see them (`gcvit.layers.kernel_cache`)."""
    weight, bias = layer.weight, layer.bias
    if weight.dtype == dtype and not pack:
        return weight, bias
    tensors = (weight,) if bias is None else (weight, bias)
    # inference tensors get nothing kept, and a packed copy made on every call would cost more than it saves
    pack = pack and not weight.is_inference()
    return _PREPARED.get(layer, tensors, lambda: _prepare(weight, bias, dtype, pack), (dtype, pack))


def _prepare(
    weight: torch.Tensor, bias: torch.Tensor | None, dtype: torch.dtype, pack: bool
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Weight and bias in `dtype`, detached; the weight in oneDNN's blocked layout if `pack`."""
    w = weight.detach().to(dtype)
    if pack:
        try:
            w = torch.ops.mkldnn._reorder_linear_weight(w)
        except RuntimeError:  # a build or CPU without this layout: the plain weight works, a little slower
            pass
    return w, None if bias is None else bias.detach().to(dtype)


_PREPARED = PreparedCache()  # weights prepared for the fused kernels, per layer
