"""Export to ONNX and to `torch.export` programs (.pt2), each checked against the PyTorch model.

Both formats have a dynamic batch axis and a fixed input size (H, W). The size stays fixed because the model branches
on it: feature maps are padded to window multiples only when H, W are not multiples already, the padding mask and the
global query's bicubic resize exist only at non-native sizes, and the padded sizes are Python integers. Tracing
therefore specialises on the example's H, W (torch.onnx's exporter does so silently; torch.export with symbolic H, W
does not finish). Export at the size you will run (`img_size`), or once per size.

The checks run the exported file (ONNX through onnxruntime, .pt2 through `torch.export.load`) and the PyTorch model
on the same seeded random images, at the batch sizes asked for, and compare the outputs.

Tracing does not touch the attention's cached relative-position bias: torch.export and torch.onnx (dynamo) trace with
`torch.compiler.is_compiling()` true, where the bias is gathered from its table in the graph.
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from gcvit.atomic import atomic_write_to

logger = logging.getLogger(__name__)

FORMATS = ("onnx", "pt2")
DEFAULT_OPSET = 18
INPUT_NAME, OUTPUT_NAME = "images", "logits"
_EXAMPLE_BATCH = 2  # traced batch; 0 and 1 would be specialised by torch.export
_ONNX_SINGLE_FILE_LIMIT = 1_800_000_000  # bytes of weights above which ONNX needs an external data file (2 GB)


class ExportMismatchError(ValueError):
    """An exported model's outputs differ from the PyTorch model's by more than the tolerance."""


@dataclass(frozen=True)
class ExportCheck:
    shape: tuple[int, int, int, int]  # input (B, C, H, W)
    max_abs_diff: float  # max |exported - PyTorch| over the logits


@dataclass(frozen=True)
class ExportResult:
    path: Path
    format: str  # "onnx" or "pt2"
    img_size: tuple[int, int]  # the fixed (H, W)
    checks: list[ExportCheck]
    atol: float


def _example(model: nn.Module, batch: int, img_size: tuple[int, int], seed: int = 0) -> torch.Tensor:
    """Seeded random images (B, C, H, W), roughly normalised-image statistics."""
    g = torch.Generator().manual_seed(seed)
    p = next(model.parameters())
    return torch.randn(batch, model.cfg.in_chans, *img_size, generator=g).to(p.device, p.dtype)


def _batch_dim() -> Any:
    return torch.export.Dim("batch", min=1)  # no upper bound: any batch the machine holds


def check_opset(opset: int) -> None:
    """Raise unless torch.onnx can be asked for `opset`: it writes 18 and converts upwards, to what onnx knows."""
    import onnx

    newest = onnx.defs.onnx_opset_version()
    if not DEFAULT_OPSET <= opset <= newest:
        raise ValueError(
            f"expected --opset between {DEFAULT_OPSET} and {newest} (onnx {onnx.__version__}); got {opset}"
        )


def export_onnx(
    model: nn.Module,
    path: str | os.PathLike[str],
    img_size: tuple[int, int],
    *,
    opset: int = DEFAULT_OPSET,
    metadata: Mapping[str, str] | None = None,
) -> Path:
    """Write an ONNX graph (input `images` (batch, C, H, W), output `logits` (batch, classes)) with torch.onnx's
    dynamo exporter; `metadata` goes into the model's metadata_props."""
    import onnx

    check_opset(opset)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    size = sum(p.numel() * p.element_size() for p in model.parameters())
    converter = logging.getLogger("onnxscript.version_converter")
    level = converter.level
    converter.setLevel(logging.CRITICAL)  # a failed conversion logs a traceback; the check below says what failed
    try:
        with torch.no_grad():
            program = torch.onnx.export(
                model.eval(),
                (_example(model, _EXAMPLE_BATCH, img_size),),
                dynamo=True,
                dynamic_shapes=({0: _batch_dim()},),
                input_names=[INPUT_NAME],
                output_names=[OUTPUT_NAME],
                opset_version=opset,
                verbose=False,
            )
    finally:
        converter.setLevel(level)
    if program is None:
        raise RuntimeError("torch.onnx.export returned no program")
    proto = program.model_proto
    written = next((o.version for o in proto.opset_import if o.domain in ("", "ai.onnx")), None)
    if written != opset:  # torch's exporter falls back to its own opset where it cannot convert, with a warning only
        raise ValueError(
            f"expected an ONNX graph of opset {opset}; torch.onnx writes opset {written} and could not convert this "
            f"model to {opset} (onnx {onnx.__version__} lacks an adapter for one of its ops); pass --opset {written}, "
            f"or another between {written} and {opset - 1}"
        )
    onnx.helper.set_model_props(proto, dict(metadata or {}))
    if size > _ONNX_SINGLE_FILE_LIMIT:  # the weights go to path.data, written before the graph file appears
        return atomic_write_to(
            path, lambda tmp: onnx.save(proto, tmp, save_as_external_data=True, location=path.name + ".data")
        )
    return atomic_write_to(path, lambda tmp: onnx.save(proto, tmp))


