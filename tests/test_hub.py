"""save_pretrained / from_pretrained folders (local, URL, hub repo id), hubconf.py entry points, ImageNet names."""

from __future__ import annotations

import copy
import dataclasses
import hashlib
import http.server
import json
import logging
import shutil
import subprocess
import threading
import types
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from PIL import Image

import gcvit
from gcvit.digests import DamagedFileError
from gcvit.download import ChecksumError
from gcvit.imagenet import imagenet1k_classes
from gcvit.models.pretrained import PRETRAINED
from gcvit.models.weights import save_checkpoint
from tests.conftest import randomize_

REPO = Path(__file__).resolve().parents[1]
CLASSES = ["cat", "dog", "bird"]


@pytest.fixture(scope="module")
def small() -> gcvit.GCViT:
    """A randomised 3-class gcvit_xxtiny at 64 px with a few config overrides that config.json must carry."""
    torch.manual_seed(0)
    model = gcvit.create_model("gcvit_xxtiny", num_classes=3, img_size=64, depths=(1, 1, 2, 1), layer_scale=1e-5)
    return randomize_(model).eval()


def _logits(model: torch.nn.Module, seed: int = 0) -> torch.Tensor:
    x = torch.randn(3, 3, 64, 80, generator=torch.Generator().manual_seed(seed))
    with torch.no_grad():
        return model(x)


def test_round_trip_gives_bit_identical_logits(small, tmp_path: Path) -> None:
    small.save_pretrained(tmp_path / "saved", classes=CLASSES)
    assert sorted(p.name for p in (tmp_path / "saved").iterdir()) == ["SHA256SUMS", "config.json", "model.safetensors"]
    loaded = gcvit.from_pretrained(tmp_path / "saved")
    assert not loaded.training and loaded.cfg == small.cfg and loaded.classes == CLASSES
    assert torch.equal(_logits(loaded), _logits(small))
    loaded.save_pretrained(tmp_path / "again")  # classes travel with the model
    assert json.loads((tmp_path / "again" / "config.json").read_text()) == json.loads(
        (tmp_path / "saved" / "config.json").read_text()
    )


@pytest.mark.parametrize("name", ["swin_tiny", "vit_tiny"])
def test_round_trip_of_swin_and_vit(name: str, tmp_path: Path) -> None:
    """The other families share the interface: save_pretrained then from_pretrained gives bit-identical logits."""
    torch.manual_seed(0)
    model = randomize_(gcvit.create_model(name, num_classes=3, img_size=64)).eval()
    model.save_pretrained(tmp_path / "saved", classes=CLASSES)
    loaded = gcvit.from_pretrained(tmp_path / "saved")
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        assert type(loaded) is type(model) and torch.equal(loaded(x), model(x))


def test_config_json_is_the_training_checkpoint_format(small, tmp_path: Path) -> None:
    """Same keys as `gcvit train`'s config.json, so `gcvit eval/predict` read saved folders and `from_pretrained`
    reads training checkpoints and run folders (best/, else last/)."""
    from gcvit.train.build import checkpoint_config

    small.save_pretrained(tmp_path / "run" / "best", classes=CLASSES)
    saved = json.loads((tmp_path / "run" / "best" / "config.json").read_text())
    run = types.SimpleNamespace(model="gcvit_xxtiny", img_size=64, pretrained=True)
    trained = checkpoint_config(run, small, CLASSES, 1.0, "center")
    assert saved.keys() == trained.keys()
    assert saved["config"] == json.loads(json.dumps(trained["config"]))
    model = gcvit.load(tmp_path / "run" / "best")  # as `gcvit eval/predict` read it
    assert model.classes == CLASSES and model.pretrained_cfg.img_size == (64, 64)
    assert torch.equal(_logits(model), _logits(small))
    assert torch.equal(_logits(gcvit.from_pretrained(tmp_path / "run")), _logits(small))
    ema = randomize_(gcvit.from_pretrained(tmp_path / "run"), scale=0.01)
    save_checkpoint(ema, tmp_path / "run" / "best" / "ema.safetensors")
    assert torch.equal(_logits(gcvit.from_pretrained(tmp_path / "run")), _logits(ema))  # EMA first, as gcvit eval
    assert torch.equal(_logits(gcvit.from_pretrained(tmp_path / "run", ema=False)), _logits(small))


