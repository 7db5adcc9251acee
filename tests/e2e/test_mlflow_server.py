"""A real MLflow tracking server on a loopback port: a tiny training run logs to it over
HTTP, and the metric history read back through its REST API is the one training wrote."""

from __future__ import annotations

import csv
import json
import math
import os
import subprocess
import sys
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from e2e_helpers import free_port as _free_port
from e2e_helpers import stop_group, wait_healthy
from tiny_config import TINY_MODEL

from fgclip.compare import compare
from fgclip.config import Params
from fgclip.train.loop import train
from fgclip.train.mlflow_links import UI_QUERY
from fgclip.train.pretrain import pretrain_clip

pytestmark = pytest.mark.e2e

MLFLOW = Path(sys.executable).parent / "mlflow"
# The server needs ~50 s to boot on two busy cores; the deadline leaves room for a slower day.
BOOT_DEADLINE_S = 240
STEPS = 5
TINY = {
    "model": dict(TINY_MODEL),
    "pretrain": {"steps": 30, "batch_size": 32, "warmup_steps": 3},
    "train": {
        "num_frames": 4,
        "max_keyframes": 2,
        "max_regions": 3,
        "batch_size": 3,
        "max_steps": STEPS,
        "warmup_steps": 1,
        "memory_bank_size": 8,
        "memory_bank_warmup_steps": 2,
        "num_workers": 0,
        "checkpoint_every": STEPS,
        "log_every": 1,
        "device": "cpu",
    },
}


def _get(url: str) -> dict:
    with urllib.request.urlopen(url, timeout=30) as response:
        return json.loads(response.read())


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[str, subprocess.Popen, Path]]:
    """``(url, process, log)`` of a started (not yet necessarily healthy) server, stopped afterwards."""
    tmp = tmp_path_factory.mktemp("mlflow-server")
    port = _free_port()
    url = f"http://127.0.0.1:{port}"
    env = {k: v for k, v in os.environ.items() if not k.startswith("MLFLOW_")}
    # The job runner serves GenAI jobs: an extra process competing for the CPUs while booting.
    env["MLFLOW_SERVER_ENABLE_JOB_EXECUTION"] = "false"
    log = tmp / "server.log"
    cmd = [str(MLFLOW), "server", "--backend-store-uri", f"sqlite:///{tmp / 'mlflow.db'}",
           "--artifacts-destination", str(tmp / "artifacts"), "--host", "127.0.0.1", "--port", str(port),
           "--workers", "1"]  # fmt: skip
    with log.open("w") as out:
        # Its own session: uvicorn runs as a child, and the whole group is stopped at the end.
        proc = subprocess.Popen(
            cmd, cwd=tmp, env=env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True
        )
    try:
        yield url, proc, log
    finally:
        stop_group(proc)


@pytest.fixture(scope="module")
def served_run(
    server, params_factory: Callable[..., Params], tiny_sample: Path, tiny_frames: Path, tiny_boxes: Path
) -> tuple[str, Params, dict, list[dict[str, str]]]:
    """A tiny pretrain (while the server boots), then training that logs to the server over HTTP."""
    url, proc, log = server
    params = params_factory(**TINY, tracking={"uri": url, "experiment": "server-e2e"})
    root = params.base_dir
    clip = root / "clip"
    pretrain_clip(params, tiny_frames, tiny_boxes, tiny_sample / params.data.annotations, clip)
    wait_healthy("the MLflow server", f"{url}/health", proc, log, BOOT_DEADLINE_S)
    summary = train(
        params, tiny_frames, tiny_boxes, str(clip), root / "out", root / "checkpoints", root / "health.json",
        metrics_path=root / "train.json", loss_csv=root / "train_loss.csv",
    )  # fmt: skip
    with (root / "train_loss.csv").open(newline="") as f:
        losses = list(csv.DictReader(f))
    return url, params, summary, losses


def _history(url: str, run_id: str, key: str) -> dict[int, float]:
    query = urllib.parse.urlencode({"run_id": run_id, "metric_key": key})
    points = _get(f"{url}/api/2.0/mlflow/metrics/get-history?{query}")["metrics"]
    steps = [p["step"] for p in points]
    assert sorted(steps) == list(range(1, STEPS + 1)), f"{key}: steps {steps} have a gap or a duplicate"
    return {p["step"]: p["value"] for p in points}


def test_metric_history_over_rest_is_what_training_wrote(served_run) -> None:
    url, _, summary, losses = served_run
    run_id = summary["run_id"]
    run = _get(f"{url}/api/2.0/mlflow/runs/get?run_id={run_id}")["run"]
    assert run["info"]["status"] == "FINISHED"

    region = _history(url, run_id, "train/loss_region")
    assert [float(row["loss_region"]) for row in losses] == pytest.approx(
        [region[s] for s in range(1, STEPS + 1)]
    )
    temperature = _history(url, run_id, "train/temperature")
    logit_scale = _history(url, run_id, "train/logit_scale")
    for step in range(1, STEPS + 1):
        assert temperature[step] == pytest.approx(math.exp(logit_scale[step]))
    assert temperature[STEPS] == pytest.approx(summary["temperature_global"])
    assert _history(url, run_id, "train/temperature_region")[STEPS] == pytest.approx(
        summary["temperature_region"]
    )


