"""``fgclip ablate``: a grid × seeds as DVC experiments, run by DVC's queue, gathered in MLflow.

1. The grid is expanded and checked (``grid.py``): nothing is queued for a typo.
2. Experiments the current commit already finished are kept (a rerun resumes), any
   still queued or running are waited for, failed ones are removed from the queue and
   queued again, and the rest are queued: ``dvc exp run --queue --name <ablation>-<cell>-s<seed>``.
3. ``dvc queue start --jobs J`` runs them; this waits with a progress bar, and prints
   the end of each failed experiment's log as it fails (the others go on).
4. Each finished experiment's MLflow run (``run_id`` of its ``metrics/train.json``) is
   tagged as a child of the ablation's parent run, with its cell and seed.
5. The table is built from those children and written, with the bar chart, under
   ``ablation.out/<name>/`` and as artefacts of the parent run.
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from tqdm import tqdm

from fgclip.ablation import dvc_queue
from fgclip.ablation.grid import Experiment, Grid, GridError, load_grid
from fgclip.ablation.report import build_table, write_report
from fgclip.config import Params
from fgclip.errors import FGClipError

logger = logging.getLogger(__name__)

# Polls in a row with our experiments queued and no worker before the workers are started again.
IDLE_POLLS_BEFORE_RESTART = 3


class AblationFailed(FGClipError, RuntimeError):
    """Some experiments of the grid failed (the table holds the others)."""


@dataclass
class AblationResult:
    name: str
    parent_run_id: str
    table_md: str
    files: list[Path]
    failed: dict[str, str] = field(default_factory=dict)  # experiment name -> end of its log
    reused: list[str] = field(default_factory=list)  # finished before this run


def ablate(params: Params, grid: str | None = None, seeds: int | None = None, jobs: int | None = None,
           name: str | None = None) -> AblationResult:  # fmt: skip
    from fgclip.train.tracking import ablation_parent, ablation_runs, check_tracking, end_run, log_to_run

    repo = params.base_dir
    dvc_queue.check_repo(repo)
    spec = load_grid(params, grid or params.ablation.grid)
    name = name or spec.name
    seeds = params.ablation.seeds if seeds is None else seeds
    jobs = params.ablation.jobs if jobs is None else jobs
    if seeds < 1 or jobs < 1:
        raise GridError(f"--seeds and --jobs must be at least 1 (got {seeds} and {jobs})")
    experiments = spec.experiments(params, seeds, name)
    tracking_uri = params.tracking_uri
    check_tracking(tracking_uri)
    env = dvc_queue.worker_env(jobs)

    done = dvc_queue.finished(repo)
    _check_finished_params(experiments, done)
    states = dvc_queue.queue_status(repo)
    reused = [e.name for e in experiments if e.name in done]
    waiting = [e.name for e in experiments if e.name not in done and states.get(e.name) in dvc_queue.IN_FLIGHT]
    todo = [e for e in experiments if e.name not in done and e.name not in waiting]
    logger.info("ablation %s: %d experiments (%d cells x %d seeds): %d finished before, %d in the queue, %d to queue",
                name, len(experiments), len(spec.cells), seeds, len(reused), len(waiting), len(todo))  # fmt: skip
    parent = ablation_parent(tracking_uri, params.tracking.experiment, name, {
        "ablation.reference": spec.reference, "ablation.seeds": seeds, "ablation.grid": json.dumps(spec.cells),
        "ablation.baseline_rev": dvc_queue.baseline(repo)})  # fmt: skip
    dvc_queue.remove_tasks([e.name for e in todo if states.get(e.name) == dvc_queue.FAILED], repo)
    for exp in tqdm(todo, desc="queueing", unit="exp", disable=not todo):
        dvc_queue.enqueue(exp.name, exp.set_params(), repo, env)
    failed: dict[str, str] = {}
    if todo or waiting:
        dvc_queue.start_workers(jobs, repo, env)
        failed = _wait(experiments, set(reused), repo, jobs, env, params.ablation.poll_s)

    done = dvc_queue.finished(repo)
    _adopt(experiments, done, params, tracking_uri, parent, name)
    _, children = ablation_runs(tracking_uri, params.tracking.experiment, name)
    ours = {e.name for e in experiments}
    children = [c for c in children if c.tags.get("dvc.experiment") in ours]
    table = build_table(children, spec.reference, list(spec.cells))
    out_dir = params.path(params.ablation.out) / name
    files = write_report(out_dir, name, table, children)
    log_to_run(tracking_uri, parent, {}, files)
    end_run(tracking_uri, parent, "FAILED" if failed else "FINISHED")
    return AblationResult(name, parent, (out_dir / "table.md").read_text(encoding="utf-8"), files, failed, reused)


def _check_finished_params(experiments: list[Experiment], done: Mapping[str, dvc_queue.Finished]) -> None:
    """A finished experiment of the same name must have this grid's values: else it stands for another cell."""
    for exp in experiments:
        if exp.name not in done:
            continue
        have = done[exp.name].params
        for key, want in exp.overrides.items():
            value: Any = have
            for part in key.split("."):
                value = value.get(part) if isinstance(value, dict) else None
            if value != want:
                raise GridError(f"experiment {exp.name} already exists with {key}={value!r}, not {want!r}: "
                                f"remove it (dvc exp remove {exp.name}) or name this ablation otherwise (--name)")  # fmt: skip


