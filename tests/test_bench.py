"""`gcvit bench` end to end on the smallest variant: both sides run, agree, and every row is reported."""

from __future__ import annotations

import re

import pytest

from gcvit.cli import main


def test_bench_reports_equality_and_every_row(capsys: pytest.CaptureFixture[str]) -> None:
    argv = ["bench", "--models", "gcvit_xxtiny", "--train-models", "gcvit_xxtiny", "--batches", "1"]
    argv += ["--train-batch", "2", "--repeats", "1", "--agreement-images", "16", "--device", "cpu"]
    assert main(argv) == 0
    out = capsys.readouterr().out
    diff = float(out.split("fp32 max abs difference to timm ")[1].split()[0])
    assert diff < 1e-4
    agreement = float(out.split("bf16 top-1 agreement with timm in bf16 ")[1].split("%")[0])
    assert agreement >= 75.0  # 16 images with random weights: a gross bf16 error would show as chance (0.1%)
    rows = (r"infer fp32\s+b1\s", r"infer bf16\s+b1\s", r"train fp32\s+b2\s", r"train fp32 dp0.2\s+b2\s")
    for row in rows:
        assert re.search(rf"gcvit_xxtiny {row}\s*ours img/s [\d.]+\s+timm img/s [\d.]+\s+ratio [\d.]+", out), row
    # timm's channels-last setting ran beside its default one wherever the ratio is against the faster of the two
    assert re.search(r"train fp32\s+b2\s.*ratio [\d.]+\s+ratio vs timm default [\d.]+", out)
    assert re.search(r"infer bf16\s+b1\s.*ratio vs timm default [\d.]+", out)
    assert "ratio vs timm default" not in re.search(r"infer fp32\s+b1\s.*", out).group(0)
    ceilings = [float(v) for v in re.findall(r"matmul GFLOP/s ([\d.]+)", out)]
    assert len(ceilings) == 4 and min(ceilings) > 0  # each row timed its own matmul ceiling
    assert "ckpt peak MiB" in re.search(r"train fp32\s+b2\s.*", out).group(0)
    assert "peak MiB" not in re.search(r"train fp32 dp0.2\s+b2\s.*", out).group(0)  # random draws: not measured


def test_bench_rejects_a_bad_drop_path_rate(capsys: pytest.CaptureFixture[str]) -> None:
    argv = ["bench", "--models", "--train-models", "gcvit_xxtiny", "--train-drop-path", "high", "--device", "cpu"]
    assert main(argv) == 2
    assert "expected a drop path rate in [0, 1) or 'recipe'; got 'high'" in capsys.readouterr().err