def test_compare_reads_the_run_through_the_server(served_run) -> None:
    _, params, summary, losses = served_run
    rows = {
        tuple(r[:2]): r[2:]
        for r in csv.reader(compare(params, runs=[summary["run_id"]], fmt="csv").splitlines())
    }
    assert rows[("section", "field")] == [summary["run_id"]]
    assert rows[("run", "last step")] == [str(STEPS)]
    assert float(rows[("losses", "train/loss_region")][0]) == pytest.approx(float(losses[-1]["loss_region"]))
    # The health artefact came back through the server's artefact proxy.
    assert rows[("health", "memory bank on at (forward pass)")] == [str(summary["memory_bank"]["enabled_at"])]


# --- what users see: the MLflow UI of those runs, in headless Chromium -----------------

# The UI renders in a few seconds here; a busy CI core gets many times that.
UI_TIMEOUT_MS = 90_000


@pytest.fixture(scope="module")
def ui_runs(served_run, tiny_frames: Path, tiny_boxes: Path, tiny_sample: Path) -> dict[str, Any]:
    """The served run evaluated (its model registered through the server), and a second run to compare."""
    from fgclip.eval.evaluate import evaluate

    url, params, summary, _ = served_run
    root = params.base_dir
    evaluate(params, tiny_frames, root / "out", root / "clip", tiny_sample, root / "eval.json",
             root / "scores.parquet", root / "roc.csv", tiny_boxes)  # fmt: skip
    second = params.with_overrides(train={"run_name": "second", "lr": 1e-4})
    other = train(
        second, tiny_frames, tiny_boxes, str(root / "clip"), root / "out2", root / "checkpoints",
        root / "health2.json", metrics_path=root / "train2.json", loss_csv=root / "loss2.csv",
    )  # fmt: skip
    return {"url": url, "experiment_id": summary["experiment_id"], "runs": [summary["run_id"], other["run_id"]],
            "names": [params.train.run_name, "second"]}  # fmt: skip


def test_registered_version_carries_evaluation_and_health(ui_runs) -> None:
    url, run_id = ui_runs["url"], ui_runs["runs"][0]
    query = urllib.parse.urlencode({"filter": f"name = 'fgclip-vad' and run_id = '{run_id}'"})
    [version] = _get(f"{url}/api/2.0/mlflow/model-versions/search?{query}")["model_versions"]
    tags = {t["key"]: t["value"] for t in version["tags"]}
    assert version["source"] == f"runs:/{run_id}/model/{tags['model.sha256'][:12]}"
    assert {"eval.frame_auc", "eval.protocol", "health.passed", "health.finite.passed"} <= set(tags)
    run = _get(f"{url}/api/2.0/mlflow/runs/get?run_id={run_id}")["run"]
    assert float(tags["eval.frame_auc"]) == pytest.approx(
        {m["key"]: m["value"] for m in run["data"]["metrics"]}["eval.frame_auc"], abs=1e-4
    )
    names = sorted(d["dataset"]["name"] for d in run["inputs"]["dataset_inputs"])
    assert names == ["box_shards", "frames_index"]


def test_mlflow_ui_shows_runs_table_training_charts_and_compare(ui_runs) -> None:
    from browser import browser, screenshot, section_titles, wait_for_text

    url, eid, (first, second), names = ui_runs["url"], ui_runs["experiment_id"], ui_runs["runs"], ui_runs["names"]
    with browser() as page:
        # The experiment opens on its runs table (not the GenAI overview), both runs listed.
        page.goto(f"{url}/#/experiments/{eid}/runs{UI_QUERY}")
        table = page.get_by_role("grid")
        for name in names:
            table.get_by_role("link", name=name, exact=True).first.wait_for(timeout=UI_TIMEOUT_MS)
        assert "Run Name" in table.inner_text()
        assert page.get_by_text("Token Usage").count() == 0
        screenshot(page, "mlflow-experiment")

        # A run's metric charts: the training curves are the first section, one-off results last.
        page.goto(f"{url}/#/experiments/{eid}/runs/{first}/model-metrics{UI_QUERY}")
        # Each chart's legend names the run and the metric; the first screenful is training curves.
        # The charts draw one after another: wait for each legend, not only the first.
        wait_for_text(page, f"{names[0]} (train/loss)", UI_TIMEOUT_MS)
        text = wait_for_text(page, f"{names[0]} (train/loss_global)", UI_TIMEOUT_MS)
        sections = section_titles(text)
        assert sections[0] == "train", sections
        assert sections[-1] == "Model metrics", sections  # eval.* (no "/"): after every curve
        assert "health" not in sections  # health is tags and a table artefact, not 0/1 charts
        screenshot(page, "mlflow-run-charts")

        # Two runs side by side: MLflow's compare page lists both and the training metrics.
        page.goto(f'{url}/#/compare-runs?runs=["{first}","{second}"]&experiments=["{eid}"]&workflowType=machine_learning')
        body = wait_for_text(page, "Comparing 2 Runs", UI_TIMEOUT_MS)
        body = wait_for_text(page, "train/loss", UI_TIMEOUT_MS)
        assert all(name in body for name in names)
        screenshot(page, "mlflow-compare")
