"""What `gcvit train --data-dir FOLDER` gives with no other flag, on two small folders made here, beside an RBF SVM on
the pixels of the same split.

The folders stand in for what users bring (no data set can be downloaded here), made reproducibly from what the
packages ship:
- pairs: 200 grey 25x25 images, two classes (scikit-learn's scanned 3s and 8s, 100 each), as a user's 200 small
  faces against background;
- crops: 480 crops of 8 photographs (the halves of scikit-learn's two sample photos and of matplotlib's two sample
  pictures), 60 each, at random places and scales, resized to 64 px, saved as JPEG or PNG, a quarter of them grey.

For each: the run's time, `gcvit eval RUN` (the weights best/ keeps), the raw weights of last/, and the SVM.

python benchmarks/small_data.py [--out /tmp/small_data] [--only pairs crops] [--flags ...]
"""

from __future__ import annotations

import argparse
import os
import random
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
from PIL import Image


def make_pairs(root: Path) -> Path:
    from sklearn.datasets import load_digits

    digits = load_digits()
    for label, name in ((3, "three"), (8, "eight")):
        (root / name).mkdir(parents=True, exist_ok=True)
        images = digits.images[digits.target == label][:100]
        for i, image in enumerate(images):
            pixels = (255 - image * 255 / 16).astype(np.uint8)  # dark strokes on white, as a scan
            Image.fromarray(pixels, "L").resize((25, 25), Image.Resampling.BILINEAR).save(root / name / f"{i:03d}.png")
    return root


def _photos() -> list[tuple[str, Image.Image]]:
    """Eight pictures: the left and right halves of four."""
    import matplotlib.cbook
    from sklearn.datasets import load_sample_images

    sample = load_sample_images()
    whole = [(Path(f).stem, Image.fromarray(im)) for f, im in zip(sample.filenames, sample.images)]
    for name in ("grace_hopper.jpg", "Minduka_Present_Blue_Pack.png"):
        with matplotlib.cbook.get_sample_data(name) as f:
            whole.append((Path(name).stem.split("_")[0].lower(), Image.open(f).convert("RGB")))
    halves = []
    for name, image in whole:
        w, h = image.size
        halves += [(f"{name}_left", image.crop((0, 0, w // 2, h))), (f"{name}_right", image.crop((w // 2, 0, w, h)))]
    return halves


def make_crops(root: Path, per_class: int = 60, seed: int = 0) -> Path:
    rng = random.Random(seed)
    for name, photo in _photos():
        (root / name).mkdir(parents=True, exist_ok=True)
        w, h = photo.size
        for i in range(per_class):
            side = rng.randint(min(w, h) // 6, min(w, h) // 2)
            x, y = rng.randint(0, w - side), rng.randint(0, h - side)
            crop = photo.crop((x, y, x + side, y + side)).resize((64, 64), Image.Resampling.BICUBIC)
            if rng.random() < 0.25:
                crop = crop.convert("L")
            if rng.random() < 0.5:
                crop.save(root / name / f"{i:03d}.jpg", quality=90)
            else:
                crop.save(root / name / f"{i:03d}.png")
    return root


def svm_top1(folder: Path, size: int) -> float:
    """RBF SVM (scikit-learn's defaults, features scaled) on the pixels, grey images as RGB, on the split
    `gcvit train` makes of the folder (val_fraction 0.2, seed 0)."""
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler
    from sklearn.svm import SVC

    from gcvit.data import split_image_folder

    train, val = split_image_folder(folder, 0.2, 0)

    def features(part: object) -> tuple[np.ndarray, np.ndarray]:
        x = [np.asarray(Image.open(p).convert("RGB").resize((size, size))).ravel() / 255 for p, _ in part.samples]
        return np.stack(x), np.array([label for _, label in part.samples])

    svm = make_pipeline(StandardScaler(), SVC()).fit(*features(train))
    x, y = features(val)
    return 100 * float((svm.predict(x) == y).mean())


def _gcvit(*args: str) -> str:
    done = subprocess.run([sys.executable, "-m", "gcvit.cli", *args], capture_output=True, text=True)
    if done.returncode != 0:
        raise SystemExit(f"gcvit {' '.join(args)} failed:\n{done.stderr}")
    return done.stdout + done.stderr


def _top1(output: str) -> float:
    line = next(line for line in output.splitlines() if "images: top-1" in line)
    return float(line.split("top-1 ")[1].split("%")[0])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=Path("/tmp/small_data"))
    parser.add_argument("--only", nargs="+", default=["pairs", "crops"], choices=["pairs", "crops"])
    parser.add_argument("--flags", nargs=argparse.REMAINDER, default=[], help="more `gcvit train` flags")
    args = parser.parse_args()
    makers = {"pairs": (make_pairs, 25), "crops": (make_crops, 64)}
    rows = []
    for name in args.only:
        make, size = makers[name]
        folder = args.out / "data" / name
        if not folder.is_dir():
            make(folder)
        run = args.out / "runs" / f"{name}-{int(time.time())}"
        t0 = time.perf_counter()
        log = _gcvit("train", "--data-dir", str(folder), "--out-dir", str(run), "--no-progress", *args.flags)
        seconds = time.perf_counter() - t0
        header = next(line for line in log.splitlines() if line.startswith("model "))
        kept = _top1(_gcvit("eval", str(run)))
        raw = _top1(_gcvit("eval", str(run / "last" / "model.safetensors"), "--out-dir", str(run / "raw")))
        svm = svm_top1(folder, size)
        done = next(line for line in log.splitlines() if line.startswith("done:"))
        rows.append((name, header, done, seconds, kept, raw, svm))
    print(f"CPU: {_cpu()}, torch threads: {os.environ.get('OMP_NUM_THREADS', 'default')}")
    for name, header, done, seconds, kept, raw, svm in rows:
        print(f"{name}: {header}\n  {done}")
        print(f"  {seconds:.0f} s; eval (best/) {kept:.1f}%, raw last/ {raw:.1f}%, SVM {svm:.1f}%")


def _cpu() -> str:
    try:
        lines = Path("/proc/cpuinfo").read_text().splitlines()
        return next(line.split(":", 1)[1].strip() for line in lines if line.startswith("model name"))
    except (OSError, StopIteration):
        return "unknown"


if __name__ == "__main__":
    main()
