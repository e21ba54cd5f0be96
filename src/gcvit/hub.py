"""Hub-style model folders: `model.save_pretrained(dir)` and `gcvit.from_pretrained(dir_or_url_or_repo_id)`.

A folder holds `config.json` and `model.safetensors` at its root, the layout of huggingface_hub's ModelHubMixin, so a
folder pushed to the Hugging Face Hub loads back with one call. `config.json` is the one `gcvit train` writes into its
checkpoint folders ("model", "config" with every config field, "classes", "img_size", "mean", "std", "interpolation",
"crop_pct", "crop_mode"; save_pretrained adds "license", `gcvit train` "weights", "epoch" and "val_top1"), so
training checkpoints, run folders and saved folders are interchangeable:
`gcvit eval/predict/export` take any of them and `from_pretrained` loads any of them.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import os
import re
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn

from gcvit import digests

logger = logging.getLogger(__name__)

CONFIG_FILE, MODEL_FILE, EMA_FILE = "config.json", "model.safetensors", "ema.safetensors"
HF_ENDPOINT = "https://huggingface.co"  # overridden by $HF_ENDPOINT, as huggingface_hub does
_REPO_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")


def default_classes(model: nn.Module) -> list[str]:
    """ImageNet-1K names for a 1000-class head of an ImageNet label set; otherwise the indices as strings."""
    from gcvit.imagenet import IMAGENET_1K_LABEL_SETS, NUM_CLASSES, imagenet1k_classes

    pc = getattr(model, "pretrained_cfg", None)
    num_classes = int(getattr(model, "num_classes", 0))
    if num_classes == NUM_CLASSES and getattr(pc, "label_set", None) in IMAGENET_1K_LABEL_SETS:
        return imagenet1k_classes()
    return [str(i) for i in range(num_classes)]


def model_config(model: nn.Module, classes: Sequence[str] | None = None, name: str | None = None) -> dict[str, Any]:
    """The config.json of a model built by `gcvit.create_model` (see the module docstring); `name` replaces the
    model's `model_name` (the registered name it was built from)."""
    from gcvit.models.pretrained import PretrainedCfg

    name = name or getattr(model, "model_name", None)
    if name is None:
        raise ValueError(
            f"{type(model).__name__} has no model_name (gcvit.create_model sets it); "
            "pass config={'model': 'gcvit_tiny'} or the architecture it was built from"
        )
    classes = list(classes) if classes is not None else getattr(model, "classes", None) or default_classes(model)
    pc = getattr(model, "pretrained_cfg", None) or PretrainedCfg(url="", img_size=tuple(model.cfg.img_size))
    return {
        "model": name,
        "config": dataclasses.asdict(model.cfg),
        "classes": classes,
        "num_classes": len(classes),
        "img_size": list(pc.img_size),  # the preprocessing's size, as the other entries (cfg's may differ)
        "mean": list(pc.mean),
        "std": list(pc.std),
        "interpolation": pc.interpolation,
        "crop_pct": pc.crop_pct,
        "crop_mode": pc.crop_mode,
        "license": pc.license,  # of the weights: NVIDIA's binds their fine-tunes; '' for none known
    }


