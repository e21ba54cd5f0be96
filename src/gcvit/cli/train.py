"""`gcvit train`, `gcvit eval` and `gcvit predict`: argument parsing and printing around `gcvit.train`.

Every TrainConfig field is a flag (`--batch-size`, `--ema 0.999`, `--model-override embed_dim=48`); flags given on
the command line override the YAML file given with --config, which overrides the recipe and the defaults.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import re
import sys
from typing import Any

from gcvit.cli.args import DefaultsFormatter, or_none, parse_pretrained, parse_seed

# this module's commands and their line in `gcvit --help` (listed there without building their arguments)
COMMANDS = {
    "train": "train or fine-tune a GC ViT (default: the bundled digits, from scratch)",
    "eval": "top-1/top-5, per-class accuracy and confusion matrix of a trained model",
    "predict": "classify image files or folders",
}


_PARSERS = {"int": int, "float": float, "str": str, "str | bool": parse_pretrained}
_HELP = {
    "model": "model name (gcvit models lists them); on the digits, that family's small 32 px model; none: "
    "gcvit_nano on the digits, gcvit_micro on a folder from scratch, gcvit_xxtiny with --pretrained true",
    "img_size": "training and evaluation size in px; none: 32 on the digits, else the model's native size",
    "out_dir": "run folder; none: runs/digits, or runs/<name of the data folder>",
    "keep_best": "'better' (best/ keeps the better of the raw and EMA weights on val) or 'ema' (official)",
    "ema_warmup": "EMA decay min(ema, 1 - (1 + step)^-0.75), timm's ModelEmaV3 warmup (official recipe: off)",
    "pretrained": "'true' for the official weights, or a checkpoint path / URL",
    "data": "'digits' (bundled) or 'folder'; none: folder when --data-dir / --train-dir is given, else digits",
    "recipe": "'default' (small data) or 'official' (the paper's ImageNet settings; lr scaled to the batch)",
    "amp": "autocast dtype: auto (bf16 where the CPU or GPU is fast at it, else none), none, bf16, fp16 (GPU)",
    "ema": "EMA decay per step, e.g. 0.9998 ('none': off)",
    "layer_decay": "layer-wise lr decay factor, e.g. 0.75 ('none': off)",
    "batch_size": "global batch per optimizer step (split over processes and --grad-accum)",
    "time_limit": "seconds; stop with a checkpoint after the epoch that passes it",
    "epochs": "length of the warmup + cosine schedule",
    "cooldown_epochs": "epochs at --min-lr after the schedule (official recipe: 10)",
    "warmup_epochs": "linear warmup from --warmup-lr to --lr",
    "strict_data": "unreadable images are an error instead of being skipped",
    "device": "cpu, cuda or cuda:N; none: cuda when available, else cpu",
    "num_classes": "outputs of the head; none: the data's class count",
    "drop_path": "stochastic depth rate; none: the model's own",
    "crop_pct": "centre crop share for validation; none: 1.0, or the --pretrained model's own",
    "clip_grad": "gradient norm clip ('none': off)",
    "warmup_prefix": "cosine after the warmup; --no-warmup-prefix: from step 0, the warmup overlapping it (official)",
    "decay_bias_tables": "weight decay on the relative-position bias tables too (official recipe: on)",
    "train_interpolation": "training crop and RandAugment resampling: bicubic, bilinear or random (official)",
}


def _add_config_flags(p: argparse.ArgumentParser) -> None:
    """A flag per TrainConfig field; a flag not given leaves no attribute (argparse.SUPPRESS), so that an explicit
    'none' (None) overrides the YAML file, the recipe or the resumed run."""
    from gcvit.train import TrainConfig

    for f in dataclasses.fields(TrainConfig):
        flag = "--" + f.name.replace("_", "-")
        help_ = f"{_HELP[f.name]} (default: {f.default!r})" if f.name in _HELP else f"(default: {f.default!r})"
        kind = str(f.type)
        if kind == "bool":  # --strict-data and --no-strict-data: either overrides the YAML file
            p.add_argument(flag, action=argparse.BooleanOptionalAction, default=argparse.SUPPRESS, help=help_)
        elif f.name == "model_overrides":
            p.add_argument(
                "--model-override",
                dest="model_overrides",
                action="append",
                default=argparse.SUPPRESS,
                metavar="KEY=VALUE",
                help="model config field, e.g. embed_dim=48 or depths=[1,1,2,1] (repeatable; changes that field of "
                "the model --config or the digits default describes)",
            )
        else:
            base = kind.removesuffix(" | None")
            parse = _PARSERS[base] if base in _PARSERS else str
            optional = or_none(parse) if kind.endswith("| None") else parse
            p.add_argument(flag, type=optional, default=argparse.SUPPRESS, help=help_)


def _overrides(args: argparse.Namespace) -> dict[str, Any]:
    """The TrainConfig fields given on the command line."""
    import yaml

    from gcvit.train import TrainConfig

    names = {f.name for f in dataclasses.fields(TrainConfig)}
    given = {k: v for k, v in vars(args).items() if k in names}  # only flags given (SUPPRESS), 'none' included
    if "model_overrides" in given:
        pairs = [item.split("=", 1) for item in given["model_overrides"]]
        if any(len(p) != 2 for p in pairs):
            raise ValueError(f"--model-override needs KEY=VALUE, got {given['model_overrides']}")
        given["model_overrides"] = {k: yaml.safe_load(v) for k, v in pairs}
    _check_data_flags(given, args)
    if ("data_dir" in given or "train_dir" in given) and "data" not in given:
        given["data"] = "folder"  # over a --config file's data: digits
    return given


def _check_data_flags(given: dict[str, Any], args: argparse.Namespace) -> None:
    """Data folder flags that cannot go together, named as the user typed them (TrainConfig names its fields): a
    folder flag needs its partner from a flag, the --config file or the resumed run."""
    from pathlib import Path

    from gcvit.train.config import read_yaml

    named = [k for k in ("data_dir", "train_dir", "val_dir") if given.get(k)]
    if "data_dir" in named and len(named) > 1:
        flags = " and ".join("--" + k.replace("_", "-") for k in named)
        raise ValueError(f"give --data-dir or --train-dir with --val-dir, not both (got {flags})")
    settled: dict[str, Any] = {}  # what the flags override
    resumed = Path(getattr(args, "resume", None) or "", "config.yaml")
    for path in (resumed if resumed.is_file() else None, getattr(args, "config", None)):
        settled |= read_yaml(path) if path else {}
    for flag, partner in (("val_dir", "train_dir"), ("train_dir", "val_dir")):
        if flag in named and not (given[partner] if partner in given else settled.get(partner)):
            a, b = "--" + flag.replace("_", "-"), "--" + partner.replace("_", "-")
            raise ValueError(f"{a} needs {b} (or use --data-dir alone, split by --val-fraction)")


def _train(args: argparse.Namespace) -> None:
    from pathlib import Path

    from gcvit.train import resolve_config, train
    from gcvit.train.config import read_yaml

    saved = Path(args.resume or "", "config.yaml")
    if args.resume and not saved.is_file():
        raise FileNotFoundError(f"--resume {args.resume}: expected a run folder holding config.yaml; there is none")
    base = read_yaml(saved) if args.resume else None  # a resumed run keeps its settings
    given = _overrides(args)
    if args.resume and "out_dir" in given and Path(given["out_dir"]).resolve() != Path(args.resume).resolve():
        raise ValueError(f"--out-dir does not apply to --resume: the run continues in its own folder {args.resume}")
    cfg = resolve_config(args.config, given, base=base)
    if args.threads is not None and args.threads < 1:
        raise ValueError(f"expected --threads of at least 1; got {args.threads}")
    if args.threads:
        import torch

        torch.set_num_threads(args.threads)
    progress = not args.no_progress and sys.stderr.isatty()  # no bars in a log file or a pipe
    result = train(cfg, resume=args.resume, progress=progress)
    if int(os.environ.get("RANK", "0")) != 0:  # under torchrun the first process reports, as it logs
        return
    run = result.run_dir
    which = "EMA" if result.best_weights == "ema.safetensors" else "raw"
    print(
        f"done: {result.epochs_done} epochs, best val top-1 {result.best_top1:.2f}% ({which} weights, epoch "
        f"{result.best_epoch}) -> {run}"
    )
    print(f"checkpoints: {run / 'best'}, {run / 'last'}; metrics: {run / 'metrics.csv'}; plots: {run / 'plots'}")


def _eval(args: argparse.Namespace) -> None:
    from pathlib import Path

    from gcvit.train.evaluate import evaluate

    base = Path(args.checkpoint) if Path(args.checkpoint).is_dir() else Path(args.checkpoint).parent
    base = base.parent if base.name in ("best", "last") else base  # the run folder, where there is one
    if args.out_dir is None:  # next to the run's other plots
        args.out_dir = base / "plots" if (base / "plots").is_dir() else base
    data, split = _eval_data(args, base)
    report = evaluate(
        args.checkpoint,
        data,
        batch_size=args.batch_size,
        device=args.device,
        out_dir=args.out_dir,
        plot_name="confusion.png" if args.data is None else f"confusion_{_data_name(data, split)}.png",
        val_fraction=args.val_fraction,
        seed=args.seed,
        split=split,
    )
    top5 = f"  top-5 {report.top5:.2f}%" if len(report.per_class) > 5 else ""  # 100% with 5 classes or fewer
    print(f"{report.num_samples} images: top-1 {report.top1:.2f}%{top5}")
    for name, acc in report.per_class.items():
        print(f"  {name:>12s}  {acc:6.2f}%")
    if report.confusion_png:
        print(f"confusion matrix: {report.confusion_png}")


def _data_name(data: str, split: bool) -> str:
    """The data in a file name: 'digits', a folder's name ('faces'), '_val' added for its val split."""
    from pathlib import Path

    name = "digits" if data == "digits" else Path(data).expanduser().resolve().name or "data"
    name = re.sub(r"[^\w.-]+", "_", name)
    return f"{name}_val" if split and data != "digits" else name


