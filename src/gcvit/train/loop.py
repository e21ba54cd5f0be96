"""The training loop, one for every task: `train(cfg)` builds everything from a TrainConfig, trains, validates, logs
and checkpoints. What is particular to a kind of training (its data, model, loss and validation) comes from its
`Task` (`gcvit.train.task`; classification: `gcvit.train.classify`); the rest is here.

A run folder RUN (cfg.out_dir) gets config.yaml, metrics.csv, plots/, tb/ (with tensorboard), last/ and best/
(see `gcvit.train.checkpoint`). `train(cfg, resume=True)` continues from RUN/last/ with every RNG state restored,
so that on the CPU the final weights equal those of an uninterrupted run bit for bit.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import math
import os
import signal
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch.optim.swa_utils import AveragedModel

from gcvit.data import DataError
from gcvit.models.folder import EMA_FILE, MODEL_FILE, read_config
from gcvit.train import checkpoint as ckpt
from gcvit.train import distributed as D
from gcvit.train.build import wrap_ddp
from gcvit.train.classify import ClassificationTask
from gcvit.train.config import TrainConfig, load_run_config, save_yaml
from gcvit.train.data import eval_loader, train_loader
from gcvit.train.ema import averaged
from gcvit.train.metrics import TensorBoard, write_csv
from gcvit.train.optim import build_optimizer
from gcvit.train.resume import check_nothing_to_lose, check_resumable, restore
from gcvit.train.task import Task

logger = logging.getLogger(__name__)


class NonFiniteLossError(RuntimeError):
    """The loss or the weights became NaN or infinite; the run stopped and RUN/last/ keeps the last good epoch."""


class TrainingInterrupted(KeyboardInterrupt):
    """Ctrl-C (SIGINT) during a run; its message says after which epoch, where the checkpoint is and how to go on."""


class _CtrlC:
    """Remembers a Ctrl-C as well as raising it. Python raises KeyboardInterrupt wherever the main thread is; in a
    finalizer (`__del__`, a weakref callback) it is printed as "Exception ignored" and lost, and a run once went on
    training after a Ctrl-C that way. The loop calls `check()` after every micro-batch and epoch, so a press it lost
    still ends the run there."""

    def __init__(self) -> None:
        self.pressed = False
        self.previous: Any = None

    def __enter__(self) -> _CtrlC:
        if threading.current_thread() is threading.main_thread():  # signals are the main thread's only
            self.previous = signal.signal(signal.SIGINT, self._handle)
        return self

    def __exit__(self, *exc: object) -> None:
        if self.previous is not None:
            signal.signal(signal.SIGINT, self.previous)

    def _handle(self, signum: int, frame: object) -> None:
        self.pressed = True
        raise KeyboardInterrupt

    def check(self) -> None:
        if self.pressed:
            raise KeyboardInterrupt


@dataclass
class TrainResult:
    run_dir: Path
    epochs_done: int
    best_top1: float  # best val top-1 (%) of the weights best/ keeps
    history: list[dict[str, Any]] = field(default_factory=list)
    best_epoch: int = 0  # the epoch best/ holds
    best_weights: str = ""  # which of its weights files it chose: model.safetensors (raw) or ema.safetensors


@dataclass
class Run:
    """Everything the epoch loop touches."""

    cfg: TrainConfig
    info: D.DistInfo
    model: nn.Module  # the bare model
    net: nn.Module  # the model as trained (DDP-wrapped when distributed)
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LambdaLR
    scaler: torch.amp.GradScaler
    ema: AveragedModel | None
    task: Task
    train_loader: Any
    val_loader: Any
    classes: list[str]
    model_meta: dict[str, Any]
    epoch: int = 0  # epochs completed
    saved: int = 0  # the epoch RUN/last/ holds
    step: int = 0  # optimizer steps done
    best: float = -1.0
    history: list[dict[str, Any]] = field(default_factory=list)
    ctrl_c: _CtrlC = field(default_factory=_CtrlC)  # a Ctrl-C even where Python lost its KeyboardInterrupt


def _check_amp(cfg: TrainConfig, device: torch.device) -> None:
    if cfg.amp == "fp16" and device.type != "cuda":
        raise ValueError("amp='fp16' needs CUDA; use 'bf16' or 'none' on the CPU")


def _micro_batch(cfg: TrainConfig, info: D.DistInfo) -> int:
    per_step = cfg.batch_size // (info.world_size * cfg.grad_accum)
    if per_step * info.world_size * cfg.grad_accum != cfg.batch_size:
        raise ValueError(
            f"batch_size {cfg.batch_size} must divide by processes x grad_accum = {info.world_size} x {cfg.grad_accum}"
        )
    return per_step


def _setup(cfg: TrainConfig, info: D.DistInfo, task: Task, architecture: dict[str, Any] | None = None) -> Run:
    """Data first (data errors surface before any model is built), then model, optimizer, schedule, EMA.
    `architecture`: a resumed run's model config (see `gcvit.train.build`)."""
    data = task.datasets(architecture)
    micro = _micro_batch(cfg, info)
    tl = train_loader(
        data.train,
        micro,
        cfg.seed,
        cfg.num_workers,
        info.rank,
        info.world_size,
        pin_memory=info.device.type == "cuda",
        collate=data.collate,
    )
    vl = eval_loader(data.val, max(micro, 64), cfg.num_workers, info.distributed, collate=data.collate)
    model = task.build_model(data, architecture).to(info.device)
    net = wrap_ddp(model, info) if info.distributed else model
    optimizer = build_optimizer(
        model, cfg.lr, cfg.weight_decay, cfg.layer_decay, decay_bias_tables=cfg.decay_bias_tables
    )
    steps_per_epoch = len(tl) // cfg.grad_accum
    if steps_per_epoch == 0:
        raise DataError(
            f"{len(data.train)} training images make no optimizer step of batch_size {cfg.batch_size} "
            f"({len(tl)} micro-batches per epoch, grad_accum {cfg.grad_accum}): lower --batch-size (batch_size) "
            f"or --grad-accum"
        )
    if info.is_main:
        for line in task.header(model, data, steps_per_epoch, info.device):
            logger.info("%s", line)
    scheduler = task.scheduler(optimizer, steps_per_epoch)
    scaler = torch.amp.GradScaler(info.device.type, enabled=cfg.amp == "fp16")
    ema = averaged(model, cfg.ema, cfg.ema_warmup) if cfg.ema else None
    task.start(data)
    torch.manual_seed(cfg.seed + info.rank)  # drop path and mixing differ between ranks
    return Run(
        cfg,
        info,
        model,
        net,
        optimizer,
        scheduler,
        scaler,
        ema,
        task,
        tl,
        vl,
        data.classes,
        task.checkpoint_config(model, data),
    )