class HubMixin:
    """Gives a model `save_pretrained`; models built by `gcvit.create_model` carry what it needs (`model_name`,
    `cfg`, `pretrained_cfg`)."""

    def save_pretrained(
        self,
        save_directory: str | os.PathLike[str],
        *,
        config: Mapping[str, Any] | None = None,
        classes: Sequence[str] | None = None,
    ) -> Path:
        """Write `config.json` and `model.safetensors` into `save_directory` (created if needed; files written
        atomically), in the layout `gcvit.from_pretrained` and `gcvit eval/predict/export` read.

        Args:
            save_directory: the folder.
            config: entries that replace or add to the generated config.json (e.g. {"crop_pct": 0.9}).
            classes: class names of the head's outputs; default: the model's `classes` attribute (set by
                `from_pretrained`), else the ImageNet-1K names for a 1000-class ImageNet head, else "0", "1", ...
        Returns:
            The folder.
        """
        from gcvit.atomic import atomic_write_files, remove_temporaries
        from gcvit.models.weights import safetensors_file

        assert isinstance(self, nn.Module)
        values = {**model_config(self, classes, (config or {}).get("model")), **(config or {})}
        if len(values["classes"]) != self.num_classes:
            got = len(values["classes"])
            raise ValueError(f"expected {self.num_classes} class names (the head's outputs); got {got}")
        folder = Path(save_directory)
        if (folder / "state.pt").exists():
            raise ValueError(
                f"{folder} is a training checkpoint (its state.pt, and {EMA_FILE} if any, go with its {MODEL_FILE}); "
                "save into another folder"
            )
        text = _config_json(values)  # everything that can fail is done before the folder is touched
        weights = safetensors_file(self.state_dict(), metadata={"format": "gcvit"})
        sums = digests.sums_text({MODEL_FILE: hashlib.sha256(weights).hexdigest()})
        folder.mkdir(parents=True, exist_ok=True)
        files = {folder / MODEL_FILE: weights, folder / CONFIG_FILE: text, folder / digests.SUMS_FILE: sums}
        remove_temporaries(folder, [p.name for p in files])  # a killed earlier save's
        # loaders prefer EMA weights where there are any: an older ema.safetensors would stand in for these
        atomic_write_files(files, stale=[folder / EMA_FILE])
        logger.info("saved %s to %s", values["model"], folder)
        return folder


def _config_json(values: Mapping[str, Any]) -> bytes:
    """config.json's bytes; a value JSON cannot hold (a NumPy number, say) is named."""
    for key, value in values.items():
        try:
            json.dumps(value, allow_nan=False)
        except (TypeError, ValueError) as e:
            raise ValueError(f"config[{key!r}] = {value!r} cannot be written to {CONFIG_FILE}: {e}") from None
    return json.dumps(values, indent=2).encode()


def _check_entries(config: Mapping[str, Any], source: str) -> None:
    missing = [k for k in ("model", "config") if k not in config]
    if missing or not isinstance(config.get("config"), Mapping):
        raise ValueError(f"{source}: expected 'model' (a name) and 'config' (its fields) entries; missing {missing}")


def build_from_config(config: Mapping[str, Any], source: str = "config.json", *, origin: str = "") -> nn.Module:
    """An untrained model with the architecture a config.json describes (in train mode, weights not loaded).

    `model.classes` holds the class names and `model.pretrained_cfg` describes the weights the caller loads from
    `origin` (a file or URL), not the registered variant's: the preprocessing of the config, `url` the origin, no
    `top1` (NVIDIA's ImageNet number is not these weights'), the class count of the head, `label_set` and
    `license` from config.json where it records them (see `_weights_record`).
    """
    import gcvit
    from gcvit.models.pretrained import PretrainedCfg

    _check_entries(config, source)
    fields = dict(config["config"])
    num_classes = fields.pop("num_classes", config.get("num_classes"))
    try:
        model = gcvit.create_model(str(config["model"]), num_classes=num_classes, **fields)
    except (TypeError, ValueError) as e:
        raise ValueError(f"{source}: does not describe a model gcvit can build: {e}") from None
    classes = list(config.get("classes") or [str(i) for i in range(model.num_classes)])
    if len(classes) != model.num_classes:
        raise ValueError(f"{source}: {len(classes)} class names for a head of {model.num_classes} outputs")
    model.classes = classes
    keys = ("mean", "std", "interpolation", "crop_pct", "crop_mode", "img_size")
    pc = {k: tuple(config[k]) if isinstance(config[k], list) else config[k] for k in keys if k in config}
    size = pc.get("img_size", (1, 1))
    if isinstance(size, int) and not isinstance(size, bool):
        pc["img_size"] = size = (size, size)  # one int is a square
    if not (
        isinstance(size, tuple)
        and len(size) == 2
        and all(isinstance(v, int) and not isinstance(v, bool) and v > 0 for v in size)
    ):
        raise ValueError(f"{source}: img_size must be an int or [H, W] in pixels; got {config['img_size']!r}")
    registered = getattr(model, "pretrained_cfg", None) or PretrainedCfg(url="", license="")
    model.pretrained_cfg = dataclasses.replace(
        registered, **pc, **_weights_record(config, classes, registered), url=origin, num_classes=model.num_classes
    )
    return model


