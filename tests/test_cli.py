"""The `fgclip` console script: help, and clear one-line errors for bad params."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from fgclip.cli import build_parser, main
from fgclip.config import LN_100, load_params

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
