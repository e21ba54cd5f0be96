"""Stochastic depth that runs each residual branch on the images it keeps equals the textbook mask form."""

from __future__ import annotations

import copy

import pytest
import torch

import gcvit
from gcvit.layers import DropPath


def _drop_path_run(model: torch.nn.Module, x: torch.Tensor, keep: list[bool], monkeypatch: pytest.MonkeyPatch):
    """Output and parameter gradients of one training forward and backward with every DropPath drawing `keep`."""
    monkeypatch.setattr(DropPath, "draw", lambda self, batch: torch.tensor(keep))
    model.zero_grad(set_to_none=True)
    out = model(x)
    out.pow(2).sum().backward()
    return out.detach(), {n: p.grad for n, p in model.named_parameters()}


def _skip_and_mask_forms(name: str, size: int) -> tuple[torch.nn.Module, torch.nn.Module]:
    """A 10-class model in training mode with drop path 0.4, and a copy whose DropPaths run the mask form."""
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


TIMM_NAMES = {"swin_tiny": "swin_tiny_patch4_window7_224", "vit_small": "vit_small_patch16_224"}


@pytest.mark.parametrize("name", ["gcvit_tiny", "swin_tiny", "vit_small"])
def test_drop_path_rates_rise_block_by_block_as_timms(name: str) -> None:
    """Block k of n drops with rate * k / (n - 1), as in timm (the schedule the recipes were tuned with)."""
    timm = pytest.importorskip("timm")
    with torch.device("meta"):
        ours = gcvit.create_model(name, drop_path_rate=0.3)
        theirs = timm.create_model(TIMM_NAMES.get(name, name), drop_path_rate=0.3)
    rates = [m.p for m in ours.modules() if isinstance(m, DropPath)]
    paths = [m for n, m in theirs.named_modules() if n.endswith("drop_path1")]
    reference = [getattr(m, "drop_prob", 0.0) for m in paths]  # timm's first block has an Identity (rate 0)
    assert len(rates) == len(reference) and rates == pytest.approx(reference, abs=1e-7)  # one per block, both branches


def test_drop_path_keeps_each_image_with_1_minus_p_and_rescales_it() -> None:
    """E[x + drop_path(b)] = x + b: the kept images' branches are scaled by 1 / (1 - p), the dropped add nothing."""
    torch.manual_seed(0)
    drop = DropPath(0.2).train()
    x = torch.full((100_000, 2), 3.0)
    out = drop.residual(x, lambda rows_x, rows: torch.ones_like(rows_x))
    kept = out[:, 0] != 3.0
    assert abs(kept.float().mean().item() - 0.8) < 0.005
    assert torch.equal(out[kept], torch.full_like(out[kept], 3.0 + 1.0 / 0.8))
    assert abs(out.mean().item() - 4.0) < 0.01
