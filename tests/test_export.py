"""gcvit export: ONNX (through onnxruntime) and torch.export .pt2 files match the PyTorch model."""

from __future__ import annotations

import contextlib
import copy
import io
import json
from pathlib import Path

import pytest
import torch

import gcvit
from gcvit.cli import main
from gcvit.export import ExportMismatchError, export, verify
from tests.conftest import randomize_

onnx = pytest.importorskip("onnx")
ort = pytest.importorskip("onnxruntime")
pytest.importorskip("onnxscript")

# a small GC ViT at 64 px: every stage pads its map to a window multiple and resizes the global query, so the
# export covers the non-native code paths as well as the plain ones
SMALL = {"depths": (1, 1, 1, 1), "img_size": 64, "num_classes": 5}


def _small() -> gcvit.GCViT:
    torch.manual_seed(0)
    return randomize_(gcvit.create_model("gcvit_xxtiny", **SMALL)).eval()


@pytest.fixture(scope="module")
def saved_and_onnx(tmp_path_factory: pytest.TempPathFactory) -> tuple[gcvit.GCViT, Path, Path, str]:
    """A saved small model, and its ONNX export written by `gcvit export FOLDER` (with the command's output)."""
    root = tmp_path_factory.mktemp("export")
    model = _small()
    with torch.inference_mode():  # fills the attention's bias cache, which tracing must not pick up
        model(torch.randn(1, 3, 64, 64))
    model.save_pretrained(root / "saved", classes=["a", "b", "c", "d", "e"])
    out = root / "small.onnx"
    buf = io.StringIO()
    with contextlib.redirect_stdout(buf):
        rc = main(["export", str(root / "saved"), "--format", "onnx", "--out", str(out), "--batch", "3"])
    assert rc == 0
    return model, root / "saved", out, buf.getvalue()


def test_cli_onnx_export_checks_batches_and_prints_differences(saved_and_onnx) -> None:
    _, _, out, printed = saved_and_onnx
    lines = [line for line in printed.splitlines() if "max abs diff" in line]
    assert [line.split("input ")[1].split(":")[0] for line in lines] == ["(1, 3, 64, 64)", "(3, 3, 64, 64)"]
    for line in lines:
        assert 0 <= float(line.split("max abs diff ")[1].split()[0]) <= 1e-4
    assert "H, W fixed at 64x64" in printed and f"ok: {out}" in printed


def test_onnx_file_has_dynamic_batch_fixed_size_and_metadata(saved_and_onnx) -> None:
    model, _, out, _ = saved_and_onnx
    proto = onnx.load(str(out))
    (inp,) = proto.graph.input
    dims = [d.dim_param or d.dim_value for d in inp.type.tensor_type.shape.dim]
    assert inp.name == "images" and isinstance(dims[0], str) and dims[1:] == [3, 64, 64]
    meta = json.loads({p.key: p.value for p in proto.metadata_props}["gcvit_config"])
    assert meta["classes"] == ["a", "b", "c", "d", "e"] and meta["model"] == "gcvit_xxtiny"
    assert meta["config"]["depths"] == [1, 1, 1, 1]

    session = ort.InferenceSession(str(out), providers=["CPUExecutionProvider"])
    x = torch.randn(5, 3, 64, 64)
    with torch.no_grad():
        want = model(x)
    got = torch.from_numpy(session.run(None, {"images": x.numpy()})[0])
    assert (got - want).abs().max() <= 1e-4
    with pytest.raises(Exception, match="Expected: 64"):  # H, W are fixed: another size is refused, not mis-run
        session.run(None, {"images": torch.randn(1, 3, 96, 96).numpy()})


def test_check_fails_above_tolerance(saved_and_onnx) -> None:
    model, _, out, _ = saved_and_onnx
    other = randomize_(copy.deepcopy(model), scale=0.01)  # the exported file no longer matches this model
    with pytest.raises(ExportMismatchError, match=r"more than atol=0.0001 \(batch 1: .*, batch 2: "):
        verify(out, other, (64, 64), (1, 2), atol=1e-4)


