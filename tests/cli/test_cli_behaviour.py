"""What the `gcvit` command does for its user: answers at once, stops cleanly, keeps a run's plots, says which
weights it loaded and which files it could not read."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import gcvit
from gcvit.cli import build_parser, main
from gcvit.train.evaluate import evaluate, predict
from gcvit.train.metrics import plot_history
from tests.conftest import randomize_

REPO = Path(__file__).resolve().parents[2]
SHAPES = ["circle", "square", "triangle"]


def _saved(folder: Path, num_classes: int, classes: list[str] | None = None, name: str = "gcvit_nano") -> Path:
    """A random 32 px model saved as a checkpoint folder; returns the folder."""
    torch.manual_seed(0)
    model = gcvit.create_model(name, img_size=32, num_classes=num_classes)
    return randomize_(model).eval().save_pretrained(folder, classes=classes)


def _images(folder: Path, classes: list[str], per_class: int = 3) -> Path:
    rng = np.random.default_rng(0)
    for name in classes:
        (folder / name).mkdir(parents=True)
        for i in range(per_class):
            Image.fromarray(rng.integers(0, 255, (32, 32, 3), dtype=np.uint8)).save(folder / name / f"{i}.png")
    return folder


# (a) --version and --help


@pytest.mark.parametrize("flag", ["--version", "--help"])
def test_version_and_help_answer_without_importing_torch(flag: str) -> None:
    code = (
        "import sys\n"
        "from gcvit.cli import main\n"
        f"try:\n    main([{flag!r}])\nexcept SystemExit as e:\n    assert e.code == 0, e.code\n"
        "assert 'torch' not in sys.modules, 'torch was imported'\n"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO, timeout=60)
    assert done.returncode == 0, done.stderr
    assert ("gcvit 0.1.0" if flag == "--version" else "train or fine-tune a GC ViT") in done.stdout


def test_the_command_list_is_the_same_with_or_without_the_commands_built() -> None:
    """`gcvit --help` lists every command with the help line its module gives when it builds the command."""
    assert build_parser(set()).format_help() == build_parser().format_help()


def test_a_command_builds_its_own_arguments(capsys) -> None:
    with pytest.raises(SystemExit) as stop:
        main(["eval", "--help"])
    assert stop.value.code == 0 and "--out-dir" in capsys.readouterr().out


# (b) Ctrl-C


class _Interrupted(KeyboardInterrupt):
    """As gcvit.train.loop.TrainingInterrupted: the message says where the checkpoint is."""


@pytest.mark.parametrize(
    ("error", "line"),
    [
        (KeyboardInterrupt(), "gcvit: interrupted"),
        (
            _Interrupted(
                "interrupted after epoch 3; checkpoint runs/x/last; resume with `gcvit train --resume runs/x`"
            ),
            "gcvit: interrupted after epoch 3; checkpoint runs/x/last; resume with `gcvit train --resume runs/x`",
        ),
    ],
)
@pytest.mark.parametrize("command", [["models"], ["predict", "x.png", "--model", "m"]])
def test_ctrl_c_ends_any_command_in_one_line_with_status_130(
    command: list[str], error: KeyboardInterrupt, line: str, monkeypatch, capsys
) -> None:
    def interrupted(args: object) -> None:
        raise error

    monkeypatch.setattr("gcvit.cli._models", interrupted)
    monkeypatch.setattr("gcvit.cli.train._predict", interrupted)
    assert main(command) == 130
    captured = capsys.readouterr()
    assert captured.err == line + "\n" and captured.out == ""


# (c) and (d): gcvit eval


def test_eval_on_other_data_keeps_the_runs_own_confusion_matrix(tmp_path: Path, capsys) -> None:
    digits = [str(d) for d in range(10)]
    run = tmp_path / "run"
    _saved(run / "best", 10)
    own = _images(tmp_path / "own_val", digits, per_class=1)
    (run / "config.yaml").write_text(f"data: folder\ntrain_dir: {tmp_path / 'own_train'}\nval_dir: {own}\n")
    (run / "plots").mkdir()
    assert main(["eval", str(run)]) == 0  # the run's own validation data
    plots = run / "plots"
    assert capsys.readouterr().out.splitlines()[-1] == f"confusion matrix: {plots / 'confusion.png'}"
    kept = (plots / "confusion.png").read_bytes()

    faces = _images(tmp_path / "faces", digits, per_class=2)
    assert main(["eval", str(run), "--data", str(faces)]) == 0
    assert main(["eval", str(run), "--data", str(faces), "--val-fraction", "0.5"]) == 0  # its seeded val split
    assert main(["eval", str(run), "--data", "digits", "--val-fraction", "0.05"]) == 0
    assert main(["eval", str(run), "--data", str(faces), "--out-dir", str(tmp_path / "elsewhere")]) == 0
    names = ["confusion.png", "confusion_digits.png", "confusion_faces.png", "confusion_faces_val.png"]
    assert sorted(p.name for p in plots.iterdir()) == names
    assert (plots / "confusion.png").read_bytes() == kept
    assert [p.name for p in (tmp_path / "elsewhere").iterdir()] == ["confusion_faces.png"]


def test_the_confusion_matrix_title_names_the_run_the_data_and_the_weights(tmp_path: Path, monkeypatch) -> None:
    titles: list[str | None] = []
    monkeypatch.setattr("gcvit.train.evaluate.plot_confusion", lambda *a, title=None: titles.append(title))
    run = tmp_path / "faces"
    folder = _saved(run / "best", 10)
    data = _images(tmp_path / "data", [str(d) for d in range(10)], per_class=2)
    evaluate(run, data, out_dir=tmp_path)
    assert titles[-1] == f"{run} · all of {data} · weights (best/)"

    gcvit.save_checkpoint(gcvit.from_pretrained(folder), folder / "ema.safetensors")
    config = json.loads((folder / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps(config | {"weights": "ema.safetensors", "epoch": 31}))
    evaluate(run, data, out_dir=tmp_path, split=True, val_fraction=0.5)
    assert titles[-1] == f"{run} · val split of {data} · EMA weights (best/, epoch 31)"
    evaluate(folder / "model.safetensors", "digits", out_dir=tmp_path, val_fraction=0.05)
    assert titles[-1] == f"{run} · val split of the digits · raw weights (best/, epoch 31)"
    evaluate(folder / "model.safetensors", data, out_dir=tmp_path, title="mine")
    assert titles[-1] == "mine"


@pytest.mark.parametrize(("classes", "shown"), [(SHAPES, False), ([str(d) for d in range(10)], True)])
def test_top5_is_printed_only_above_5_classes(classes: list[str], shown: bool, tmp_path: Path, capsys) -> None:
    run = _saved(tmp_path / "run", len(classes), classes)
    data = _images(tmp_path / "data", classes, per_class=1)
    assert main(["eval", str(run), "--data", str(data)]) == 0
    first = capsys.readouterr().out.splitlines()[0]
    assert first.startswith(f"{len(classes)} images: top-1 ") and ("top-5" in first) == shown, first


def _axes_of(monkeypatch) -> list:
    """The axes of every figure gcvit.train.metrics draws from now on."""
    from gcvit import figures

    drawn = []

    def subplots(*args, **kwargs):
        fig, ax = figures.subplots(*args, **kwargs)
        drawn.append(ax)
        return fig, ax

    monkeypatch.setattr("gcvit.train.metrics.subplots", subplots)
    return drawn


def test_the_accuracy_plot_marks_the_best_epoch_and_drops_top5_for_few_classes(tmp_path: Path, monkeypatch) -> None:
    pytest.importorskip("matplotlib")
    history = [
        {"epoch": e, "train_loss": 1 / e, "val_loss": 1 / e, "val_top1": 50 + e, "val_top5": 100.0, "ema_top1": None}
        for e in range(1, 5)
    ]
    drawn = _axes_of(monkeypatch)
    written = plot_history(tmp_path, history, title="runs/x · val split of the digits", best_epoch=3, num_classes=3)
    assert [p.name for p in written] == ["loss.png", "accuracy.png"]
    loss, accuracy = drawn
    assert loss.get_title() == accuracy.get_title() == "runs/x · val split of the digits"
    labels = accuracy.get_legend_handles_labels()[1]
    assert labels == ["val_top1", "kept in best/ (epoch 3)"]  # no top-5 with 3 classes; no EMA in the history

    drawn.clear()
    plot_history(tmp_path, history)  # positional, as the training loop calls it
    assert drawn[1].get_legend_handles_labels()[1] == ["val_top1", "val_top5"] and drawn[1].get_title() == ""


# (e) gcvit predict


def test_predict_names_unreadable_files_after_the_rest_and_exits_1(tmp_path: Path, capsys) -> None:
    run = _saved(tmp_path / "run", 3, SHAPES)
    good = tmp_path / "good.png"
    Image.new("RGB", (40, 30), (200, 10, 10)).save(good)
    bad = tmp_path / "notes.png"
    bad.write_text("not an image")
    assert main(["predict", str(good), str(bad), "--model", str(run), "--topk", "2"]) == 1
    captured = capsys.readouterr()
    assert captured.out.startswith(f"{good}  ") and str(bad) not in captured.out
    assert captured.err.startswith(f"gcvit: skipped {bad}: not a readable image (")
    assert len(captured.err.strip().splitlines()) == 1 and "Traceback" not in captured.err
    assert main(["predict", str(good), "--model", str(run)]) == 0


def test_predict_hands_skipped_files_to_the_caller_or_logs_them(tmp_path: Path, caplog) -> None:
    run = _saved(tmp_path / "run", 3, SHAPES)
    good, bad = tmp_path / "good.png", tmp_path / "bad.jpg"
    Image.new("RGB", (32, 32)).save(good)
    bad.write_bytes(b"\xff\xd8 truncated")
    skipped: list[tuple[str, str]] = []
    with caplog.at_level("WARNING"):
        out = predict([good, bad], run, skipped=skipped)
    assert [f for f, _ in out] == [str(good)] and [f for f, _ in skipped] == [str(bad)]
    assert "skipped unreadable" not in caplog.text  # the caller reports them
    with caplog.at_level("WARNING"):
        assert predict([good, bad], run) == out
    assert f"skipped unreadable image {bad}" in caplog.text


# (f) data folder flags


@pytest.mark.parametrize(
    ("flags", "message"),
    [
        (["--val-dir", "{tmp}/v"], "--val-dir needs --train-dir (or use --data-dir alone, split by --val-fraction)"),
        (["--train-dir", "{tmp}/t"], "--train-dir needs --val-dir (or use --data-dir alone, split by --val-fraction)"),
        (
            ["--data-dir", "{tmp}/d", "--train-dir", "{tmp}/t"],
            "give --data-dir or --train-dir with --val-dir, not both",
        ),
        (["--data-dir", "{tmp}/d", "--val-dir", "{tmp}/v"], "give --data-dir or --train-dir with --val-dir, not both"),
    ],
)
def test_data_folder_flags_that_do_not_go_together_are_named_as_typed(
    flags: list[str], message: str, tmp_path: Path, capsys
) -> None:
    assert main(["train", *(f.replace("{tmp}", str(tmp_path)) for f in flags)]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"gcvit: error: {message}") and len(err.strip().splitlines()) == 1, err


def test_a_val_dir_flag_may_complete_a_config_files_train_dir(tmp_path: Path) -> None:
    from gcvit.cli.train import _overrides

    (tmp_path / "c.yaml").write_text(f"train_dir: {tmp_path}/t\nval_dir: {tmp_path}/v0\n")
    args = build_parser({"train"}).parse_args(["train", "--config", str(tmp_path / "c.yaml"), "--val-dir", "v1"])
    assert _overrides(args) == {"val_dir": "v1"}


# (g) gcvit export


def test_onnx_export_asks_for_onnxruntime_before_building_anything(tmp_path: Path, monkeypatch, capsys) -> None:
    monkeypatch.setitem(sys.modules, "onnxruntime", None)  # as if the export extra were not installed

    def never(*args: object) -> None:
        raise AssertionError("the model was loaded")

    monkeypatch.setattr("gcvit.cli.export.load_for_export", never)
    out = tmp_path / "m.onnx"
    assert main(["export", "gcvit_xxtiny", "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert "this command needs onnxruntime" in err and "pip install 'gcvit-torch[export]'" in err
    assert len(err.strip().splitlines()) == 1 and not out.exists()


# (h) which weights a checkpoint's loaders take


def _ema_checkpoint(folder: Path, weights: str | None) -> tuple[torch.Tensor, torch.Tensor]:
    """A checkpoint folder with different raw and EMA weights, its config.json naming `weights`; returns the raw
    and EMA head weights."""
    _saved(folder, 3, SHAPES)
    ema = randomize_(gcvit.from_pretrained(folder), scale=0.01)
    gcvit.save_checkpoint(ema, folder / "ema.safetensors")
    config = json.loads((folder / "config.json").read_text())
    if weights is not None:
        config |= {"weights": weights, "epoch": 7, "val_top1": 91.5}
    (folder / "config.json").write_text(json.dumps(config))
    return gcvit.from_pretrained(folder, ema=False).head.weight, ema.head.weight


@pytest.mark.parametrize(("weights", "want"), [("model.safetensors", 0), ("ema.safetensors", 1), (None, 1)])
def test_loaders_take_the_weights_config_json_names(weights: str | None, want: int, tmp_path: Path) -> None:
    heads = _ema_checkpoint(tmp_path / "run" / "best", weights)
    assert torch.equal(gcvit.from_pretrained(tmp_path / "run").head.weight, heads[want])
    model = gcvit.load(tmp_path / "run")
    assert torch.equal(model.head.weight, heads[want])
    assert Path(model.pretrained_cfg.url).name == (weights or "ema.safetensors")
    assert torch.equal(gcvit.from_pretrained(tmp_path / "run", ema=True).head.weight, heads[1])  # asked: as asked
    assert torch.equal(gcvit.load(tmp_path / "run", ema=False).head.weight, heads[0])


def test_a_remote_checkpoint_fetches_only_the_weights_it_names(http_root, cache) -> None:
    root, base = http_root
    raw, _ = _ema_checkpoint(root / "ckpt", "model.safetensors")
    loaded = gcvit.from_pretrained(f"{base}/ckpt/")
    assert torch.equal(loaded.head.weight, raw) and loaded.pretrained_cfg.url == f"{base}/ckpt/model.safetensors"
    assert not list(cache.rglob("ema.safetensors"))  # not downloaded: config.json chose the raw weights
    _, ema = _ema_checkpoint(root / "other", "ema.safetensors")
    assert torch.equal(gcvit.from_pretrained(f"{base}/other").head.weight, ema)


def test_a_weights_entry_naming_another_file_is_refused(tmp_path: Path) -> None:
    _ema_checkpoint(tmp_path / "ckpt", "../../elsewhere.safetensors")
    with pytest.raises(ValueError, match="'weights' must be 'model.safetensors' or 'ema.safetensors'"):
        gcvit.from_pretrained(tmp_path / "ckpt")


# (i) a loaded model's metadata is its own


def test_a_loaded_models_pretrained_cfg_describes_its_own_weights(tmp_path: Path) -> None:
    folder = _saved(tmp_path / "digits", 10, name="gcvit_xxtiny")  # registered with NVIDIA's weights
    config = json.loads((folder / "config.json").read_text())
    del config["license"]  # as `gcvit train` writes config.json (today)
    (folder / "config.json").write_text(json.dumps(config))
    pc = gcvit.from_pretrained(folder).pretrained_cfg
    official = gcvit.create_model("gcvit_xxtiny").pretrained_cfg
    assert pc.url == str(folder / "model.safetensors") and pc.top1 is None and pc.sha256 is None
    assert pc.label_set == "" and pc.num_classes == 10 and pc.img_size == (32, 32)
    assert pc.license == official.license  # kept: the folder does not say whether it descends from NVIDIA's
    assert gcvit.load(folder).pretrained_cfg == pc

    (folder / "config.json").write_text(json.dumps(config | {"license": ""}))  # trained from scratch
    again = gcvit.from_pretrained(folder).save_pretrained(tmp_path / "again")
    assert gcvit.from_pretrained(again).pretrained_cfg.license == ""  # save_pretrained keeps it

    imagenet = gcvit.create_model("gcvit_xxtiny", img_size=32).save_pretrained(tmp_path / "imagenet")
    pc = gcvit.from_pretrained(imagenet).pretrained_cfg
    assert pc.label_set == "imagenet-1k" and pc.top1 is None and pc.license == official.license
