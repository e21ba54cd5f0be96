"""Model definitions, the name registry and checkpoint handling."""

from gcvit.models.backbone import GCViTBackbone, create_backbone
from gcvit.models.detector import create_detector
from gcvit.models.gcvit import VARIANTS, GCViT, GCViTConfig, convert_timm
from gcvit.models.pretrained import PRETRAINED, PretrainedCfg
from gcvit.models.registry import FAMILIES, create_model, list_models, resolve_name
from gcvit.models.segmenter import create_segmenter
from gcvit.models.swin import SwinConfig, SwinTransformer
from gcvit.models.vit import VisionTransformer, ViTConfig
from gcvit.models.weights import CheckpointError, LoadReport, load_checkpoint, save_checkpoint

__all__ = [
    "FAMILIES",
    "PRETRAINED",
    "VARIANTS",
    "CheckpointError",
    "GCViT",
    "GCViTBackbone",
    "GCViTConfig",
    "LoadReport",
    "PretrainedCfg",
    "SwinConfig",
    "SwinTransformer",
    "ViTConfig",
    "VisionTransformer",
    "convert_timm",
    "create_backbone",
    "create_detector",
    "create_model",
    "create_segmenter",
    "list_models",
    "load_checkpoint",
    "resolve_name",
    "save_checkpoint",
]