def test_imagenet_heads_save_imagenet_names(tmp_path: Path) -> None:
    with torch.device("meta"):
        model = gcvit.create_model("gcvit_xxtiny")
        other = gcvit.create_model("gcvit_xxtiny", num_classes=10)
    from gcvit.models.folder import model_config

    assert model_config(model)["classes"] == imagenet1k_classes()
    assert model_config(other)["classes"] == [str(i) for i in range(10)]


def test_from_url_and_hub_repo_id(small, http_root, cache, monkeypatch, tmp_path: Path) -> None:
    root, base = http_root
    small.save_pretrained(root / "models" / "small", classes=CLASSES)
    small.save_pretrained(root / "user" / "small-gcvit" / "resolve" / "v1", classes=CLASSES)
    want = _logits(small)
    assert torch.equal(_logits(gcvit.from_pretrained(f"{base}/models/small/")), want)
    monkeypatch.setenv("HF_ENDPOINT", base)
    assert torch.equal(_logits(gcvit.from_pretrained("user/small-gcvit", revision="v1")), want)
    shutil.rmtree(root / "models")  # a second call uses the cache
    assert gcvit.from_pretrained(f"{base}/models/small").classes == CLASSES
    with pytest.raises(OSError, match=r"could not download .*/models/small/config.json"):
        gcvit.from_pretrained(f"{base}/models/small", force_download=True)
    with pytest.raises(OSError, match="is no local folder, and as a hub repo id: could not download .*/user/small"):
        gcvit.from_pretrained("user/small-gcvit")  # no such revision


def test_a_remote_folder_is_checked_before_and_while_its_weights_download(small, http_root, cache, caplog) -> None:
    """A URL whose config.json is not gcvit's (timm's hub layout, say) is named before the weights are fetched (it
    used to download them first); a folder's SHA256SUMS verifies its weights as they download."""
    root, base = http_root
    (root / "timm_like").mkdir()
    (root / "timm_like" / "config.json").write_text('{"architecture": "gcvit_tiny", "num_classes": 1000}')
    (root / "timm_like" / "model.safetensors").write_bytes(b"x" * 1000)
    with pytest.raises(ValueError, match=r"timm_like/config.json: expected 'model' \(a name\) and 'config'"):
        gcvit.from_pretrained(f"{base}/timm_like")
    assert not list(cache.rglob("model.safetensors"))
    folder = small.save_pretrained(root / "small", classes=CLASSES)
    with caplog.at_level(logging.WARNING, logger="gcvit"):
        assert torch.equal(_logits(gcvit.from_pretrained(f"{base}/small")), _logits(small))
    assert "no known SHA-256" not in caplog.text  # SHA256SUMS gave it
    weights = folder / "model.safetensors"
    damaged = bytearray(weights.read_bytes())
    damaged[-100] ^= 0x10
    weights.write_bytes(bytes(damaged))
    with pytest.raises(ChecksumError, match=r"download of .*/small/model.safetensors has the wrong SHA-256"):
        gcvit.from_pretrained(f"{base}/small", force_download=True)


class _Served:
    """An HTTP server on 127.0.0.1 for `folder`, recording each request's Authorization header. With `token`, it
    answers 401 to requests without it; with `cdn`, it redirects requests for weights there; paths starting with
    moved[0] are redirected to moved[1] on the same host."""

    def __init__(
        self, folder: Path, token: str | None = None, cdn: str | None = None, moved: tuple[str, str] = ("", "")
    ) -> None:
        self.seen: list[tuple[str, str | None]] = []
        outer = self

        class Handler(http.server.SimpleHTTPRequestHandler):
            def __init__(self, *args: Any, **kwargs: Any) -> None:
                super().__init__(*args, directory=str(folder), **kwargs)

            def log_message(self, *args: Any) -> None:
                pass

            def do_GET(self) -> None:
                outer.seen.append((self.path, self.headers.get("Authorization")))
                if moved[0] and self.path.startswith(moved[0]):  # a renamed repo: the same host, another path
                    self.send_response(307)
                    self.send_header("Location", moved[1] + self.path.removeprefix(moved[0]))
                    self.end_headers()
                elif token is not None and self.headers.get("Authorization") != f"Bearer {token}":
                    self.send_error(401)
                elif cdn is not None and self.path.endswith(".safetensors"):
                    self.send_response(302)
                    self.send_header("Location", cdn + self.path)
                    self.end_headers()
                else:
                    super().do_GET()

        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


