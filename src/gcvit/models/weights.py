"""Reading, converting, adapting and writing checkpoints.

Formats recognised: NVIDIA's official .pth.tar ({'state_dict': ...}), timm's GC ViT state dicts, and this project's
own safetensors files (official key names). Pickles are read with `torch.load(weights_only=True)`: one that tries to
run code is refused.
"""

from __future__ import annotations

import argparse
import hashlib
import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

import torch
from safetensors.torch import load_file
from safetensors.torch import save as safetensors_bytes
from torch import nn

from gcvit import digests
from gcvit.atomic import atomic_write_bytes
from gcvit.download import download
from gcvit.layers.rel_pos import resize_bias_table

_WRAPPER_KEYS = ("state_dict", "model", "state_dict_ema", "model_ema")


class CheckpointError(ValueError):
    """A checkpoint cannot be read, or does not fit the model; the message names the keys and shapes."""


@dataclass
class LoadReport:
    source: str
    format: str  # "official", "timm"
    missing: list[str] = field(default_factory=list)
    unexpected: list[str] = field(default_factory=list)
    mismatched: list[str] = field(default_factory=list)  # "key: checkpoint (a, b) vs model (c, d)"
    resized: list[str] = field(default_factory=list)  # bias tables (position embeddings) fitted to the model


def _is_url(s: str) -> bool:
    return s.startswith(("http://", "https://", "file://"))


def resolve(path_or_url: str | os.PathLike[str], sha256: str | None = None) -> Path:
    """A local path for a checkpoint path or URL (URLs are downloaded into the cache); a file listed in the
    SHA256SUMS beside it (checkpoints and saved folders) is checked against it."""
    s = str(path_or_url)
    if _is_url(s):
        path = download(s, sha256)
    else:
        path = Path(s).expanduser()
        if path.is_dir():
            raise IsADirectoryError(
                f"expected a checkpoint file or an http(s):// URL; {s!r} is a folder (gcvit.load reads folders)"
            )
        if not path.is_file():
            raise FileNotFoundError(f"expected a checkpoint file or an http(s):// URL; {s!r} does not exist")
    digests.check_listed(path)
    return path


def _why_unreadable(path: Path, head: bytes, error: Exception) -> str:
    """One short reason why torch.load refused `path` (torch's own message runs to a dozen lines)."""
    weights = path.parent / "model.safetensors"
    if path.name == "state.pt" and weights.is_file():
        return f"a run's training state (optimizer, schedule, random states), not its weights, which are {weights}"
    if _is_text(head):
        return "a text file (JSON, YAML or the like), not a checkpoint"
    text = str(error)
    _, found, detail = text.partition("WeightsUnpickler error:")
    if found and ("Unsupported global" in detail or head[:1] == b"\x80"):  # a pickle (PROTO opcode first) that
        # names a class or function, or uses opcodes the safe loader does not take: loading it could run code
        reason = " ".join(detail.split("\n\n", 2)[:2]).split(". Please use")[0].strip()
        return f"refused: {reason[:300]} (a pickle of more than plain tensors could run code)"
    if found:  # bytes the unpickler cannot parse at all
        return f"unreadable: corrupt, or not a torch checkpoint ({detail.strip().splitlines()[0][:200]})"
    first = text.strip().splitlines()[0].split(". ")[0] if text.strip() else type(error).__name__
    return f"unreadable: {first[:300]}"


def _is_text(head: bytes) -> bool:
    """Whether a file's first bytes are UTF-8 text (a multi-byte character may be cut at the end)."""
    for cut in range(4):
        try:
            text = head[: len(head) - cut].decode("utf-8")
        except UnicodeDecodeError:
            continue
        return bool(text) and all(c.isprintable() or c in "\t\n\r" for c in text)
    return False


def read_state_dict(path: str | os.PathLike[str]) -> dict[str, torch.Tensor]:
    """Tensors of a checkpoint file: safetensors, or a torch pickle read with weights_only=True (and unwrapped
    from 'state_dict'/'model'); keys lose a DDP 'module.' or torch.compile '_orig_mod.' prefix."""
    path = Path(path)
    with open(path, "rb") as f:
        head = f.read(64)
    is_safetensors = path.suffix == ".safetensors" or (len(head) >= 9 and head[8:9] == b"{")
    if is_safetensors:
        try:
            return _unwrapped(load_file(str(path)))
        except Exception as e:
            raise CheckpointError(f"{path}: not a readable safetensors file: {e}") from None
    try:
        # argparse.Namespace is allowed: training scripts store their arguments next to the weights.
        with torch.serialization.safe_globals([argparse.Namespace]):
            obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:
        raise CheckpointError(
            f"{path}: {_why_unreadable(path, head, e)}; expected a safetensors file or a torch checkpoint of plain "
            f"tensors (read with weights_only=True)"
        ) from None
    for key in _WRAPPER_KEYS:
        if isinstance(obj, Mapping) and isinstance(obj.get(key), Mapping):
            obj = obj[key]
            break
    if not isinstance(obj, Mapping) or not all(isinstance(v, torch.Tensor) for v in obj.values()):
        raise CheckpointError(f"{path}: expected a mapping of names to tensors (a state dict)")
    return _unwrapped(obj)


