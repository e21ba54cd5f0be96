"""Window attention of GC ViT: local (queries, keys and values from the window) and global (queries from the
stage's global query generator, keys and values from the window).

Both add the relative-position bias, plus the padding mask where the map was padded, to the scores. On GPUs they run
through `torch.nn.functional.scaled_dot_product_attention` with that sum as its additive float mask, laid out as 4-D
(B*nW, heads, N, hd) with a 4-D mask, the layout PyTorch's fused kernels take (5-D inputs or a 3-D mask fall back to
the slow unfused path). On the CPU they run through two matmuls: head by head on views of the projection when the
windows are many (`_attention_per_head`); when they are few, all heads batched (`_attention_batched`), or in fp32
inference, and in bf16 inference on CPUs with AMX, PyTorch's fused kernel (`_fused_kernel_pays` says why).
Shapes: windows (B, nW, N, C); heads split C into (heads, hd); N = ws * ws tokens per window.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from gcvit.layers.fused import linear
from gcvit.layers.kernel_cache import PreparedCache
from gcvit.layers.rel_pos import relative_position_index


class _WindowAttentionBase(nn.Module):
    """Holds the relative-position bias table and the output projection shared by both kinds of attention."""

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
        viewed per head -> (B, nW, N, C)."""
        BnW, N = heads.shape[:2]
        h = self.num_heads
        mask = self._bias(heads.dtype)  # (1, heads, N, N)
        if pad_mask is not None:
            mask = mask + pad_mask.to(heads.dtype)  # (nW, heads, N, N)
        dropout = self.attn_drop if self.training else 0.0
        B = BnW // nW  # nW, not B, divides: B may be 0
        tracing = torch.compiler.is_compiling() or torch.compiler.is_exporting()  # checked before any size test
        fused = _fused_kernel_pays(heads, mask, tracing)
        if q_global is not None:  # image b's query for each of its windows (image-major order); repeating a
            # contiguous copy is a plain memcpy, 4-7x faster than copying a strided, expanded view
            q_global = q_global.transpose(0, 1).contiguous().repeat_interleave(nW, dim=1)  # (heads, B*nW, N, hd)
        if not fused and not tracing and BnW * N * N >= _PER_HEAD_MIN_SCORES:
            parts = heads.unbind(2)  # P*heads views (B*nW, N, hd); their gradients are stacked back in one copy
            q, kv = (parts[:h], parts[h:]) if q_global is None else (q_global.unbind(0), parts)
            out = _attention_per_head(q, kv[:h], kv[h:], mask, self.scale, dropout, B)  # (B*nW, N, C)
        else:
            P = heads.shape[2] // h  # 3 (q, k, v) or 2 (k, v)
            parts = heads.view(BnW, N, P, h, self.head_dim).permute(2, 0, 3, 1, 4).unbind(0)  # (B*nW, heads, N, hd)
            q, k, v = parts if q_global is None else (q_global.transpose(0, 1), *parts)
            if fused:
                if mask.shape[0] > 1:
                    mask = mask.expand(B, *mask.shape).flatten(0, 1)  # (B*nW, heads, N, N)
                out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=dropout, scale=self.scale)
            else:
                out = _attention_batched(q, k, v, mask, self.scale, dropout, nW)
            out = out.transpose(1, 2).reshape(BnW, N, h * self.head_dim)  # (B*nW, N, C)
        return self.proj_drop(linear(out.view(B, nW, N, h * self.head_dim), self.proj))


def _fused_kernel_pays(heads: torch.Tensor, mask: torch.Tensor, tracing: bool) -> bool:
    """Whether `scaled_dot_product_attention` beats plain matmul-softmax-matmul for `heads` (B*nW, N, P*heads, hd).

    On GPUs always. On the CPU only in inference: in bf16 on CPUs with AMX tiles, where the fused kernel's bf16
    matmuls run on them (the whole gcvit_tiny forward 1.13x as fast at batch 16, 1.17x at batch 1, on a 2-core
    Intel Xeon; without AMX it is slower than two bf16 matmuls, 1.1-1.3x on GC ViT's stages at batch 16 on an AMD EPYC);
    in fp32 only where the plain path would batch the heads (below `_PER_HEAD_MIN_SCORES` scores per head; always
    when traced, which must not test sizes): PyTorch's fused CPU kernel reads q, k and v in place where the batched
    route copies them, but with many windows the head-by-head route is faster (the whole gcvit_tiny forward at batch
    16: 4-8% faster than with the fused kernel everywhere; at batch 1 and 4 within noise;
    `benchmarks/attention_route.py`). In training the fused CPU kernel cannot return a gradient for the mask (the
    learned bias) and PyTorch would fall back to its unfused path, slower than ours.
    """
    if heads.device.type != "cpu":
        return True
    if torch.jit.is_tracing():  # torch.jit.trace checks its graph by tracing again under no_grad: one route for both
        return False
    if mask.requires_grad and torch.is_grad_enabled():
        return False
    if heads.dtype == torch.bfloat16:
        return cpu_has_amx()
    if heads.dtype != torch.float32:
        return False
    BnW, N = heads.shape[:2]
    return tracing or BnW * N * N < _PER_HEAD_MIN_SCORES


