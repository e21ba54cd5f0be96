"""Checkpoints: official, timm and own formats, safe loading, resizing, clear mismatch errors, downloads."""

from __future__ import annotations

import dataclasses
import hashlib
import http.server
import os
import pickle
import threading
from pathlib import Path

import numpy as np
import pytest
import torch

import gcvit
from gcvit.download import cache_path
from gcvit.layers import resize_bias_table
from gcvit.models import PRETRAINED
from tests.conftest import randomize_, save_official


def test_official_checkpoint_loads_strictly_without_renaming(xxtiny_official) -> None:
    reference, path = xxtiny_official
    sd = torch.load(path, weights_only=False)["state_dict"]
    model = gcvit.create_model("gcvit_xxtiny").eval()
    model.load_state_dict(sd, strict=True)  # plain torch, no conversion: the keys are the official ones
    report = gcvit.load_checkpoint(model, path)
    assert report.format == "official" and not report.resized
    x = torch.randn(2, 3, 224, 224)
    with torch.no_grad():
        assert torch.equal(model(x), reference(x))


def test_safetensors_roundtrip_is_bit_exact(tmp_path: Path, xxtiny_official) -> None:
    reference, _ = xxtiny_official
    path = gcvit.save_checkpoint(reference, tmp_path / "model.safetensors")
    assert not [p for p in tmp_path.iterdir() if p.name != "model.safetensors"]  # no temporary files left
    model = gcvit.create_model("gcvit_xxtiny", pretrained=path).eval()
    x = torch.randn(2, 3, 96, 96)
    with torch.no_grad():
        assert torch.equal(model(x), reference(x))


def test_code_running_pickle_is_refused(tmp_path: Path) -> None:
    marker = tmp_path / "pwned"

    class Evil:
        def __reduce__(self):
            return (os.system, (f"touch {marker}",))

    path = tmp_path / "evil.pth"
    with open(path, "wb") as f:
        pickle.dump({"state_dict": Evil()}, f)
    with pytest.raises(gcvit.CheckpointError, match="refused: .*could run code.*weights_only=True") as info:
        gcvit.load_checkpoint(gcvit.create_model("gcvit_xxtiny"), path)
    assert not marker.exists()
    assert len(str(info.value)) < 400 and "\n" not in str(info.value)  # not torch's dozen lines


def test_files_that_are_not_weights_are_named_in_one_short_line(tmp_path: Path) -> None:
    """A run's state.pt, its config.json (text), a truncated checkpoint: each gets a one-line reason."""
    run = tmp_path / "last"
    run.mkdir()
    torch.save({"optimizer": {"lr": np.float64(1e-3)}}, run / "state.pt")  # NumPy inside: refused
    gcvit.save_checkpoint(gcvit.create_model("gcvit_xxtiny"), run / "model.safetensors")
    (run / "config.json").write_text('{"model": "gcvit_xxtiny", "note": "caf\u00e9"}', encoding="utf-8")
    torch.save({"w": torch.zeros(3)}, tmp_path / "whole.pt")
    (tmp_path / "cut.pt").write_bytes((tmp_path / "whole.pt").read_bytes()[:40])
    expected = {
        run / "state.pt": f"a run's training state .*, not its weights, which are {run / 'model.safetensors'}",
        run / "config.json": "a text file",
        tmp_path / "cut.pt": "unreadable: PytorchStreamReader failed",
        tmp_path / "junk.pth": r"unreadable: corrupt, or not a torch checkpoint \(Unsupported operand",  # not "code"
    }
    (tmp_path / "junk.pth").write_bytes(b"\x00\x01garbage" * 10)
    for path, reason in expected.items():
        with pytest.raises(gcvit.CheckpointError, match=f"{path}: {reason}") as info:
            gcvit.create_model("gcvit_xxtiny", pretrained=str(path))
        assert len(str(info.value)) < 400 and "\n" not in str(info.value)


def test_mismatched_checkpoint_names_keys_and_shapes(xxtiny_official) -> None:
    _, path = xxtiny_official
    model = gcvit.create_model("gcvit_xtiny")
    with pytest.raises(gcvit.CheckpointError) as info:
        gcvit.load_checkpoint(model, path)
    message = str(info.value)
    assert "missing: levels.0.blocks.2.norm1.weight" in message
    model = gcvit.create_model("gcvit_xxtiny", num_classes=10)
    with pytest.raises(gcvit.CheckpointError, match=r"head.weight: checkpoint \(1000, 512\) vs model \(10, 512\)"):
        gcvit.load_checkpoint(model, path)
    report = gcvit.load_checkpoint(model, path, strict=False)
    assert report.mismatched == [
        "head.weight: checkpoint (1000, 512) vs model (10, 512)",
        "head.bias: checkpoint (1000,) vs model (10,)",
    ]


