"""`gcvit.visualize` and `gcvit visualize`: the maps are the model's real attention, each query's attention sums to
one, Grad-CAM matches its closed form on the last stage, and the command writes readable PNGs for a real photo."""

from __future__ import annotations

import copy
import dataclasses
import re
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

import gcvit
from gcvit import visualize as viz
from gcvit.cli import main
from gcvit.layers import WindowAttentionGlobal, window_partition
from tests.conftest import randomize_

skimage_data = pytest.importorskip("skimage.data")

MEAN, STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)


@pytest.fixture(scope="module")
def model() -> gcvit.GCViT:
    torch.manual_seed(0)
    return randomize_(gcvit.create_model("gcvit_xxtiny")).eval()


def _photo(size: tuple[int, int]) -> torch.Tensor:
    """scikit-image's cat photo (300 x 451) resized to `size`, normalised: (1, 3, H, W)."""
    x = torch.from_numpy(skimage_data.chelsea().copy()).permute(2, 0, 1)[None].float() / 255  # (1, 3, 300, 451)
    x = F.interpolate(x, size=size, mode="bilinear", antialias=True, align_corners=False)
    return (x - torch.tensor(MEAN).view(1, 3, 1, 1)) / torch.tensor(STD).view(1, 3, 1, 1)


# two sizes: the native one, and one that pads every stage (stage maps 24x32, 12x16, 6x8, 3x4 vs windows 7, 7, 14, 7)
SIZES = {"native": (224, 224), "padded": (96, 128)}


@pytest.fixture(scope="module", params=list(SIZES))
def photo_maps(request: pytest.FixtureRequest, model: gcvit.GCViT) -> tuple[torch.Tensor, viz.AttentionMaps]:
    x = _photo(SIZES[request.param])
    return x, viz.attention_maps(model, x)


@pytest.mark.parametrize("size", list(SIZES))
def test_recomputed_attention_reproduces_every_module_output(model: gcvit.GCViT, size: str) -> None:
    """proj(probs @ v) with the recomputed probabilities gives back what each attention module returned, for a batch
    of two images (each with its own global query)."""
    x = torch.cat([_photo(SIZES[size]), _photo(SIZES[size]).flip(-1)])
    seen: dict[str, tuple[tuple, torch.Tensor]] = {}
    handles = [
        m.register_forward_hook(lambda mod, args, out, name=name: seen.__setitem__(name, (args, out)))
        for name, m in model.named_modules()
        if name.endswith(".attn")
    ]
    try:
        with torch.no_grad():
            model(x)
    finally:
        for h in handles:
            h.remove()
    assert len(seen) == sum(model.cfg.depths)
    worst, masked = 0.0, 0
    with torch.no_grad():
        for name, ((windows, q_global, pad_mask), out) in seen.items():
            attn = model.get_submodule(name)
            probs = viz.attention_probs(attn, windows, q_global, pad_mask)  # (B, nW, heads, N, N)
            B, nW, N, C = windows.shape
            parts = 2 if isinstance(attn, WindowAttentionGlobal) else 3
            v = attn.qkv(windows).view(B, nW, N, parts, attn.num_heads, attn.head_dim)[:, :, :, -1]  # (B, nW, N, h, hd)
            mixed = probs @ v.transpose(2, 3)  # (B, nW, heads, N, hd)
            again = attn.proj(mixed.transpose(2, 3).reshape(B, nW, N, C))  # (B, nW, N, C)
            worst = max(worst, float((again - out).abs().max()))
            masked += pad_mask is not None
    assert worst < 1e-5, worst
    # at 96 x 128 every stage is padded (the mask path), at 224 none is
    assert masked == (sum(model.cfg.depths) if size == "padded" else 0)


