"""``fgclip ablate``: a grid × seeds as DVC experiments, run by DVC's queue, gathered in MLflow.

1. The grid is expanded and checked (``grid.py``): nothing is queued for a typo.
2. Experiments the current commit already finished with the same params are kept (a rerun
   resumes), any of this commit still queued or running are waited for, failed ones are
   removed from the queue and queued again, and the rest are queued:
   ``dvc exp run --queue --name <ablation>-<cell>-s<seed> --set-param ...``.
3. ``dvc queue start --jobs J`` runs them; this waits with a progress bar, and prints
   the end of each failed experiment's log as it fails (the others go on).
4. Each finished experiment's MLflow run (``run_id`` of its ``train.metrics``) is tagged
   as a child of the ablation's parent run, with its cell and seed.
5. The table is built from those children and written, with the bar chart, under
   ``ablation.out/<name>/`` and as artefacts of the parent run.
"""

from __future__ import annotations

import json
import logging
import sys
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

from pydantic import ValidationError
from tqdm import tqdm

from fgclip.ablation import dvc_queue
from fgclip.ablation.grid import Experiment, Grid, GridError, check_name, comparable, load_grid
from fgclip.ablation.report import build_table, write_report
from fgclip.ablation.table import AblationTableError
from fgclip.config import Params
from fgclip.errors import FGClipError

logger = logging.getLogger(__name__)

# Polls in a row with our experiments queued and no worker before the workers are started again.
IDLE_POLLS_BEFORE_RESTART = 3
# Times one experiment lost by DVC's queue (dvc_queue.Task.orphan) is queued again before it counts as failed.
MAX_REQUEUES = 2
# A queue look costs about a second of CPU: the wait between looks grows to this while nothing changes.
MAX_POLL_S = 60.0


class AblationFailed(FGClipError, RuntimeError):
    """Some experiments of the grid failed (the table holds the others)."""


@dataclass
class AblationResult:
    name: str
    parent_run_id: str
    table_md: str
    files: list[Path]
    failed: dict[str, str] = field(default_factory=dict)  # experiment name -> why (the end of its log)
    reused: list[str] = field(default_factory=list)  # finished before this run


def ablate(params: Params, grid: str | None = None, seeds: int | None = None, jobs: int | None = None,
           name: str | None = None) -> AblationResult:  # fmt: skip
    from fgclip.train.tracking import (
        BASELINE_TAG,
        GRID_TAG,
        REFERENCE_TAG,
        SEEDS_TAG,
        ablation_parent,
        check_tracking,
        end_run,
    )

    repo = params.base_dir
    dvc_queue.check_repo(repo)
    spec = load_grid(params, grid or params.ablation.grid)
    name = check_name(name or spec.name)
    seeds = params.ablation.seeds if seeds is None else seeds
    jobs = params.ablation.jobs if jobs is None else jobs
    if seeds < 1 or jobs < 1:
        raise GridError(f"--seeds and --jobs must be at least 1 (got {seeds} and {jobs})")
    experiments = spec.experiments(params, seeds, name)
    tracking_uri = params.tracking_uri
    check_tracking(tracking_uri)
    baseline = dvc_queue.baseline(repo)
    changed = dvc_queue.uncommitted(repo)
    if changed:
        logger.warning("uncommitted changes go into every experiment queued now, while the MLflow runs name "
                       "commit %s only: %s", baseline[:8], ", ".join(changed[:5]) + (" ..." if len(changed) > 5 else ""))  # fmt: skip
    # DVC's `exp show`, which `finished` reads, fails on an orphaned task: settle them first.
    _fail_orphans(repo, baseline, params.ablation.lost_task_s, params.ablation.poll_s)
    done = dvc_queue.finished(repo)
    _check_finished_params(experiments, done, params)

    finished_before = [e.name for e in experiments if e.name in done]
    seed_list = sorted({e.seed for e in experiments})
    parent = ablation_parent(tracking_uri, params.tracking.experiment, name, {
        REFERENCE_TAG: spec.reference, SEEDS_TAG: json.dumps(seed_list), GRID_TAG: json.dumps(list(spec.cells)),
        BASELINE_TAG: baseline})  # fmt: skip
    status = "FAILED"
    try:
        failed = _run_queue(experiments, done, repo, baseline, jobs, params.ablation.poll_s,
                            params.ablation.lost_task_s)  # fmt: skip
        done = dvc_queue.finished(repo)
        for exp in experiments:  # removed from the queue, or DVC could not collect its results
            if exp.name not in done and exp.name not in failed:
                failed[exp.name] = "neither finished nor failed in DVC's queue (removed, or not collected)"
        children = _adopt(experiments, done, tracking_uri, params.tracking.experiment, parent, name, baseline)
        try:
            table = build_table(children, spec.reference, list(spec.cells))
        except AblationTableError as exc:
            raise AblationFailed(f"no table: {exc}; failed: {', '.join(sorted(failed)) or 'none'}") from exc
        out_dir = params.path(params.ablation.out) / name
        files = write_report(out_dir, name, table, children)
        _log_report(tracking_uri, parent, files)
        status = "FAILED" if failed else "FINISHED"
    except KeyboardInterrupt:
        status = "KILLED"
        raise AblationFailed("stopped waiting (Ctrl-C); the queue runs on: `dvc queue status` shows it, "
                             "`fgclip ablate` again waits for it and tables it, `dvc queue kill` stops it") from None  # fmt: skip
    finally:
        end_run(tracking_uri, parent, status)
    return AblationResult(name, parent, (out_dir / "table.md").read_text(encoding="utf-8"), files, failed,
                          finished_before)  # fmt: skip


