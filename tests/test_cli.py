"""The `fgclip` console script: help, and clear one-line errors for bad params."""

from __future__ import annotations

import argparse
import functools
import json
import os
import subprocess
import sys
import time
import types
from pathlib import Path

import pytest
import yaml

from fgclip.cli import build_parser, main
from fgclip.config import LN_100, load_params

REPO = Path(__file__).resolve().parents[1]
HUB_ID = "openai/clip-vit-base-patch32"
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
    assert "train.memory_bank_warmup_step: unknown key (did you mean train.memory_bank_warmup_steps?)" in err


def test_missing_params_file_is_a_clear_error(tmp_path, capsys):
    assert main(["sample", "--params", str(tmp_path / "nope.yaml")]) == 1
    assert "params file not found" in capsys.readouterr().err


# --- every path a stage reads or writes: an option, defaulting to params.paths ----------------


def _run(
    monkeypatch, module: str, func: str, argv: list[str], params_file: Path = REPO / "params.yaml", **extra
) -> tuple[tuple, dict]:
    """``fgclip <argv>`` with the stage function replaced: the arguments the stage was called with."""
    calls: list[tuple[tuple, dict]] = []
    fake = types.ModuleType(module)  # what the subcommand imports, instead of the real module
    setattr(fake, func, lambda *args, **kwargs: calls.append((args, kwargs)) or {})
    for name, value in extra.items():
        setattr(fake, name, value)
    monkeypatch.setitem(sys.modules, module, fake)
    assert main([*argv, "--params", str(params_file)]) == 0
    assert len(calls) == 1
    return calls[0]


@pytest.fixture(scope="module")
def paths():
    return load_params(REPO / "params.yaml").paths


@pytest.fixture
def local_params(tmp_path: Path) -> Path:
    """The project's params.yaml in a scratch directory, whose stand-in CLIP directory exists.

    `fgclip train` and `evaluate` check the pretrained CLIP before they start.
    """
    params_file = tmp_path / "params.yaml"
    params_file.write_text((REPO / "params.yaml").read_text())
    stand_in = load_params(params_file).paths.stand_in
    stand_in.mkdir(parents=True)
    (stand_in / "config.json").write_text("{}")
    return params_file


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


def test_train_paths(monkeypatch, local_params, tmp_path):
    paths = load_params(local_params).paths
    run = functools.partial(_run, monkeypatch, "fgclip.train.loop", "train", params_file=local_params)
    args, kwargs = run(["train"])
    stand_in = str(paths.stand_in)  # model.pretrained is null
    assert args[1:] == (paths.frames, paths.boxes, stand_in, paths.model, paths.checkpoints, paths.health)
    assert (kwargs["metrics_path"], kwargs["loss_csv"]) == (paths.train_metrics, paths.loss_curve)
    assert kwargs["loss_png"] == paths.loss_plot
    argv = ["train", "--frames", "f", "--boxes", "b", "--model", stand_in, "--out", "o"]
    argv += ["--checkpoints", "c", "--health", "h", "--metrics", "m", "--loss-curve", "l", "--loss-plot", "p"]
    args, kwargs = run(argv)
    assert args[1:] == (Path("f"), Path("b"), stand_in, Path("o"), Path("c"), Path("h"))
    assert (kwargs["metrics_path"], kwargs["loss_csv"], kwargs["loss_png"]) == (Path("m"), Path("l"), Path("p"))
    # An empty value (an unset shell variable) is the default, never the working directory.
    args, _ = run(["train", "--out", "", "--health", ""])
    assert (args[4], args[6]) == (paths.model, paths.health)
    # A hub id is passed on as given, once the (offline) cache holds it.
    _cached_hub_model(monkeypatch, tmp_path / "hf-cache", HUB_ID)
    args, _ = run(["train", "--model", HUB_ID])
    assert args[3] == HUB_ID


def _cached_hub_model(monkeypatch, cache: Path, repo_id: str) -> None:
    """A Hugging Face cache holding ``repo_id``'s config.json, laid out as the hub client writes it, offline."""
    from huggingface_hub import constants

    repo = cache / f"models--{repo_id.replace('/', '--')}"
    commit = "0" * 40
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text(commit)
    (repo / "snapshots" / commit).mkdir(parents=True)
    (repo / "snapshots" / commit / "config.json").write_text("{}")
    # The client reads both from the environment when it is imported: too late for a setenv here.
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(cache))
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)