def test_pt2_export_reloads_and_matches(tmp_path: Path) -> None:
    model = _small()
    result = export(model, tmp_path / "small.pt2", "pt2", batches=(1, 4), config={"classes": list("abcde")})
    assert [c.shape[0] for c in result.checks] == [1, 4] and all(c.max_abs_diff <= 1e-5 for c in result.checks)
    extra = {"gcvit_config": ""}
    program = torch.export.load(tmp_path / "small.pt2", extra_files=extra)
    assert json.loads(extra["gcvit_config"])["classes"] == list("abcde")
    x = torch.randn(6, 3, 64, 64)
    with torch.no_grad():
        assert torch.allclose(program.module()(x), model(x), atol=1e-5, rtol=0)


@pytest.mark.cpu_bf16
def test_a_bf16_model_exports_with_a_dynamic_batch() -> None:
    """torch.export of a bf16 model traces one attention route for every batch: the eager route choice by problem
    size (a guard on the batch) must stay out of the graph, or the export fails on the dynamic batch."""
    torch.manual_seed(0)
    model = randomize_(gcvit.create_model("gcvit_xxtiny", img_size=64)).eval().bfloat16()
    batch = torch.export.Dim("batch")
    program = torch.export.export(model, (torch.randn(2, 3, 64, 64).bfloat16(),), dynamic_shapes=({0: batch},))
    with torch.no_grad():
        for size in (1, 5):
            x = torch.randn(size, 3, 64, 64).bfloat16()
            got, want = program.module()(x).float(), model(x).float()
            assert (got - want).abs().max().item() <= 0.02 * want.abs().max().item(), size  # bf16 rounding


def test_export_rejects_bad_arguments(tmp_path: Path) -> None:
    model = _small()
    with pytest.raises(ValueError, match="format one of"):
        export(model, tmp_path / "x.tflite", "tflite")
    with pytest.raises(ValueError, match="at least 32 px"):
        export(model, tmp_path / "x.onnx", img_size=16)
    assert main(["export", "gcvit_nope"]) == 2  # unknown names and missing folders are clear errors


def test_the_format_not_the_file_name_picks_the_checker(saved_and_onnx, tmp_path: Path) -> None:
    """An ONNX file named .bin and a .pt2 program under another extension are each checked with their own reader."""
    model, _, out, _ = saved_and_onnx
    renamed = tmp_path / "model.bin"
    renamed.write_bytes(out.read_bytes())
    assert verify(renamed, model, (64, 64), (2,), format="ONNX")[0].max_abs_diff <= 1e-4
    with pytest.raises(ValueError, match=r"expected format one of \('onnx', 'pt2'\); got 'tflite'"):
        verify(renamed, model, (64, 64), (2,), format="tflite")
    result = export(model, tmp_path / "model.ONNX", "pt2", batches=(1,))
    assert result.path == tmp_path / "model.ONNX" and result.checks[0].max_abs_diff <= 1e-5


def test_an_opset_the_exporter_cannot_write_is_refused(tmp_path: Path, capsys) -> None:
    """torch.onnx writes opset 18 and converts upwards, to what onnx knows: another opset is refused by name before
    the model is traced (in the command before the model is loaded), and nothing is written."""
    newest = onnx.defs.onnx_opset_version()
    for opset in (13, newest + 1):
        with pytest.raises(ValueError, match=f"expected --opset between 18 and {newest} .*; got {opset}"):
            export(_small(), tmp_path / "old.onnx", opset=opset)
    assert not (tmp_path / "old.onnx").exists()
    assert main(["export", "gcvit_no_such_model", "--opset", "13"]) == 2
    err = capsys.readouterr().err
    assert "expected --opset between 18" in err and "Traceback" not in err


def test_the_pt2_batch_has_no_upper_bound(saved_and_onnx, tmp_path: Path) -> None:
    """The dynamic batch used to be capped at 4096 (a larger one failed a guard after export)."""
    from torch.utils._sympy.numbers import int_oo

    model, _, _, _ = saved_and_onnx
    export(model, tmp_path / "m.pt2", "pt2", batches=(1,))
    (bounds,) = torch.export.load(tmp_path / "m.pt2").range_constraints.values()
    assert (bounds.lower, bounds.upper) == (1, int_oo)


