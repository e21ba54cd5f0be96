"""Training, evaluation and prediction for GC ViT.

>>> import gcvit
>>> from gcvit.train import TrainConfig, train
>>> from gcvit.train.evaluate import evaluate, predict
>>> result = train(TrainConfig(out_dir="runs/digits"))      # the bundled digits, from scratch
>>> report = evaluate("runs/digits", data="digits")
>>> predict(["img.png"], model="runs/digits", topk=3)
>>> model = gcvit.load("runs/digits")                       # its best/ weights, class names and preprocessing
"""

from gcvit.models.gcvit import DIGITS as DIGITS_MODEL
from gcvit.train.classify import validate
from gcvit.train.config import TrainConfig, load_run_config, official_recipe, resolve_config, save_yaml
from gcvit.train.loop import NonFiniteLossError, TrainResult, train

__all__ = [
    "DIGITS_MODEL",
    "NonFiniteLossError",
    "TrainConfig",
    "TrainResult",
    "load_run_config",
    "official_recipe",
    "resolve_config",
    "save_yaml",
    "train",
    "validate",
]
