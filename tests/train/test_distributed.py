"""gcvit.train.distributed: the device each process takes, a caller's process group left alone, and two DDP
processes training as one."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

pytest.importorskip("sklearn")
pytest.importorskip("yaml")

from gcvit.train import checkpoint as ckpt
from tests.train.helpers import TINY_FLAGS

pytestmark = pytest.mark.usefixtures("one_thread")  # one torch thread (tests/conftest.py)


def test_a_cuda_index_is_honoured_or_refused(monkeypatch: pytest.MonkeyPatch) -> None:
    """--device cuda:1 in a single process trains on cuda:1 (it went to cuda:LOCAL_RANK, i.e. cuda:0); an index
    the machine lacks, or one that fights torchrun's LOCAL_RANK, is named. CUDA is simulated: two devices."""
    from gcvit.train import distributed as D

    chosen = []
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    monkeypatch.setattr(torch.cuda, "set_device", chosen.append)
    for name in ("WORLD_SIZE", "RANK", "LOCAL_RANK"):
        monkeypatch.delenv(name, raising=False)
    assert D.setup("cuda:1").device == torch.device("cuda", 1) and chosen == [1]
    assert D.setup("cuda").device == torch.device("cuda", 0)
    with pytest.raises(ValueError, match="device 'cuda:5': this machine has 2 CUDA devices"):
        D.setup("cuda:5")
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("LOCAL_RANK", "0")
    with pytest.raises(ValueError, match=r"under torchrun each process trains on cuda:LOCAL_RANK \(here cuda:0\)"):
        D.setup("cuda:1")


def test_cleanup_leaves_a_process_group_the_caller_started(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """train() under a process group of the caller's own (a notebook, another framework) must not destroy it."""
    import torch.distributed as dist

    from gcvit.train import distributed as D

    store = dist.FileStore(str(tmp_path / "store"), 1)
    dist.init_process_group("gloo", store=store, rank=0, world_size=1)
    try:
        monkeypatch.setenv("WORLD_SIZE", "2")  # what torchrun would say; setup finds the group already there
        monkeypatch.setenv("RANK", "0")
        info = D.setup("cpu")
        assert info.distributed and not info.owns_group
        D.cleanup(info)
        assert dist.is_initialized()
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


def _torchrun(run_dir: Path, nproc: int) -> subprocess.CompletedProcess[str]:
    args = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        f"--nproc-per-node={nproc}",
        "-m",
        "gcvit.cli",
        "train",
        "--out-dir",
        str(run_dir),
        "--epochs",
        "2",
        "--batch-size",
        "64",
        *TINY_FLAGS,
        "--drop-path",
        "0",
        "--amp",
        "none",
        "--no-progress",
        "--device",
        "cpu",
    ]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    return subprocess.run(args, env=env, capture_output=True, text=True, timeout=600)


@pytest.mark.slow
def test_two_process_ddp_matches_one_process(tmp_path: Path) -> None:
    one, two = _torchrun(tmp_path / "one", 1), _torchrun(tmp_path / "two", 2)
    assert one.returncode == 0, one.stderr
    assert two.returncode == 0, two.stderr
    assert two.stdout.count("done: 2 epochs") == 1, two.stdout  # the first process reports, as it logs
    wa = ckpt.read_weights(tmp_path / "one" / "last")
    wb = ckpt.read_weights(tmp_path / "two" / "last")
    worst = max((wa[k].float() - wb[k].float()).abs().max().item() for k in wa)
    assert worst < 1e-5, worst
