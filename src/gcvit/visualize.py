"""What a GC ViT looks at: its real attention probabilities, per-stage global attention maps, local attention of one
window, and Grad-CAM.

The attention modules run through fused kernels and never hold their probabilities, so `attention_maps` hooks each
module's inputs (the normalised windows, the stage's global query and the padding mask) and recomputes
softmax(q k^T * scale + bias + pad_mask) from the module's own weights, through the reference every attention route
is tested against (`gcvit.layers.window_attention_probs`). Applying the module's projection to probs @ v gives
back its output (the tests check this to 1e-5), so the maps are the model's real attention.

Shapes: B images, nW windows (row-major over the padded map), heads, N = ws * ws tokens per window (row-major
inside the window), (H_i, W_i) the map of stage i, (H, W) the image.
"""

from __future__ import annotations

import logging
import math
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from gcvit.extras import install_hint
from gcvit.figures import subplots
from gcvit.layers import WindowAttentionGlobal, window_attention_probs

logger = logging.getLogger(__name__)

PathLike = str | os.PathLike[str]


@dataclass
class StageAttention:
    """The attention of one stage, for every block, image, window and head."""

    stage: int
    map_size: tuple[int, int]  # (H_i, W_i) of the stage's map, before padding
    window_size: int  # ws
    grid: tuple[int, int]  # (rows, columns) of windows over the padded map; nW = rows * columns
    stride: int  # image pixels per map token
    local_blocks: list[int]  # indices in the stage of the local blocks (even j)
    global_blocks: list[int]  # indices of the global blocks (odd j); empty for a one-block stage
    local_probs: torch.Tensor  # (B, len(local_blocks), nW, heads, N_q, N_k); each row over N_k sums to one
    global_probs: torch.Tensor  # (B, len(global_blocks), nW, heads, N_q, N_k); each row over N_k sums to one
    global_map: torch.Tensor | None  # (B, H_i, W_i): see `global_attention_map`; None without a global block


@dataclass
class AttentionMaps:
    """Everything `attention_maps` found; `stages[i]` is stage i."""

    stages: list[StageAttention]
    logits: torch.Tensor  # (B, num_classes), or pooled features (B, C) for a model without a head
    image_size: tuple[int, int]  # (H, W) of the input


@dataclass
class GradCAM:
    """Grad-CAM of one stage: where the evidence for a class lies."""

    cam: torch.Tensor  # (B, H_i, W_i) in [0, 1]; all zeros where no location supports the class
    class_idx: torch.Tensor  # (B,) long: the class explained, per image
    logits: torch.Tensor  # (B, num_classes)
    stage: int  # the stage explained, non-negative
    stride: int  # image pixels per map token


# --- attention ----------------------------------------------------------------------------------------------------


def _check_stage(model: nn.Module, stage: int) -> int:
    """A stage index, negatives counting from the end -> non-negative; ValueError naming the valid range."""
    n = len(model.levels)
    if not isinstance(stage, int) or not -n <= stage < n:
        raise ValueError(f"stage {stage!r} is out of range: this model has {n} stages (expected {-n}..{n - 1})")
    return stage % n


def _check_images(images: torch.Tensor) -> torch.Tensor:
    if not isinstance(images, torch.Tensor) or images.ndim not in (3, 4) or not images.is_floating_point():
        got = f"{tuple(images.shape)} {images.dtype}" if isinstance(images, torch.Tensor) else type(images).__name__
        raise ValueError(f"expected a float image tensor (3, H, W) or (B, 3, H, W); got {got}")
    return images if images.ndim == 4 else images.unsqueeze(0)


