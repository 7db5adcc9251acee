"""The DVC stages in pipeline order, and a thin runner over `dvc repro`.

The stages themselves, their commands (the `fgclip` console script) and their
order live in dvc.yaml; this module is what orchestrators (Prefect flows, tests)
use to run one stage or all of them in a repository without re-stating any ML
logic, or the stage list.
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
from collections.abc import Mapping
from pathlib import Path

import yaml

DVC_FILE = "dvc.yaml"

# Characters of a failed stage's output kept in StageFailed: enough for a traceback.
TAIL_CHARS = 4000


class StageFailed(RuntimeError):
    """`dvc repro` of a stage exited non-zero; the message carries its output tail."""


def stage_order(repo: Path) -> tuple[str, ...]:
    """The stages of ``repo``'s dvc.yaml in pipeline order: its ``stages:`` keys, as written.

    dvc.yaml writes each stage after the stages whose outputs it reads (a test
    checks this against DVC's own graph), so running them in this order finds
    every stage's upstream already up to date.
    """
    path = Path(repo) / DVC_FILE
    try:
        pipeline = yaml.safe_load(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise FileNotFoundError(f"{path} not found: not a DVC pipeline repository") from None
    except yaml.YAMLError as exc:
        raise ValueError(f"{path}: not valid YAML: {exc}") from exc
    stages = pipeline.get("stages") if isinstance(pipeline, dict) else None
    if not isinstance(stages, dict) or not stages:
        raise ValueError(f"{path}: no stages (a `stages:` mapping of stage names)")
    return tuple(stages)


def dvc_executable() -> str:
    exe = shutil.which("dvc")
    if exe is None:
        raise FileNotFoundError("dvc not found on PATH (run `make install` or activate .venv)")
    return exe


def run_stage(
    repo: Path,
    stage: str | None = None,
    *,
    timeout: float | None = None,
    env: Mapping[str, str] | None = None,
) -> str:
    """`dvc repro [-s stage]` in ``repo``; returns its output, raises StageFailed on failure.

    ``-s`` (single stage) runs just that stage; an orchestrator calls the stages in
    :func:`stage_order`, so each one's upstream is already up to date. ``env`` is added to
    this process's environment; DVC passes it on to the stage command (that is how
    the flow run id reaches the training run's MLflow tags).

    DVC is not asked to wait for its repository lock: when another `dvc` holds it,
    the stage fails at once with DVC's lock error and the orchestrator's retry (with
    its delay, visible in the UI) is the wait. On ``timeout``, or when this call is
    interrupted, the whole process group (dvc and the stage command it started) is
    killed, so no orphaned training job keeps writing checkpoints.
    """
    if stage is not None and stage not in (stages := stage_order(repo)):
        raise ValueError(f"unknown stage {stage!r}; stages: {', '.join(stages)}")
    cmd = [dvc_executable(), "repro"] + (["-s", stage] if stage else [])
    proc = subprocess.Popen(
        cmd,
        cwd=repo,
        env={**os.environ, **(env or {})},
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,  # one stream, in order: the tail shows the error after what led to it
        text=True,
        start_new_session=True,  # its own process group, so it can be killed with its children
    )
    try:
        output, _ = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        _kill_group(proc)
        output, _ = proc.communicate()
        raise StageFailed(
            f"dvc {' '.join(cmd[1:])} timed out after {timeout:g} s and was killed:\n{output[-TAIL_CHARS:]}"
        ) from None
    except BaseException:
        _kill_group(proc)
        raise
    if proc.returncode != 0:
        raise StageFailed(f"dvc {' '.join(cmd[1:])} failed (exit {proc.returncode}):\n{output[-TAIL_CHARS:]}")
    return output


def _kill_group(proc: subprocess.Popen) -> None:
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except ProcessLookupError:  # already gone
        pass
    proc.wait()
