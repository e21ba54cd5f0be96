"""gcvit.train.evaluate: eval and predict on a run, a digits checkpoint fine-tuned on a 3-class folder included."""

from __future__ import annotations

import itertools
import re
import shutil
from pathlib import Path

import pytest
import torch

pytest.importorskip("sklearn")
pytest.importorskip("yaml")

import gcvit
from gcvit.data import split_image_folder
from gcvit.models.folder import read_config
from gcvit.train import checkpoint as ckpt
from gcvit.train.evaluate import evaluate, predict
from tests.train.helpers import SHAPES, run_gcvit, run_train

pytestmark = pytest.mark.usefixtures("one_thread")  # one torch thread (tests/conftest.py)


def _predictions(stdout: str) -> list[tuple[str, list[tuple[str, float]]]]:
    """`gcvit predict` lines: FILE  label:p  label:p ..."""
    out = []
    for line in stdout.splitlines():
        file, *pairs = line.split("  ")
        out.append((file, [(label, float(p)) for label, p in (pair.rsplit(":", 1) for pair in pairs)]))
    return out


def test_fine_tune_digits_run_on_three_classes_then_eval_and_predict(
    uninterrupted: Path, shapes: Path, tmp_path: Path
) -> None:
    """One command fine-tunes a 10-class digits checkpoint on a 3-class folder; eval and predict take the new run."""
    pretrained = uninterrupted / "best" / "model.safetensors"
    run = tmp_path / "finetune"
    done = run_train(
        run, "--pretrained", str(pretrained), "--data-dir", str(shapes), "--batch-size", "8", "--epochs", "1"
    )
    assert done.returncode == 0, done.stderr
    assert "done: 1 epochs" in done.stdout
    config = read_config(run / "best")
    assert config["classes"] == list(SHAPES) and config["num_classes"] == 3
    new, old = ckpt.read_weights(run / "last"), ckpt.read_weights(uninterrupted / "best")
    assert new["head.weight"].shape[0] == 3 and old["head.weight"].shape[0] == 10
    assert new["head.bias"].shape == (3,)
    assert new.keys() == old.keys()
    # the backbone starts from the digits weights: 3 small warm-up steps move it far less than digits training did
    arch = read_config(uninterrupted / "best")["config"]
    torch.manual_seed(0)  # the digits run's initial weights (seed 0)
    fresh = gcvit.create_model("gcvit_xxtiny", **arch).state_dict()
    backbone = [k for k in new if not k.startswith("head.")]
    moved = max((new[k] - old[k]).abs().max().item() for k in backbone)
    trained = max((old[k] - fresh[k]).abs().max().item() for k in backbone)
    assert moved < 0.01 < trained, (moved, trained)

    own = run_gcvit("eval", str(run))  # no --data: the run's own seeded validation split, as trained
    assert own.returncode == 0, own.stderr
    assert 0 < int(own.stdout.split()[0]) < 33  # of the 33 readable shapes

    # the same folder under --data with a split asked for: the run's own split, not all 36 images
    split = run_gcvit("eval", str(run), "--data", str(shapes), "--val-fraction", "0.2", "--seed", "0")
    assert split.returncode == 0, split.stderr
    assert split.stdout.splitlines()[0] == own.stdout.splitlines()[0]

    evaluated = run_gcvit("eval", str(run), "--data", str(shapes))
    assert evaluated.returncode == 0, evaluated.stderr
    lines = evaluated.stdout.splitlines()
    assert re.fullmatch(r"36 images: top-1 \d+\.\d\d%", lines[0]), lines[0]  # 3 classes: no top-5
    assert [line.split()[0] for line in lines[1:4]] == list(SHAPES)
    assert "skipped 3 unreadable image files" in evaluated.stderr

    predicted = run_gcvit("predict", str(shapes / "circle"), "--model", str(run))
    assert predicted.returncode == 0, predicted.stderr
    out = _predictions(predicted.stdout)
    assert sorted(Path(f).name for f, _ in out) == sorted(p.name for p in (shapes / "circle").iterdir())
    for _, top in out:
        assert sorted(label for label, _ in top) == list(SHAPES)
        assert top[0][1] >= top[1][1] >= top[2][1] and sum(p for _, p in top) == pytest.approx(1, abs=0.01)