def attention_probs(
    attn: nn.Module, x: torch.Tensor, q_global: torch.Tensor | None, pad_mask: torch.Tensor | None
) -> torch.Tensor:
    """Recompute the attention probabilities of a local or global window-attention module, in float32.

    Args:
        attn: a `WindowAttention` or `WindowAttentionGlobal`.
        x: its input windows (B, nW, N, C), already normalised.
        q_global: the stage's global query (B, heads, N, hd); used by global attention only.
        pad_mask: (nW, 1, 1, N) additive mask, 0 for real keys and -inf for padded ones, or None.

    Returns:
        (B, nW, heads, N_q, N_k): softmax(q k^T * scale + relative-position bias + pad_mask) over N_k.
    """
    B, nW, N, _ = x.shape
    heads, hd = attn.num_heads, attn.head_dim
    w, b = attn.qkv.weight.float(), None if attn.qkv.bias is None else attn.qkv.bias.float()
    proj = F.linear(x.float(), w, b)
    if isinstance(attn, WindowAttentionGlobal):
        if q_global is None:
            raise ValueError("global window attention needs the stage's global query")
        k = proj.view(B, nW, N, 2, heads, hd)[:, :, :, 0].transpose(2, 3)  # (B, nW, heads, N, hd)
        q = q_global.float().unsqueeze(1)  # (B, 1, heads, N, hd): one query for all windows of an image
    else:
        qkv = proj.view(B, nW, N, 3, heads, hd)  # (B, nW, N, 3, heads, hd)
        q, k = qkv[:, :, :, 0].transpose(2, 3), qkv[:, :, :, 1].transpose(2, 3)  # each (B, nW, heads, N, hd)
    return window_attention_probs(q, k, attn.relative_position_bias(), pad_mask, scale=attn.scale)  # the reference


def window_to_map(per_window: torch.Tensor, grid: tuple[int, int], map_size: tuple[int, int]) -> torch.Tensor:
    """Place per-token values of every window back on the stage's map.

    Args:
        per_window: (B, nW, N) values, windows row-major over the padded map, tokens row-major in a window.
        grid: (rows, columns) of windows.
        map_size: (H_i, W_i) of the unpadded map.

    Returns:
        (B, H_i, W_i); values of padded tokens are dropped.
    """
    B, _, N = per_window.shape
    rows, cols = grid
    ws = round(N**0.5)
    x = per_window.view(B, rows, cols, ws, ws)  # (B, nH, nW_w, ws, ws)
    x = x.permute(0, 1, 3, 2, 4).reshape(B, rows * ws, cols * ws)  # (B, Hp, Wp)
    return x[:, : map_size[0], : map_size[1]]


def global_attention_map(stage: StageAttention) -> torch.Tensor | None:
    """Where each window's global queries look: for every window, the attention mass on each key token, averaged
    over the stage's global blocks, its heads and the N global query tokens, placed at the key's position.

    Returns:
        (B, H_i, W_i), or None for a stage without a global block. Inside every window the values sum to one
        (padded keys get no mass, so nothing is lost by dropping them).
    """
    if not stage.global_blocks:
        return None
    per_window = stage.global_probs.mean(dim=(1, 3, 4))  # (B, G, nW, heads, N_q, N_k) -> (B, nW, N_k)
    return window_to_map(per_window, stage.grid, stage.map_size)


class _Recorder:
    """Forward pre-hooks on every block and attention module of a GC ViT; recomputes the probabilities as it goes."""

    def __init__(self, model: nn.Module) -> None:
        self.map_sizes: dict[int, tuple[int, int]] = {}
        self.probs: dict[tuple[int, int], torch.Tensor] = {}
        self.handles = []
        for i, level in enumerate(model.levels):
            for j, block in enumerate(level.blocks):
                self.handles.append(block.register_forward_pre_hook(self._block_hook(i)))
                self.handles.append(block.attn.register_forward_pre_hook(self._attn_hook(i, j), with_kwargs=True))

    def _block_hook(self, i: int) -> Any:
        def hook(module: nn.Module, args: tuple) -> None:
            self.map_sizes[i] = tuple(args[0].shape[1:3])  # block input NHWC (B, H_i, W_i, C)

        return hook

    def _attn_hook(self, i: int, j: int) -> Any:
        def hook(module: nn.Module, args: tuple, kwargs: dict) -> None:
            names = ("x", "q_global", "pad_mask")
            given = dict(zip(names, args)) | {k: v for k, v in kwargs.items() if k in names}
            with torch.no_grad():
                self.probs[i, j] = attention_probs(
                    module, given["x"], given.get("q_global"), given.get("pad_mask")
                ).cpu()

        return hook

    def remove(self) -> None:
        for h in self.handles:
            h.remove()


