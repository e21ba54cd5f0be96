"""Shared fixtures: seeded randomness, a local HTTP server, official-format checkpoints."""

from __future__ import annotations

import argparse
import functools
import http.server
import os
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch

import gcvit


@pytest.fixture(autouse=True)
def _seed() -> None:
    torch.manual_seed(0)


@pytest.fixture
def one_thread() -> Iterator[None]:
    """One torch thread: tiny models barely gain from two, and two thrash when other jobs share the CPU (the tests of
    training take it: `pytestmark = pytest.mark.usefixtures("one_thread")`)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


# a GC ViT of a few thousand parameters for fast training tests (`model_overrides`, or `--model-override` flags)
TINY = {
    "embed_dim": 16,
    "depths": [1, 1, 1, 1],
    "num_heads": [1, 1, 2, 2],
    "window_size": [4, 4, 4, 2],
    "mlp_ratio": 2.0,
    "global_query_pools": None,
}


def randomize_(model: torch.nn.Module, scale: float = 0.05) -> torch.nn.Module:
    """Perturb every parameter so that no weight keeps its special initial value (LayerNorm 1/0, layer scale 1e-5)."""
    g = torch.Generator().manual_seed(1234)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn(p.shape, generator=g) * scale)
    return model


@pytest.fixture
def http_root(tmp_path: Path) -> Iterator[tuple[Path, str]]:
    """A folder served over HTTP on 127.0.0.1: yields (folder, base URL)."""
    root = tmp_path / "served"
    root.mkdir()
    handler = functools.partial(http.server.SimpleHTTPRequestHandler, directory=str(root))
    handler.log_message = lambda *a, **k: None  # type: ignore[method-assign]
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield root, f"http://127.0.0.1:{server.server_address[1]}"
    finally:
        server.shutdown()
        server.server_close()


@pytest.fixture
def cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    path = tmp_path / "cache"
    monkeypatch.setenv("GCVIT_CACHE", str(path))
    return path


def save_official(model: torch.nn.Module, path: Path) -> Path:
    """Write a checkpoint the way NVIDIA's release does: a .pth.tar holding {'state_dict': ...} (plus the training
    arguments, as training scripts store them)."""
    torch.save({"state_dict": model.state_dict(), "epoch": 309, "args": argparse.Namespace(lr=5e-3)}, path)
    return path


@pytest.fixture(scope="session")
def xxtiny_official(tmp_path_factory: pytest.TempPathFactory) -> tuple[gcvit.GCViT, Path]:
    """A randomised gcvit_xxtiny and its official-format checkpoint."""
    torch.manual_seed(0)
    model = randomize_(gcvit.create_model("gcvit_xxtiny")).eval()
    return model, save_official(model, tmp_path_factory.mktemp("ckpt") / "gcvit_1k_xxtiny.pth.tar")


def assert_same_logits(model: torch.nn.Module, reference: torch.nn.Module, size: int = 224) -> None:
    """Logits within 1e-4 of the reference's at batch 1 and 4."""
    x = torch.randn(4, 3, size, size)
    with torch.no_grad():
        for batch in (x[:1], x):
            expected, got = reference(batch), model(batch)
            assert got.shape == expected.shape
            assert (got - expected).abs().max().item() < 1e-4


def assert_loads_timm_checkpoint(name: str, timm_name: str, tmp_path: Path) -> None:
    """A randomised timm model saved to a file loads into `name` strictly as 'timm' and gives timm's logits."""
    import timm

    reference = randomize_(timm.create_model(timm_name)).eval()
    path = tmp_path / f"{name}_timm.pth"
    torch.save(reference.state_dict(), path)
    model = gcvit.create_model(name).eval()
    report = gcvit.load_checkpoint(model, path)
    assert report.format == "timm"
    assert not (report.missing or report.unexpected or report.mismatched)
    assert_same_logits(model, reference)


def assert_padding_is_masked(model: torch.nn.Module, x: torch.Tensor, module: object, patch) -> None:
    """The model's output at a size that pads its maps to window multiples stays the same when the padding holds
    large noise instead of zeros (`patch`: monkeypatch.setattr on `module.pad_to_window_multiple`): padded tokens
    are masked out of attention and cut off after it."""
    with torch.no_grad():
        expected = model(x)

    def noisy_pad(t: torch.Tensor, ws: int) -> torch.Tensor:
        _, H, W, C = t.shape
        out = torch.randn(t.shape[0], -(-H // ws) * ws, -(-W // ws) * ws, C) * 100
        out[:, :H, :W] = t
        return out

    patch(module, "pad_to_window_multiple", noisy_pad)
    with torch.no_grad():
        got = model(x)
    pairs = zip(got, expected) if isinstance(got, (list, tuple)) else [(got, expected)]  # a backbone's maps
    assert max((a - b).abs().max().item() for a, b in pairs) < 1e-4


def assert_checkpointing_keeps_gradients(model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor) -> None:
    """Every gradient is finite and non-zero, and gradient checkpointing leaves them unchanged (1e-6)."""

    def grads() -> dict[str, torch.Tensor]:
        model.zero_grad()
        torch.nn.functional.cross_entropy(model(x), y).backward()
        return {n: p.grad.clone() for n, p in model.named_parameters()}

    plain = grads()
    assert all(torch.isfinite(g).all() and g.abs().sum() > 0 for g in plain.values())
    model.set_grad_checkpointing(True)
    ckpt = grads()
    model.set_grad_checkpointing(False)
    assert max((plain[n] - ckpt[n]).abs().max().item() for n in plain) < 1e-6


def pytest_xdist_auto_num_workers(config: pytest.Config) -> int:
    """`-n auto`: one worker per core this process may use (its CPU affinity and cgroup quota, not the host's cores,
    which psutil would count inside a container), at most 8: each worker holds its own models and datasets."""
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    try:
        quota, period = Path("/sys/fs/cgroup/cpu.max").read_text().split()
        if quota != "max":
            cores = min(cores, -(-int(quota) // int(period)))
    except (OSError, ValueError):
        pass
    return max(1, min(cores, 8))


def pytest_configure(config: pytest.Config) -> None:
    """Under pytest-xdist each worker gets one core's worth of threads, and so do the commands it starts."""
    if os.environ.get("PYTEST_XDIST_WORKER"):
        os.environ["OMP_NUM_THREADS"] = "1"
        torch.set_num_threads(1)


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Tests marked `cpu_bf16` check the bf16 CPU kernels. A CPU without them (an AVX2-only AMD EPYC, say) runs bf16
    through PyTorch's slow fallbacks (60x slower than fp32) or not at all: those tests are skipped there, saying why."""
    from gcvit.layers.fused import cpu_has_bf16

    if cpu_has_bf16():
        return
    skip = pytest.mark.skip(reason="this CPU has no bf16 kernels (oneDNN needs AVX-512 or AMX, or BF16 on Arm)")
    for item in items:
        if "cpu_bf16" in item.keywords:
            item.add_marker(skip)
