"""gcvit.train.optim: parameter groups (weight decay, layer decay), fused AdamW, the warmup and cosine schedule."""

from __future__ import annotations

import copy
import itertools
import math
from pathlib import Path

import pytest
import torch

pytest.importorskip("sklearn")
pytest.importorskip("yaml")

import gcvit
from gcvit.train.optim import build_optimizer, build_scheduler, layer_id, param_groups
from tests.conftest import TINY

pytestmark = pytest.mark.usefixtures("one_thread")  # one torch thread (tests/conftest.py)


@pytest.mark.parametrize(
    ("name", "kw", "layers"),
    [
        ("swin_tiny", {"depths": (1, 1, 2, 1)}, 5),
        ("vit_tiny", {"depth": 3, "patch_size": 8}, 3),
    ],
)
def test_layer_decay_falls_off_block_by_block_for_swin_and_vit(name: str, kw: dict, layers: int) -> None:
    """Swin and ViT get one lr level per block, as GC ViT does: stem lowest, head 1.0, blocks in between."""
    model = gcvit.create_model(name, num_classes=3, img_size=32, **kw)
    by_name = {id(p): n for n, p in model.named_parameters()}
    scale = {by_name[id(p)]: g["lr_scale"] for g in param_groups(model, 0.05, 0.5) for p in g["params"]}
    assert sorted(set(scale.values())) == pytest.approx([0.5**k for k in range(layers + 1, -1, -1)])
    assert scale["patch_embed.proj.weight"] == pytest.approx(0.5 ** (layers + 1)) and scale["head.weight"] == 1.0
    first, last = ("layers.0.blocks.0", "layers.3.blocks.0") if name == "swin_tiny" else ("blocks.0", "blocks.2")
    assert scale[f"{first}.attn.qkv.weight"] == pytest.approx(0.5**layers)
    assert scale[f"{last}.mlp.fc2.weight"] == pytest.approx(0.5)
    if name == "swin_tiny":  # patch merging opening stage 3 goes with the block before it (stage 2's last)
        assert scale["layers.3.downsample.reduction.weight"] == scale["layers.2.blocks.1.attn.qkv.weight"]


def test_no_weight_decay_groups_and_layer_ids() -> None:
    model = gcvit.create_model("gcvit_xxtiny", num_classes=10, img_size=32, **TINY)
    groups = param_groups(model, 0.05, layer_decay=0.5)
    names = {id(p): n for n, p in model.named_parameters()}
    for g in groups:
        for p in g["params"]:
            decays = g["weight_decay"] > 0
            assert decays == (p.ndim > 1 and not names[id(p)].endswith("relative_position_bias_table"))
    assert sum(len(g["params"]) for g in groups) == len(list(model.parameters()))
    blocks_before, n = [0, 1, 2, 3], 4
    assert layer_id("patch_embed.proj.weight", n, blocks_before) == 0
    assert layer_id("levels.2.blocks.0.attn.qkv.weight", n, blocks_before) == 3
    assert layer_id("head.weight", n, blocks_before) == 5
    scales = {g["lr_scale"] for g in groups}
    assert max(scales) == 1.0 and min(scales) == pytest.approx(0.5**5)


def test_optimizer_is_fused_adamw_with_the_per_tensor_updates() -> None:
    """build_optimizer takes PyTorch's fused AdamW on the CPU; five steps over the layer-decay groups (decay and no
    decay, scaled lrs) land where the per-tensor loop lands."""
    torch.manual_seed(0)
    model = gcvit.create_model(
        "gcvit_xxtiny", depths=(1, 1, 2, 1), embed_dim=16, num_heads=(1, 2, 2, 4), img_size=32, drop_path_rate=0.0
    )
    reference = copy.deepcopy(model)
    start = model.patch_embed.proj.weight.detach().clone()
    opt = build_optimizer(model, 1e-2, 0.05, 0.75)
    twin = dict(zip(model.parameters(), reference.parameters()))
    groups = [
        {**{k: v for k, v in g.items() if k not in ("fused", "foreach")}, "params": [twin[p] for p in g["params"]]}
        for g in opt.param_groups
    ]  # the same groups, each taking the constructor's per-tensor loop
    ref_opt = torch.optim.AdamW(groups, fused=False, foreach=False)
    assert (
        opt.defaults["fused"]
        and len({g["lr"] for g in groups}) > 2
        and {g["weight_decay"] for g in groups} == {0, 0.05}
    )
    for _ in range(5):  # both take the model's gradients: Adam turns rounding noise in near-zero gradients into
        # lr-sized steps (the key bias gets none mathematically), so each side's own backward would part them
        opt.zero_grad()
        model(torch.randn(4, 3, 32, 32)).square().mean().backward()
        for p, q in twin.items():
            q.grad = None if p.grad is None else p.grad.clone()
        opt.step()
        ref_opt.step()
    for (name, p), q in zip(model.named_parameters(), reference.parameters()):
        torch.testing.assert_close(p, q, rtol=1e-5, atol=1e-7, msg=lambda m, name=name: f"{name}: {m}")
    assert (model.patch_embed.proj.weight - start).abs().max() > 1e-3  # the steps moved the weights


