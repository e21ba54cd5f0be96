"""Semantic segmentation data: image and mask folders as users bring them (`SegmentationFolder`), ADE20K's layout, the
UPerNet recipe's training transform, and the digit scenes written with semantic masks."""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from torchvision import tv_tensors

from gcvit.data import DataError
from gcvit.data.digit_scenes import SEGMENTATION_CLASSES, digit_scenes, write_segmentation_scenes
from gcvit.data.segmentation import (
    ADE20K_NUM_CLASSES,
    CatMaxRatioCrop,
    SegmentationFolder,
    ade20k_paths,
    photometric_distortion,
    read_class_names,
    seg_eval_transform,
    seg_train_transform,
)


def _save_mask(path: Path, labels: np.ndarray, mode: str = "L") -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    if mode == "P":  # palette indices are the labels; the colours say nothing
        mask = Image.fromarray(labels.astype(np.uint8), "P")
        mask.putpalette(list(np.random.default_rng(0).integers(0, 256, 768)))
    else:
        mask = Image.fromarray(labels.astype(np.uint8), "L")
    mask.save(path)


def _save_image(path: Path, H: int, W: int, value: int = 100) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.full((H, W, 3), value, np.uint8)).save(path)


def _labels(H: int, W: int, top: int = 3) -> np.ndarray:
    return np.arange(H * W).reshape(H, W) % (top + 1)


def _folder(root: Path) -> tuple[Path, Path]:
    """A JPEG, a PNG and a grey PNG of three sizes, with masks in L, P and L mode."""
    images, masks = root / "images", root / "masks"
    _save_image(images / "a.jpg", 40, 60)
    _save_image(images / "b.png", 30, 20)
    images.mkdir(exist_ok=True)
    Image.fromarray(np.full((25, 35), 7, np.uint8), "L").save(images / "c.png")
    _save_mask(masks / "a.png", _labels(40, 60))
    _save_mask(masks / "b.png", _labels(30, 20), "P")
    _save_mask(masks / "c.png", np.full((25, 35), 255))
    return images, masks


def test_images_and_masks_pair_by_name_across_formats_modes_and_sizes(tmp_path: Path) -> None:
    images, masks = _folder(tmp_path)
    data = SegmentationFolder(images, masks, num_classes=4)
    assert [(i.name, m.name) for i, m in data.pairs] == [("a.jpg", "a.png"), ("b.png", "b.png"), ("c.png", "c.png")]
    assert data.classes == ["0", "1", "2", "3"] and not data.dropped
    for (image, mask), (H, W) in zip(data, [(40, 60), (30, 20), (25, 35)]):
        assert isinstance(image, tv_tensors.Image) and image.dtype == torch.uint8 and image.shape == (3, H, W)
        assert isinstance(mask, tv_tensors.Mask) and mask.dtype == torch.int64 and mask.shape == (H, W)
    assert torch.equal(data[1][1], torch.from_numpy(_labels(30, 20)))  # the palette's indices, not its colours
    assert torch.equal(data[2][0], torch.full((3, 25, 35), 7, dtype=torch.uint8))  # grey made RGB
    assert (data[2][1] == 255).all()


def test_reduce_zero_label_ignores_0_and_moves_every_other_label_down_by_one(tmp_path: Path) -> None:
    _save_image(tmp_path / "i" / "x.png", 2, 3)
    _save_mask(tmp_path / "m" / "x.png", np.array([[0, 1, 2], [150, 255, 0]]))
    data = SegmentationFolder(tmp_path / "i", tmp_path / "m", num_classes=150, reduce_zero_label=True)
    assert data[0][1].tolist() == [[255, 0, 1], [149, 255, 255]]


def test_a_transform_gets_image_and_mask_together(tmp_path: Path) -> None:
    images, masks = _folder(tmp_path)
    data = SegmentationFolder(images, masks, seg_eval_transform(), num_classes=4)
    image, mask = data[0]
    assert image.dtype == torch.float32 and torch.allclose(image, torch.full_like(image, 100 / 255), atol=0.02)
    assert mask.dtype == torch.int64 and torch.equal(mask, torch.from_numpy(_labels(40, 60)))


