"""gcvit.train.checkpoint: atomic checkpoint writes, damaged run files named, weights checked against their
SHA-256 wherever they load."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
from pathlib import Path

import pytest
import torch

pytest.importorskip("sklearn")
pytest.importorskip("yaml")

import gcvit
from gcvit.models.folder import read_config
from gcvit.train import checkpoint as ckpt
from gcvit.train.evaluate import predict
from tests.train.helpers import run_gcvit

pytestmark = pytest.mark.usefixtures("one_thread")  # one torch thread (tests/conftest.py)


def test_checkpoint_swap_is_atomic_and_recoverable(tmp_path: Path) -> None:
    meta, state = {"model": "x"}, {k: None for k in ckpt.STATE_KEYS} | {"epoch": 1}
    ckpt.write_checkpoint(tmp_path, "last", {"w": torch.ones(2)}, meta, state)
    assert ckpt.find_checkpoint(tmp_path) == tmp_path / "last"
    # a crash between moving the old folder aside and renaming the new one in: both halves are on disk
    os.replace(tmp_path / "last", tmp_path / "last.old-123")
    (tmp_path / "last.tmp-123").mkdir()
    (tmp_path / "last.tmp-123" / ckpt.MODEL_FILE).write_bytes(b"half")
    assert ckpt.find_checkpoint(tmp_path) == tmp_path / "last.old-123"
    (tmp_path / ".metrics.k2j_x.tmp.csv").write_text("epoch\n")  # atomic writes a kill interrupted
    (tmp_path / "plots").mkdir()
    (tmp_path / "plots" / ".loss.abc.tmp.png").write_bytes(b"")
    ckpt.clean_stale(tmp_path)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["last", "plots"] and not any((tmp_path / "plots").iterdir())
    assert ckpt.read_training_state(tmp_path / "last")["epoch"] == 1


def test_a_failed_checkpoint_write_names_the_folder_and_keeps_the_previous_one(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    state = {k: None for k in ckpt.STATE_KEYS} | {"epoch": 1}
    ckpt.write_checkpoint(tmp_path, "last", {"w": torch.ones(2)}, {"model": "x"}, state)

    def full(*args: object, **kwargs: object) -> None:
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(ckpt, "atomic_torch_save", full)
    with pytest.raises(
        OSError,
        match=r"writing the checkpoint .*last failed \(No space left on device\); .*last "
        r"still holds the previous checkpoint",
    ):
        ckpt.write_checkpoint(tmp_path, "last", {"w": torch.zeros(2)}, {"model": "x"}, state | {"epoch": 2})
    assert sorted(p.name for p in tmp_path.iterdir()) == ["last"]  # no half-written last.tmp-*
    assert ckpt.read_training_state(tmp_path / "last")["epoch"] == 1


def test_damaged_run_files_and_a_missing_gpu_are_named(uninterrupted: Path, tmp_path: Path) -> None:

    run = tmp_path / "run"
    shutil.copytree(uninterrupted, run)
    (run / "last" / "state.pt").write_bytes((run / "last" / "state.pt").read_bytes()[:1000])
    resumed = run_gcvit("train", "--resume", str(run), "--epochs", "4", "--no-progress")
    assert resumed.returncode == 2 and "state.pt is damaged and cannot be read" in resumed.stderr
    (run / "best" / "config.json").write_text('{"model": "gcvit_xxtiny",\n')
    with pytest.raises(ValueError, match=r"best/config.json is not valid JSON"):
        read_config(run / "best")
    (run / "best" / "config.json").write_text("[1, 2]")
    with pytest.raises(ValueError, match=r"best/config.json: expected a JSON object with the model's name"):
        read_config(run / "best")
    torch.save([1, 2], run / "last" / "state.pt")
    with pytest.raises(ValueError, match=r"last/state.pt holds a list; expected the training state"):
        ckpt.read_training_state(run / "last")
    state = ckpt.read_training_state(uninterrupted / "last")
    del state["optimizer"]
    torch.save(state, run / "last" / "state.pt")
    with pytest.raises(ValueError, match=r"last/state.pt lacks \['optimizer'\]; expected the training state"):
        ckpt.read_training_state(run / "last")
    if not torch.cuda.is_available():
        with pytest.raises(ValueError, match="no CUDA device is available here"):
            predict([tmp_path], uninterrupted, device="cuda")


def test_a_flipped_byte_in_the_weights_is_found_wherever_they_load(uninterrupted: Path, tmp_path: Path) -> None:
    """Evaluation reads best/ema.safetensors, which state.pt's digests (read on resume only) do not guard: each
    checkpoint lists its weights' SHA-256 in SHA256SUMS (sha256sum's format), and every loader of a local weights
    file checks against it."""
    run = tmp_path / "run"
    shutil.copytree(uninterrupted, run)
    for folder in (run / "best", run / "last"):
        assert (folder / "SHA256SUMS").read_text().split()[1::2] == ["model.safetensors", "ema.safetensors"]
        if shutil.which("sha256sum"):
            subprocess.run(["sha256sum", "--check", "--quiet", "SHA256SUMS"], cwd=folder, check=True)
    ema = run / "best" / "ema.safetensors"
    data = bytearray(ema.read_bytes())
    data[-100] ^= 0x10  # in the last tensor's data
    ema.write_bytes(bytes(data))
    damage = r"best/ema.safetensors is damaged: its SHA-256 differs from the one recorded in .*best/SHA256SUMS"
    with pytest.raises(ValueError, match=damage):
        gcvit.load(run)
    evaluated = run_gcvit("eval", str(run))
    assert evaluated.returncode == 2 and re.search(damage, evaluated.stderr), evaluated.stderr
    model = gcvit.load(run, ema=False)  # the other weights file of the folder is sound
    assert not model.training
    with pytest.raises(ValueError, match=damage):  # as --pretrained, or gcvit.load_checkpoint in Python
        gcvit.load_checkpoint(model, ema)
    (run / "best" / "SHA256SUMS").unlink()  # checkpoints from before digests load as they did
    gcvit.load(run)
