"""Tests for gcvit.data: datasets, the bad-file check, transforms, batch mixing and loaders."""

from __future__ import annotations

import io
import logging
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

pytest.importorskip("sklearn")

from gcvit.data import (
    DataError,
    DigitsDataset,
    ImageFolderDataset,
    build_loader,
    check_image,
    check_same_classes,
    eval_transform,
    mixup_cutmix,
    parse_randaugment,
    set_epoch,
    split_image_folder,
    train_transform,
)

MEAN, STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)


# ---------------------------------------------------------------- digits


def test_digits_split_sizes_and_disjoint() -> None:
    train, val, full = DigitsDataset("train"), DigitsDataset("val"), DigitsDataset("all")
    assert len(full) == 1797
    assert len(val) == 360 and len(train) == 1437  # sklearn rounds the test share up: ceil(0.2 * 1797)
    assert set(train.indices).isdisjoint(val.indices)
    assert sorted([*train.indices, *val.indices]) == list(range(1797))
    assert train.classes == [str(d) for d in range(10)]


def test_digits_split_is_stratified() -> None:
    full, val = DigitsDataset("all"), DigitsDataset("val", val_fraction=0.25)
    total, in_val = Counter(full.targets), Counter(val.targets)
    for label in range(10):
        assert abs(in_val[label] - 0.25 * total[label]) <= 1


def test_digits_split_depends_only_on_seed() -> None:
    a, b, c = DigitsDataset("val", seed=1), DigitsDataset("val", seed=1), DigitsDataset("val", seed=2)
    assert a.indices.tolist() == b.indices.tolist()
    assert a.indices.tolist() != c.indices.tolist()


def test_digits_images_are_rgb_of_img_size() -> None:
    image, label = DigitsDataset("val", img_size=40)[0]
    assert image.mode == "RGB" and image.size == (40, 40) and isinstance(label, int)
    pixels = np.asarray(image)
    assert pixels.min() == 0 and pixels.max() > 200  # 0..16 scaled to 0..255
    wide, _ = DigitsDataset("val", img_size=(24, 48))[0]
    assert wide.size == (48, 24)  # PIL reports (W, H)
    tensor, _ = DigitsDataset("val", img_size=32, transform=eval_transform(32, MEAN, STD, crop_pct=1.0))[0]
    assert tensor.shape == (3, 32, 32) and tensor.dtype == torch.float32


def test_digits_rejects_unknown_split() -> None:
    with pytest.raises(ValueError, match="'test'"):
        DigitsDataset("test")


# ---------------------------------------------------------------- image folders


def _save(path: Path, fmt: str, seed: int) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    pixels = np.random.default_rng(seed).integers(0, 256, (20, 24, 3), dtype=np.uint8)
    Image.fromarray(pixels).save(path, fmt)


def _truncated_jpeg(path: Path) -> None:
    buffer = io.BytesIO()
    Image.fromarray(np.full((20, 24, 3), 128, np.uint8)).save(buffer, "JPEG")
    path.write_bytes(buffer.getvalue()[:-2])  # only the end-of-image marker missing: verify() passes, load() fails


def _make_folder(root: Path, per_class: int = 4, classes: tuple[str, ...] = ("cat", "dog")) -> None:
    for c, name in enumerate(classes):
        for i in range(per_class):
            fmt = "PNG" if i % 2 else "JPEG"
            _save(root / name / f"{i}.{fmt.lower()}", fmt, seed=10 * c + i)


@pytest.fixture
def folder_with_bad_files(tmp_path: Path) -> tuple[Path, list[str]]:
    root = tmp_path / "images"
    _make_folder(root)
    _truncated_jpeg(root / "cat" / "truncated.jpeg")
    (root / "dog" / "text.png").write_text("this is not a png")
    (root / "dog" / "empty.jpg").write_bytes(b"")
    (root / "dog" / "notes.txt").write_text("ignored: not an image extension")
    return root, ["truncated.jpeg", "text.png", "empty.jpg"]


