"""`gcvit compare`: train GC ViT, Swin Transformer and ViT with one recipe and time budget, then measure them alike.

Every model is trained by `gcvit.train.train` with the same TrainConfig (epochs, batch, lr schedule, augmentation,
EMA, seed) and the same wall-clock budget, stopping at the end of the epoch that passes it. On the bundled digits
(32 px) each model is built at its family's digits size (`gcvit.models.registry.digits_overrides`, the
model `gcvit train` uses on the digits); the table states the width and depth each was built with. Then, with the best
(EMA) weights: parameters, GFLOPs (torch's FLOP counter), inference and training-step throughput (all models timed
round-robin, medians), peak memory of a training step, and the attention each model computes.

Writes OUT/compare.md (the table), OUT/compare.png (the chart), OUT/compare.json and one run folder per model
(OUT/runs/NAME, as `gcvit train` writes it).
"""

from __future__ import annotations

import copy
import dataclasses
import json
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from gcvit.bench_timm import interleaved, peak_memory
from gcvit.figures import subplots
from gcvit.flops import count_macs, count_params
from gcvit.models.registry import digits_overrides, family_of
from gcvit.train.distributed import require_cuda

logger = logging.getLogger(__name__)


@dataclass
class CompareConfig:
    models: tuple[str, ...] = ("gcvit_xxtiny", "swin_tiny", "vit_small")
    data: str = "digits"  # 'digits', or a folder of class folders (split by val_fraction)
    time_budget: float = 3.0  # minutes of training per model; stops at the end of the epoch that passes it
    epochs: int = 10  # schedule length (and cap) for every model
    batch_size: int = 64
    img_size: int = 32
    bench_batch: int = 64  # batch of the throughput and memory measurements
    repeats: int = 5  # timed repeats per model (round-robin); medians reported
    seed: int = 0
    out_dir: str = "runs/compare"
    device: str | None = None  # None: cuda when available, else cpu
    size: str = "auto"  # 'digits': each family's 32 px model; 'native': the variant as named; 'auto': digits on digits
    train_overrides: dict[str, Any] = field(default_factory=dict)  # any other TrainConfig field, the same for all


@dataclass
class ModelResult:
    name: str
    built_as: str  # width/depth/window summary of the model as built
    params_m: float
    gflops: float
    infer_img_s: float
    train_img_s: float
    peak_train_mib: float
    epochs: int
    train_min: float
    top1: float  # best validation top-1 (%), of the EMA weights (the recipe's EMA)
    top1_raw: float  # best validation top-1 (%) of the trained weights themselves (EMA lags on short runs)
    query_tokens: str
    kv_tokens: str
    attention_type: str
    coverage: str


COLUMNS = [
    ("model", "name"),
    ("built as", "built_as"),
    ("params (M)", "params_m"),
    ("GFLOPs", "gflops"),
    ("infer img/s", "infer_img_s"),
    ("train img/s", "train_img_s"),
    ("train peak MiB", "peak_train_mib"),
    ("epochs", "epochs"),
    ("train min", "train_min"),
    ("top-1 EMA (%)", "top1"),
    ("top-1 raw (%)", "top1_raw"),
    ("query tokens", "query_tokens"),
    ("key-value tokens", "kv_tokens"),
    ("attention type", "attention_type"),
    ("coverage", "coverage"),
]


