"""Fetching saved-model folders: an http(s) URL of a folder, or a Hugging Face Hub repo id, into the cache.

A folder (`gcvit.models.folder`: config.json, model.safetensors, and ema.safetensors and SHA256SUMS where there are
any) is fetched file by file, config.json first, each checked against the folder's SHA256SUMS as it streams, and
kept for later calls (offline too). `gcvit.load` builds the model from what is fetched.
"""

from __future__ import annotations

import hashlib
import logging
import os
import re
from pathlib import Path

from gcvit import digests
from gcvit.models.folder import CONFIG_FILE, EMA_FILE, MODEL_FILE, check_entries, chosen_weights, read_config

logger = logging.getLogger(__name__)

HF_ENDPOINT = "https://huggingface.co"  # overridden by $HF_ENDPOINT, as huggingface_hub does
_REPO_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")


def _fetch_folder(base_url: str, cache: Path, force_download: bool, ema: bool | None, headers: dict[str, str]) -> Path:
    """Download config.json, model.safetensors and ema.safetensors under `base_url` into `cache` (kept for later
    calls). config.json comes first: a folder that is not gcvit's is named before its weights are fetched. The
    weights are checked against the folder's SHA256SUMS where it has one. ema.safetensors is required with `ema`
    True, skipped with False; with None, required where config.json names it as the folder's weights (see
    `chosen_weights`), skipped where it names model.safetensors, else fetched where it exists (a training
    checkpoint's folder then loads its EMA weights, as it does locally); the absence of optional files is
    remembered."""
    from gcvit.download import download

    base = base_url.rstrip("/")
    optional = (EMA_FILE, digests.SUMS_FILE)
    if force_download:
        for name in (CONFIG_FILE, MODEL_FILE, *optional, *(f"{n}.absent" for n in optional)):
            (cache / name).unlink(missing_ok=True)
    config = download(f"{base}/{CONFIG_FILE}", folder=cache, warn_unverified=False, headers=headers)
    values = read_config(config)
    check_entries(values, f"{base}/{CONFIG_FILE}")
    if ema is None and "weights" in values:  # the folder names its weights: that file is required, the other not
        ema = chosen_weights(cache, values, None).name == EMA_FILE
    if not (cache / MODEL_FILE).exists():  # a folder cached whole (by any version) is used as it is, offline too
        _fetch_optional(base, digests.SUMS_FILE, cache, headers)
    sums = digests.read_sums(cache)  # downloads are checked as they stream; the file that loads, when it loads

    def fetch(name: str) -> None:
        download(f"{base}/{name}", sums.get(name), folder=cache, headers=headers)

    if not (cache / MODEL_FILE).exists():
        fetch(MODEL_FILE)
    if ema and not (cache / EMA_FILE).exists():
        fetch(EMA_FILE)
    elif ema is None and not (cache / EMA_FILE).exists():
        _fetch_optional(base, EMA_FILE, cache, headers, sums.get(EMA_FILE))
    return cache


def _fetch_optional(base: str, name: str, cache: Path, headers: dict[str, str], sha256: str | None = None) -> bool:
    """Fetch base/name into `cache` if the host has it; whether the folder now holds it. A 403 or 404 (S3 and GCS
    answer 403 for a missing file) is remembered in `<name>.absent`; other failures (offline) log a warning."""
    from gcvit.download import download

    absent = cache / f"{name}.absent"
    if absent.exists():
        return False
    try:
        download(f"{base}/{name}", sha256, folder=cache, warn_unverified=name == EMA_FILE, headers=headers)
    except OSError as e:
        if getattr(e.__cause__, "code", None) in (403, 404):
            absent.touch()
        else:
            logger.warning("could not fetch %s/%s (%s); loading without it", base, name, e)
        return False
    return True


def _stored_token() -> str | None:
    """The Hub token where huggingface_hub looks for it: $HF_TOKEN (or the older $HUGGING_FACE_HUB_TOKEN), else the
    file `huggingface-cli login` writes ($HF_TOKEN_PATH, else $HF_HOME/token, $HF_HOME defaulting to
    ~/.cache/huggingface)."""
    token = os.environ.get("HF_TOKEN") or os.environ.get("HUGGING_FACE_HUB_TOKEN")
    if token:
        return token
    home = Path(os.environ.get("HF_HOME") or "~/.cache/huggingface").expanduser()
    path = Path(os.environ.get("HF_TOKEN_PATH") or home / "token").expanduser()
    try:
        return path.read_text().strip() or None
    except OSError:
        return None


def _bearer(token: str | None) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}"} if token else {}


def _repo_url(repo_id: str, revision: str) -> str:
    """The URL of a hub repo's folder at `revision`, on $HF_ENDPOINT (default https://huggingface.co)."""
    return f"{os.environ.get('HF_ENDPOINT', HF_ENDPOINT).rstrip('/')}/{repo_id}/resolve/{revision}"


def is_remote(source: str) -> bool:
    """Whether `source` names a folder to fetch: an http(s) URL, or (not being a local path) a hub repo id."""
    return source.startswith(("http://", "https://")) or (bool(_REPO_ID.match(source)) and not Path(source).exists())


def folder_url(source: str, revision: str = "main") -> str:
    """The base URL of a remote folder: the URL itself, or the hub repo's folder at `revision`."""
    return source.rstrip("/") if source.startswith(("http://", "https://")) else _repo_url(source, revision)


def fetch(
    source: str,
    *,
    revision: str = "main",
    cache_dir: str | os.PathLike[str] | None = None,
    force_download: bool = False,
    ema: bool | None = None,
    token: str | None = None,
) -> Path:
    """The cached copy of the folder at an http(s) URL or of a hub repo id (`ema`: whether to fetch ema.safetensors
    too; None: where config.json chooses it or, saying nothing, where there is one; `token`: see `gcvit.load`)."""
    from gcvit.download import cache_dir as default_cache

    root = Path(cache_dir) if cache_dir is not None else default_cache() / "hub"
    if source.startswith(("http://", "https://")):
        digest = hashlib.sha256(source.rstrip("/").encode()).hexdigest()[:16]
        return _fetch_folder(source, root / "urls" / digest, force_download, ema, _bearer(token))
    if not _REPO_ID.match(source):
        raise ValueError(f"expected an http(s):// URL or a hub repo id 'user/name'; got {source!r}")
    cache = root / "repos" / source.replace("/", "--") / revision
    token = token or _stored_token()
    try:
        return _fetch_folder(_repo_url(source, revision), cache, force_download, ema, _bearer(token))
    except OSError as e:  # a mistyped local path looks like a repo id too
        why = ""
        if getattr(e.__cause__, "code", None) == 401:
            held = "the token given was refused" if token else "set HF_TOKEN, or pass token="
            why = f" (no such repo, or a private or gated one, which needs an access token: {held})"
        raise OSError(f"{source!r} is no local folder, and as a hub repo id: {e}{why}") from e
