"""Side-by-side speed measurement of this project's GC ViT and timm's, with identical weights and inputs.

Both sides run in one process, interleaved repeat by repeat, and medians are reported, since shared machines are
noisy. Achieved GFLOP/s are set against a matrix multiply timed among each row's interleaved calls, so that a row and
its ceiling see the same machine (on a shared VM the matmul rate itself moves by 2x from minute to minute). Peak
memory is the CUDA allocator's peak on GPU; on CPU it is the peak of the bytes allocated, from the profiler's record of
every allocation and free (untimed runs of the code path that is timed, kernels' own temporaries included).
"""

from __future__ import annotations

import contextlib
import copy
import os
import statistics
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field

import torch
from torch import nn

from gcvit.allocator import freed_memory_kept
from gcvit.flops import count_macs
from gcvit.layers.fused import cpu_has_bf16
from gcvit.models.registry import create_model, resolve_name
from gcvit.models.weights import load_state_dict_into
from gcvit.train.distributed import require_cuda


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
    train_dtypes: tuple[str, ...] = ("fp32",)  # the training step in fp32, or under bf16 autocast
    repeats: int = 7  # timed repeats per side; medians reported
    warmup: int = 2
    device: str = "cuda" if torch.cuda.is_available() else "cpu"
    compile: bool = False  # time our model through torch.compile (inductor, frozen weights) against timm eager
    agreement_images: int = 256  # random images for the bf16 top-1 agreement check
    rows: list[dict] = field(default_factory=list)


@contextlib.contextmanager
def _native_stderr_silenced() -> Iterator[None]:
    """File descriptor 2 to /dev/null while active: the profiler's C++ side logs every start and stop there."""
    sys.stderr.flush()
    saved = os.dup(2)
    try:
        with open(os.devnull, "w") as devnull:
            os.dup2(devnull.fileno(), 2)
        yield
    finally:
        os.dup2(saved, 2)
        os.close(saved)


def peak_memory(fn: Callable[[], object], device: str) -> int:
    """Peak bytes allocated while `fn` runs (beyond what was allocated before, on CPU)."""
    if device.startswith("cuda"):
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
        fn()
        torch.cuda.synchronize()
        return torch.cuda.max_memory_allocated() - base
    with (
        _native_stderr_silenced(),
        torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU], profile_memory=True) as prof,
    ):
        fn()
    events = prof.profiler.kineto_results.events()  # type: ignore[union-attr]
    changes = sorted((e.start_ns(), e.nbytes()) for e in events if e.name() == "[memory]")  # + allocated, - freed
    live = peak = 0
    for _, nbytes in changes:
        live += nbytes
        peak = max(peak, live)
    return peak


_DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}


def matmul_size(device: str) -> int:
    """n of the n x n matrix multiply that is the ceiling: 2048 on CPUs; 8192 on GPUs, where a 2048^3 product
    takes about as long as the synchronisation around it (25 us in bf16 on an H200)."""
    return 2048 if device == "cpu" else 8192


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
    """A `matmul_size`^3 matrix multiply in `dtype`: the ceiling a row's GFLOP/s is set against."""
    n = matmul_size(device)
    a = torch.randn(n, n, device=device, dtype=dtype)
    b = torch.randn(n, n, device=device, dtype=dtype)
    return lambda: a @ b


def model_pair(name: str, device: str, drop_path_rate: float = 0.0) -> tuple[nn.Module, nn.Module]:
    """(ours, timm's) with identical random weights and the same stochastic depth (none by default)."""
    import timm

    torch.manual_seed(0)
    theirs = timm.create_model(name, drop_path_rate=drop_path_rate)
    with torch.no_grad():
        for p in theirs.parameters():
            p.add_(torch.randn_like(p) * 0.02)
    ours = create_model(name, drop_path_rate=drop_path_rate)
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
    """t: median seconds of "ours", "matmul" (the `matmul_op` of the row's dtype) and timm's settings ("timm" as
    created, "timm-cl" channels-last, and in bf16 inference "timm-w"/"timm-cl-w" with weights cast once), all timed in
    the same rounds. The ratio is against timm's fastest setting, and a second one against timm as created."""
    t_ours, peak = t["ours"], 2.0 * matmul_size(cfg.device) ** 3 / t["matmul"]
    settings = {k: v for k, v in t.items() if k.startswith("timm")}
    fastest = min(settings, key=settings.__getitem__)
    t_theirs = settings[fastest]
    row = {
        "what": what,
        "batch": batch,
        "ours img/s": batch / t_ours,
        "timm img/s": batch / t_theirs,
        "ratio": t_theirs / t_ours,
        "ratio vs timm default": t["timm"] / t_ours,
        "timm setting": fastest,
        "ours GFLOP/s": flops * batch / t_ours / 1e9,
        "% of matmul": 100 * flops * batch / t_ours / peak,
        "matmul GFLOP/s": peak / 1e9,
    }
    cfg.rows.append(row)
    return row