def test_missing_file_is_a_clear_error() -> None:
    with pytest.raises(FileNotFoundError, match="expected a checkpoint file or an http"):
        gcvit.create_model("gcvit_xxtiny", pretrained="/no/such/file.pth")


def test_fine_tuning_head_is_fresh_and_backbone_loaded(xxtiny_official) -> None:
    reference, path = xxtiny_official
    model = gcvit.create_model("gcvit_xxtiny", pretrained=path, num_classes=10)
    assert model.head.weight.shape == (10, 512)
    ours, theirs = model.state_dict(), reference.state_dict()
    assert all(torch.equal(ours[k], theirs[k]) for k in ours if not k.startswith("head."))


@pytest.mark.parametrize("name", ["gcvit_xxtiny", "swin_tiny", "vit_tiny"])
def test_a_checkpoint_keeps_its_own_head_unless_told(name: str, tmp_path: Path, caplog) -> None:
    """Without num_classes, a checkpoint with a 3-class head builds a 3-class model with that head (not a random
    1000-class one); with another num_classes the head is fresh, and the log says so."""
    trained = randomize_(gcvit.create_model(name, img_size=64, num_classes=3)).eval()
    path = gcvit.save_checkpoint(trained, tmp_path / "three.safetensors")
    x = torch.randn(2, 3, 64, 64)
    loaded = gcvit.create_model(name, img_size=64, pretrained=path).eval()
    with torch.no_grad():
        assert loaded.num_classes == 3 and torch.equal(loaded(x), trained(x))
    with caplog.at_level("INFO", logger="gcvit.models.registry"):
        assert gcvit.create_model(name, img_size=64, pretrained=path, num_classes=7).num_classes == 7
    assert "has a head of 3 classes: the model's 7-class head is freshly initialised" in caplog.text


def test_bias_tables_resized_for_other_windows(xxtiny_official) -> None:
    _, path = xxtiny_official
    model = gcvit.create_model("gcvit_xxtiny", pretrained=path, img_size=384, window_size=(12, 12, 24, 12)).eval()
    assert model.levels[0].blocks[0].attn.relative_position_bias_table.shape == (23 * 23, 2)
    report = gcvit.load_checkpoint(model, path)
    assert len(report.resized) == 12  # one table per block
    with torch.no_grad():
        assert torch.isfinite(model(torch.randn(1, 3, 384, 384))).all()


def test_resize_bias_table_properties() -> None:
    table = torch.randn(13 * 13, 3)
    assert torch.equal(resize_bias_table(table, 7), table)
    constant = torch.full((13 * 13, 3), 0.25)
    assert torch.allclose(resize_bias_table(constant, 12), torch.full((23 * 23, 3), 0.25), atol=1e-6)
    with pytest.raises(ValueError, match=r"\(2\*ws-1\)\*\*2 rows; got 10"):
        resize_bias_table(torch.randn(10, 3), 7)


@pytest.mark.parametrize("new", [12, 4])
def test_resize_bias_table_equals_timms_per_head_bicubic_resize(new: int) -> None:
    """Each head's (2ws-1) x (2ws-1) grid of offsets is resized bicubically on its own (rows are offsets, columns
    heads), as timm's plain resize does (its default one spaces the offsets geometrically, BEiT's way)."""
    timm_layers = pytest.importorskip("timm.layers")
    table = torch.randn(13 * 13, 3)
    side = 2 * new - 1
    reference = timm_layers.resize_rel_pos_bias_table_simple(table, (new, new), (side * side, 3))
    assert (resize_bias_table(table, new) - reference).abs().max().item() < 1e-5


def _serve_as_tag(monkeypatch: pytest.MonkeyPatch, url: str, sha256: str) -> None:
    cfg = dataclasses.replace(PRETRAINED["gcvit_xxtiny"]["in1k"], url=url, sha256=sha256)
    monkeypatch.setitem(PRETRAINED, "gcvit_xxtiny", {"in1k": cfg})


def test_download_checks_hash_caches_and_loads(http_root, cache, monkeypatch, xxtiny_official) -> None:
    root, base = http_root
    reference, path = xxtiny_official
    data = path.read_bytes()
    (root / "gcvit_1k_xxtiny.pth.tar").write_bytes(data)
    _serve_as_tag(monkeypatch, f"{base}/gcvit_1k_xxtiny.pth.tar", hashlib.sha256(data).hexdigest())

    model = gcvit.create_model("gcvit_xxtiny.in1k", pretrained=True).eval()
    cached = cache_path(f"{base}/gcvit_1k_xxtiny.pth.tar")
    assert cached.parent.parent == cache and cached.read_bytes() == data
    x = torch.randn(1, 3, 224, 224)
    with torch.no_grad():
        assert torch.equal(model(x), reference(x))

    (root / "gcvit_1k_xxtiny.pth.tar").unlink()  # a second load comes from the cache
    gcvit.create_model("gcvit_xxtiny", pretrained=True)


