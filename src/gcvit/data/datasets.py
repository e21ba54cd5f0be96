"""Datasets: scikit-learn's bundled handwritten digits, and image trees with one sub-folder per class.

Both serve `(image, label)`: an RGB PIL image, or whatever `transform` makes of it, and an int class index into
`dataset.classes`. Image folders are checked before training (see `gcvit.data.verify`): unreadable files are
dropped and listed in `dataset.skipped`, or, with `strict=True`, reported together in one `DataError`.
"""

from __future__ import annotations

import copy
import logging
import os
from collections import Counter
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image
from torch.utils.data import Dataset

from gcvit.data.transforms import Size, load_rgb, to_hw
from gcvit.data.verify import BadImage, find_bad_images
from gcvit.extras import install_hint

logger = logging.getLogger(__name__)

# the still-image formats Pillow opens (AVIF and QOI with Pillow 11.2 and 9.5 on); a file whose name ends otherwise is
# not an image to the datasets and `gcvit predict`, and is counted in one log line
IMG_EXTENSIONS = (
    ".jpg", ".jpeg", ".jpe", ".jfif", ".png", ".ppm", ".pgm", ".pbm", ".pnm", ".bmp", ".tif", ".tiff", ".webp",
    ".gif", ".avif", ".jp2", ".qoi", ".tga", ".ico",
)  # fmt: skip
SPLITS = ("train", "val", "all")
Transform = Callable[[Image.Image], Any]
_MAX_FALLBACKS = 10  # __getitem__ tries at most this many following samples when an image fails to decode


class DataError(ValueError):
    """A dataset cannot be used as given; the message names the folder, classes or files and what was expected."""


def _require_sklearn(what: str) -> None:
    try:
        import sklearn  # noqa: F401
    except ImportError as error:
        raise ImportError(f"{what} needs scikit-learn: {install_hint('train')}") from error


def check_val_fraction(val_fraction: float) -> None:
    """Raise unless 0 < val_fraction < 1."""
    if not 0 < val_fraction < 1:
        raise ValueError(f"val_fraction must be in (0, 1), got {val_fraction}")


def stratified_split(
    targets: Sequence[int], val_fraction: float, seed: int, classes: Sequence[str]
) -> tuple[np.ndarray, np.ndarray]:
    """Seeded split of positions 0..N-1 into train and val, keeping each class's share in both.

    Args:
        targets: N class indices.
        val_fraction: share of samples for val, in (0, 1).
        seed: the split's random state; the same seed gives the same split.
        classes: class names, for error messages.

    Returns:
        (train positions, val positions), each sorted ascending, int64.
    """
    check_val_fraction(val_fraction)
    _require_sklearn("a stratified split")
    from sklearn.model_selection import train_test_split

    too_few = sorted(classes[c] for c, n in Counter(targets).items() if n < 2)
    if too_few:
        raise DataError(f"a stratified split needs at least 2 images per class; classes with fewer: {too_few}")
    positions = np.arange(len(targets))
    try:
        train, val = train_test_split(positions, test_size=val_fraction, random_state=seed, stratify=list(targets))
    except ValueError as error:  # e.g. a val share smaller than the number of classes
        raise DataError(
            f"cannot split {len(targets)} samples of {len(classes)} classes with val_fraction={val_fraction}: {error}"
        ) from error
    return np.sort(train), np.sort(val)


