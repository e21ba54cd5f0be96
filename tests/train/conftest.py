"""Fixtures of the tests of gcvit.train, each made once per session (once per pytest-xdist worker): an
uninterrupted 3-epoch `gcvit train` run, and a folder of drawn shapes with three unreadable files."""

from __future__ import annotations

import random
from pathlib import Path

import pytest

from tests.train.helpers import BAD_FILES, SHAPES, run_train


@pytest.fixture(scope="session")
def uninterrupted(tmp_path_factory: pytest.TempPathFactory) -> Path:
    run = tmp_path_factory.mktemp("uninterrupted") / "run"
    done = run_train(run)
    assert done.returncode == 0, done.stderr
    return run


@pytest.fixture(scope="session")
def shapes(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """3 classes x 12 drawn 32x32 shapes (random colours, sizes, positions), plus three unreadable files: a truncated
    JPEG, a text file named .png and an empty .png."""
    from PIL import Image, ImageDraw

    root = tmp_path_factory.mktemp("shapes")
    rng = random.Random(0)
    for name in SHAPES:
        (root / name).mkdir()
        for i in range(12):
            bg = tuple(rng.randrange(0, 100) for _ in range(3))
            fg = tuple(rng.randrange(150, 256) for _ in range(3))
            image = Image.new("RGB", (32, 32), bg)
            draw = ImageDraw.Draw(image)
            r = rng.randint(7, 12)
            cx, cy = rng.randint(r + 1, 31 - r), rng.randint(r + 1, 31 - r)
            if name == "circle":
                draw.ellipse((cx - r, cy - r, cx + r, cy + r), fill=fg)
            elif name == "square":
                draw.rectangle((cx - r, cy - r, cx + r, cy + r), fill=fg)
            else:
                draw.polygon([(cx, cy - r), (cx - r, cy + r), (cx + r, cy + r)], fill=fg)
            image.save(root / name / f"{i:02d}.{'jpg' if i % 3 == 0 else 'png'}", quality=95)
    whole = root / "whole.jpg"
    Image.effect_noise((64, 64), 60).convert("RGB").save(whole, quality=95)
    data = whole.read_bytes()
    whole.unlink()
    (root / BAD_FILES[0]).write_bytes(data[: len(data) // 2])
    (root / BAD_FILES[1]).write_text("not an image, just text with a .png name\n")
    (root / BAD_FILES[2]).write_bytes(b"")
    return root
