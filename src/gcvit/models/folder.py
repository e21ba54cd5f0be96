"""The saved-model folder: what a folder holding a model is, written and read in one place.

A folder holds `config.json` and `model.safetensors` at its root, the layout of huggingface_hub's ModelHubMixin (a
folder pushed to the Hugging Face Hub loads back with one call). `model.save_pretrained(dir)` writes one; `gcvit
train` writes one per checkpoint (RUN/last/, RUN/best/), adding `ema.safetensors` (the EMA weights) and `state.pt`
(the training state, `gcvit.train.checkpoint`). Both write `SHA256SUMS`, checked by the loaders.

config.json ("model", "config" with every config field, "num_classes", "classes", "img_size", "mean", "std",
"interpolation", "crop_pct", "crop_mode", "license"; `gcvit train` adds "weights", "epoch" and "val_top1") is
written by `model_config` and read by `read_config`. Saved folders, checkpoint folders and run folders are
therefore interchangeable: `gcvit.load` and every command take any of them.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from torch import nn

from gcvit import digests
from gcvit.atomic import atomic_write_files, remove_temporaries
from gcvit.imagenet import IMAGENET_1K_LABEL_SETS, NUM_CLASSES, imagenet1k_classes
from gcvit.models.pretrained import PretrainedCfg
from gcvit.models.weights import safetensors_file

logger = logging.getLogger(__name__)

CONFIG_FILE, MODEL_FILE, EMA_FILE = "config.json", "model.safetensors", "ema.safetensors"
CHECKPOINT_NAMES = ("best", "last")  # the checkpoint folders of a run folder, in the order loaders take them


def default_classes(model: nn.Module) -> list[str]:
    """ImageNet-1K names for a 1000-class head of an ImageNet label set; otherwise the indices as strings."""
    pc = getattr(model, "pretrained_cfg", None)
    num_classes = int(getattr(model, "num_classes", 0))
    if num_classes == NUM_CLASSES and getattr(pc, "label_set", None) in IMAGENET_1K_LABEL_SETS:
        return imagenet1k_classes()
    return [str(i) for i in range(num_classes)]


def model_config(model: nn.Module, classes: Sequence[str] | None = None, name: str | None = None) -> dict[str, Any]:
    """The config.json of a model built by `gcvit.create_model` or `gcvit.load` (see the module docstring); `name`
    replaces the model's `model_name` (the registered name it was built from)."""
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


def config_json(values: Mapping[str, Any]) -> bytes:
    """config.json's bytes; a value JSON cannot hold (a NumPy number, say) is named."""
    for key, value in values.items():
        try:
            json.dumps(value, allow_nan=False)
        except (TypeError, ValueError) as e:
            raise ValueError(f"config[{key!r}] = {value!r} cannot be written to {CONFIG_FILE}: {e}") from None
    return json.dumps(values, indent=2).encode()


def check_entries(config: Mapping[str, Any], source: str) -> None:
    """Raise a ValueError unless config.json (read from `source`) names a model and its config fields."""
    missing = [k for k in ("model", "config") if k not in config]
    if missing or not isinstance(config.get("config"), Mapping):
        raise ValueError(f"{source}: expected 'model' (a name) and 'config' (its fields) entries; missing {missing}")


def read_config(path: Path) -> dict[str, Any]:
    """A config.json (`path`, or the one in folder `path`) as a mapping; the error names the file when it is
    missing, no JSON, or no JSON object."""
    path = path / CONFIG_FILE if path.is_dir() else path
    if not path.is_file():
        raise FileNotFoundError(f"{path} does not exist; expected a folder written by save_pretrained or gcvit train")
    try:
        values = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ValueError(f"{path} is not valid JSON: {e}") from None
    if not isinstance(values, dict) or not isinstance(values.get("config", {}), dict):
        raise ValueError(f"{path}: expected a JSON object with the model's name and config, as `gcvit train` writes")
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


def find_checkpoint(run_dir: Path, name: str, needed: Sequence[str] = (MODEL_FILE, CONFIG_FILE)) -> Path | None:
    """RUN/<name>/ when it holds the `needed` files, else the newest RUN/<name>.old-*/ that does (a crash in the
    middle of a checkpoint swap leaves one: `gcvit.train.checkpoint`); None if neither."""

    def complete(path: Path) -> bool:
        return path.is_dir() and all((path / f).is_file() for f in needed)

    if complete(run_dir / name):
        return run_dir / name
    olds = [p for p in run_dir.glob(f"{name}.old-*") if complete(p)]
    return max(olds, key=lambda p: p.stat().st_mtime) if olds else None


