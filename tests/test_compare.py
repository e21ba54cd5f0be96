"""`gcvit compare` end to end on a tiny image folder: one row per model, every cell filled, chart and runs written."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from PIL import Image

import gcvit
from gcvit.cli import main
from gcvit.compare_families import attention_summary


def _image_folder(root: Path, per_class: int = 4) -> Path:
    g = torch.Generator().manual_seed(0)
    for label, base in (("dark", 40), ("light", 200)):
        (root / label).mkdir(parents=True)
        for i in range(per_class):
            pixels = (base + torch.randint(-30, 30, (32, 32, 3), generator=g)).clamp(0, 255).to(torch.uint8)
            Image.fromarray(pixels.numpy()).save(root / label / f"{i}.png")
    return root


def test_compare_end_to_end(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    data = _image_folder(tmp_path / "data")
    out = tmp_path / "cmp"
    models = ["gcvit_xxtiny", "swin_tiny", "vit_tiny"]
    argv = ["compare", "--models", *models, "--data", str(data), "--epochs", "1", "--batch-size", "4"]
    argv += ["--bench-batch", "2", "--repeats", "1", "--size", "digits", "--out-dir", str(out), "--drop-path", "0.1"]
    assert main(argv) == 0
    markdown = (out / "compare.md").read_text()
    assert "seed 0, drop path 0.1." in markdown and "medians of 1 inference and 3 training repeats" in markdown
    table = markdown.split("\n")
    header = [c.strip() for c in table[0].strip("|").split("|")]
    assert header[:3] == ["model", "built as", "params (M)"] and "coverage" in header
    rows = [[c.strip() for c in line.strip("|").split("|")] for line in table[2:] if line.startswith("|")]
    assert [r[0] for r in rows] == models
    assert all(len(r) == len(header) and all(r) for r in rows), rows
    assert (out / "compare.png").stat().st_size > 10_000
    results = json.loads((out / "compare.json").read_text())["results"]
    assert [r["epochs"] for r in results] == [1, 1, 1]
    assert all(r["infer_img_s"] > 0 and r["train_img_s"] > 0 and r["peak_train_mib"] > 0 for r in results)
    assert results[1]["built_as"] == "C=32, depths 2-2-2-2, windows 4-4-2-1, mlp x2, drop path 0.1"  # digits-size Swin
    assert all(r["built_as"].endswith("drop path 0.1") for r in results)  # one rate for all (ViT's own is 0)
    assert (out / "runs" / "swin_tiny" / "best").is_dir()
    assert "| vit_tiny |" in capsys.readouterr().out


def test_unknown_model_fails_before_training(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["compare", "--models", "swin_tiny", "vit_smal", "--out-dir", str(tmp_path / "x")]) == 2
    assert "unknown model 'vit_smal'; did you mean vit_small" in capsys.readouterr().err
    assert not (tmp_path / "x").exists()


def test_attention_columns_follow_the_built_model() -> None:
    with torch.device("meta"):
        vit = gcvit.create_model("vit_small", img_size=32, patch_size=4)
        swin = gcvit.create_model("swin_tiny", img_size=32, window_size=(4, 4, 2, 1))
        swin224 = gcvit.create_model("swin_tiny")
        gc = gcvit.create_model("gcvit_xxtiny")
    assert attention_summary(vit, 32) == ("image: 65 (8x8 + class)",) * 2 + ("self-attention", "global")
    assert attention_summary(swin, 32)[1] == "window: 16 (4x4) shifted every 2nd block"
    assert attention_summary(swin224, 224)[1] == "window: 49 (7x7) shifted every 2nd block"
    assert attention_summary(gc, 224)[0] == "resized image: 49 (56x56 map -> 7x7); local blocks: window"


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        (["--bench-batch", "0"], "expected bench_batch of at least 1; got 0"),
        (["--repeats", "0"], "expected repeats of at least 1; got 0"),
        # the second model's architecture refuses the size: found before the first one trains
        (["--models", "gcvit_xxtiny", "vit_small", "--img-size", "34"], "vit_small: ViTConfig.img_size must be a mul"),
        # Swin too: it used to pass the check and fail at its first forward, after GC ViT had trained
        (["--models", "gcvit_xxtiny", "swin_tiny", "--img-size", "34"], "swin_tiny: SwinConfig.img_size must be a mu"),
        (["--drop-path", "1.5"], "swin_tiny: SwinConfig.drop_path_rate must be in [0, 1); got 1.5"),
        (["--batch-size", "0"], "swin_tiny: batch_size must be >= 1, got 0"),
        (["--data", "no/such/folder"], "--data no/such/folder: no such folder; expected 'digits' or a folder of"),
        pytest.param(
            ["--device", "cuda"],
            "device 'cuda': no CUDA device is available here",
            marks=pytest.mark.skipif(torch.cuda.is_available(), reason="a GPU is here"),
        ),
    ],
)
def test_bad_settings_fail_before_training(tmp_path: Path, capsys, extra: list[str], message: str) -> None:
    """Named before anything is trained or written: no --out-dir is made."""
    argv = ["compare", "--models", "swin_tiny", "--epochs", "1", "--out-dir", str(tmp_path / "c"), *extra]
    assert main(argv) == 2
    assert message in capsys.readouterr().err and not (tmp_path / "c").exists()


def test_a_model_that_already_has_a_run_fails_before_training_the_others(tmp_path: Path, capsys) -> None:
    (tmp_path / "runs" / "swin_tiny" / "last").mkdir(parents=True)
    argv = ["compare", "--models", "vit_small", "swin_tiny", "--epochs", "1", "--out-dir", str(tmp_path)]
    assert main(argv) == 2
    assert "runs/swin_tiny already holds a run" in capsys.readouterr().err
    assert not (tmp_path / "runs" / "vit_small").exists()
