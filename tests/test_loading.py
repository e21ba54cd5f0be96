"""`gcvit.load`: one loader for a name, a run, checkpoint or saved folder, a weights file, a URL or a hub repo id;
a save/load round trip gives identical logits. Remote folders are tested in test_hub.py."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

import gcvit
from gcvit.models.folder import model_config
from gcvit.train.checkpoint import write_checkpoint
from tests.conftest import randomize_


@pytest.fixture(scope="module")
def small() -> torch.nn.Module:
    torch.manual_seed(0)
    return randomize_(gcvit.create_model("gcvit_xxtiny", num_classes=3, img_size=64)).eval()


def _logits(model: torch.nn.Module) -> torch.Tensor:
    torch.manual_seed(1)
    with torch.no_grad():
        return model(torch.randn(2, 3, 64, 64))


def test_a_name_builds_as_create_model_does() -> None:
    torch.manual_seed(0)
    made = gcvit.create_model("gcvit_xxtiny", num_classes=5, img_size=64, drop_path_rate=0.0).eval()
    torch.manual_seed(0)
    loaded = gcvit.load("gcvit_xxtiny", num_classes=5, img_size=64, drop_path_rate=0.0)
    assert not loaded.training and loaded.model_name == "gcvit_xxtiny" and loaded.classes == ["0", "1", "2", "3", "4"]
    assert loaded.pretrained_cfg == made.pretrained_cfg
    assert torch.equal(_logits(loaded), _logits(made))
    with torch.device("meta"):
        assert gcvit.load("gcvit_xxtiny").classes[:2] == ["tench", "goldfish"]  # an ImageNet-1K head


def test_a_name_with_a_checkpoint_file_records_that_file(small, tmp_path: Path) -> None:
    path = gcvit.save_checkpoint(small, tmp_path / "w.safetensors")
    loaded = gcvit.load("gcvit_xxtiny", pretrained=str(path), img_size=64)
    assert torch.equal(_logits(loaded), _logits(small))
    assert loaded.pretrained_cfg.url == str(path) and loaded.pretrained_cfg.top1 is None


def test_save_and_load_round_trip_gives_identical_logits(small, tmp_path: Path) -> None:
    folder = small.save_pretrained(tmp_path / "saved", classes=["a", "b", "c"])
    loaded = gcvit.load(folder)
    assert torch.equal(_logits(loaded), _logits(small))
    assert loaded.classes == ["a", "b", "c"] and loaded.model_name == "gcvit_xxtiny"
    assert loaded.pretrained_cfg.url == str(folder / "model.safetensors") and loaded.pretrained_cfg.img_size == (64, 64)
    assert torch.equal(_logits(gcvit.load(folder / "model.safetensors")), _logits(small))  # the file, config beside
    assert model_config(loaded) == model_config(small, ["a", "b", "c"])  # saving it again writes the same config
    assert list(loaded.state_dict()) == list(small.state_dict())


def test_a_run_folder_loads_its_best_checkpoint_with_its_epoch(small, tmp_path: Path) -> None:
    run = tmp_path / "run"
    later = randomize_(gcvit.create_model("gcvit_xxtiny", num_classes=3, img_size=64), scale=0.1).eval()
    config = model_config(small, ["a", "b", "c"])
    state = {"epoch": 4}
    write_checkpoint(run, "best", small.state_dict(), config | {"weights": "model.safetensors", "epoch": 2}, state)
    write_checkpoint(run, "last", later.state_dict(), config | {"weights": "model.safetensors", "epoch": 4}, state)
    best = gcvit.load(run)
    assert torch.equal(_logits(best), _logits(small)) and best.pretrained_cfg.epoch == 2
    assert best.pretrained_cfg.url == str(run / "best" / "model.safetensors")
    assert torch.equal(_logits(gcvit.load(run / "last")), _logits(later))
    assert gcvit.load(run / "last").pretrained_cfg.epoch == 4


def test_overrides_of_a_saved_model(small, tmp_path: Path) -> None:
    folder = small.save_pretrained(tmp_path / "saved")
    fresh = gcvit.load(folder, num_classes=7, drop_path_rate=0.3)
    assert fresh.num_classes == 7 and fresh.classes == [str(i) for i in range(7)] and fresh.cfg.drop_path_rate == 0.3
    body = {k: v for k, v in small.state_dict().items() if not k.startswith("head.")}
    assert all(torch.equal(fresh.state_dict()[k], v) for k, v in body.items())  # the body loaded, a new head
    assert gcvit.load(folder, num_classes=3).classes == ["0", "1", "2"]  # its own head kept


def test_options_that_do_not_fit_the_source_are_named(small, tmp_path: Path) -> None:
    folder = small.save_pretrained(tmp_path / "saved")
    with pytest.raises(ValueError, match=r"pretrained goes with a model name; .* holds its own weights"):
        gcvit.load(folder, pretrained=True)
    with pytest.raises(ValueError, match=r"\['revision'\] go with a URL or hub repo id"):
        gcvit.load(folder, revision="v1")
    with pytest.raises(ValueError, match=r"\['ema'\] go with a folder, URL or hub repo id; 'gcvit_xxtiny' is a model"):
        gcvit.load("gcvit_xxtiny", ema=True)
    with pytest.raises(ValueError, match="ema goes with a folder"):
        gcvit.load(folder / "model.safetensors", ema=True)
    with pytest.raises(FileNotFoundError, match=r"'gcvit_tinyy' is neither a model name; did you mean gcvit_tiny"):
        gcvit.load("gcvit_tinyy")
    with pytest.raises(ValueError, match="unknown override"):
        gcvit.load(folder, depth=3)
    (tmp_path / "loose.safetensors").write_bytes((folder / "model.safetensors").read_bytes())
    with pytest.raises(FileNotFoundError, match="loose.safetensors has no config.json beside it"):
        gcvit.load(tmp_path / "loose.safetensors")
    config = json.loads((folder / "config.json").read_text())
    assert config["model"] == "gcvit_xxtiny"  # the folder was not touched by any of it
