"""`keep_freed_memory`: a large tensor freed and allocated again reuses the process's memory without page faults."""

from __future__ import annotations

import subprocess
import sys

import pytest

# Allocates and frees a 64 MiB tensor, then counts the minor page faults of allocating and writing a 60 MiB one. (A
# block of exactly the freed size may not fit where the old one was: PyTorch asks for 64-byte-aligned memory, which
# glibc serves from a slightly larger free block. In a training step freed neighbours merge, so that matters little.)
_PROBE = """
import resource, sys, torch
from gcvit.allocator import keep_freed_memory, freed_memory_kept
applied = keep_freed_memory() if sys.argv[1] == "keep" else False
assert freed_memory_kept() == applied
n = 64 * 2**20
torch.empty(n, dtype=torch.uint8).fill_(1)
before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
torch.empty(n - 4 * 2**20, dtype=torch.uint8).fill_(2)
print(applied, resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
"""


def _faults(mode: str) -> tuple[bool, int]:
    out = subprocess.run([sys.executable, "-c", _PROBE, mode], capture_output=True, text=True, check=True).stdout
    applied, faults = out.split()
    return applied == "True", int(faults)


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc malloc settings")
def test_freed_memory_is_reused_without_page_faults() -> None:
    applied, kept = _faults("keep")
    assert applied
    _, system = _faults("system")
    assert kept < 64  # reused: not even one fault per 2 MiB huge page (15360 faults for fresh 4 KiB pages)
    assert system > kept


def test_cli_applies_it_unless_told_not_to(monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    import gcvit.cli

    calls: list[bool] = []
    monkeypatch.setattr(gcvit.cli, "keep_freed_memory", lambda: calls.append(True) or True)
    assert gcvit.cli.main(["models", "gcvit_xxtiny*"]) == 0
    assert calls == [True]
    assert gcvit.cli.main(["--system-malloc", "models", "gcvit_xxtiny*"]) == 0
    assert calls == [True]  # not called again
    assert "gcvit_xxtiny" in capsys.readouterr().out