def test_class_names_come_from_a_file_one_a_line(tmp_path: Path) -> None:
    (tmp_path / "names.txt").write_text("sky\n\n  road \nwall\n\n")
    names = read_class_names(tmp_path / "names.txt")
    assert names == ["sky", "road", "wall"]
    _save_image(tmp_path / "i" / "x.png", 2, 2)
    _save_mask(tmp_path / "m" / "x.png", np.zeros((2, 2)))
    assert SegmentationFolder(tmp_path / "i", tmp_path / "m", num_classes=3, class_names=names).classes == names
    with pytest.raises(DataError, match="class_names has 3 names; expected num_classes=4"):
        SegmentationFolder(tmp_path / "i", tmp_path / "m", num_classes=4, class_names=names)
    (tmp_path / "empty.txt").write_text("\n \n")
    with pytest.raises(DataError, match="empty.txt holds no class names"):
        read_class_names(tmp_path / "empty.txt")


# Bad input: left out and counted (refused with strict_data), or refused naming the file


def test_an_image_without_a_mask_is_left_out_and_counted_or_refused_when_strict(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    images, masks = _folder(tmp_path)
    _save_image(images / "lonely.jpg", 8, 8)
    with caplog.at_level(logging.WARNING):
        data = SegmentationFolder(images, masks, num_classes=4)
    assert len(data) == 3 and data.dropped == {"images without a mask": 1}
    assert "1 images without a mask" in caplog.records[-1].getMessage()
    with pytest.raises(DataError, match=r"lonely.jpg has no mask; expected .*masks/lonely.png"):
        SegmentationFolder(images, masks, num_classes=4, strict_data=True)


def test_a_mask_without_an_image_is_ignored_and_counted_even_when_strict(tmp_path: Path) -> None:
    images, masks = _folder(tmp_path)
    _save_mask(masks / "orphan.png", np.zeros((4, 4)))
    for strict in (False, True):
        data = SegmentationFolder(images, masks, num_classes=4, strict_data=strict)
        assert len(data) == 3 and data.dropped == {"masks without an image (ignored)": 1}
        assert "orphan.png has no image" in data.skipped[0]


def test_a_mask_of_another_size_than_its_image_is_left_out_or_refused_when_strict(tmp_path: Path) -> None:
    images, masks = _folder(tmp_path)
    _save_image(images / "d.png", 10, 12)
    _save_mask(masks / "d.png", np.zeros((12, 10)))
    data = SegmentationFolder(images, masks, num_classes=4)
    assert len(data) == 3 and data.dropped == {"masks of another size than their image": 1}
    with pytest.raises(DataError, match=r"d.png is 12x10 \(height x width\) but its image .*d.png is 10x12"):
        SegmentationFolder(images, masks, num_classes=4, strict_data=True)


def test_an_unreadable_image_is_left_out_or_refused_when_strict(tmp_path: Path) -> None:
    images, masks = _folder(tmp_path)
    (images / "broken.jpg").write_bytes(b"not a JPEG at all")
    _save_mask(masks / "broken.png", np.zeros((4, 4)))
    data = SegmentationFolder(images, masks, num_classes=4)
    assert len(data) == 3 and data.dropped == {"unreadable images": 1}
    with pytest.raises(DataError, match=r"broken.jpg is unreadable .*expected an image Pillow opens"):
        SegmentationFolder(images, masks, num_classes=4, strict_data=True)


def test_a_label_that_is_no_class_is_refused_naming_the_file_the_label_and_num_classes(tmp_path: Path) -> None:
    images, masks = _folder(tmp_path)
    _save_mask(masks / "b.png", np.full((30, 20), 7), "P")
    with pytest.raises(DataError, match=r"b.png holds label 7, but num_classes is 4: expected labels 0..3 or 255"):
        SegmentationFolder(images, masks, num_classes=4)
    assert len(SegmentationFolder(images, masks, num_classes=8)) == 3
    with pytest.raises(
        DataError, match=r"b.png holds label 7 \(class 6 after reduce_zero_label\), but num_classes is 6"
    ):
        SegmentationFolder(images, masks, num_classes=6, reduce_zero_label=True)


@pytest.mark.parametrize("mode", ["RGB", "RGBA"])
def test_a_mask_of_colours_is_refused(tmp_path: Path, mode: str) -> None:
    images, masks = _folder(tmp_path)
    Image.new(mode, (20, 30)).save(masks / "b.png")
    with pytest.raises(DataError, match=rf"b.png: expected a mask of class indices \(mode L or P\); got {mode}$"):
        SegmentationFolder(images, masks, num_classes=4)


def test_missing_folders_and_folders_without_pairs_are_refused_by_name(tmp_path: Path) -> None:
    images, masks = _folder(tmp_path)
    with pytest.raises(DataError, match=r"nowhere is not a folder; expected the folder of the images"):
        SegmentationFolder(tmp_path / "nowhere", masks, num_classes=4)
    with pytest.raises(DataError, match=r"nowhere is not a folder; expected the folder of the masks"):
        SegmentationFolder(images, tmp_path / "nowhere", num_classes=4)
    (tmp_path / "empty").mkdir()
    with pytest.raises(DataError, match=r"empty hold no image and mask of the same name"):
        SegmentationFolder(images, tmp_path / "empty", num_classes=4)


def test_ade20k_paths_accept_the_challenge_folder_or_its_parent(tmp_path: Path) -> None:
    base = tmp_path / "ADEChallengeData2016"
    for sub in ("images/training", "images/validation", "annotations/training", "annotations/validation"):
        (base / sub).mkdir(parents=True)
    paths = ade20k_paths(tmp_path)
    assert paths == ade20k_paths(base)
    assert paths["train_images"] == base / "images/training" and paths["val_masks"] == base / "annotations/validation"
    assert ADE20K_NUM_CLASSES == 150
    (base / "annotations/validation").rmdir()
    with pytest.raises(DataError, match="ADEChallengeData2016 has no annotations/validation"):
        ade20k_paths(tmp_path)
    with pytest.raises(DataError, match="nowhere is not a folder"):
        ade20k_paths(tmp_path / "nowhere")


# The training transform


def _mostly_one_class() -> tuple[tv_tensors.Image, tv_tensors.Mask, np.ndarray]:
    """A 64x64 mask of class 0 but for a 36x36 corner of stripes of classes 1 and 2, and whether each 16x16 crop
    (by its top-left corner) has no class covering 75% of it."""
    labels = np.zeros((64, 64), np.int64)
    labels[:36, :36] = 1 + np.arange(36) % 2
    balanced = np.zeros((49, 49), bool)
    for top in range(49):
        for left in range(49):
            counts = np.bincount(labels[top : top + 16, left : left + 16].ravel())
            balanced[top, left] = (counts > 0).sum() > 1 and counts.max() / counts.sum() < 0.75
    image = tv_tensors.Image(torch.from_numpy(labels).to(torch.uint8).expand(3, -1, -1).clone())
    return image, tv_tensors.Mask(torch.from_numpy(labels)), balanced


def test_the_cat_max_ratio_crop_avoids_a_crop_that_one_class_dominates() -> None:
    image, mask, balanced = _mostly_one_class()
    assert 0.3 < balanced.mean() < 0.5  # most crops are over 75% one class (59%), but not all
    crop = CatMaxRatioCrop(16, cat_max_ratio=0.75)
    plain = CatMaxRatioCrop(16, cat_max_ratio=1.0)  # the first crop drawn, as a plain random crop
    chosen = []
    for seed in range(20):
        torch.manual_seed(seed)
        params = crop.make_params([image, mask])
        chosen.append(bool(balanced[params["top"], params["left"]]))
        assert (params["height"], params["width"]) == (16, 16)
    assert sum(chosen) >= 19  # 11 dominated draws in a row (p = 0.59 ** 11 = 0.3%) keep the last: seed 2 here
    torch.manual_seed(0)
    plain_chosen = [bool(balanced[p["top"], p["left"]]) for p in (plain.make_params([mask]) for _ in range(20))]
    assert sum(plain_chosen) < 15
    torch.manual_seed(0)
    out_image, out_mask = crop(image, mask)
    assert out_mask.shape == (16, 16) and torch.equal(out_image[0].long(), out_mask)
    counts = torch.bincount(out_mask.ravel())
    assert counts.max() / counts.sum() < 0.75


def test_the_train_transform_keeps_image_and_mask_aligned() -> None:
    """An image whose pixels are their labels: after rescaling (bilinear for the image, nearest for the mask), the
    crop and a flip, nearly every labelled pixel still carries its own label; padding is black with label 255."""
    rng = np.random.default_rng(0)
    labels = np.kron(rng.integers(0, 10, (3, 4)), np.ones((32, 32), np.int64))  # 96x128, blocks of 32 px
    image = tv_tensors.Image(torch.from_numpy(labels).to(torch.uint8).expand(3, -1, -1).clone())
    mask = tv_tensors.Mask(torch.from_numpy(labels))
    # x0.5 to x1 of a 128x96 base: blocks of 16 to 32 px; below x0.67 the image is smaller than the crop
    transform = seg_train_transform(64, scale=(384, 96), ratio_range=(0.5, 1.0), flip=1.0, photometric=False)
    padded_any = False
    for seed in range(8):
        torch.manual_seed(seed)
        out_image, out_mask = transform(image, mask)
        assert out_image.shape == (3, 64, 64) and out_mask.shape == (64, 64)
        values = (out_image * 255).round().long()
        assert torch.equal(values[0], values[1]) and torch.equal(values[0], values[2])
        padded = out_mask == 255
        padded_any |= bool(padded.any())
        assert (values[:, padded] == 0).all()
        agree = (values[0][~padded] == out_mask[~padded]).float().mean()
        assert agree > 0.9, f"seed {seed}: only {agree:.0%} of pixels carry their label"
    assert padded_any


def test_the_train_transform_gives_crop_size_squares_padded_with_255() -> None:
    image = tv_tensors.Image(torch.randint(0, 256, (3, 20, 30), dtype=torch.uint8))
    mask = tv_tensors.Mask(torch.randint(0, 4, (20, 30)))
    # base scale (256, 64) at ratio 0.5: longer side <= 128, shorter <= 32, so 20x30 becomes 32x48 (x1.6)
    out_image, out_mask = seg_train_transform(64, ratio_range=(0.5, 0.5))(image, mask)
    assert out_image.dtype == torch.float32 and out_image.shape == (3, 64, 64)
    assert 0 <= out_image.min() and out_image.max() <= 1
    assert out_mask.dtype == torch.int64 and out_mask.shape == (64, 64)
    assert (out_mask[32:] == 255).all() and (out_mask[:, 48:] == 255).all()
    assert (out_mask[:32, :48] < 4).all()


def test_the_photometric_distortion_leaves_the_mask_alone() -> None:
    image = tv_tensors.Image(torch.randint(0, 256, (3, 16, 16), dtype=torch.uint8))
    mask = tv_tensors.Mask(torch.randint(0, 4, (16, 16)))
    distort = photometric_distortion()
    changed = 0
    for _ in range(10):
        out_image, out_mask = distort(image, mask)
        assert torch.equal(out_mask, mask) and out_image.dtype == torch.uint8
        changed += not torch.equal(out_image, image)
    assert changed >= 5


# The digit scenes with semantic masks


def test_written_segmentation_scenes_read_back_with_each_pixels_topmost_digit(tmp_path: Path) -> None:
    paths = write_segmentation_scenes(tmp_path, n_train=5, n_val=3, size=48)
    assert set(paths) == {"train_images", "train_masks", "val_images", "val_masks"}
    assert SEGMENTATION_CLASSES == ["background", "0", "1", "2", "3", "4", "5", "6", "7", "8", "9"]
    for split, n in (("train", 5), ("val", 3)):
        data = SegmentationFolder(
            paths[f"{split}_images"], paths[f"{split}_masks"], num_classes=11, class_names=SEGMENTATION_CLASSES
        )
        assert len(data) == n and not data.dropped
        assert Image.open(data.pairs[0][1]).mode == "L"
        for (image, mask), (scene, objects) in zip(data, digit_scenes(n, split, 48)):
            expected = np.zeros((48, 48), np.int64)
            for digit, object_mask in objects:  # drawing order: a later digit lies on top
                expected[object_mask] = digit + 1
            assert torch.equal(image, torch.from_numpy(scene).permute(2, 0, 1))
            assert torch.equal(mask, torch.from_numpy(expected))
            assert 0 <= int(mask.min()) and int(mask.max()) <= 10 and int(mask.max()) > 0
