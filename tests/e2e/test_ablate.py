"""`fgclip ablate` end to end: a scratch git + DVC repository, DVC's own queue and workers,
the MLflow database they log to, and the table checked against the child runs by hand."""

from __future__ import annotations

import base64
import csv
import io
import json
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import yaml
from e2e_helpers import TINY_PIPELINE, pipeline_env, scratch_repo, until
from mlflow import MlflowClient
from scipy import stats

from fgclip.ablation import dvc_queue
from fgclip.ablation.grid import load_grid
from fgclip.config import load_params

pytestmark = pytest.mark.e2e
FGCLIP = Path(sys.executable).with_name("fgclip")


def _run(cmd: list, cwd: Path, ok: bool = True) -> subprocess.CompletedProcess:
    proc = subprocess.run([str(c) for c in cmd], cwd=cwd, env=pipeline_env(), capture_output=True, text=True,
                          timeout=900, check=False)  # fmt: skip
    if ok:
        assert proc.returncode == 0, f"{cmd} failed:\n{(proc.stdout + proc.stderr)[-6000:]}"
    return proc


@pytest.fixture(scope="module")
def repo(tmp_path_factory) -> Path:
    """The tiny pipeline, reproduced and committed: the experiments' baseline."""
    # An orphaned task (test_tasks_dvc_s_queue_lost_...) counts as lost after 5 s, not 30.
    repo = scratch_repo(tmp_path_factory.mktemp("ablate"), {**TINY_PIPELINE, "ablation": {"lost_task_s": 5}})
    (repo / ".gitignore").write_text("mlflow.db\nmlartifacts/\ncheckpoints/\nreports/\n")
    _run([sys.executable, "-m", "dvc", "repro", "--quiet"], repo)
    _run(["git", "add", "-A"], repo)
    _run(["git", "-c", "user.name=t", "-c", "user.email=t@t", "commit", "-qm", "baseline"], repo)
    return repo


def _mlflow(repo: Path):
    client = MlflowClient(f"sqlite:///{repo / 'mlflow.db'}")
    experiment = client.get_experiment_by_name("fgclip-vad")
    return client, experiment.experiment_id


def _children(repo: Path, name: str):
    client, exp_id = _mlflow(repo)
    parents = client.search_runs([exp_id], f"tags.`ablation.name` = '{name}' and tags.`ablation.role` = 'parent'")
    assert len(parents) == 1, "one parent run per ablation, reused by a rerun"
    kids = client.search_runs([exp_id], f"tags.`mlflow.parentRunId` = '{parents[0].info.run_id}'")
    return client, parents[0], kids


