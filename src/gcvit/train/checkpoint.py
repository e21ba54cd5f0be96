"""Crash-safe training checkpoints: RUN/last/ and RUN/best/, each swapped in whole.

A checkpoint folder holds model.safetensors (official key names), config.json (how to rebuild the model and read
its outputs), ema.safetensors (when EMA is on), SHA256SUMS (the weights' digests, checked by the loaders) and
state.pt (optimizer, scheduler, scaler, EMA, counters, every RNG state, and the digests again, checked on resume).
Each file is written to a temporary name, fsynced and renamed; the folder is first written as RUN/<name>.tmp-<pid>/
and then swapped in: the old folder is renamed aside to RUN/<name>.old-<pid>/, the new one renamed into place, and
the old one deleted. A crash at any moment leaves either <name>/ or <name>.old-*/ complete;
`find_checkpoint` picks the complete one and `clean_stale` removes the leftovers.

The environment variable GCVIT_TEST_KILL_AT=<point>:<epoch> (point 'write' or 'swap') sends SIGKILL to the process
in the middle of writing RUN/last/ after that epoch; the tests use it to prove the writes are atomic.
"""

from __future__ import annotations

import hashlib
import logging
import os
import pickle
import random
import shutil
import signal
import zipfile
from pathlib import Path
from typing import Any

import numpy as np
import torch

from gcvit import digests
from gcvit.atomic import atomic_write, atomic_write_bytes, fsync_dir
from gcvit.models import folder as saved_folder
from gcvit.models.folder import CONFIG_FILE, EMA_FILE, MODEL_FILE
from gcvit.models.weights import read_state_dict, safetensors_file

logger = logging.getLogger(__name__)

STATE_FILE = "state.pt"  # beside the saved-model files (`gcvit.models.folder`): what a resumed run needs


def atomic_torch_save(obj: Any, path: Path) -> None:
    """torch.save through a temporary file: write, fsync, rename."""
    atomic_write(path, lambda f: torch.save(obj, f))


def rng_state() -> dict[str, Any]:
    """Every global RNG state: Python, NumPy, torch CPU and (when present) CUDA."""
    state = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    """Restore what `rng_state` returned."""
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def _maybe_kill(point: str, epoch: int, name: str) -> None:
    """Test hook: SIGKILL ourselves at `point` of the last/ checkpoint written after `epoch` (see module docstring)."""
    want = os.environ.get("GCVIT_TEST_KILL_AT")
    if want and want == f"{point}:{epoch}" and name == "last":
        os.kill(os.getpid(), signal.SIGKILL)


def write_checkpoint(
    run_dir: Path,
    name: str,
    model_state: dict[str, torch.Tensor],
    model_config: dict[str, Any],
    state: dict[str, Any],
    ema_state: dict[str, torch.Tensor] | None = None,
) -> Path:
    """Write RUN/<name>/ atomically (see the module docstring); returns its path.

    Args:
        run_dir: the run folder.
        name: 'last' or 'best'.
        model_state: the model's state dict (official key names).
        model_config: its config.json (`gcvit.models.folder.model_config`, with the run's "weights", "epoch", ...).
        state: training state for resuming, saved with torch.save (plain Python, NumPy and tensors).
        ema_state: the EMA model's state dict, or None.
    """
    final = run_dir / name
    tmp = run_dir / f"{name}.tmp-{os.getpid()}"
    if tmp.exists():
        shutil.rmtree(tmp)
    try:
        tmp.mkdir(parents=True)
        meta = {"format": "gcvit", "epoch": str(state.get("epoch", ""))}
        sums = {}
        for file, weights in ((MODEL_FILE, model_state), (EMA_FILE, ema_state)):
            if weights is not None:
                data = safetensors_file(weights, meta)
                atomic_write_bytes(tmp / file, data)
                sums[file] = hashlib.sha256(data).hexdigest()
        atomic_write_bytes(tmp / CONFIG_FILE, saved_folder.config_json(model_config))
        _maybe_kill("write", int(state.get("epoch", -1)), name)
        digests.write_sums(tmp, sums)  # checked by the loaders
        state = state | {"digests": sums}  # checked on resume
        atomic_torch_save(state, tmp / STATE_FILE)  # written last: a folder with state.pt is complete
        fsync_dir(tmp)
    except (OSError, RuntimeError) as e:  # a full disk, a quota (torch.save's zip writer raises RuntimeError)
        shutil.rmtree(tmp, ignore_errors=True)  # the half-written folder goes; the previous checkpoint stays
        kept = f"{final} still holds the previous checkpoint" if final.exists() else f"{final} was not written"
        why = getattr(e, "strerror", None) or str(e).splitlines()[0]
        raise OSError(getattr(e, "errno", None), f"writing the checkpoint {final} failed ({why}); {kept}") from None
    old = run_dir / f"{name}.old-{os.getpid()}"
    if final.exists():
        os.replace(final, old)
    _maybe_kill("swap", int(state.get("epoch", -1)), name)
    os.replace(tmp, final)
    fsync_dir(run_dir)
    if old.exists():
        shutil.rmtree(old)
    return final