def test_a_private_hub_repo_takes_a_token_and_the_cdn_never_sees_it(small, cache, monkeypatch, tmp_path) -> None:
    """The Hub answers 401 for a private repo without a token; $HF_TOKEN (or token=) is sent as a Bearer token to
    the hub, and not on to the CDN that the hub redirects weights to."""
    small.save_pretrained(tmp_path / "hub" / "user" / "private" / "resolve" / "main", classes=CLASSES)
    cdn = _Served(tmp_path / "hub")
    hub = _Served(tmp_path / "hub", token="secret", cdn=cdn.url, moved=("/user/old-name/", "/user/private/"))
    try:
        monkeypatch.setenv("HF_ENDPOINT", hub.url)
        monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))  # no login of this machine's
        for name in ("HF_TOKEN", "HUGGING_FACE_HUB_TOKEN", "HF_TOKEN_PATH"):
            monkeypatch.delenv(name, raising=False)
        needed = r"401.*no such repo, or a private or gated one, which needs an access token: set HF_TOKEN"
        with pytest.raises(OSError, match=needed):
            gcvit.from_pretrained("user/private")
        with pytest.raises(OSError, match=r"401.*the token given was refused"):
            gcvit.from_pretrained("user/private", token="wrong")
        monkeypatch.setenv("HF_TOKEN", "secret")
        assert torch.equal(_logits(gcvit.from_pretrained("user/private")), _logits(small))
        assert ("/user/private/resolve/main/model.safetensors", "Bearer secret") in hub.seen
        assert "/user/private/resolve/main/model.safetensors" in [path for path, _ in cdn.seen]
        assert all(auth is None for _, auth in cdn.seen)  # the redirect's target got no token
        monkeypatch.delenv("HF_TOKEN")
        (tmp_path / "hf").mkdir()
        (tmp_path / "hf" / "token").write_text("secret\n")  # what `huggingface-cli login` stores
        again = gcvit.from_pretrained("user/old-name", cache_dir=tmp_path / "other-cache")  # renamed: a same-host 307
        assert torch.equal(_logits(again), _logits(small))
        assert ("/user/private/resolve/main/config.json", "Bearer secret") in hub.seen
    finally:
        hub.close()
        cdn.close()


def test_a_folder_cached_before_digests_loads_as_it_was_without_asking_the_host(small, http_root, cache) -> None:
    """A cache holding config.json and the weights but no SHA256SUMS (an older version's) is used as it is: asking
    the host for its SHA256SUMS would fetch its newer weights under the cached config.json, or hang offline."""
    root, base = http_root
    folder = small.save_pretrained(root / "m", classes=CLASSES)
    (folder / "SHA256SUMS").unlink()
    gcvit.from_pretrained(f"{base}/m")
    for leftover in [*cache.rglob("SHA256SUMS*")]:
        leftover.unlink()  # as an older version left it
    other = randomize_(gcvit.create_model("gcvit_xxtiny", num_classes=3, img_size=64, depths=(1, 1, 2, 1)))
    other.save_pretrained(folder, classes=["car", "bus", "tram"])  # the host's folder changes
    loaded = gcvit.from_pretrained(f"{base}/m")
    assert loaded.classes == CLASSES and torch.equal(_logits(loaded), _logits(small))
    assert not list(cache.rglob("SHA256SUMS"))