def test_a_renamed_params_key_says_its_new_name(tmp_path, capsys):
    params = tmp_path / "params.yaml"
    params.write_text("sample:\n  max_frames: 300\n")
    assert main(["sample", "--params", str(params)]) == 1
    assert "sample.max_frames is now sample.max_video_frames" in capsys.readouterr().err


def test_evaluate_paths(monkeypatch, local_params, tmp_path):
    paths = load_params(local_params).paths
    run = functools.partial(
        _run, monkeypatch, "fgclip.eval.evaluate", "evaluate", params_file=local_params, training_run=None
    )
    args, kwargs = run(["evaluate"])
    expected = (paths.frames, paths.model, paths.stand_in, paths.data_root, paths.eval_metrics, paths.scores)
    assert args[1:] == expected  # the stand-in directory, as a Path
    assert kwargs == {"roc_path": paths.roc, "boxes_dir": paths.boxes, "roc_png": paths.roc_plot,
                      "models_png": paths.models_plot}  # fmt: skip
    argv = [
        "evaluate",
        "--frames",
        "f",
        "--model",
        "m",
        "--pretrained",
        str(paths.stand_in),
        "--data-root",
        "r",
    ]
    argv += ["--out", "o", "--scores", "s", "--roc", "c", "--boxes", "b", "--roc-plot", "rp", "--models-plot", "mp"]
    args, kwargs = run(argv)
    assert args[1:] == (Path("f"), Path("m"), paths.stand_in, Path("r"), Path("o"), Path("s"))
    assert kwargs == {"roc_path": Path("c"), "boxes_dir": Path("b"), "roc_png": Path("rp"), "models_png": Path("mp")}
    # A name that is nothing on disk is a hub id, passed on as a string.
    _cached_hub_model(monkeypatch, tmp_path / "hf-cache", HUB_ID)
    args, _ = run(["evaluate", "--pretrained", HUB_ID])
    assert args[3] == HUB_ID


def test_region_loss_paths(monkeypatch, paths):
    args, _ = _run(
        monkeypatch,
        "fgclip.train.loss_breakdown",
        "region_loss_breakdown",
        ["region-loss"],
        format_breakdown=lambda result, top: "",
    )
    assert args[1:] == (paths.model, paths.frames, paths.boxes)


# --- every user mistake: one line on stderr, rc 1, in seconds, before anything heavy -----------

NAN = float("nan")
MISTAKES = {
    "patch_size 0": (["train"], {"model": {"patch_size": 0}}, "model.patch_size: Input should be greater"),
    "negative image_size": (["train"], {"model": {"image_size": -64}}, "model.image_size: Input should be"),
    "NaN lr": (["train"], {"train": {"lr": NAN}}, "train.lr: Input should be a finite number"),
    "negative lr": (["train"], {"train": {"lr": -1e-4}}, "train.lr: Input should be greater than 0"),
    "invalid cron": (["serve"], {"orchestration": {"cron": "0 25 * * *"}}, "hour field '25' is not valid"),
    "num_frames > max_frames": (["train"], {"train": {"num_frames": 40}}, "exceeds model.max_frames=32"),
    "run_name escapes": (["train"], {"train": {"run_name": "../../x"}}, "must be a plain directory name"),
    "tracking server down": (
        ["train"], {"tracking": {"uri": "http://127.0.0.1:9/"}},
        "MLflow tracking server http://127.0.0.1:9/ is not reachable",
    ),
    "sqlite under a file": (
        ["train"], {"tracking": {"uri": "sqlite:///{tmp}/params.yaml/mlflow.db"}}, "params.yaml is not a directory"
    ),
    "missing directory": (
        ["train"], {"model": {"pretrained": "{tmp}/nope/clip"}}, "nope/clip: pretrained CLIP directory not found"
    ),
    "typo of a directory": (
        ["train"], {"model": {"pretrained": "models/clip-pretrainde"}}, "clip-pretrainde: pretrained CLIP directory"
    ),
    "hub id, offline, not cached": (
        ["train"], {"model": {"pretrained": HUB_ID}}, "not in the Hugging Face cache",
    ),
    "hub unreachable": (
        ["evaluate"], {"model": {"pretrained": HUB_ID}}, "the Hugging Face hub http://127.0.0.1:9 is not reachable"
    ),
}  # fmt: skip


