"""Checkpoint download into a local cache, with SHA-256 check and atomic writes.

The cache is `$GCVIT_CACHE` if set, else `<torch hub dir>/gcvit`. A file reaches its cache name only once complete
(as many bytes as the server announced) and verified: it is written to a temporary file in the same folder and
renamed at the end.
"""

from __future__ import annotations

import hashlib
import http.client
import logging
import os
import uuid
from collections.abc import Mapping
from pathlib import Path
from typing import Any
from urllib.parse import urlparse
from urllib.request import HTTPRedirectHandler, Request, build_opener, url2pathname

import torch.hub

from gcvit.digests import sha256_of

log = logging.getLogger(__name__)

TIMEOUT = 60.0  # seconds without a byte from the server before a download is given up


class ChecksumError(RuntimeError):
    """A downloaded or cached file does not have the expected SHA-256 digest."""


def cache_dir() -> Path:
    """The folder downloads are cached in: $GCVIT_CACHE, else <torch hub dir>/gcvit."""
    return Path(os.environ.get("GCVIT_CACHE") or Path(torch.hub.get_dir()) / "gcvit").expanduser()


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


def download(
    url: str,
    sha256: str | None = None,
    *,
    progress: bool = True,
    folder: Path | None = None,
    warn_unverified: bool = True,
    headers: Mapping[str, str] | None = None,
) -> Path:
    """Return a local path for `url`, downloading it into the cache if needed.

    Args:
        url: http(s):// or file:// address.
        sha256: expected hex digest (or a prefix of at least 8 digits); checked on download and on cached files.
        progress: show a progress bar while downloading.
        folder: cache into this folder instead of the URL's own folder in the cache (one folder per URL, so files
            of the same name from different places never stand in for each other). file:// URLs are read in place.
        warn_unverified: log a warning, with the file's digest, when no `sha256` was given.
        headers: extra HTTP request headers (an Authorization token, say); never sent on to a redirect's target.
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
        log.warning("cached %s fails its hash check; downloading it again", dst)  # the rename below replaces it
    dst.parent.mkdir(parents=True, exist_ok=True)
    log.info("downloading %s to %s", url, dst)
    try:
        digest = _fetch(url, dst, expected, progress, headers or {})
    except (OSError, http.client.HTTPException) as e:  # HTTP errors, refused or cut connections, timeouts
        raise OSError(f"could not download {url}: {e}") from e
    if expected is None and warn_unverified:
        log.warning("no known SHA-256 for %s; downloaded file has %s", url, digest)
    return dst


class _TokenRedirects(HTTPRedirectHandler):
    """Follows redirects; a request's unredirected headers (a token) go along to the same scheme and host (a renamed
    Hub repo), never to another host (the CDN that serves the files)."""

    def redirect_request(self, req: Request, fp: Any, code: int, msg: str, headers: Any, newurl: str) -> Any:
        new = super().redirect_request(req, fp, code, msg, headers, newurl)
        old, target = urlparse(req.full_url), urlparse(newurl)
        if new is not None and (old.scheme, old.netloc) == (target.scheme, target.netloc):
            for key, value in req.unredirected_hdrs.items():
                new.add_unredirected_header(key, value)
        return new


def _fetch(url: str, dst: Path, expected: str | None, progress: bool, headers: Mapping[str, str]) -> str:
    """Stream `url` into a temporary file beside `dst`; rename it to `dst` when every announced byte came and the
    digest starts with `expected`. Returns the SHA-256 hex digest. Concurrent downloads of one file each write their
    own temporary file; the last rename wins, with the same bytes."""
    tmp = dst.with_name(f"{dst.name}.{uuid.uuid4().hex[:8]}.partial")
    digest = hashlib.sha256()
    request = Request(url, headers={"User-Agent": "gcvit"})
    for key, value in headers.items():  # a token for the host asked, not for the CDN it redirects to
        request.add_unredirected_header(key, value)
    try:
        with build_opener(_TokenRedirects).open(request, timeout=TIMEOUT) as response, open(tmp, "wb") as f:
            length = response.headers.get("Content-Length")
            total = int(length) if length and length.isdigit() else None
            bar = _progress_bar(total, dst.name) if progress else None
            done = 0
            while chunk := response.read(1 << 20):
                f.write(chunk)
                digest.update(chunk)
                done += len(chunk)
                if bar is not None:
                    bar.update(len(chunk))
            if bar is not None:
                bar.close()
        if total is not None and done != total:
            raise OSError(f"the connection closed after {done} of {total} bytes")
        if expected is not None and not digest.hexdigest().startswith(expected):
            raise ChecksumError(
                f"download of {url} has the wrong SHA-256 {digest.hexdigest()} (expected {expected}...); discarded"
            )
        os.replace(tmp, dst)
    finally:
        tmp.unlink(missing_ok=True)
    return digest.hexdigest()


def _progress_bar(total: int | None, name: str) -> Any:
    """A tqdm bar in bytes, or None without tqdm (an optional dependency)."""
    try:
        from tqdm import tqdm
    except ImportError:
        return None
    return tqdm(total=total, desc=name, unit="B", unit_scale=True, unit_divisor=1024)