def test_the_default_output_of_a_folder_given_as_dot_is_named_after_it(tmp_path: Path, monkeypatch) -> None:
    from gcvit.cli.export import _default_out

    (tmp_path / "saved").mkdir()
    monkeypatch.chdir(tmp_path / "saved")
    assert _default_out(".", "pt2") == Path("saved.pt2") and _default_out("..", "onnx") == Path(f"{tmp_path.name}.onnx")


def test_a_named_safetensors_file_is_the_one_exported(saved_and_onnx, tmp_path: Path) -> None:
    """`gcvit export DIR/finetuned.safetensors` exports that file's weights, not DIR/model.safetensors."""
    from gcvit.cli.export import load_for_export

    model, saved, _, _ = saved_and_onnx
    folder = tmp_path / "saved"
    folder.mkdir()
    for f in saved.iterdir():
        (folder / f.name).write_bytes(f.read_bytes())
    tuned = randomize_(copy.deepcopy(model))
    gcvit.save_checkpoint(tuned, folder / "finetuned.safetensors")
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        got = load_for_export(str(folder / "finetuned.safetensors"))[0](x)
        assert torch.equal(got, tuned(x)) and not torch.equal(got, model(x))
        assert torch.equal(load_for_export(str(folder / "model.safetensors"))[0](x), model(x))
    with pytest.raises(ValueError, match="--ema goes with a folder"):
        load_for_export(str(folder / "finetuned.safetensors"), ema=True)


@pytest.mark.slow
@pytest.mark.parametrize("name", ["gcvit_xxtiny", "gcvit_tiny"])
@pytest.mark.parametrize("fmt", ["onnx", "pt2"])
def test_official_variants_export_at_batch_1_and_7(name: str, fmt: str, tmp_path: Path) -> None:
    model = randomize_(gcvit.create_model(name)).eval()
    result = export(model, tmp_path / f"{name}.{fmt}", fmt, batches=(1, 7), atol=1e-4)
    assert [c.shape for c in result.checks] == [(1, 3, 224, 224), (7, 3, 224, 224)]
    assert all(c.max_abs_diff <= 1e-4 for c in result.checks)


def test_metadata_records_the_exported_size_and_files_appear_whole(tmp_path: Path, monkeypatch) -> None:
    """The graph takes only the size it was exported at, and its recorded config says that size; the file is
    written under a temporary name and renamed, so a failed write leaves nothing at the target."""
    model = _small()
    export(model, tmp_path / "m96.pt2", "pt2", img_size=96, batches=(1,), config={"config": {"img_size": [64, 64]}})
    extra = {"gcvit_config": ""}
    torch.export.load(tmp_path / "m96.pt2", extra_files=extra)
    assert json.loads(extra["gcvit_config"])["img_size"] == [96, 96]

    def partial_then_fail(program, f, **kwargs) -> None:
        Path(f).write_bytes(b"partial")
        raise OSError("disk full")

    monkeypatch.setattr(torch.export, "save", partial_then_fail)
    with pytest.raises(OSError, match="disk full"):
        export(model, tmp_path / "broken.pt2", "pt2", batches=(1,))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m96.pt2"]


@pytest.mark.parametrize("fmt", ["onnx", "pt2"])
def test_a_size_the_model_refuses_is_named_before_tracing(fmt: str, tmp_path: Path, capsys) -> None:
    assert main(["export", "vit_tiny", "--format", fmt, "--img-size", "60", "--out", str(tmp_path / f"v.{fmt}")]) == 2
    assert "multiple" in capsys.readouterr().err and not list(tmp_path.iterdir())


def test_pretrained_flag_is_parsed_alike_by_every_command() -> None:
    """--pretrained 'true' / 'false' / a path mean the same to train, demo and export (export used to crash on
    'true' with an AttributeError before reaching the download)."""
    from gcvit.cli import build_parser
    from gcvit.cli.export import load_for_export

    parser = build_parser()
    for command in (["train"], ["demo"], ["export", "gcvit_xxtiny"]):
        assert parser.parse_args([*command, "--pretrained", "true"]).pretrained is True
        assert parser.parse_args([*command, "--pretrained", "False"]).pretrained is False
        assert parser.parse_args([*command, "--pretrained", "w.safetensors"]).pretrained == "w.safetensors"
    assert isinstance(load_for_export("gcvit_xxtiny", False)[0], gcvit.GCViT)
