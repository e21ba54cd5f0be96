"""Side-by-side speed measurement of this project's GC ViT and timm's, with identical weights and inputs.

Both sides run in one process, interleaved repeat by repeat, and medians are reported, since shared machines are
noisy. Achieved GFLOP/s are set against a matrix multiply timed among each row's interleaved calls, so that a row and
its ceiling see the same machine (on a shared VM the matmul rate itself moves by 2x from minute to minute). Peak
memory is the CUDA allocator's peak on GPU; on CPU it is the peak of live tensor storage, tracked op by op with a
dispatch mode (untimed runs).
"""

from __future__ import annotations

import contextlib
import copy
import statistics
import time
import weakref
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field

import torch
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

import gcvit
from gcvit.allocator import freed_memory_kept
from gcvit.flops import count_macs
from gcvit.models.registry import resolve_name
from gcvit.models.weights import load_state_dict_into


@dataclass
class BenchConfig:
    models: tuple[str, ...] = ("gcvit_tiny",)
    img_size: int = 224
    infer_batches: tuple[int, ...] = (1, 16)
    train_batch: int = 16
    train_models: tuple[str, ...] = ("gcvit_xxtiny", "gcvit_tiny")
    # stochastic depth of the training rows, one row each: a rate, or "recipe" for the variant's own (0.2 for
    # xxtiny and tiny), given to both sides; peak memory is measured in the deterministic rows (rate 0)
    train_drop_paths: tuple[str, ...] = ("0", "recipe")
    dtypes: tuple[str, ...] = ("fp32", "bf16")
    repeats: int = 7  # timed repeats per side; medians reported
    warmup: int = 2
    device: str = "cuda" if torch.cuda.is_available() else "cpu"
    compile: bool = False  # time our model through torch.compile (inductor, frozen weights) against timm eager
    agreement_images: int = 256  # random images for the bf16 top-1 agreement check
    rows: list[dict] = field(default_factory=list)


class _PeakTensorMemory(TorchDispatchMode):
    """Peak bytes of live tensor storages created while active (CPU stand-in for the CUDA allocator's peak)."""

    def __init__(self) -> None:
        super().__init__()
        self.live = 0
        self.peak = 0
        self._seen: set[int] = set()

    def _track(self, t: torch.Tensor) -> None:
        storage = t.untyped_storage()
        ptr = storage.data_ptr()
        if ptr in self._seen or storage.nbytes() == 0:
            return
        self._seen.add(ptr)
        size = storage.nbytes()
        self.live += size
        self.peak = max(self.peak, self.live)
        weakref.finalize(storage, self._free, ptr, size)

    def _free(self, ptr: int, size: int) -> None:
        self._seen.discard(ptr)
        self.live -= size

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):  # type: ignore[no-untyped-def]
        out = func(*args, **(kwargs or {}))
        for t in tree_flatten(out)[0]:
            if isinstance(t, torch.Tensor):
                self._track(t)
        return out


def peak_memory(fn: Callable[[], object], device: str) -> int:
    """Peak bytes allocated while `fn` runs (beyond what was allocated before, on CPU)."""
    if device.startswith("cuda"):
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
        fn()
        torch.cuda.synchronize()
        return torch.cuda.max_memory_allocated() - base
    with _PeakTensorMemory() as tracker:
        fn()
    return tracker.peak


_DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}
_MATMUL_N = 2048  # the ceiling: an n x n matrix multiply
_MATMUL_FLOPS = 2.0 * _MATMUL_N**3


def _sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def interleaved(fns: dict[str, Callable[[], object]], repeats: int, warmup: int, device: str) -> dict[str, float]:
    """Median seconds per call of each function, timed round-robin so that machine noise hits all sides alike; the
    order rotates from round to round, since what ran just before (its caches, its freed memory) affects a call."""
    for _ in range(warmup):
        for fn in fns.values():
            fn()
    times: dict[str, list[float]] = {k: [] for k in fns}
    names = list(fns)
    for r in range(repeats):
        for name in names[r % len(names) :] + names[: r % len(names)]:  # rotated: no side always runs after another
            fn = fns[name]
            _sync(device)
            t0 = time.perf_counter()
            fn()
            _sync(device)
            times[name].append(time.perf_counter() - t0)
    return {k: statistics.median(v) for k, v in times.items()}


def matmul_op(dtype: torch.dtype, device: str) -> Callable[[], object]:
    """A `_MATMUL_N`^3 matrix multiply in `dtype`: the ceiling a row's GFLOP/s is set against."""
    a = torch.randn(_MATMUL_N, _MATMUL_N, device=device, dtype=dtype)
    b = torch.randn(_MATMUL_N, _MATMUL_N, device=device, dtype=dtype)
    return lambda: a @ b