def test_adamw_settings_and_where_the_global_query_generator_and_downsampling_decay() -> None:
    """AdamW (0.9, 0.999), eps 1e-8 (the spec's); a stage's global query generator takes its first block's lr level,
    its downsampling its last block's."""
    opt = build_optimizer(torch.nn.Linear(2, 2), 1e-3, 0.05, None)
    assert opt.defaults["betas"] == (0.9, 0.999) and opt.defaults["eps"] == 1e-8
    assert opt.defaults["weight_decay"] == pytest.approx(0.01)  # PyTorch's, unused: every group sets its own
    assert [g["weight_decay"] for g in opt.param_groups] == [0.05, 0.0]  # the weight, then the bias
    blocks_before, n = [0, 2, 4, 10], 12  # depths 2, 2, 6, 2
    assert layer_id("levels.1.q_global_gen.to_q_global.0.conv.0.weight", n, blocks_before) == 3
    assert layer_id("levels.1.blocks.0.mlp.fc1.weight", n, blocks_before) == 3
    assert layer_id("levels.1.downsample.reduction.weight", n, blocks_before) == 4
    assert layer_id("levels.1.blocks.1.mlp.fc1.weight", n, blocks_before) == 4
    assert layer_id("levels.3.downsample.norm.weight", n, blocks_before) == 12
    assert layer_id("norm.weight", n, blocks_before) == 13


def test_the_schedule_keeps_each_groups_layer_decay_and_warms_up_linearly() -> None:
    """Every step, each group's lr is the schedule's factor times lr times its layer-decay scale (a scheduler that
    forgot the scales would train every layer at the head's lr); warmup is a straight line from warmup_lr to lr."""
    from gcvit.train.optim import lr_factor

    model = gcvit.create_model("gcvit_xxtiny", num_classes=3, img_size=32, **TINY)
    opt = build_optimizer(model, 1e-3, 0.05, 0.5)
    scales = [g["lr_scale"] for g in opt.param_groups]
    assert min(scales) == pytest.approx(0.5**5) and max(scales) == 1.0  # TINY: four blocks
    sched = build_scheduler(opt, total_steps=100, warmup_steps=10, lr=1e-3, min_lr=0.0, warmup_lr=5e-4)
    for step in range(30):
        factor = lr_factor(step, 100, 10, 1e-3, 0.0, 5e-4)
        assert [g["lr"] for g in opt.param_groups] == pytest.approx([factor * 1e-3 * k for k in scales]), step
        if step == 5:
            assert factor * 1e-3 == pytest.approx(7.5e-4)  # halfway from 5e-4 to 1e-3
        assert factor <= 1.0
        opt.step()
        sched.step()


def test_warmup_then_cosine_per_step() -> None:
    opt = build_optimizer(torch.nn.Linear(2, 2), 1e-3, 0.05, None)
    sched = build_scheduler(opt, total_steps=100, warmup_steps=10, lr=1e-3, min_lr=1e-5, warmup_lr=1e-6)
    lrs = []
    for _ in range(100):
        lrs.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
    assert lrs[0] == pytest.approx(1e-6) and lrs[10] == pytest.approx(1e-3)
    assert all(a <= b for a, b in itertools.pairwise(lrs[:11]))
    assert all(a >= b for a, b in itertools.pairwise(lrs[10:]))
    assert lrs[-1] == pytest.approx(1e-5 + 0.5 * (1e-3 - 1e-5) * (1 + math.cos(math.pi * 89 / 90)))


def test_a_resumed_optimizer_stays_fused(tmp_path: Path) -> None:
    """Loading a state dict replaces each param group whole: a checkpoint from the per-tensor optimizer turned fused
    AdamW off again (and broke fp16's GradScaler, which steps a fused optimizer differently)."""
    from gcvit.train.optim import load_optimizer_state, param_groups

    model = gcvit.create_model("gcvit_xxtiny", img_size=32, num_classes=3, **TINY)
    old = torch.optim.AdamW(param_groups(model, 0.05, 0.75), lr=1e-3, foreach=False)
    model(torch.randn(2, 3, 32, 32)).sum().backward()
    old.step()
    new = build_optimizer(model, 1e-3, 0.05, 0.75)
    load_optimizer_state(new, old.state_dict())
    assert all(g["fused"] and g["foreach"] is None for g in new.param_groups)
    assert all(
        torch.equal(new.state[p]["exp_avg"], old.state[p]["exp_avg"]) for p in model.parameters() if p in old.state
    )
    scaler = torch.amp.GradScaler("cpu")  # the step fp16 training takes after clipping
    scaler.scale(model(torch.randn(2, 3, 32, 32)).sum()).backward()
    scaler.unscale_(new)
    scaler.step(new)