def test_image_folder_reads_good_files(tmp_path: Path) -> None:
    _make_folder(tmp_path)
    dataset = ImageFolderDataset(tmp_path, transform=eval_transform(16, MEAN, STD))
    assert dataset.classes == ["cat", "dog"] and len(dataset) == 8 and dataset.skipped == []
    assert dataset.targets == [0, 0, 0, 0, 1, 1, 1, 1]
    image, label = dataset[5]
    assert image.shape == (3, 16, 16) and label == 1


def test_every_image_name_pillow_opens_counts_and_other_files_are_counted_in_the_log(tmp_path: Path, caplog) -> None:
    """.jfif and .jpe are JPEGs (Windows saves them), .pnm/.pbm, .tga and .ico are images too: none is left out
    without a word. Files with other names are ignored and counted in one log line."""
    _make_folder(tmp_path, per_class=2)
    for name, fmt in (("a.jfif", "JPEG"), ("b.JPE", "JPEG"), ("c.pnm", "PPM"), ("d.tga", "TGA"), ("e.ico", "ICO")):
        _save(tmp_path / "cat" / name, fmt, seed=len(name))
    (tmp_path / "dog" / "notes.txt").write_text("not an image")
    (tmp_path / "dog" / "labels.csv").write_text("x")
    (tmp_path / "dog" / "README").write_text("x")
    with caplog.at_level(logging.INFO, logger="gcvit.data"):
        dataset = ImageFolderDataset(tmp_path)
    assert dataset.targets == [0] * 7 + [1] * 2 and dataset.skipped == []
    assert "ignored 3 files not named as images (1 .csv, 1 .txt, 1 no extension)" in caplog.text


def test_a_folder_that_cannot_be_listed_is_skipped_and_named(tmp_path: Path, monkeypatch, caplog) -> None:
    """os.walk drops a sub-folder it cannot list (no permission) without a word unless asked: its images are now
    reported like unreadable files, and a strict run stops naming the folder."""
    import os

    _make_folder(tmp_path, per_class=2)
    _save(tmp_path / "cat" / "locked" / "x.png", "PNG", seed=7)
    scandir = os.scandir

    def locked(path: str | os.PathLike = "."):
        if Path(path).name == "locked":
            raise PermissionError(13, "Permission denied", str(path))
        return scandir(path)

    monkeypatch.setattr(os, "scandir", locked)
    with caplog.at_level(logging.WARNING, logger="gcvit.data"):
        dataset = ImageFolderDataset(tmp_path)
    assert len(dataset) == 4 and dataset.skipped == [tmp_path / "cat" / "locked"]
    assert "skipped 1 folders that cannot be listed" in caplog.text and "PermissionError" in caplog.text
    with pytest.raises(DataError, match=r"1 folders cannot be listed:\n  .*locked: PermissionError: Permission denied"):
        ImageFolderDataset(tmp_path, strict=True)


@pytest.mark.parametrize(
    ("name", "values", "expected"),
    [
        ("float 0-1", np.linspace(0, 1, 8, dtype=np.float32), [0, 36, 73, 109, 146, 182, 219, 255]),
        ("float 0-255", np.linspace(0, 255, 8, dtype=np.float32), [0, 36, 73, 109, 146, 182, 219, 255]),
        ("int32 0-255", np.linspace(0, 255, 8).astype(np.int32), [0, 36, 72, 109, 145, 182, 218, 255]),
        ("int32 16-bit", np.linspace(0, 65535, 8).astype(np.int32), [0, 36, 73, 109, 146, 182, 219, 255]),
        ("int32 wider", np.linspace(0, 1e6, 8).astype(np.int32), [0, 36, 73, 109, 146, 182, 219, 255]),
        (
            "float nan inf",
            np.array([np.nan, np.inf, -np.inf, 0, 0.5, 1, 1, 1], np.float32),
            [0, 255, 0, 0, 128] + [255] * 3,
        ),
    ],
)
def test_float_and_32_bit_images_are_scaled_by_their_range(tmp_path: Path, name: str, values, expected) -> None:
    """A float or 32-bit integer TIFF holding 0-255 used to come out black (scaled as 16-bit), and one NaN pixel
    blackened the whole image."""
    from gcvit.data import load_rgb

    Image.fromarray(np.tile(values, (2, 1))).save(tmp_path / "x.tif")
    assert np.asarray(load_rgb(tmp_path / "x.tif"))[1, :, 0].tolist() == expected, name


