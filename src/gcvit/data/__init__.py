"""Data: datasets (the bundled digits, image folders), transforms, batch mixing and loaders.

>>> from gcvit.data import DigitsDataset, build_loader, eval_transform, set_epoch, train_transform
>>> train = DigitsDataset("train", img_size=32, transform=train_transform(32, MEAN, STD))
>>> loader = build_loader(train, batch_size=64, train=True, num_workers=2, seed=0)
>>> set_epoch(loader, epoch)   # at the start of every epoch
"""

from gcvit.data.datasets import (
    IMG_EXTENSIONS,
    DataError,
    DigitsDataset,
    ImageFolderDataset,
    check_same_classes,
    check_val_fraction,
    load_rgb,
    split_image_folder,
    stratified_split,
)
from gcvit.data.loader import build_loader, seed_worker, set_epoch
from gcvit.data.transforms import (
    MixupCutmix,
    RandAugmentSpec,
    eval_transform,
    mixup_cutmix,
    parse_randaugment,
    to_hw,
    to_rgb,
    train_transform,
)
from gcvit.data.verify import BadImage, check_image, find_bad_images

__all__ = [
    "IMG_EXTENSIONS",
    "BadImage",
    "DataError",
    "DigitsDataset",
    "ImageFolderDataset",
    "MixupCutmix",
    "RandAugmentSpec",
    "build_loader",
    "check_image",
    "check_same_classes",
    "check_val_fraction",
    "eval_transform",
    "find_bad_images",
    "load_rgb",
    "mixup_cutmix",
    "parse_randaugment",
    "seed_worker",
    "set_epoch",
    "split_image_folder",
    "stratified_split",
    "to_hw",
    "to_rgb",
    "train_transform",
]