class DigitsDataset(Dataset[tuple[Any, int]]):
    """scikit-learn's 1,797 scanned 8x8 handwritten digits (values 0..16), served as RGB images of img_size.

    Attributes:
        classes: ['0', ..., '9'].
        targets: the label of each sample, in order.
        indices: each sample's position in `sklearn.datasets.load_digits()`.
    """

    def __init__(
        self,
        split: str,
        img_size: Size = 32,
        val_fraction: float = 0.2,
        seed: int = 0,
        transform: Transform | None = None,
    ) -> None:
        """
        Args:
            split: 'train', 'val' (a seeded stratified split) or 'all'.
            img_size: size of the served images, int or (H, W); upscaled bicubically from 8x8.
            val_fraction: share of the 1,797 samples in 'val'.
            seed: the split's seed; the same seed gives the same split.
            transform: applied to each RGB PIL image.
        """
        if split not in SPLITS:
            raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
        _require_sklearn("DigitsDataset")
        from sklearn.datasets import load_digits

        self.size = to_hw(img_size)
        self.transform = transform
        self.classes = [str(d) for d in range(10)]
        digits = load_digits()  # bundled with scikit-learn: no download
        pixels = np.rint(np.asarray(digits.images) * (255 / 16)).clip(0, 255).astype(np.uint8)  # (1797, 8, 8)
        targets = np.asarray(digits.target, dtype=np.int64)
        positions = np.arange(len(targets))
        if split != "all":
            train, val = stratified_split(targets.tolist(), val_fraction, seed, self.classes)
            positions = train if split == "train" else val
        self.indices = positions
        self.pixels = pixels[positions]  # (N, 8, 8) uint8
        self.targets: list[int] = targets[positions].tolist()

    def __len__(self) -> int:
        return len(self.targets)

    def __getitem__(self, index: int) -> tuple[Any, int]:
        """Returns (RGB PIL image of img_size, or its transform, label)."""
        h, w = self.size
        image = Image.fromarray(self.pixels[index]).resize((w, h), Image.Resampling.BICUBIC).convert("RGB")
        return (self.transform(image) if self.transform else image), self.targets[index]


def _find_classes(root: Path, classes: Sequence[str] | None) -> list[str]:
    """Class names: the sub-folders of root (sorted), or the given ones after checking each folder exists."""
    if not root.exists():
        raise DataError(f"image folder {root} does not exist; expected a folder with one sub-folder per class")
    if not root.is_dir():
        raise DataError(f"{root} is not a folder; expected a folder with one sub-folder per class")
    found = sorted(d.name for d in root.iterdir() if d.is_dir() and not d.name.startswith("."))
    if classes is None:
        if not found:
            raise DataError(f"{root} has no class folders; expected one sub-folder per class, e.g. {root}/cat/1.jpg")
        return found
    if len(set(classes)) != len(classes):
        raise DataError(f"classes has duplicates: {[c for c, n in Counter(classes).items() if n > 1]}")
    missing = [c for c in classes if c not in found]
    if missing:
        raise DataError(f"{root} has no folder for classes {missing}; expected one sub-folder per class")
    extra = sorted(set(found) - set(classes))
    if extra:
        logger.info("%s: ignoring %d folders not in classes: %s", root, len(extra), extra)
    return list(classes)


def image_files(
    folder: Path, extensions: tuple[str, ...] = IMG_EXTENSIONS, unlisted: list[BadImage] | None = None
) -> list[Path]:
    """Image files under a folder (recursively, following links), sorted; hidden files and folders skipped.
    A folder reached twice (a link back up, or two links to one folder) is read once. Files with other endings are
    counted in one log line. A folder that cannot be listed (no permission) goes into `unlisted`, or without it
    into a warning: never silently."""
    files = []
    ignored: Counter[str] = Counter()
    seen: set[tuple[int, int]] = set()

    def cannot_list(error: OSError) -> None:
        bad = BadImage(Path(error.filename or folder), f"{type(error).__name__}: {error.strerror or error}")
        if unlisted is None:
            logger.warning("cannot list folder %s (%s): its images are left out", bad.path, bad.reason)
        else:
            unlisted.append(bad)

    for dirpath, dirnames, filenames in os.walk(folder, onerror=cannot_list, followlinks=True):
        st = os.stat(dirpath)
        if (st.st_dev, st.st_ino) in seen:
            dirnames[:] = []
            continue
        seen.add((st.st_dev, st.st_ino))
        dirnames[:] = [d for d in dirnames if not d.startswith(".")]
        for name in filenames:
            if name.lower().endswith(extensions) and not name.startswith("."):
                files.append(Path(dirpath, name))
            elif not name.startswith("."):
                ignored[Path(name).suffix.lower() or "no extension"] += 1
    if ignored:
        kinds = ", ".join(f"{n} {kind}" for kind, n in sorted(ignored.items(), key=lambda kn: (-kn[1], kn[0])))
        logger.info("%s: ignored %d files not named as images (%s)", folder, ignored.total(), kinds)
    return sorted(files)


