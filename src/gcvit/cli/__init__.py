"""The `gcvit` command line: thin wrappers that parse arguments and call the library.

torch, the models and the other commands' modules are imported inside the commands: `gcvit --version` and `gcvit
--help` answer in a fraction of a second, and `gcvit <command>` builds only that command's arguments.
"""

from __future__ import annotations

import argparse
import importlib
import logging
import sys
import time
from collections.abc import Collection, Sequence
from pathlib import Path

from gcvit import __version__
from gcvit.allocator import keep_freed_memory
from gcvit.cli.args import DefaultsFormatter, add_pretrained_argument, parse_seed
from gcvit.extras import EXTRA_OF, install_hint

# the modules that add the other commands (each lists them in its COMMANDS), in the order `gcvit --help` shows them
_COMMAND_MODULES = (
    "gcvit.cli.train",
    "gcvit.cli.detect",
    "gcvit.cli.segment",
    "gcvit.cli.visualize",
    "gcvit.cli.export",
    "gcvit.cli.compare",
)


def _models(args: argparse.Namespace) -> None:
    import torch

    from gcvit.flops import count_macs, count_params
    from gcvit.models import FAMILIES, create_model, list_models, resolve_name

    rows = []
    order = {arch: i for i, arch in enumerate(a for f in FAMILIES.values() for a in f.variants)}
    names = list_models(args.pattern)
    if not names:
        raise ValueError(f"no model matches {args.pattern!r}; patterns are shell-style, e.g. '*tiny*'")
    for name in sorted(names, key=lambda n: (order[n.split(".")[0]], n)):
        spec = resolve_name(name)
        if "." not in name and spec.pretrained is not None and name + "." + str(spec.tag) in names:
            continue  # the architecture is shown through its tags
        with torch.device("meta"):
            model = create_model(name)
        cfg = model.cfg
        top1 = spec.pretrained.top1 if spec.pretrained else None
        rows.append(
            (
                name,
                f"{count_params(model) / 1e6:.2f}",
                f"{count_macs(model, cfg.img_size) / 1e9:.2f}",
                "x".join(map(str, cfg.img_size)),
                ",".join(map(str, cfg.window_size)) if hasattr(cfg, "window_size") else "global",
                "-" if top1 is None else f"{top1:.1f}",
            )
        )
    header = ("model", "params (M)", "GFLOPs", "resolution", "windows", "top-1 (%)")
    widths = [max(len(r[i]) for r in [header, *rows]) for i in range(len(header))]
    for r in [header, tuple("-" * w for w in widths), *rows]:
        print("  ".join(c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(r, widths))))
    print("\nGFLOPs: multiply-adds at the native resolution, counted by torch.utils.flop_counter; top-1: NVIDIA's.")


def _demo(args: argparse.Namespace) -> None:
    """Run real photos through a model at its native size and at their own size, and show the feature pyramid."""
    import torch
    from sklearn.datasets import load_sample_images

    from gcvit.flops import count_params
    from gcvit.models import create_model

    torch.manual_seed(0)
    model = create_model(args.model, pretrained=args.pretrained).eval()
    mean = torch.tensor(model.pretrained_cfg.mean).view(1, 3, 1, 1)
    std = torch.tensor(model.pretrained_cfg.std).view(1, 3, 1, 1)
    windows = getattr(model.cfg, "window_size", "global attention")
    print(f"{args.model}: {count_params(model) / 1e6:.2f} M parameters, windows {windows}")
    photos = load_sample_images()
    images = torch.stack([torch.from_numpy(im.copy()).permute(2, 0, 1) for im in photos.images]) / 255  # (2, 3, H, W)
    stride = getattr(model.cfg, "patch_size", 1)  # ViT and Swin take sides that are multiples of their patch
    H, W = images.shape[-2] // stride * stride, images.shape[-1] // stride * stride
    images = (images[..., :H, :W] - mean) / std  # (2, 3, H, W), cropped to the patch grid
    native = torch.nn.functional.interpolate(images, size=model.cfg.img_size, mode="bicubic", antialias=True)
    with torch.inference_mode():
        for label, x in (("native", native), ("own size", images)):
            t0 = time.perf_counter()
            probs = model(x).softmax(-1)
            dt = time.perf_counter() - t0
            single = torch.cat([model(x[i : i + 1]).softmax(-1) for i in range(len(x))])
            top = probs.topk(3)
            for name, p, idx in zip(photos.filenames, top.values, top.indices):
                classes = ", ".join(f"{int(i)}:{float(v):.3f}" for v, i in zip(p, idx))
                print(f"  {label:8s} {tuple(x.shape[2:])!s:11s} {name.rsplit('/', 1)[-1]:11s} top-3 {classes}")
            diff = (probs - single).abs().max()
            print(f"  {label:8s} batch of 2 in {dt:.2f} s; batched vs one by one: max diff {diff:.1e}")
        feats = model.forward_intermediates(images)
    print("  feature pyramid at", tuple(images.shape[2:]), ":", ", ".join(str(tuple(f.shape[1:])) for f in feats))
    if not args.pretrained:
        print("  (random weights: pass --pretrained true for NVIDIA's ImageNet weights, which needs the network)")