def attention_summary(model: nn.Module, img_size: int) -> tuple[str, str, str, str]:
    """(query tokens, key-value tokens, attention type, coverage) of the model's first stage at `img_size`."""
    cfg = model.cfg
    family = type(model).__name__
    if family == "VisionTransformer":
        side = img_size // cfg.patch_size
        n = f"image: {side * side + 1} ({side}x{side} + class)"
        return n, n, "self-attention", "global"
    side = -(-img_size // (cfg.patch_size if family == "SwinTransformer" else 4))
    ws = min(cfg.window_size[0], side)
    window = f"window: {ws * ws} ({ws}x{ws})"
    if family == "SwinTransformer":
        shifted = " shifted every 2nd block" if side > ws else ""
        return window, window + shifted, "self-attention", "local"
    query = f"resized image: {ws * ws} ({side}x{side} map -> {ws}x{ws}); local blocks: window"
    return query, window, "image-window + window self-attention", "global"


def built_as(model: nn.Module) -> str:
    """Width, depth and windows of a built model, in one cell."""
    cfg = model.cfg
    drop = f"drop path {cfg.drop_path_rate:g}"
    if type(model).__name__ == "VisionTransformer":
        return f"C={cfg.embed_dim}, depth {cfg.depth}, heads {cfg.num_heads}, patch {cfg.patch_size}, {drop}"
    depths = "-".join(map(str, cfg.depths))
    windows = "-".join(map(str, cfg.window_size))
    return f"C={cfg.embed_dim}, depths {depths}, windows {windows}, mlp x{cfg.mlp_ratio:g}, {drop}"


def _train_config(cfg: CompareConfig, name: str) -> Any:
    from gcvit.train import TrainConfig

    values = {
        "model": name,
        "img_size": cfg.img_size,
        "epochs": cfg.epochs,
        "batch_size": cfg.batch_size,
        "seed": cfg.seed,
        "time_limit": cfg.time_budget * 60,
        "out_dir": str(Path(cfg.out_dir, "runs", name)),
        "device": cfg.device,
        **cfg.train_overrides,
    }
    if cfg.data == "digits":
        values["data"] = "digits"
    else:
        values.update(data="folder", data_dir=cfg.data)
    if cfg.size not in ("auto", "digits", "native"):
        raise ValueError(f"size must be 'auto', 'digits' or 'native'; got {cfg.size!r}")
    small = cfg.size == "digits" or (cfg.size == "auto" and cfg.data == "digits")
    if small and "model_overrides" not in cfg.train_overrides:
        values["model_overrides"] = digits_overrides(name, cfg.img_size)
    elif not small:
        values.setdefault("model_overrides", {})  # the variant as named, also on the digits
    return TrainConfig(**values)


def _train_all(cfg: CompareConfig, log: Callable[[str], None]) -> dict[str, dict[str, Any]]:
    """Train each model in turn; returns name -> {'epochs', 'minutes', 'top1', 'top1_raw'}."""
    from gcvit.train import train

    out = {}
    for name in cfg.models:
        tc = _train_config(cfg, name)
        log(f"{name}: training for up to {cfg.time_budget:g} min / {cfg.epochs} epochs -> {tc.out_dir}")
        t0 = time.perf_counter()
        result = train(tc)
        minutes = (time.perf_counter() - t0) / 60
        raw = max((row["val_top1"] for row in result.history), default=float("nan"))
        out[name] = {"epochs": result.epochs_done, "minutes": minutes, "top1": result.best_top1, "top1_raw": raw}
        log(f"{name}: {result.epochs_done} epochs in {minutes:.1f} min, best top-1 {result.best_top1:.2f}%")
    return out


def _train_step(model: nn.Module, opt: torch.optim.Optimizer, x: torch.Tensor, y: torch.Tensor) -> None:
    nn.functional.cross_entropy(model(x), y).backward()
    opt.step()
    opt.zero_grad(set_to_none=True)


def _train_repeats(cfg: CompareConfig) -> int:
    """Timed training steps per model: fewer than inference's repeats (a step costs about three forwards)."""
    return max(3, cfg.repeats // 2 + 1)


def _measure(cfg: CompareConfig, models: dict[str, nn.Module], device: str) -> dict[str, dict[str, float]]:
    """Throughput of inference and of a training step (AdamW, fp32), round-robin over the models; peak memory."""
    x = torch.randn(cfg.bench_batch, 3, cfg.img_size, cfg.img_size, device=device)
    infer, steps, trainees = {}, {}, {}
    for name, model in models.items():
        model.eval()
        infer[name] = lambda m=model: m(x)
        trainee = copy.deepcopy(model).train()
        opt = torch.optim.AdamW(trainee.parameters(), lr=1e-6)
        y = torch.randint(0, model.num_classes, (cfg.bench_batch,), device=device)
        trainees[name] = (trainee, opt, y)
        steps[name] = lambda m=trainee, o=opt, y=y: _train_step(m, o, x, y)
    with torch.inference_mode():
        t_infer = interleaved(infer, cfg.repeats, 2, device)
    t_train = interleaved(steps, _train_repeats(cfg), 1, device)
    out = {}
    for name in models:
        trainee, opt, y = trainees[name]
        peak = peak_memory(lambda m=trainee, o=opt, y=y: _train_step(m, o, x, y), device)
        out[name] = {
            "infer_img_s": cfg.bench_batch / t_infer[name],
            "train_img_s": cfg.bench_batch / t_train[name],
            "peak_train_mib": peak / 2**20,
        }
    return out


def run(cfg: CompareConfig, log: Callable[[str], None] = logger.info) -> list[ModelResult]:
    """Train and measure every model of `cfg`; write the table, chart and JSON into cfg.out_dir.

    Raises:
        ValueError: an unknown model name (before any training), or a run folder that already holds a run.
    """
    from gcvit.loading import load
    from gcvit.train.build import run_settings
    from gcvit.train.checkpoint import holds_run

    # everything that can be wrong fails before hours of training
    if not cfg.time_budget > 0:
        raise ValueError(f"expected --time-budget above 0 minutes; got {cfg.time_budget:g}")
    for name in cfg.models:
        family_of(name)
        if holds_run(Path(cfg.out_dir, "runs", name)):
            raise ValueError(f"{Path(cfg.out_dir, 'runs', name)} already holds a run; compare into another --out-dir")
        try:
            run_settings(_train_config(cfg, name))  # its training settings and architecture at this size
        except (TypeError, ValueError) as e:
            raise ValueError(f"{name}: {e}") from None
    if len(set(cfg.models)) != len(cfg.models):
        raise ValueError(f"each model once, please; got {list(cfg.models)}")
    for field_name in ("bench_batch", "repeats"):
        if getattr(cfg, field_name) < 1:
            raise ValueError(f"expected {field_name} of at least 1; got {getattr(cfg, field_name)}")
    if cfg.data != "digits" and not Path(cfg.data).expanduser().is_dir():
        raise ValueError(f"--data {cfg.data}: no such folder; expected 'digits' or a folder of class folders")
    if cfg.device is not None:
        require_cuda(cfg.device)  # a GPU asked for where there is none
    out = Path(cfg.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    device = cfg.device or ("cuda" if torch.cuda.is_available() else "cpu")
    log(f"device {device}, torch {torch.__version__}, threads {torch.get_num_threads()}")
    trained = _train_all(cfg, log)
    models = {name: load(Path(out, "runs", name), device=device) for name in cfg.models}
    measured = _measure(cfg, models, device)
    results = []
    for name, model in models.items():
        query, kv, kind, coverage = attention_summary(model, cfg.img_size)
        results.append(
            ModelResult(
                name=name,
                built_as=built_as(model),
                params_m=count_params(model) / 1e6,
                gflops=count_macs(model, (cfg.img_size, cfg.img_size)) / 1e9,
                epochs=trained[name]["epochs"],
                train_min=trained[name]["minutes"],
                top1=trained[name]["top1"],
                top1_raw=trained[name]["top1_raw"],
                query_tokens=query,
                kv_tokens=kv,
                attention_type=kind,
                coverage=coverage,
                **measured[name],
            )
        )
    write_table(results, cfg, device, out / "compare.md")
    plot(results, out / "compare.png")
    payload = {"config": dataclasses.asdict(cfg), "device": device, "results": [dataclasses.asdict(r) for r in results]}
    (out / "compare.json").write_text(json.dumps(payload, indent=2))
    return results


def _cell(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.3f}" if abs(value) < 1 else f"{value:.1f}"
    return str(value)


def markdown_table(results: list[ModelResult]) -> str:
    """One row per model, every column filled."""
    lines = ["| " + " | ".join(h for h, _ in COLUMNS) + " |", "|" + "|".join("---" for _ in COLUMNS) + "|"]
    for r in results:
        lines.append("| " + " | ".join(_cell(getattr(r, f)) for _, f in COLUMNS) + " |")
    return "\n".join(lines) + "\n"


def write_table(results: list[ModelResult], cfg: CompareConfig, device: str, path: Path) -> None:
    data = f"the bundled digits ({cfg.img_size} px, 10 classes)" if cfg.data == "digits" else f"`{cfg.data}`"
    drop = cfg.train_overrides.get("drop_path")
    drop = "each model's own stochastic depth (built as)" if drop is None else f"drop path {drop:g}"
    notes = (
        f"\nData: {data}. Same recipe for every model: up to {cfg.epochs} epochs, at most {cfg.time_budget:g} min "
        f"of training each (stopping at the end of the epoch that passes it), batch {cfg.batch_size}, seed "
        f"{cfg.seed}, {drop}. top-1: best validation accuracy of the EMA weights (the recipe's choice) and of the "
        f"trained weights themselves (the EMA lags behind on short runs). Throughput: batch {cfg.bench_batch} at "
        f"{cfg.img_size} px on {device} ({torch.get_num_threads()} threads), fp32, medians of {cfg.repeats} "
        f"inference and {_train_repeats(cfg)} training repeats timed round-robin over the models; a training step "
        "is forward, backward and AdamW. Peak MiB: tensor memory of one training step. GFLOPs: multiply-adds per "
        "image. Attention columns: the first (highest-resolution) stage.\n"
    )
    path.write_text(markdown_table(results) + notes)


def plot(results: list[ModelResult], path: Path) -> None:
    """Bar charts side by side: top-1 (EMA and raw weights), inference and training throughput, parameters."""
    panels = [
        ("top1", "val top-1, EMA (%)"),
        ("top1_raw", "val top-1, raw weights (%)"),
        ("infer_img_s", "inference img/s"),
        ("train_img_s", "training img/s"),
        ("params_m", "parameters (M)"),
    ]
    names = [r.name for r in results]
    colors = [f"C{i}" for i in range(len(results))]
    fig, axes = subplots(1, len(panels), figsize=(3.2 * len(panels), 3.2))
    for ax, (key, label) in zip(axes, panels):
        values = [getattr(r, key) for r in results]
        bars = ax.bar(names, values, color=colors)
        ax.bar_label(bars, labels=[_cell(v) for v in values], fontsize=8)
        ax.set_title(label, fontsize=10)
        ax.tick_params(axis="x", labelrotation=30, labelsize=8)
        ax.margins(y=0.15)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
