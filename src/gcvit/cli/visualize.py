"""`gcvit visualize`: argument parsing and printing around `gcvit.visualize`."""

from __future__ import annotations

import argparse
import dataclasses
from pathlib import Path
from typing import Any

from gcvit.cli.args import DefaultsFormatter, add_pretrained_argument

# this module's command and its line in `gcvit --help`
COMMANDS = {"visualize": "PNGs of what a model looks at: global and local attention, Grad-CAM"}


def _load(model: str, pretrained: bool | str, device: str) -> tuple[Any, str]:
    """(model, description) for a run folder / checkpoint / saved folder, or a registered name (random weights
    unless `pretrained`: True for its tag's, or a checkpoint path or URL)."""
    import torch

    from gcvit.loading import load
    from gcvit.train.distributed import require_cuda

    require_cuda(device)
    if Path(model).exists():
        if pretrained:
            raise ValueError(f"--pretrained applies to model names; {model} holds its own weights")
        net = load(model, device=device)
        return net, f"{net.model_name} from {net.pretrained_cfg.url}"
    torch.manual_seed(0)  # the same random weights every time
    net = load(model, pretrained=pretrained or False, device=device)
    if pretrained is True:
        return net, f"{model} (NVIDIA's ImageNet weights)"
    net.classes = [str(i) for i in range(net.num_classes)]  # ImageNet's names would not name these outputs
    if pretrained:
        return net, f"{model} from {pretrained}"
    return net, f"{model} (random weights: pass --pretrained for trained ones)"


def _read_image(path: str, model: Any) -> Any:
    """The image (an existing file: `_check_image_path`) read as training and `gcvit predict` read it (upright, any
    bit depth: `load_rgb`), as the model's preprocessing makes it: (1, 3, H, W)."""
    from gcvit.data import load_rgb
    from gcvit.train.evaluate import preprocess

    try:
        image = load_rgb(path)
    except (OSError, SyntaxError, ValueError) as e:  # what PIL raises for files it cannot read
        raise ValueError(f"{path} is not a readable image ({e})") from e
    return preprocess(model)(image)[None]


def _check_image_path(path: str) -> None:
    if Path(path).is_dir():
        raise ValueError(f"{path} is a folder; expected one image file")
    if not Path(path).is_file():
        raise FileNotFoundError(f"{path} does not exist; expected an image file")


def _class_index(text: str | None, classes: list[str]) -> int | None:
    if text is None:
        return None
    if text in classes:
        return classes.index(text)
    if text.isdigit() and int(text) < len(classes):
        return int(text)
    shown = classes if len(classes) <= 20 else f"0..{len(classes) - 1}"
    raise ValueError(f"--class {text!r} is not a class of this model; expected a name or index of {shown}")


def _cam_stage(maps: Any) -> int:
    """The last stage whose map is at least 7 tokens a side (the 7 x 7 last stage of a 224 px model), else 0: a
    1 x 1 or 2 x 2 map makes a Grad-CAM of one or four blocks."""
    sizes = [min(st.map_size) for st in maps.stages]
    return max((i for i, side in enumerate(sizes) if side >= 7), default=0)


def _visualize(args: argparse.Namespace) -> None:
    from gcvit import visualize as viz

    _check_image_path(args.image)  # a mistyped path fails before any weights are downloaded
    net, what = _load(args.model, args.pretrained, args.device)
    viz.require_gcvit(net)
    if args.img_size:
        if len(args.img_size) > 2:
            raise ValueError(f"--img-size takes H or H W; got {args.img_size}")
        size = (args.img_size[0], args.img_size[-1])  # the images' size; the model runs at any
        net.pretrained_cfg = dataclasses.replace(net.pretrained_cfg, img_size=size)
    x = _read_image(args.image, net).to(args.device)
    classes, pc = net.classes, net.pretrained_cfg
    n = len(net.levels)
    for flag, s in (("--stage", args.stage), ("--cam-stage", args.cam_stage)):
        if s is not None and not -n <= s < n:
            raise ValueError(f"{flag} {s} is out of range: {net.model_name} has {n} stages (expected {-n}..{n - 1})")
    cls = _class_index(args.cls, classes)

    maps = viz.attention_maps(net, x)
    grid = maps.stages[args.stage].grid
    window = tuple(args.window) if args.window else (grid[0] // 2, grid[1] // 2)
    cam_stage = _cam_stage(maps) if args.cam_stage is None else args.cam_stage
    cam = viz.grad_cam(net, x, cls, stage=cam_stage)
    image = viz.denormalize(x, pc.mean, pc.std)[0]
    out, stem, dpi = Path(args.out_dir), Path(args.image).stem, args.dpi
    local = viz.plot_local_attention(image, maps, out / f"{stem}_local.png", args.stage, window, args.query, dpi=dpi)
    files = [
        viz.plot_global_attention(image, maps, out / f"{stem}_global.png", dpi=dpi),
        local,
        viz.plot_grad_cam(image, cam, out / f"{stem}_gradcam.png", classes, dpi=dpi),
    ]
    top = int(maps.logits[0].argmax())
    p = float(maps.logits[0].softmax(-1)[top])
    print(f"{what}; input {tuple(x.shape[2:])}: predicted class {classes[top]} (p={p:.3f})")
    for st in maps.stages:
        kinds = f"{len(st.local_blocks)} local + {len(st.global_blocks)} global blocks"
        print(f"  stage {st.stage}: map {st.map_size}, {st.grid[0]}x{st.grid[1]} windows of {st.window_size}, {kinds}")
    print(f"  Grad-CAM of class {classes[int(cam.class_idx[0])]} at stage {cam.stage}")
    for f in files:
        print(f"wrote {f}")


def add_subcommands(subparsers: Any) -> None:
    """Add `visualize` to the `gcvit` command's subparsers."""
    p = subparsers.add_parser("visualize", help=COMMANDS["visualize"], formatter_class=DefaultsFormatter)
    p.add_argument("image", help="an image file")
    p.add_argument("--model", default="gcvit_xxtiny", help="model name (random weights unless --pretrained) or run")
    add_pretrained_argument(p, False, "with a model name: ")
    p.add_argument("--out-dir", default="visualize", help="folder for the PNGs (default: ./visualize)")
    p.add_argument("--stage", type=int, default=0, help="stage of the local-attention window (default 0)")
    p.add_argument("--window", type=int, nargs=2, metavar=("ROW", "COL"), help="window of --stage (default: centre)")
    p.add_argument("--query", type=int, nargs=2, metavar=("ROW", "COL"), help="query token in the window")
    p.add_argument(
        "--cam-stage", type=int, default=None, help="stage Grad-CAM explains (default: the last with a map >= 7x7)"
    )
    p.add_argument(
        "--class",
        dest="cls",
        metavar="CLASS",
        default=None,
        help="class for Grad-CAM, name or index (default: predicted)",
    )
    p.add_argument(
        "--img-size",
        type=int,
        nargs="+",
        metavar="SIZE",
        default=None,
        help="run at this size, H [W] (default: native)",
    )
    p.add_argument("--dpi", type=int, default=100, help="resolution of the PNGs")
    p.add_argument("--device", default="cpu")
    p.set_defaults(func=_visualize)