def _state(run: Run) -> dict[str, Any]:
    """state.pt: everything besides the weights that a resumed run needs, RNG states of every rank included."""
    rngs = [ckpt.rng_state()]
    if run.info.distributed:
        rngs = [None] * run.info.world_size
        torch.distributed.all_gather_object(rngs, ckpt.rng_state())
    return {
        "epoch": run.epoch,
        "step": run.step,
        "best": run.best,
        "history": run.history,
        "optimizer": run.optimizer.state_dict(),
        "scheduler": run.scheduler.state_dict(),
        "scaler": run.scaler.state_dict(),
        "ema": run.ema.state_dict() if run.ema is not None else None,
        "rng": rngs,
        "sampler": {"seed": run.cfg.seed, "epoch": run.epoch},
        "loader_generator": run.train_loader.generator.get_state(),
        "config": run.cfg.to_dict(),
    }


def kept_weights(
    row: dict[str, Any], keep_best: str, metric: str = "val_top1", ema_metric: str = "ema_top1"
) -> tuple[str, float]:
    """(weights file, its val top-1) that a checkpoint of an epoch's history `row` offers its loaders: the EMA's
    with keep_best 'ema' (the official recipe, as NVIDIA's train.py chooses), else the better of the raw and the
    EMA weights (the EMA on a tie). An EMA lags far behind on short runs (68% against the raw weights' 82% on a
    user's 480 photo crops); on long ones it is usually the better."""
    ema = row.get(ema_metric)
    if ema is not None and (keep_best == "ema" or ema >= row[metric]):
        return EMA_FILE, ema
    return MODEL_FILE, row[metric]


def best_epoch(
    history: list[dict[str, Any]], keep_best: str, metric: str = "val_top1", ema_metric: str = "ema_top1"
) -> tuple[int, str, float]:
    """(epoch, weights file, metric) of the checkpoint in best/: the first epoch of the highest kept metric (val
    top-1 for classification)."""
    best = (0, "", -1.0)
    for row in history:
        weights, top1 = kept_weights(row, keep_best, metric, ema_metric)
        if top1 > best[2]:
            best = (row["epoch"], weights, top1)
    return best


