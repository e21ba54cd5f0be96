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
AMP_DTYPES = ("auto", "none", "bf16", "fp16")
KEEP_BEST = ("better", "ema")
OFFICIAL_BATCH = 4096  # the global batch the official learning rate was set for


@dataclass
class TrainConfig:
    # model
    model: str | None = None  # a name from gcvit.list_models(); None: chosen by `default_model`
    pretrained: str | bool = False  # False, True (official weights) or a checkpoint path / URL
    num_classes: int | None = None  # None: the dataset's class count
    img_size: int | None = None  # training and evaluation resolution (square); None: 32 on the digits, else native
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
    amp: str = "auto"  # 'auto' (bf16 where the device is fast at it, else none), 'none', 'bf16' or 'fp16' (CUDA)
    ema: float | None = 0.99  # EMA decay per optimizer step (official: 0.9998); None: off
    warmup_prefix: bool = True  # cosine after the warmup; False: from step 0, the warmup overlapping it (official)
    decay_bias_tables: bool = False  # weight decay on the relative-position bias tables too (official: True)
    ema_warmup: bool = True  # decay min(ema, 1 - (1 + step)**-0.75), as timm's ModelEmaV3 (official: off)
    keep_best: str = "better"  # best/ keeps: 'better' of the raw and EMA weights on val, or 'ema' (official)
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
    train_interpolation: str = "bicubic"  # crop and RandAugment: 'bicubic', 'bilinear' or 'random' (official)
    # run
    recipe: str = "default"  # 'default' (small data) or 'official' (the paper's ImageNet settings)
    seed: int = 0
    out_dir: str | None = None  # None: runs/digits, or runs/<the data folder's name>
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
        if self.data_dir:  # a download's train/ and val/ are that split, not two classes named train and val
            split = presplit_folders(self.data_dir)
            if split is not None:
                self.data_dir, (self.train_dir, self.val_dir) = None, split
        if self.keep_best not in KEEP_BEST:
            raise ValueError(f"keep_best must be one of {KEEP_BEST}, got {self.keep_best!r}")
        if self.model is None:
            self.model = default_model(self)
        if self.img_size is None:
            self.img_size = default_img_size(self)
        if self.out_dir is None:
            self.out_dir = default_out_dir(self)
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
                "train_interpolation",
                self.train_interpolation in ("bicubic", "bilinear", "random"),
                "'bicubic', 'bilinear' or 'random' (bilinear or bicubic, drawn per crop and per op)",
            ),
            (
                "device",
                self.device is None or is_device_name(self.device),
                "cpu or cuda[:N]",
            ),
        )
        for name, ok, expected in checks:
            if not ok:
                raise ValueError(f"{name} must be {expected}, got {getattr(self, name)!r}")
        if self.amp == "auto":
            self.amp = auto_amp(self.device)
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


def auto_amp(device: str | None) -> str:
    """'bf16' where the device computes it fast: a CUDA GPU that supports it, or a CPU with oneDNN's bf16 kernels
    (AVX-512 or AMX on x86, BF16 on Arm); else 'none' (fp32). On a 2-core AMD EPYC with AVX2 only, bf16 autocast
    made a training step of the digits model 100x slower (bf16 matmuls at 0.9 GFLOP/s against fp32's 57)."""
    import torch

    cuda = device.startswith("cuda") if device else torch.cuda.is_available()
    if cuda:
        return "bf16" if torch.cuda.is_available() and torch.cuda.is_bf16_supported() else "none"
    probe = getattr(torch.ops.mkldnn, "_is_mkldnn_bf16_supported", None)
    return "bf16" if probe is not None and probe() else "none"


VAL_FOLDERS = ("val", "validation", "valid")  # names of a pre-split folder's validation half, in order of preference


def presplit_folders(data_dir: str) -> tuple[str, str] | None:
    """(DATA/train, DATA/val) when `data_dir` holds a train/ folder and a val/ (or validation/, valid/) folder, the
    layout of ImageNet and most downloads; None otherwise."""
    root = Path(data_dir).expanduser()
    val = next((root / name for name in VAL_FOLDERS if (root / name).is_dir()), None)
    if val is None or not (root / "train").is_dir():
        return None
    return str(root / "train"), str(val)


def saved_model_config(pretrained: str | bool) -> dict[str, Any] | None:
    """config.json of a local checkpoint of this package named by --pretrained (a run, checkpoint or saved folder,
    or a weights file beside its config.json), or None (official weights, a URL, a foreign checkpoint)."""
    from gcvit.models.folder import checkpoint_folder, read_config

    if not isinstance(pretrained, str) or "://" in pretrained:
        return None
    path = Path(pretrained).expanduser()
    try:
        return read_config(path.parent if path.is_file() else checkpoint_folder(path))
    except (FileNotFoundError, ValueError):  # no config.json there: not a checkpoint of this package
        return None


