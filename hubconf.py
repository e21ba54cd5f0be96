"""torch.hub entry points: one per architecture, e.g.

    model = torch.hub.load("path/to/gcvit", "gcvit_tiny", source="local", pretrained=True)

Each takes `pretrained` (False; True: the official weights of the default tag; or a checkpoint path or URL) and any
keyword argument of `gcvit.create_model` (num_classes, img_size, config fields). `torch.hub.list` shows them all.
"""

import sys as _sys
from collections.abc import Callable as _Callable
from pathlib import Path as _Path
from typing import Any as _Any

from torch import nn as _nn

dependencies = ["torch", "torchvision", "safetensors"]

_SRC = str(_Path(__file__).resolve().parent / "src")
if _SRC not in _sys.path:  # the repository's own package, when it is not installed
    _sys.path.insert(0, _SRC)

import gcvit as _gcvit  # noqa: E402


def _entry(arch: str) -> _Callable[..., _nn.Module]:
    def entry(*, pretrained: bool | str = False, **kwargs: _Any) -> _nn.Module:
        return _gcvit.create_model(arch, pretrained=pretrained, **kwargs)

    entry.__name__ = entry.__qualname__ = arch
    entry.__doc__ = (
        f"{arch}: `pretrained` False, True (official weights) or a checkpoint path/URL; "
        "other keyword arguments go to gcvit.create_model."
    )
    return entry


for _arch in _gcvit.list_models():
    if "." not in _arch:
        globals()[_arch] = _entry(_arch)