def _weights_record(config: Mapping[str, Any], classes: list[str], registered: Any) -> dict[str, Any]:
    """What `pretrained_cfg` says of loaded weights beyond their preprocessing: no sha256 nor top1 (the registry's
    are the official file's); label_set as config.json records it, else 'imagenet-1k' for the ImageNet-1K class
    names and '' (not a known label set, as after `reset_classifier`) for others; license as config.json records
    it, else the registered weights' (NVIDIA's licence binds a fine-tune of their weights, not a model trained
    from scratch, and a folder that does not say how it was trained is taken to descend from them)."""
    from gcvit.imagenet import NUM_CLASSES, imagenet1k_classes

    imagenet = len(classes) == NUM_CLASSES and classes == imagenet1k_classes()
    label_set = config.get("label_set", "imagenet-1k" if imagenet else "")
    license_ = config.get("license", registered.license)
    for key, value in (("label_set", label_set), ("license", license_)):
        if not isinstance(value, str):
            raise ValueError(f"{CONFIG_FILE}: {key!r} must be a string; got {value!r}")
    return {"sha256": None, "top1": None, "label_set": label_set, "license": license_}


def _read_config(path: Path) -> dict[str, Any]:
    try:
        values = json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise ValueError(f"{path}: not valid JSON: {e}") from None
    if not isinstance(values, dict):
        raise ValueError(f"{path}: expected a JSON object; got {type(values).__name__}")
    return values


def chosen_weights(folder: Path, config: Mapping[str, Any], ema: bool | None) -> Path:
    """The weights file of a checkpoint or saved folder that loaders take: ema.safetensors with `ema` True,
    model.safetensors with False; with None, the file `config` (its config.json) names under "weights" (`gcvit
    train` records there the better of its raw and EMA weights on validation), else ema.safetensors where the
    folder has one, else model.safetensors."""
    if ema is not None:
        return folder / (EMA_FILE if ema else MODEL_FILE)
    named = config.get("weights")
    if named is None:
        return folder / (EMA_FILE if (folder / EMA_FILE).is_file() else MODEL_FILE)
    if named not in (MODEL_FILE, EMA_FILE):
        raise ValueError(f"{folder / CONFIG_FILE}: 'weights' must be {MODEL_FILE!r} or {EMA_FILE!r}; got {named!r}")
    return folder / named


def checkpoint_folder(path: Path) -> Path:
    """The checkpoint folder inside a run folder (best/, else last/), or the folder itself."""
    if (path / CONFIG_FILE).is_file():
        return path
    for sub in ("best", "last"):
        if (path / sub / CONFIG_FILE).is_file():
            return path / sub
    raise FileNotFoundError(f"{path} has no {CONFIG_FILE}; expected a folder written by save_pretrained or gcvit train")