def find_checkpoint(run_dir: str | os.PathLike[str], name: str = "last", weights_only: bool = False) -> Path | None:
    """The complete RUN/<name>/ folder, or a complete RUN/<name>.old-*/ left by a crash mid-swap; None if neither.
    With `weights_only` (evaluation), a folder needs its weights and config.json but not the training state (which
    users may delete to save space)."""
    needed = (MODEL_FILE, CONFIG_FILE) if weights_only else (MODEL_FILE, STATE_FILE)
    return saved_folder.find_checkpoint(Path(run_dir), name, needed)


def holds_run(run_dir: Path) -> bool:
    """Whether `run_dir` already holds a run's checkpoints (`last*`, `best*`)."""
    return run_dir.is_dir() and any(p.name.startswith(("last", "best")) for p in run_dir.iterdir())


def clean_stale(run_dir: Path) -> None:
    """After a crash: put a complete <name>.old-* back as <name>/ if <name>/ is missing, delete the rest, and the
    temporary files a kill left in the middle of an atomic write (metrics.csv, config.yaml, the plots)."""
    for name in ("last", "best"):
        found = find_checkpoint(run_dir, name)
        if found is not None and found.name != name:
            os.replace(found, run_dir / name)
            logger.info("restored %s from %s, left by an interrupted checkpoint write", run_dir / name, found.name)
        for stale in [*run_dir.glob(f"{name}.tmp-*"), *run_dir.glob(f"{name}.old-*")]:
            shutil.rmtree(stale, ignore_errors=True)
    for folder in (run_dir, run_dir / "plots"):
        for stale in folder.glob(".*.tmp*"):  # atomic_write's temporary names: .<stem>.<random>.tmp<suffix>
            if stale.is_file():
                stale.unlink(missing_ok=True)


# what a resumed run reads from state.pt
STATE_KEYS = ("epoch", "step", "best", "history", "optimizer", "scheduler", "scaler", "ema", "rng", "loader_generator")


def read_training_state(folder: Path) -> dict[str, Any]:
    """state.pt of a checkpoint folder (trusted: written by this run), loaded on the CPU; a ValueError naming the
    file when it cannot be read or lacks what a resumed run needs."""
    path = folder / STATE_FILE
    try:
        with zipfile.ZipFile(path) as archive:  # torch.save's zip records a CRC-32 per entry, which torch.load skips
            bad = archive.testzip()
        if bad is not None:
            raise ValueError(f"its entry {bad} fails its CRC check")
        state = torch.load(path, map_location="cpu", weights_only=False)
    except (RuntimeError, EOFError, pickle.UnpicklingError, zipfile.BadZipFile, ValueError) as e:
        raise ValueError(f"{path} is damaged and cannot be read: {e}") from None
    if not isinstance(state, dict):
        raise ValueError(f"{path} holds a {type(state).__name__}; expected the training state `gcvit train` writes")
    missing = [k for k in STATE_KEYS if k not in state]
    if missing:
        raise ValueError(f"{path} lacks {missing}; expected the training state `gcvit train` writes")
    return state


def read_weights(folder: Path, ema: bool = False) -> dict[str, torch.Tensor]:
    """model.safetensors (or ema.safetensors) of a checkpoint folder."""
    return read_state_dict(folder / (EMA_FILE if ema else MODEL_FILE))


def check_digests(folder: Path, state: dict[str, Any]) -> None:
    """Raise a ValueError naming a file of the checkpoint whose SHA-256 differs from the one state.pt recorded when
    it was written (a flipped byte would otherwise resume silently); checkpoints from before digests pass."""
    for name, digest in (state.get("digests") or {}).items():
        if (folder / name).exists() and digests.sha256_of(folder / name) != digest:  # resuming needs no EMA file
            raise digests.DamagedFileError(
                f"{folder / name} is damaged: its SHA-256 differs from the one recorded when it was written. "
                f"Resume from a copy, or start a new run from best/ (--pretrained)"
            )