def _unwrapped(state_dict: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Keys without the prefixes wrappers add when the wrapper itself was saved: DDP's and AveragedModel's `module.`
    (AveragedModel's `n_averaged` dropped) and torch.compile's `_orig_mod.` (each only when every key has it)."""
    out = dict(state_dict)
    if "n_averaged" in out and all(k.startswith("module.") for k in out if k != "n_averaged"):
        del out["n_averaged"]  # torch's AveragedModel (an EMA, as torchvision's scripts save it): its step count
    for prefix in ("module.", "_orig_mod.", "module."):
        if out and all(k.startswith(prefix) for k in out):
            out = {k.removeprefix(prefix): v for k, v in out.items()}
    return out


def to_official(
    state_dict: Mapping[str, torch.Tensor], model: nn.Module | type[nn.Module]
) -> tuple[dict[str, torch.Tensor], str]:
    """Convert any format the model's family recognises to official key names; returns (state_dict, format name).
    Every model class converts its own family's foreign checkpoints (`convert_checkpoint`: GC ViT's and Swin's
    timm and Microsoft formats, ViT's timm format)."""
    return model.convert_checkpoint(state_dict)


def adapt_to_model(state_dict: dict[str, torch.Tensor], model: nn.Module) -> tuple[dict[str, torch.Tensor], list[str]]:
    """Fit geometric tensors to the model: relative-position indices come from the model (they follow from its
    window sizes), bias tables are resized bicubically when window sizes differ, and a model with an
    `adapt_checkpoint` method (ViT: its position embedding) fits the rest itself. Returns (state_dict, resized)."""
    own = model.state_dict()
    adapt = getattr(model, "adapt_checkpoint", None)
    resized = [] if adapt is None else adapt(state_dict)
    for key, target in own.items():
        if key.endswith("relative_position_index"):
            state_dict[key] = target
        elif key.endswith("relative_position_bias_table") and key in state_dict:
            table = state_dict[key]
            if table.shape != target.shape and table.ndim == 2 and table.shape[1] == target.shape[1]:
                new_ws = (round(target.shape[0] ** 0.5) + 1) // 2
                state_dict[key] = resize_bias_table(table, new_ws)
                resized.append(f"{key}: {tuple(table.shape)} -> {tuple(target.shape)}")
    return state_dict, resized


def _compare(state_dict: Mapping[str, torch.Tensor], model: nn.Module) -> tuple[list[str], list[str], list[str]]:
    own = model.state_dict()
    missing = [k for k in own if k not in state_dict]
    unexpected = [k for k in state_dict if k not in own]
    mismatched = [
        f"{k}: checkpoint {tuple(state_dict[k].shape)} vs model {tuple(v.shape)}"
        for k, v in own.items()
        if k in state_dict and state_dict[k].shape != v.shape
    ]
    return missing, unexpected, mismatched


def _describe(report: LoadReport, limit: int = 20) -> str:
    parts = []
    for label, keys in (
        ("missing", report.missing),
        ("unexpected", report.unexpected),
        ("mis-shaped", report.mismatched),
    ):
        if keys:
            shown = ", ".join(keys[:limit]) + (f", ... ({len(keys) - limit} more)" if len(keys) > limit else "")
            parts.append(f"{len(keys)} {label}: {shown}")
    return "; ".join(parts)


def load_state_dict_into(
    model: nn.Module, state_dict: Mapping[str, torch.Tensor], source: str, strict: bool = True
) -> LoadReport:
    """Convert, adapt and load a state dict; with strict, any missing, unexpected or mis-shaped key is an error."""
    sd, fmt = to_official(state_dict, model)
    sd, resized = adapt_to_model(sd, model)
    report = LoadReport(source, fmt, *_compare(sd, model), resized=resized)
    if strict and (report.missing or report.unexpected or report.mismatched):
        raise CheckpointError(f"{source} ({fmt} format) does not fit {type(model).__name__}: {_describe(report)}")
    skip = {m.split(":")[0] for m in report.mismatched}
    model.load_state_dict({k: v for k, v in sd.items() if k not in skip}, strict=False)
    return report


def load_checkpoint(
    model: nn.Module, path_or_url: str | os.PathLike[str], strict: bool = True, sha256: str | None = None
) -> LoadReport:
    """Load an official, timm or own checkpoint (path or URL) into `model`.

    Args:
        model: the model to fill.
        path_or_url: a local file, or an http(s):// / file:// URL (downloaded into the cache).
        strict: raise CheckpointError naming missing, unexpected and mis-shaped keys; otherwise load what fits.
        sha256: expected digest for URLs.
    Returns:
        A LoadReport naming the format and any keys that were missing, unexpected, mis-shaped or resized.
    """
    path = resolve(path_or_url, sha256)
    return load_state_dict_into(model, read_state_dict(path), str(path_or_url), strict=strict)


def safetensors_file(state_dict: Mapping[str, torch.Tensor], metadata: dict[str, str] | None = None) -> bytes:
    """The bytes of a .safetensors file holding `state_dict` (on the CPU, contiguous)."""
    tensors = {k: v.detach().contiguous().cpu() for k, v in state_dict.items()}
    return safetensors_bytes(tensors, metadata=metadata)


def save_safetensors(
    state_dict: Mapping[str, torch.Tensor], path: str | os.PathLike[str], metadata: dict[str, str] | None = None
) -> Path:
    """Write tensors as safetensors atomically (temporary file in the same folder, fsync, rename); where the
    SHA256SUMS beside it lists the file, the digest there is updated."""
    data = safetensors_file(state_dict, metadata)
    path = atomic_write_bytes(path, data)
    digests.relist(path, hashlib.sha256(data).hexdigest())
    return path


def save_checkpoint(model: nn.Module, path: str | os.PathLike[str]) -> Path:
    """Save a model's weights (official key names) as safetensors, atomically; a DDP or torch.compile wrapper
    saves the model inside it."""
    return save_safetensors(_unwrapped(model.state_dict()), path, metadata={"format": "gcvit"})
