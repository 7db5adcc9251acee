"""DVC's experiment queue, driven through its own CLI: queue, start workers, watch, read back.

DVC runs every experiment (``dvc exp run --queue`` then ``dvc queue start --jobs J``);
this module only issues those commands and reads their state. ``dvc`` is run as
``<this interpreter> -m dvc`` so no PATH is assumed, and the workers get this
interpreter's ``bin`` directory first on their PATH, where the stages' ``fgclip`` lives.
"""

from __future__ import annotations

import json
import os
import subprocess
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from fgclip.errors import FGClipError
from fgclip.toolenv import dvc_command, tool_env

# Queue task states, as `dvc queue status` prints them.
QUEUED, RUNNING, SUCCESS, FAILED = "Queued", "Running", "Success", "Failed"
IN_FLIGHT = frozenset({QUEUED, RUNNING})
DVC_TIMEOUT_S = 300


class DvcError(FGClipError, RuntimeError):
    """A ``dvc`` command failed; the message holds the command and the end of its output."""


def worker_env(jobs: int) -> dict[str, str]:
    """The environment the queue's workers inherit: this venv's tools first, the cores shared.

    Each experiment's torch would otherwise start one thread per core, and J of them
    on the same cores run slower together than one after the other.
    """
    env = tool_env()
    if "OMP_NUM_THREADS" not in env:
        env["OMP_NUM_THREADS"] = str(max(1, (os.cpu_count() or 1) // max(1, jobs)))
    return env


def dvc(args: Sequence[str], repo: Path, env: Mapping[str, str] | None = None, check: bool = True,
        timeout: float | None = DVC_TIMEOUT_S) -> str:  # fmt: skip
    cmd = [*dvc_command(), *args]
    try:
        proc = subprocess.run(cmd, cwd=repo, env=dict(env or worker_env(1)), capture_output=True, text=True,
                              timeout=timeout, check=False)  # fmt: skip
    except subprocess.TimeoutExpired as exc:
        raise DvcError(f"dvc {' '.join(args[:3])} did not finish within {timeout} s") from exc
    out = proc.stdout + proc.stderr
    if check and proc.returncode != 0:
        tail = " | ".join(line for line in out.strip().splitlines()[-5:])
        raise DvcError(f"dvc {' '.join(args[:3])} failed (exit {proc.returncode}): {tail}")
    return proc.stdout if check else out


def check_repo(repo: Path) -> None:
    """An ablation needs a git repository with a commit (the experiments' baseline) and DVC."""
    if not (repo / ".dvc").is_dir():
        raise DvcError(f"{repo} is not a DVC repository (no .dvc/): run `dvc init` there first")
    proc = subprocess.run(["git", "rev-parse", "--verify", "HEAD"], cwd=repo, capture_output=True, text=True,
                          check=False)  # fmt: skip
    if proc.returncode != 0:
        raise DvcError(f"{repo}: no git commit yet: DVC experiments start from one (git commit first)")


def uncommitted(repo: Path) -> list[str]:
    """Tracked files with changes: DVC stashes them into every queued experiment."""
    out = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=repo, capture_output=True,
                         text=True, check=False).stdout  # fmt: skip
    return [line[3:] for line in out.splitlines() if line.strip()]


def baseline(repo: Path) -> str:
    proc = subprocess.run(["git", "rev-parse", "HEAD"], cwd=repo, capture_output=True, text=True, check=False)
    if proc.returncode != 0:
        raise DvcError(f"{repo}: git rev-parse HEAD failed: {proc.stderr.strip()}")
    return proc.stdout.strip()


@dataclass(frozen=True)
class Task:
    name: str
    state: str  # QUEUED, RUNNING, SUCCESS or FAILED
    rev: str  # the queue entry's stash commit: `dvc queue remove` / `logs` take it
    # RUNNING, yet nothing runs it: no queue worker alive and no live experiment process.
    orphan: bool = False


def queue_tasks(repo: Path, baseline_rev: str) -> list[Task]:
    """Every task of the queue started from ``baseline_rev``, least telling first: failed,
    succeeded, queued, running.

    Read through DVC's own queue API (what ``dvc queue status`` prints), because its table
    has no commit column: experiment names are unique per commit only, and a finished
    task of another commit stays listed under the same name.
    """
    from dvc.exceptions import DvcException
    from dvc.repo import Repo

    tasks: list[Task] = []
    try:
        with Repo(str(repo)) as dvc_repo:
            queue = dvc_repo.experiments.celery_queue
            listings = (((e, FAILED) for e, _ in queue.iter_failed()), ((e, SUCCESS) for e, _ in queue.iter_success()),
                        ((e, QUEUED) for e in queue.iter_queued()), ((e, RUNNING) for e in queue.iter_active()))  # fmt: skip
            for listing in listings:
                tasks += [Task(e.name, state, e.stash_rev) for e, state in listing
                          if e.name and e.baseline_rev == baseline_rev]  # fmt: skip
            if any(t.state == RUNNING for t in tasks) and not any_worker_alive(Path(queue.wdir)):
                tasks = [replace(t, orphan=not _alive(queue.proc.get(t.rev))) if t.state == RUNNING else t
                         for t in tasks]  # fmt: skip
    except DvcException as exc:
        raise DvcError(f"{repo}: cannot read DVC's experiment queue: {exc}") from exc
    return tasks


# How a task is orphaned: DVC's filesystem broker hands its message to a worker whose
# monitor then shuts it down ("empty queue") before it runs it, and with DVC's late acks and
# no restore at shutdown the message is gone: the task reads as running forever
# (treeverse/dvc#10562, dvc-task#77). Seen in this project's CI with two workers.


def any_worker_alive(celery_dir: Path) -> bool:
    """Whether a queue worker lives: ``dvc queue start`` records each as ``dvc-exp-worker-N.json``."""
    from dvc_task.proc.process import ProcessInfo

    for path in celery_dir.glob("dvc-exp-worker-*.json"):
        try:
            info = ProcessInfo.load(str(path))
        except (OSError, ValueError, TypeError):
            continue  # unreadable: no live worker can be told from it
        if _alive(info):
            return True
    return False


def _alive(info: Any) -> bool:
    """Whether the process of a ``dvc_task`` ProcessInfo (None: never started) still runs."""
    if info is None or info.returncode is not None:
        return False
    try:
        os.kill(info.pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    try:  # a zombie is dead, only not reaped yet
        return Path(f"/proc/{info.pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except (OSError, IndexError):
        return True


def kill_tasks(tasks: Iterable[Task], repo: Path) -> None:
    """``dvc queue kill``: a task no process runs is marked failed by DVC itself, so it can be removed."""
    revs = [t.rev for t in tasks]
    if revs:
        dvc(["queue", "kill", *revs], repo)


def queue_status(repo: Path, baseline_rev: str) -> dict[str, Task]:
    """``{experiment name: task}`` for this commit; of several tasks of one name, a live one
    wins over a finished one, a success over a failure."""
    return {t.name: t for t in queue_tasks(repo, baseline_rev)}


@dataclass(frozen=True)
class Finished:
    """A finished experiment of the current baseline, as ``dvc exp show`` reports it."""

    name: str
    rev: str
    metrics: Mapping[str, Any]  # {metrics file: its JSON}
    params: Mapping[str, Any]  # params.yaml as the experiment ran it


def finished(repo: Path) -> dict[str, Finished]:
    """Every experiment of HEAD that DVC committed, by name (``dvc exp show --json``)."""
    try:
        shown = json.loads(dvc(["exp", "show", "--json"], repo) or "[]")
    except json.JSONDecodeError as exc:
        raise DvcError(f"{repo}: dvc exp show --json printed no JSON ({exc})") from exc
    out: dict[str, Finished] = {}
    for entry in shown:
        for exp in entry.get("experiments") or []:
            # A queued, running or failed one carries its executor's state; a committed one none.
            if (exp.get("executor") or {}).get("state") not in (None, "success"):
                continue
            for rev in exp.get("revs") or []:
                data = rev.get("data") or {}
                name = rev.get("name") or exp.get("name")
                if not name or rev.get("error"):
                    continue
                metrics = {path: (m or {}).get("data") or {} for path, m in (data.get("metrics") or {}).items()}
                params = ((data.get("params") or {}).get("params.yaml") or {}).get("data") or {}
                out[name] = Finished(name, rev["rev"], metrics, params)
    return out


def enqueue(name: str, set_params: Sequence[str], repo: Path, env: Mapping[str, str]) -> None:
    # No timeout: DVC stashes the workspace and detaches HEAD while it queues, and a kill
    # mid-way would leave both so; hashing a large dataset the first time takes minutes.
    dvc(["exp", "run", "--queue", "--name", name, *set_params], repo, env, timeout=None)


def start_workers(jobs: int, repo: Path, env: Mapping[str, str]) -> None:
    """``dvc queue start``: its workers are daemons that keep any inherited pipe open until they
    exit, so their output goes to DVC's own log files, not to a pipe this would wait on."""
    cmd = [*dvc_command(), "queue", "start", "--jobs", str(jobs)]
    try:
        code = subprocess.run(cmd, cwd=repo, env=dict(env), stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                              stderr=subprocess.DEVNULL, timeout=DVC_TIMEOUT_S, check=False).returncode  # fmt: skip
    except subprocess.TimeoutExpired as exc:
        raise DvcError(f"dvc queue start did not return within {DVC_TIMEOUT_S} s") from exc
    if code != 0:
        raise DvcError(f"dvc queue start --jobs {jobs} failed (exit {code}): run it by hand to see why")


def remove_tasks(tasks: Iterable[Task], repo: Path) -> None:
    revs = [t.rev for t in tasks]
    if revs:
        dvc(["queue", "remove", *revs], repo)


def task_log(task: Task, repo: Path, lines: int = 30) -> str:
    """The end of a task's log (``dvc queue logs``)."""
    text = dvc(["queue", "logs", task.rev], repo, check=False)
    return "\n".join(text.rstrip().splitlines()[-lines:])