def _save(run: Run, run_dir: Path, is_best: bool, kept: dict[str, Any]) -> None:
    """Write last/ (and best/): `kept` (the chosen weights file, epoch and its val top-1) goes into config.json."""
    state = _state(run)  # collective under DDP: every rank takes part
    if not run.info.is_main:
        return
    ema_sd = run.ema.module.state_dict() if run.ema is not None else None
    # best/ first: a crash between the two leaves last/ at the previous epoch, so the resumed run redoes this epoch and
    # writes best/ again (the other order would leave best/ behind for good, its epoch already counted in last/).
    for name in ("best", "last") if is_best else ("last",):
        ckpt.write_checkpoint(run_dir, name, run.model.state_dict(), run.model_meta | kept, state, ema_sd)


def _check_finite(loss: torch.Tensor, run: Run, run_dir: Path) -> None:
    if D.any_rank(not bool(torch.isfinite(loss)), run.info):
        kept = (
            f"{run_dir / 'last'} keeps the last good epoch ({run.epoch})"
            if run.epoch
            else "no epoch had finished, so no checkpoint was written"
        )
        raise NonFiniteLossError(
            f"the training loss became {loss.item()} at epoch {run.epoch + 1}, step {run.step}; stopped. "
            f"{kept}. Try a lower lr, amp='none' or clip_grad."
        )


def _check_finite_weights(run: Run, run_dir: Path) -> None:
    """The loss is checked before each backward; a step whose gradients overflowed (the epoch's last, say) shows only
    in the weights. They are checked before every checkpoint, so that last/ and best/ never hold NaN."""
    weights = [p.detach() for p in run.model.parameters()]
    finite = bool(torch.stack([torch.isfinite(w).all() for w in weights]).all()) if weights else True
    if D.any_rank(not finite, run.info):
        kept = f"{run_dir / 'last'} keeps epoch {run.epoch - 1}" if run.epoch > 1 else "no checkpoint was written"
        raise NonFiniteLossError(
            f"the weights became NaN or infinite during epoch {run.epoch} (at step {run.step} or before); stopped "
            f"before saving them. {kept}. Try a lower lr, amp='none' or clip_grad."
        )


def _optimizer_step(run: Run) -> None:
    if run.cfg.clip_grad is not None:
        run.scaler.unscale_(run.optimizer)
        nn.utils.clip_grad_norm_(run.model.parameters(), run.cfg.clip_grad)
    run.scaler.step(run.optimizer)
    run.scaler.update()
    run.optimizer.zero_grad(set_to_none=True)
    run.scheduler.step()
    if run.ema is not None:
        run.ema.update_parameters(run.model)
    run.step += 1


def _train_epoch(run: Run, run_dir: Path, bar: Any) -> float:
    """One epoch; returns the mean training loss over all ranks."""
    cfg, dev = run.cfg, run.info.device
    run.net.train()
    run.train_loader.sampler.set_epoch(run.epoch)
    total, count = 0.0, 0
    steps = len(run.train_loader) // cfg.grad_accum
    t0 = time.perf_counter()
    for i, batch in enumerate(run.train_loader):
        if i >= steps * cfg.grad_accum:
            break  # an incomplete accumulation at the end of the epoch is skipped
        last_micro = (i + 1) % cfg.grad_accum == 0
        sync = contextlib.nullcontext() if last_micro or not run.info.distributed else run.net.no_sync()
        with sync:
            loss, n = run.task.loss(run.net, batch, dev)
            _check_finite(loss, run, run_dir)
            run.ctrl_c.check()
            run.scaler.scale(loss / cfg.grad_accum).backward()
        if last_micro:
            _optimizer_step(run)
        total, count = total + loss.item() * n, count + n
        if bar is not None:
            rate = count * run.info.world_size / (time.perf_counter() - t0)
            bar.set_postfix(
                loss=f"{loss.item():.3f}",
                lr=f"{run.optimizer.param_groups[-1]['lr']:.2e}",
                img_s=f"{rate:.0f}",
                refresh=False,
            )
            bar.update(1)
    total, count = D.all_reduce_sum([total, float(count)], run.info)
    return total / max(count, 1)


