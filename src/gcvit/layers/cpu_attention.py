"""The CPU routes of window attention, and the rule that picks a route when `gcvit.layers.attention` is left on
"auto".

Each route computes what `gcvit.layers.attention.window_attention` computes, softmax(q k^T * scale + mask) v, and
the tests check each against it. On the CPU, two matmuls beat PyTorch's fused kernel in most cases: head by head on
views of the projection when the windows are many (`attention_per_head`); when they are few, all heads batched
(`attention_batched`); or, in fp32 inference and in bf16 inference on CPUs with AMX, PyTorch's fused kernel
(`fused_kernel_pays` says why).
Shapes: B*nW windows; heads split C into (heads, hd); N = ws * ws tokens per window; mask (1 or nW, heads, N, N),
the relative-position bias plus the padding mask.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F

# asked once, at import: torch.compile cannot trace the probe (a graph break); private, but the only probe torch has
_CPU_HAS_AMX = bool(getattr(torch.cpu, "_is_amx_tile_supported", lambda: False)())


def cpu_has_amx() -> bool:
    """Whether this CPU has AMX tiles (Intel Xeon since Sapphire Rapids), which oneDNN's bf16 matmuls run on."""
    return _CPU_HAS_AMX


# Below this many scores per head (B*nW*N*N) the per-head loop's extra calls cost more than the copies it saves
# (measured on GC ViT's stages at batch 1 and 16, fp32 and bf16, inference and training). torch.compile and
# torch.export never take the per-head route (fp32 inference takes the fused kernel, the rest the batched route): a
# size test would specialise the graph on the batch size (export refuses a dynamic batch then), and inductor fuses the
# copies itself.
PER_HEAD_MIN_SCORES = 2**18


def auto_route(heads: torch.Tensor, mask: torch.Tensor, tracing: bool, amx: bool | None = None) -> str:
    """The route "auto" takes for `heads` (B*nW, N, P*heads, hd), the projection viewed per head: "fused"
    (`scaled_dot_product_attention`) where `fused_kernel_pays`, else "per_head" from `PER_HEAD_MIN_SCORES` scores
    per head on (never when traced, which must not test sizes), else "batched". `amx`: as in `fused_kernel_pays`."""
    if fused_kernel_pays(heads, mask, tracing, amx):
        return "fused"
    BnW, N = heads.shape[:2]
    return "per_head" if not tracing and BnW * N * N >= PER_HEAD_MIN_SCORES else "batched"


def fused_kernel_pays(heads: torch.Tensor, mask: torch.Tensor, tracing: bool, amx: bool | None = None) -> bool:
    """Whether `scaled_dot_product_attention` beats plain matmul-softmax-matmul for `heads` (B*nW, N, P*heads, hd).
    `amx`: whether the CPU has AMX tiles; None asks this one (`cpu_has_amx`).

    On GPUs always. On the CPU only in inference: in bf16 on CPUs with AMX tiles, where the fused kernel's bf16
    matmuls run on them (the whole gcvit_tiny forward 1.13x as fast at batch 16, 1.17x at batch 1, on a 2-core
    Intel Xeon; without AMX it is slower than two bf16 matmuls, 1.1-1.3x on GC ViT's stages at batch 16 on an AMD EPYC);
    in fp32 only where the plain path would batch the heads (below `PER_HEAD_MIN_SCORES` scores per head; always
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
        return cpu_has_amx() if amx is None else amx
    if heads.dtype != torch.float32:
        return False
    BnW, N = heads.shape[:2]
    return tracing or BnW * N * N < PER_HEAD_MIN_SCORES


def score_width(N: int, like: torch.Tensor) -> int:
    """Row length for the attention scores: N, or in bf16 inference N rounded up to a multiple of 32 (the rest
    -inf) where PyTorch's CPU softmax handles the short tail of a row poorly: 49 keys (7x7 windows) take 1.6x
    as long as 64 keys."""
    if like.dtype != torch.bfloat16 or like.device.type != "cpu" or torch.is_grad_enabled() or not N % 32 or N > 160:
        return N
    if torch.compiler.is_compiling() or torch.compiler.is_exporting() or torch.jit.is_tracing():
        return N
    return -(-N // 32) * 32


def attention_batched(
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


def attention_per_head(
    q: Sequence[torch.Tensor],
    k: Sequence[torch.Tensor],
    v: Sequence[torch.Tensor],
    mask: torch.Tensor,
    scale: float,
    dropout: float,
    B: int,
    pad_rows: bool = True,
) -> torch.Tensor:
    """softmax(q k^T * scale + mask) v, one head at a time: q, k, v one (B*nW, N, hd) per head, strided views into
    the projection are fine; mask (1 or nW, heads, N, N) -> (B*nW, N, C), heads side by side. `pad_rows`: let bf16
    inference widen the score rows (`score_width`); False keeps N keys, as a test's comparison needs.

    Head by head, the matmuls read q, k and v where the projection wrote them: batching the heads copies them into
    (B*nW, heads, N, hd) and the result back (1.3-1.5x slower on GC ViT's stages at batch 16 in training and bf16). The
    scale and the mask ride on the first matmul (baddbmm); the softmax reads low-precision scores but accumulates in
    fp32 (PyTorch's CPU and GPU kernels do).
    """
    BnW, N, _ = k[0].shape
    width = score_width(N, k[0]) if pad_rows else N
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
