"""The model interface every registered architecture shares (as timm's and torchvision's test_models.py): forward,
forward_features, forward_intermediates and feature_info, reset_classifier, no_weight_decay, the save_pretrained /
from_pretrained round trip, and batch invariance, for every architecture of every family."""

from __future__ import annotations

import copy
import math
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
from torch import nn

import gcvit
from gcvit.models.base import PyramidClassifier
from gcvit.models.registry import FAMILIES, family_of
from tests.conftest import randomize_

ARCHS = [name for name in gcvit.list_models() if "." not in name]  # every architecture; tags only load weights
NUM_CLASSES = 7
H, W = 80, 112  # multiples of ViT's 16 px patch, not of 32: the pyramids' last stages round their sizes up
BATCH = 3


def small_overrides(arch: str) -> dict[str, object]:
    """At most two blocks per stage (ViT: two blocks), all else the variant's own: widths, heads, windows, MLP ratio,
    layer scale, and both kinds of block in every stage (GC ViT local and global; Swin regular and shifted, which
    shift where the map exceeds a window: stages 0 and 1 at (H, W)). Deeper stages only repeat those blocks and would
    cost seconds per variant to build, save and run; variants that differ only in depth (gcvit_xxtiny to
    gcvit_tiny2, swin_tiny and swin_small) thus check one structure under each of their names."""
    cfg = family_of(arch).variants[arch]
    if hasattr(cfg, "depths"):
        return {"depths": tuple(min(d, 2) for d in cfg.depths)}
    return {"depth": min(cfg.depth, 2)}


@dataclass(frozen=True)
class Run:
    """A model and what it gave for `images`, computed once per architecture (every forward pass is most of this
    file's time) and read by the tests below."""

    model: nn.Module
    images: torch.Tensor  # NCHW (BATCH, 3, H, W)
    logits: torch.Tensor  # model(images)
    features: torch.Tensor  # model.forward_features(images)
    maps: list[torch.Tensor]  # model.forward_intermediates(images)
    hooked: list[torch.Tensor]  # during forward_intermediates, the output of each feature_info[i]["module"]
    singles: torch.Tensor  # model(images[i:i + 1]) for each i, concatenated


@pytest.fixture(scope="module", params=ARCHS)
def run(request: pytest.FixtureRequest) -> Run:
    """The architecture at (H, W) with a 7-class head, every weight perturbed off its initial value (a layer scale
    of 1e-5 would otherwise make GC ViT's blocks near-identities), in eval mode. Tests that change it copy it."""
    torch.manual_seed(0)
    arch = request.param
    model = gcvit.create_model(arch, num_classes=NUM_CLASSES, img_size=(H, W), **small_overrides(arch))
    model = randomize_(model).eval()
    images = torch.randn(BATCH, 3, H, W, generator=torch.Generator().manual_seed(0))  # NCHW
    seen: dict[str, torch.Tensor] = {}
    hooks = [
        model.get_submodule(i["module"]).register_forward_hook(
            lambda m, args, out, key=i["module"]: seen.setdefault(key, out)
        )
        for i in model.feature_info
    ]
    try:
        with torch.no_grad():
            maps = model.forward_intermediates(images)
    finally:
        for hook in hooks:
            hook.remove()
    with torch.no_grad():
        logits, features = model(images), model.forward_features(images)
        singles = torch.cat([model(images[i : i + 1]) for i in range(BATCH)])
    hooked = [seen[i["module"]] for i in model.feature_info]
    return Run(model, images, logits, features, maps, hooked, singles)


def is_pyramid(model: nn.Module) -> bool:
    return isinstance(model, PyramidClassifier)