def _list_samples(
    root: Path, classes: list[str], extensions: tuple[str, ...]
) -> tuple[list[tuple[Path, int]], list[BadImage]]:
    """(path, class index) for every image file, and the folders that could not be listed; raises naming every
    class folder with no image file."""
    samples: list[tuple[Path, int]] = []
    unlisted: list[BadImage] = []
    empty = []
    for index, name in enumerate(classes):
        files = image_files(root / name, extensions, unlisted)
        if not files:
            empty.append(name)
        samples += [(path, index) for path in files]
    if empty:
        why = f"; folders that cannot be listed:\n{_describe(unlisted)}" if unlisted else ""
        raise DataError(f"{root}: class folders with no image files ({', '.join(extensions)}): {empty}{why}")
    return samples, unlisted


def _describe(bad: list[BadImage]) -> str:
    return "\n".join(f"  {b.path}: {b.reason}" for b in bad)


class ImageFolderDataset(Dataset[tuple[Any, int]]):
    """Images in `root/<class name>/**/<file>`, one sub-folder per class; decoded in `__getitem__` (in the workers).

    Before training, every file is decoded once (`verify=True`, see `gcvit.data.verify`). Unreadable files (corrupt,
    truncated, empty, not an image) are dropped and listed in `skipped` with one warning giving the count, or, with
    `strict=True`, raise one `DataError` naming every bad file.

    If a file still fails to decode later (changed on disk, or `verify=False`), strict mode raises `DataError`;
    non-strict mode logs a warning, records the path in `load_failures` and serves the next sample in order
    (index + 1, index + 2, ... wrapping around; at most 10 tries) so that a long run is not lost to one file. The
    substitute is deterministic, so a seeded run stays reproducible. `load_failures` lives in the process that
    loaded the sample: with DataLoader workers that is the worker's copy, so the warning is the visible record.

    Attributes:
        classes: class names (folder names), index = label.
        class_to_idx: name -> label.
        samples: (path, label) for every usable file, sorted by class then path.
        targets: the label of each sample.
        skipped: files dropped by the check before training, and folders that could not be listed.
        load_failures: files that failed to decode in `__getitem__` (non-strict mode).
    """

    def __init__(
        self,
        root: str | os.PathLike[str],
        transform: Transform | None = None,
        classes: Sequence[str] | None = None,
        strict: bool = False,
        extensions: Sequence[str] = IMG_EXTENSIONS,
        *,
        verify: bool = True,
        verify_workers: int = 8,
    ) -> None:
        """
        Args:
            root: the folder holding one sub-folder per class.
            transform: applied to each RGB PIL image.
            classes: class names to use, in label order (e.g. the train set's, for a val folder); default: every
                sub-folder, sorted. Folders not listed are ignored.
            strict: raise on bad files rather than dropping them.
            extensions: file name endings counted as images (case-insensitive); other files are ignored.
            verify: decode every file now to find bad ones (slow on large trees: one full decode per file).
            verify_workers: threads for the check.
        """
        self.root = Path(root)
        self.transform = transform
        self.strict = strict
        self.extensions = tuple(e.lower() if e.startswith(".") else f".{e.lower()}" for e in extensions)
        self.classes = _find_classes(self.root, classes)
        self.class_to_idx = {name: index for index, name in enumerate(self.classes)}
        self.samples, unlisted = _list_samples(self.root, self.classes, self.extensions)
        self.skipped: list[Path] = []
        self.load_failures: list[Path] = []
        bad = find_bad_images([path for path, _ in self.samples], verify_workers) if verify else []
        self._drop_bad(bad, unlisted)
        self.targets = [label for _, label in self.samples]

    def _drop_bad(self, bad: list[BadImage], unlisted: list[BadImage]) -> None:
        """Raise on bad files and folders that cannot be listed (strict), or drop the files, record both in
        `skipped` and warn."""
        if not bad and not unlisted:
            return
        if self.strict:
            problems = (
                [f"{len(bad)} of {len(self.samples)} image files cannot be read:\n{_describe(bad)}"] if bad else []
            )
            problems += [f"{len(unlisted)} folders cannot be listed:\n{_describe(unlisted)}"] if unlisted else []
            raise DataError(f"{self.root}: " + "\n".join(problems))
        bad_paths = {b.path for b in bad}
        self.samples = [(path, label) for path, label in self.samples if path not in bad_paths]
        self.skipped = [b.path for b in bad + unlisted]
        if bad:
            logger.warning(
                "%s: skipped %d unreadable image files (see dataset.skipped):\n%s", self.root, len(bad), _describe(bad)
            )
        if unlisted:
            logger.warning(
                "%s: skipped %d folders that cannot be listed (see dataset.skipped):\n%s",
                self.root,
                len(unlisted),
                _describe(unlisted),
            )
        emptied = sorted(set(self.classes) - {self.classes[label] for _, label in self.samples})
        if emptied:
            raise DataError(f"{self.root}: class folders with no readable image: {emptied}")

    def subset(self, indices: Sequence[int] | np.ndarray, transform: Transform | None = None) -> ImageFolderDataset:
        """A dataset over some of the samples, sharing `classes` and `skipped`, with its own transform.

        Args:
            indices: positions in `samples`.
            transform: the subset's transform (not inherited).

        Returns:
            A new ImageFolderDataset; no file is read.
        """
        part = copy.copy(self)
        part.samples = [self.samples[int(i)] for i in indices]
        part.targets = [label for _, label in part.samples]
        part.transform = transform
        part.load_failures = []
        return part

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, index: int) -> tuple[Any, int]:
        """Returns (RGB PIL image, or its transform, label); see the class docstring for files that fail."""
        tries = min(len(self.samples), _MAX_FALLBACKS)
        for step in range(tries):
            path, label = self.samples[(index + step) % len(self.samples)]
            try:
                image = load_rgb(path)
            except Exception as error:  # PIL raises many types for malformed files; only the decode is guarded
                if self.strict:
                    raise DataError(f"cannot decode image {path}: {type(error).__name__}: {error}") from error
                self.load_failures.append(path)
                logger.warning(
                    "cannot decode image %s (%s: %s); serving the next sample", path, type(error).__name__, error
                )
                continue
            return (self.transform(image) if self.transform else image), label
        raise DataError(
            f"{self.root}: {tries} images in a row from sample {index} failed to decode; "
            f"check the folder (see the warnings above)"
        )