def _wait(experiments: list[Experiment], finished_before: set[str], repo: Path, jobs: int,
          env: Mapping[str, str], poll_s: float) -> dict[str, str]:  # fmt: skip
    """Until none of ``experiments`` is queued or running; the failed ones with the end of their logs."""
    names = [e.name for e in experiments]
    failed: dict[str, str] = {}
    seen_done: set[str] = set(finished_before)
    idle = 0
    with tqdm(total=len(names), initial=len(seen_done), desc="ablation", unit="exp") as bar:
        while True:
            states = dvc_queue.queue_status(repo)
            for n in names:
                state = states.get(n)
                if n in seen_done or n in failed:
                    continue
                if state == dvc_queue.SUCCESS:
                    seen_done.add(n)
                    bar.update(1)
                elif state == dvc_queue.FAILED:
                    failed[n] = dvc_queue.task_log(n, repo)
                    bar.update(1)
                    tqdm.write(f"experiment {n} failed; the end of its log (dvc queue logs {n}):\n{failed[n]}")
            running = sum(states.get(n) == dvc_queue.RUNNING for n in names)
            queued = sum(states.get(n) == dvc_queue.QUEUED for n in names)
            bar.set_postfix(running=running, queued=queued, failed=len(failed), refresh=True)
            if not running and not queued:
                return failed
            # DVC's workers stop when the queue is empty; another `dvc queue stop` may have stopped them too.
            idle = idle + 1 if queued and not running else 0
            if idle >= IDLE_POLLS_BEFORE_RESTART:
                dvc_queue.start_workers(jobs, repo, env)
                idle = 0
            time.sleep(poll_s)


def _adopt(experiments: list[Experiment], done: Mapping[str, dvc_queue.Finished], params: Params,
           tracking_uri: str, parent: str, name: str) -> None:  # fmt: skip
    """Tag each finished experiment's MLflow run as a child of ``parent``."""
    from fgclip.train.tracking import ABLATION_TAG, CELL_TAG, PARENT_TAG, SEED_TAG, tag_run

    metrics_file = Path(params.train.metrics).as_posix()
    seen: dict[str, str] = {}
    for exp in experiments:
        if exp.name not in done:
            continue
        run_id = (done[exp.name].metrics.get(metrics_file) or {}).get("run_id")
        if not run_id:
            logger.warning("experiment %s: no run_id in its %s: not in the table", exp.name, metrics_file)
            continue
        if run_id in seen:
            logger.warning("experiments %s and %s share MLflow run %s: DVC reused one's outputs for the other",
                           seen[run_id], exp.name, run_id)  # fmt: skip
        seen[run_id] = exp.name
        tag_run(tracking_uri, run_id, {PARENT_TAG: parent, ABLATION_TAG: name, CELL_TAG: exp.cell,
                                       SEED_TAG: exp.seed, "dvc.experiment": exp.name,
                                       "dvc.experiment_rev": done[exp.name].rev}, name=exp.name)  # fmt: skip


__all__ = ["AblationFailed", "AblationResult", "Grid", "ablate"]
