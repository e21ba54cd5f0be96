"""Model names, tags and `create_model`.

A name is an architecture (`gcvit_tiny`, `swin_tiny`, `vit_small`) or an architecture with a pretrained tag
(`gcvit_tiny.in1k`). A tag may change the architecture (the 384 and 512 px large models have larger windows). Each
family (GC ViT, Swin Transformer, ViT) brings its config class, model class, variants, pretrained tags and timm
converter; every model has the same interface.
"""

from __future__ import annotations

import dataclasses
import difflib
import fnmatch
import logging
import os
from dataclasses import dataclass
from typing import Any

from torch import nn

from gcvit.models import swin, vit
from gcvit.models.gcvit import DIGITS, VARIANTS, GCViT, GCViTConfig, query_pools
from gcvit.models.pretrained import PRETRAINED, PretrainedCfg
from gcvit.models.weights import load_state_dict_into, read_state_dict, resolve, to_official

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class Family:
    """One architecture family: what `create_model` needs to build and load any of its variants."""

    name: str
    model_cls: type[nn.Module]  # built as model_cls(config); converts foreign checkpoints while loading
    variants: dict[str, Any]  # arch name -> config (the family's frozen config dataclass)
    pretrained: dict[str, dict[str, PretrainedCfg]]  # arch name -> tag -> weights metadata
    digits: dict[str, Any]  # config fields of the family's 32 px model for the bundled digits


FAMILIES: dict[str, Family] = {
    "gcvit": Family("gcvit", GCViT, VARIANTS, PRETRAINED, DIGITS),
    "swin": Family("swin", swin.SwinTransformer, swin.VARIANTS, {}, swin.DIGITS),
    "vit": Family("vit", vit.VisionTransformer, vit.VARIANTS, {}, vit.DIGITS),
}


def family_of(name: str) -> Family:
    """The family of `arch` or `arch.tag`; ValueError with close matches for unknown names."""
    arch = name.partition(".")[0]
    for family in FAMILIES.values():
        if arch in family.variants:
            return family
    raise _unknown(name)


def is_model_name(name: str) -> bool:
    """Whether `name` is a registered `arch` or `arch.tag` (no error, no close matches)."""
    try:
        resolve_name(name)
    except ValueError:
        return False
    return True


def digits_overrides(name: str, img_size: int = 32) -> dict[str, Any]:
    """Config fields of the family's small model for the bundled digits, made for 32 px; at another `img_size` a
    GC ViT asks for that size's global-query pools (`query_pools`)."""
    fields = dict(family_of(name).digits)
    if "global_query_pools" in fields:
        fields["global_query_pools"] = query_pools(fields["window_size"], (img_size, img_size))
    return fields


@dataclass(frozen=True)
class ModelSpec:
    """What a name resolves to."""

    arch: str
    tag: str | None
    config: Any  # the family's config dataclass (GCViTConfig, SwinConfig, ViTConfig)
    pretrained: PretrainedCfg | None
    family: str = "gcvit"


def list_models(pattern: str = "*") -> list[str]:
    """Architectures and `arch.tag` names of every family matching a shell-style pattern, sorted."""
    names = []
    for family in FAMILIES.values():
        names += list(family.variants) + [f"{a}.{t}" for a, tags in family.pretrained.items() for t in tags]
    return sorted(n for n in names if fnmatch.fnmatchcase(n, pattern))


def close_names(name: str) -> str:
    """'; did you mean a, b?' for registered names close to `name`, or ''."""
    close = difflib.get_close_matches(name, list_models(), n=4, cutoff=0.6)
    return f"; did you mean {', '.join(close)}?" if close else ""


def _unknown(name: str) -> ValueError:
    return ValueError(f"unknown model {name!r}{close_names(name)} (gcvit.list_models() lists them all)")


def resolve_name(name: str) -> ModelSpec:
    """Split `arch[.tag]` and find its config and pretrained metadata (default tag: the first one)."""
    arch, _, tag = name.partition(".")
    family = family_of(arch)
    if tag and tag not in family.pretrained.get(arch, {}):
        raise _unknown(name)
    tags = family.pretrained.get(arch, {})
    tag = tag or next(iter(tags), None)
    pretrained = tags.get(tag) if tag else None
    config = family.variants[arch]
    if pretrained is not None and pretrained.arch:
        config = dataclasses.replace(config, **pretrained.arch)
    return ModelSpec(arch, tag, config, pretrained, family.name)


def _is_int(v: object) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _apply_overrides(config: Any, img_size: int | tuple[int, int] | None, overrides: dict[str, Any]) -> Any:
    config_cls = type(config)
    fields = {f.name for f in dataclasses.fields(config_cls)}
    bad = sorted(set(overrides) - fields)
    if bad:
        raise TypeError(f"unknown override(s) {bad}; expected fields of {config_cls.__name__}: {sorted(fields)}")
    overrides = {k: tuple(v) if isinstance(v, list) else v for k, v in overrides.items()}
    stages = len(overrides.get("depths", getattr(config, "depths", ())))
    if isinstance(config, GCViTConfig) and "global_query_pools" not in overrides and stages != len(config.depths):
        # the variant's pools are for its stages: those of other stages follow at the variant's native size
        window_size = overrides.get("window_size", config.window_size)
        overrides["global_query_pools"] = query_pools(window_size, config.img_size)
    if img_size is not None:
        size = (img_size, img_size) if _is_int(img_size) else img_size
        if not (isinstance(size, (tuple, list)) and len(size) == 2 and all(_is_int(s) and s >= 32 for s in size)):
            raise ValueError(f"expected img_size as an int or (H, W) of at least 32 px; got {img_size!r}")
        overrides["img_size"] = tuple(size)
    return dataclasses.replace(config, **overrides)


