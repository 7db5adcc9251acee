"""The DVC stages in pipeline order, and a thin runner over `dvc repro`.

The stages themselves, their commands (the `fgclip` console script) and their
order live in dvc.yaml; this module is what orchestrators (Prefect flows, tests)
use to run one stage or all of them in a repository without re-stating any ML
logic, or the stage list.
"""

from __future__ import annotations

import importlib.util
import os
import re
import signal
import subprocess
import sys
from collections.abc import Mapping
from pathlib import Path

import yaml

from fgclip.errors import USER_ERROR_LINE, FGClipError
from fgclip.toolenv import dvc_command, tool_env

DVC_FILE = "dvc.yaml"

# Characters of a failed stage's output kept in StageFailed: enough for a traceback.
TAIL_CHARS = 4000

# DVC's report of a stage command the shell could not find (status 127: command not found).
MISSING_COMMAND = re.compile(r"exited with 127\b")
# Something else holds what the stage needs, or a server is down: it may be free on a
# retry, even when the stage reports it as a user error (fgclip's run lock, its tracking probe).
BUSY = re.compile(
    r"Unable to acquire lock"  # DVC's repository lock (dvc.lock.FAILED_TO_LOCK_MESSAGE)
    r"|' is busy, it is being blocked by"  # DVC's read/write lock of an output (dvc.rwlock)
    r"|is in use by .*lock file"  # fgclip.train.runlock.RunLockedError
    r"|another process keeps taking it"  # RunLockedError, a lock raced for
    r"|is not reachable"  # fgclip.train.tracking.TrackingUnavailable: the server may come up
)


class StageFailed(RuntimeError):
    """`dvc repro` of a stage exited non-zero; the message carries its output tail."""


class PermanentStageError(StageFailed):
    """A stage failure a retry cannot cure: a missing executable, invalid params, bad input."""


def is_permanent_output(output: str) -> bool:
    """Whether a failed stage's output shows an error that running it again would repeat.

    A lock or busy resource is never permanent; otherwise a missing command or the CLI's
    one-line user error is. Anything else (a kill, a timeout, a traceback) may pass on a retry.
    """
    if BUSY.search(output):
        return False
    return bool(MISSING_COMMAND.search(output) or USER_ERROR_LINE.search(output))


def is_permanent(exc: BaseException) -> bool:
    """Whether running the stage again cannot help: an orchestrator's retry condition."""
    # ValueError / FileNotFoundError: an unknown stage or a broken dvc.yaml, found before DVC runs.
    return isinstance(exc, (PermanentStageError, FGClipError, ValueError, FileNotFoundError))


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


def dvc_argv() -> list[str]:
    """This interpreter's DVC (``python -m dvc``): no PATH lookup, so no activated venv needed."""
    if importlib.util.find_spec("dvc") is None:
        raise PermanentStageError(
            f"dvc is not installed in {sys.executable}'s environment (run `make install`)"
        )
    return dvc_command()


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
    the flow run id reaches the training run's MLflow tags). This interpreter's ``bin``
    goes first on PATH, so DVC's shell finds the ``fgclip`` stage commands of dvc.yaml
    even when the venv is not activated.

    A failure that a retry would repeat (see :func:`is_permanent_output`) raises
    :class:`PermanentStageError`, so an orchestrator can fail it at once.

    DVC is not asked to wait for its repository lock: when another `dvc` holds it,
    the stage fails at once with DVC's lock error and the orchestrator's retry (with
    its delay, visible in the UI) is the wait. On ``timeout``, or when this call is
    interrupted, the whole process group (dvc and the stage command it started) is
    killed, so no orphaned training job keeps writing checkpoints.
    """
    if stage is not None and stage not in (stages := stage_order(repo)):
        raise ValueError(f"unknown stage {stage!r}; stages: {', '.join(stages)}")
    args = ["repro"] + (["-s", stage] if stage else [])
    cmd = dvc_argv() + args
    try:
        proc = subprocess.Popen(
            cmd,
            cwd=repo,
            env=tool_env({**os.environ, **(env or {})}),
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,  # one stream, in order: the tail shows the error after what led to it
            text=True,
            start_new_session=True,  # its own process group, so it can be killed with its children
        )
    except FileNotFoundError as exc:  # the interpreter itself is gone, or the repository is
        raise PermanentStageError(f"cannot run dvc {' '.join(args)} in {repo}: {exc}") from exc
    try:
        output, _ = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        _kill_group(proc)
        output, _ = proc.communicate()
        raise StageFailed(
            f"dvc {' '.join(args)} timed out after {timeout:g} s and was killed:\n{output[-TAIL_CHARS:]}"
        ) from None
    except BaseException:
        _kill_group(proc)
        raise
    if proc.returncode != 0:
        error = PermanentStageError if is_permanent_output(output) else StageFailed
        raise error(f"dvc {' '.join(args)} failed (exit {proc.returncode}):\n{output[-TAIL_CHARS:]}")
    return output


def _kill_group(proc: subprocess.Popen) -> None:
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except ProcessLookupError:  # already gone
        pass
    proc.wait()