def test_sixteen_bit_images_keep_their_tones(tmp_path: Path) -> None:
    """PIL clips 16-bit values when converting to RGB; they are scaled instead."""
    from gcvit.data import load_rgb

    ramp = np.tile(np.linspace(0, 65535, 8).astype(np.uint16), (4, 1))
    Image.fromarray(ramp).save(tmp_path / "g16.png")
    row = np.asarray(load_rgb(tmp_path / "g16.png"))[0, :, 0]
    assert row.tolist() == [0, 36, 73, 109, 146, 182, 219, 255]


def test_exif_rotated_photos_are_read_upright(tmp_path: Path) -> None:
    """A photo stored sideways with EXIF orientation 6 (as phones save them) is read as it is shown: upright."""
    from gcvit.data import load_rgb

    upright = np.zeros((30, 10, 3), np.uint8)
    upright[:5] = 255  # a white band at the top
    stored = Image.fromarray(upright).transpose(Image.Transpose.ROTATE_90)  # (10, 30) on disk; shown turned back
    exif = Image.Exif()
    exif[0x0112] = 6  # Orientation: rotate 90 degrees clockwise to display
    stored.save(tmp_path / "phone.jpg", exif=exif, quality=95)
    image = np.asarray(load_rgb(tmp_path / "phone.jpg"))
    assert image.shape == (30, 10, 3) and image[:5].mean() > 200 and image[10:].mean() < 50


def test_transforms_take_pil_images_of_any_mode_and_name_a_wrong_tensor() -> None:
    """An RGBA PNG opened by the user crashed deep in torch (4 channels against 3 means); it is made RGB first. A
    channels-last tensor is refused by name."""
    for transform in (eval_transform(16, MEAN, STD), train_transform(16, MEAN, STD, randaugment="rand-m9")):
        for image in (Image.new("RGBA", (20, 24), (10, 200, 30, 128)), Image.new("I;16", (20, 24), 65535)):
            out = transform(image)
            assert out.shape == (3, 16, 16)
        with pytest.raises(
            ValueError, match=r"expected a PIL image or a \(3, H, W\) tensor .* got a tensor of shape \(24, 20, 3\)"
        ):
            transform(torch.zeros(24, 20, 3, dtype=torch.uint8))
    white = eval_transform(16, (0, 0, 0), (1, 1, 1))(Image.new("I;16", (20, 24), 65535))
    assert torch.allclose(white, torch.ones(3, 16, 16))  # 16-bit full scale is white, not clipped


def test_linked_folders_are_followed_and_read_once(tmp_path: Path) -> None:
    """Links inside class folders are followed (a shared folder of extra images counts), but a link back up to the
    class folder, or a second link to a folder already read, adds no duplicate images (a loop used to add each
    image dozens of times)."""
    _make_folder(tmp_path / "images")
    _save(tmp_path / "extra" / "more.png", "PNG", seed=99)
    (tmp_path / "images" / "cat" / "loop").symlink_to(tmp_path / "images" / "cat", target_is_directory=True)
    (tmp_path / "images" / "cat" / "extra").symlink_to(tmp_path / "extra", target_is_directory=True)
    (tmp_path / "images" / "cat" / "extra2").symlink_to(tmp_path / "extra", target_is_directory=True)
    dataset = ImageFolderDataset(tmp_path / "images", transform=eval_transform(16, MEAN, STD))
    assert dataset.targets == [0] * 5 + [1] * 4


def test_bad_files_skipped_when_not_strict(folder_with_bad_files, caplog) -> None:
    root, bad_names = folder_with_bad_files
    with caplog.at_level(logging.WARNING, logger="gcvit.data"):
        dataset = ImageFolderDataset(root)
    assert len(dataset) == 8
    assert sorted(p.name for p in dataset.skipped) == sorted(bad_names)
    assert "skipped 3 unreadable image files" in caplog.text
    assert all(path.name not in bad_names for path, _ in dataset.samples)


def test_bad_files_raise_when_strict(folder_with_bad_files) -> None:
    root, bad_names = folder_with_bad_files
    with pytest.raises(DataError, match="3 of 11 image files cannot be read") as info:
        ImageFolderDataset(root, strict=True)
    for name in bad_names:
        assert name in str(info.value)
    assert "notes.txt" not in str(info.value)


