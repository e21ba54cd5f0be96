"""Argument types and help formatting shared by the `gcvit` commands."""

from __future__ import annotations

import argparse
import copy
from typing import Any

_NONE = ("none", "null", "off")


def or_none(parse: Any) -> Any:
    """`parse`, or None for 'none', 'null' and 'off' (an optional setting turned off)."""

    def parse_or_none(text: str) -> Any:
        return None if text.lower() in _NONE else parse(text)

    parse_or_none.__name__ = getattr(parse, "__name__", "value")
    return parse_or_none


def parse_pretrained(text: str) -> str | bool:
    """--pretrained: 'true' (the official weights), 'false' or 'none' (random weights), else a path or URL."""
    return {"true": True, "false": False, "none": False}.get(text.lower(), text)


def parse_seed(text: str) -> int:
    """--seed of the commands that split data: an integer in [0, 2**32), as NumPy and scikit-learn take it."""
    try:
        seed = int(text)
    except ValueError:
        seed = -1
    if not 0 <= seed < 2**32:
        raise argparse.ArgumentTypeError(f"expected an integer in [0, 2**32); got {text!r}")
    return seed


class DefaultsFormatter(argparse.HelpFormatter):
    """Help that ends with each option's default, unless the text speaks of its default already or there is none."""

    def _format_action(self, action: argparse.Action) -> str:
        if not action.help and self._shows_default(action):  # argparse prints no help line for an empty help
            action = copy.copy(action)
            action.help = "(default: %(default)s)"
        return super()._format_action(action)

    def _get_help_string(self, action: argparse.Action) -> str:
        text = action.help or ""
        if "(default" in text or not self._shows_default(action):
            return text
        return f"{text} (default: %(default)s)"

    @staticmethod
    def _shows_default(action: argparse.Action) -> bool:
        hidden = action.default is None or action.default is False or action.default is argparse.SUPPRESS
        return bool(action.option_strings) and not hidden  # 0 is a default to show (0 == False)


def add_pretrained_argument(p: argparse.ArgumentParser, default: bool | None, what: str) -> None:
    """--pretrained as demo, export and visualize take it: no value or 'true' for the official weights, or a
    checkpoint path or URL."""
    p.add_argument(
        "--pretrained",
        type=parse_pretrained,
        nargs="?",
        const=True,
        default=default,
        help=f"{what}'true' (or no value) for NVIDIA's ImageNet weights, or a checkpoint path or URL",
    )


def dense_task_settings(args: argparse.Namespace, fields: Any, paths: tuple[str, ...], task: str) -> dict[str, Any]:
    """The settings `gcvit detect train` or `gcvit segment train` got: each flag given whose name is a field of the
    config dataclass `fields` (a store_true flag when set), `--pretrained` as True for 'true', the `paths` made
    absolute; with --resume, the run's config.yaml under what a resumed run may change (epochs, time limit, workers,
    device), after checking it is a `task` run."""
    import dataclasses
    from pathlib import Path

    from gcvit.train.config import read_yaml

    names = {f.name for f in dataclasses.fields(fields)} - {"pretrained"}
    given: dict[str, Any] = {k: v for k, v in vars(args).items() if k in names and v is not None and v is not False}
    if args.pretrained is not None:
        given["pretrained"] = True if args.pretrained == "true" else args.pretrained
    for key in paths:
        if key in given:
            given[key] = str(Path(given[key]).expanduser().resolve())
    if not args.resume:
        return given
    saved = Path(args.resume, "config.yaml")
    if not saved.is_file():
        raise FileNotFoundError(f"--resume {args.resume}: expected a run folder holding config.yaml; there is none")
    base = read_yaml(saved, check=False)
    if base.get("task") != task:
        raise ValueError(f"--resume {args.resume} is not a {task} run; continue it with its own command")
    return base | {k: v for k, v in given.items() if k in ("epochs", "time_limit", "num_workers", "device")}


def add_dense_training_flags(p: argparse.ArgumentParser) -> None:
    """The flags `gcvit detect train` and `gcvit segment train` share: the backbone's window, frozen stages, drop path
    and checkpointing, the run's accumulation, clipping, autocast, EMA, seed, workers, device, time limit, resume."""
    p.add_argument("--grad-accum", type=int, default=None)
    p.add_argument("--clip-grad", type=float, default=None)
    p.add_argument("--amp", default=None, choices=["none", "bf16", "fp16"])
    p.add_argument("--ema", type=float, default=None, help="EMA decay (default: none)")
    p.add_argument("--seed", type=parse_seed, default=None)
    p.add_argument("--num-workers", type=int, default=None)
    p.add_argument("--device", default=None)
    p.add_argument("--time-limit", type=float, default=None, help="seconds; stops after the epoch that passes it")
    p.add_argument("--resume", default=None, metavar="RUN_DIR", help="continue the run in RUN_DIR from last/")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    p.add_argument("--window-size", type=int, default=None, help="GC ViT's window (default 24; the digit scenes 8)")
    p.add_argument("--frozen-stages", type=int, default=None, help="-1 none, 0 the stem, k the stem and k stages")
    p.add_argument("--drop-path", type=float, default=None)
    p.add_argument("--grad-checkpointing", action="store_true", help="recompute the backbone in the backward pass")
