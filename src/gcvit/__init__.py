"""gcvit: the Global Context Vision Transformer (GC ViT) for PyTorch.

>>> import gcvit
>>> model = gcvit.create_model("gcvit_tiny", pretrained=True)   # NVIDIA's ImageNet-1K weights
>>> logits = model(images)                                      # (B, 3, H, W), any H, W >= 32
"""

from gcvit.download import ChecksumError
from gcvit.hub import from_pretrained
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
    create_model,
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
    "create_model",
    "from_pretrained",
    "list_models",
    "load_checkpoint",
    "save_checkpoint",
]