def _fetch_folder(base_url: str, cache: Path, force_download: bool, ema: bool | None, headers: dict[str, str]) -> Path:
    """Download config.json, model.safetensors and ema.safetensors under `base_url` into `cache` (kept for later
    calls). config.json comes first: a folder that is not gcvit's is named before its weights are fetched. The
    weights are checked against the folder's SHA256SUMS where it has one. ema.safetensors is required with `ema`
    True, skipped with False; with None, required where config.json names it as the folder's weights (see
    `chosen_weights`), skipped where it names model.safetensors, else fetched where it exists (a training
    checkpoint's folder then loads its EMA weights, as it does locally); the absence of optional files is
    remembered."""
    from gcvit.download import download

    base = base_url.rstrip("/")
    optional = (EMA_FILE, digests.SUMS_FILE)
    if force_download:
        for name in (CONFIG_FILE, MODEL_FILE, *optional, *(f"{n}.absent" for n in optional)):
            (cache / name).unlink(missing_ok=True)
    config = download(f"{base}/{CONFIG_FILE}", folder=cache, warn_unverified=False, headers=headers)
    values = _read_config(config)
    _check_entries(values, f"{base}/{CONFIG_FILE}")
    if ema is None and "weights" in values:  # the folder names its weights: that file is required, the other not
        ema = chosen_weights(cache, values, None).name == EMA_FILE
    if not (cache / MODEL_FILE).exists():  # a folder cached whole (by any version) is used as it is, offline too
        _fetch_optional(base, digests.SUMS_FILE, cache, headers)
    sums = digests.read_sums(cache)  # downloads are checked as they stream; the file that loads, when it loads

    def fetch(name: str) -> None:
        download(f"{base}/{name}", sums.get(name), folder=cache, headers=headers)

    if not (cache / MODEL_FILE).exists():
        fetch(MODEL_FILE)
    if ema and not (cache / EMA_FILE).exists():
        fetch(EMA_FILE)
    elif ema is None and not (cache / EMA_FILE).exists():
        _fetch_optional(base, EMA_FILE, cache, headers, sums.get(EMA_FILE))
    return cache


def _fetch_optional(base: str, name: str, cache: Path, headers: dict[str, str], sha256: str | None = None) -> bool:
    """Fetch base/name into `cache` if the host has it; whether the folder now holds it. A 403 or 404 (S3 and GCS
    answer 403 for a missing file) is remembered in `<name>.absent`; other failures (offline) log a warning."""
    from gcvit.download import download

    absent = cache / f"{name}.absent"
    if absent.exists():
        return False
    try:
        download(f"{base}/{name}", sha256, folder=cache, warn_unverified=name == EMA_FILE, headers=headers)
    except OSError as e:
        if getattr(e.__cause__, "code", None) in (403, 404):
            absent.touch()
        else:
            logger.warning("could not fetch %s/%s (%s); loading without it", base, name, e)
        return False
    return True


def _stored_token() -> str | None:
    """The Hub token where huggingface_hub looks for it: $HF_TOKEN (or the older $HUGGING_FACE_HUB_TOKEN), else the
    file `huggingface-cli login` writes ($HF_TOKEN_PATH, else $HF_HOME/token, $HF_HOME defaulting to
    ~/.cache/huggingface)."""
    token = os.environ.get("HF_TOKEN") or os.environ.get("HUGGING_FACE_HUB_TOKEN")
    if token:
        return token
    home = Path(os.environ.get("HF_HOME") or "~/.cache/huggingface").expanduser()
    path = Path(os.environ.get("HF_TOKEN_PATH") or home / "token").expanduser()
    try:
        return path.read_text().strip() or None
    except OSError:
        return None


def _bearer(token: str | None) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}"} if token else {}


def _repo_url(repo_id: str, revision: str) -> str:
    """The URL of a hub repo's folder at `revision`, on $HF_ENDPOINT (default https://huggingface.co)."""
    return f"{os.environ.get('HF_ENDPOINT', HF_ENDPOINT).rstrip('/')}/{repo_id}/resolve/{revision}"