def test_a_checkpoint_folder_with_ema_loads_alike_locally_and_remotely(small, http_root, cache) -> None:
    """A folder holding ema.safetensors (a training checkpoint) gives its EMA weights from disk, a URL and a hub
    repo alike; ema=False the raw weights; a folder without one loads its model.safetensors, and ema=True names
    the missing file."""
    root, base = http_root
    other = randomize_(copy.deepcopy(small))
    folder = small.save_pretrained(root / "ckpt", classes=CLASSES)
    save_checkpoint(other, folder / "ema.safetensors")
    small.save_pretrained(root / "plain", classes=CLASSES)
    ema, raw = _logits(other), _logits(small)
    assert not torch.equal(ema, raw)
    assert torch.equal(_logits(gcvit.from_pretrained(folder)), ema)
    assert torch.equal(_logits(gcvit.from_pretrained(f"{base}/ckpt")), ema)
    assert torch.equal(_logits(gcvit.from_pretrained(f"{base}/ckpt", ema=False, force_download=True)), raw)
    assert torch.equal(_logits(gcvit.from_pretrained(f"{base}/plain")), raw)
    assert torch.equal(_logits(gcvit.from_pretrained(f"{base}/plain")), raw)  # the absence is remembered
    with pytest.raises(OSError, match=r"could not download .*/plain/ema.safetensors"):
        gcvit.from_pretrained(f"{base}/plain", ema=True)


def test_save_pretrained_leaves_no_stale_ema_and_spares_training_checkpoints(small, tmp_path: Path) -> None:
    """Saving over a folder with an older ema.safetensors removes it (loaders prefer EMA weights); a training
    checkpoint (ema.safetensors with state.pt) is refused untouched."""
    folder = small.save_pretrained(tmp_path / "copy", classes=CLASSES)
    save_checkpoint(randomize_(copy.deepcopy(small)), folder / "ema.safetensors")
    small.save_pretrained(folder, classes=CLASSES)
    assert not (folder / "ema.safetensors").exists()
    assert torch.equal(_logits(gcvit.from_pretrained(folder)), _logits(small))
    (folder / "state.pt").write_bytes(b"training state")  # a run trained without EMA has no ema.safetensors
    before = (folder / "model.safetensors").read_bytes()
    with pytest.raises(ValueError, match="is a training checkpoint .*; save into another folder"):
        small.save_pretrained(folder)
    save_checkpoint(small, folder / "ema.safetensors")
    with pytest.raises(ValueError, match="is a training checkpoint .*; save into another folder"):
        small.save_pretrained(folder)
    assert (folder / "model.safetensors").read_bytes() == before and (folder / "ema.safetensors").exists()


def test_a_saved_folder_lists_its_digests_and_a_damaged_file_is_named(small, tmp_path: Path) -> None:
    """safetensors checks no content, so one flipped byte in the weights used to load silently. save_pretrained
    writes SHA256SUMS (sha256sum's format), and from_pretrained checks the files it reads against it."""
    folder = small.save_pretrained(tmp_path / "saved", classes=CLASSES)
    if shutil.which("sha256sum"):
        subprocess.run(["sha256sum", "--check", "--quiet", "SHA256SUMS"], cwd=folder, check=True)
    weights = folder / "model.safetensors"
    good = weights.read_bytes()
    damaged = bytearray(good)
    damaged[-100] ^= 0x10  # in the last tensor's data: safetensors reads it without complaint
    weights.write_bytes(bytes(damaged))
    read = gcvit.models.weights.read_state_dict(weights)
    assert any(not torch.equal(v, small.state_dict()[k]) for k, v in read.items())  # loads, with another weight
    damage = r"saved/model.safetensors is damaged: its SHA-256 differs from the one recorded in .*saved/SHA256SUMS"
    for source in (folder, weights):
        with pytest.raises(DamagedFileError, match=damage):
            gcvit.from_pretrained(source)
    weights.write_bytes(good)
    config = folder / "config.json"  # not listed: users edit it
    config.write_text(config.read_text().replace('"crop_pct": 1.0', '"crop_pct": 0.5'))
    assert gcvit.from_pretrained(folder).pretrained_cfg.crop_pct == 0.5
    digest, wrong = hashlib.sha256(good).hexdigest(), "0" * 64
    sums = folder / "SHA256SUMS"
    for listing in (f"SHA256 (model.safetensors) = {wrong}\n", f"{wrong} *./model.safetensors\n"):  # BSD's; binary
        sums.write_text(listing)
        with pytest.raises(DamagedFileError, match=damage):
            gcvit.from_pretrained(folder)
    # lines in other tools' formats, blank lines and other files' lines check nothing and block nothing
    sums.write_text(f"0123  model.safetensors\n\n\\{wrong}  a\\\\b.bin\n{digest.upper()}  model.safetensors\n")
    assert torch.equal(_logits(gcvit.from_pretrained(folder)), _logits(small))
    sums.unlink()  # folders saved before digests load as they did
    assert torch.equal(_logits(gcvit.from_pretrained(folder)), _logits(small))
    other = randomize_(copy.deepcopy(small))
    small.save_pretrained(folder, classes=CLASSES)
    gcvit.save_checkpoint(other, weights)  # the package's own writer keeps the listing true
    assert torch.equal(_logits(gcvit.from_pretrained(folder)), _logits(other))
    weights.write_bytes(damaged)
    with pytest.raises(DamagedFileError, match=damage):  # file:// URLs too
        gcvit.load_checkpoint(copy.deepcopy(small), weights.as_uri())


