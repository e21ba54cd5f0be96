"""gcvit: the Global Context Vision Transformer (GC ViT) for PyTorch.

>>> import gcvit
>>> model = gcvit.create_model("gcvit_tiny", pretrained=True)   # NVIDIA's ImageNet-1K weights
>>> logits = model(images)                                      # (B, 3, H, W), any H, W >= 32
>>> model = gcvit.load("runs/digits")                           # a run, saved folder, URL, hub repo id or name

The names below are imported on first use (PEP 562), so that `import gcvit` costs nothing until a model is needed:
`gcvit --version` and `gcvit --help` answer without importing torch.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from gcvit.download import ChecksumError
    from gcvit.loading import from_pretrained, load
    from gcvit.models import (
        CheckpointError,
        GCViT,
        GCViTConfig,
        LoadReport,
        PretrainedCfg,
        SwinConfig,
        SwinTransformer,
        VisionTransformer,
        ViTConfig,
        create_backbone,
        create_detector,
        create_model,
        create_segmenter,
        list_models,
        load_checkpoint,
        save_checkpoint,
    )

__version__ = "0.1.0"

__all__ = [
    "CheckpointError",
    "ChecksumError",
    "GCViT",
    "GCViTConfig",
    "LoadReport",
    "PretrainedCfg",
    "SwinConfig",
    "SwinTransformer",
    "ViTConfig",
    "VisionTransformer",
    "__version__",
    "create_backbone",
    "create_detector",
    "create_model",
    "create_segmenter",
    "from_pretrained",
    "list_models",
    "load",
    "load_checkpoint",
    "save_checkpoint",
]

# public name -> the module that defines it: gcvit.models, except these
_HOMES = {"ChecksumError": "gcvit.download", "from_pretrained": "gcvit.loading", "load": "gcvit.loading"}


def __getattr__(name: str) -> Any:
    """A public name, imported from its module on first use; else a submodule (`gcvit.hub`, `gcvit.train`)."""
    if name in __all__:
        value = getattr(importlib.import_module(_HOMES.get(name, "gcvit.models")), name)
        globals()[name] = value  # later look-ups skip this function
        return value
    if not name.startswith("__"):  # dunder look-ups (inspect, pickle) are never submodules
        try:
            return importlib.import_module(f"{__name__}.{name}")
        except ModuleNotFoundError as e:
            if e.name != f"{__name__}.{name}":  # the submodule exists and lacks something it imports
                raise
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted({*globals(), *__all__})