def _log_report(tracking_uri: str, parent: str, files: list[Path]) -> None:
    from fgclip.train.tracking import log_to_run

    log_to_run(tracking_uri, parent, {}, files)


def _run_queue(experiments: list[Experiment], done: Mapping[str, dvc_queue.Finished], repo: Path, baseline: str,
               jobs: int, poll_s: float, lost_after_s: float) -> dict[str, str]:  # fmt: skip
    """Queue what is missing, start the workers, wait; the failed experiments with the end of their logs."""
    all_tasks = dvc_queue.queue_tasks(repo, baseline)
    live = {t.name for t in all_tasks if t.state in dvc_queue.IN_FLIGHT}
    finished_before = [e.name for e in experiments if e.name in done]
    waiting = [e.name for e in experiments if e.name not in done and e.name in live]
    todo = [e for e in experiments if e.name not in done and e.name not in live]
    logger.info("%d experiments: %d finished before, %d in the queue, %d to queue",
                len(experiments), len(finished_before), len(waiting), len(todo))  # fmt: skip
    # An old task of the same name (failed, or a success whose experiment was removed since)
    # would read as this run's result the moment it is queued again.
    names = {e.name for e in todo}
    dvc_queue.remove_tasks([t for t in all_tasks if t.name in names], repo)
    env = dvc_queue.worker_env(jobs)
    for exp in tqdm(todo, desc="queueing", unit="exp", disable=not todo):
        dvc_queue.enqueue(exp.name, exp.set_params(), repo, env)
    if not todo and not waiting:
        return {}
    dvc_queue.start_workers(jobs, repo, env)
    return _wait(experiments, set(finished_before), repo, baseline, jobs, env, poll_s, lost_after_s)


def _check_finished_params(experiments: list[Experiment], done: Mapping[str, dvc_queue.Finished],
                           params: Params) -> None:  # fmt: skip
    """A finished experiment of the same name must have run with exactly these params, else it is another cell."""
    for exp in experiments:
        if exp.name not in done:
            continue
        try:
            ran = comparable(Params.model_validate({**done[exp.name].params, "base_dir": params.base_dir}))
        except ValidationError:
            ran = None
        if ran != comparable(exp.resolved):
            raise GridError(f"experiment {exp.name} of this commit ran with other params than this grid gives it "
                            f"(an edited params.yaml or cell): remove it (dvc exp remove {exp.name}) or "
                            "name this ablation otherwise (--name)")  # fmt: skip


