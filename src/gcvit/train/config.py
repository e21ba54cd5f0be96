"""The training configuration: one dataclass, YAML files, command-line overrides and the two recipes.

Precedence, lowest first: dataclass defaults, the recipe (`official` sets the paper's values), the YAML file, then
explicit overrides (the command line). The resolved config is saved to RUN/config.yaml.
"""

from __future__ import annotations

import dataclasses
import math
import os
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from gcvit.train.distributed import is_device_name

RECIPES = ("default", "official")
AMP_DTYPES = ("none", "bf16", "fp16")
OFFICIAL_BATCH = 4096  # the global batch the official learning rate was set for


@dataclass
class TrainConfig:
    # model
    model: str = "gcvit_xxtiny"  # a name from gcvit.list_models()
    pretrained: str | bool = False  # False, True (official weights) or a checkpoint path / URL
    num_classes: int | None = None  # None: the dataset's class count
    img_size: int = 32  # training and evaluation resolution (square)
    model_overrides: dict[str, Any] | None = None  # GCViTConfig fields; None: the small digits model on digits
    # data
    data: str | None = None  # 'digits' or 'folder'; None: 'folder' when data_dir or train_dir is set, else 'digits'
    data_dir: str | None = None  # one folder of class sub-folders, split by val_fraction
    train_dir: str | None = None  # or separate train and val folders
    val_dir: str | None = None
    val_fraction: float = 0.2
    strict_data: bool = False  # any unreadable image is an error instead of being skipped
    num_workers: int = 0
    crop_pct: float | None = None  # evaluation crop; None: 1.0 from scratch, the weights' own when pretrained
    # optimisation
    epochs: int = 40  # length of the warmup + cosine schedule
    cooldown_epochs: int = 0  # epochs at min_lr after it (official: 10), as timm's scheduler runs them
    batch_size: int = 64  # global batch (split across processes under torchrun)
    lr: float = 2e-3  # peak learning rate for `batch_size` (the official recipe scales it)
    min_lr: float = 1e-5
    warmup_epochs: float = 2.0
    warmup_lr: float = 1e-6  # learning rate at step 0
    weight_decay: float = 0.05
    layer_decay: float | None = None  # layer-wise lr decay factor, e.g. 0.75; None: off
    clip_grad: float | None = 5.0  # max global grad norm; None: off
    grad_accum: int = 1  # micro-batches per optimizer step (batch_size is per step)
    amp: str = "bf16"  # 'none', 'bf16' or 'fp16' (fp16 only on CUDA, with a GradScaler)
    ema: float | None = 0.99  # EMA decay per optimizer step (official: 0.9998); None: off
    # regularisation and augmentation
    label_smoothing: float = 0.1
    mixup: float = 0.0  # MixUp alpha; 0: off
    cutmix: float = 0.0  # CutMix alpha; 0: off
    randaugment: str | None = None  # e.g. 'rand-m9-mstd0.5-inc1'
    color_jitter: float | None = None
    random_erasing: float = 0.0
    hflip: float = 0.0  # horizontal flip probability (0 for digits: a flipped 2 is no 2)
    crop_scale: float = 0.75  # smallest area fraction of the random resized crop
    drop_path: float | None = None  # stochastic depth; None: the model's own
    # run
    recipe: str = "default"  # 'default' (small data) or 'official' (the paper's ImageNet settings)
    seed: int = 0
    out_dir: str = "runs/digits"
    time_limit: float | None = None  # seconds; stop (with a checkpoint) after the epoch that passes it
    device: str | None = None  # None: cuda when available, else cpu

    def __post_init__(self) -> None:
        self.validate()

    def validate(self) -> None:
        """Raise ValueError naming the first field that has an impossible value (numbers written as YAML strings,
        such as `lr: 1e-3`, become numbers first)."""
        for f in dataclasses.fields(self):
            setattr(self, f.name, _coerce(f.name, getattr(self, f.name), str(f.type)))
        if self.recipe not in RECIPES:
            raise ValueError(f"recipe must be one of {RECIPES}, got {self.recipe!r}")
        if self.amp not in AMP_DTYPES:
            raise ValueError(f"amp must be one of {AMP_DTYPES}, got {self.amp!r}")
        if self.data is None:  # a YAML file that names only data_dir trains on that folder, as the flag does
            self.data = "folder" if self.data_dir or self.train_dir else "digits"
        if self.data not in ("digits", "folder"):
            raise ValueError(f"data must be 'digits' or 'folder', got {self.data!r}")
        if self.data == "digits" and (self.data_dir or self.train_dir or self.val_dir):
            raise ValueError(
                "data='digits' (the bundled digits) takes no data_dir, train_dir or val_dir: drop data, or set it "
                "to 'folder', to train on your folder"
            )
        if self.data == "folder" and not (self.data_dir or self.train_dir):
            raise ValueError("data='folder' needs data_dir, or train_dir and val_dir")
        if self.train_dir and not self.val_dir:
            raise ValueError("train_dir needs val_dir (or pass one data_dir with val_fraction)")
        for name in ("epochs", "batch_size", "grad_accum"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.cooldown_epochs < 0:
            raise ValueError(f"cooldown_epochs must be >= 0, got {self.cooldown_epochs}")
        if self.lr <= 0 or self.min_lr < 0 or self.warmup_epochs < 0:
            raise ValueError(
                f"need lr > 0, min_lr >= 0, warmup_epochs >= 0; got {self.lr}, {self.min_lr}, {self.warmup_epochs}"
            )
        if self.min_lr > self.lr or self.warmup_lr > self.lr:
            raise ValueError(
                f"min_lr ({self.min_lr}) and warmup_lr ({self.warmup_lr}) must not exceed lr ({self.lr}): the schedule "
                "would rise above its peak; lower them with the lr (e.g. --min-lr 0)"
            )
        if self.data_dir and (self.train_dir or self.val_dir):
            raise ValueError(
                "give data_dir (split by val_fraction) or train_dir and val_dir, not both: data_dir would be split "
                "and val_dir ignored"
            )
        if self.ema is not None and not 0 < self.ema < 1:
            raise ValueError(f"ema decay must be in (0, 1) or None, got {self.ema}")
        if self.layer_decay is not None and not 0 < self.layer_decay <= 1:
            raise ValueError(f"layer_decay must be in (0, 1] or None, got {self.layer_decay}")
        if not 0 <= self.label_smoothing < 1:
            raise ValueError(f"label_smoothing must be in [0, 1), got {self.label_smoothing}")
        checks = (
            ("clip_grad", self.clip_grad is None or self.clip_grad > 0, "> 0 or None"),
            ("warmup_lr", self.warmup_lr >= 0, ">= 0"),
            ("weight_decay", self.weight_decay >= 0, ">= 0"),
            ("num_classes", self.num_classes is None or self.num_classes >= 2, ">= 2 or None (the data's count)"),
            ("crop_scale", 0 < self.crop_scale <= 1, "in (0, 1]"),
            ("hflip", 0 <= self.hflip <= 1, "a probability in [0, 1]"),
            ("random_erasing", 0 <= self.random_erasing <= 1, "a probability in [0, 1]"),
            ("mixup", self.mixup >= 0, ">= 0"),
            ("cutmix", self.cutmix >= 0, ">= 0"),
            ("color_jitter", self.color_jitter is None or self.color_jitter >= 0, ">= 0 or None"),
            ("time_limit", self.time_limit is None or self.time_limit > 0, "> 0 seconds or None"),
            ("seed", 0 <= self.seed < 2**32, "in [0, 2**32)"),
            (
                "device",
                self.device is None or is_device_name(self.device),
                "cpu or cuda[:N]",
            ),
        )
        for name, ok, expected in checks:
            if not ok:
                raise ValueError(f"{name} must be {expected}, got {getattr(self, name)!r}")
        self._check_model_overrides()

    def _check_model_overrides(self) -> None:
        """Overrides must name fields of the model's config, other than the two the training options set."""
        from gcvit.models.registry import resolve_name

        if not self.model_overrides:
            return
        config = resolve_name(self.model).config  # an unknown model is named here, with close matches
        fields = {f.name for f in dataclasses.fields(config)}
        for key in ("num_classes", "img_size"):
            if key in self.model_overrides:
                raise ValueError(f"model_overrides may not set {key}; use the training option {key} instead")
        unknown = sorted(set(self.model_overrides) - fields)
        if unknown:
            expected = sorted(fields - {"num_classes", "img_size"})
            raise ValueError(
                f"model_overrides: unknown field(s) {unknown} for {self.model}; expected fields of "
                f"{type(config).__name__}: {expected}"
            )

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def _coerce(name: str, value: Any, annotation: str) -> Any:
    """`value` as the field's annotated type: ints stay ints, numbers (and numeric strings: PyYAML reads 1e-3 as a
    string) become floats for float fields; anything else of the wrong type is a ValueError naming the field."""
    kinds = {k.strip() for k in annotation.split("|")}
    if value is None and "None" in kinds:
        return value
    is_bool = isinstance(value, bool)
    if "float" in kinds and not is_bool and isinstance(value, (int, float, str)):
        try:
            number = float(value)
        except ValueError:
            pass  # not a number: named below
        else:
            if not math.isfinite(number) and not (name == "time_limit" and number > 0):  # inf: no time limit
                raise ValueError(f"{name} must be a finite number; got {value!r}")
            return number
    if "int" in kinds and isinstance(value, int) and not is_bool:
        return value
    if ("bool" in kinds and is_bool) or ("str" in kinds and isinstance(value, str)):
        return value
    if any(k.startswith("dict") for k in kinds) and isinstance(value, dict):
        return value
    raise ValueError(f"{name} must be {annotation.replace(' | ', ' or ')}; got {value!r} ({type(value).__name__})")


def official_recipe(global_batch: int) -> dict[str, Any]:
    """The paper's ImageNet-1K settings (GCVIT_SPEC.md), the lr scaled linearly from 5e-3 at batch 4096 (min_lr and
    warmup_lr stay as they are, capped at that lr for batches below 5). Colour jitter stays off: timm's transform,
    which the official code uses, ignores its 0.4 while RandAugment is on."""
    lr = 5e-3 * global_batch / OFFICIAL_BATCH
    return {
        "img_size": 224,
        "lr": lr,
        "min_lr": min(5e-6, lr),
        "warmup_lr": min(1e-6, lr),
        "warmup_epochs": 20.0,
        "epochs": 310,
        "cooldown_epochs": 10,
        "weight_decay": 0.05,
        "clip_grad": 5.0,
        "ema": 0.9998,
        "randaugment": "rand-m9-mstd0.5-inc1",
        "mixup": 0.8,
        "cutmix": 1.0,
        "label_smoothing": 0.1,
        "random_erasing": 0.25,
        "color_jitter": None,
        "hflip": 0.5,
        "crop_scale": 0.08,
        "amp": "bf16",
    }


def _check_keys(values: Mapping[str, Any], source: str) -> None:
    known = {f.name for f in dataclasses.fields(TrainConfig)}
    unknown = sorted(set(values) - known)
    if unknown:
        raise ValueError(f"{source}: unknown training option(s) {unknown}; known: {sorted(known)}")


def read_yaml(path: str | os.PathLike[str]) -> dict[str, Any]:
    """The mapping in a YAML config file (keys are TrainConfig fields)."""
    import yaml

    path = Path(path)
    if path.is_dir():
        raise ValueError(f"config file {path} is a folder; expected a YAML file")
    if not path.is_file():
        raise FileNotFoundError(f"config file {path} does not exist")
    try:
        values = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
    except UnicodeDecodeError:
        raise ValueError(f"config file {path} is not text; expected a YAML file") from None
    except yaml.YAMLError as e:
        raise ValueError(f"{path} is not valid YAML: {e}") from None
    if not isinstance(values, dict):
        raise ValueError(f"{path}: expected a mapping of training options, got {type(values).__name__}")
    _check_keys(values, str(path))
    return values


def resolve_config(
    yaml_path: str | os.PathLike[str] | None = None,
    overrides: Mapping[str, Any] | None = None,
    base: Mapping[str, Any] | None = None,
) -> TrainConfig:
    """Build the config: defaults < recipe < base < YAML file < overrides (e.g. command-line flags that were given).

    Args:
        yaml_path: a YAML file of TrainConfig fields, or None.
        overrides: fields to set last (None sets None: `--ema none` turns EMA off).
        base: fields below the file, e.g. a resumed run's saved config.

    `model_overrides` mappings merge key by key across the levels (`--model-override embed_dim=48` changes one field
    of the YAML file's model, or of the default digits model when only the overrides give one and the run trains on
    the digits from scratch); every other field is replaced whole.

    Returns:
        The validated TrainConfig.
    """
    from_file = read_yaml(yaml_path) if yaml_path else {}
    if base is not None:  # a saved run's config is whole: a field it lacks (newer than the run) had its default
        defaults = {f.name: f.default for f in dataclasses.fields(TrainConfig) if f.default is not dataclasses.MISSING}
        base = defaults | dict(base)
    given = dict(overrides or {})
    _check_keys(given, "overrides")
    merged = {**(base or {}), **from_file, **given}
    model = [level["model_overrides"] for level in (base or {}, from_file, given) if level.get("model_overrides")]
    if len(model) > 1 and all(isinstance(m, Mapping) for m in model):
        merged["model_overrides"] = {k: v for m in model for k, v in m.items()}
    values: dict[str, Any] = {}
    if merged.get("recipe", "default") == "official":
        batch = _coerce("batch_size", merged.get("batch_size", TrainConfig.batch_size), "int")
        if batch < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch}")
        values.update(official_recipe(batch))
    values.update(merged)
    for key in PATH_FIELDS:  # absolute: a resumed run must read the same data from any working directory
        if isinstance(values.get(key), str) and Path(values[key]).expanduser().exists():  # not a URL, True, ...
            values[key] = str(Path(values[key]).expanduser().resolve())
    cfg = TrainConfig(**values)
    if len(model) == 1 and given.get("model_overrides") and cfg.data == "digits" and not cfg.pretrained:
        from gcvit.models.registry import digits_overrides  # flags alone change the default digits model, as they
        # change configs/digits.yaml's (which spells it out)

        cfg = dataclasses.replace(cfg, model_overrides=digits_overrides(cfg.model) | cfg.model_overrides)
    return cfg


PATH_FIELDS = ("data_dir", "train_dir", "val_dir", "pretrained")  # local paths where they name one


def save_yaml(cfg: TrainConfig, path: str | os.PathLike[str]) -> None:
    """Write the resolved config (atomically) so that `resolve_config(path)` rebuilds it."""
    import yaml

    from gcvit.atomic import atomic_write_bytes

    atomic_write_bytes(Path(path), yaml.safe_dump(cfg.to_dict(), sort_keys=False).encode())


def load_run_config(run_dir: str | os.PathLike[str]) -> TrainConfig:
    """The TrainConfig saved in RUN/config.yaml."""
    return TrainConfig(**read_yaml(Path(run_dir) / "config.yaml"))
