"""`gcvit.load`: one loader for whatever names a model, used by every command and by `gcvit.from_pretrained`.

A source is a registered name (`gcvit_tiny`, `gcvit_tiny.in1k`: built as `create_model` builds it), a saved-model
folder (`gcvit.models.folder`): a run folder, a checkpoint folder, a `save_pretrained` folder, a weights file with
config.json beside it, or the same fetched from an http(s) URL or a Hugging Face Hub repo id (`gcvit.hub`).

Every loaded model carries one record of what it takes and gives: `model.pretrained_cfg` (input size, crop, mean
and std, interpolation; where the weights came from, `url`; a checkpoint's `epoch`), `model.classes` (the head's
class names) and `model.model_name` (the registered name it is built from).
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from torch import nn

from gcvit import hub
from gcvit.models.folder import (
    CONFIG_FILE,
    check_entries,
    checkpoint_folder,
    chosen_weights,
    default_classes,
    preprocessing,
    read_config,
    weights_record,
)
from gcvit.models.pretrained import IMAGENET_MEAN, IMAGENET_STD, PretrainedCfg
from gcvit.models.registry import close_names, create_model, is_model_name
from gcvit.models.weights import load_checkpoint

FETCH_OPTIONS = ("revision", "cache_dir", "force_download", "token")  # of remote sources (`gcvit.hub.fetch`)


def load(
    source: str | os.PathLike[str],
    *,
    ema: bool | None = None,
    device: str | torch.device | None = None,
    **overrides: Any,
) -> nn.Module:
    """Load a model from a name, a folder, a file, a URL or a hub repo id, in eval mode.

    Args:
        source: a registered name or `arch.tag` (`gcvit.list_models()`); a run folder (its best/, else last/), a
            checkpoint folder or a `save_pretrained` folder; a weights file with config.json beside it; an http(s)
            URL of such a folder; or a Hugging Face Hub repo id "user/name".
        ema: for folders: load ema.safetensors (True) or model.safetensors (False); None: the file the folder's
            config.json chooses (`gcvit train` keeps the better on validation), else the EMA weights where there
            are any.
        device: where to put the model; None: where it is built (the CPU, or the device of a `with
            torch.device(...)` block).
        overrides: for a name, `create_model`'s arguments (`pretrained=True` for the official weights, or a
            checkpoint path or URL; `num_classes`, `img_size`, any config field); for a saved model, config fields
            (`drop_path_rate`, `img_size`, ...) and `num_classes` (another than the saved one gives a fresh head, for
            fine-tuning); for a URL or repo id also `revision`, `cache_dir`, `force_download` and `token` (an access
            token for a private or gated repo, sent to the host asked only; default: huggingface_hub's, $HF_TOKEN
            or the file `huggingface-cli login` wrote).
    Returns:
        The model in eval mode, with `pretrained_cfg`, `classes` and `model_name` (see the module docstring).
    Raises:
        FileNotFoundError: no such name, folder or file (close names given), or a file missing from the folder.
        ValueError: config.json is not valid or does not describe a model; an option that does not fit the source.
        gcvit.CheckpointError: the weights do not fit the architecture (keys named).
    """
    text = str(source)
    path = Path(text).expanduser()
    fetching = {k: overrides.pop(k) for k in FETCH_OPTIONS if k in overrides}
    if path.exists() or hub.is_remote(text):
        if "pretrained" in overrides:
            raise ValueError(f"pretrained goes with a model name; {text!r} holds its own weights")
        if path.exists():
            if fetching:
                raise ValueError(f"{sorted(fetching)} go with a URL or hub repo id; {text!r} is local")
            folder, weights = _local(path, ema)
            origin = str(weights)
        else:
            folder = hub.fetch(text, ema=ema, **fetching)
            weights = chosen_weights(folder, read_config(folder), ema)
            origin = f"{hub.folder_url(text, fetching.get('revision', 'main'))}/{weights.name}"
        model = _saved_model(folder, weights, origin, overrides)
    elif is_model_name(text):
        if ema is not None or fetching:
            given = ["ema"] * (ema is not None) + sorted(fetching)
            raise ValueError(f"{given} go with a folder, URL or hub repo id; {text!r} is a model name")
        model = create_model(text, **overrides)
        model.classes = default_classes(model)
    else:
        raise FileNotFoundError(
            f"{text!r} is neither a model name{close_names(text)}, a run folder, a checkpoint, an existing folder or "
            "file, an http(s):// URL nor a hub repo id 'user/name' (gcvit models lists the names)"
        )
    return (model if device is None else model.to(device)).eval()


def _local(path: Path, ema: bool | None) -> tuple[Path, Path]:
    """(folder holding config.json, weights file) of a local folder or weights file."""
    if path.is_dir():
        folder = checkpoint_folder(path)
        return folder, chosen_weights(folder, read_config(folder), ema)
    if not (path.parent / CONFIG_FILE).is_file():
        raise FileNotFoundError(
            f"{path} has no {CONFIG_FILE} beside it; expected a run folder, a checkpoint folder or a .safetensors "
            "file that `gcvit train` or save_pretrained wrote"
        )
    if path.name == CONFIG_FILE:
        raise ValueError(f"{path} is a file; expected a folder holding it, or the weights file beside it")
    if ema is not None:
        raise ValueError(f"ema goes with a folder; {path} names its weights itself")
    return path.parent, path


def _saved_model(folder: Path, weights: Path, origin: str, overrides: dict[str, Any]) -> nn.Module:
    """The model of a saved folder with `weights` (from `origin`, a path or URL) loaded, strictly; `overrides`:
    config fields, and num_classes for a fresh head."""
    if not weights.is_file():
        raise FileNotFoundError(f"{weights} does not exist; expected the weights next to {CONFIG_FILE}")
    config = read_config(folder)
    if config.get("task") in ("detection", "segmentation"):
        if overrides:
            raise ValueError(
                f"{folder} holds a {config['task']} model; overrides {sorted(overrides)} go with classifiers"
            )
        build = _detector if config["task"] == "detection" else _segmenter
        return build(config, folder, weights, origin)
    num_classes = overrides.pop("num_classes", None)
    model = build_from_config(config, str(folder / CONFIG_FILE), origin=origin, **overrides)
    load_checkpoint(model, weights, strict=True)
    if num_classes is not None and num_classes != model.num_classes:
        model.reset_classifier(num_classes)
        model.classes = default_classes(model)
    return model


def _dense_fields(
    config: Mapping[str, Any], folder: Path, needed: tuple[str, ...], kind: str
) -> tuple[str, dict[str, Any]]:
    """(config.json's path, the backbone's config fields as create_detector/create_segmenter take them) of a detector
    or segmenter folder; a ValueError names the `needed` keys its config.json lacks."""
    source = str(folder / CONFIG_FILE)
    missing = [k for k in needed if k not in config]
    if missing:
        raise ValueError(f"{source}: a {kind}'s config.json needs {missing}")
    fields = {k: tuple(v) if isinstance(v, list) else v for k, v in (config.get("config") or {}).items()}
    fields.pop("num_classes", None)
    return source, fields


def _detector(config: Mapping[str, Any], folder: Path, weights: Path, origin: str) -> nn.Module:
    """The detector a detection run's config.json describes (`gcvit.train.detection`), its weights loaded strictly;
    `classes`, `category_ids` (label -> the annotations' category id) and `model_name` (the backbone) from it."""
    from gcvit.models.detector import create_detector

    source, fields = _dense_fields(config, folder, ("arch", "model", "classes", "category_ids"), "detector")
    try:
        model = create_detector(
            str(config["arch"]),
            backbone=str(config["model"]),
            num_classes=len(config["classes"]),
            min_size=int(config.get("min_size", 800)),
            max_size=int(config.get("max_size", 1333)),
            backbone_overrides=fields,
            **dict(config.get("detector_options") or {}),
        )
    except (TypeError, ValueError) as e:
        raise ValueError(f"{source}: does not describe a detector gcvit can build: {e}") from None
    _load_whole(model, weights, "detector")
    model.classes, model.category_ids = list(config["classes"]), list(config["category_ids"])
    model.model_name, model.source = str(config["model"]), origin
    return model


def _segmenter(config: Mapping[str, Any], folder: Path, weights: Path, origin: str) -> nn.Module:
    """The segmenter a segmentation run's config.json describes (`gcvit.train.segmentation`), its weights loaded
    strictly; `classes`, `crop_size`, `reduce_zero_label`, `mean`, `std` and `model_name` from it."""
    from gcvit.models.segmenter import create_segmenter

    source, fields = _dense_fields(config, folder, ("arch", "model", "classes"), "segmenter")
    try:
        model = create_segmenter(
            str(config["arch"]),
            backbone=str(config["model"]),
            num_classes=len(config["classes"]),
            backbone_overrides=fields,
            channels=int(config.get("head_channels", 512)),
        )
    except (TypeError, ValueError) as e:
        raise ValueError(f"{source}: does not describe a segmenter gcvit can build: {e}") from None
    _load_whole(model, weights, "segmenter")
    model.task, model.classes = "segmentation", list(config["classes"])
    model.crop_size, model.reduce_zero_label = int(config.get("crop_size", 512)), bool(config.get("reduce_zero_label"))
    model.mean, model.std = tuple(config.get("mean", IMAGENET_MEAN)), tuple(config.get("std", IMAGENET_STD))
    model.model_name, model.source = str(config["model"]), origin
    return model


def _load_whole(model: nn.Module, weights: Path, kind: str) -> None:
    """Load `weights` into a detector or segmenter strictly, naming the file when they do not fit."""
    from gcvit.models.weights import CheckpointError, read_state_dict

    try:
        result = model.load_state_dict(read_state_dict(weights), strict=False)
    except RuntimeError as e:  # mis-shaped tensors: torch names each on a line of its own
        lines = [line.strip() for line in str(e).splitlines() if "size mismatch" in line]
        more = f" (and {len(lines) - 1} more)" if len(lines) > 1 else ""
        raise CheckpointError(
            f"{weights} does not fit the {kind} its config.json describes: {(lines or [str(e)])[0]}{more}"
        ) from None
    if result.missing_keys or result.unexpected_keys:
        keys = (result.missing_keys + result.unexpected_keys)[:10]
        raise CheckpointError(f"{weights} does not fit the {kind} its config.json describes: {keys}")


def build_from_config(
    config: Mapping[str, Any], source: str = CONFIG_FILE, *, origin: str = "", **overrides: Any
) -> nn.Module:
    """An untrained model with the architecture a config.json describes, `overrides` replacing config fields (in
    train mode, weights not loaded).

    `model.classes` holds the class names and `model.pretrained_cfg` describes the weights the caller loads from
    `origin` (a file or URL), not the registered variant's: the preprocessing of the config, `url` the origin, no
    `top1` (NVIDIA's ImageNet number is not these weights'), the class count of the head, `label_set` and
    `license` from config.json where it records them, a checkpoint's epoch (`gcvit.models.folder.weights_record`).
    """
    check_entries(config, source)
    fields = dict(config["config"]) | overrides
    num_classes = fields.pop("num_classes", config.get("num_classes"))
    try:
        model = create_model(str(config["model"]), num_classes=num_classes, **fields)
    except (TypeError, ValueError) as e:
        raise ValueError(f"{source}: does not describe a model gcvit can build: {e}") from None
    classes = list(config.get("classes") or [str(i) for i in range(model.num_classes)])
    if len(classes) != model.num_classes:
        raise ValueError(f"{source}: {len(classes)} class names for a head of {model.num_classes} outputs")
    model.classes = classes
    registered = getattr(model, "pretrained_cfg", None) or PretrainedCfg(url="", license="")
    record = weights_record(config, classes, registered)
    model.pretrained_cfg = dataclasses.replace(
        registered, **preprocessing(config, source), **record, url=origin, num_classes=model.num_classes
    )
    return model


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
    """Load a model saved with `save_pretrained` (or a `gcvit train` checkpoint), in eval mode: `gcvit.load` for
    folders, files, URLs and hub repo ids, with huggingface_hub's argument names.

    Args:
        pretrained_model_name_or_path: a local folder (a saved folder, a checkpoint folder, or a run folder: its
            best/, else last/); a .safetensors file with config.json beside it; an http(s):// URL of a folder; or
            a Hugging Face Hub repo id "user/name", fetched from $HF_ENDPOINT (default
            https://huggingface.co)/user/name/resolve/<revision>/.
        revision: branch, tag or commit of a hub repo.
        cache_dir: where downloads go (default: <gcvit cache>/hub); downloaded folders are reused.
        force_download: download again even when cached.
        ema: load ema.safetensors (a training checkpoint's EMA weights) instead of model.safetensors; None: the
            file config.json chooses, else the EMA weights where the folder has them, as `gcvit eval` does.
        token: an access token for a private or gated hub repo (see `gcvit.load`).
        device: where to put the model.
    Returns:
        The model, with `model.classes` (class names) and `model.pretrained_cfg` (preprocessing) from config.json.
    """
    text = str(pretrained_model_name_or_path)
    path = Path(text).expanduser()
    if not (path.exists() or hub.is_remote(text)):
        raise FileNotFoundError(
            f"{text!r} is neither an existing folder, an http(s):// URL nor a hub repo id 'user/name'"
            f"{close_names(text)}"
        )
    remote = {"revision": revision, "cache_dir": cache_dir, "force_download": force_download, "token": token}
    return load(text, ema=ema, device=device, **({} if path.exists() else remote))