def test_digits_command_then_predict_with_run(uninterrupted: Path, tmp_path: Path) -> None:
    folder = tmp_path / "digits"
    wrote = run_gcvit("digits", "--out", str(folder), "--count", "5")
    assert wrote.returncode == 0, wrote.stderr
    assert f"wrote 5 held-out digits to {folder}" in wrote.stdout
    files = sorted(folder.iterdir())
    assert len(files) == 5 and all(f.suffix == ".png" for f in files)

    predicted = run_gcvit("predict", str(folder), "--model", str(uninterrupted))
    assert predicted.returncode == 0, predicted.stderr
    out = _predictions(predicted.stdout)
    assert [Path(f) for f, _ in out] == files
    digits = [str(d) for d in range(10)]
    for _, top in out:
        assert len(top) == 5 and len({label for label, _ in top}) == 5 and all(label in digits for label, _ in top)
        assert all(a[1] >= b[1] for a, b in itertools.pairwise(top))
    correct = sum(top[0][0] == Path(f).stem.rsplit("_", 1)[1] for f, top in out)
    assert correct >= 3, predicted.stdout


def test_predict_refuses_bad_topk_and_folders_without_images(uninterrupted: Path, tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="expected topk of at least 1; got 0"):
        predict([tmp_path], uninterrupted, topk=0)
    for size in (0, -1):  # -1 used to claim the folder held no readable images, 0 failed inside range()
        with pytest.raises(ValueError, match=f"expected batch_size of at least 1; got {size}"):
            predict([tmp_path], uninterrupted, batch_size=size)
    with pytest.raises(ValueError, match="no readable images in"):
        predict([tmp_path], uninterrupted)


def test_eval_checks_its_settings_before_reading_any_image(tmp_path: Path) -> None:
    """A bad batch size or split share is named first: before the model is loaded and every image decoded (hours
    on ImageNet), not after."""
    missing = tmp_path / "no_such_run"
    with pytest.raises(ValueError, match="expected batch_size of at least 1; got 0"):
        evaluate(missing, "digits", batch_size=0)
    with pytest.raises(ValueError, match=r"val_fraction must be in \(0, 1\), got 1.5"):
        evaluate(missing, tmp_path, split=True, val_fraction=1.5)
    with pytest.raises(ValueError, match=r"val_fraction must be in \(0, 1\), got 1.5"):
        split_image_folder(missing, 1.5)


def test_predict_lists_a_folder_as_training_does(uninterrupted: Path, tmp_path: Path) -> None:
    """Linked folders are followed; hidden files and folders (.ipynb_checkpoints, macOS ._ files) are skipped."""
    from PIL import Image

    real = tmp_path / "real"
    (real / ".ipynb_checkpoints").mkdir(parents=True)
    for i in range(2):
        Image.new("RGB", (8, 8), (40 * i, 0, 0)).save(real / f"d{i}.png")
    Image.new("RGB", (8, 8)).save(real / ".ipynb_checkpoints" / "d0-checkpoint.png")
    (real / "._d0.png").write_bytes(b"\x00\x05\x16\x07 AppleDouble")
    given = tmp_path / "given"
    given.mkdir()
    (given / "linked").symlink_to(real, target_is_directory=True)
    (given / "one.png").symlink_to(real / "d0.png")
    names = sorted(str(Path(path).relative_to(given)) for path, _ in predict([given], uninterrupted))
    assert names == ["linked/d0.png", "linked/d1.png", "one.png"]


def test_eval_reads_a_run_whose_training_state_was_deleted(uninterrupted: Path, tmp_path: Path) -> None:
    """Deleting state.pt (the optimizer's moments, twice the weights' size) to save space leaves a run that still
    evaluates and predicts with its best/ weights; a run without weights is named."""

    run = tmp_path / "run"
    shutil.copytree(uninterrupted, run)
    for name in ("best", "last"):
        (run / name / "state.pt").unlink()
    model = gcvit.load(run)
    reference = gcvit.load(uninterrupted)
    x = torch.randn(2, 3, *model.pretrained_cfg.img_size)
    with torch.no_grad():
        assert torch.equal(model(x), reference(x))
    for name in ("best", "last"):
        (run / name / "model.safetensors").unlink()
    with pytest.raises(FileNotFoundError, match=r"holds no checkpoint \(best/ or last/ with model.safetensors"):
        gcvit.load(run)
