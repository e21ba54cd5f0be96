"""Finding image files that cannot be decoded, before training starts.

Each file is opened twice with PIL: `Image.verify()` checks the container (PNG chunk CRCs, JPEG markers) without
decoding, then the loader of training and prediction (`load_rgb`: EXIF orientation, every pixel decoded, RGB) reads
it, which is what catches a truncated JPEG or a malformed EXIF block. PIL only accepts a
truncated file silently when `PIL.ImageFile.LOAD_TRUNCATED_IMAGES` is True; this module never sets it, and warns when
something else has.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

from PIL import Image, ImageFile

from gcvit.data.transforms import load_rgb

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class BadImage:
    """A file PIL could not open or decode."""

    path: Path
    reason: str  # "ExceptionType: message", as PIL raised it


def check_image(path: str | os.PathLike[str]) -> str | None:
    """Open and fully decode one image file.

    Args:
        path: the image file.

    Returns:
        None when the file decodes; otherwise the reason, as "ExceptionType: message".
    """
    try:
        with Image.open(path) as image:
            image.verify()  # container checks; leaves `image` unusable, hence the second open
        load_rgb(path)  # what the loader does: decodes every pixel (catches truncation that verify() does not),
        # reads the EXIF orientation and converts to RGB
    except Exception as error:  # PIL raises many types for malformed files (OSError, SyntaxError, struct.error, ...)
        return f"{type(error).__name__}: {error}"
    return None


def find_bad_images(paths: Sequence[str | os.PathLike[str]], workers: int = 8) -> list[BadImage]:
    """Check every file with `check_image`, in a thread pool (PIL releases the GIL while decoding).

    Args:
        paths: the image files, in any order.
        workers: threads to use; 0 or 1 checks the files one after another.

    Returns:
        The files that failed, in the order of `paths`; empty when all decode.
    """
    if ImageFile.LOAD_TRUNCATED_IMAGES:
        logger.warning(
            "PIL.ImageFile.LOAD_TRUNCATED_IMAGES is True (set outside gcvit): truncated images will not be detected"
        )
    logger.info("verifying %d image files", len(paths))
    if workers <= 1:
        reasons = [check_image(path) for path in paths]
    else:
        with ThreadPoolExecutor(max_workers=workers) as pool:
            reasons = list(pool.map(check_image, paths))
    return [BadImage(Path(path), reason) for path, reason in zip(paths, reasons, strict=True) if reason is not None]