def test_the_check_before_training_reads_images_as_the_loader_does(tmp_path: Path) -> None:
    """A PNG with a malformed EXIF block decodes, but the loader's EXIF turn fails on it: the check used to pass it,
    so --strict-data stopped the run mid-epoch (not before training) and a non-strict run swapped it silently."""
    _make_folder(tmp_path)
    bad = tmp_path / "cat" / "bad_exif.png"
    Image.new("RGB", (8, 8), (9, 9, 9)).save(bad, exif=b"Exif\x00\x00garbagegarbage")
    with Image.open(bad) as image:
        image.load()  # the pixels are fine
    assert check_image(bad) == "SyntaxError: not a TIFF file (header b'garbageg' not valid)"
    with pytest.raises(DataError, match=r"1 of 9 image files cannot be read:\n  .*cat/bad_exif.png: SyntaxError"):
        ImageFolderDataset(tmp_path, strict=True)
    assert ImageFolderDataset(tmp_path).skipped == [bad]


def test_decode_failure_at_load_time(tmp_path: Path, caplog) -> None:
    _make_folder(tmp_path)
    dataset = ImageFolderDataset(tmp_path)
    broken = dataset.samples[1][0]
    broken.write_bytes(b"corrupted after the check")
    with caplog.at_level(logging.WARNING, logger="gcvit.data"):
        image, label = dataset[1]
    assert np.array_equal(np.asarray(image), np.asarray(dataset[2][0]))  # the next sample, deterministically
    assert label == dataset.targets[2] and dataset.load_failures == [broken]
    assert broken.name in caplog.text
    dataset.strict = True
    with pytest.raises(DataError, match=broken.name):
        dataset[1]


def test_empty_class_folder_is_named(tmp_path: Path) -> None:
    _make_folder(tmp_path)
    (tmp_path / "bird").mkdir()
    (tmp_path / "bird" / "readme.txt").write_text("no images here")
    with pytest.raises(DataError, match=r"class folders with no image files .*\['bird'\]"):
        ImageFolderDataset(tmp_path)


def test_class_emptied_by_bad_files_is_named(tmp_path: Path) -> None:
    _make_folder(tmp_path)
    (tmp_path / "bird").mkdir()
    (tmp_path / "bird" / "only.png").write_bytes(b"")
    with pytest.raises(DataError, match=r"no readable image: \['bird'\]"):
        ImageFolderDataset(tmp_path)


def test_missing_root_and_root_without_classes(tmp_path: Path) -> None:
    with pytest.raises(DataError, match="does not exist"):
        ImageFolderDataset(tmp_path / "nowhere")
    with pytest.raises(DataError, match="has no class folders"):
        ImageFolderDataset(tmp_path)
    with pytest.raises(DataError, match=r"no folder for classes \['cow'\]"):
        _make_folder(tmp_path)
        ImageFolderDataset(tmp_path, classes=["cat", "cow"])


def test_check_same_classes(tmp_path: Path) -> None:
    _make_folder(tmp_path / "train", classes=("cat", "dog", "fox"))
    _make_folder(tmp_path / "val", classes=("cat", "dog", "owl"))
    train, val = ImageFolderDataset(tmp_path / "train"), ImageFolderDataset(tmp_path / "val")
    with pytest.raises(DataError, match=r"only in train: \['fox'\]; only in val: \['owl'\]"):
        check_same_classes(train, val)
    with pytest.raises(DataError, match="different order"):
        check_same_classes(["a", "b"], ["b", "a"])
    check_same_classes(train, ["cat", "dog", "fox"])


def test_split_image_folder_is_stratified_and_seeded(tmp_path: Path) -> None:
    _make_folder(tmp_path, per_class=10)
    train, val = split_image_folder(tmp_path, val_fraction=0.3, seed=0, val_transform=eval_transform(8, MEAN, STD))
    assert train.classes == val.classes == ["cat", "dog"]
    assert Counter(val.targets) == {0: 3, 1: 3} and Counter(train.targets) == {0: 7, 1: 7}
    assert {p for p, _ in train.samples}.isdisjoint(p for p, _ in val.samples)
    assert train.transform is None and val[0][0].shape == (3, 8, 8)
    again, _ = split_image_folder(tmp_path, val_fraction=0.3, seed=0)
    other, _ = split_image_folder(tmp_path, val_fraction=0.3, seed=1)
    assert again.samples == train.samples and other.samples != train.samples


