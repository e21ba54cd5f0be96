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
from pathlib import Path

from gcvit.atomic import atomic_write_bytes

SUMS_FILE = "SHA256SUMS"
# sha256sum's line: digest, space, ' ' (text) or '*' (binary), name; BSD's (sha256sum --tag): SHA256 (name) = digest
_GNU = re.compile(r"([0-9a-fA-F]{64}) [ *](.+)")
_BSD = re.compile(r"SHA256 \((.+)\) = ([0-9a-fA-F]{64})")


class DamagedFileError(ValueError):
    """A file's SHA-256 differs from the one recorded when it was written."""


def sha256_of(path: str | os.PathLike[str]) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def sums_text(sums: dict[str, str]) -> bytes:
    """SHA256SUMS's content for {name: digest}."""
    return "".join(f"{digest}  {name}\n" for name, digest in sums.items()).encode()


def write_sums(folder: Path, sums: dict[str, str]) -> None:
    """Write folder/SHA256SUMS (atomically) listing {name: digest}."""
    atomic_write_bytes(folder / SUMS_FILE, sums_text(sums))


def read_sums(folder: Path) -> dict[str, str]:
    """{name: digest} of folder/SHA256SUMS; {} where there is none (folders saved before digests). Lines in neither
    sha256sum's nor BSD's format (or other tools' variants) are left out: they check nothing rather than block
    every file of the folder."""
    path = folder / SUMS_FILE
    if not path.is_file():
        return {}
    sums = {}
    for line in path.read_text(encoding="utf-8", errors="replace").splitlines():
        gnu, bsd = _GNU.fullmatch(line), _BSD.fullmatch(line)
        name, digest = (gnu[2], gnu[1]) if gnu else (bsd[1], bsd[2]) if bsd else (None, None)
        if name is not None and digest is not None:
            sums[name.removeprefix("./")] = digest.lower()
    return sums


def check_listed(path: Path) -> None:
    """Raise DamagedFileError if the SHA256SUMS beside `path` lists it with another digest."""
    expected = read_sums(path.parent).get(path.name)
    if expected is not None and sha256_of(path) != expected:
        raise DamagedFileError(
            f"{path} is damaged: its SHA-256 differs from the one recorded in {path.parent / SUMS_FILE} when it was "
            f"written (if you replaced the file on purpose, delete its line there)"
        )


def relist(path: Path, digest: str) -> None:
    """Record `digest` for `path` where the SHA256SUMS beside it lists it (the file was rewritten)."""
    sums = read_sums(path.parent)
    if path.name in sums and sums[path.name] != digest:
        write_sums(path.parent, sums | {path.name: digest})