def _epoch_end(run: Run, run_dir: Path, train_loss: float, seconds: float, tb: TensorBoard | None) -> dict[str, Any]:
    """Validate (and the EMA), checkpoint, then log: the checkpoint holds the history up to this epoch."""
    task = run.task
    val = task.validate(run.model, run.val_loader, run.info)
    ema = task.validate(run.ema.module, run.val_loader, run.info) if run.ema is not None else None
    run.epoch += 1
    row = {
        "epoch": run.epoch,
        "train_loss": train_loss,
        **task.row(val, ema),
        "lr": run.optimizer.param_groups[-1]["lr"],
        "epoch_time": seconds,
    }
    run.history.append(row)
    _check_finite_weights(run, run_dir)
    weights, metric = kept_weights(row, run.cfg.keep_best, task.metric, task.ema_metric)
    is_best = metric > run.best
    run.best = max(run.best, metric)
    _save(run, run_dir, is_best, {"weights": weights, "epoch": run.epoch, task.metric: metric})
    run.saved = run.epoch
    if run.info.is_main:
        write_csv(run_dir / "metrics.csv", run.history)
        _plot(run, run_dir)
        if tb is not None:
            tb.log(row)
    return row


def _plot(run: Run, run_dir: Path) -> None:
    epoch, weights, _ = best_epoch(run.history, run.cfg.keep_best, run.task.metric, run.task.ema_metric)
    run.task.plot(run_dir, run.history, (epoch, weights))


def _progress_bar(run: Run, enabled: bool) -> Any:
    if not (enabled and run.info.is_main):
        return None
    from tqdm import tqdm

    steps = len(run.train_loader) // run.cfg.grad_accum * run.cfg.grad_accum
    total = run.cfg.epochs + run.cfg.cooldown_epochs
    return tqdm(total=steps, desc=f"epoch {run.epoch + 1}/{total}", unit="it", leave=False, dynamic_ncols=True)


def train(cfg: TrainConfig | None = None, *, resume: str | Path | None = None, progress: bool = False) -> TrainResult:
    """Train a GC ViT as `cfg` says, or continue the run in folder `resume` (its saved config is used when cfg is
    None). Under torchrun every process calls this; rank 0 writes files.

    Args:
        cfg: the configuration; None with `resume` reads RUN/config.yaml.
        resume: a run folder to continue from its last complete checkpoint.
        progress: show tqdm progress bars (loss, lr, img/s, ETA) on rank 0.

    Returns:
        The run folder, epochs done, the best top-1 and the per-epoch history.

    Raises:
        DataError: unusable data (before any training). NonFiniteLossError: the loss became NaN or infinite.
    """
    if cfg is None:
        if resume is None:
            raise ValueError("train() needs a TrainConfig, or resume= a run folder")
        cfg = _saved_config(resume)
    run_dir = Path(resume) if resume is not None else Path(cfg.out_dir)
    if resume is not None:  # a resumed run continues in its own folder, wherever it was first written
        cfg = dataclasses.replace(cfg, out_dir=str(run_dir))
    info = D.setup(cfg.device)
    try:
        return _train(cfg, info, run_dir, resume is not None, progress)
    finally:
        D.cleanup(info)


def _train(cfg: TrainConfig, info: D.DistInfo, run_dir: Path, resuming: bool, progress: bool) -> TrainResult:
    _check_amp(cfg, info.device)  # before the data is read and anything is written
    if not resuming and ckpt.holds_run(run_dir):
        raise ValueError(
            f"{run_dir} already holds a run's checkpoints; continue it with --resume {run_dir}, "
            "or train into another --out-dir"
        )
    created = _missing_folders(run_dir) if info.is_main else []
    if info.is_main:
        run_dir.mkdir(parents=True, exist_ok=True)
        ckpt.clean_stale(run_dir)
    D.barrier(info)
    try:
        return _train_in(cfg, info, run_dir, resuming, progress)
    except BaseException:
        for folder in created:  # a run that failed before writing anything leaves no empty folders behind
            try:
                folder.rmdir()
            except OSError:  # not empty (or gone): it holds what the run wrote, and so do its parents
                break
        raise


def _missing_folders(path: Path) -> list[Path]:
    """The folders that `path.mkdir(parents=True)` would create, deepest first. The path is made absolute and
    normalised first, so that a '..' in it never leads to an existing folder (mkdir may then create one more, which
    stays)."""
    path = Path(os.path.abspath(path))
    missing = []
    while not path.exists() and path != path.parent:
        missing.append(path)
        path = path.parent
    return missing