def _stage_attention(model: nn.Module, rec: _Recorder, i: int) -> StageAttention:
    level = model.levels[i]
    ws = level.window_size
    H, W = rec.map_sizes[i]
    grid = (-(-H // ws), -(-W // ws))
    kinds = [isinstance(b.attn, WindowAttentionGlobal) for b in level.blocks]
    local = [j for j, g in enumerate(kinds) if not g]
    glob = [j for j, g in enumerate(kinds) if g]

    def stack(blocks: list[int]) -> torch.Tensor:
        if not blocks:
            heads, N = level.blocks[0].attn.num_heads, ws * ws
            B = next(iter(rec.probs.values())).shape[0]
            return torch.zeros(B, 0, grid[0] * grid[1], heads, N, N)
        return torch.stack([rec.probs[i, j] for j in blocks], dim=1)  # (B, blocks, nW, heads, N, N)

    stage = StageAttention(
        i, (H, W), ws, grid, model.feature_info[i]["reduction"], local, glob, stack(local), stack(glob), None
    )
    stage.global_map = global_attention_map(stage)
    return stage


def require_gcvit(model: nn.Module) -> None:
    """The attention maps and Grad-CAM read GC ViT's modules (its local and global windows, its stages)."""
    from gcvit.models.gcvit import GCViT

    if not isinstance(model, GCViT):
        raise ValueError(f"expected a GC ViT model (gcvit_*) to visualize; got {type(model).__name__}")


def attention_maps(model: nn.Module, images: torch.Tensor) -> AttentionMaps:
    """Run images through a GC ViT and return its attention probabilities, recomputed from its own weights.

    The model runs in eval mode (restored afterwards) without gradients; the maps come back in float32 on the CPU.

    Args:
        model: a `GCViT` (any variant, any weights).
        images: normalised images (B, 3, H, W) or (3, H, W), any H, W >= 32.

    Returns:
        An `AttentionMaps`: per stage, every block's probabilities and the global attention map.
    """
    require_gcvit(model)
    images = _check_images(images)
    rec = _Recorder(model)
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            logits = model(images)
    finally:
        rec.remove()
        model.train(was_training)
    stages = [_stage_attention(model, rec, i) for i in range(len(model.levels))]
    return AttentionMaps(stages, logits.float().cpu(), tuple(images.shape[2:]))


def _check_window(stage: StageAttention, window: tuple[int, int]) -> tuple[int, int]:
    rows, cols = stage.grid
    if len(window) != 2 or not (0 <= window[0] < rows and 0 <= window[1] < cols):
        raise ValueError(
            f"window {tuple(window)} is out of range: stage {stage.stage} has {rows} x {cols} windows "
            f"(expected row 0..{rows - 1}, column 0..{cols - 1})"
        )
    return window[0], window[1]


def _real_extent(stage: StageAttention, window: tuple[int, int]) -> tuple[int, int]:
    """(rows, columns) of real (unpadded) tokens in a window."""
    ws = stage.window_size
    H, W = stage.map_size
    return min(ws, H - window[0] * ws), min(ws, W - window[1] * ws)


def default_query(stage: StageAttention, window: tuple[int, int]) -> tuple[int, int]:
    """The centre token (row, column) of the window's real (unpadded) part."""
    h, w = _real_extent(stage, _check_window(stage, window))
    return h // 2, w // 2


def local_attention(
    maps: AttentionMaps,
    stage: int,
    window: tuple[int, int],
    query: tuple[int, int] | None = None,
    block: int | None = None,
) -> torch.Tensor:
    """Local attention of one query token over the keys of its window.

    Args:
        maps: from `attention_maps`.
        stage: stage index (negative counts from the end).
        window: (row, column) of the window in the stage's window grid (`maps.stages[stage].grid`).
        query: (row, column) of the query token inside the window; None: the centre of the window's real part.
        block: index of a local block in the stage (`local_blocks`); None: the mean over the stage's local blocks.

    Returns:
        (B, ws, ws): probabilities over the window's keys averaged over heads (and blocks); each image's map sums
        to one, with zeros on padded tokens.
    """
    n = len(maps.stages)
    if not isinstance(stage, int) or not -n <= stage < n:
        raise ValueError(f"stage {stage!r} is out of range: this model has {n} stages (expected {-n}..{n - 1})")
    st = maps.stages[stage]
    r, c = _check_window(st, window)
    h, w = _real_extent(st, (r, c))
    qr, qc = default_query(st, (r, c)) if query is None else query
    if not (0 <= qr < h and 0 <= qc < w):
        raise ValueError(f"query token {(qr, qc)} is outside the real {h} x {w} tokens of window {(r, c)}")
    if block is None:
        probs = st.local_probs.mean(1)  # (B, nW, heads, N, N)
    elif block in st.local_blocks:
        probs = st.local_probs[:, st.local_blocks.index(block)]
    else:
        raise ValueError(f"block {block!r} is not a local block of stage {st.stage}; expected one of {st.local_blocks}")
    ws = st.window_size
    row = probs[:, r * st.grid[1] + c, :, qr * ws + qc]  # (B, heads, N_k)
    return row.mean(1).view(-1, ws, ws)  # (B, ws, ws)


def to_image(stage_map: torch.Tensor, stride: int, image_size: tuple[int, int]) -> torch.Tensor:
    """A stage map (B, H_i, W_i) -> (B, H, W) on the image: token (r, c) sits at pixel (r*stride, c*stride), the
    centre of its receptive field (the stem and every downsampling are 3x3 convolutions of stride 2 and padding 1,
    so output i is centred on input 2i), with bilinear values between tokens and the edge tokens' values beyond."""
    _, h, w = stage_map.shape
    H, W = image_size
    size = ((h - 1) * stride + 1, (w - 1) * stride + 1)  # pixel r*stride <-> token r exactly
    up = F.interpolate(stage_map[:, None].float(), size=size, mode="bilinear", align_corners=True)
    up = F.pad(up, (0, max(0, W - size[1]), 0, max(0, H - size[0])), mode="replicate")
    return up[:, 0, :H, :W]


def _cell_edge(token: float, stride: int) -> float:
    """Where token `token`'s cell begins in plot coordinates (pixel k spans [k - 0.5, k + 0.5]): half a stride
    before the token's centre pixel, token * stride."""
    return token * stride - stride / 2


# --- Grad-CAM -----------------------------------------------------------------------------------------------------


def grad_cam(
    model: nn.Module, images: torch.Tensor, class_idx: int | Sequence[int] | None = None, stage: int = -1
) -> GradCAM:
    """Grad-CAM (Selvaraju et al. 2017) on a stage's output map (before downsampling; the last stage after the
    final norm, as `forward_intermediates` reports them).

    With A the map (C channels) and y the class logit: weights = dy/dA averaged over the map, cam = ReLU(sum over
    channels of weights * A), divided by its maximum per image.

    Args:
        model: a `GCViT` with a classification head.
        images: normalised images (B, 3, H, W) or (3, H, W).
        class_idx: the class to explain, one for all images or one per image; None: each image's predicted class.
        stage: which stage's map (negative counts from the end).

    Returns:
        A `GradCAM`; the model runs in eval mode (restored afterwards) and its parameters get no gradients.
    """
    require_gcvit(model)
    images = _check_images(images)
    stage = _check_stage(model, stage)
    if not getattr(model, "num_classes", 0):
        raise ValueError("Grad-CAM needs a classification head; this model has none (num_classes=0)")
    last = stage == len(model.levels) - 1
    target = model.norm if last else model.levels[stage].blocks[-1]  # output NHWC (B, H_i, W_i, C)
    given = 0 if class_idx is None else torch.as_tensor(class_idx).numel()
    if class_idx is not None and given not in (1, len(images)):
        raise ValueError(f"expected one class_idx for all {len(images)} images or one per image; got {given}")
    captured: list[torch.Tensor] = []

    def capture(module: nn.Module, args: Any, out: torch.Tensor) -> torch.Tensor:
        if not out.requires_grad:  # a frozen model: the map itself is what the gradient is taken against
            out = out.detach().requires_grad_()
        captured.append(out)
        return out

    handle = target.register_forward_hook(capture)
    was_training = model.training
    model.eval()
    try:
        with torch.inference_mode(False), torch.enable_grad():  # also when called under inference_mode
            logits = model(images.clone()).float()
            if class_idx is None:
                idx = logits.argmax(-1)
            else:
                idx = torch.as_tensor(class_idx, dtype=torch.long).reshape(-1).expand(len(images)).to(logits.device)
            if ((idx < 0) | (idx >= logits.shape[-1])).any():
                raise ValueError(f"class_idx {class_idx!r} out of range: the model has {logits.shape[-1]} classes")
            score = logits.gather(1, idx[:, None]).sum()
            (grad,) = torch.autograd.grad(score, captured[-1])  # (B, H_i, W_i, C)
    finally:
        handle.remove()
        model.train(was_training)
    feats = captured[-1].detach().float()  # (B, H_i, W_i, C)
    weights = grad.float().mean(dim=(1, 2), keepdim=True)  # (B, 1, 1, C)
    cam = (feats * weights).sum(-1).relu()  # (B, H_i, W_i)
    peak = cam.amax(dim=(1, 2), keepdim=True)
    cam = torch.where(peak > 0, cam / peak.clamp_min(torch.finfo(cam.dtype).tiny), torch.zeros_like(cam))
    return GradCAM(cam.cpu(), idx.cpu(), logits.detach().cpu(), stage, model.feature_info[stage]["reduction"])


# --- figures ------------------------------------------------------------------------------------------------------


def _subplots(nrows: int, ncols: int, **figure: Any) -> tuple[Any, Any]:
    try:
        return subplots(nrows, ncols, **figure)
    except ImportError as e:
        raise ImportError(f"the figures need matplotlib: {install_hint('train')}") from e


def denormalize(images: torch.Tensor, mean: Sequence[float], std: Sequence[float]) -> torch.Tensor:
    """Normalised images (B, 3, H, W) -> displayable (B, H, W, 3) in [0, 1]: what the model saw."""
    mean_t = torch.tensor(mean, dtype=torch.float32).view(1, 3, 1, 1)
    std_t = torch.tensor(std, dtype=torch.float32).view(1, 3, 1, 1)
    x = images.detach().float().cpu() * std_t + mean_t
    return x.clamp(0, 1).permute(0, 2, 3, 1)  # NCHW -> NHWC


def _overlay(ax: Any, image: torch.Tensor, heat: torch.Tensor | None, title: str, **imshow: Any) -> Any:
    ax.imshow(image.numpy())
    im = None if heat is None else ax.imshow(heat.numpy(), cmap="jet", alpha=0.45, **imshow)
    ax.set_title(title, fontsize=9)
    ax.set_axis_off()
    return im


def _window_lines(ax: Any, stage: StageAttention, image_size: tuple[int, int]) -> None:
    """Thin white lines between the stage's windows, in image pixels (between the cells of their edge tokens)."""
    H, W = image_size
    ws, s = stage.window_size, stage.stride
    rows, cols = stage.grid
    for line, count, extent in ((ax.axhline, rows, H), (ax.axvline, cols, W)):
        for edge in (_cell_edge(k * ws, s) for k in range(1, count)):
            if 0 <= edge < extent:
                line(edge, color="white", lw=0.6, alpha=0.8)


def plot_global_attention(
    image: torch.Tensor, maps: AttentionMaps, path: PathLike, index: int = 0, dpi: int = 100
) -> Path:
    """One panel per stage: the global attention map (see `global_attention_map`) over the image, windows outlined.

    Args:
        image: (H, W, 3) in [0, 1], as `denormalize` gives.
        maps: from `attention_maps`.
        path: the PNG to write.
        index: which image of the batch.
        dpi: resolution of the PNG.
    """
    n = len(maps.stages)
    fig, axes = _subplots(1, n + 1, figsize=(3.2 * (n + 1), 3.6))
    _overlay(axes[0], image, None, f"input {maps.image_size[0]}x{maps.image_size[1]}")
    for ax, st in zip(axes[1:], maps.stages):
        if st.global_map is None:
            _overlay(ax, image, None, f"stage {st.stage}: no global block")
            continue
        heat = to_image(st.global_map[index : index + 1], st.stride, maps.image_size)[0]
        im = _overlay(ax, image, heat, f"stage {st.stage}: {st.grid[0]}x{st.grid[1]} windows of {st.window_size}")
        _window_lines(ax, st, maps.image_size)
        fig.colorbar(im, ax=ax, fraction=0.046, pad=0.02).ax.tick_params(labelsize=7)
    fig.suptitle("global attention: share of each window's attention per key (global queries, heads averaged)")
    return _save(fig, path, dpi)


def _save(fig: Any, path: PathLike, dpi: int) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.tight_layout()
    fig.savefig(path, dpi=dpi)
    return path


def plot_local_attention(
    image: torch.Tensor,
    maps: AttentionMaps,
    path: PathLike,
    stage: int,
    window: tuple[int, int],
    query: tuple[int, int] | None = None,
    index: int = 0,
    dpi: int = 100,
) -> Path:
    """The local attention of one query token (marked x) over its window (outlined): on the image and zoomed in.

    Args:
        image: (H, W, 3) in [0, 1].
        maps, stage, window, query: as for `local_attention`.
        path: the PNG to write.
        index: which image of the batch.
        dpi: resolution of the PNG.
    """
    st = maps.stages[stage]
    query = default_query(st, window) if query is None else query
    heat = local_attention(maps, stage, window, query)[index]  # (ws, ws)
    h, w = _real_extent(st, window)
    s, ws = st.stride, st.window_size
    r0, c0 = window[0] * ws, window[1] * ws  # the window's first token
    y0, x0, y1, x1 = _cell_edge(r0, s), _cell_edge(c0, s), _cell_edge(r0 + h, s), _cell_edge(c0 + w, s)
    fig, (left, right) = _subplots(1, 2, figsize=(8, 4))
    from matplotlib.patches import Rectangle  # matplotlib is there: _subplots checked

    title = f"stage {st.stage}, window {tuple(window)}, query {tuple(query)}"
    _overlay(left, image, heat[:h, :w], title, extent=(x0, x1, y1, y0))
    left.set_xlim(-0.5, maps.image_size[1] - 0.5)
    left.set_ylim(maps.image_size[0] - 0.5, -0.5)
    left.add_patch(Rectangle((x0, y0), x1 - x0, y1 - y0, fill=False, color="cyan", lw=1.5))
    left.plot([(c0 + query[1]) * s], [(r0 + query[0]) * s], "wx", ms=8, mew=2)  # the query token's centre
    # the window zoomed in, one unit per token: the image pixels under its cells, placed where the cells put them
    rows = slice(max(0, math.ceil(y0 - 0.5)), min(maps.image_size[0], math.floor(y1 + 0.5) + 1))  # every pixel
    cols = slice(max(0, math.ceil(x0 - 0.5)), min(maps.image_size[1], math.floor(x1 + 0.5) + 1))  # a cell touches

    def units(pixel: int, edge: float) -> float:  # pixel's top/left edge in tokens from the window's cell edge
        return (pixel - 0.5 - edge) / s

    crop_extent = (units(cols.start, x0), units(cols.stop, x0), units(rows.stop, y0), units(rows.start, y0))
    right.imshow(image[rows, cols].numpy(), extent=crop_extent)
    im = right.imshow(heat[:h, :w].numpy(), cmap="jet", alpha=0.45, extent=(0, w, h, 0))
    right.set_xlim(0, w)
    right.set_ylim(h, 0)
    right.set_title("local attention (blocks, heads averaged)", fontsize=9)
    right.set_axis_off()
    right.plot([query[1] + 0.5], [query[0] + 0.5], "wx", ms=10, mew=2)
    fig.colorbar(im, ax=right, fraction=0.046, pad=0.02).ax.tick_params(labelsize=7)
    return _save(fig, path, dpi)


def plot_grad_cam(
    image: torch.Tensor,
    cam: GradCAM,
    path: PathLike,
    classes: Sequence[str] | None = None,
    index: int = 0,
    dpi: int = 100,
) -> Path:
    """The input and its Grad-CAM overlay, titled with the class explained and its probability.

    Args:
        image: (H, W, 3) in [0, 1].
        cam: from `grad_cam`.
        path: the PNG to write.
        classes: class names by index; None: indices.
        index: which image of the batch.
        dpi: resolution of the PNG.
    """
    c = int(cam.class_idx[index])
    p = float(cam.logits[index].softmax(-1)[c])
    name = classes[c] if classes is not None else str(c)
    size = (image.shape[0], image.shape[1])
    heat = to_image(cam.cam[index : index + 1], cam.stride, size)[0]
    fig, (left, right) = _subplots(1, 2, figsize=(7, 3.8))
    _overlay(left, image, None, "input")
    im = _overlay(right, image, heat, f"Grad-CAM, stage {cam.stage}: class {name} (p={p:.3f})", vmin=0, vmax=1)
    fig.colorbar(im, ax=right, fraction=0.046, pad=0.02).ax.tick_params(labelsize=7)
    return _save(fig, path, dpi)