def split_image_folder(
    root: str | os.PathLike[str],
    val_fraction: float = 0.2,
    seed: int = 0,
    *,
    train_transform: Transform | None = None,
    val_transform: Transform | None = None,
    classes: Sequence[str] | None = None,
    strict: bool = False,
    extensions: Sequence[str] = IMG_EXTENSIONS,
    verify: bool = True,
) -> tuple[ImageFolderDataset, ImageFolderDataset]:
    """Split one image folder into seeded, stratified train and val sets sharing one class list.

    Args:
        root: the folder holding one sub-folder per class.
        val_fraction: share of each class in val, in (0, 1).
        seed: the split's seed; the same seed gives the same split.
        train_transform, val_transform: each subset's transform.
        classes, strict, extensions, verify: as for `ImageFolderDataset` (the check runs once, before splitting).

    Returns:
        (train, val); their samples are disjoint and together are every usable file.
    """
    check_val_fraction(val_fraction)  # before every file is decoded
    full = ImageFolderDataset(root, None, classes, strict, extensions, verify=verify)
    train, val = stratified_split(full.targets, val_fraction, seed, full.classes)
    return full.subset(train, train_transform), full.subset(val, val_transform)


def check_same_classes(train: Any, val: Any) -> None:
    """Raise unless train and val have the same classes in the same order (so label i means the same in both).

    Args:
        train, val: datasets with a `classes` attribute, or sequences of class names.
    """
    a = list(getattr(train, "classes", train))
    b = list(getattr(val, "classes", val))
    only_train, only_val = sorted(set(a) - set(b)), sorted(set(b) - set(a))
    if only_train or only_val:
        raise DataError(f"train and val have different classes: only in train: {only_train}; only in val: {only_val}")
    if a != b:
        raise DataError(
            f"train and val have the same classes in a different order (labels would differ): "
            f"train {a}, val {b}; pass classes=train.classes when building val"
        )
