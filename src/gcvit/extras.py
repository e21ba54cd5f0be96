"""Where the optional packages come from: the extras of pyproject.toml, named the same way in every message."""

from __future__ import annotations

# a missing optional package -> the extra that brings it (any other: 'train')
EXTRA_OF = {
    "onnx": "export",
    "onnxruntime": "export",
    "onnxscript": "export",
    "timm": "test",
    "skimage": "test",
    "pycocotools": "detection",
}


def install_hint(extra: str) -> str:
    """The command that installs `extra`, from the package index and from a checkout."""
    return f"pip install 'gcvit-torch[{extra}]' (in a checkout: pip install -e '.[{extra}]')"