def resolve_pretrained(
    source: str | os.PathLike[str],
    *,
    revision: str = "main",
    cache_dir: str | os.PathLike[str] | None = None,
    force_download: bool = False,
    ema: bool | None = None,
    token: str | None = None,
) -> Path:
    """A local folder holding config.json for a folder path, an http(s) URL of a folder, or a hub repo id (`ema`:
    whether to fetch ema.safetensors too; None: where there is one; `token`: see `from_pretrained`)."""
    from gcvit.download import cache_dir as default_cache

    text = str(source)
    path = Path(text).expanduser()
    if path.exists():
        if not path.is_dir():
            raise ValueError(f"{path} is a file; expected a folder holding {CONFIG_FILE} and {MODEL_FILE}")
        return checkpoint_folder(path)
    root = Path(cache_dir) if cache_dir is not None else default_cache() / "hub"
    if text.startswith(("http://", "https://")):
        digest = hashlib.sha256(text.rstrip("/").encode()).hexdigest()[:16]
        return _fetch_folder(text, root / "urls" / digest, force_download, ema, _bearer(token))
    if _REPO_ID.match(text):
        cache = root / "repos" / text.replace("/", "--") / revision
        token = token or _stored_token()
        try:
            return _fetch_folder(_repo_url(text, revision), cache, force_download, ema, _bearer(token))
        except OSError as e:  # a mistyped local path looks like a repo id too
            why = ""
            if getattr(e.__cause__, "code", None) == 401:
                held = "the token given was refused" if token else "set HF_TOKEN, or pass token="
                why = f" (no such repo, or a private or gated one, which needs an access token: {held})"
            raise OSError(f"{text!r} is no local folder, and as a hub repo id: {e}{why}") from e
    from gcvit.models.registry import close_names

    raise FileNotFoundError(
        f"{text!r} is neither an existing folder, an http(s):// URL nor a hub repo id 'user/name'{close_names(text)}"
    )


def from_pretrained(
    pretrained_model_name_or_path: str | os.PathLike[str],
    *,
    revision: str = "main",
    cache_dir: str | os.PathLike[str] | None = None,
    force_download: bool = False,
    ema: bool | None = None,
    token: str | None = None,
    device: str | torch.device = "cpu",
) -> nn.Module:
    """Load a model saved with `save_pretrained` (or a `gcvit train` checkpoint), in eval mode.

    Args:
        pretrained_model_name_or_path: a local folder (a saved folder, a checkpoint folder, or a run folder: its
            best/, else last/); a .safetensors file with config.json beside it; an http(s):// URL of a folder; or
            a Hugging Face Hub repo id "user/name", fetched from $HF_ENDPOINT (default
            https://huggingface.co)/user/name/resolve/<revision>/.
        revision: branch, tag or commit of a hub repo.
        cache_dir: where downloads go (default: <gcvit cache>/hub); downloaded folders are reused.
        force_download: download again even when cached.
        ema: load ema.safetensors (a training checkpoint's EMA weights) instead of model.safetensors; None: when
            the folder has it, as `gcvit eval` does.
        token: an access token for a private or gated hub repo (sent as a Bearer token to the host asked, never to
            another host it redirects to); default for repo ids: huggingface_hub's ($HF_TOKEN, else the file
            `huggingface-cli login` wrote).
        device: where to put the model.
    Returns:
        The model, with `model.classes` (class names) and `model.pretrained_cfg` (preprocessing) from config.json.
    Raises:
        FileNotFoundError: no such folder, or a file is missing from it (named).
        ValueError: config.json is not valid or does not describe a model.
        gcvit.CheckpointError: the weights do not fit the architecture (keys named).
    """
    from gcvit.models.weights import load_checkpoint

    source = str(pretrained_model_name_or_path)
    file = Path(source).expanduser()
    named = None
    if file.is_file() and file.suffix == ".safetensors":  # these weights, the architecture of config.json beside them
        if ema is not None:
            raise ValueError(f"ema goes with a folder; {file} names its weights itself")
        folder, named = file.parent, file
        if not (folder / CONFIG_FILE).is_file():
            raise FileNotFoundError(f"{folder / CONFIG_FILE} does not exist; expected it beside {file.name}")
    else:
        folder = resolve_pretrained(
            source, revision=revision, cache_dir=cache_dir, force_download=force_download, ema=ema, token=token
        )
    config = _read_config(folder / CONFIG_FILE)
    weights = named or chosen_weights(folder, config, ema)
    if not weights.is_file():
        raise FileNotFoundError(f"{weights} does not exist; expected the weights next to {CONFIG_FILE}")
    if file.exists():
        origin = str(weights)
    else:  # the file's URL, not the cache's copy
        base = source if source.startswith(("http://", "https://")) else _repo_url(source, revision)
        origin = f"{base.rstrip('/')}/{weights.name}"
    model = build_from_config(config, str(folder / CONFIG_FILE), origin=origin)
    load_checkpoint(model, weights, strict=True)
    return model.to(device).eval()