def test_a_failed_save_leaves_a_folder_that_loads_what_it_held(small, tmp_path: Path, monkeypatch) -> None:
    """save_pretrained wrote the weights, then config.json, then removed a stale ema.safetensors: a save stopped in
    between (a value JSON cannot hold, a full disk) left new weights under the old config.json, or the old EMA
    weights loading silently. Now nothing is touched until every file is written under a temporary name; then the
    stale EMA file goes and the weights, config.json and SHA256SUMS are renamed into place together."""
    folder = small.save_pretrained(tmp_path / "saved", classes=CLASSES)
    ema = randomize_(copy.deepcopy(small))
    gcvit.save_checkpoint(ema, folder / "ema.safetensors")  # a checkpoint folder copied without its state.pt
    wider = randomize_(gcvit.create_model("gcvit_xxtiny", num_classes=5, img_size=64, depths=(1, 1, 2, 1))).eval()
    before = {p.name: p.read_bytes() for p in folder.iterdir()}
    with pytest.raises(ValueError, match=r"config\['crop_pct'\] = np.float32\(0.9\) cannot be written to config.json"):
        wider.save_pretrained(folder, config={"crop_pct": np.float32(0.9)})
    assert {p.name: p.read_bytes() for p in folder.iterdir()} == before

    def full_disk(fd: int) -> None:
        raise OSError(28, "No space left on device")

    monkeypatch.setattr("os.fsync", full_disk)
    with pytest.raises(OSError, match="No space left on device"):
        wider.save_pretrained(folder)
    monkeypatch.undo()
    assert {p.name: p.read_bytes() for p in folder.iterdir()} == before  # no temporary files either
    assert torch.equal(_logits(gcvit.from_pretrained(folder)), _logits(ema))
    (folder / ".model.x1y2z3.tmp.safetensors").write_bytes(b"left by a save killed mid-write")
    assert torch.equal(_logits(gcvit.from_pretrained(wider.save_pretrained(folder))), _logits(wider))
    assert sorted(p.name for p in folder.iterdir()) == ["SHA256SUMS", "config.json", "model.safetensors"]


