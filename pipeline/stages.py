"""The DVC stages in pipeline order, and a thin runner over `dvc repro`.

The stage commands themselves live in dvc.yaml (they call the `fgclip` console
script); this module is what orchestrators (Prefect flows, tests) use to run one
stage or all of them in a repository without re-stating any ML logic.
"""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

STAGES: tuple[str, ...] = ("sample", "extract_frames", "validate_boxes", "pretrain", "train", "evaluate")


class StageFailed(RuntimeError):
    """`dvc repro` of a stage exited non-zero; the message carries its output tail."""


def dvc_executable() -> str:
    exe = shutil.which("dvc")
    if exe is None:
        raise FileNotFoundError("dvc not found on PATH (run `make install` or activate .venv)")
    return exe


def run_stage(repo: Path, stage: str | None = None, *, timeout: float | None = None) -> str:
    """`dvc repro [-s stage]` in ``repo``; returns its output, raises StageFailed on failure.

    ``-s`` (single stage) runs just that stage; an orchestrator calls the stages in
    STAGES order, so each one's upstream is already up to date.
    """
    if stage is not None and stage not in STAGES:
        raise ValueError(f"unknown stage {stage!r}; stages: {', '.join(STAGES)}")
    cmd = [dvc_executable(), "repro"] + (["-s", stage] if stage else [])
    proc = subprocess.run(cmd, cwd=repo, capture_output=True, text=True, timeout=timeout, check=False)
    output = proc.stdout + proc.stderr
    if proc.returncode != 0:
        raise StageFailed(f"{' '.join(cmd[1:])} failed (exit {proc.returncode}):\n{output[-4000:]}")
    return output