def _digits(args: argparse.Namespace) -> None:
    """Write held-out (validation split) digits as PNG files named after their true label."""
    from gcvit.data import DigitsDataset

    if args.count < 1:
        raise ValueError(f"expected --count of at least 1; got {args.count}")
    data = DigitsDataset("val", img_size=args.img_size, val_fraction=args.val_fraction, seed=args.seed)
    out = Path(args.out)
    if out.exists() and not out.is_dir():
        raise ValueError(f"--out {out} is a file; expected a folder for the PNG files")
    out.mkdir(parents=True, exist_ok=True)
    for i in range(min(args.count, len(data))):
        image, label = data[i]
        image.save(out / f"digit_{i:03d}_true_{data.classes[label]}.png")
    print(f"wrote {min(args.count, len(data))} held-out digits to {out}")


def _bench(args: argparse.Namespace) -> None:
    from gcvit.bench_timm import BenchConfig, run

    cfg = BenchConfig(
        models=tuple(args.models),
        train_models=tuple(args.train_models),
        train_drop_paths=tuple(args.train_drop_path),
        infer_batches=tuple(args.batches),
        train_batch=args.train_batch,
        img_size=args.img_size,
        repeats=args.repeats,
        dtypes=tuple(args.dtypes),
        train_dtypes=tuple(args.train_dtypes),
        compile=args.compile,
        agreement_images=args.agreement_images,
    )
    if args.device:
        cfg.device = args.device
    run(cfg)


