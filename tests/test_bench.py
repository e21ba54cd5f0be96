"""`gcvit bench` end to end on the smallest variant: both sides run, agree, and every row is reported."""

from __future__ import annotations

import re

import pytest
import torch

from gcvit.cli import main


@pytest.mark.cpu_bf16
def test_bench_reports_equality_and_every_row(capsys: pytest.CaptureFixture[str]) -> None:
    argv = ["bench", "--models", "gcvit_xxtiny", "--train-models", "gcvit_xxtiny", "--batches", "1"]
    argv += ["--train-batch", "2", "--repeats", "1", "--agreement-images", "16", "--device", "cpu"]
    argv += ["--train-dtypes", "fp32", "bf16"]
    assert main(argv) == 0
    out = capsys.readouterr().out
    diff = float(out.split("fp32 max abs difference to timm ")[1].split()[0])
    assert diff < 1e-4
    agreement = float(out.split("bf16 top-1 agreement with timm in bf16 ")[1].split("%")[0])
    assert agreement >= 75.0  # 16 images with random weights: a gross bf16 error would show as chance (0.1%)
    assert re.search(r"^device cpu, torch \S+, timm \S+, threads \d+", out, re.M)
    rows = (r"infer fp32\s+b1\s", r"infer bf16\s+b1\s", r"train fp32\s+b2\s", r"train fp32 dp0.2\s+b2\s")
    rows += (r"train bf16\s+b2\s", r"train bf16 dp0.2\s+b2\s")
    for row in rows:
        assert re.search(rf"gcvit_xxtiny {row}\s*ours img/s [\d.]+\s+timm img/s [\d.]+\s+ratio [\d.]+", out), row
    # every row ran timm's other settings beside its default one, and names the fastest it is set against
    settings = {
        "infer fp32": "timm|timm-cl",
        "infer bf16": "timm|timm-cl|timm-w|timm-cl-w",
        "train fp32": "timm|timm-cl",
        "train bf16": "timm|timm-cl",
    }
    for row, allowed in settings.items():
        assert re.search(
            rf"{row}\s+b\d\s.*ratio [\d.]+\s+ratio vs timm default [\d.]+\s+timm setting ({allowed})\s", out
        )
    # timm's bf16 with its weights cast once gives exactly the logits of autocast casting them on every call
    assert float(out.split("weights cast once vs cast per call: max abs difference ")[1].split()[0]) == 0.0
    ceilings = [float(v) for v in re.findall(r"matmul GFLOP/s ([\d.]+)", out)]
    assert len(ceilings) == 6 and min(ceilings) > 0  # each row timed its own matmul ceiling
    for dtype in ("fp32", "bf16"):
        assert "ckpt peak MiB" in re.search(rf"train {dtype}\s+b2\s.*", out).group(0)
    assert "peak MiB" not in re.search(r"train fp32 dp0.2\s+b2\s.*", out).group(0)  # random draws: not measured


def test_bench_leaves_out_bf16_rows_on_a_cpu_without_bf16_kernels(
    capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    from gcvit import bench_timm as bench

    monkeypatch.setattr(bench, "cpu_has_bf16", lambda: False)
    argv = ["bench", "--models", "gcvit_xxtiny", "--train-models", "--batches", "1", "--repeats", "1"]
    assert main([*argv, "--agreement-images", "4", "--device", "cpu"]) == 0
    out = capsys.readouterr().out
    assert "note: this CPU has no bf16 kernels (oneDNN needs AVX-512 or AMX): the bf16 rows are left out" in out
    assert re.search(r"gcvit_xxtiny infer fp32\s+b1\s", out) and "bf16" not in out.split("both sides")[1]


def test_bench_rejects_a_bad_drop_path_rate(capsys: pytest.CaptureFixture[str]) -> None:
    argv = ["bench", "--models", "--train-models", "gcvit_xxtiny", "--train-drop-path", "high", "--device", "cpu"]
    assert main(argv) == 2
    assert "expected a drop path rate in [0, 1) or 'recipe'; got 'high'" in capsys.readouterr().err


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        (["--repeats", "0"], "expected repeats of at least 1; got 0"),
        (["--img-size", "256"], "expected img_size 224, the only size timm's gcvit runs at; got 256"),
        (["--agreement-images", "0"], "expected agreement_images of at least 1; got 0"),
        # names timm lacks failed with a bare traceback, a training one only after the inference rows had run
        (["--models", "nope"], "expected models timm 1.0.31 has too (gcvit_base, "),
        (["--train-models", "gcvit_tiny2"], "expected models timm 1.0.31 has too (gcvit_base, "),
        (["--device", "bogus"], "expected --device cpu, cuda or cuda:N; got 'bogus'"),
    ],
)
def test_bench_refuses_settings_it_would_fail_on(extra: list[str], message: str, capsys) -> None:
    assert main(["bench", "--models", "gcvit_xxtiny", "--train-models", "--device", "cpu", *extra]) == 2
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err


@pytest.mark.skipif(torch.cuda.is_available(), reason="a machine without CUDA")
def test_bench_on_cuda_without_a_gpu_is_one_line(capsys) -> None:
    assert main(["bench", "--models", "gcvit_xxtiny", "--train-models", "--device", "cuda"]) == 2
    assert "device 'cuda': no CUDA device is available here (use --device cpu)" in capsys.readouterr().err


def test_cpu_peak_memory_counts_what_the_timed_path_allocates() -> None:
    """The peak comes from the allocator's record, so the fused oneDNN kernels run as when timed, and memory a
    kernel frees before returning counts too."""
    from gcvit.bench_timm import peak_memory
    from gcvit.layers import fused

    calls = []
    original = fused._OneDNNLinear.apply
    layer = torch.nn.Linear(256, 256)
    x = torch.randn(512, 256, requires_grad=True)
    with pytest.MonkeyPatch.context() as m:
        m.setattr(fused._OneDNNLinear, "apply", lambda *a: calls.append(1) or original(*a))
        peak = peak_memory(lambda: fused.linear(x, layer).sum().backward(), "cpu")
    assert calls and peak >= 512 * 256 * 4  # the output at least
    assert 8 * 2**20 <= peak_memory(lambda: torch.ones(2**21).sum(), "cpu") < 9 * 2**20  # 8 MiB, freed inside


def test_gpu_runs_name_the_gpu_and_keep_fp32_rows_full_fp32(monkeypatch: pytest.MonkeyPatch) -> None:
    """On CUDA the run logs the GPU and turns TF32 off for matmuls and cuDNN alike (PyTorch's defaults differ between
    the two, which would favour the side with more convolutions), restoring both afterwards."""
    from gcvit.bench_timm import full_fp32, matmul_size

    monkeypatch.setattr(torch.cuda, "get_device_name", lambda index=None: "Test GPU")
    saved = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32  # (monkeypatch cannot restore these)
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = True
    lines: list[str] = []
    try:
        with full_fp32("cuda", lines.append):
            inside = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
        after = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    finally:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = saved
    assert inside == (False, False) and after == (True, True)
    assert lines and lines[0].startswith("GPU Test GPU, CUDA ") and "TF32 off" in lines[0]
    with full_fp32("cpu", lines.append):
        assert torch.backends.cudnn.allow_tf32
    assert len(lines) == 1
    assert (matmul_size("cpu"), matmul_size("cuda")) == (2048, 8192)
