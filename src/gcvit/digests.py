"""SHA-256 digests of saved files, and the SHA256SUMS file that lists them beside the files.

A checkpoint or saved folder lists its weights files' digests in SHA256SUMS, in the format of `sha256sum` (so
`sha256sum -c SHA256SUMS` checks the folder by hand), and loaders check the weights they read against it:
safetensors checks no content, so a flipped byte in the weights would otherwise load silently. config.json is not
listed: users edit it (class names, preprocessing), and its damage shows when it is parsed.
"""

from __future__ import annotations

import hashlib
import os
import re
from collections.abc import Iterable
from pathlib import Path

from gcvit.atomic import atomic_write_bytes

SUMS_FILE = "SHA256SUMS"
_LINE = re.compile(r"([0-9a-f]{64}) [ *](.+)")  # sha256sum's format: digest, space, ' ' (text) or '*' (binary), name


class DamagedFileError(ValueError):
    """A file's SHA-256 differs from the one recorded when it was written."""


def sha256_of(path: str | os.PathLike[str]) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def write_sums(folder: Path, names: Iterable[str]) -> dict[str, str]:
    """Write folder/SHA256SUMS (atomically) for the files `names` of `folder`; returns {name: digest}."""
    sums = {name: sha256_of(folder / name) for name in names}
    atomic_write_bytes(folder / SUMS_FILE, "".join(f"{d}  {n}\n" for n, d in sums.items()).encode())
    return sums


def read_sums(folder: Path) -> dict[str, str]:
    """{name: digest} of folder/SHA256SUMS; {} where there is none (folders saved before digests)."""
    path = folder / SUMS_FILE
    if not path.is_file():
        return {}
    sums = {}
    for number, line in enumerate(path.read_text(errors="replace").splitlines(), 1):
        match = _LINE.fullmatch(line)
        if match is None:
            raise DamagedFileError(f"{path}, line {number}: expected '<64 hex digits>  <file name>'; got {line!r}")
        sums[match[2]] = match[1]
    return sums


def check_digests(folder: Path, sums: dict[str, str], names: Iterable[str] | None = None) -> None:
    """Raise DamagedFileError naming the first file of `folder` (of `names`; default all of `sums`) whose SHA-256
    differs from `sums`; files that `sums` does not list pass."""
    for name in sums if names is None else names:
        if name in sums and sha256_of(folder / name) != sums[name]:
            raise DamagedFileError(
                f"{folder / name} is damaged: its SHA-256 differs from the one recorded in {folder / SUMS_FILE} "
                f"when it was written (if you replaced the file on purpose, delete its line there)"
            )
