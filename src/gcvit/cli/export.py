"""`gcvit export`: ONNX or torch.export (.pt2) files, checked against PyTorch in the same command."""

from __future__ import annotations

import argparse
import logging
import re
import sys
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

from gcvit.cli.args import DefaultsFormatter, add_pretrained_argument

if TYPE_CHECKING:
    from torch import nn

# this module's command and its line in `gcvit --help`
COMMANDS = {"export": "export to ONNX or torch.export (.pt2), checked against PyTorch"}


def load_for_export(
    model: str, pretrained: bool | str | None = None, ema: bool | None = None
) -> tuple[nn.Module, dict[str, Any]]:
    """What `gcvit.load` reads: a registered name (weights with --pretrained), a folder, URL or hub repo id (saved,
    checkpoint and run folders), or a .safetensors file with config.json beside it. Returns (model, its
    config.json contents)."""
    from gcvit.hub import is_remote
    from gcvit.loading import load
    from gcvit.models.folder import model_config

    path = Path(model)
    if path.is_file() and path.suffix != ".safetensors":
        raise ValueError(f"expected a folder, or a .safetensors file with config.json beside it; got {path}")
    if path.is_file() and ema is not None:
        raise ValueError(f"--ema goes with a folder; {path} names its weights itself")
    if pretrained is not None and (path.exists() or is_remote(model)):
        raise ValueError(f"--pretrained goes with a model name; {model!r} is a folder or URL with its own weights")
    net = load(model, ema=ema) if pretrained is None else load(model, pretrained=pretrained)
    config = model_config(net)
    return net, config


def _default_out(model: str, fmt: str) -> Path:
    stem = Path(model).resolve().name if Path(model).exists() else re.sub(r"[^\w.-]+", "_", model)  # '.' too
    return Path(f"{stem}.{fmt}")


def _export(args: argparse.Namespace) -> int:
    from gcvit.export import ExportMismatchError, check_opset, export
    from gcvit.flops import count_params

    for noisy in ("onnxscript", "onnx_ir"):  # their graph optimisers log every rewrite at INFO
        logging.getLogger(noisy).setLevel(logging.WARNING)
    out = Path(args.out) if args.out else _default_out(args.model, args.format)
    if out.is_dir():
        raise ValueError(f"--out {out} is a folder; expected the file to write (e.g. {out / ('model.' + args.format)})")
    if not args.atol > 0:
        raise ValueError(f"expected --atol above 0; got {args.atol:g}")
    if args.format == "onnx":  # before any weights are read (or downloaded) and any file is written
        import onnxruntime  # noqa: F401 -- checks the export; a missing one is named with its install command

        check_opset(args.opset)
    net, config = load_for_export(args.model, args.pretrained, args.ema)
    size = args.img_size or config["img_size"]
    if len(size) > 2:
        raise ValueError(f"expected --img-size H or H W; got {size}")
    size = (size[0], size[-1])
    batches = sorted({1, args.batch})
    print(f"{args.model}: {count_params(net) / 1e6:.2f} M parameters -> {out} ({args.format})")
    t0 = time.perf_counter()
    try:
        result = export(
            net, out, args.format, img_size=size, batches=batches, atol=args.atol, opset=args.opset, config=config
        )
    except ExportMismatchError as e:
        print(f"gcvit: export check FAILED: {e} ({out} is kept for inspection)", file=sys.stderr)
        return 1
    h, w = result.img_size
    shape = f"(batch, {net.cfg.in_chans}, {h}, {w})"
    print(f"exported and checked in {time.perf_counter() - t0:.1f} s: input images {shape}, dynamic batch")
    print(f"  H, W fixed at {h}x{w}: the model pads and resizes depending on the size (--img-size picks another)")
    checker = "onnxruntime" if args.format == "onnx" else "torch.export.load"
    for c in result.checks:
        print(f"  check {checker} vs PyTorch, input {c.shape}: max abs diff {c.max_abs_diff:.2e} (atol {args.atol:g})")
    print(f"ok: {result.path}")
    return 0


def add_subcommands(subparsers: Any) -> None:
    """Add `export` to the `gcvit` command's subparsers."""
    p = subparsers.add_parser("export", help=COMMANDS["export"], formatter_class=DefaultsFormatter)
    p.add_argument(
        "model",
        help="model name (gcvit_tiny, gcvit_tiny.in1k with --pretrained true), a folder from save_pretrained or "
        "training (run folder, best/, last/), a .safetensors with config.json beside it, a URL or a hub repo id",
    )
    p.add_argument("--format", choices=["onnx", "pt2"], default="onnx")
    p.add_argument("--out", default=None, help="output file (default: ./<model>.<format>)")
    add_pretrained_argument(p, None, "with a model name: ")
    p.add_argument(
        "--ema",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="a training checkpoint's EMA weights (default: when it has them, as gcvit eval does)",
    )
    p.add_argument("--img-size", type=int, nargs="+", default=None, metavar="PX", help="fixed H [W] (default: native)")
    p.add_argument("--batch", type=int, default=7, help="check at batch 1 and this batch (the batch axis is dynamic)")
    p.add_argument("--atol", type=float, default=1e-4, help="largest max abs logit difference that passes")
    p.add_argument("--opset", type=int, default=18, help="ONNX opset")
    p.set_defaults(func=_export)