def _wait(experiments: list[Experiment], finished_before: set[str], repo: Path, baseline: str, jobs: int,
          env: Mapping[str, str], poll_s: float, lost_after_s: float) -> dict[str, str]:  # fmt: skip
    """Until none of ``experiments`` is queued or running; the failed ones with the end of their logs.

    An experiment DVC lists as running while nothing runs it (``Task.orphan``) for
    ``lost_after_s`` is killed (DVC marks it failed), removed and queued again, at most
    MAX_REQUEUES times: else the ablation would wait for it forever.
    """
    by_name = {e.name: e for e in experiments}
    names = list(by_name)
    failed: dict[str, str] = {}
    seen_done = set(finished_before)
    idle = 0
    interval = poll_s
    previous: dict[str, str | None] = {}
    orphaned_since: dict[str, float] = {}
    requeued: dict[str, int] = {}
    with tqdm(total=len(names), initial=len(seen_done), desc="ablation", unit="exp") as bar:
        while True:
            tasks = dvc_queue.queue_status(repo, baseline)
            orphans = {n for n in names if n in tasks and tasks[n].orphan}
            orphaned_since = {n: orphaned_since.get(n, time.monotonic()) for n in orphans}
            lost = [n for n, since in orphaned_since.items() if time.monotonic() - since >= lost_after_s]
            if lost:
                _requeue_lost([tasks[n] for n in lost], by_name, requeued, failed, repo, jobs, env)
                bar.update(sum(n in failed for n in lost))
                for n in lost:
                    del orphaned_since[n]
                continue
            now = {n: (tasks[n].state if n in tasks else None) for n in names}
            for n, state in now.items():
                if n in seen_done or n in failed:
                    continue
                if state == dvc_queue.SUCCESS:
                    seen_done.add(n)
                    bar.update(1)
                elif state == dvc_queue.FAILED:
                    failed[n] = dvc_queue.task_log(tasks[n], repo)
                    bar.update(1)
                    tqdm.write(f"experiment {n} failed; the end of its log (dvc queue logs {n}):\n{failed[n]}",
                               file=sys.stderr)  # fmt: skip
            running = sum(s == dvc_queue.RUNNING for s in now.values())
            queued = sum(s == dvc_queue.QUEUED for s in now.values())
            bar.set_postfix(running=running, queued=queued, failed=len(failed), refresh=True)
            if not running and not queued:
                return failed
            # DVC's workers stop when the queue is empty; a `dvc queue stop` elsewhere stops them too.
            idle = idle + 1 if queued and not running else 0
            if idle >= IDLE_POLLS_BEFORE_RESTART:
                dvc_queue.start_workers(jobs, repo, env)
                idle = 0
            interval = poll_s if now != previous or orphans else min(interval * 1.5, MAX_POLL_S)
            previous = now
            time.sleep(interval)


def _fail_orphans(repo: Path, baseline: str, lost_after_s: float, poll_s: float) -> None:
    """Have DVC mark failed the tasks of this commit it lists as running while nothing runs them
    (``Task.orphan``, for ``lost_after_s``): the run then removes and queues them again as any
    failed experiment of its grid."""
    since: dict[str, float] = {}
    killed: set[str] = set()
    while True:
        orphans = {t.rev: t for t in dvc_queue.queue_tasks(repo, baseline) if t.orphan}
        since = {rev: since.get(rev, time.monotonic()) for rev in orphans}
        if not orphans:
            return
        if killed & set(orphans):
            raise dvc_queue.DvcError(f"dvc queue kill left {', '.join(orphans[r].name for r in killed & set(orphans))} "
                                     "listed as running: see `dvc queue status`")  # fmt: skip
        lost = [orphans[rev] for rev, t0 in since.items() if time.monotonic() - t0 >= lost_after_s]
        if lost:
            dvc_queue.kill_tasks(lost, repo)
            killed |= {t.rev for t in lost}
            for task in lost:
                logger.warning("experiment %s: DVC's queue lost it (listed as running, no worker or process "
                               "running it: a DVC queue race); marked failed, to be queued again", task.name)  # fmt: skip
            since = {}
            continue
        time.sleep(min(poll_s, lost_after_s))


