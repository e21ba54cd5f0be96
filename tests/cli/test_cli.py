"""Command-line mistakes end in one line naming what was expected (exit code 2), never a traceback."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

from gcvit.cli import build_parser, main

REPO = Path(__file__).resolve().parents[2]


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["predict", str(REPO / "README.md"), "--model", "gcvit_xxtiny", "--device", "gpu"], "expected --device cpu"),
        (["train", "--device", "cuda:x"], "device must be cpu or cuda[:N], got 'cuda:x'"),
        (["models", "tiny"], "no model matches 'tiny'; patterns are shell-style, e.g. '*tiny*'"),
        (["export", "gcvit_tinny"], "did you mean gcvit_tiny"),
        (["predict", "afile.png", "--model", "gcvit_tinny"], "did you mean gcvit_tiny"),
        (["export", "gcvit_xxtiny", "--out", "{tmp}"], "is a folder; expected the file to write"),
        (["export", "gcvit_xxtiny", "--atol", "-1"], "expected --atol above 0; got -1"),
        (["compare", "--models", "gcvit_xxtiny", "--threads", "-1"], "expected --threads of at least 1; got -1"),
        (["compare", "--models", "gcvit_xxtiny", "--time-budget", "-1", "--out-dir", "{tmp}/c"], "--time-budget"),
        (["digits", "--out", "{tmp}/afile"], "is a file; expected a folder for the PNG files"),
        (["eval", "{tmp}/run", "--out-dir", "{tmp}/afile"], "afile is a file; expected a folder there"),
        (["eval", "{tmp}/afile"], "afile has no config.json beside it; expected a run folder"),
        (["digits", "--out", "{tmp}/afile/sub"], "afile is a file; expected a folder there"),  # not afile/sub
        (["train", "--config", "{tmp}"], "is a folder; expected a YAML file"),
        (["train", "--config", "{tmp}/afile.png"], "is not text; expected a YAML file"),
        (["visualize", "{tmp}", "--model", "gcvit_xxtiny"], "is a folder; expected one image file"),
    ],
)
def test_mistakes_are_one_line_errors(argv: list[str], message: str, tmp_path: Path, capsys, monkeypatch) -> None:
    monkeypatch.chdir(tmp_path)  # where a command that should have refused would write
    (tmp_path / "afile").write_text("")
    (tmp_path / "afile.png").write_bytes(b"\x89PNG\r\n\x1a\n\x00\x00\xff\xfe")
    if argv[0] == "eval":  # a run folder to evaluate
        import gcvit

        gcvit.create_model("gcvit_xxtiny", img_size=32, num_classes=10).save_pretrained(tmp_path / "run")
    assert main([a.replace("{tmp}", str(tmp_path)) for a in argv]) == 2
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err and len(err.strip().splitlines()) == 1, err


@pytest.mark.parametrize(
    "argv", [["digits", "--seed", "-1"], ["eval", "run", "--seed", "5000000000"], ["compare", "--seed", "x"]]
)
def test_seeds_outside_what_numpy_takes_are_refused_by_the_parser(argv: list[str], capsys) -> None:
    """As `gcvit train` refuses them, not with scikit-learn's message about a split that was never the problem."""
    with pytest.raises(SystemExit) as stop:
        main(argv)
    assert stop.value.code == 2
    assert f"argument --seed: expected an integer in [0, 2**32); got '{argv[-1]}'" in capsys.readouterr().err


def test_help_shows_zero_defaults() -> None:
    """A default of 0 is shown (0 == False had hidden it), and one the help text merely mentions too."""
    parser = build_parser()
    sub = next(a for a in parser._actions if a.dest == "command").choices  # type: ignore[attr-defined]
    assert "(default: 0)" in " ".join(sub["digits"].format_help().split())
    assert "(default: 224)" in " ".join(sub["bench"].format_help().split())


def test_a_missing_optional_package_names_what_to_install(capsys, monkeypatch, tmp_path: Path) -> None:
    monkeypatch.setitem(sys.modules, "onnx", None)  # as if the export extra were not installed
    assert main(["export", "gcvit_xxtiny", "--img-size", "32", "--out", str(tmp_path / "m.onnx")]) == 2
    err = capsys.readouterr().err
    assert "this command needs onnx" in err
    assert "pip install 'gcvit-torch[export]' (in a checkout: pip install -e '.[export]')" in err


def test_pretrained_means_the_same_in_every_command() -> None:
    """`--pretrained` alone or `--pretrained true`: official weights; a path: that checkpoint."""
    parser = build_parser()
    for command in (["demo"], ["visualize", "x.png"], ["export", "gcvit_tiny"]):
        assert parser.parse_args([*command, "--pretrained"]).pretrained is True
        assert parser.parse_args([*command, "--pretrained", "true"]).pretrained is True
        assert parser.parse_args([*command, "--pretrained", "w.pth"]).pretrained == "w.pth"


def test_visualize_loads_a_checkpoint_given_to_pretrained(tmp_path: Path) -> None:
    """`gcvit visualize IMAGE --model NAME --pretrained CKPT` uses CKPT's weights (it loaded the official ones)."""
    import torch

    import gcvit
    from gcvit.cli.visualize import _load

    trained = gcvit.create_model("gcvit_xxtiny", img_size=64, num_classes=3)
    path = gcvit.save_checkpoint(trained, tmp_path / "w.safetensors")
    net, what = _load("gcvit_xxtiny", str(path), "cpu")
    assert net.num_classes == 3 and str(path) in what and net.pretrained_cfg.url == str(path)
    assert torch.equal(net.head.weight, trained.head.weight)