def test_the_tiny_grid_runs_through_dvc_s_queue_and_its_table_is_the_children_s_figures(repo: Path):
    proc = _run([FGCLIP, "ablate", "--grid", "tiny", "--seeds", "2", "--jobs", "2"], repo)
    assert "4 to queue" in proc.stderr

    # Each cell x seed is an ordinary DVC experiment of the baseline commit.
    shown = json.loads(_run([sys.executable, "-m", "dvc", "exp", "show", "--json"], repo).stdout)
    names = {rev["name"] for entry in shown for exp in entry.get("experiments") or [] for rev in exp["revs"]}
    assert names == {"tiny-global_only-s0", "tiny-global_only-s1", "tiny-region_loss-s0", "tiny-region_loss-s1"}

    client, parent, kids = _children(repo, "tiny")
    assert parent.info.status == "FINISHED"
    cells = {(k.data.tags["ablation.cell"], int(k.data.tags["ablation.seed"])): k for k in kids}
    assert sorted(cells) == [("global_only", 0), ("global_only", 1), ("region_loss", 0), ("region_loss", 1)]
    for (cell, seed), kid in cells.items():
        assert kid.info.run_name == f"tiny-{cell}-s{seed}"
        assert kid.data.params["train.seed"] == str(seed)  # the run trained what its tags say
        assert float(kid.data.params["train.region_loss_weight"]) == (0.0 if cell == "global_only" else 0.5)
        assert int(kid.data.params["train.max_steps"]) == 4
        assert kid.data.tags["dvc.experiment"] == f"tiny-{cell}-s{seed}"
    assert len({k.info.run_id for k in kids}) == 4 == len(kids)

    # The table, by hand from the children's metrics: mean, sample std, paired difference and t-test.
    report = repo / "reports" / "ablation" / "tiny"
    table = {(r["cell"], r["metric"]): r for r in csv.DictReader(io.StringIO((report / "table.csv").read_text()))}
    for metric, key in (("frame_auc", "eval.finetuned.frame_auc"), ("frame_ap", "eval.finetuned.frame_ap"),
                        ("loss", "train/loss"), ("temp_global", "train/temperature")):  # fmt: skip
        by_cell = {c: np.array([cells[(c, s)].data.metrics[key] for s in (0, 1)]) for c in ("global_only", "region_loss")}
        for cell, values in by_cell.items():
            row = table[(cell, metric)]
            assert int(row["seeds"]) == 2
            assert float(row["mean"]) == pytest.approx(values.mean(), rel=1e-12)
            assert float(row["std"]) == pytest.approx(values.std(ddof=1), rel=1e-12)
        row = table[("region_loss", metric)]
        diff = by_cell["region_loss"] - by_cell["global_only"]
        assert float(row["diff"]) == pytest.approx(diff.mean(), rel=1e-12, abs=1e-15)
        if np.ptp(diff) > 0:
            assert float(row["p_value"]) == pytest.approx(stats.ttest_rel(by_cell["region_loss"], by_cell["global_only"]).pvalue)
    auc = np.array([cells[("region_loss", s)].data.metrics["eval.finetuned.frame_auc"] for s in (0, 1)])
    assert f"{auc.mean():.4f} ± {auc.std(ddof=1):.4f}" in (report / "table.md").read_text()

    logged = {a.path for a in client.list_artifacts(parent.info.run_id)}
    assert {"table.md", "table.tex", "table.csv", "runs.csv", "bars.png"} <= logged
    runs = list(csv.DictReader(io.StringIO((report / "runs.csv").read_text())))
    assert {r["mlflow_run_id"] for r in runs} == {k.info.run_id for k in kids}

    # `fgclip compare --ablation` reads the same table back from MLflow.
    shown_table = _run([FGCLIP, "compare", "--ablation", "tiny", "--format", "csv"], repo).stdout
    assert shown_table == (report / "table.csv").read_text()


def test_a_failing_cell_is_reported_the_others_go_on_and_a_rerun_resumes(repo: Path, tmp_path: Path):
    tiny = yaml.safe_load((repo / "params.yaml").read_text())["ablation"]["grids"]["tiny"]
    grid = tmp_path / "broken.yaml"
    grid.write_text(yaml.safe_dump({"reference": "global_only", "cells": {
        "global_only": tiny["cells"]["global_only"],  # finished by the test above: kept, not run again
        "broken": {"model.pretrained": str(tmp_path / "no-such-clip")},
    }}))  # fmt: skip
    proc = _run([FGCLIP, "ablate", "--grid", grid, "--seeds", "2", "--name", "tiny", "--jobs", "2"], repo, ok=False)
    assert proc.returncode == 1
    assert "2 finished before, 0 in the queue, 2 to queue" in proc.stderr
    assert "experiment tiny-broken-s0 failed" in proc.stderr and "no-such-clip" in proc.stderr
    assert "2 experiment(s) failed: tiny-broken-s0, tiny-broken-s1" in proc.stderr
    # The cells that ran are still tabled; the failed ones are not DVC experiments.
    table = (repo / "reports" / "ablation" / "tiny" / "table.csv").read_text()
    assert "global_only,frame_auc,2," in table and "broken" not in table
    listed = _run([sys.executable, "-m", "dvc", "exp", "ls", "--name-only"], repo).stdout.split()
    assert "tiny-broken-s0" not in listed and "tiny-global_only-s0" in listed
    _, parent, _ = _children(repo, "tiny")
    assert parent.info.status == "FAILED"

    # A typo in a cell fails before anything is queued.
    grid.write_text(yaml.safe_dump({"reference": "a", "cells": {"a": {"train.max_step": 4}}}))
    bad = _run([FGCLIP, "ablate", "--grid", grid], repo, ok=False)
    assert bad.returncode == 1 and "train.max_step is not a param" in bad.stderr
    assert "Queued" not in _run([sys.executable, "-m", "dvc", "queue", "status"], repo).stdout


def _lost_grid(repo: Path, tmp_path: Path, cells: tuple[str, ...]) -> Path:
    tiny = yaml.safe_load((repo / "params.yaml").read_text())["ablation"]["grids"]["tiny"]
    grid = tmp_path / "lost.yaml"
    grid.write_text(yaml.safe_dump({"reference": cells[0], "cells": {c: tiny["cells"][c] for c in cells}}))
    return grid