# ---------------------------------------------------------------- transforms


def test_eval_transform_shape_and_crop_pct() -> None:
    pixels = np.random.default_rng(0).integers(0, 256, (48, 64, 3), dtype=np.uint8)
    image = Image.fromarray(pixels)
    full = eval_transform(32, MEAN, STD, crop_pct=1.0)(image)
    cropped = eval_transform(32, MEAN, STD, crop_pct=0.875)(image)
    squash = eval_transform((24, 40), MEAN, STD, crop_mode="squash", crop_pct=1.0)(image)
    assert full.shape == cropped.shape == (3, 32, 32) and squash.shape == (3, 24, 40)
    assert type(full) is torch.Tensor and full.dtype == torch.float32
    assert not torch.allclose(full, cropped)
    with pytest.raises(ValueError, match="crop_mode"):
        eval_transform(32, MEAN, STD, crop_mode="border")


def test_train_transform_output() -> None:
    image = Image.fromarray(np.random.default_rng(0).integers(0, 256, (50, 40, 3), dtype=np.uint8))
    transform = train_transform(
        (32, 48), MEAN, STD, randaugment="rand-m9-mstd0.5-inc1", color_jitter=0.4, random_erasing=1.0
    )
    torch.manual_seed(0)
    out = transform(image)
    assert out.shape == (3, 32, 48) and type(out) is torch.Tensor and out.dtype == torch.float32


def test_parse_randaugment() -> None:
    spec = parse_randaugment("rand-m9-n3-mstd0.5-inc1")
    assert (spec.magnitude, spec.num_ops, spec.magnitude_std) == (9, 3, 0.5)
    with pytest.raises(ValueError, match="unknown part 'x1'"):
        parse_randaugment("rand-m9-x1")
    with pytest.raises(ValueError, match=r"0\.\.10"):
        parse_randaugment("rand-m12")


@pytest.mark.parametrize(("mixup", "cutmix"), [(0.8, 1.0), (0.8, 0.0), (0.0, 1.0), (0.0, 0.0)])
def test_mixup_cutmix_targets(mixup: float, cutmix: float) -> None:
    torch.manual_seed(0)
    images, labels = torch.randn(6, 3, 16, 16), torch.tensor([0, 1, 2, 3, 4, 0])
    mix = mixup_cutmix(5, mixup, cutmix, label_smoothing=0.1)
    mixed, targets = mix(images, labels)
    assert mixed.shape == images.shape and targets.shape == (6, 5) and targets.dtype == torch.float32
    torch.testing.assert_close(targets.sum(dim=1), torch.ones(6))
    assert targets.min() >= 0.1 / 5 - 1e-6
    if mixup == cutmix == 0:
        assert torch.equal(mixed, images)
        torch.testing.assert_close(targets.argmax(dim=1), labels)
        torch.testing.assert_close(targets.max(dim=1).values, torch.full((6,), 0.9 + 0.02))


# ---------------------------------------------------------------- loaders


def test_build_loader_seeded_order_and_epochs() -> None:
    data = torch.utils.data.TensorDataset(torch.arange(20))

    def order(seed: int, epoch: int) -> list[int]:
        loader = build_loader(data, batch_size=4, train=True, seed=seed)
        set_epoch(loader, epoch)
        return torch.cat([batch for (batch,) in loader]).tolist()

    assert order(0, 0) == order(0, 0) and sorted(order(0, 0)) == list(range(20))
    assert order(0, 0) != order(0, 1) and order(0, 0) != order(1, 0)
    evaluation = build_loader(data, batch_size=6, train=False)
    assert [len(b) for (b,) in evaluation] == [6, 6, 6, 2]  # eval keeps the last batch, in order