def model_pair(name: str, device: str, drop_path_rate: float = 0.0) -> tuple[nn.Module, nn.Module]:
    """(ours, timm's) with identical random weights and the same stochastic depth (none by default)."""
    import timm

    torch.manual_seed(0)
    theirs = timm.create_model(name, drop_path_rate=drop_path_rate)
    with torch.no_grad():
        for p in theirs.parameters():
            p.add_(torch.randn_like(p) * 0.02)
    ours = gcvit.create_model(name, drop_path_rate=drop_path_rate)
    load_state_dict_into(ours, theirs.state_dict(), "timm")
    return ours.to(device), theirs.to(device)


@contextlib.contextmanager
def _autocast(dtype: str, device: str) -> Iterator[None]:
    if dtype == "bf16":
        with torch.autocast(device_type=device.split(":")[0], dtype=torch.bfloat16):
            yield
    else:
        yield


def _row(cfg: BenchConfig, what: str, batch: int, t: dict[str, float], flops: float) -> dict:
    """t: median seconds of "ours", "timm", "matmul" (the `matmul_op` of the row's dtype) and, where timm was also
    run channels-last, "timm-cl", all timed in the same rounds. The ratio is against timm's faster setting."""
    t_ours, peak = t["ours"], _MATMUL_FLOPS / t["matmul"]
    t_theirs = min(t["timm"], t.get("timm-cl", t["timm"]))
    row = {
        "what": what,
        "batch": batch,
        "ours img/s": batch / t_ours,
        "timm img/s": batch / t_theirs,
        "ratio": t_theirs / t_ours,
        **({"ratio vs timm default": t["timm"] / t_ours} if "timm-cl" in t else {}),
        "ours GFLOP/s": flops * batch / t_ours / 1e9,
        "% of matmul": 100 * flops * batch / t_ours / peak,
        "matmul GFLOP/s": peak / 1e9,
    }
    cfg.rows.append(row)
    return row


