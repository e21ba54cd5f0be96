"""On an NVIDIA GPU: the CUDA routes (PyTorch's fused attention with the bias as its mask, cuDNN convolutions, CUDA
autocast) give what the CPU routes give, train, and match timm on the same GPU. Marked `gpu`, so the default run
deselects them; `python -m pytest -m gpu` runs them where a GPU is (and skips them where none is)."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
import torch

import gcvit
from gcvit.bench_timm import full_fp32
from gcvit.train import TrainConfig, train
from tests.conftest import randomize_

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device"),
]
DEVICE = "cuda"


@pytest.fixture(autouse=True)
def _no_tf32() -> Iterator[None]:
    """No TF32 anywhere, so that fp32 on the GPU is compared with fp32 on the CPU, not with 10-bit mantissas."""
    with full_fp32(DEVICE, lambda line: None):
        yield


@pytest.mark.parametrize("size", [(224, 224), (200, 264)])  # the native size, and one that pads every stage
@pytest.mark.parametrize("channels_last", [False, True])
def test_forward_and_gradients_equal_the_cpu(size: tuple[int, int], channels_last: bool) -> None:
    torch.manual_seed(0)
    cpu = randomize_(gcvit.create_model("gcvit_xxtiny", img_size=size, drop_path_rate=0.0)).train()
    gpu = gcvit.create_model("gcvit_xxtiny", img_size=size, drop_path_rate=0.0)
    gpu.load_state_dict(cpu.state_dict())
    gpu = gpu.to(DEVICE).train()
    x = torch.randn(3, 3, *size)
    x_gpu = x.to(DEVICE)
    if channels_last:
        gpu = gpu.to(memory_format=torch.channels_last)
        x_gpu = x_gpu.contiguous(memory_format=torch.channels_last)
    weights = torch.randn(3, 1000)
    (cpu(x) * weights).sum().backward()
    out = gpu(x_gpu)
    (out * weights.to(DEVICE)).sum().backward()
    with torch.no_grad():
        assert (out.cpu() - cpu(x)).abs().max().item() < 1e-4
        assert (gpu.eval()(x_gpu).cpu() - cpu.eval()(x)).abs().max().item() < 1e-4
    for (name, p), q in zip(cpu.named_parameters(), gpu.parameters()):
        scale = p.grad.abs().max().item()
        assert (q.grad.cpu() - p.grad).abs().max().item() <= 1e-3 * scale + 1e-6, name


def test_bf16_autocast_keeps_the_top_class() -> None:
    """bf16 on the GPU against fp32 on the GPU, on 64 random images of a randomly weighted model (close top
    classes, so a strict test of rounding; the CPU's bf16 agrees on 99% with timm's)."""
    torch.manual_seed(0)
    model = randomize_(gcvit.create_model("gcvit_tiny")).eval().to(DEVICE)
    x = torch.randn(64, 3, 224, 224, device=DEVICE)
    with torch.inference_mode():
        ref = model(x)
        with torch.autocast(DEVICE, dtype=torch.bfloat16):
            low = model(x)
    assert low.dtype == torch.bfloat16
    agreement = (low.argmax(-1) == ref.argmax(-1)).float().mean().item()
    assert agreement >= 0.95, agreement


def test_equals_timm_on_the_gpu() -> None:
    timm = pytest.importorskip("timm")
    torch.manual_seed(0)
    theirs = randomize_(timm.create_model("gcvit_tiny")).eval().to(DEVICE)
    ours = gcvit.create_model("gcvit_tiny")
    gcvit.models.weights.load_state_dict_into(ours, theirs.state_dict(), "timm")
    ours = ours.eval().to(DEVICE)
    x = torch.randn(8, 3, 224, 224, device=DEVICE)
    with torch.inference_mode():
        assert (ours(x) - theirs(x)).abs().max().item() < 1e-4


@pytest.mark.slow  # minutes of compiling: `-m gpu` runs it, `-m "gpu and not slow"` leaves it out
def test_compiled_model_with_a_dynamic_batch_equals_eager() -> None:
    torch.manual_seed(0)
    model = randomize_(gcvit.create_model("gcvit_xxtiny")).eval().to(DEVICE)
    compiled = torch.compile(model, dynamic=True, fullgraph=True)
    with torch.inference_mode():
        for batch in (2, 5):
            x = torch.randn(batch, 3, 224, 224, device=DEVICE)
            assert (compiled(x) - model(x)).abs().max().item() < 1e-4


def test_fine_tunes_the_digits_on_the_gpu(tmp_path: Path) -> None:
    """The trainer end to end on CUDA (bf16 autocast, the default): the digits to at least 95% in a short run."""
    result = train(TrainConfig(epochs=12, out_dir=str(tmp_path / "run"), ema=0.99, device=DEVICE))
    assert result.best_top1 >= 95.0, result.history


def test_fp16_training_with_a_grad_scaler(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """amp='fp16' trains through an enabled GradScaler that scaled the losses (a non-finite loss would raise)."""
    scalers: list[torch.amp.GradScaler] = []

    class Recorded(torch.amp.GradScaler):
        def __init__(self, *args: object, **kwargs: object) -> None:
            super().__init__(*args, **kwargs)
            scalers.append(self)

    monkeypatch.setattr(torch.amp, "GradScaler", Recorded)
    result = train(TrainConfig(epochs=3, out_dir=str(tmp_path / "run"), amp="fp16", device=DEVICE))
    assert result.epochs_done == 3 and len(scalers) == 1 and scalers[0].is_enabled()
    assert scalers[0]._scale is not None  # made by its first scale(loss): the scaler was used, not only built