def test_build_loader_distributed_and_workers() -> None:
    data = torch.utils.data.TensorDataset(torch.arange(20))
    halves = [build_loader(data, 2, train=True, distributed=True, num_replicas=2, rank=r) for r in (0, 1)]
    seen = [torch.cat([b for (b,) in loader]).tolist() for loader in halves]
    assert len(seen[0]) == len(seen[1]) == 10 and set(seen[0]).isdisjoint(seen[1])
    # evaluation split over 7 ranks: every sample exactly once (no padding repeats counted twice in the metrics)
    shares = [build_loader(data, 4, train=False, distributed=True, num_replicas=7, rank=r) for r in range(7)]
    counted = sorted(i for loader in shares for (b,) in loader for i in b.tolist())
    assert counted == list(range(20)) and sum(len(loader.sampler) for loader in shares) == 20
    with pytest.raises(RuntimeError, match="init_process_group"):
        build_loader(data, 2, train=True, distributed=True)
    with pytest.raises(ValueError, match="no full batch"):
        build_loader(data, 32, train=True)
    loader = build_loader(data, 5, train=True, num_workers=2, seed=0)
    assert loader.persistent_workers and sorted(torch.cat([b for (b,) in loader]).tolist()) == list(range(20))


def test_randaugment_is_timms() -> None:
    """timm's rand-m9-mstd0.5-inc1: two ops drawn from 15 (Invert and SolarizeAdd in, no identity), each applied
    with probability 0.5 at a magnitude drawn around 9 (std 0.5, clipped to 10); posterize keeps 1 bit at m = 9;
    torch's generator drives it, so a seed repeats an image exactly."""
    import statistics

    from PIL import Image

    from gcvit.data.randaugment import INCREASING_OPS, RandAugment, _Geometry

    names = set(INCREASING_OPS)
    assert len(names) == 15 and {"Invert", "SolarizeAdd", "PosterizeIncreasing"} <= names and "Identity" not in names
    spec = parse_randaugment("rand-m9-mstd0.5-inc1")
    ra = RandAugment(spec.magnitude, spec.num_ops, spec.magnitude_std, spec.increasing)
    applied: list[int] = []
    levels: list[float] = []

    def record(img: Image.Image, level: float, geometry: object) -> Image.Image:
        applied[-1] += 1
        levels.append(level)
        return img

    real_ops, ra.ops = ra.ops, [("record", record)]
    torch.manual_seed(0)
    image = Image.fromarray(np.random.default_rng(0).integers(0, 256, (24, 32, 3), dtype=np.uint8))
    for _ in range(4000):
        applied.append(0)
        ra(image)
    untouched = applied.count(0) / len(applied)
    assert 0.22 < untouched < 0.28 and 0.47 < applied.count(1) / len(applied) < 0.53  # Binomial(2, 0.5)
    assert abs(statistics.mean(levels) - 0.9) < 0.005 and abs(statistics.stdev(levels) - 0.05) < 0.005
    assert max(levels) <= 1.0
    posterized = np.asarray(INCREASING_OPS["PosterizeIncreasing"](image, 0.9, _Geometry((0, 0, 0), Image.BICUBIC)))
    assert set(np.unique(posterized)) <= {0, 128}
    ra.ops = real_ops
    outputs = []
    for seed in (1, 1, 2):
        torch.manual_seed(seed)
        outputs.append(np.asarray(ra(image)))
    assert np.array_equal(outputs[0], outputs[1]) and not np.array_equal(outputs[0], outputs[2])


@pytest.mark.parametrize("increasing", [True, False])
def test_every_randaugment_op_runs_at_both_ends_of_its_range(increasing: bool) -> None:
    """Level 0 and 1 (magnitude 0 and the clipped 10) for every op: posterize's 0 bits give black (Pillow 13
    refuses 0 bits), nothing raises, size and mode stay."""
    from PIL import Image

    from gcvit.data.randaugment import INCREASING_OPS, ORIGINAL_OPS, _Geometry

    image = Image.fromarray(np.random.default_rng(0).integers(0, 256, (24, 32, 3), dtype=np.uint8))
    geometry = _Geometry((124, 116, 104), Image.Resampling.BICUBIC)
    for name, op in (INCREASING_OPS if increasing else ORIGINAL_OPS).items():
        for level in (0.0, 1.0):
            out = op(image, level, geometry)
            assert out.size == image.size and out.mode == "RGB", (name, level)
    black = (INCREASING_OPS["PosterizeIncreasing"] if increasing else ORIGINAL_OPS["Posterize"])(
        image, 1.0 if increasing else 0.0, geometry
    )
    assert not np.asarray(black).any()


