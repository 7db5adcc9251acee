"""The `fgclip` console script: help, and clear one-line errors for bad params."""

from __future__ import annotations

import subprocess
import sys
import types
from pathlib import Path

import pytest

from fgclip.cli import build_parser, main
from fgclip.config import LN_100, load_params, model_source

REPO = Path(__file__).resolve().parents[1]
STAGE_COMMANDS = ["sample", "extract-frames", "validate-boxes", "pretrain", "train", "evaluate"]


def test_console_script_lists_every_stage():
    proc = subprocess.run(
        [Path(sys.executable).parent / "fgclip", "--help"], capture_output=True, text=True, check=False
    )
    assert proc.returncode == 0
    for name in STAGE_COMMANDS:
        assert name in proc.stdout


@pytest.mark.parametrize("name", STAGE_COMMANDS)
def test_every_subcommand_takes_params(name):
    args = build_parser().parse_args([name, "--params", "x.yaml"])
    assert args.params == "x.yaml"


def test_default_params_are_valid_and_carry_the_fixed_temperature():
    params = load_params(REPO / "params.yaml")
    assert params.model.logit_scale_init_value == pytest.approx(LN_100, abs=1e-4)
    assert params.train.memory_bank_warmup_steps == 50
    assert params.tracking_uri == f"sqlite:///{REPO / 'mlflow.db'}"


def test_misspelt_knob_is_a_clear_error(tmp_path, capsys):
    bad = tmp_path / "params.yaml"
    bad.write_text("train:\n  memory_bank_warmup_step: 50\n")
    assert main(["train", "--params", str(bad)]) == 1
    err = capsys.readouterr().err
    assert "memory_bank_warmup_step" in err and "Extra inputs are not permitted" in err


def test_missing_params_file_is_a_clear_error(tmp_path, capsys):
    assert main(["sample", "--params", str(tmp_path / "nope.yaml")]) == 1
    assert "params file not found" in capsys.readouterr().err


# --- every path a stage reads or writes: an option, defaulting to params.paths ----------------


def _run(monkeypatch, module: str, func: str, argv: list[str], **extra) -> tuple[tuple, dict]:
    """``fgclip <argv>`` with the stage function replaced: the arguments the stage was called with."""
    calls: list[tuple[tuple, dict]] = []
    fake = types.ModuleType(module)  # what the subcommand imports, instead of the real module
    setattr(fake, func, lambda *args, **kwargs: calls.append((args, kwargs)) or {})
    for name, value in extra.items():
        setattr(fake, name, value)
    monkeypatch.setitem(sys.modules, module, fake)
    assert main([*argv, "--params", str(REPO / "params.yaml")]) == 0
    assert len(calls) == 1
    return calls[0]


@pytest.fixture(scope="module")
def paths():
    return load_params(REPO / "params.yaml").paths


def test_sample_paths(monkeypatch, paths):
    args, _ = _run(monkeypatch, "fgclip.data.sample", "generate_sample", ["sample"])
    assert args[2] == paths.sample == paths.data_root  # by default the pipeline reads the sample
    args, _ = _run(monkeypatch, "fgclip.data.sample", "generate_sample", ["sample", "--out", "r"])
    assert args[2] == Path("r")


def test_extract_frames_paths(monkeypatch, paths):
    args, _ = _run(monkeypatch, "fgclip.data.frames", "extract_frames", ["extract-frames"])
    assert args[1:] == (paths.data_root, paths.annotations, paths.frames)
    # The annotations default follows --data-root (the UCF-Crime layout); the outputs do not.
    argv = ["extract-frames", "--data-root", "r"]
    args, _ = _run(monkeypatch, "fgclip.data.frames", "extract_frames", argv)
    assert args[1:] == (Path("r"), Path("r/annotations.json"), paths.frames)
    argv = ["extract-frames", "--data-root", "r", "--annotations", "a.json", "--out", "f"]
    args, _ = _run(monkeypatch, "fgclip.data.frames", "extract_frames", argv)
    assert args[1:] == (Path("r"), Path("a.json"), Path("f"))