def test_attention_maps_hold_the_recomputed_probabilities(model: gcvit.GCViT) -> None:
    x = _photo(SIZES["padded"])
    inputs: dict[str, tuple] = {}
    handles = [
        model.get_submodule(f"levels.{i}.blocks.{j}.attn").register_forward_pre_hook(
            lambda mod, args, key=(i, j): inputs.__setitem__(key, args)
        )
        for i, d in enumerate(model.cfg.depths)
        for j in range(d)
    ]
    model.train()
    try:
        maps = viz.attention_maps(model, x)
    finally:
        for h in handles:
            h.remove()
        assert model.training  # restored
        model.eval()
    for st in maps.stages:
        for kind, blocks, probs in (
            ("local", st.local_blocks, st.local_probs),
            ("global", st.global_blocks, st.global_probs),
        ):
            for g, j in enumerate(blocks):
                attn = model.levels[st.stage].blocks[j].attn
                assert isinstance(attn, WindowAttentionGlobal) == (kind == "global")
                torch.testing.assert_close(probs[:, g], viz.attention_probs(attn, *inputs[st.stage, j]))
    torch.testing.assert_close(maps.logits, model(x).detach())


def test_every_query_distribution_sums_to_one(photo_maps: tuple[torch.Tensor, viz.AttentionMaps]) -> None:
    """Each (image, block, window, head, query) row of probabilities sums to one over its keys; padded keys get 0."""
    x, maps = photo_maps
    assert maps.image_size == tuple(x.shape[2:])
    for st in maps.stages:
        ws, (rows, cols) = st.window_size, st.grid
        assert (rows, cols) == (-(-st.map_size[0] // ws), -(-st.map_size[1] // ws))
        for probs, blocks in ((st.local_probs, st.local_blocks), (st.global_probs, st.global_blocks)):
            heads = probs.shape[3]
            assert probs.shape == (1, len(blocks), rows * cols, heads, ws * ws, ws * ws)
            assert float((probs.sum(-1) - 1).abs().max()) < 1e-5
            assert float(probs.min()) >= 0
        real = torch.zeros(1, rows * ws, cols * ws, 1, dtype=torch.bool)
        real[:, : st.map_size[0], : st.map_size[1]] = True
        padded_keys = ~window_partition(real, ws)[:, :, :, 0]  # (1, nW, N_k)
        for probs in (st.local_probs, st.global_probs):
            on_padding = probs * padded_keys[:, None, :, None, None, :]  # (1, blocks, nW, heads, N_q, N_k)
            assert float(on_padding.abs().sum()) == 0


def test_global_map_sums_to_one_inside_every_window(photo_maps: tuple[torch.Tensor, viz.AttentionMaps]) -> None:
    """The global map at key positions holds each window's mean (over global queries, heads and blocks) attention,
    so the real tokens of every window sum to one."""
    _, maps = photo_maps
    for st in maps.stages:
        assert st.global_map is not None and st.global_map.shape == (1, *st.map_size)
        ws, (rows, cols) = st.window_size, st.grid
        full = F.pad(st.global_map, (0, cols * ws - st.map_size[1], 0, rows * ws - st.map_size[0]))  # (1, Hp, Wp)
        per_window = window_partition(full[..., None], ws).sum((2, 3))  # (1, nW)
        assert float((per_window - 1).abs().max()) < 1e-5
        upsampled = viz.to_image(st.global_map, st.stride, maps.image_size)
        assert upsampled.shape == (1, *maps.image_size)


def test_window_to_map_inverts_window_partition() -> None:
    m = torch.randn(2, 10, 15)  # (B, H, W), padded to 14 x 21 for windows of 7
    windows = window_partition(F.pad(m, (0, 6, 0, 4))[..., None], 7)[..., 0]  # (B, nW, N)
    torch.testing.assert_close(viz.window_to_map(windows, (2, 3), (10, 15)), m, rtol=0, atol=0)


def test_local_attention_of_a_window(photo_maps: tuple[torch.Tensor, viz.AttentionMaps]) -> None:
    _, maps = photo_maps
    st = maps.stages[0]
    last = (st.grid[0] - 1, st.grid[1] - 1)  # the bottom-right window: partly padding at the padded size
    for window in [(0, 0), last]:
        local = viz.local_attention(maps, 0, window)
        assert local.shape == (1, st.window_size, st.window_size)
        assert abs(float(local.sum()) - 1) < 1e-5
        h, w = min(7, st.map_size[0] - 7 * window[0]), min(7, st.map_size[1] - 7 * window[1])
        assert float(local[:, h:].abs().sum() + local[:, :, w:].abs().sum()) == 0  # padded keys
        qr, qc = viz.default_query(st, window)
        assert (qr, qc) == (h // 2, w // 2)
        w_idx, q_idx = window[0] * st.grid[1] + window[1], qr * 7 + qc
        expected = st.local_probs[0, 0, w_idx, :, q_idx].mean(0).view(7, 7)  # one local block in stage 0
        torch.testing.assert_close(local[0], expected)
    one = viz.local_attention(maps, 2, (0, 0), query=(0, 0), block=2)
    torch.testing.assert_close(one[0], maps.stages[2].local_probs[0, 1, 0, :, 0].mean(0).view(14, 14))


def test_local_attention_rejects_bad_indices(photo_maps: tuple[torch.Tensor, viz.AttentionMaps]) -> None:
    _, maps = photo_maps
    rows, cols = maps.stages[0].grid
    with pytest.raises(ValueError, match=rf"window \({rows}, 0\) is out of range: stage 0 has {rows} x {cols}"):
        viz.local_attention(maps, 0, (rows, 0))
    with pytest.raises(ValueError, match=r"stage 4 is out of range: this model has 4 stages \(expected -4..3\)"):
        viz.local_attention(maps, 4, (0, 0))
    with pytest.raises(ValueError, match="query token"):
        viz.local_attention(maps, 0, (0, 0), query=(7, 0))
    with pytest.raises(ValueError, match=r"block 1 is not a local block of stage 0; expected one of \[0\]"):
        viz.local_attention(maps, 0, (0, 0), block=1)


def test_grad_cam_on_the_last_stage_is_the_class_activation_map(model: gcvit.GCViT) -> None:
    """With global average pooling and a linear head, d logit_c / dA = W_c / (h w) everywhere, so Grad-CAM reduces to
    ReLU(sum_k W_ck A_k) (Zhou et al.'s CAM) up to scale."""
    x = torch.cat([_photo(SIZES["padded"]), _photo(SIZES["padded"]).flip(-1)])
    cam = viz.grad_cam(model, x)  # each image's predicted class
    with torch.no_grad():
        feats = model.forward_intermediates(x)[-1]  # NCHW (B, 8C, h, w)
        logits = model(x)
    idx = logits.argmax(-1)
    assert cam.class_idx.tolist() == idx.tolist() and cam.stage == 3 and cam.stride == 32
    torch.testing.assert_close(cam.logits, logits)
    expected = torch.einsum("bchw,bc->bhw", feats, model.head.weight[idx]).relu()
    expected = expected / expected.amax(dim=(1, 2), keepdim=True)
    assert cam.cam.shape == (2, 3, 4)
    torch.testing.assert_close(cam.cam, expected, atol=1e-5, rtol=1e-4)


def test_grad_cam_responds_to_the_class_at_any_stage(model: gcvit.GCViT) -> None:
    x = _photo(SIZES["padded"]).expand(2, -1, -1, -1)
    for stage, size in ((0, (24, 32)), (-2, (6, 8))):
        cam = viz.grad_cam(model, x, [0, 1], stage=stage)  # the same image, explained for class 0 and class 1
        assert cam.cam.shape == (2, *size) and cam.class_idx.tolist() == [0, 1]
        assert float(cam.cam.min()) >= 0
        assert cam.cam.amax(dim=(1, 2)).tolist() == pytest.approx([1.0, 1.0])
        assert float(cam.cam.std(dim=(1, 2)).min()) > 0.05  # not flat
        assert float((cam.cam[0] - cam.cam[1]).abs().max()) > 0.2  # another class, another map
    assert not any(p.grad is not None for p in model.parameters())
    with pytest.raises(ValueError, match=r"stage 4 is out of range: this model has 4 stages"):
        viz.grad_cam(model, x, stage=4)
    with pytest.raises(ValueError, match="class_idx 1000 out of range: the model has 1000 classes"):
        viz.grad_cam(model, x, 1000)


# --- the command ------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def photo_file(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from PIL import Image

    path = tmp_path_factory.mktemp("photos") / "chelsea.png"
    Image.fromarray(skimage_data.chelsea()).save(path)
    return path


def _check_pngs(out: str, files: list[Path]) -> None:
    from PIL import Image

    for f in files:
        assert f"wrote {f}" in out
        assert f.stat().st_size > 5000
        with Image.open(f) as im:
            im.verify()
        with Image.open(f) as im:
            assert im.format == "PNG" and min(im.size) > 200


def test_cli_writes_the_three_figures(photo_file: Path, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    out_dir = tmp_path / "viz"
    args = [
        "visualize",
        str(photo_file),
        "--model",
        "gcvit_xxtiny",
        "--out-dir",
        str(out_dir),
        "--img-size",
        "96",
        "128",
    ]
    assert main([*args, "--stage", "1", "--window", "1", "2", "--class", "7"]) == 0
    out = capsys.readouterr().out
    assert "gcvit_xxtiny (random weights" in out and "input (96, 128)" in out
    assert "stage 1: map (12, 16), 2x3 windows of 7, 1 local + 1 global blocks" in out
    assert "Grad-CAM of class 7 at stage 1" in out  # maps of stages 2 and 3 are 6 x 8 and 3 x 4: under 7 x 7
    _check_pngs(out, [out_dir / f"chelsea_{k}.png" for k in ("global", "local", "gradcam")])


def _tiny_run(run_dir: Path) -> Path:
    """A run folder as `gcvit train` writes it: a small 32 px model with named classes."""
    from gcvit.train import checkpoint as ckpt

    arch = {"embed_dim": 16, "depths": (1, 1, 2, 1), "num_heads": (1, 2, 2, 4), "window_size": (4, 4, 4, 2)}
    model = gcvit.create_model("gcvit_xxtiny", num_classes=3, img_size=32, **arch)
    config = {
        "model": "gcvit_xxtiny",
        "config": dataclasses.asdict(model.cfg),
        "classes": ["cat", "dog", "owl"],
        "img_size": [32, 32],
        "mean": list(MEAN),
        "std": list(STD),
    }
    ckpt.write_checkpoint(run_dir, "best", model.state_dict(), config, {"epoch": 1})
    return run_dir


def test_cli_takes_a_run_folder(photo_file: Path, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    run = _tiny_run(tmp_path / "run")
    out_dir = tmp_path / "viz"
    assert main(["visualize", str(photo_file), "--model", str(run), "--out-dir", str(out_dir), "--class", "owl"]) == 0
    out = capsys.readouterr().out
    assert f"gcvit_xxtiny from {run / 'best' / 'model.safetensors'}; input (32, 32): predicted class" in out
    assert "stage 0: map (8, 8), 2x2 windows of 4, 1 local + 0 global blocks" in out
    assert "Grad-CAM of class owl at stage 0" in out
    _check_pngs(out, [out_dir / f"chelsea_{k}.png" for k in ("global", "local", "gradcam")])
    assert main(["visualize", str(photo_file), "--model", str(run), "--pretrained"]) == 2
    assert "--pretrained applies to model names" in capsys.readouterr().err


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        (["--window", "3", "0"], r"window \(3, 0\) is out of range: stage 0 has 3 x 3 windows"),
        (["--stage", "4"], r"--stage 4 is out of range: gcvit_xxtiny has 4 stages \(expected -4..3\)"),
        (["--cam-stage", "-5"], r"--cam-stage -5 is out of range"),
        (["--class", "cat"], r"--class 'cat' is not a class of this model"),
        (["--model", "gcvit_nope"], r"'gcvit_nope' is neither a model name"),
        (["--model", "swin_tiny"], r"expected a GC ViT model \(gcvit_\*\) to visualize; got SwinTransformer"),
        (["--model", "vit_tiny"], r"expected a GC ViT model \(gcvit_\*\) to visualize; got VisionTransformer"),
    ],
)
def test_cli_errors_name_what_was_expected(
    photo_file: Path, tmp_path: Path, capsys: pytest.CaptureFixture, extra: list[str], message: str
) -> None:
    assert main(["visualize", str(photo_file), "--out-dir", str(tmp_path), "--img-size", "64", *extra]) == 2
    err = capsys.readouterr().err
    assert err.startswith("gcvit: error: ")
    assert re.search(message, err), err
    assert not list(tmp_path.glob("*.png"))


def test_cli_rejects_missing_and_unreadable_images(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    assert main(["visualize", str(tmp_path / "nope.jpg"), "--out-dir", str(tmp_path)]) == 2
    assert f"gcvit: error: {tmp_path / 'nope.jpg'} does not exist; expected an image file" in capsys.readouterr().err
    bad = tmp_path / "bad.png"
    bad.write_text("not a picture")
    assert main(["visualize", str(bad), "--out-dir", str(tmp_path)]) == 2
    assert f"gcvit: error: {bad} is not a readable image" in capsys.readouterr().err


def test_the_image_is_read_as_training_and_predict_read_it(tmp_path: Path) -> None:
    """visualize reads its image through load_rgb, as training and `gcvit predict` do: a mid-grey 16-bit PNG is
    mid-grey (PIL's own conversion clipped it to white) and an EXIF-rotated photo is upright."""
    import numpy as np
    from PIL import Image

    from gcvit.cli.visualize import _read_image
    from gcvit.data import load_rgb
    from gcvit.models import PretrainedCfg
    from gcvit.train.evaluate import preprocess

    meta = torch.nn.Module()  # a model's preprocessing record is all that is read
    meta.pretrained_cfg = PretrainedCfg(url="", img_size=(32, 32), mean=(0, 0, 0), std=(1, 1, 1), crop_pct=1.0)
    Image.fromarray(np.full((20, 24), 32896, np.uint16)).save(tmp_path / "grey16.png")
    assert torch.allclose(_read_image(str(tmp_path / "grey16.png"), meta), torch.full((1, 3, 32, 32), 128 / 255))
    stored = Image.fromarray(np.tile(np.linspace(0, 255, 30, dtype=np.uint8), (20, 1))).convert("RGB")
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90 degrees clockwise to display
    stored.save(tmp_path / "phone.jpg", exif=exif, quality=95)
    expected = preprocess(meta)(load_rgb(tmp_path / "phone.jpg"))[None]
    assert load_rgb(tmp_path / "phone.jpg").size == (20, 30)
    assert torch.equal(_read_image(str(tmp_path / "phone.jpg"), meta), expected)


def test_maps_sit_on_the_receptive_field_centres_of_their_tokens() -> None:
    """Token r of a stride-s map is centred on pixel r*s (3x3 convolutions of stride 2, padding 1, all the way
    down): measured as the centroid of |d token / d input| through the stem and the downsamplings, it is where
    `to_image` puts a one-token map's peak. The maps used to be drawn half a token down and right (16 px at stride
    32 on a 224 px image)."""
    torch.manual_seed(0)
    net = gcvit.create_model("gcvit_xxtiny", img_size=224).eval()
    x = torch.randn(1, 3, 224, 224, requires_grad=True)
    feats = net.patch_embed(x)
    for stage in range(4):
        if stage:
            feats = net.levels[stage - 1].downsample(feats)  # NHWC (1, H_i, W_i, C)
        stride, token = 4 * 2**stage, 3
        (grad,) = torch.autograd.grad(feats[0, token, token].abs().sum(), x, retain_graph=True)
        weight = grad.abs().sum((0, 1))  # (224, 224)
        rows = torch.arange(224.0)
        centre = float((weight.sum(1) * rows).sum() / weight.sum()), float((weight.sum(0) * rows).sum() / weight.sum())
        assert abs(centre[0] - token * stride) < 0.2 * stride and abs(centre[1] - token * stride) < 0.2 * stride
        one = torch.zeros(1, *feats.shape[1:3])
        one[0, token, token] = 1
        peak = int(viz.to_image(one, stride, (224, 224))[0].argmax())
        assert divmod(peak, 224) == (token * stride, token * stride), (stride, divmod(peak, 224), centre)


def test_grad_cam_of_a_frozen_model_under_inference_mode(model: gcvit.GCViT) -> None:
    """A frozen model (requires_grad False everywhere) and a caller's inference_mode gave bare autograd errors; both
    now give the Grad-CAM of the model as it is. A class_idx list of the wrong length is named."""
    images = _photo((64, 96)).expand(3, -1, -1, -1)
    reference = viz.grad_cam(model, images, class_idx=[0, 1, 2])
    frozen = copy.deepcopy(model).requires_grad_(False)
    with torch.inference_mode():
        cam = viz.grad_cam(frozen, images, class_idx=[0, 1, 2])
    torch.testing.assert_close(cam.cam, reference.cam, rtol=0, atol=1e-5)
    assert all(p.grad is None for p in frozen.parameters())
    with pytest.raises(ValueError, match="expected one class_idx for all 3 images or one per image; got 2"):
        viz.grad_cam(model, images, class_idx=[1, 2])