def _eval_data(args: argparse.Namespace, run_dir: Any) -> tuple[str, bool]:
    """What `gcvit eval` scores: --data if given (a folder whole, or its seeded val split when --val-fraction or
    --seed is given too), else the validation data of the run (its config.yaml), as trained: the digits or folder
    split with the run's val_fraction and seed, or its val_dir. Fills in --val-fraction and --seed from the run where
    they were not given. Returns (data, whether to take the folder's seeded val split)."""
    from gcvit.train.config import read_yaml

    saved = run_dir / "config.yaml"
    run = read_yaml(saved) if saved.is_file() else {}
    split_asked = args.val_fraction is not None or args.seed is not None
    args.val_fraction = run.get("val_fraction", 0.2) if args.val_fraction is None else args.val_fraction
    args.seed = run.get("seed", 0) if args.seed is None else args.seed
    if args.data is not None:
        return args.data, split_asked and args.data != "digits"
    if run.get("data") == "folder":
        return (run["val_dir"], False) if run.get("val_dir") else (run["data_dir"], True)
    return "digits", False


def _predict(args: argparse.Namespace) -> int:
    from gcvit.train.evaluate import predict

    skipped: list[tuple[str, str]] = []
    for file, top in predict(args.inputs, args.model, topk=args.topk, device=args.device, skipped=skipped):
        print(file + "  " + "  ".join(f"{label}:{p:.3f}" for label, p in top))
    for file, why in skipped:
        print(f"gcvit: skipped {file}: not a readable image ({why})", file=sys.stderr)
    return 1 if skipped else 0


