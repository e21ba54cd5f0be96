"""Resuming a run: what a resumed run may change, the checks before anything is built, and the restore of every
state (weights, optimizer, schedule, scaler, EMA, counters, RNGs) from RUN/last/."""

from __future__ import annotations

import dataclasses
import json
import logging
from pathlib import Path
from typing import TYPE_CHECKING, Any

from gcvit.train import checkpoint as ckpt
from gcvit.train.build import run_settings
from gcvit.train.config import PATH_FIELDS, TrainConfig
from gcvit.train.optim import load_optimizer_state

if TYPE_CHECKING:
    from gcvit.train.loop import Run

logger = logging.getLogger(__name__)

# what a resumed run may change: how long it runs and where, not what it computes
RESUME_MAY_CHANGE = ("epochs", "cooldown_epochs", "time_limit", "num_workers", "device", "out_dir", "strict_data")


def _same_path(key: str, a: Any, b: Any) -> bool:
    """A path field saved relative (by runs from before paths were made absolute) that names the same place."""
    return key in PATH_FIELDS and isinstance(a, str) and isinstance(b, str) and Path(a).resolve() == Path(b).resolve()


def check_resumable(saved: dict[str, Any], cfg: TrainConfig, folder: Path, meta: dict[str, Any]) -> None:
    """Raise a ValueError naming every setting that differs from the checkpoint's, beyond RESUME_MAY_CHANGE: an
    optimizer, schedule and weights restored from the checkpoint would silently keep the old values.
    A `model` and `model_overrides` that spell the checkpoint's architecture differently (the digits model by
    default, or written out from another variant as in configs/digits.yaml before it named gcvit_nano) are no
    change. `meta`: the checkpoint's config.json."""
    saved, now = json.loads(json.dumps(saved)), json.loads(json.dumps(cfg.to_dict()))  # tuples read as lists
    changed = [
        f"{k} ({saved[k]!r} -> {now[k]!r})"
        for k in saved
        if k in now
        and k not in RESUME_MAY_CHANGE
        and saved[k] != now[k]
        and not _same_path(k, saved[k], now[k])
        and not (k in ("model", "model_overrides") and isinstance(cfg, TrainConfig) and _describes(cfg, meta))
    ]
    if changed:
        raise ValueError(
            f"{folder} was trained with other settings: {', '.join(changed)}. A resumed run keeps its settings (it "
            f"may change {', '.join(RESUME_MAY_CHANGE)}); to change the others, start a new run from its weights "
            f"(--pretrained {folder / 'model.safetensors'})"
        )


def check_nothing_to_lose(run_dir: Path) -> None:
    """A resumed run without a complete last/ starts over, which rewrites best/: fine after a crash inside the
    first epoch's checkpoint (best/ holds epoch 1, which the new start redoes), refused otherwise (last/ or its
    state.pt deleted)."""
    best = ckpt.find_checkpoint(run_dir, "best", weights_only=True)
    if best is None:
        return
    epoch = ckpt.read_training_state(best).get("epoch") if (best / ckpt.STATE_FILE).is_file() else None
    if epoch == 1:
        return
    held = f"epoch {epoch}" if epoch is not None else "weights"
    raise ValueError(
        f"{run_dir} has no complete last/ checkpoint (model.safetensors and state.pt) to resume from, but {best} "
        f"holds {held}: starting over would overwrite it. Start a new run from those weights instead "
        f"(--pretrained {best / ckpt.MODEL_FILE} --out-dir ANOTHER_FOLDER)"
    )


def _describes(cfg: TrainConfig, meta: dict[str, Any]) -> bool:
    """Whether cfg's model settings build the architecture a checkpoint's config.json (`meta`) records."""
    try:
        config, _ = run_settings(cfg, num_classes=meta.get("num_classes"))
    except (TypeError, ValueError, OSError):
        return False
    try:
        saved = type(config)(**{k: tuple(v) if isinstance(v, list) else v for k, v in meta["config"].items()})
    except (TypeError, ValueError, KeyError, AttributeError):
        return False
    return _architecture(config) == _architecture(saved)


def _architecture(config: Any) -> dict[str, Any]:
    """A model config as JSON, its global-query pools written out: None (derived from the native size) and the
    derived values build the same modules."""
    spelled = json.loads(json.dumps(dataclasses.asdict(config)))  # tuples read as lists
    if hasattr(config, "pools"):
        spelled["global_query_pools"] = list(config.pools)
    return spelled


def restore(run: Run, folder: Path, meta: dict[str, Any], state: dict[str, Any]) -> None:
    """Continue from checkpoint `folder` (its config.json `meta` and state.pt `state`, already checked with
    `_check_resumable`) on the same classes."""
    saved_classes = meta.get("classes")
    if saved_classes is not None and list(saved_classes) != list(run.classes):
        raise ValueError(
            f"{folder} was trained on the classes {saved_classes}; the data now has {run.classes}. A resumed run "
            f"keeps its classes (its head's outputs are named by them); to train on these, start a new run from its "
            f"weights (--pretrained {folder / ckpt.MODEL_FILE})"
        )
    ckpt.check_digests(folder, state)
    try:
        run.model.load_state_dict(ckpt.read_weights(folder))
    except RuntimeError as e:  # shapes of another architecture: a weights file swapped in by hand
        raise ValueError(
            f"{folder / ckpt.MODEL_FILE} does not fit the model its config.json describes: {str(e).splitlines()[-1]}"
        ) from None
    try:
        load_optimizer_state(run.optimizer, state["optimizer"])
    except ValueError as e:  # e.g. Swin/ViT runs with --layer-decay from before they got one lr level per block
        raise ValueError(
            f"{folder}: its optimizer state does not fit this version's parameter groups ({e}); it cannot resume. "
            f"Start a new run from its weights (--pretrained {folder / ckpt.MODEL_FILE})"
        ) from None
    run.scheduler.load_state_dict(state["scheduler"])
    run.scaler.load_state_dict(state["scaler"])
    if run.ema is not None and state["ema"] is not None:
        run.ema.load_state_dict(state["ema"])
    run.epoch, run.step, run.best, run.history = state["epoch"], state["step"], state["best"], state["history"]
    run.saved = run.epoch
    run.train_loader.generator.set_state(state["loader_generator"])
    rngs = state["rng"]
    ckpt.set_rng_state(rngs[run.info.rank] if len(rngs) == run.info.world_size else rngs[0])
    logger.info("resumed from %s after epoch %d (step %d)", folder, run.epoch, run.step)
