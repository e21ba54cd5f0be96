"""gcvit.train.build: the model a run trains, from its settings."""

from __future__ import annotations

import dataclasses

import pytest

pytest.importorskip("sklearn")
pytest.importorskip("yaml")

from gcvit.train import TrainConfig, resolve_config

pytestmark = pytest.mark.usefixtures("one_thread")  # one torch thread (tests/conftest.py)


def test_model_overrides_change_fields_of_the_digits_model() -> None:
    """On the digits, `--model-override embed_dim=48` changes one field of the default digits model, as it does
    with configs/digits.yaml (it used to build the whole named variant instead)."""
    from gcvit.train.build import run_settings

    flags_only = run_settings(resolve_config(None, {"model_overrides": {"embed_dim": 48}}))[0]
    with_file = run_settings(resolve_config("configs/digits.yaml", {"model_overrides": {"embed_dim": 48}}))[0]
    default = run_settings(TrainConfig())[0]  # gcvit_nano: its pools written out, as every variant's
    # the file leaves the pools to be derived at its img_size (null); the flags ask for those of 32 px explicitly
    assert with_file.global_query_pools is None and flags_only.global_query_pools == (1, 0, 0, 0)
    assert flags_only == dataclasses.replace(with_file, global_query_pools=with_file.pools)
    assert flags_only == dataclasses.replace(default, embed_dim=48)