def _bf16_agreement(
    ours: Callable[[torch.Tensor], torch.Tensor], theirs: nn.Module, cfg: BenchConfig, dev: str
) -> tuple[float, float, int]:
    """Top-1 agreement (%) of our bf16 logits with timm's bf16 and fp32 logits on `cfg.agreement_images` random
    images (random weights leave the top classes close, so this is a strict test of rounding)."""
    gen = torch.Generator().manual_seed(0)
    same_bf16 = same_fp32 = 0
    n = cfg.agreement_images
    for start in range(0, n, 16):
        x = torch.randn(min(16, n - start), 3, cfg.img_size, cfg.img_size, generator=gen).to(dev)
        ref = theirs(x).argmax(-1)
        with _autocast("bf16", dev):
            mine, theirs_bf16 = ours(x).argmax(-1), theirs(x).argmax(-1)
        same_bf16 += int((mine == theirs_bf16).sum())
        same_fp32 += int((mine == ref).sum())
    return 100 * same_bf16 / n, 100 * same_fp32 / n, n


def _weights_cast_once(model: nn.Module, dtype: torch.dtype) -> nn.Module:
    """A copy of `model` whose linear and convolution weights are stored in `dtype`: under autocast it gives the same
    logits without casting every weight on every call (autocast's own cast cache is off under inference_mode). Our
    side keeps its cast weights between calls, so timm gets the same chance."""
    copied = copy.deepcopy(model)
    for module in copied.modules():
        if isinstance(module, (nn.Linear, nn.Conv2d)):
            module.to(dtype)
    return copied


def bench_inference(cfg: BenchConfig, name: str, log: Callable[[str], None]) -> None:
    """Inference throughput at each batch size and dtype. timm runs as created and channels-last, and in bf16 also
    with its weights cast once (`_weights_cast_once`); the ratio is against its fastest setting. With `cfg.compile`
    our side runs through inductor (frozen weights), and the outputs checked are the compiled model's."""
    dev = cfg.device
    ours, theirs = model_pair(name, dev)
    ours.eval()
    theirs.eval()
    variants = {"timm": theirs, "timm-cl": copy.deepcopy(theirs).to(memory_format=torch.channels_last)}
    if "bf16" in cfg.dtypes:
        variants["timm-w"] = _weights_cast_once(theirs, torch.bfloat16)
        variants["timm-cl-w"] = _weights_cast_once(variants["timm-cl"], torch.bfloat16)
    flops = 2 * count_macs(ours, (cfg.img_size, cfg.img_size))
    x16 = torch.randn(max(cfg.infer_batches), 3, cfg.img_size, cfg.img_size, device=dev)
    matmuls = {k: matmul_op(_DTYPES[k], dev) for k in cfg.dtypes}
    with _inductor_freezing(cfg.compile), torch.inference_mode():
        runner = torch.compile(ours) if cfg.compile else ours
        diff = (runner(x16) - theirs(x16)).abs().max().item()
        log(f"{name}: fp32 max abs difference to timm {diff:.2e}" + (" (compiled)" if cfg.compile else ""))
        if "bf16" in cfg.dtypes:
            same_bf16, same_fp32, n = _bf16_agreement(runner, theirs, cfg, dev)
            log(
                f"{name}: bf16 top-1 agreement with timm in bf16 {same_bf16:.1f}%, with timm in fp32 "
                f"{same_fp32:.1f}% ({n} random images)"
            )
            with _autocast("bf16", dev):
                cast_diff = (variants["timm-w"](x16[:2]) - theirs(x16[:2])).abs().max().item()
            log(f"{name}: timm bf16 with weights cast once vs cast per call: max abs difference {cast_diff:.1e}")
        for dtype in cfg.dtypes:
            for batch in cfg.infer_batches:
                x = x16[:batch]
                x_cl = x.contiguous(memory_format=torch.channels_last)
                sides: dict[str, Callable[[], object]] = {"ours": _forward(runner, x, dtype, dev)}
                for key, model in variants.items():
                    if dtype == "bf16" or not key.endswith("-w"):
                        sides[key] = _forward(model, x_cl if "-cl" in key else x, dtype, dev)
                sides["matmul"] = matmuls[dtype]
                t = interleaved(sides, cfg.repeats, cfg.warmup, dev)
                what = f"{name} infer {dtype}" + (" compiled" if cfg.compile else "")
                row = _row(cfg, what, batch, t, flops)
                log(_fmt(row))


