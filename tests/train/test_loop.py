"""gcvit.train.loop: what a run checks before training, each setting followed into training, NaN stops, and a
short digits run reaching 95%."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import pytest
import torch

pytest.importorskip("sklearn")
pytest.importorskip("yaml")

import gcvit
from gcvit.data import DataError
from gcvit.train import TrainConfig, resolve_config, train
from gcvit.train import checkpoint as ckpt
from gcvit.train.evaluate import evaluate, predict
from gcvit.train.optim import build_scheduler
from tests.train.helpers import assert_same_weights, tiny_config

pytestmark = pytest.mark.usefixtures("one_thread")  # one torch thread (tests/conftest.py)


def test_bad_data_fails_before_training(tmp_path: Path) -> None:
    with pytest.raises(DataError, match="does not exist"):
        train(tiny_config(tmp_path, data="folder", data_dir=str(tmp_path / "missing")))
    assert not (tmp_path / "run").exists()  # no empty run folder left behind
    out = tmp_path / "runs" / "a" / "b"  # nor the parents it made
    with pytest.raises(DataError, match="does not exist"):
        train(tiny_config(tmp_path, data="folder", data_dir=str(tmp_path / "missing"), out_dir=str(out)))
    assert sorted(p.name for p in tmp_path.iterdir()) == []
    (tmp_path / "kept").mkdir()  # a folder that was there before stays
    with pytest.raises(DataError, match="does not exist"):
        train(tiny_config(tmp_path, data="folder", data_dir=str(tmp_path / "missing"), out_dir=str(tmp_path / "kept")))
    assert (tmp_path / "kept").is_dir()
    with pytest.raises(DataError, match="does not exist"):  # nor one reached through a '..' after a new folder
        train(
            tiny_config(
                tmp_path, data="folder", data_dir=str(tmp_path / "missing"), out_dir=str(tmp_path / "new/../kept")
            )
        )
    assert (tmp_path / "kept").is_dir()


def test_unusable_class_counts_and_batches_fail_before_training(shapes: Path, tmp_path: Path) -> None:
    one = tmp_path / "one"
    (one / "circle").mkdir(parents=True)
    for f in (shapes / "circle").glob("*.png"):
        (one / "circle" / f.name).write_bytes(f.read_bytes())
    base = {"data": "folder", "epochs": 1, "amp": "none", "out_dir": str(tmp_path / "run")}
    with pytest.raises(DataError, match="at least 2 classes"):
        train(TrainConfig(**base, data_dir=str(one), batch_size=4), progress=False)
    with pytest.raises(ValueError, match=r"num_classes=5 but the data has 3 classes"):
        train(TrainConfig(**base, data_dir=str(shapes), batch_size=4, num_classes=5), progress=False)
    with pytest.raises(DataError, match="make no optimizer step of batch_size 64"):
        train(TrainConfig(**base, data_dir=str(shapes), batch_size=64, grad_accum=8), progress=False)


def test_fp16_on_the_cpu_is_refused_before_anything_is_read_or_written(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="amp='fp16' needs CUDA; use 'bf16' or 'none' on the CPU"):
        train(tiny_config(tmp_path, amp="fp16", device="cpu", data="folder", data_dir=str(tmp_path / "missing")))
    assert not (tmp_path / "run").exists()


def test_cooldown_epochs_run_at_min_lr_after_the_schedule(tmp_path: Path, caplog) -> None:
    """The run lasts epochs + cooldown_epochs; the cooldown's optimizer steps all use min_lr. A warmup longer than
    the run is named in a warning."""
    with caplog.at_level("WARNING", logger="gcvit.train.loop"):
        result = train(tiny_config(tmp_path, epochs=1, cooldown_epochs=1, warmup_epochs=0.5, ema=None, batch_size=256))
    assert result.epochs_done == 2 and [row["epoch"] for row in result.history] == [1, 2]
    assert result.history[1]["lr"] == pytest.approx(1e-5)  # min_lr
    assert "is not below epochs" not in caplog.text
    with caplog.at_level("WARNING", logger="gcvit.train.loop"):
        train(tiny_config(tmp_path, epochs=1, warmup_epochs=3, ema=None, batch_size=256, out_dir=str(tmp_path / "w")))
    assert "warmup_epochs (3) is not below epochs (1)" in caplog.text
    with caplog.at_level("WARNING", logger="gcvit.train.loop"):  # equal: the lr peaks at the very end, no decay
        train(tiny_config(tmp_path, epochs=1, warmup_epochs=1, ema=None, batch_size=256, out_dir=str(tmp_path / "w1")))
    assert "warmup_epochs (1) is not below epochs (1)" in caplog.text


def test_the_loop_follows_each_setting_into_training(tmp_path: Path, monkeypatch) -> None:
    """Settings whose loss no other fast test would see (a mutation review): best/ is chosen on the EMA's accuracy
    with keep_best 'ema' (the spec's), fractional warmup epochs round to steps, each epoch reshuffles (set_epoch),
    gradients are clipped, the mixer smooths labels by label_smoothing, and the time limit stops the run."""
    from gcvit.train import classify
    from gcvit.train.data import _EpochSampler

    calls: dict[str, list] = {"top1": [50.0, 30.0, 40.0, 45.0], "epochs": [], "clip": [], "warmup": [], "smooth": []}

    def validate(model, loader, device, info):  # the model, then the EMA, each epoch
        return {"loss": 1.0, "top1": calls["top1"].pop(0), "top5": 100.0}

    def set_epoch(self, epoch):
        calls["epochs"].append(epoch)
        self.inner.set_epoch(epoch)

    def clip(parameters, max_norm):
        calls["clip"].append(max_norm)

    def scheduler(optimizer, total, warmup, *args, **kwargs):
        calls["warmup"].append((total, warmup))
        return build_scheduler(optimizer, total, warmup, *args, **kwargs)

    def mixer(*args, label_smoothing):
        calls["smooth"].append(label_smoothing)
        return gcvit.data.mixup_cutmix(*args, label_smoothing=label_smoothing)

    monkeypatch.setattr(classify, "validate", validate)
    monkeypatch.setattr(_EpochSampler, "set_epoch", set_epoch)
    monkeypatch.setattr(torch.nn.utils, "clip_grad_norm_", clip)
    monkeypatch.setattr(classify, "build_scheduler", scheduler)
    monkeypatch.setattr(classify, "mixup_cutmix", mixer)
    cfg = tiny_config(
        tmp_path,
        epochs=2,
        batch_size=256,
        warmup_epochs=0.5,
        clip_grad=2.5,
        label_smoothing=0.2,
        ema=0.9,
        keep_best="ema",
    )
    result = train(cfg)
    assert calls["clip"] == [2.5] * 10  # 5 optimizer steps an epoch
    assert calls["warmup"] == [(10, 2)]  # round(0.5 * 5): 2 steps, not int(0.5) * 5 = 0
    assert calls["epochs"] == [0, 1] and calls["smooth"] == [0.2]
    assert result.best_top1 == 45.0 and ckpt.read_training_state(tmp_path / "run" / "best")["epoch"] == 2  # not raw 50
    monkeypatch.undo()
    stopped = train(
        tiny_config(tmp_path, epochs=3, batch_size=256, ema=None, time_limit=1e-9, out_dir=str(tmp_path / "t"))
    )
    assert stopped.epochs_done == 1


def test_nan_loss_stops_with_last_good_checkpoint(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from gcvit.train import classify, loop

    cfg = tiny_config(tmp_path, epochs=1)
    train(cfg)
    good = ckpt.read_weights(tmp_path / "run" / "last")
    monkeypatch.setattr(classify, "soft_cross_entropy", lambda logits, targets: logits.sum() * float("nan"))
    with pytest.raises(loop.NonFiniteLossError, match="last good epoch"):
        train(tiny_config(tmp_path, epochs=2), resume=tmp_path / "run")
    after = ckpt.read_weights(tmp_path / "run" / "last")
    assert all(torch.equal(good[k], after[k]) for k in good)
    with pytest.raises(loop.NonFiniteLossError, match="no epoch had finished, so no checkpoint was written"):
        train(tiny_config(tmp_path, out_dir=str(tmp_path / "fresh")))
    assert not (tmp_path / "fresh" / "last").exists()


def test_weights_gone_nan_on_an_epochs_last_step_are_never_saved(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A step whose gradients are infinite leaves a finite loss behind it; the epoch-end check of the weights stops the
    run before they are checkpointed: last/ keeps epoch 1, and a first epoch writes nothing."""
    from gcvit.train import loop

    train(tiny_config(tmp_path, epochs=1, ema=0.9, clip_grad=None))
    good = ckpt.read_weights(tmp_path / "run" / "last")
    step = loop._optimizer_step

    def poisoned(run: loop.Run) -> None:  # the epoch's last step: no later loss sees the damage
        if (run.step + 1) % len(run.train_loader) == 0:
            next(p for p in run.model.parameters() if p.grad is not None).grad.fill_(float("inf"))
        step(run)

    monkeypatch.setattr(loop, "_optimizer_step", poisoned)
    with pytest.raises(
        loop.NonFiniteLossError, match=r"weights became NaN or infinite during epoch 2 .* keeps epoch 1"
    ):
        train(tiny_config(tmp_path, epochs=2, ema=0.9, clip_grad=None), resume=tmp_path / "run")
    after = ckpt.read_weights(tmp_path / "run" / "last")
    assert all(torch.equal(good[k], after[k]) for k in good)
    assert ckpt.read_training_state(tmp_path / "run" / "last")["epoch"] == 1
    with pytest.raises(loop.NonFiniteLossError, match="during epoch 1 .* no checkpoint was written"):
        train(tiny_config(tmp_path, epochs=1, clip_grad=None, out_dir=str(tmp_path / "fresh")))
    assert not (tmp_path / "fresh" / "last").exists() and not (tmp_path / "fresh" / "best").exists()


def test_digits_quick_run_reaches_95(tmp_path: Path) -> None:
    """The CI-sized digits run: the default small model, a short schedule, >= 95% val top-1."""
    cfg = TrainConfig(epochs=12, out_dir=str(tmp_path / "run"), ema=0.99)
    result = train(cfg)
    assert result.best_top1 >= 95.0, result.history
    run = tmp_path / "run"
    for name in ("last", "best"):
        assert {p.name for p in (run / name).iterdir()} == {
            "model.safetensors",
            "ema.safetensors",
            "config.json",
            "state.pt",
            "SHA256SUMS",
        }
    rows = list(csv.DictReader((run / "metrics.csv").open()))
    assert [int(r["epoch"]) for r in rows] == list(range(1, 13))
    assert set(rows[0]) == {"epoch", "train_loss", "val_loss", "val_top1", "val_top5", "ema_top1", "lr", "epoch_time"}
    assert (run / "plots" / "loss.png").is_file() and (run / "plots" / "accuracy.png").is_file()
    assert resolve_config(run / "config.yaml") == cfg
    config = json.loads((run / "best" / "config.json").read_text())
    assert config["classes"] == [str(d) for d in range(10)] and config["img_size"] == [32, 32]

    model = gcvit.load(run)
    assert model.classes[3] == "3" and not model.training
    report = evaluate(run / "best", "digits", out_dir=tmp_path / "eval")
    assert report.top1 == pytest.approx(result.best_top1)
    assert report.confusion.sum() == 360 and report.confusion_png and report.confusion_png.is_file()
    assert set(report.per_class) == set(model.classes)

    from gcvit.data import DigitsDataset

    val = DigitsDataset("val", 32)
    (tmp_path / "images").mkdir()
    files = []
    for i in range(4):
        val[i][0].save(tmp_path / "images" / f"{i}.png")
        files.append(tmp_path / "images" / f"{i}.png")
    out = predict([tmp_path / "images"], run / "best" / "ema.safetensors", topk=3)
    assert [Path(f).name for f, _ in out] == [f.name for f in files]
    assert all(len(top) == 3 and top[0][1] >= top[1][1] for _, top in out)
    assert sum(top[0][0] == str(val.targets[i]) for i, (_, top) in enumerate(out)) >= 3


def test_crash_between_last_and_best_writes_keeps_best_in_step(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A crash after one of an epoch's two checkpoints (last/, best/) is written and before the other: the resumed run
    still ends with best/ holding the best epoch's weights, as an uninterrupted run does."""
    full = train(tiny_config(tmp_path / "a"))
    metric = [row["ema_top1"] for row in full.history]
    assert metric[1] > metric[0]  # epoch 2 is the best: both checkpoints are written after it

    class Crash(Exception):
        pass

    real, calls = ckpt.write_checkpoint, []

    def crash_on_second_write_of_epoch_2(*args: object, **kw: object) -> Path:
        calls.append(args[1])
        if args[4]["epoch"] == 2 and len(calls) == 4:  # type: ignore[index]
            raise Crash
        return real(*args, **kw)  # type: ignore[arg-type]

    monkeypatch.setattr(ckpt, "write_checkpoint", crash_on_second_write_of_epoch_2)
    with pytest.raises(Crash):
        train(tiny_config(tmp_path / "b"))
    assert sorted(calls[2:]) == ["best", "last"]
    monkeypatch.setattr(ckpt, "write_checkpoint", real)
    resumed = train(tiny_config(tmp_path / "b"), resume=tmp_path / "b" / "run")
    assert resumed.best_top1 == full.best_top1
    assert_same_weights(tmp_path / "a" / "run" / "last", tmp_path / "b" / "run" / "last")
    assert_same_weights(tmp_path / "a" / "run" / "best", tmp_path / "b" / "run" / "best")


@pytest.mark.filterwarnings("ignore::pytest.PytestUnraisableExceptionWarning")  # the lost interrupt, printed
def test_a_ctrl_c_that_python_loses_in_a_finalizer_still_ends_the_run() -> None:
    """Python prints a KeyboardInterrupt raised inside `__del__` as "Exception ignored" and goes on; the loop's
    Ctrl-C guard remembers the press, and its check raises it at the next micro-batch."""
    import gc
    import signal

    from gcvit.train.loop import _CtrlC

    class RaisesInFinalizer:
        def __del__(self) -> None:
            signal.raise_signal(signal.SIGINT)

    before = signal.getsignal(signal.SIGINT)
    with _CtrlC() as ctrl_c:
        RaisesInFinalizer()  # collected at once: the interrupt is raised inside __del__ and lost
        gc.collect()
        assert ctrl_c.pressed
        with pytest.raises(KeyboardInterrupt):
            ctrl_c.check()
    assert signal.getsignal(signal.SIGINT) is before
