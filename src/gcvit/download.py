"""Checkpoint download into a local cache, with SHA-256 check and atomic writes.

The cache is `$GCVIT_CACHE` if set, else `<torch hub dir>/gcvit`. A file reaches its cache name only once complete and
verified: torch.hub's downloader writes to a temporary file in the same folder and renames it at the end.
"""

from __future__ import annotations

import hashlib
import logging
import os
from pathlib import Path
from urllib.parse import urlparse
from urllib.request import url2pathname

import torch.hub

log = logging.getLogger(__name__)


class ChecksumError(RuntimeError):
    """A downloaded or cached file does not have the expected SHA-256 digest."""


def cache_dir() -> Path:
    """The folder downloads are cached in: $GCVIT_CACHE, else <torch hub dir>/gcvit."""
    return Path(os.environ.get("GCVIT_CACHE") or Path(torch.hub.get_dir()) / "gcvit")


def sha256_of(path: str | os.PathLike[str]) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def _check_digest(expected: str) -> str:
    expected = expected.lower()
    if len(expected) < 8 or any(c not in "0123456789abcdef" for c in expected):
        raise ValueError(f"expected a SHA-256 hex digest or a prefix of at least 8 hex digits; got {expected!r}")
    return expected


def cache_path(url: str) -> Path:
    """Where the file at `url` is cached: one folder per URL, so that files of the same name from different
    addresses never stand in for each other."""
    return cache_dir() / hashlib.sha256(url.encode()).hexdigest()[:16] / Path(urlparse(url).path).name


def _local_file(path: Path, expected: str | None, url: str) -> Path:
    if not path.is_file():
        raise FileNotFoundError(f"expected a file at {url!r}; {str(path)!r} does not exist")
    if expected is not None and not sha256_of(path).startswith(expected):
        raise ChecksumError(f"{path} has the wrong SHA-256 (expected {expected}...)")
    return path


def download(url: str, sha256: str | None = None, *, progress: bool = True, folder: Path | None = None) -> Path:
    """Return a local path for `url`, downloading it into the cache if needed.

    Args:
        url: http(s):// or file:// address.
        sha256: expected hex digest (or a prefix of at least 8 digits); checked on download and on cached files.
        progress: show a progress bar while downloading.
        folder: cache into this folder instead of the URL's own folder in the cache (one folder per URL, so files
            of the same name from different places never stand in for each other). file:// URLs are read in place.
    Raises:
        ChecksumError: the file's digest differs; nothing is left in the cache.
        OSError: the download failed (the message names the URL).
    """
    expected = _check_digest(sha256) if sha256 else None
    parsed = urlparse(url)
    name = Path(parsed.path).name
    if not name:
        raise ValueError(f"expected a URL that ends in a file name; got {url!r}")
    if parsed.scheme == "file":  # read in place: a cached copy would hide later changes to the file
        return _local_file(Path(url2pathname(parsed.path)), expected, url)
    dst = folder / name if folder is not None else cache_path(url)
    if dst.exists():
        if expected is None or sha256_of(dst).startswith(expected):
            return dst
        log.warning("cached %s fails its hash check; downloading it again", dst)
        dst.unlink()
    dst.parent.mkdir(parents=True, exist_ok=True)
    log.info("downloading %s to %s", url, dst)
    try:
        torch.hub.download_url_to_file(url, str(dst), hash_prefix=expected, progress=progress)
    except RuntimeError as e:
        if "invalid hash value" in str(e):
            raise ChecksumError(
                f"download of {url} has the wrong SHA-256 (expected {expected}...); it was discarded: {e}"
            ) from None
        raise
    except OSError as e:
        raise OSError(f"could not download {url}: {e}") from e
    if expected is None:
        log.warning("no known SHA-256 for %s; downloaded file has %s", url, sha256_of(dst))
    return dst
