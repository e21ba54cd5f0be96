"""Atomic file writes: a temporary file in the target's folder, written, fsynced, then renamed over the target.

A reader (or a run resumed after kill -9) sees either the old file or the complete new one, never a partial one.
"""

from __future__ import annotations

import os
import tempfile
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import BinaryIO


def atomic_write_to(path: str | os.PathLike[str], write: Callable[[str], object]) -> Path:
    """Call `write(tmp)` with the name of a temporary file next to `path` (for writers that take a file name, such
    as `torch.export.save` or `onnx.save`), fsync it and rename it to `path`."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    # the temporary name keeps the extension: writers such as torch.export.save warn about any other
    fd, tmp = tempfile.mkstemp(prefix=f".{path.stem}.", suffix=f".tmp{path.suffix}", dir=path.parent)
    os.close(fd)
    try:
        os.chmod(tmp, 0o666 & ~_umask())  # mkstemp's 0600 would hide the file from other users
        write(tmp)
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return path


def atomic_write(path: str | os.PathLike[str], write: Callable[[BinaryIO], object]) -> Path:
    """Call `write(f)` on a temporary binary file next to `path`, fsync it and rename it to `path`."""

    def to_file(tmp: str) -> None:
        with open(tmp, "wb") as f:
            write(f)

    return atomic_write_to(path, to_file)


def _umask() -> int:
    mask = os.umask(0)  # the only portable way to read it is to set it
    os.umask(mask)
    return mask


def atomic_write_bytes(path: str | os.PathLike[str], data: bytes) -> Path:
    return atomic_write(path, lambda f: f.write(data))


def atomic_write_files(files: Mapping[str | os.PathLike[str], bytes], stale: Sequence[Path] = ()) -> None:
    """Write files that belong together in one folder: each to a temporary name beside it (fsynced) first; then
    remove the `stale` files that must not outlive the old versions, and rename all into place. A failure while
    writing (a full disk) leaves the folder as it was; only a kill in the microseconds between the removals and the
    last rename leaves a mix."""
    written: list[tuple[str, Path]] = []
    try:
        for path, data in files.items():
            path = Path(path)
            fd, tmp = tempfile.mkstemp(prefix=f".{path.stem}.", suffix=f".tmp{path.suffix}", dir=path.parent)
            written.append((tmp, path))
            with os.fdopen(fd, "wb") as f:
                f.write(data)
                f.flush()
                os.fsync(f.fileno())
            os.chmod(tmp, 0o666 & ~_umask())
        for path in stale:
            path.unlink(missing_ok=True)
        for tmp, path in written:
            os.replace(tmp, path)
        if written:
            fsync_dir(written[0][1].parent)
    finally:
        for tmp, _ in written:
            if os.path.exists(tmp):
                os.unlink(tmp)


def fsync_dir(path: str | os.PathLike[str]) -> None:
    """Make renames inside the folder `path` durable."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def remove_temporaries(folder: Path, names: Sequence[str]) -> None:
    """Remove the temporary files that a killed atomic write of `names` left in `folder`."""
    for name in names:
        for tmp in folder.glob(f".{Path(name).stem}.*.tmp{Path(name).suffix}"):
            tmp.unlink(missing_ok=True)