def build_parser(commands: Collection[str] | None = None) -> argparse.ArgumentParser:
    """The `gcvit` parser, listing every command.

    Args:
        commands: the commands whose arguments to add (some import torch to describe them); the others are listed
            with their one-line help only. None: every command's.
    """
    parser = argparse.ArgumentParser(prog="gcvit", description="Global Context Vision Transformer (GC ViT)")
    parser.add_argument("--version", action="version", version=f"gcvit {__version__}")
    parser.add_argument(
        "--system-malloc",
        action="store_true",
        help="leave glibc's malloc as it is; by default freed memory is kept for reuse (1.3x faster CPU training, a "
        "few percent more resident memory; see gcvit.allocator)",
    )
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("models", help="table of variants: params, GFLOPs, resolution, windows, top-1")
    p.add_argument("pattern", nargs="?", default="*", help="shell-style filter, e.g. 'gcvit_large*'")
    p.set_defaults(func=_models)
    p = sub.add_parser(
        "demo",
        help="run two real photos through a model and show its outputs and feature maps",
        formatter_class=DefaultsFormatter,
    )
    p.add_argument("--model", default="gcvit_xxtiny")
    add_pretrained_argument(p, False, "")
    p.set_defaults(func=_demo)
    p = sub.add_parser(
        "digits", help="write held-out digits (the validation split) as PNG files", formatter_class=DefaultsFormatter
    )
    p.add_argument("--out", default="runs/digits/held_out")
    p.add_argument("--count", type=int, default=8)
    p.add_argument("--img-size", type=int, default=32)
    p.add_argument("--val-fraction", type=float, default=0.2, help="as in training")
    p.add_argument("--seed", type=parse_seed, default=0, help="split seed, as in training")
    p.set_defaults(func=_digits)
    for name in _COMMAND_MODULES:
        module = importlib.import_module(name)
        if commands is None or any(c in commands for c in module.COMMANDS):
            module.add_subcommands(sub)
        else:  # listed by `gcvit --help`; never parsed, as `main` builds the command it runs
            for command, help_ in module.COMMANDS.items():
                sub.add_parser(command, help=help_)
    p = sub.add_parser(
        "bench", help="speed and memory side by side with timm's GC ViT (needs timm)", formatter_class=DefaultsFormatter
    )
    p.add_argument("--models", nargs="*", default=["gcvit_tiny"], help="inference comparisons")
    p.add_argument("--train-models", nargs="*", default=["gcvit_xxtiny", "gcvit_tiny"], help="training steps")
    p.add_argument("--batches", nargs="+", type=int, default=[1, 16])
    p.add_argument("--train-batch", type=int, default=16)
    p.add_argument(
        "--train-drop-path",
        nargs="+",
        default=["0", "recipe"],
        help="stochastic depth of the training rows, a row each: a rate, or 'recipe' for the variant's own",
    )
    p.add_argument("--img-size", type=int, default=224, help="timm's GC ViT runs only at 224 with its default windows")
    p.add_argument("--dtypes", nargs="+", default=["fp32", "bf16"], choices=["fp32", "bf16"], help="inference")
    p.add_argument(
        "--train-dtypes",
        nargs="+",
        default=["fp32"],
        choices=["fp32", "bf16"],
        help="training step in fp32 or under bf16 autocast, a row each",
    )
    p.add_argument("--repeats", type=int, default=7)
    p.add_argument("--device", default=None, help="cpu or cuda (default: cuda when available)")
    p.add_argument("--compile", action="store_true", help="run our inference side through torch.compile (inductor)")
    p.add_argument("--agreement-images", type=int, default=256, help="random images for the bf16 top-1 check")
    p.set_defaults(func=_bench)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Run the `gcvit` command; returns the exit status: 0, 1 for a command that did part of its work (`gcvit
    predict` with unreadable inputs), 2 for an error (one line on stderr), 130 when interrupted (Ctrl-C)."""
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    argv = sys.argv[1:] if argv is None else list(argv)
    command = next((a for a in argv if not a.startswith("-")), None)  # gcvit's own options take no values
    try:
        args = build_parser(set() if command is None else {command}).parse_args(argv)
        if not args.system_malloc:
            keep_freed_memory()
        return args.func(args) or 0
    except KeyboardInterrupt as e:  # Ctrl-C; training says where its checkpoint is and how to resume
        print(f"gcvit: {' '.join(str(e).split()) or 'interrupted'}", file=sys.stderr)
        return 130
    except ImportError as e:  # an optional dependency (the extras of pyproject.toml)
        print(f"gcvit: error: {_missing(e)}", file=sys.stderr)
        return 2
    except (FileExistsError, NotADirectoryError) as e:  # a file where a folder was to be made or read
        print(f"gcvit: error: {_the_file(e.filename)} is a file; expected a folder there", file=sys.stderr)
        return 2
    except Exception as e:  # not SystemExit: `--help` and `--version` import nothing more
        if not isinstance(e, (ValueError, OSError, *_library_errors())):
            raise
        print(f"gcvit: error: {e}", file=sys.stderr)
        return 2


def _library_errors() -> tuple[type[Exception], ...]:
    """The library's errors that end a command with their message (imported only when an error reaches `main`:
    their modules import torch)."""
    from gcvit.download import ChecksumError
    from gcvit.train.loop import NonFiniteLossError

    return ChecksumError, NonFiniteLossError


def _the_file(path: str | None) -> str | None:
    """The file in the way of `path` (afile/sub/x: afile), or `path` itself."""
    if path is None:
        return None
    return str(next((p for p in (Path(path), *Path(path).parents) if p.is_file()), Path(path)))


def _missing(error: ImportError) -> str:
    """What to install for a missing optional package: its extra of pyproject.toml."""
    if "pip install" in str(error):  # the library already said what to install
        return str(error)
    name = (error.name or "").split(".")[0]
    hint = install_hint(EXTRA_OF.get(name, "train"))
    return f"this command needs {name or 'a package'} ({error}); install it with: {hint}"


if __name__ == "__main__":
    sys.exit(main())