def export_pt2(
    model: nn.Module,
    path: str | os.PathLike[str],
    img_size: tuple[int, int],
    *,
    metadata: Mapping[str, str] | None = None,
) -> Path:
    """Write a `torch.export` program with a dynamic batch; `metadata` entries become extra files in the archive."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with torch.no_grad():
        program = torch.export.export(
            model.eval(), (_example(model, _EXAMPLE_BATCH, img_size),), dynamic_shapes=({0: _batch_dim()},)
        )
    return atomic_write_to(path, lambda tmp: torch.export.save(program, tmp, extra_files=dict(metadata or {})))


def _onnx_runner(path: Path) -> Any:
    import onnxruntime as ort

    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    return lambda x: torch.from_numpy(session.run([OUTPUT_NAME], {INPUT_NAME: x.cpu().numpy()})[0])


def _pt2_runner(path: Path) -> Any:
    module = torch.export.load(path).module()
    return lambda x: module(x)


def verify(
    path: str | os.PathLike[str],
    model: nn.Module,
    img_size: tuple[int, int],
    batches: Sequence[int] = (1, 7),
    *,
    atol: float = 1e-4,
    format: str | None = None,
) -> list[ExportCheck]:
    """Run an exported file and `model` on the same random images at each batch size; `format` "onnx" or "pt2"
    (default: ONNX for a .onnx name, else pt2).

    Returns:
        One ExportCheck per batch size.
    Raises:
        ExportMismatchError: some max abs difference exceeds `atol` (the message lists all of them).
    """
    path = Path(path)
    format = (format or ("onnx" if path.suffix.lower() == ".onnx" else "pt2")).lower()
    if format not in FORMATS:
        raise ValueError(f"expected format one of {FORMATS}; got {format!r}")
    runner = _onnx_runner(path) if format == "onnx" else _pt2_runner(path)
    checks = []
    model.eval()
    for i, batch in enumerate(batches):
        x = _example(model, batch, img_size, seed=i + 1)
        with torch.no_grad():
            want = model(x).float().cpu()
            got = runner(x).float().cpu()
        if got.shape != want.shape:
            raise ExportMismatchError(
                f"{path}: output {tuple(got.shape)} for input {tuple(x.shape)}; expected {tuple(want.shape)}"
            )
        checks.append(ExportCheck(tuple(x.shape), float((got - want).abs().max())))
    bad = [c for c in checks if not c.max_abs_diff <= atol]
    if bad:
        shown = ", ".join(f"batch {c.shape[0]}: {c.max_abs_diff:.2e}" for c in checks)
        raise ExportMismatchError(f"{path} differs from the PyTorch model by more than atol={atol:g} ({shown})")
    return checks


def export(
    model: nn.Module,
    path: str | os.PathLike[str],
    format: str = "onnx",
    *,
    img_size: int | tuple[int, int] | None = None,
    batches: Sequence[int] = (1, 7),
    atol: float = 1e-4,
    opset: int = DEFAULT_OPSET,
    config: Mapping[str, Any] | None = None,
) -> ExportResult:
    """Export `model` (CPU, eval mode) and check it at each batch size of `batches`.

    Args:
        model: a model built by gcvit (`create_model`, `gcvit.load`).
        path: the output file (.onnx or .pt2).
        format: "onnx" or "pt2".
        img_size: the fixed input (H, W); default: the model's native size.
        batches: batch sizes to check at (the batch axis is dynamic).
        atol: largest max abs difference of the logits that passes.
        opset: ONNX opset.
        config: stored with the export as "gcvit_config" (JSON): class names and preprocessing for deployment.
    Returns:
        An ExportResult with the max abs difference of each check.
    Raises:
        ExportMismatchError: a check exceeds `atol`; the file stays on disk for inspection.
    """
    if format not in FORMATS:
        raise ValueError(f"expected format one of {FORMATS}; got {format!r}")
    if not batches or min(batches) < 1:
        raise ValueError(f"expected batch sizes of at least 1 to check at; got {list(batches)}")
    size = model.cfg.img_size if img_size is None else img_size
    size = (size, size) if isinstance(size, int) else (int(size[0]), int(size[1]))
    if min(size) < 32:
        raise ValueError(f"expected an input size of at least 32 px; got {size}")
    # the graph takes this size only (the batch is dynamic): the recorded config says so
    metadata = {"gcvit_config": json.dumps(dict(config) | {"img_size": list(size)})} if config is not None else {}
    model = model.cpu().eval()
    with torch.no_grad():
        model(_example(model, 1, size))  # the model's own input checks name a bad size, before any tracing
    if format == "onnx":
        out = export_onnx(model, path, size, opset=opset, metadata=metadata)
    else:
        out = export_pt2(model, path, size, metadata=metadata)
    logger.info("exported %s; checking it against PyTorch", out)
    return ExportResult(out, format, size, verify(out, model, size, batches, atol=atol, format=format), atol)