@pytest.mark.parametrize("increasing", [True, False])
@pytest.mark.parametrize("negate", [False, True])
def test_every_randaugment_op_gives_timms_pixels(increasing: bool, negate: bool, monkeypatch) -> None:
    """Each op at magnitudes 3 and 9, in each direction, with the mean colour as fill, against timm's AugmentOp of
    the same name applied with probability 1: the same pixels (strength, direction, threshold and fill)."""
    from PIL import Image

    from gcvit.data import randaugment
    from gcvit.data.randaugment import INCREASING_OPS, ORIGINAL_OPS, _Geometry

    auto_augment = pytest.importorskip("timm.data.auto_augment")
    monkeypatch.setattr(auto_augment.random, "random", lambda: 0.9 if negate else 0.1)  # timm negates above 0.5
    monkeypatch.setattr(randaugment, "_signed", lambda value: -value if negate else value)
    fill = (124, 116, 104)
    hparams = {"img_mean": fill, "interpolation": Image.Resampling.BICUBIC}
    image = Image.fromarray(np.random.default_rng(0).integers(0, 256, (24, 32, 3), dtype=np.uint8))
    for name, op in (INCREASING_OPS if increasing else ORIGINAL_OPS).items():
        for magnitude in (3, 9):
            theirs = auto_augment.AugmentOp(name, prob=1.0, magnitude=magnitude, hparams=hparams)(image)
            ours = op(image, magnitude / 10, _Geometry(fill, Image.Resampling.BICUBIC))
            assert np.array_equal(np.asarray(ours), np.asarray(theirs)), (name, magnitude)


def test_mixing_flip_and_randaugment_take_the_values_given() -> None:
    """The switch probability goes to CutMix and each alpha to its own mix; hflip is the flip's probability;
    'inc0' is timm's original op set, 'inc1' the increasing one."""
    from torchvision.transforms import v2

    mix = mixup_cutmix(5, 0.8, 1.0, switch_prob=0.9).mix
    assert mix.p == [pytest.approx(0.1), 0.9] and [type(t).__name__ for t in mix.transforms] == ["MixUp", "CutMix"]
    assert [t.alpha for t in mix.transforms] == [0.8, 1.0]
    assert not parse_randaugment("rand-m9-inc0").increasing and parse_randaugment("rand-m9-inc1").increasing
    flips = [t for t in train_transform(16, MEAN, STD, hflip=0.3).transforms if isinstance(t, v2.RandomHorizontalFlip)]
    assert [f.p for f in flips] == [0.3]


def test_mixing_takes_any_integer_labels_and_names_what_it_cannot_mix() -> None:
    """int32 labels (collated from NumPy) failed inside one_hot; uint8 images, an empty batch and bool labels failed
    deep in torch."""
    mix = mixup_cutmix(5, 0.8, 1.0, label_smoothing=0.1)
    images = torch.rand(4, 3, 8, 8)
    _, targets = mix(images, torch.tensor([0, 1, 2, 3], dtype=torch.int32))
    torch.testing.assert_close(targets.sum(1), torch.ones(4))
    for bad_images, labels, message in (
        (images.to(torch.uint8), torch.arange(4), "expected a batch of float images .* got torch.uint8"),
        (images[:0], torch.arange(0), "expected a batch of float images .* 0 images"),
        (images[:2], torch.tensor([True, False]), r"labels must be int class indices in \[0, 5\), got torch.bool"),
    ):
        with pytest.raises(ValueError, match=message):
            mix(bad_images, labels)


def test_distributed_evaluation_refuses_a_rank_outside_the_world() -> None:
    """Rank 5 of 2 used to get rank 1's share, counted twice in the summed metrics; 0 replicas failed in range()."""
    for replicas, rank in ((2, 5), (2, -1), (0, 0)):
        with pytest.raises(ValueError, match=r"expected num_replicas >= 1 and rank in \[0, num_replicas\)"):
            build_loader(list(range(10)), 4, train=False, distributed=True, num_replicas=replicas, rank=rank)