def _requeue_lost(lost: list[dvc_queue.Task], by_name: Mapping[str, Experiment], requeued: dict[str, int],
                  failed: dict[str, str], repo: Path, jobs: int, env: Mapping[str, str]) -> None:  # fmt: skip
    """Clear DVC's orphaned tasks and queue their experiments again (or fail those lost too often)."""
    dvc_queue.kill_tasks(lost, repo)
    dvc_queue.remove_tasks(lost, repo)
    for task in lost:
        if requeued.get(task.name, 0) >= MAX_REQUEUES:
            failed[task.name] = (f"lost by DVC's queue {MAX_REQUEUES + 1} times (listed as running, no worker or "
                                 "process running it): see `dvc queue status`, then run `fgclip ablate` again")  # fmt: skip
            tqdm.write(f"experiment {task.name} failed: {failed[task.name]}", file=sys.stderr)
            continue
        requeued[task.name] = requeued.get(task.name, 0) + 1
        tqdm.write(f"experiment {task.name}: DVC's queue lost it (listed as running, no worker or process "
                   "running it: a DVC queue race); queued again", file=sys.stderr)  # fmt: skip
        exp = by_name[task.name]
        dvc_queue.enqueue(exp.name, exp.set_params(), repo, env)
    dvc_queue.start_workers(jobs, repo, env)


def _adopt(experiments: list[Experiment], done: Mapping[str, dvc_queue.Finished], tracking_uri: str,
           experiment: str, parent: str, name: str, baseline: str) -> list:  # fmt: skip
    """Tag each finished experiment's MLflow run as a child of ``parent``; returns those runs."""
    from fgclip.train.tracking import (
        ABLATION_TAG,
        BASELINE_TAG,
        CELL_TAG,
        SEED_TAG,
        ablation_runs,
        adopt_child,
        read_run,
        release_child,
    )

    children, seen = [], {}
    for exp in experiments:
        if exp.name not in done:
            continue
        metrics_file = Path(exp.resolved.train.metrics).as_posix()
        run_id = (done[exp.name].metrics.get(metrics_file) or {}).get("run_id")
        if not run_id:
            logger.warning("experiment %s: no run_id in its %s: not in the table", exp.name, metrics_file)
            continue
        if run_id in seen:
            logger.warning("experiments %s and %s share MLflow run %s: DVC reused one's outputs for the other",
                           seen[run_id], exp.name, run_id)  # fmt: skip
            continue
        seen[run_id] = exp.name
        tags = {ABLATION_TAG: name, CELL_TAG: exp.cell, SEED_TAG: exp.seed, BASELINE_TAG: baseline,
                "dvc.experiment_rev": done[exp.name].rev}  # fmt: skip
        for note in adopt_child(tracking_uri, run_id, parent, exp.name, tags):
            logger.warning("%s", note)
        children.append(read_run(tracking_uri, run_id))
    # An experiment removed and run again leaves its old run under the parent: release it,
    # so the MLflow UI shows one child per cell and seed, as the table does.
    adopted = {(c.tags[CELL_TAG], c.tags[SEED_TAG]): c.run_id for c in children}
    _, current = ablation_runs(tracking_uri, experiment, name)
    for old in current:
        key = (old.tags.get(CELL_TAG), old.tags.get(SEED_TAG))
        if key in adopted and adopted[key] != old.run_id:
            release_child(tracking_uri, old.run_id, adopted[key])
    return children


__all__ = ["AblationFailed", "AblationResult", "Grid", "ablate"]