def test_a_cached_folder_loads_offline_and_hosts_answering_403_work(small, http_root, cache, tmp_path) -> None:
    """ema.safetensors is optional: a folder cached before (without the note of its absence) loads with the host
    gone, and a host that answers 403 for missing files (S3, GCS) counts as 'no EMA weights'."""
    import functools
    import http.server
    import threading

    root, base = http_root
    small.save_pretrained(root / "m", classes=CLASSES)
    assert torch.equal(_logits(gcvit.from_pretrained(f"{base}/m")), _logits(small))
    cached = next(cache.glob("hub/urls/*"))
    (cached / "ema.safetensors.absent").unlink()  # as cached by an older version
    shutil.rmtree(root / "m")
    offline = base.rsplit(":", 1)[0] + ":9"  # nothing listens on port 9
    (cache / "hub" / "urls" / cached.name).rename(cache / "hub" / "urls" / "kept")
    import hashlib

    digest = hashlib.sha256(f"{offline}/m".encode()).hexdigest()[:16]
    (cache / "hub" / "urls" / "kept").rename(cache / "hub" / "urls" / digest)
    assert torch.equal(_logits(gcvit.from_pretrained(f"{offline}/m")), _logits(small))

    class Forbidden(http.server.SimpleHTTPRequestHandler):
        def send_error(self, code: int, message: str | None = None, explain: str | None = None) -> None:
            super().send_error(403 if code == 404 else code, message, explain)

        def log_message(self, *args: object) -> None:
            pass

    small.save_pretrained(tmp_path / "s3" / "m", classes=CLASSES)
    server = http.server.ThreadingHTTPServer(
        ("127.0.0.1", 0), functools.partial(Forbidden, directory=str(tmp_path / "s3"))
    )
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        url = f"http://127.0.0.1:{server.server_address[1]}/m"
        assert torch.equal(_logits(gcvit.from_pretrained(url)), _logits(small))
    finally:
        server.shutdown()
        server.server_close()


def test_clear_errors(small, tmp_path: Path) -> None:
    folder = small.save_pretrained(tmp_path / "saved", classes=CLASSES)
    config = json.loads((folder / "config.json").read_text())
    with pytest.raises(FileNotFoundError, match="neither an existing folder"):
        gcvit.from_pretrained(tmp_path / "nothing_here")
    with pytest.raises(FileNotFoundError, match="has no config.json"):
        gcvit.from_pretrained(tmp_path)
    with pytest.raises(ValueError, match="is a file"):
        gcvit.from_pretrained(folder / "config.json")
    assert gcvit.from_pretrained(folder / "model.safetensors").classes == CLASSES  # weights with config.json beside

    def broken(name: str, values: object) -> Path:
        shutil.copytree(folder, tmp_path / name)
        text = values if isinstance(values, str) else json.dumps(values)
        (tmp_path / name / "config.json").write_text(text)
        return tmp_path / name

    with pytest.raises(ValueError, match="not valid JSON"):
        gcvit.from_pretrained(broken("not_json", "{model: "))
    with pytest.raises(ValueError, match=r"expected 'model' .* missing \['config'\]"):
        gcvit.from_pretrained(broken("no_config", {"model": "gcvit_xxtiny"}))
    with pytest.raises(ValueError, match="unknown override.*'depth'"):
        gcvit.from_pretrained(broken("bad_field", {**config, "config": {**config["config"], "depth": 3}}))
    with pytest.raises(ValueError, match="unknown model 'gcvit_tinyy'"):
        gcvit.from_pretrained(broken("bad_name", {**config, "model": "gcvit_tinyy"}))
    with pytest.raises(ValueError, match="2 class names for a head of 3 outputs"):
        gcvit.from_pretrained(broken("bad_classes", {**config, "classes": ["a", "b"]}))
    with pytest.raises(gcvit.CheckpointError, match="mis-shaped.*head.weight"):
        other = {**config, "classes": list("abcd"), "config": {**config["config"], "num_classes": 4}}
        gcvit.from_pretrained(broken("other_head", other))
    (tmp_path / "no_weights").mkdir()
    shutil.copy(folder / "config.json", tmp_path / "no_weights")
    with pytest.raises(FileNotFoundError, match="no_weights/model.safetensors does not exist"):
        gcvit.from_pretrained(tmp_path / "no_weights")
    with pytest.raises(ValueError, match="expected 3 class names"):
        small.save_pretrained(tmp_path / "x", classes=["a"])


def test_hubconf_builds_every_architecture(xxtiny_official) -> None:
    reference, checkpoint = xxtiny_official
    archs = [n for n in gcvit.list_models() if "." not in n]
    for arch in archs:
        with torch.device("meta"):  # structure only: fast for the large variants
            model = torch.hub.load(str(REPO), arch, source="local", num_classes=7, img_size=96)
            want = gcvit.create_model(arch, num_classes=7, img_size=96)
        assert model.model_name == arch and model.num_classes == 7 and model.cfg.img_size == (96, 96)
        assert model.cfg == want.cfg and model.state_dict().keys() == want.state_dict().keys()
    model = torch.hub.load(str(REPO), "gcvit_xxtiny", source="local", pretrained=str(checkpoint)).eval()
    x = torch.randn(2, 3, 224, 224)
    with torch.no_grad():
        assert torch.equal(model(x), reference(x))
    with pytest.raises(TypeError):
        torch.hub.load(str(REPO), "gcvit_xxtiny", "positional", source="local")  # keyword-only