def _bf16_agreement(ours: nn.Module, theirs: nn.Module, cfg: BenchConfig, dev: str) -> tuple[float, float, int]:
    """Top-1 agreement (%) of our bf16 logits with timm's bf16 and fp32 logits on `cfg.agreement_images` random
    images (random weights leave the top classes close, so this is a strict test of rounding)."""
    gen = torch.Generator().manual_seed(0)
    same_bf16 = same_fp32 = 0
    for _ in range(cfg.agreement_images // 16):
        x = torch.randn(16, 3, cfg.img_size, cfg.img_size, generator=gen).to(dev)
        ref = theirs(x).argmax(-1)
        with _autocast("bf16", dev):
            mine, theirs_bf16 = ours(x).argmax(-1), theirs(x).argmax(-1)
        same_bf16 += int((mine == theirs_bf16).sum())
        same_fp32 += int((mine == ref).sum())
    n = cfg.agreement_images // 16 * 16
    return 100 * same_bf16 / n, 100 * same_fp32 / n, n


def bench_inference(cfg: BenchConfig, name: str, log: Callable[[str], None]) -> None:
    """Inference throughput at each batch size and dtype; timm's bf16 reference is its faster of plain autocast and
    channels-last plus autocast."""
    dev = cfg.device
    ours, theirs = model_pair(name, dev)
    ours.eval()
    theirs.eval()
    theirs_cl = copy.deepcopy(theirs).to(memory_format=torch.channels_last)  # timm's own setting stays as it is
    flops = 2 * count_macs(ours, (cfg.img_size, cfg.img_size))
    runner = _compiled(ours) if cfg.compile else ours
    x16 = torch.randn(max(cfg.infer_batches), 3, cfg.img_size, cfg.img_size, device=dev)
    matmuls = {k: matmul_op(_DTYPES[k], dev) for k in cfg.dtypes}
    with torch.inference_mode():
        diff = (ours(x16) - theirs(x16)).abs().max().item()
        log(f"{name}: fp32 max abs difference to timm {diff:.2e}")
        same_bf16, same_fp32, n = _bf16_agreement(ours, theirs, cfg, dev)
        log(
            f"{name}: bf16 top-1 agreement with timm in bf16 {same_bf16:.1f}%, with timm in fp32 {same_fp32:.1f}% "
            f"({n} random images)"
        )
        for dtype in cfg.dtypes:
            for batch in cfg.infer_batches:
                x = x16[:batch]
                x_cl = x.contiguous(memory_format=torch.channels_last)

                def run_ours(x: torch.Tensor = x, dtype: str = dtype) -> object:
                    with _autocast(dtype, dev):
                        return runner(x)

                def run_theirs(x: torch.Tensor = x, dtype: str = dtype) -> object:
                    with _autocast(dtype, dev):
                        return theirs(x)

                def run_theirs_cl(x: torch.Tensor = x_cl, dtype: str = dtype) -> object:
                    with _autocast(dtype, dev):
                        return theirs_cl(x)

                sides = {"ours": run_ours, "timm": run_theirs, "matmul": matmuls[dtype]}
                if dtype == "bf16":
                    sides["timm-cl"] = run_theirs_cl
                t = interleaved(sides, cfg.repeats, cfg.warmup, dev)
                what = f"{name} infer {dtype}" + (" compiled" if cfg.compile else "")
                row = _row(cfg, what, batch, t, flops)
                log(_fmt(row))


def _compiled(model: nn.Module) -> Callable[[torch.Tensor], torch.Tensor]:
    """The model through inductor with weights frozen as constants (inference only); compiled on first call."""
    import torch._inductor.config as inductor_config

    inductor_config.freezing = True
    return torch.compile(model)


def _train_step(model: nn.Module, opt: torch.optim.Optimizer, x: torch.Tensor, y: torch.Tensor) -> None:
    loss = nn.functional.cross_entropy(model(x), y)
    loss.backward()
    opt.step()
    opt.zero_grad(set_to_none=True)


def drop_path_rate(name: str, setting: str) -> float:
    """The stochastic depth a training row runs with: `setting` as a number, or "recipe" for the variant's own."""
    if setting == "recipe":
        return resolve_name(name).config.drop_path_rate
    try:
        rate = float(setting)
    except ValueError:
        raise ValueError(f"expected a drop path rate in [0, 1) or 'recipe'; got {setting!r}") from None
    if not 0.0 <= rate < 1.0:
        raise ValueError(f"expected a drop path rate in [0, 1) or 'recipe'; got {setting!r}")
    return rate


def bench_train(cfg: BenchConfig, name: str, log: Callable[[str], None], drop_path: float = 0.0) -> None:
    """Training step (forward, backward, AdamW) in fp32: throughput, and with no stochastic depth peak memory, with
    and without gradient checkpointing on our side. timm runs as created (NCHW) and channels-last (its faster
    setting on CPUs); the ratio is against the faster, and a second ratio against timm as created. With stochastic
    depth both sides draw their own images to drop, so the row's medians average over draws."""
    dev = cfg.device
    ours, theirs = model_pair(name, dev, drop_path)
    theirs_cl = copy.deepcopy(theirs).to(memory_format=torch.channels_last)
    for model in (ours, theirs, theirs_cl):
        model.train()
    opt_ours, opt_theirs, opt_theirs_cl = (
        torch.optim.AdamW(m.parameters(), lr=1e-5) for m in (ours, theirs, theirs_cl)
    )
    flops = 3 * 2 * count_macs(ours, (cfg.img_size, cfg.img_size))  # backward ~ 2x forward
    x = torch.randn(cfg.train_batch, 3, cfg.img_size, cfg.img_size, device=dev)
    x_cl = x.contiguous(memory_format=torch.channels_last)
    y = torch.randint(0, 1000, (cfg.train_batch,), device=dev)
    sides = {
        "ours": lambda: _train_step(ours, opt_ours, x, y),
        "timm": lambda: _train_step(theirs, opt_theirs, x, y),
        "timm-cl": lambda: _train_step(theirs_cl, opt_theirs_cl, x_cl, y),
        "matmul": matmul_op(torch.float32, dev),
    }
    t = interleaved(sides, max(3, cfg.repeats // 2), 1, dev)
    row = _row(cfg, f"{name} train fp32" + (f" dp{drop_path:g}" if drop_path else ""), cfg.train_batch, t, flops)
    if drop_path:
        log(_fmt(row))
        return
    mem_ours = peak_memory(lambda: _train_step(ours, opt_ours, x, y), dev)
    mem_theirs = peak_memory(lambda: _train_step(theirs, opt_theirs, x, y), dev)
    ours.set_grad_checkpointing(True)
    mem_ckpt = peak_memory(lambda: _train_step(ours, opt_ours, x, y), dev)
    mib = 2**20
    row.update({"ours peak MiB": mem_ours / mib, "timm peak MiB": mem_theirs / mib, "ckpt peak MiB": mem_ckpt / mib})
    log(_fmt(row))


def _fmt(row: dict) -> str:
    parts = [f"{row['what']:<29s} b{row['batch']:<3d}"]
    for key, value in row.items():
        if key not in ("what", "batch"):
            parts.append(f"{key} {value:.2f}" if key.startswith("ratio") else f"{key} {value:.1f}")
    return "  ".join(parts)


def run(cfg: BenchConfig, log: Callable[[str], None] = print) -> list[dict]:
    """Run every measurement of `cfg`, logging a line each; returns the rows."""
    torch.manual_seed(0)
    malloc = "freed memory kept (gcvit.allocator)" if freed_memory_kept() else "as the system set it"
    log(f"device {cfg.device}, torch {torch.__version__}, threads {torch.get_num_threads()}, malloc {malloc}")
    log(f"% of matmul: against a {_MATMUL_N}^3 matrix multiply in the row's dtype, timed in the same rounds as the row")
    rates = {name: [drop_path_rate(name, s) for s in cfg.train_drop_paths] for name in cfg.train_models}
    for name in cfg.models:
        bench_inference(cfg, name, log)
    for name, name_rates in rates.items():
        for rate in dict.fromkeys(name_rates):  # each rate once, in the order given
            bench_train(cfg, name, log, rate)
    return cfg.rows