# asked once, at import: torch.compile cannot trace the probe (a graph break); private, but the only probe torch has
_CPU_HAS_AMX = bool(getattr(torch.cpu, "_is_amx_tile_supported", lambda: False)())


def cpu_has_amx() -> bool:
    """Whether this CPU has AMX tiles (Intel Xeon since Sapphire Rapids), which oneDNN's bf16 matmuls run on."""
    return _CPU_HAS_AMX


_GATHERED_BIAS = PreparedCache()  # relative-position bias per attention layer, gathered for inference

# Below this many scores per head (B*nW*N*N) the per-head loop's extra calls cost more than the copies it saves
# (measured on GC ViT's stages at batch 1 and 16, fp32 and bf16, inference and training). torch.compile and
# torch.export never take the per-head route (fp32 inference takes the fused kernel, the rest the batched route): a
# size test would specialise the graph on the batch size (export refuses a dynamic batch then), and inductor fuses the
# copies itself.
_PER_HEAD_MIN_SCORES = 2**18


def _score_width(N: int, like: torch.Tensor) -> int:
    """Row length for the attention scores: N, or in bf16 inference N rounded up to a multiple of 32 (the rest
    -inf) where PyTorch's CPU softmax handles the short tail of a row poorly: 49 keys (7x7 windows) take 1.6x
    as long as 64 keys."""
    if like.dtype != torch.bfloat16 or like.device.type != "cpu" or torch.is_grad_enabled() or not N % 32 or N > 160:
        return N
    if torch.compiler.is_compiling() or torch.compiler.is_exporting() or torch.jit.is_tracing():
        return N
    return -(-N // 32) * 32


def _attention_batched(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor, scale: float, dropout: float, nW: int
) -> torch.Tensor:
    """softmax(q k^T * scale + mask) v with all heads in one batched matmul: q, k, v (B*nW, heads, N, hd), mask
    (1 or nW, heads, N, N) -> like q. The matmuls copy q, k and v into a batched layout first; for small batches
    that costs less than a call per head. The softmax reads low-precision scores but accumulates in fp32."""
    BnW, heads, N, _ = q.shape
    attn = (q * scale) @ k.transpose(-2, -1)  # (B*nW, heads, N, N)
    scores = attn.view(BnW // nW, nW, heads, N, N)  # the mask broadcasts over images (and windows when 1)
    if attn.requires_grad or mask.requires_grad or torch.jit.is_tracing():
        attn = (scores + mask).view(BnW, heads, N, N)  # autograd turns an in-place add on a view into copies
    else:
        scores.add_(mask)
    attn = attn.softmax(-1)
    if dropout:
        attn = F.dropout(attn, dropout, training=True)
    return attn @ v  # (B*nW, heads, N, hd)


def _attention_per_head(
    q: Sequence[torch.Tensor],
    k: Sequence[torch.Tensor],
    v: Sequence[torch.Tensor],
    mask: torch.Tensor,
    scale: float,
    dropout: float,
    B: int,
) -> torch.Tensor:
    """softmax(q k^T * scale + mask) v, one head at a time: q, k, v one (B*nW, N, hd) per head, strided views into
    the projection are fine; mask (1 or nW, heads, N, N) -> (B*nW, N, C), heads side by side.

    Head by head, the matmuls read q, k and v where the projection wrote them: batching the heads copies them into
    (B*nW, heads, N, hd) and the result back (1.3-1.5x slower on GC ViT's stages at batch 16 in training and bf16). The
    scale and the mask ride on the first matmul (baddbmm); the softmax reads low-precision scores but accumulates in
    fp32 (PyTorch's CPU and GPU kernels do).
    """
    BnW, N, _ = k[0].shape
    width = _score_width(N, k[0])
    rows = k[0].new_full((BnW, N, width), float("-inf")) if width != N else None  # padded score rows
    # bf16 matmuls on the CPU (oneDNN) copy an operand that is neither contiguous nor its transpose, so k^T would be
    # gathered element by element; in inference, copying k's rows first is cheaper (QK^T 1.15-1.25x faster on
    # gcvit_tiny's stages at batch 16, the whole forward about 1%). In training it is not (bf16 step 2% slower).
    rows_first = k[0].dtype == torch.bfloat16 and k[0].device.type == "cpu" and not k[0].requires_grad
    outs = []
    for i, (q_i, k_i, v_i) in enumerate(zip(q, k, v)):
        mask_i = mask[:, i]  # (1 or nW, N, N)
        if mask_i.shape[0] > 1 and B > 1:
            mask_i = mask_i.expand(B, *mask_i.shape).reshape(BnW, N, N)  # every image's windows
        k_t = (k_i.contiguous() if rows_first else k_i).transpose(1, 2)  # (B*nW, hd, N)
        if rows is None:
            attn = torch.baddbmm(mask_i, q_i, k_t, alpha=scale).softmax(-1)  # (B*nW, N, N)
        else:
            # out= takes no part in autocast: the operands are cast as autocast would cast them
            torch.baddbmm(mask_i, q_i.to(rows.dtype), k_t, alpha=scale, out=rows[..., :N])
            attn = rows.softmax(-1)[..., :N]
        if dropout:
            attn = F.dropout(attn, dropout, training=True)
        outs.append(torch.bmm(attn, v_i))  # (B*nW, N, hd)
    return torch.cat(outs, -1)  # (B*nW, N, C)


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