def _forward(model: Callable[[torch.Tensor], object], x: torch.Tensor, dtype: str, dev: str) -> Callable[[], object]:
    def call() -> object:
        with _autocast(dtype, dev):
            return model(x)

    return call


@contextlib.contextmanager
def _inductor_freezing(on: bool) -> Iterator[None]:
    """Inductor with weights frozen as constants (inference only) while active, the setting restored after."""
    if not on:
        yield
        return
    import torch._inductor.config as inductor_config

    with inductor_config.patch(freezing=True):
        yield


def _train_step(
    model: nn.Module, opt: torch.optim.Optimizer, x: torch.Tensor, y: torch.Tensor, dtype: str = "fp32"
) -> None:
    """Forward and loss (under autocast for "bf16"), backward, AdamW step."""
    with _autocast(dtype, x.device.type):
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


def bench_train(
    cfg: BenchConfig, name: str, log: Callable[[str], None], drop_path: float = 0.0, dtype: str = "fp32"
) -> None:
    """Training step (forward, backward, fused AdamW; in fp32, or the forward under bf16 autocast): throughput, and
    with no stochastic depth peak memory, with and without gradient checkpointing on our side. timm runs as created
    (NCHW) and channels-last (its faster setting on CPUs); the ratio is against the faster, and a second ratio against
    timm as created. Our side gets the images channels-last, as `gcvit train`'s loop hands them over (its stem then
    convolves them without a copy). With stochastic depth both sides draw their own images to drop, so the row's
    medians average over draws."""
    dev = cfg.device
    ours, theirs = model_pair(name, dev, drop_path)
    theirs_cl = copy.deepcopy(theirs).to(memory_format=torch.channels_last)
    for model in (ours, theirs, theirs_cl):
        model.train()
    opt_ours, opt_theirs, opt_theirs_cl = (  # fused, as `gcvit train` runs it; a timm user can pass fused=True too
        torch.optim.AdamW(m.parameters(), lr=1e-5, fused=True) for m in (ours, theirs, theirs_cl)
    )
    flops = 3 * 2 * count_macs(ours, (cfg.img_size, cfg.img_size))  # backward ~ 2x forward
    x = torch.randn(cfg.train_batch, 3, cfg.img_size, cfg.img_size, device=dev)
    x_cl = x.contiguous(memory_format=torch.channels_last)
    y = torch.randint(0, 1000, (cfg.train_batch,), device=dev)
    sides = {
        "ours": lambda: _train_step(ours, opt_ours, x_cl, y, dtype),
        "timm": lambda: _train_step(theirs, opt_theirs, x, y, dtype),
        "timm-cl": lambda: _train_step(theirs_cl, opt_theirs_cl, x_cl, y, dtype),
        "matmul": matmul_op(_DTYPES[dtype], dev),
    }
    t = interleaved(sides, max(3, cfg.repeats // 2), 1, dev)
    what = f"{name} train {dtype}" + (f" dp{drop_path:g}" if drop_path else "")
    row = _row(cfg, what, cfg.train_batch, t, flops)
    if drop_path:
        log(_fmt(row))
        return
    mem_ours = peak_memory(lambda: _train_step(ours, opt_ours, x_cl, y, dtype), dev)
    mem_theirs = peak_memory(lambda: _train_step(theirs, opt_theirs, x, y, dtype), dev)
    ours.set_grad_checkpointing(True)
    mem_ckpt = peak_memory(lambda: _train_step(ours, opt_ours, x_cl, y, dtype), dev)
    mib = 2**20
    row.update({"ours peak MiB": mem_ours / mib, "timm peak MiB": mem_theirs / mib, "ckpt peak MiB": mem_ckpt / mib})
    log(_fmt(row))


def _fmt(row: dict) -> str:
    parts = [f"{row['what']:<29s} b{row['batch']:<3d}"]
    for key, value in row.items():
        if key not in ("what", "batch"):
            if isinstance(value, str):
                parts.append(f"{key} {value}")
            else:
                parts.append(f"{key} {value:.2f}" if key.startswith("ratio") else f"{key} {value:.1f}")
    return "  ".join(parts)


def _check(cfg: BenchConfig) -> None:
    """Refuse settings the run would fail on, before any model is built."""
    for name in ("repeats", "train_batch", "agreement_images"):
        if getattr(cfg, name) < 1:
            raise ValueError(f"expected {name} of at least 1; got {getattr(cfg, name)}")
    if cfg.warmup < 0 or not cfg.infer_batches or min(cfg.infer_batches) < 1:
        raise ValueError(f"expected warmup >= 0 and batches >= 1; got {cfg.warmup} and {list(cfg.infer_batches)}")
    if cfg.img_size != 224:
        raise ValueError(f"expected img_size 224, the only size timm's gcvit runs at; got {cfg.img_size}")
    unknown = sorted(set(cfg.dtypes + cfg.train_dtypes) - set(_DTYPES))
    if unknown:
        raise ValueError(f"expected dtypes among {sorted(_DTYPES)}; got {unknown}")
    import timm

    missing = [name for name in dict.fromkeys(cfg.models + cfg.train_models) if not timm.is_model(name)]
    if missing:  # found before the first row, not after minutes of them
        known = ", ".join(timm.list_models("gcvit_*"))
        raise ValueError(f"expected models timm {timm.__version__} has too ({known}); got {missing}")
    require_cuda(cfg.device)  # a device name, and CUDA where it asks for it


def run(cfg: BenchConfig, log: Callable[[str], None] = print) -> list[dict]:
    """Run every measurement of `cfg`, logging a line each; returns the rows."""
    _check(cfg)
    import timm

    torch.manual_seed(0)
    malloc = "freed memory kept (gcvit.allocator)" if freed_memory_kept() else "as the system set it"
    log(
        f"device {cfg.device}, torch {torch.__version__}, timm {timm.__version__}, threads {torch.get_num_threads()}, "
        f"malloc {malloc}"
    )
    if timm.__version__ != _TIMM_REFERENCE:
        log(f"note: the reference is timm {_TIMM_REFERENCE}; other versions may run another GC ViT")
    if cfg.device == "cpu" and not cpu_has_bf16() and "bf16" in cfg.dtypes + cfg.train_dtypes:
        log(
            "note: this CPU has no bf16 kernels (oneDNN needs AVX-512 or AMX): the bf16 rows are left out, bf16 "
            "running 60x slower than fp32 here on both sides"
        )
        cfg.dtypes = tuple(d for d in cfg.dtypes if d != "bf16")
        cfg.train_dtypes = tuple(d for d in cfg.train_dtypes if d != "bf16")
    n = matmul_size(cfg.device)
    log(f"% of matmul: against a {n}^3 matrix multiply in the row's dtype, timed in the same rounds as the row")
    rates = {name: [drop_path_rate(name, s) for s in cfg.train_drop_paths] for name in cfg.train_models}
    with full_fp32(cfg.device, log):
        for name in cfg.models:
            bench_inference(cfg, name, log)
        for name, name_rates in rates.items():
            for dtype in cfg.train_dtypes:
                for rate in dict.fromkeys(name_rates):  # each rate once, in the order given
                    bench_train(cfg, name, log, rate, dtype)
    return cfg.rows


_TIMM_REFERENCE = "1.0.31"  # 1.0.29 and 1.0.30 mis-order the global query for batches above one


@contextlib.contextmanager
def full_fp32(device: str, log: Callable[[str], None]) -> Iterator[None]:
    """On CUDA, TF32 off for matmuls and cuDNN convolutions while active, so that fp32 rows (both sides and the
    matmul ceiling) run in full fp32 alike: by default PyTorch lets cuDNN convolutions use TF32 but not matmuls,
    which would favour whichever side does more of its work in convolutions. Logs the GPU and its software."""
    if not device.startswith("cuda"):
        yield
        return
    index = torch.device(device).index
    log(
        f"GPU {torch.cuda.get_device_name(index)}, CUDA {torch.version.cuda}, cuDNN {torch.backends.cudnn.version()}, "
        "TF32 off for matmuls and convolutions (fp32 rows are full fp32 on both sides)"
    )
    if os.environ.get("TORCH_ALLOW_TF32_CUBLAS_OVERRIDE", "0") not in ("", "0"):
        log("warning: TORCH_ALLOW_TF32_CUBLAS_OVERRIDE is set, so cuBLAS matmuls run in TF32 regardless")
    matmul, cudnn = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    try:
        yield
    finally:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = matmul, cudnn