def _train_in(cfg: TrainConfig, info: D.DistInfo, run_dir: Path, resuming: bool, progress: bool) -> TrainResult:
    task = task_for(cfg)
    for warning in task.warnings() if info.is_main else ():
        logger.warning("%s", warning)
    found = ckpt.find_checkpoint(run_dir) if resuming else None
    if resuming and found is None:
        check_nothing_to_lose(run_dir)
        logger.info("no complete checkpoint in %s: starting from scratch", run_dir)
    meta = state = None
    if found is not None:  # settings checked before the model is built: another family would not build
        meta, state = read_config(found), ckpt.read_training_state(found)
        check_resumable(state.get("config", {}), cfg, found, meta)
    run = _setup(cfg, info, task, meta.get("config") if meta is not None else None)
    if found is not None:
        restore(run, found, meta, state)
    if info.is_main:
        save_yaml(cfg, run_dir / "config.yaml")
        if run.history:  # as the checkpoint has it: a kill between checkpoint and CSV left them an epoch behind
            write_csv(run_dir / "metrics.csv", run.history)
            _plot(run, run_dir)
    tb = TensorBoard(run_dir / "tb") if info.is_main else None
    start, first_epoch = time.perf_counter(), run.epoch
    try:
        with run.ctrl_c:
            _epochs(run, run_dir, progress, tb, start, first_epoch)
    except KeyboardInterrupt:
        raise TrainingInterrupted(_interrupted(run, run_dir)) from None
    finally:
        if tb is not None:
            tb.close()
    epoch, weights, _ = best_epoch(run.history, cfg.keep_best, task.metric, task.ema_metric)
    return TrainResult(run_dir, run.epoch, run.best, run.history, epoch, weights)


def _epochs(run: Run, run_dir: Path, progress: bool, tb: TensorBoard | None, start: float, first_epoch: int) -> None:
    """The epochs left, each ending with validation, a checkpoint and its log line; a Ctrl-C ends them after a
    micro-batch or an epoch."""
    cfg = run.cfg
    while run.epoch < cfg.epochs + cfg.cooldown_epochs:
        bar = _progress_bar(run, progress)
        t0 = time.perf_counter()
        train_loss = _train_epoch(run, run_dir, bar)
        if bar is not None:
            bar.close()
        row = _epoch_end(run, run_dir, train_loss, time.perf_counter() - t0, tb)
        _log_epoch(row, run, start, first_epoch)
        run.ctrl_c.check()
        if cfg.time_limit is not None and time.perf_counter() - start > cfg.time_limit:
            logger.info("time limit of %.0f s reached after epoch %d", cfg.time_limit, run.epoch)
            break


def task_for(cfg: Any) -> Task:
    """The task a config trains: detection for a `DetectConfig`, segmentation for a `SegmentConfig`, classification
    for a `TrainConfig`."""
    from gcvit.train.detection import DetectConfig, DetectionTask
    from gcvit.train.segmentation import SegmentationTask, SegmentConfig

    if isinstance(cfg, DetectConfig):
        return DetectionTask(cfg)
    return SegmentationTask(cfg) if isinstance(cfg, SegmentConfig) else ClassificationTask(cfg)


def _saved_config(run_dir: str | Path) -> Any:
    """The config a run folder's config.yaml holds, of its task."""
    from gcvit.train.config import read_yaml
    from gcvit.train.detection import detect_config_from
    from gcvit.train.segmentation import segment_config_from

    values = read_yaml(Path(run_dir) / "config.yaml", check=False)
    if values.get("task") == "detection":
        return detect_config_from(values)
    return segment_config_from(values) if values.get("task") == "segmentation" else load_run_config(run_dir)


def _interrupted(run: Run, run_dir: Path) -> str:
    """The one line a Ctrl-C ends with."""
    if run.saved == 0:
        return "interrupted during epoch 1; no checkpoint was written (start again with the same command)"
    return (
        f"interrupted after epoch {run.saved}; checkpoint {run_dir / 'last'}; resume with "
        f"`{run.task.command} --resume {run_dir}`"
    )


def _log_epoch(row: dict[str, Any], run: Run, start: float, first_epoch: int) -> None:
    if not run.info.is_main:
        return
    total = run.cfg.epochs + run.cfg.cooldown_epochs
    eta = (time.perf_counter() - start) / max(1, run.epoch - first_epoch) * (total - run.epoch)
    logger.info(
        "epoch %d/%d  train_loss %.4f  %s  lr %.2e  %.1fs  eta %s",
        row["epoch"],
        total,
        row["train_loss"],
        run.task.log_fields(row),
        row["lr"],
        row["epoch_time"],
        _fmt_time(eta) if math.isfinite(eta) else "?",
    )


def _fmt_time(seconds: float) -> str:
    m, s = divmod(int(seconds), 60)
    h, m = divmod(m, 60)
    return f"{h}:{m:02d}:{s:02d}" if h else f"{m}:{s:02d}"
