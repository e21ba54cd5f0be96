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