SMALL_MODELS = ("gcvit_nano", "gcvit_micro")  # the registered models made for small data sets (32 px and 64 px)


def default_model(cfg: TrainConfig) -> str:
    """The model a run without --model trains: the one --pretrained saved (a run or folder of this package),
    gcvit_xxtiny for NVIDIA's weights (or any other checkpoint) and the official recipe, gcvit_nano on the digits
    (or when model_overrides describe the model, as configs/digits.yaml does from it), else gcvit_micro, the small
    64 px GC ViT for a folder of a few hundred to a few thousand images trained from scratch."""
    saved = saved_model_config(cfg.pretrained)
    if saved is not None and isinstance(saved.get("model"), str):
        return saved["model"]
    if cfg.pretrained or cfg.recipe == "official":
        return "gcvit_xxtiny"
    return "gcvit_nano" if cfg.data == "digits" or cfg.model_overrides else "gcvit_micro"


def default_img_size(cfg: TrainConfig) -> int:
    """32 px on the digits (whatever the model: every family's digits model is made for 32 px); else the
    native size of the model, or of the --pretrained checkpoint of this package."""
    from gcvit.models.registry import resolve_name

    if cfg.data == "digits":
        return 32
    saved = saved_model_config(cfg.pretrained)
    size = saved.get("img_size") if saved is not None else None
    if isinstance(size, list) and size and all(isinstance(s, int) for s in size):
        return min(size)
    return min(resolve_name(str(cfg.model)).config.img_size)


def default_out_dir(cfg: TrainConfig) -> str:
    """runs/digits, or runs/<name of the data folder> (of the folder above a train/ folder)."""
    if cfg.data == "digits":
        return "runs/digits"
    folder = Path(str(cfg.data_dir or cfg.train_dir)).expanduser().resolve()
    if folder.name == "train" and cfg.train_dir:
        folder = folder.parent
    return str(Path("runs") / (folder.name or "data"))


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
    which the official code uses, ignores its 0.4 while RandAugment is on. As NVIDIA's timm-based run: the cosine
    counts from step 0 with the warmup overlapping it (warmup_prefix False), every crop and geometric RandAugment op
    resamples bilinear or bicubic at random (train_interpolation 'random'), and the relative-position bias tables are
    decayed (its exemption list was never read: decay_bias_tables True)."""
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
        "warmup_prefix": False,
        "decay_bias_tables": True,
        "train_interpolation": "random",
        "ema_warmup": False,  # NVIDIA's ModelEma (timm's V1) decays at 0.9998 from the first step
        "keep_best": "ema",  # best/ chosen on the EMA's accuracy, as NVIDIA's train.py does
    }


def _check_keys(values: Mapping[str, Any], source: str) -> None:
    known = {f.name for f in dataclasses.fields(TrainConfig)}
    unknown = sorted(set(values) - known)
    if unknown:
        raise ValueError(f"{source}: unknown training option(s) {unknown}; known: {sorted(known)}")


def read_yaml(path: str | os.PathLike[str], *, check: bool = True) -> dict[str, Any]:
    """The mapping in a YAML config file (keys are TrainConfig fields, checked unless `check` is False: another
    task's config)."""
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
    if check:
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
        base = _whole(base)
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

        fields = digits_overrides(cfg.model, cfg.img_size or 32)  # the digits' default size: 32 px
        cfg = dataclasses.replace(cfg, model_overrides=fields | cfg.model_overrides)
    return cfg


PATH_FIELDS = ("data_dir", "train_dir", "val_dir", "pretrained")  # local paths where they name one

# fields whose default changed when they were added: a saved run that lacks them ran as these say
BEFORE_FIELD = {"ema_warmup": False, "keep_best": "ema"}


def _whole(saved: Mapping[str, Any]) -> dict[str, Any]:
    """A saved run's config with every field: one it lacks (newer than the run) takes the behaviour the run had."""
    defaults = {f.name: f.default for f in dataclasses.fields(TrainConfig) if f.default is not dataclasses.MISSING}
    return defaults | BEFORE_FIELD | dict(saved)


def save_yaml(cfg: TrainConfig, path: str | os.PathLike[str]) -> None:
    """Write the resolved config (atomically) so that `resolve_config(path)` rebuilds it."""
    import yaml

    from gcvit.atomic import atomic_write_bytes

    atomic_write_bytes(Path(path), yaml.safe_dump(cfg.to_dict(), sort_keys=False).encode())


def load_run_config(run_dir: str | os.PathLike[str]) -> TrainConfig:
    """The TrainConfig saved in RUN/config.yaml."""
    return TrainConfig(**_whole(read_yaml(Path(run_dir) / "config.yaml")))