def test_corrupted_download_is_refused_and_not_cached(http_root, cache, monkeypatch, xxtiny_official) -> None:
    root, base = http_root
    _, path = xxtiny_official
    data = path.read_bytes()
    corrupted = bytearray(data)
    corrupted[len(data) // 2] ^= 0xFF
    (root / "gcvit_1k_xxtiny.pth.tar").write_bytes(bytes(corrupted))
    _serve_as_tag(monkeypatch, f"{base}/gcvit_1k_xxtiny.pth.tar", hashlib.sha256(data).hexdigest())

    with pytest.raises(
        gcvit.ChecksumError,
        match=r"download of http://127\.0\.0\.1:\d+/gcvit_1k_xxtiny\.pth\.tar "
        r"has the wrong SHA-256",
    ):
        gcvit.create_model("gcvit_xxtiny.in1k", pretrained=True)
    assert not cache.exists() or not [p for p in cache.rglob("*") if p.is_file()]  # nothing kept, not even part


def test_corrupted_cache_file_is_downloaded_again(http_root, cache, monkeypatch, xxtiny_official) -> None:
    root, base = http_root
    _, path = xxtiny_official
    data = path.read_bytes()
    (root / "gcvit_1k_xxtiny.pth.tar").write_bytes(data)
    cached = cache_path(f"{base}/gcvit_1k_xxtiny.pth.tar")
    cached.parent.mkdir(parents=True)
    cached.write_bytes(b"garbage")
    _serve_as_tag(monkeypatch, f"{base}/gcvit_1k_xxtiny.pth.tar", hashlib.sha256(data).hexdigest()[:16])
    gcvit.create_model("gcvit_xxtiny.in1k", pretrained=True)
    assert cached.read_bytes() == data


def test_files_of_one_name_from_two_urls_are_cached_apart(http_root, cache) -> None:
    """Same file name, different addresses: each URL gets its own weights (the cache is per URL, not per name)."""
    root, base = http_root
    models = [gcvit.create_model("gcvit_xxtiny", img_size=64, num_classes=10) for _ in range(2)]
    for sub, model in zip("ab", models):
        gcvit.save_checkpoint(model, root / sub / "ckpt.safetensors")
    x = torch.randn(1, 3, 64, 64)
    for sub, model in zip("ab", models):
        loaded = gcvit.create_model(
            "gcvit_xxtiny", img_size=64, num_classes=10, pretrained=f"{base}/{sub}/ckpt.safetensors"
        ).eval()
        with torch.no_grad():
            assert torch.equal(loaded(x), model.eval()(x)), sub


def test_file_url_is_read_in_place(tmp_path: Path, cache) -> None:
    """A file:// URL is the file itself: rewritten, it loads the new weights (a cached copy would hide them)."""
    path = tmp_path / "ckpt.safetensors"
    x = torch.randn(1, 3, 64, 64)
    for seed in (0, 1):
        torch.manual_seed(seed)
        model = gcvit.create_model("gcvit_xxtiny", img_size=64, num_classes=10).eval()
        gcvit.save_checkpoint(model, path)
        loaded = gcvit.create_model("gcvit_xxtiny", img_size=64, num_classes=10, pretrained=path.as_uri()).eval()
        with torch.no_grad():
            assert torch.equal(loaded(x), model(x)), seed
    assert not cache.exists() or list(cache.iterdir()) == []


def test_unreachable_url_names_it(cache) -> None:
    with pytest.raises(OSError, match=r"could not download http://127\.0\.0\.1:9/nothing\.pth"):
        gcvit.create_model("gcvit_xxtiny", pretrained="http://127.0.0.1:9/nothing.pth")


def test_timm_state_dict_converts_and_is_detected() -> None:
    timm = pytest.importorskip("timm")
    sd = randomize_(timm.create_model("gcvit_xxtiny")).state_dict()
    converted = gcvit.models.convert_timm(sd)
    model = gcvit.create_model("gcvit_xxtiny")
    own = model.state_dict()
    assert set(converted) == {k for k in own if not k.endswith("relative_position_index")}
    assert converted["levels.0.q_global_gen.to_q_global.0.conv.2.fc.0.weight"].shape == (16, 64)
    assert torch.equal(converted["levels.0.downsample.reduction.weight"], sd["stages.1.downsample.reduction.weight"])


def test_save_official_helper_roundtrip(tmp_path: Path) -> None:
    model = gcvit.create_model("gcvit_xxtiny")
    path = save_official(model, tmp_path / "x.pth.tar")
    loaded = torch.load(path, weights_only=False)
    assert set(loaded) == {"state_dict", "epoch", "args"}


def test_checkpoints_of_wrapped_models_load_back(tmp_path: Path) -> None:
    """save_checkpoint of a torch.compile'd model, and a DDP-prefixed safetensors or pickle file, load by plain keys."""
    model = randomize_(gcvit.create_model("gcvit_xxtiny", img_size=64, num_classes=3)).eval()
    compiled = gcvit.save_checkpoint(torch.compile(model), tmp_path / "compiled.safetensors")
    prefixed = {f"module.{k}": v for k, v in model.state_dict().items()}
    from gcvit.models.weights import save_safetensors

    save_safetensors(prefixed, tmp_path / "ddp.safetensors")
    torch.save({"state_dict": prefixed}, tmp_path / "ddp.pth")
    x = torch.randn(1, 3, 64, 64)
    for path in (compiled, tmp_path / "ddp.safetensors", tmp_path / "ddp.pth"):
        loaded = gcvit.create_model("gcvit_xxtiny", img_size=64, pretrained=path).eval()
        with torch.no_grad():
            assert torch.equal(loaded(x), model(x)), path


def test_create_model_says_when_it_bends_a_checkpoint_to_other_windows(xxtiny_official, caplog) -> None:
    """create_model used to resize every bias table of a checkpoint trained with other windows without a word."""
    _, path = xxtiny_official
    with caplog.at_level("WARNING", logger="gcvit.models.registry"):
        gcvit.create_model("gcvit_xxtiny", pretrained=path, img_size=384, window_size=(12, 12, 24, 12))
    assert "trained with other window or input sizes: 12 position tensors were resized" in caplog.text
    caplog.clear()
    with caplog.at_level("WARNING", logger="gcvit.models.registry"):
        gcvit.create_model("gcvit_xxtiny", pretrained=path)
    assert "resized" not in caplog.text


def test_an_ema_saved_by_torchs_averaged_model_loads(tmp_path: Path) -> None:
    """torch.optim.swa_utils.AveragedModel (torchvision's reference scripts' model_ema) adds `module.` and an
    `n_averaged` counter: both go."""
    from torch.optim.swa_utils import AveragedModel, get_ema_multi_avg_fn

    model = randomize_(gcvit.create_model("gcvit_xxtiny", img_size=64, num_classes=3)).eval()
    ema = AveragedModel(model, multi_avg_fn=get_ema_multi_avg_fn(0.999))
    torch.save({"model_ema": ema.state_dict()}, tmp_path / "ema.pth")
    loaded = gcvit.create_model("gcvit_xxtiny", img_size=64, pretrained=tmp_path / "ema.pth").eval()
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        assert torch.equal(loaded(x), model(x))


class _Truncating(http.server.BaseHTTPRequestHandler):
    """Announces 1000 bytes and sends 500 (chunked: a cut-off chunk), then closes: a download cut off midway."""

    def do_GET(self) -> None:
        self.send_response(200)
        if self.path.endswith("chunked.pth"):
            self.send_header("Transfer-Encoding", "chunked")
            self.end_headers()
            self.wfile.write(b"3e8\r\n" + b"x" * 500)  # a chunk of 1000 bytes, cut at 500
        else:
            self.send_header("Content-Length", "1000")
            self.end_headers()
            self.wfile.write(b"x" * 500)
        self.wfile.flush()
        self.close_connection = True

    def log_message(self, *args: object) -> None:
        pass


def test_a_download_cut_off_midway_is_an_error_and_leaves_no_file(cache) -> None:
    """torch.hub's downloader kept a short file as if complete (no digest is known for NVIDIA's files), and every
    later load reused it; a cut chunked reply was a bare http.client traceback."""
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _Truncating)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        base = f"http://127.0.0.1:{server.server_address[1]}"
        with pytest.raises(
            OSError, match=rf"could not download {base}/cut\.pth: the connection closed after 500 of 1000"
        ):
            gcvit.models.weights.resolve(f"{base}/cut.pth")
        with pytest.raises(OSError, match=rf"could not download {base}/chunked\.pth: .*IncompleteRead"):
            gcvit.models.weights.resolve(f"{base}/chunked.pth")
    finally:
        server.shutdown()
        server.server_close()
    assert not cache.exists() or not [p for p in cache.rglob("*") if p.is_file()]


def test_a_cache_folder_given_with_a_tilde_is_the_home_one(http_root, monkeypatch, tmp_path: Path) -> None:
    root, base = http_root
    (root / "w.pth").write_bytes(b"weights")
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    monkeypatch.setenv("GCVIT_CACHE", "~/gcvit-cache")
    monkeypatch.chdir(tmp_path)
    path = gcvit.models.weights.resolve(f"{base}/w.pth")
    assert path.is_file() and path.is_relative_to(tmp_path / "home" / "gcvit-cache")
    assert not (tmp_path / "~").exists()