def test_imagenet_class_names() -> None:
    names = imagenet1k_classes()
    assert len(names) == 1000 == len(set(names))
    assert (names[0], names[1], names[207], names[409], names[999]) == (
        "tench",
        "goldfish",
        "golden retriever",
        "analog clock",
        "toilet tissue",
    )


def test_predict_with_a_model_name_prints_imagenet_names(xxtiny_official, http_root, cache, monkeypatch, capsys):
    """`gcvit predict --model gcvit_xxtiny` (ImageNet weights; here a random checkpoint served over HTTP)."""
    from gcvit.cli import main
    from gcvit.train.evaluate import predict

    _, checkpoint = xxtiny_official
    root, base = http_root
    shutil.copy(checkpoint, root / checkpoint.name)
    tag = PRETRAINED["gcvit_xxtiny"]["in1k"]
    monkeypatch.setitem(PRETRAINED["gcvit_xxtiny"], "in1k", dataclasses.replace(tag, url=f"{base}/{checkpoint.name}"))
    rng = np.random.default_rng(0)
    image = root / "photo.png"
    Image.fromarray(rng.integers(0, 255, (240, 260, 3), dtype=np.uint8)).save(image)

    ((_, top),) = predict([image], "gcvit_xxtiny", topk=3)
    names = imagenet1k_classes()
    assert len(top) == 3 and all(label in names for label, _ in top)
    assert main(["predict", str(image), "--model", "gcvit_xxtiny.in1k", "--topk", "2"]) == 0
    printed = capsys.readouterr().out
    assert printed.startswith(f"{image}  {top[0][0]}:") and f"  {top[1][0]}:" in printed


@pytest.mark.parametrize("name", ["gcvit_xxtiny", "vit_tiny"])
def test_reset_classifier_then_save_pretrained_loads_back(name: str, tmp_path: Path) -> None:
    model = gcvit.create_model(name, img_size=64 if name.startswith("gcvit") else 32).eval()
    model.reset_classifier(5)
    assert model.pretrained_cfg.num_classes == 5
    model.save_pretrained(tmp_path / "five", classes=list("abcde"))
    loaded = gcvit.from_pretrained(tmp_path / "five").eval()
    x = torch.randn(1, 3, *model.cfg.img_size)
    with torch.no_grad():
        assert loaded.num_classes == 5 and torch.equal(loaded(x), model(x))


def test_a_fresh_head_drops_the_old_heads_class_names(small, tmp_path: Path) -> None:
    """After reset_classifier the head's outputs are no longer the loaded classes: save_pretrained used to write
    the old names for a head of the same size (and an ImageNet model's names for any 1000-class head)."""
    loaded = gcvit.from_pretrained(small.save_pretrained(tmp_path / "saved", classes=CLASSES))
    assert loaded.classes == CLASSES
    loaded.reset_classifier(3)
    again = gcvit.from_pretrained(loaded.save_pretrained(tmp_path / "fresh"))
    assert again.classes == ["0", "1", "2"]
    imagenet = gcvit.create_model("gcvit_xxtiny", img_size=64)
    assert gcvit.models.folder.model_config(imagenet)["classes"][:2] == ["tench", "goldfish"]
    imagenet.reset_classifier(1000)
    assert gcvit.models.folder.model_config(imagenet)["classes"][:2] == ["0", "1"]


