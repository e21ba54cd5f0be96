"""ImageNet-1K class names, shipped with the package.

`imagenet1k_classes.txt` holds the 1000 ILSVRC-2012 classes in the standard order (sorted WordNet ids, the order of
every ImageNet-1K classifier's output), one human-readable name a line. It was generated once from torchvision's
weights metadata (`ResNet50_Weights.IMAGENET1K_V1.meta["categories"]`), whose names are unique.
"""

from __future__ import annotations

import functools
from importlib import resources

NUM_CLASSES = 1000
_FILE = "imagenet1k_classes.txt"

# label sets whose heads predict the 1000 ImageNet-1K classes (PretrainedCfg.label_set, or a tag's suffix)
IMAGENET_1K_LABEL_SETS = ("imagenet-1k",)


@functools.cache
def _names() -> tuple[str, ...]:
    text = resources.files("gcvit").joinpath(_FILE).read_text(encoding="utf-8")
    names = tuple(line for line in text.splitlines() if line)
    if len(names) != NUM_CLASSES:
        raise RuntimeError(f"gcvit/{_FILE} is damaged: expected {NUM_CLASSES} class names, found {len(names)}")
    return names


def imagenet1k_classes() -> list[str]:
    """The 1000 ImageNet-1K class names; index i is the name of logit i (0: 'tench', 207: 'golden retriever')."""
    return list(_names())