def test_validate_boxes_paths(monkeypatch, paths):
    args, _ = _run(monkeypatch, "fgclip.data.boxes", "validate_boxes", ["validate-boxes"])
    assert args[1:] == (paths.annotations, paths.frames, paths.boxes, paths.boxes_metrics)
    argv = ["validate-boxes", "--annotations", "a", "--frames", "f", "--out", "b", "--metrics", "m"]
    args, _ = _run(monkeypatch, "fgclip.data.boxes", "validate_boxes", argv)
    assert args[1:] == (Path("a"), Path("f"), Path("b"), Path("m"))


def test_pretrain_paths(monkeypatch, paths):
    args, _ = _run(monkeypatch, "fgclip.train.pretrain", "pretrain_clip", ["pretrain"])
    assert args[1:] == (paths.frames, paths.boxes, paths.annotations, paths.stand_in)
    argv = ["pretrain", "--frames", "f", "--boxes", "b", "--annotations", "a", "--out", "o"]
    args, _ = _run(monkeypatch, "fgclip.train.pretrain", "pretrain_clip", argv)
    assert args[1:] == (Path("f"), Path("b"), Path("a"), Path("o"))


def test_train_paths(monkeypatch, paths):
    args, kwargs = _run(monkeypatch, "fgclip.train.loop", "train", ["train"])
    stand_in = str(paths.stand_in)  # model.pretrained is null
    assert args[1:] == (paths.frames, paths.boxes, stand_in, paths.model, paths.checkpoints, paths.health)
    assert (kwargs["metrics_path"], kwargs["loss_csv"]) == (paths.train_metrics, paths.loss_curve)
    argv = ["train", "--frames", "f", "--boxes", "b", "--model", "openai/clip-vit-base-patch32", "--out", "o"]
    argv += ["--checkpoints", "c", "--health", "h", "--metrics", "m", "--loss-curve", "l"]
    args, kwargs = _run(monkeypatch, "fgclip.train.loop", "train", argv)
    assert args[1:] == (Path("f"), Path("b"), "openai/clip-vit-base-patch32", Path("o"), Path("c"), Path("h"))
    assert (kwargs["metrics_path"], kwargs["loss_csv"]) == (Path("m"), Path("l"))
    # An empty value (an unset shell variable) is the default, never the working directory.
    args, _ = _run(monkeypatch, "fgclip.train.loop", "train", ["train", "--out", "", "--health", ""])
    assert (args[4], args[6]) == (paths.model, paths.health)


def test_a_renamed_params_key_says_its_new_name(tmp_path, capsys):
    params = tmp_path / "params.yaml"
    params.write_text("sample:\n  max_frames: 300\n")
    assert main(["sample", "--params", str(params)]) == 1
    assert "sample.max_frames is now sample.max_video_frames" in capsys.readouterr().err


def test_evaluate_paths(monkeypatch, paths, tmp_path):
    args, kwargs = _run(monkeypatch, "fgclip.eval.evaluate", "evaluate", ["evaluate"])
    pretrained = model_source(str(paths.stand_in))  # a Path once the pretrain stage has run
    expected = (paths.frames, paths.model, pretrained, paths.data_root, paths.eval_metrics, paths.scores)
    assert args[1:] == expected
    assert kwargs == {"roc_path": paths.roc, "boxes_dir": paths.boxes}
    argv = ["evaluate", "--frames", "f", "--model", "m", "--pretrained", str(tmp_path), "--data-root", "r"]
    argv += ["--out", "o", "--scores", "s", "--roc", "c", "--boxes", "b"]
    args, kwargs = _run(monkeypatch, "fgclip.eval.evaluate", "evaluate", argv)
    assert args[1:] == (Path("f"), Path("m"), tmp_path, Path("r"), Path("o"), Path("s"))
    assert kwargs == {"roc_path": Path("c"), "boxes_dir": Path("b")}
    # A name that is nothing on disk is a hub id, passed on as a string.
    argv = ["evaluate", "--pretrained", "openai/clip-vit-base-patch32"]
    args, _ = _run(monkeypatch, "fgclip.eval.evaluate", "evaluate", argv)
    assert args[3] == "openai/clip-vit-base-patch32"


def test_region_loss_paths(monkeypatch, paths):
    args, _ = _run(
        monkeypatch,
        "fgclip.train.loss_breakdown",
        "region_loss_breakdown",
        ["region-loss"],
        format_breakdown=lambda result, top: "",
    )
    assert args[1:] == (paths.model, paths.frames, paths.boxes)