def test_a_headless_checkpoint_loads_under_a_fresh_head(tmp_path: Path) -> None:
    """A backbone saved with num_classes=0 fine-tunes like any checkpoint: the new head starts fresh."""
    backbone = gcvit.create_model("gcvit_xxtiny", img_size=64, num_classes=0)
    gcvit.save_checkpoint(backbone, tmp_path / "backbone.safetensors")
    model = gcvit.create_model(
        "gcvit_xxtiny", img_size=64, num_classes=10, pretrained=tmp_path / "backbone.safetensors"
    )
    assert torch.equal(model.levels[0].blocks[0].mlp.fc1.weight, backbone.levels[0].blocks[0].mlp.fc1.weight)
    assert model.head.weight.shape == (10, 512)


def test_saved_files_are_readable_by_others(tmp_path: Path) -> None:
    """Atomic writes go through a temporary file made private (0600); the result gets the usual umask mode."""
    import os

    mask = os.umask(0o022)
    try:
        model = gcvit.create_model("gcvit_xxtiny", img_size=64, num_classes=3)
        model.save_pretrained(tmp_path / "saved")
        gcvit.save_checkpoint(model, tmp_path / "m.safetensors")
    finally:
        os.umask(mask)
    for path in (tmp_path / "m.safetensors", *(tmp_path / "saved").iterdir()):
        assert path.stat().st_mode & 0o777 == 0o644, path


def test_predict_checks_its_inputs_before_downloading_weights(http_root, cache, monkeypatch, tmp_path):
    """A mistyped image path fails at once, not after fetching the model's weights (hundreds of MB for large ones)."""
    from gcvit.train.evaluate import predict

    _, base = http_root
    tag = PRETRAINED["gcvit_xxtiny"]["in1k"]
    monkeypatch.setitem(
        PRETRAINED["gcvit_xxtiny"], "in1k", dataclasses.replace(tag, url=f"{base}/gcvit_1k_xxtiny.pth.tar")
    )
    missing = tmp_path / "no-such-photo.png"
    with pytest.raises(FileNotFoundError, match="no-such-photo.png does not exist; expected image files or folders"):
        predict([missing], "gcvit_xxtiny")
    assert not cache.exists() or not any(cache.rglob("*.pth.tar*"))


def test_visualize_checks_its_image_before_downloading_weights(http_root, cache, monkeypatch, tmp_path, capsys):
    from gcvit.cli import main

    _, base = http_root
    tag = PRETRAINED["gcvit_xxtiny"]["in1k"]
    monkeypatch.setitem(
        PRETRAINED["gcvit_xxtiny"], "in1k", dataclasses.replace(tag, url=f"{base}/gcvit_1k_xxtiny.pth.tar")
    )
    missing = tmp_path / "no-such-photo.png"
    assert main(["visualize", str(missing), "--model", "gcvit_xxtiny", "--pretrained", "--out-dir", str(tmp_path)]) == 2
    assert f"gcvit: error: {missing} does not exist; expected an image file" in capsys.readouterr().err
    assert not cache.exists() or not any(cache.rglob("*.pth.tar*"))


def test_the_preprocessing_size_survives_every_round_trip(small, tmp_path: Path) -> None:
    """config.json's img_size is the preprocessing's, as its other entries: a loaded model saved again kept cfg's
    size instead, and a plain int (what create_model takes) loaded, then broke export and visualize."""
    from gcvit.cli.export import load_for_export

    small.save_pretrained(tmp_path / "a", config={"img_size": [80, 80], "crop_pct": 0.9, "interpolation": "bilinear"})
    loaded = gcvit.from_pretrained(tmp_path / "a")
    loaded.save_pretrained(tmp_path / "b")
    again = json.loads((tmp_path / "b" / "config.json").read_text())
    assert (again["img_size"], again["crop_pct"], again["interpolation"]) == ([80, 80], 0.9, "bilinear")
    small.save_pretrained(tmp_path / "c", config={"img_size": 96})
    assert gcvit.from_pretrained(tmp_path / "c").pretrained_cfg.img_size == (96, 96)
    assert load_for_export(str(tmp_path / "c"))[1]["img_size"] == [96, 96]
    small.save_pretrained(tmp_path / "d", config={"img_size": "big"})
    with pytest.raises(ValueError, match=r"img_size must be an int or \[H, W\] in pixels; got 'big'"):
        gcvit.from_pretrained(tmp_path / "d")
