"""Window attention of GC ViT: local (queries, keys and values from the window) and global (queries from the
stage's global query generator, keys and values from the window).

`window_attention` is the algorithm in a few plain lines: softmax(q k^T * scale + bias + pad_mask) v, the
relative-position bias and (where the map was padded) the padding mask added to the scores. `WindowAttention` and
`WindowAttentionGlobal` compute the same through the route `attention_route` names, and every route is tested
against `window_attention`:
- "auto" (the default): on GPUs PyTorch's fused kernel; on the CPU the fastest of the routes below for the dtype,
  the size and whether a gradient is needed (`gcvit.layers.cpu_attention.auto_route`, with the measurements).
- "plain": `window_attention` itself.
- "fused": `torch.nn.functional.scaled_dot_product_attention` with bias + pad_mask as its additive float mask, laid
  out as 4-D (B*nW, heads, N, hd) with a 4-D mask, the layout PyTorch's fused kernels take (5-D inputs or a 3-D mask
  fall back to the slow unfused path).
- "batched" and "per_head": two matmuls, all heads batched or head by head on views of the projection
  (`gcvit.layers.cpu_attention`).
Shapes: windows (B, nW, N, C); heads split C into (heads, hd); N = ws * ws tokens per window.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Literal, get_args

import torch
import torch.nn.functional as F
from torch import nn

from gcvit.layers.cpu_attention import attention_batched, attention_per_head, auto_route
from gcvit.layers.fused import linear
from gcvit.layers.kernel_cache import PreparedCache
from gcvit.layers.rel_pos import relative_position_index

RouteKind = Literal["auto", "plain", "fused", "batched", "per_head"]


def window_attention_probs(
    q: torch.Tensor, k: torch.Tensor, bias: torch.Tensor, pad_mask: torch.Tensor | None = None, *, scale: float
) -> torch.Tensor:
    """Attention probabilities of windows, in float32 whatever the inputs' dtype.

    Args:
        q: queries (B, nW, heads, N, hd) for local attention; for global attention the image's global query
            (B, 1, heads, N, hd), shared by all windows of that image and only of that image (image-major order).
        k: keys (B, nW, heads, N, hd).
        bias: relative-position bias (1, heads, N, N), or any shape that broadcasts to (nW, heads, N, N).
        pad_mask: (nW, 1, 1, N) additive mask, 0 for real keys and -inf for padded ones (`padding_key_mask`), or None.
        scale: multiplies q k^T, usually hd ** -0.5.

    Returns:
        (B, nW, heads, N_q, N_k) float32: softmax(q k^T * scale + bias + pad_mask) over N_k.
    """
    scores = (q.float() @ k.float().transpose(-1, -2)) * scale  # (B, nW, heads, N_q, N_k)
    scores = scores + bias.float()  # (1, heads, N, N) broadcasts over B and nW
    if pad_mask is not None:
        scores = scores + pad_mask.float()  # (nW, 1, 1, N_k) broadcasts over B, heads, N_q
    return scores.softmax(-1)


def window_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    bias: torch.Tensor,
    pad_mask: torch.Tensor | None = None,
    *,
    scale: float,
    dropout: float = 0.0,
) -> torch.Tensor:
    """softmax(q k^T * scale + bias + pad_mask) v: the reference every faster route is tested against.

    Args:
        q, k, bias, pad_mask, scale: as in `window_attention_probs` (q (B, 1, heads, N, hd) for global attention).
        v: values (B, nW, heads, N, hd).
        dropout: probability of dropping an attention weight (training only; 0 to keep them all).

    Returns:
        (B, nW, heads, N, hd) in v's dtype; the scores, the softmax and its product with v in float32 (outside
        autocast), so that low-precision inputs lose nothing more than their own rounding.
    """
    probs = window_attention_probs(q, k, bias, pad_mask, scale=scale)  # (B, nW, heads, N_q, N_k) float32
    if dropout:
        probs = F.dropout(probs, dropout, training=True)
    return (probs @ v.float()).to(v.dtype)  # (B, nW, heads, N, hd)


@dataclass(frozen=True)
class AttentionRoute:
    """Which code computes window attention (module docstring); set it with `attention_route`."""

    kind: RouteKind = "auto"  # "auto", "plain" (`window_attention`), "fused" (sdpa), "batched" or "per_head"
    cpu_has_amx: bool | None = None  # the AMX answer "auto" acts on in bf16 CPU inference; None: ask this CPU
    pad_score_rows: bool = True  # whether "per_head" may widen bf16 score rows (`cpu_attention.score_width`)

    def __post_init__(self) -> None:
        if self.kind not in get_args(RouteKind):
            raise ValueError(f"unknown attention route {self.kind!r}; expected one of {get_args(RouteKind)}")


# The route every window-attention module takes; read at each call (a plain global: torch.compile and torch.export
# read it at trace time and guard on it). Changed only by `set_attention_route` and `attention_route`.
_ROUTE = AttentionRoute()


def get_attention_route() -> AttentionRoute:
    """The route window attention takes now."""
    return _ROUTE


def set_attention_route(route: AttentionRoute) -> AttentionRoute:
    """Make every window-attention module take `route` from now on; returns the route it replaces."""
    global _ROUTE
    if not isinstance(route, AttentionRoute):
        raise TypeError(f"expected an AttentionRoute, got {type(route).__name__}")
    previous, _ROUTE = _ROUTE, route
    return previous


@contextlib.contextmanager
def attention_route(
    kind: RouteKind = "auto", *, cpu_has_amx: bool | None = None, pad_score_rows: bool = True
) -> Iterator[AttentionRoute]:
    """Run window attention through route `kind` inside the `with` block (fields as in `AttentionRoute`), e.g.
    `with attention_route("plain"): model(x)`; the previous route comes back on leaving it. Not thread-local."""
    route = AttentionRoute(kind, cpu_has_amx, pad_score_rows)
    previous = set_attention_route(route)
    try:
        yield route
    finally:
        set_attention_route(previous)


class _WindowAttentionBase(nn.Module):
    """Holds the relative-position bias table and the output projection shared by both kinds of attention, and
    computes the attention through the route `attention_route` names."""

    def __init__(self, dim: int, num_heads: int, window_size: int, attn_drop: float, proj_drop: float) -> None:
        super().__init__()
        if dim % num_heads:
            raise ValueError(f"dim {dim} must be divisible by num_heads {num_heads}")
        self.num_heads = num_heads
        self.head_dim = dim // num_heads
        self.window_size = window_size
        self.scale = self.head_dim**-0.5
        self.relative_position_bias_table = nn.Parameter(torch.zeros((2 * window_size - 1) ** 2, num_heads))
        self.register_buffer("relative_position_index", relative_position_index(window_size), persistent=True)
        self.attn_drop = attn_drop
        self.proj = nn.Linear(dim, dim)
        self.proj_drop = nn.Dropout(proj_drop)
        nn.init.trunc_normal_(self.relative_position_bias_table, std=0.02)

    def relative_position_bias(self) -> torch.Tensor:
        """(1, heads, N, N) bias gathered from the table."""
        N = self.window_size**2
        # index_select: its backward is an index_add, faster on the CPU than indexing's accumulating index_put
        bias = self.relative_position_bias_table.index_select(0, self.relative_position_index.view(-1))  # (N*N, heads)
        return bias.view(N, N, self.num_heads).permute(2, 0, 1).unsqueeze(0)  # (1, heads, N, N)

    def _bias(self, dtype: torch.dtype) -> torch.Tensor:
        """The bias in `dtype`; gathered once and kept while no gradient is needed and the table is unchanged
        (`gcvit.layers.kernel_cache`)."""
        if torch.is_grad_enabled() or torch.compiler.is_compiling() or torch.jit.is_tracing():
            return self.relative_position_bias().to(dtype)  # a traced graph must read the table, not a constant
        table = self.relative_position_bias_table
        return _GATHERED_BIAS.get(self, (table,), lambda: self.relative_position_bias().to(dtype).contiguous(), dtype)

    def _attend(self, heads: torch.Tensor, q_global: torch.Tensor | None, pad_mask: torch.Tensor | None, nW: int):
        """heads (B*nW, N, P*heads, hd), the qkv (P = 3) or kv (P = 2, with `q_global` (B, heads, N, hd)) projection
        viewed per head -> (B, nW, N, C), through the route `attention_route` names."""
        BnW, N = heads.shape[:2]
        B = BnW // nW  # nW, not B, divides: B may be 0
        bias = self._bias(heads.dtype)  # (1, heads, N, N)
        pad_mask = None if pad_mask is None else pad_mask.to(heads.dtype)  # (nW, 1, 1, N)
        dropout = self.attn_drop if self.training else 0.0
        route = _ROUTE
        tracing = torch.compiler.is_compiling() or torch.compiler.is_exporting()  # checked before any size test
        # the bias is the only part of the mask that may need a gradient
        kind = auto_route(heads, bias, tracing, route.cpu_has_amx) if route.kind == "auto" else route.kind
        if kind == "plain":
            out = self._attend_plain(heads, q_global, bias, pad_mask, dropout, nW)  # (B, nW, N, C)
        else:
            mask = bias if pad_mask is None else bias + pad_mask  # (1 or nW, heads, N, N)
            out = self._attend_fast(kind, heads, q_global, mask, dropout, nW, route.pad_score_rows)  # (B*nW, N, C)
        return self.proj_drop(linear(out.view(B, nW, N, self.num_heads * self.head_dim), self.proj))

    def _attend_plain(
        self,
        heads: torch.Tensor,
        q_global: torch.Tensor | None,
        bias: torch.Tensor,
        pad_mask: torch.Tensor | None,
        dropout: float,
        nW: int,
    ) -> torch.Tensor:
        """The "plain" route, `window_attention`: heads (B*nW, N, P*heads, hd) -> (B, nW, N, C)."""
        BnW, N = heads.shape[:2]
        h, hd = self.num_heads, self.head_dim
        P = heads.shape[2] // h  # 3 (q, k, v) or 2 (k, v)
        parts = heads.view(BnW // nW, nW, N, P, h, hd).permute(3, 0, 1, 4, 2, 5).unbind(0)  # (B, nW, heads, N, hd)
        if q_global is None:
            q, k, v = parts
        else:
            q, (k, v) = q_global.unsqueeze(1), parts  # (B, 1, heads, N, hd): one query for the image's windows
        out = window_attention(q, k, v, bias, pad_mask, scale=self.scale, dropout=dropout)  # (B, nW, heads, N, hd)
        return out.transpose(2, 3).reshape(BnW // nW, nW, N, h * hd)  # (B, nW, N, C)

    def _attend_fast(
        self,
        kind: str,
        heads: torch.Tensor,
        q_global: torch.Tensor | None,
        mask: torch.Tensor,
        dropout: float,
        nW: int,
        pad_rows: bool,
    ) -> torch.Tensor:
        """The "fused", "batched" and "per_head" routes: heads (B*nW, N, P*heads, hd), mask (1 or nW, heads, N, N),
        bias plus padding mask -> (B*nW, N, C)."""
        BnW, N = heads.shape[:2]
        h = self.num_heads
        B = BnW // nW
        if q_global is not None:  # image b's query for each of its windows (image-major order); repeating a
            # contiguous copy is a plain memcpy, 4-7x faster than copying a strided, expanded view
            q_global = q_global.transpose(0, 1).contiguous().repeat_interleave(nW, dim=1)  # (heads, B*nW, N, hd)
        if kind == "per_head":
            parts = heads.unbind(2)  # P*heads views (B*nW, N, hd); their gradients are stacked back in one copy
            q, kv = (parts[:h], parts[h:]) if q_global is None else (q_global.unbind(0), parts)
            return attention_per_head(q, kv[:h], kv[h:], mask, self.scale, dropout, B, pad_rows)  # (B*nW, N, C)
        P = heads.shape[2] // h  # 3 (q, k, v) or 2 (k, v)
        parts = heads.view(BnW, N, P, h, self.head_dim).permute(2, 0, 3, 1, 4).unbind(0)  # (B*nW, heads, N, hd)
        q, k, v = parts if q_global is None else (q_global.transpose(0, 1), *parts)
        if kind == "fused":
            if mask.shape[0] > 1:
                mask = mask.expand(B, *mask.shape).flatten(0, 1)  # (B*nW, heads, N, N)
            out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=dropout, scale=self.scale)
        else:
            out = attention_batched(q, k, v, mask, self.scale, dropout, nW)
        return out.transpose(1, 2).reshape(BnW, N, h * self.head_dim)  # (B*nW, N, C)


_GATHERED_BIAS = PreparedCache()  # relative-position bias per attention layer, gathered for inference


class WindowAttention(_WindowAttentionBase):
    """Local window self-attention: `qkv` Linear(C, 3C)."""

    def __init__(
        self,
        dim: int,
        num_heads: int,
        window_size: int,
        qkv_bias: bool = True,
        attn_drop: float = 0.0,
        proj_drop: float = 0.0,
    ) -> None:
        super().__init__(dim, num_heads, window_size, attn_drop, proj_drop)
        self.qkv = nn.Linear(dim, 3 * dim, bias=qkv_bias)

    def forward(
        self, x: torch.Tensor, q_global: torch.Tensor | None = None, pad_mask: torch.Tensor | None = None
    ) -> torch.Tensor:
        """x (B, nW, N, C) -> (B, nW, N, C); `q_global` is ignored."""
        B, nW, N, _ = x.shape
        qkv = linear(x, self.qkv).view(B * nW, N, 3 * self.num_heads, self.head_dim)  # (B*nW, N, 3*heads, hd)
        return self._attend(qkv, None, pad_mask, nW)


class WindowAttentionGlobal(_WindowAttentionBase):
    """Global window attention: `qkv` Linear(C, 2C) gives keys and values; the queries are the image's global query,
    shared by all windows of that image and only of that image (image-major order, as the windows)."""

    def __init__(
        self,
        dim: int,
        num_heads: int,
        window_size: int,
        qkv_bias: bool = True,
        attn_drop: float = 0.0,
        proj_drop: float = 0.0,
    ) -> None:
        super().__init__(dim, num_heads, window_size, attn_drop, proj_drop)
        self.qkv = nn.Linear(dim, 2 * dim, bias=qkv_bias)

    def forward(
        self, x: torch.Tensor, q_global: torch.Tensor | None = None, pad_mask: torch.Tensor | None = None
    ) -> torch.Tensor:
        """x (B, nW, N, C), q_global (B, heads, N, hd) -> (B, nW, N, C)."""
        if q_global is None:
            raise ValueError("global window attention needs the stage's global query")
        B, nW, N, _ = x.shape
        kv = linear(x, self.qkv).view(B * nW, N, 2 * self.num_heads, self.head_dim)  # (B*nW, N, 2*heads, hd)
        return self._attend(kv, q_global, pad_mask, nW)
