"""`gcvit compare`: argument parsing and printing around `gcvit.compare_families`."""

from __future__ import annotations

import argparse
from typing import Any

from gcvit.cli.args import parse_seed

# this module's command and its line in `gcvit --help`
COMMANDS = {"compare": "train GC ViT, Swin and ViT with one recipe and time budget; table and chart of the results"}


def _compare(args: argparse.Namespace) -> None:
    import torch

    from gcvit.compare_families import CompareConfig, markdown_table, run

    if args.threads is not None:
        if args.threads < 1:
            raise ValueError(f"expected --threads of at least 1; got {args.threads}")
        torch.set_num_threads(args.threads)
    cfg = CompareConfig(
        models=tuple(args.models),
        data=args.data,
        time_budget=args.time_budget,
        epochs=args.epochs,
        batch_size=args.batch_size,
        img_size=args.img_size,
        bench_batch=args.bench_batch,
        repeats=args.repeats,
        seed=args.seed,
        out_dir=args.out_dir,
        device=args.device,
        size=args.size,
        train_overrides={} if args.drop_path is None else {"drop_path": args.drop_path},
    )
    results = run(cfg, log=print)
    print()
    print(markdown_table(results), end="")
    print(f"\ntable: {cfg.out_dir}/compare.md  chart: {cfg.out_dir}/compare.png  runs: {cfg.out_dir}/runs/")


def add_subcommands(subparsers: Any) -> None:
    """Add `compare` to the `gcvit` command's subparsers."""
    from gcvit.cli.train import DefaultsFormatter
    from gcvit.compare_families import CompareConfig

    defaults = CompareConfig()
    p = subparsers.add_parser("compare", help=COMMANDS["compare"], formatter_class=DefaultsFormatter)
    p.add_argument("--models", nargs="+", default=list(defaults.models), help="names from `gcvit models`")
    p.add_argument("--data", default="digits", help="'digits' (bundled) or a folder of class folders")
    p.add_argument("--time-budget", type=float, default=defaults.time_budget, help="minutes of training per model")
    p.add_argument("--epochs", type=int, default=defaults.epochs, help="schedule length and cap, the same for all")
    p.add_argument("--batch-size", type=int, default=defaults.batch_size)
    p.add_argument("--img-size", type=int, default=defaults.img_size)
    p.add_argument("--bench-batch", type=int, default=defaults.bench_batch, help="batch of the speed measurements")
    p.add_argument("--repeats", type=int, default=defaults.repeats)
    p.add_argument("--seed", type=parse_seed, default=defaults.seed)
    p.add_argument("--out-dir", default=defaults.out_dir)
    p.add_argument("--device", default=None, help="cpu or cuda (default: cuda when available)")
    p.add_argument(
        "--size",
        default=defaults.size,
        choices=["auto", "digits", "native"],
        help="digits: each family's 32 px model; native: the variants as named; auto: digits on the digits data",
    )
    p.add_argument(
        "--drop-path",
        type=float,
        default=None,
        help="one stochastic depth rate for every model (default: each model's own, shown under 'built as')",
    )
    p.add_argument("--threads", type=int, default=None, help="CPU threads for torch")
    p.set_defaults(func=_compare)