def checkpoint_folder(path: Path) -> Path:
    """The folder holding config.json for a saved or checkpoint folder (itself) or a run folder (its best/, else
    last/)."""
    if (path / CONFIG_FILE).is_file():
        return path
    for name in CHECKPOINT_NAMES:
        found = find_checkpoint(path, name)
        if found is not None:
            return found
    raise FileNotFoundError(
        f"{path} has no {CONFIG_FILE} and holds no checkpoint (best/ or last/ with {MODEL_FILE} and {CONFIG_FILE}); "
        "expected a folder written by save_pretrained or gcvit train"
    )


def weights_record(config: Mapping[str, Any], classes: list[str], registered: PretrainedCfg) -> dict[str, Any]:
    """What `pretrained_cfg` says of weights loaded from a folder beyond their preprocessing: no sha256 nor top1
    (the registry's are the official file's); label_set as config.json records it, else 'imagenet-1k' for the
    ImageNet-1K class names and '' (not a known label set, as after `reset_classifier`) for others; license as
    config.json records it, else the registered weights' (NVIDIA's licence binds a fine-tune of their weights, not
    a model trained from scratch, and a folder that does not say how it was trained is taken to descend from
    them); the epoch of a `gcvit train` checkpoint."""
    imagenet = len(classes) == NUM_CLASSES and classes == imagenet1k_classes()
    label_set = config.get("label_set", "imagenet-1k" if imagenet else "")
    license_ = config.get("license", registered.license)
    for key, value in (("label_set", label_set), ("license", license_)):
        if not isinstance(value, str):
            raise ValueError(f"{CONFIG_FILE}: {key!r} must be a string; got {value!r}")
    epoch = config.get("epoch")
    return {"sha256": None, "top1": None, "label_set": label_set, "license": license_, "epoch": epoch}


def preprocessing(config: Mapping[str, Any], source: str) -> dict[str, Any]:
    """The preprocessing entries of config.json as `PretrainedCfg` fields (lists as tuples; one int img_size is a
    square); a ValueError naming an img_size that is no size."""
    keys = ("mean", "std", "interpolation", "crop_pct", "crop_mode", "img_size")
    pc = {k: tuple(config[k]) if isinstance(config[k], list) else config[k] for k in keys if k in config}
    size = pc.get("img_size", (1, 1))
    if isinstance(size, int) and not isinstance(size, bool):
        pc["img_size"] = size = (size, size)
    if not (
        isinstance(size, tuple)
        and len(size) == 2
        and all(isinstance(v, int) and not isinstance(v, bool) and v > 0 for v in size)
    ):
        raise ValueError(f"{source}: img_size must be an int or [H, W] in pixels; got {config['img_size']!r}")
    return pc


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
        atomically), in the layout `gcvit.load` and `gcvit eval/predict/export` read.

        Args:
            save_directory: the folder.
            config: entries that replace or add to the generated config.json (e.g. {"crop_pct": 0.9}).
            classes: class names of the head's outputs; default: the model's `classes` attribute (set by
                `gcvit.load`), else the ImageNet-1K names for a 1000-class ImageNet head, else "0", "1", ...
        Returns:
            The folder.
        """
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
        text = config_json(values)  # everything that can fail is done before the folder is touched
        weights = safetensors_file(self.state_dict(), metadata={"format": "gcvit"})
        sums = digests.sums_text({MODEL_FILE: hashlib.sha256(weights).hexdigest()})
        folder.mkdir(parents=True, exist_ok=True)
        files = {folder / MODEL_FILE: weights, folder / CONFIG_FILE: text, folder / digests.SUMS_FILE: sums}
        remove_temporaries(folder, [p.name for p in files])  # a killed earlier save's
        # loaders prefer EMA weights where there are any: an older ema.safetensors would stand in for these
        atomic_write_files(files, stale=[folder / EMA_FILE])
        logger.info("saved %s to %s", values["model"], folder)
        return folder