@pytest.mark.parametrize("mistake", list(MISTAKES))
def test_a_user_mistake_is_one_line(mistake, local_params, tmp_path):
    argv, sections, message = MISTAKES[mistake]
    raw = yaml.safe_load(local_params.read_text())
    for section, values in sections.items():
        raw[section].update(
            {k: v.format(tmp=tmp_path) if isinstance(v, str) else v for k, v in values.items()}
        )
    local_params.write_text(yaml.safe_dump(raw))
    env = {k: v for k, v in os.environ.items() if not k.startswith(("HF_", "MLFLOW_", "TRANSFORMERS_"))}
    env["HF_HUB_CACHE"] = str(tmp_path / "hf-cache")  # empty: nothing of the hub is cached
    # Only loopback is contacted: the hub is either off or a port where nothing listens.
    env["HF_HUB_OFFLINE" if mistake == "hub id, offline, not cached" else "HF_ENDPOINT"] = (
        "1" if mistake == "hub id, offline, not cached" else "http://127.0.0.1:9"
    )
    start = time.monotonic()
    proc = subprocess.run(
        [sys.executable, "-m", "fgclip.cli", *argv, "--params", str(local_params)],
        cwd=tmp_path, env=env, capture_output=True, text=True, timeout=120, check=False,
    )  # fmt: skip
    elapsed = time.monotonic() - start
    lines = proc.stderr.strip().splitlines()
    assert proc.returncode == 1 and "Traceback" not in proc.stderr, proc.stderr[-3000:]
    assert len(lines) == 1 and lines[0].startswith(f"fgclip {argv[0]}: error: "), proc.stderr[-3000:]
    assert message in lines[0]
    assert elapsed < 60  # seconds (imports on a loaded machine), not the minutes of retries


def test_evaluate_checks_the_training_runs_server_first(local_params, capsys):
    """The metrics go to the run in run.json: a server that is down fails at once, not after scoring."""
    model_dir = load_params(local_params).paths.model
    model_dir.mkdir(parents=True)
    (model_dir / "run.json").write_text(json.dumps({"run_id": "r", "tracking_uri": "http://127.0.0.1:9"}))
    # Imported before the clock starts: torch alone takes seconds on a loaded machine.
    import fgclip.eval.evaluate
    import fgclip.train.tracking  # noqa: F401

    start = time.monotonic()
    assert main(["evaluate", "--params", str(local_params)]) == 1
    [line] = capsys.readouterr().err.strip().splitlines()
    assert line.startswith(
        "fgclip evaluate: error: MLflow tracking server http://127.0.0.1:9 is not reachable"
    )
    assert f"set the tracking_uri of {model_dir / 'run.json'}" in line
    assert time.monotonic() - start < 10


def _parsers(parser: argparse.ArgumentParser):
    yield parser
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for sub in action.choices.values():
                yield from _parsers(sub)


def test_no_parser_accepts_an_abbreviated_option(capsys):
    from fgclip.cli import build_parser

    parsers = list(_parsers(build_parser()))
    assert len(parsers) > 10
    assert [p.prog for p in parsers if p.allow_abbrev] == []
    with pytest.raises(SystemExit) as exit_:
        build_parser().parse_args(["train", "--max-step", "3"])  # once it meant --max-steps and trained
    assert exit_.value.code == 2
    assert "unrecognized arguments: --max-step" in capsys.readouterr().err


def test_ablate_refuses_a_params_file_the_experiments_would_not_run(tmp_path, capsys):
    other = tmp_path / "other.yaml"
    other.write_text((REPO / "params.yaml").read_text())
    assert main(["ablate", "--params", str(other), "--grid", "tiny"]) == 1
    assert "the experiments run the repository's params.yaml" in capsys.readouterr().err