def _queued_message(repo: Path, name: str) -> Path | None:
    """``name``'s task message waiting in DVC's broker, if one is."""
    entry = json.dumps(name)  # the task's message names its experiment
    inbox = repo / ".dvc" / "tmp" / "exps" / "celery" / "broker" / "in"
    found = [m for m in inbox.glob("*.celery.msg") if entry in _decoded(m)]
    assert len(found) <= 1, found
    return found[0] if found else None


def _orphan(repo: Path, name: str) -> None:
    """Do to ``name``'s queued task what DVC's filesystem broker does when the worker it handed the
    message to shuts down ("empty queue") before running it: with DVC's late acks and no restore at
    shutdown the message sits in broker/processed with no result, listed as running forever
    (treeverse/dvc#10562, dvc-task#77; seen in this project's CI with two workers)."""
    message = _queued_message(repo, name)
    assert message is not None, f"no queued message of {name}"
    shutil.move(message, message.parent.parent / "processed" / message.name)


def _decoded(message: Path) -> str:
    try:
        body = json.loads(message.read_text())["body"]
    except (FileNotFoundError, json.JSONDecodeError):  # taken, or still being written
        return ""
    return base64.b64decode(body).decode()


def test_tasks_dvc_s_queue_lost_before_and_during_the_run_are_queued_again(repo: Path, tmp_path: Path):
    # The earlier tests' workers stop ~10 s after their queue emptied; one still up would take the messages.
    celery = repo / ".dvc" / "tmp" / "exps" / "celery"
    until("the earlier queue workers to stop", lambda: not dvc_queue.any_worker_alive(celery), timeout=60)
    grid = _lost_grid(repo, tmp_path, ("global_only", "region_loss"))
    params = load_params(repo / "params.yaml")
    first, second = load_grid(params, str(grid)).experiments(params, 1, "lost")
    # Before the run: the first experiment queued as `fgclip ablate` queues it, then orphaned
    # with no worker at all. DVC lists it as running, and its `dvc exp show` fails on it.
    _run([sys.executable, "-m", "dvc", "exp", "run", "--queue", "--name", first.name, *first.set_params()], repo)
    _orphan(repo, first.name)
    assert _state(repo, first.name) == "Running"
    assert _run([sys.executable, "-m", "dvc", "exp", "show", "--json"], repo, ok=False).returncode != 0

    # During the run: one worker, two experiments. While the first runs, the second's message
    # waits in the broker (DVC's workers prefetch nothing); orphaned there, the worker finds
    # the queue empty after the first and stops, and the ablation must notice.
    cmd = [FGCLIP, "ablate", "--grid", grid, "--seeds", "1", "--name", "lost", "--jobs", "1"]
    with subprocess.Popen([str(c) for c in cmd], cwd=repo, env=pipeline_env(), stdout=subprocess.PIPE,
                          stderr=subprocess.PIPE, text=True) as proc:  # fmt: skip
        try:
            # The second is queued after the first's orphan was cleared and the first queued
            # again; then the worker takes the first's message. (The broker's files, not
            # `dvc queue status`: a second of CPU a look, on the cores the experiment trains on.)
            until(f"{second.name} queued", lambda: _queued_message(repo, second.name), timeout=120)
            until(f"{first.name} taken", lambda: not _queued_message(repo, first.name), timeout=120)
            _orphan(repo, second.name)
            out, err = proc.communicate(timeout=600)
        finally:
            proc.kill()
    assert proc.returncode == 0, (out + err)[-6000:]
    assert f"experiment {first.name}: DVC's queue lost it" in err and "marked failed, to be queued again" in err
    assert "0 finished before, 0 in the queue, 2 to queue" in err
    assert f"experiment {second.name}: DVC's queue lost it" in err and "; queued again" in err
    listed = _run([sys.executable, "-m", "dvc", "exp", "ls", "--name-only"], repo).stdout.split()
    assert first.name in listed and second.name in listed
    _, parent, kids = _children(repo, "lost")
    assert parent.info.status == "FINISHED" and sorted(k.info.run_name for k in kids) == [first.name, second.name]


def _state(repo: Path, name: str) -> str | None:
    status = _run([sys.executable, "-m", "dvc", "queue", "status"], repo).stdout
    rows = [line.split() for line in status.splitlines() if f" {name} " in f" {line} "]
    return rows[0][-1] if rows else None