def tokens_to_map(tokens: torch.Tensor, patch_size: int) -> torch.Tensor:
    """ViT tokens (B, 1 + h*w, C), class token first -> the patch tokens as NCHW (B, C, h, w) at (H, W)."""
    x = tokens[:, 1:]  # (B, h*w, C)
    return x.transpose(1, 2).reshape(x.shape[0], x.shape[2], H // patch_size, W // patch_size)  # NCHW


def test_every_family_and_architecture_is_covered() -> None:
    assert {family_of(a).name for a in ARCHS} == set(FAMILIES)
    assert sorted(ARCHS) == sorted(a for f in FAMILIES.values() for a in f.variants)


def test_forward_gives_finite_logits_per_image(run: Run) -> None:
    """forward = forward_head(forward_features): finite logits (B, num_classes), each image its own."""
    model, logits = run.model, run.logits
    assert model.num_classes == NUM_CLASSES
    assert logits.shape == (BATCH, NUM_CLASSES) and logits.dtype == torch.float32
    assert torch.isfinite(logits).all()
    assert not torch.allclose(logits[0], logits[1])
    with torch.no_grad():
        assert torch.equal(logits, model.forward_head(run.features))


def test_forward_features_shape(run: Run) -> None:
    """Pyramids: the normalised last-stage map NCHW (B, 8C, H/32, W/32), sizes rounded up; ViT: the normalised tokens
    (B, 1 + (H/p)(W/p), C), class token first. Either way forward_head(pre_logits=True) pools them to num_features."""
    model, features, cfg = run.model, run.features, run.model.cfg
    with torch.no_grad():
        pooled = model.forward_head(features, pre_logits=True)
    if is_pyramid(model):
        assert model.num_features == cfg.embed_dim * 2 ** (len(cfg.depths) - 1)
        assert features.shape == (BATCH, model.num_features, math.ceil(H / 32), math.ceil(W / 32))
    else:
        assert model.num_features == cfg.embed_dim
        assert features.shape == (BATCH, 1 + (H // cfg.patch_size) * (W // cfg.patch_size), model.num_features)
    assert pooled.shape == (BATCH, model.num_features)
    assert torch.isfinite(features).all()


def test_forward_intermediates_match_feature_info(run: Run) -> None:
    """One NCHW map per feature_info entry, with its channels, at its stride (sizes rounded up); pyramids give
    C, 2C, 4C, 8C at strides 4, 8, 16, 32, ViT its patch tokens at stride p; the last map is forward_features'."""
    model, maps, cfg = run.model, run.maps, run.model.cfg
    info = model.feature_info
    assert len(maps) == len(info)
    for f, i in zip(maps, info):
        r = i["reduction"]
        assert f.shape == (BATCH, i["num_chs"], math.ceil(H / r), math.ceil(W / r)), i
        assert torch.isfinite(f).all()
    if is_pyramid(model):
        assert [i["num_chs"] for i in info] == [cfg.embed_dim * 2**s for s in range(4)]
        assert [i["reduction"] for i in info] == [4, 8, 16, 32]
        assert torch.equal(maps[-1], run.features)
    else:
        assert [(i["num_chs"], i["reduction"]) for i in info] == [(cfg.embed_dim, cfg.patch_size)]
        assert torch.equal(maps[-1], tokens_to_map(run.features, cfg.patch_size))
    assert info[-1]["num_chs"] == model.num_features


def test_feature_info_modules_output_the_maps(run: Run) -> None:
    """Hook-based extractors read feature_info[i]["module"]: in the pyramids its output is map i in NHWC; in ViT
    (the final norm) it is the token sequence, whose patch tokens are the map."""
    for i, out, f in zip(run.model.feature_info, run.hooked, run.maps, strict=True):
        if is_pyramid(run.model):
            got = out.permute(0, 3, 1, 2)  # NHWC -> NCHW
        else:
            got = tokens_to_map(out, run.model.cfg.patch_size)
        assert torch.equal(got, f), i


def test_reset_classifier_sets_the_output_width(run: Run) -> None:
    """reset_classifier(k) gives a fresh k-class head on the same features; 0 returns the pooled features."""
    image = run.images[:1]  # one image: two more forward passes
    with torch.no_grad():
        pooled = run.model.forward_head(run.features[:1], pre_logits=True)  # (1, num_features)
    model = copy.deepcopy(run.model)
    model.reset_classifier(5)
    assert model.num_classes == model.cfg.num_classes == 5
    assert model.head.weight.shape == (5, model.num_features)
    with torch.no_grad():
        logits = model(image)
        assert logits.shape == (1, 5) and torch.isfinite(logits).all()
        assert torch.allclose(logits, model.head(pooled), rtol=0, atol=1e-5)
    model.reset_classifier(0)
    assert model.num_classes == model.cfg.num_classes == 0
    assert not any(n.startswith("head.") for n, _ in model.named_parameters())
    with torch.no_grad():
        features = model(image)
    assert features.shape == (1, model.num_features)
    assert torch.allclose(features, pooled, rtol=0, atol=1e-5)


def test_no_weight_decay_names_the_position_parameters(run: Run) -> None:
    """Names of real parameters: every relative-position bias table (pyramids), or ViT's position embedding and
    class token (tensors of 2+ dimensions, which the optimizer would otherwise decay)."""
    model = run.model
    names = model.no_weight_decay()
    params = dict(model.named_parameters())
    assert names and names <= params.keys(), sorted(names - params.keys())
    positional = {n for n in params if n.endswith("relative_position_bias_table") or n in ("pos_embed", "cls_token")}
    assert names == positional
    if is_pyramid(model):
        assert len(names) == sum(model.cfg.depths)  # one table per block


def test_save_pretrained_and_from_pretrained_round_trip(run: Run, tmp_path: Path) -> None:
    model = run.model
    model.save_pretrained(tmp_path)
    loaded = gcvit.from_pretrained(tmp_path)
    assert type(loaded) is type(model) and loaded.cfg == model.cfg and not loaded.training
    state = loaded.state_dict()
    assert list(state) == list(model.state_dict())
    assert all(torch.equal(v, state[k]) for k, v in model.state_dict().items())
    with torch.no_grad():
        assert torch.equal(loaded(run.images), run.logits)


def test_batch_equals_one_image_at_a_time(run: Run) -> None:
    diff = (run.logits - run.singles).abs().max().item()
    assert diff < 1e-5, diff