def create_model(
    name: str,
    pretrained: bool | str | os.PathLike[str] = False,
    num_classes: int | None = None,
    img_size: int | tuple[int, int] | None = None,
    **overrides: Any,
) -> nn.Module:
    """Build a model (GC ViT, Swin Transformer or ViT) by name, optionally with pretrained weights.

    Args:
        name: `arch` or `arch.tag`, as listed by `list_models()`.
        pretrained: False; True for the tag's official weights (downloaded with a hash check into the cache); or a
            local checkpoint path or URL (official, timm or own format).
        num_classes: classes of the head (default: the checkpoint's, else the variant's 1000); one other than the
            checkpoint's gives a fresh head for fine-tuning.
        img_size: native input size, int or (H, W). Any size from 32 px runs; the window sizes stay those of the
            variant unless `window_size` is overridden too (bias tables are then resized while loading).
        overrides: any other field of the family's config (GCViTConfig, SwinConfig, ViTConfig).
    Returns:
        The model in train mode, with `model.pretrained_cfg` set (input size, crop, mean/std of its weights) and
        `model.model_name` (`name`).
    """
    spec = resolve_name(name)
    model_cls = FAMILIES[spec.family].model_cls
    state_dict, source = None, ""
    if pretrained is not False and pretrained is not None:
        source, sha = pretrained_source(name, pretrained)
        state_dict, _ = to_official(read_state_dict(resolve(source, sha)), model_cls)
        head = state_dict.get("head.weight")
        if num_classes is None and head is not None and head.ndim == 2:
            num_classes = head.shape[0]  # the checkpoint's own head, trained for its classes
    config, meta = model_settings(name, num_classes, img_size, **overrides)
    model = model_cls(config)
    if state_dict is not None:
        _load_pretrained(model, state_dict, source)
        if pretrained is not True:  # another file than the tag's: its own origin; its digest and top-1 unknown
            meta = dataclasses.replace(meta, url=source, sha256=None, top1=None)
    model.pretrained_cfg = meta
    model.model_name = name  # what save_pretrained records in config.json
    return model


def pretrained_source(name: str, pretrained: bool | str | os.PathLike[str]) -> tuple[str, str | None]:
    """(path or URL, expected SHA-256 or None) of the weights `pretrained` names for model `name`: True, the tag's
    official file; else the path or URL itself."""
    if pretrained is True:
        spec = resolve_name(name)
        if spec.pretrained is None:
            raise ValueError(f"{name} has no pretrained weights; pass a checkpoint path or URL instead")
        return spec.pretrained.url, spec.pretrained.sha256
    return str(pretrained), None


def model_settings(
    name: str, num_classes: int | None = None, img_size: int | tuple[int, int] | None = None, **overrides: Any
) -> tuple[Any, PretrainedCfg]:
    """(config, pretrained_cfg) of the model `create_model` builds from these arguments, without building it: the
    settings are checked (TypeError, ValueError) and the preprocessing known at no cost."""
    spec = resolve_name(name)
    if num_classes is not None:
        overrides["num_classes"] = num_classes
    config = _apply_overrides(spec.config, img_size, overrides)
    meta = spec.pretrained or PretrainedCfg(url="", license="", top1=None)
    return config, dataclasses.replace(meta, img_size=config.img_size, num_classes=config.num_classes)


def _load_pretrained(model: nn.Module, state_dict: dict, source: str) -> None:
    """Load an official-keyed state dict strictly, except for a head whose class count differs (or that the
    checkpoint lacks: a backbone saved with num_classes=0), which stays freshly initialised (and says so)."""
    head = state_dict.get("head.weight")
    if (head is None and model.num_classes) or (head is not None and head.shape[0] != model.num_classes):
        had = "no head" if head is None else f"a head of {head.shape[0]} classes"
        logger.info("%s has %s: the model's %d-class head is freshly initialised", source, had, model.num_classes)
        fresh = {k: v for k, v in model.state_dict().items() if k.startswith("head.")}
        state_dict = {k: v for k, v in state_dict.items() if not k.startswith("head.")} | fresh
    resized = load_state_dict_into(model, state_dict, source, strict=True).resized
    if resized:  # a checkpoint of other windows (e.g. a 384 px one under the 224 px variant) is bent to fit
        logger.warning(
            "%s was trained with other window or input sizes: %d position tensors were resized to this model's (%s%s); "
            "pass the checkpoint's own window_size (and img_size) to use them unchanged",
            source,
            len(resized),
            resized[0],
            ", ..." if len(resized) > 1 else "",
        )