def add_subcommands(subparsers: Any) -> None:
    """Add `train`, `eval` and `predict` to the `gcvit` command's subparsers."""
    p = subparsers.add_parser("train", help=COMMANDS["train"])
    p.add_argument("--config", default=None, help="YAML file of training options (flags override it)")
    p.add_argument("--resume", default=None, metavar="RUN_DIR", help="continue the run in RUN_DIR from last/")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    p.add_argument("--threads", type=int, default=None, help="CPU threads for torch (1 is faster on a busy machine)")
    _add_config_flags(p)
    p.set_defaults(func=_train)

    p = subparsers.add_parser("eval", help=COMMANDS["eval"], formatter_class=DefaultsFormatter)
    p.add_argument("checkpoint", help="run folder, checkpoint folder (best/, last/) or .safetensors with config.json")
    p.add_argument(
        "--data",
        default=None,
        help="'digits' (its val split) or an image folder of class folders (default: the run's own validation data)",
    )
    p.add_argument("--batch-size", type=int, default=128)
    p.add_argument("--device", default="cpu")
    p.add_argument(
        "--out-dir",
        default=None,
        help="folder of the confusion matrix: confusion.png for the run's own validation data, "
        "confusion_<data>.png for --data (digits, or the folder's name, with _val for its split), so the run's own "
        "plot is never overwritten (default: the run's plots folder, else the checkpoint's own folder)",
    )
    p.add_argument(
        "--val-fraction",
        type=float,
        default=None,
        help="validation split of the digits, of the run's --data-dir, or of a --data folder (given with --data: "
        "score only that folder's seeded val split, as training would split it; default: the run's)",
    )
    p.add_argument("--seed", type=parse_seed, default=None, help="seed of that split (default: the run's)")
    p.set_defaults(func=_eval)

    p = subparsers.add_parser(
        "predict",
        help=COMMANDS["predict"],
        description="Print the top classes of each image. Files that cannot be read as images are named on stderr, "
        "one line each, after the others' predictions, and the exit status is then 1.",
        formatter_class=DefaultsFormatter,
    )
    p.add_argument("inputs", nargs="+", help="image files or folders")
    p.add_argument("--model", required=True, help="run folder, checkpoint, .safetensors, or a model name")
    p.add_argument("--topk", type=int, default=5)
    p.add_argument("--device", default="cpu")
    p.set_defaults(func=_predict)
