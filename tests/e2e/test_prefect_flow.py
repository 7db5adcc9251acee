"""The Prefect flow against a real Prefect server, on a real tiny DVC repository.

One Prefect server (loopback, free port, its own database) and one `fgclip serve`
runner serve the flow for one tiny repository. The first run of the served
deployment is also the fault drill: it starts while another process holds DVC's
repository lock (a transient fault the retry clears), with a stale-temperature
checkpoint in the way (the cleanup task removes it), and its training process is
SIGKILLed after its first checkpoint (the retry resumes from it); the completed
run publishes its metrics artefact. `fgclip serve` runs without this venv on PATH,
as `.venv/bin/fgclip serve` from a shell that never activated it. Then
`prefect.yaml` is deployed to a process work pool of the same server, as the
README says, and a `prefect worker start` of that pool (also without the venv on
PATH) runs a run of it triggered with `prefect deployment run`: one param of the
evaluate stage changed, so it re-runs that stage and skips the others. Last, a
stage that fails for good fails the flow with the stage's error at its first attempt.
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml
from e2e_helpers import free_port as _free_port
from e2e_helpers import scratch_repo, wait_healthy
from e2e_helpers import stop_group as _stop
from e2e_helpers import until as _until
from tiny_config import TINY_MODEL, TINY_REPO_SAMPLE

from fgclip.config import load_params
from pipeline.stages import stage_order

REPO = Path(__file__).resolve().parents[2]
BIN = Path(sys.executable).parent
pytestmark = pytest.mark.e2e

TRAIN_STEPS, CHECKPOINT_EVERY = 16, 4
TINY: dict[str, dict[str, Any]] = {
    "sample": dict(TINY_REPO_SAMPLE),
    "frames": {"workers": 1, "train_frames_per_video": 8},
    "model": dict(TINY_MODEL),
    "pretrain": {"steps": 10, "batch_size": 16, "warmup_steps": 2},
    "train": {
        "run_name": "drill",
        "device": "cpu",
        "max_steps": TRAIN_STEPS,
        "batch_size": 4,
        "num_frames": 4,
        "memory_bank_warmup_steps": 3,
        "memory_bank_size": 16,
        "checkpoint_every": CHECKPOINT_EVERY,
        "num_workers": 0,
        "warmup_steps": 1,
        "diag_every": 4,
    },
    # Not the project's values: the deployment must take these from the repository's params.
    "orchestration": {
        "retries": 1,
        "retry_delay_s": 2,
        "deployment": "tiny",
        "cron": "30 4 * * 1",
        "timezone": "Europe/Berlin",
    },
}
DEPLOYMENT = "fgclip-pipeline/tiny"
STALE_CHECKPOINT = "checkpoint-000002"
FLOW_TIMEOUT_S = 420
LOG_ARRIVAL_S = 60  # how long a run's expected log line may trail its final state (see _logs)
# The worker's run after the drill: scratch_repo's 100 resamples -> this, which only `evaluate` tracks.
WORKER_BOOTSTRAP_RESAMPLES = 50
CLEANUP_TASKS = {"clean-checkpoints-before", "clean-checkpoints-after"}
# The UI renders in seconds here; a busy CI core gets many times that.
UI_TIMEOUT_MS = 90_000


@pytest.fixture(scope="module")
def prefect_env(tmp_path_factory) -> Iterator[dict[str, str]]:
    """A real Prefect server on a free loopback port; yields the environment that points at it."""
    home = tmp_path_factory.mktemp("prefect")
    port = _free_port()
    api = f"http://127.0.0.1:{port}/api"
    overrides = {
        "PREFECT_HOME": str(home),
        "PREFECT_API_URL": api,
        "PREFECT_API_DATABASE_CONNECTION_URL": f"sqlite+aiosqlite:///{home / 'prefect.db'}",
        "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
        "PREFECT_RUNNER_POLL_FREQUENCY": "1",  # the runner picks up a triggered run within a second
        "PREFECT_LOGGING_LEVEL": "INFO",
        "DVC_NO_ANALYTICS": "1",
        "PATH": f"{BIN}{os.pathsep}{os.environ.get('PATH', '')}",
    }
    env = {**os.environ, **overrides}
    env.pop("MLFLOW_TRACKING_URI", None)  # MLflow defaults to <repo>/mlflow.db
    log_path = home / "server.log"
    with log_path.open("w") as log:
        server = subprocess.Popen(
            # On a free port, not 4200, with PREFECT_API_URL set before the start (the README's
            # order): the UI served here must call this server (the browser test looks).
            [str(BIN / "prefect"), "server", "start", "--host", "127.0.0.1", "--port", str(port),
             "--analytics-off"],
            env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
        )  # fmt: skip
    try:
        wait_healthy("the Prefect server", f"{api}/health", server, log_path, 180)
        with pytest.MonkeyPatch.context() as mp:
            for key, value in overrides.items():
                mp.setenv(key, value)
            mp.delenv("MLFLOW_TRACKING_URI", raising=False)
            from prefect.settings import PREFECT_API_URL, PREFECT_HOME, temporary_settings

            # Prefect reads its settings when first imported: pin them for this process too.
            with temporary_settings(updates={PREFECT_API_URL: api, PREFECT_HOME: str(home)}):
                yield env
    finally:
        _stop(server)


@pytest.fixture(scope="module")
def tiny_repo(tmp_path_factory) -> Path:
    """A throwaway git + DVC repository holding this project's pipeline with tiny params."""
    return scratch_repo(
        tmp_path_factory.mktemp("repo"), TINY, copy=("dvc.yaml", "prefect.yaml", "fgclip", "pipeline")
    )


@pytest.fixture(scope="module")
def served(prefect_env: dict[str, str], tiny_repo: Path, tmp_path_factory) -> Iterator[str]:
    """`fgclip serve` of the tiny repository, running; yields the deployment name.

    Started by its path with this venv's bin off PATH: the stages must still find
    `dvc` and `fgclip` (pipeline.stages runs them from the serving interpreter's environment).
    """
    from prefect.client.orchestration import get_client
    from prefect.exceptions import ObjectNotFound

    log_path = tmp_path_factory.mktemp("serve") / "serve.log"
    env = {**prefect_env, "PATH": _path_without(BIN, prefect_env["PATH"])}
    with log_path.open("w") as log:
        proc = subprocess.Popen(
            [str(BIN / "fgclip"), "serve", "--params", str(tiny_repo / "params.yaml")],
            cwd=tiny_repo, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
        )  # fmt: skip
    try:

        def deployed() -> bool:
            if proc.poll() is not None:
                pytest.fail(f"fgclip serve exited {proc.returncode}:\n{log_path.read_text()[-3000:]}")
            with get_client(sync_client=True) as client:
                try:
                    client.read_deployment_by_name(DEPLOYMENT)
                except ObjectNotFound:  # until serve has registered it
                    return False
            return "prefect deployment run" in log_path.read_text()

        _until(f"`fgclip serve` to register {DEPLOYMENT}", deployed, timeout=120, interval=0.5)
        yield DEPLOYMENT
    finally:
        _stop(proc, signal.SIGINT)  # Ctrl-C, as an operator stops it


def _path_without(directory: Path, path: str) -> str:
    return os.pathsep.join(
        p for p in path.split(os.pathsep) if p and Path(p).resolve() != directory.resolve()
    )


def _trigger(deployment: str) -> Any:
    from prefect.deployments import run_deployment

    return run_deployment(deployment, timeout=0)


def _wait_final(flow_run_id: Any, timeout: float = FLOW_TIMEOUT_S) -> Any:
    from prefect.client.orchestration import get_client

    def final() -> Any:
        with get_client(sync_client=True) as client:
            run = client.read_flow_run(flow_run_id)
        return run if run.state is not None and run.state.is_final() else None

    return _until(f"flow run {flow_run_id} to finish", final, timeout=timeout, interval=1.0)


def _task_runs(flow_run_id: Any) -> dict[str, Any]:
    """``{task run name: task run}`` of a flow run."""
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterId

    with get_client(sync_client=True) as client:
        runs = client.read_task_runs(flow_run_filter=FlowRunFilter(id=FlowRunFilterId(any_=[flow_run_id])))
    return {run.name: run for run in runs}


def _logs(flow_run_id: Any, task_run_id: Any | None = None, *, containing: str | None = None) -> str:
    """The run's (or one task run's) log lines on the server; with ``containing``, once they hold it.

    Prefect ships a run's logs in batches behind its states: a run read as completed may not
    have its last task's lines on the server yet (seen in CI: an empty log of the last stage).
    Past LOG_ARRIVAL_S the lines as they are come back, for the caller's assertion to show.
    """
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import LogFilter, LogFilterFlowRunId, LogFilterTaskRunId

    log_filter = LogFilter(flow_run_id=LogFilterFlowRunId(any_=[flow_run_id]))
    if task_run_id is not None:
        log_filter.task_run_id = LogFilterTaskRunId(any_=[task_run_id])
    deadline = time.monotonic() + LOG_ARRIVAL_S
    while True:
        with get_client(sync_client=True) as client:
            text = "\n".join(log.message for log in client.read_logs(log_filter=log_filter))
        if containing is None or containing in text or time.monotonic() > deadline:
            return text
        time.sleep(0.5)


def _newest_checkpoint(run_dir: Path) -> int:
    steps = [int(p.name.split("-")[1]) for p in run_dir.glob("checkpoint-*") if (p / "meta.json").is_file()]
    return max(steps, default=0)


def _plant_stale_checkpoint(path: Path) -> None:
    """A complete checkpoint written with the old temperature init (ln(1/0.07) = 2.6592)."""
    import torch
    from safetensors.torch import save_file

    path.mkdir(parents=True)
    save_file({"logit_scale_region": torch.tensor(2.6592)}, str(path / "model.safetensors"))
    torch.save({}, path / "state.pt")
    meta = {
        "step": 2,
        "fingerprint": "0" * 16,
        "fingerprint_params": {"model.logit_scale_init_value": 2.6592},
    }
    (path / "meta.json").write_text(json.dumps(meta))


@pytest.fixture(scope="module")
def drill(served: str, tiny_repo: Path) -> dict[str, Any]:
    """One run of the served deployment, through two transient faults, each retried away.

    1. DVC's repository lock is held (DVC's own lock class, as a second `dvc`
       process holds it) when the run starts: `sample` fails on it; the lock is
       released once the task awaits its retry.
    2. The training process is SIGKILLed once its first checkpoint exists (found
       through the run's lock file, as an operator would find its pid): `train`
       fails; its retry runs `dvc repro -s train` again, which resumes.

    Before it, a checkpoint of the users' stale temperature is planted in the run's
    directory: `train` refuses to resume across it, so the run completes only if the
    cleanup task before training removed it.

    Returns the finished flow run and what was killed.
    """
    from dvc.lock import Lock

    run_dir = tiny_repo / "checkpoints" / TINY["train"]["run_name"]
    _plant_stale_checkpoint(run_dir / STALE_CHECKPOINT)
    first = run_dir / f"checkpoint-{CHECKPOINT_EVERY:06d}" / "meta.json"
    lock = Lock(str(tiny_repo / ".dvc" / "tmp" / "lock"))
    lock.lock()
    try:
        started = _trigger(served)

        def sample_awaits_retry() -> bool:
            sample = _task_runs(started.id).get("sample")
            return sample is not None and sample.state is not None and sample.state.name == "AwaitingRetry"

        _until("the sample stage to fail on the lock", sample_awaits_retry, timeout=180, interval=0.1)
    finally:
        lock.unlock()

    def training_checkpointed() -> int | None:
        if first.is_file() and (run_dir / "train.lock").is_file():
            holder = json.loads((run_dir / "train.lock").read_text())
            return holder["pid"] if holder.get("owner") == "train" else None
        return None

    pid = _until(
        "the first training checkpoint", training_checkpointed, timeout=FLOW_TIMEOUT_S, interval=0.02
    )
    os.kill(pid, signal.SIGKILL)
    killed_at = _newest_checkpoint(run_dir)
    meta = json.loads((run_dir / f"checkpoint-{killed_at:06d}" / "meta.json").read_text())
    return {"flow_run": _wait_final(started.id), "killed_at": killed_at, "mlflow_run_id": meta["run_id"]}


def test_served_deployment_has_the_params_schedule_and_its_run_completes(drill, served, tiny_repo: Path):
    from prefect.client.orchestration import get_client

    with get_client(sync_client=True) as client:
        deployment = client.read_deployment_by_name(served)
    orch = load_params(tiny_repo / "params.yaml").orchestration
    [schedule] = deployment.schedules
    assert (schedule.schedule.cron, schedule.schedule.timezone) == (orch.cron, orch.timezone)
    assert deployment.parameters == {"repo": str(tiny_repo.resolve()), "params_file": "params.yaml"}
    assert deployment.global_concurrency_limit.limit == 1

    flow_run = drill["flow_run"]
    assert flow_run.deployment_id == deployment.id
    assert flow_run.state.is_completed(), f"{flow_run.state.name}: {flow_run.state.message}"
    tasks = _task_runs(flow_run.id)
    expected = {"sample", "extract_frames", "validate_boxes", "pretrain", "train", "evaluate",
                "clean-checkpoints-before", "clean-checkpoints-after"}  # fmt: skip
    assert set(tasks) == expected
    assert all(t.state.is_completed() for t in tasks.values())
    evaluation = json.loads((tiny_repo / "metrics/eval.json").read_text())
    assert 0.0 <= evaluation["finetuned"]["frame_auc"] <= 1.0


def test_cleanup_before_training_removed_the_stale_temperature_checkpoint(drill, tiny_repo: Path):
    flow_run = drill["flow_run"]
    clean = _task_runs(flow_run.id)["clean-checkpoints-before"]
    logs = _logs(flow_run.id, clean.id)
    assert f"{STALE_CHECKPOINT}: stale: written with other params" in logs, logs
    assert "model.logit_scale_init_value: 2.6592 -> 4.6052" in logs, logs
    assert not (tiny_repo / "checkpoints" / TINY["train"]["run_name"] / STALE_CHECKPOINT).exists()


def test_killed_training_resumes_from_its_checkpoint_on_the_retry(drill, tiny_repo: Path):
    flow_run, killed_at = drill["flow_run"], drill["killed_at"]
    assert CHECKPOINT_EVERY <= killed_at < TRAIN_STEPS, "the training process was not killed halfway"
    train = _task_runs(flow_run.id)["train"]
    assert train.run_count == 2, "the train task should have failed once (killed), then succeeded"
    logs = _logs(flow_run.id, train.id)
    # DVC's report of the SIGKILLed command: -9 when the stage's shell exec'd it (bash),
    # 137 (128 + SIGKILL) when the shell waited on it as a child (dash, when SHELL is unset).
    assert re.search(r"exited with (-9|137)\b", logs), logs[-3000:]
    assert f"Resuming from {tiny_repo / 'checkpoints/drill'}/checkpoint-{killed_at:06d}" in logs, logs[-3000:]
    summary = json.loads((tiny_repo / "metrics/train.json").read_text())
    assert (summary["start_step"], summary["steps"]) == (killed_at, TRAIN_STEPS)


def test_resumed_run_has_every_step_once_and_the_flow_run_tag(drill, tiny_repo: Path):
    from mlflow import MlflowClient

    client = MlflowClient(tracking_uri=f"sqlite:///{tiny_repo / 'mlflow.db'}")
    summary = json.loads((tiny_repo / "metrics/train.json").read_text())
    assert summary["run_id"] == drill["mlflow_run_id"], (
        "the resumed training must continue the same MLflow run"
    )
    history = client.get_metric_history(drill["mlflow_run_id"], "train/loss")
    assert sorted(m.step for m in history) == list(range(1, TRAIN_STEPS + 1))
    tags = client.get_run(drill["mlflow_run_id"]).data.tags
    flow_run = drill["flow_run"]
    assert tags["prefect.flow_run_id"] == str(flow_run.id)
    assert tags["prefect.flow_run_name"] == flow_run.name


def test_a_busy_dvc_lock_is_retried_away(drill):
    """`sample` found DVC's repository lock held: it failed on DVC's lock error, and its retry ran."""
    flow_run = drill["flow_run"]
    sample = _task_runs(flow_run.id)["sample"]
    assert sample.run_count == 2
    logs = _logs(flow_run.id, sample.id)
    assert "Unable to acquire lock" in logs and "Running stage 'sample'" in logs, logs[-3000:]


def test_the_completed_run_publishes_its_metrics_and_mlflow_run(drill, tiny_repo: Path):
    """The flow run's Markdown artefact, read back through the Prefect API."""
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterFlowRunId, ArtifactFilterKey

    from pipeline.flow import ARTIFACT_KEY

    flow_run = drill["flow_run"]
    artifact_filter = ArtifactFilter(
        flow_run_id=ArtifactFilterFlowRunId(any_=[flow_run.id]), key=ArtifactFilterKey(any_=[ARTIFACT_KEY])
    )
    with get_client(sync_client=True) as client:
        [artifact] = client.read_artifacts(artifact_filter=artifact_filter)
    assert artifact.type == "markdown"
    markdown = artifact.data
    evaluation = json.loads((tiny_repo / "metrics/eval.json").read_text())
    assert f"| frame AUC | {evaluation['finetuned']['frame_auc']:.4g} |" in markdown, markdown
    run_id = drill["mlflow_run_id"]
    assert f"**MLflow run** `{run_id}`" in markdown and "#/experiments/" in markdown, markdown
    assert f"mlflow ui --backend-store-uri sqlite:///{tiny_repo / 'mlflow.db'}" in markdown, markdown
    assert "## Health checks" in markdown and "## Missing" not in markdown, markdown


def _summary_artifact(flow_run_id: Any) -> Any:
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterFlowRunId, ArtifactFilterKey

    from pipeline.flow import ARTIFACT_KEY

    with get_client(sync_client=True) as client:
        [artifact] = client.read_artifacts(artifact_filter=ArtifactFilter(
            flow_run_id=ArtifactFilterFlowRunId(any_=[flow_run_id]), key=ArtifactFilterKey(any_=[ARTIFACT_KEY])
        ))  # fmt: skip
    return artifact


def test_the_prefect_ui_on_its_own_port_shows_the_flow_run_and_its_summary(drill, prefect_env):
    """The UI of a server on a non-default port, in headless Chromium: the flow run, then its artefact."""
    from browser import browser, screenshot, wait_for_text

    ui = prefect_env["PREFECT_API_URL"].removesuffix("/api")
    flow_run = drill["flow_run"]
    with browser() as page:
        page.goto(f"{ui}/runs/flow-run/{flow_run.id}")
        text = wait_for_text(page, flow_run.name, UI_TIMEOUT_MS)
        wait_for_text(page, "Completed", UI_TIMEOUT_MS)
        # The flow's name arrives in its own request, after the run's state (CI saw it missing).
        wait_for_text(page, "fgclip-pipeline", UI_TIMEOUT_MS)
        screenshot(page, "prefect-flow-run")
        # The artefact's own page renders its Markdown: the summary's tables, as the UI shows them.
        page.goto(f"{ui}/artifacts/artifact/{_summary_artifact(flow_run.id).id}")
        text = wait_for_text(page, "frame AUC", UI_TIMEOUT_MS)
        assert "Health checks" in text and drill["mlflow_run_id"] in text
        screenshot(page, "prefect-artifact")


def _prefect(args: list[str], cwd: Path, env: dict[str, str], timeout: float = 180) -> str:
    """The `prefect` CLI, as a user runs it; its output, after asserting it succeeded."""
    proc = subprocess.run(
        [str(BIN / "prefect"), *args], cwd=cwd, env=env, stdin=subprocess.DEVNULL,
        capture_output=True, text=True, timeout=timeout, check=False,
    )  # fmt: skip
    assert proc.returncode == 0, f"prefect {' '.join(args)}:\n{proc.stdout[-3000:]}{proc.stderr[-3000:]}"
    return proc.stdout


@pytest.fixture(scope="module")
def nightly(prefect_env: dict[str, str], tiny_repo: Path) -> dict[str, Any]:
    """prefect.yaml's deployment, deployed to its process work pool from the tiny repository
    with the README's commands; returns its entry in prefect.yaml."""
    [dep] = yaml.safe_load((REPO / "prefect.yaml").read_text())["deployments"]
    _prefect(["work-pool", "create", dep["work_pool"]["name"], "--type", "process"], tiny_repo, prefect_env)
    _prefect(["--no-prompt", "deploy", "--name", dep["name"]], tiny_repo, prefect_env)
    return dep


def test_prefect_yaml_matches_params_and_deploys(nightly: dict[str, Any]):
    """prefect.yaml deploys the flow to a work pool on params.yaml's schedule (the project's values)."""
    from prefect.client.orchestration import get_client

    orch = load_params(REPO / "params.yaml").orchestration
    [schedule] = nightly["schedules"]
    assert (nightly["name"], schedule["cron"], schedule["timezone"]) == (
        orch.deployment,
        orch.cron,
        orch.timezone,
    )
    with get_client(sync_client=True) as client:
        deployment = client.read_deployment_by_name(f"fgclip-pipeline/{nightly['name']}")
    [schedule] = deployment.schedules
    assert (schedule.schedule.cron, schedule.schedule.timezone) == (orch.cron, orch.timezone)
    assert deployment.work_pool_name == nightly["work_pool"]["name"]
    assert deployment.global_concurrency_limit.limit == 1
    assert deployment.parameters == {"repo": ".", "params_file": "params.yaml"}
    assert deployment.entrypoint == "pipeline/flow.py:fgclip_pipeline"


def _delete_scheduled_runs(deployment_id: Any) -> None:
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import (
        DeploymentFilter,
        DeploymentFilterId,
        FlowRunFilter,
        FlowRunFilterState,
        FlowRunFilterStateType,
    )
    from prefect.client.schemas.objects import StateType

    with get_client(sync_client=True) as client:
        for run in client.read_flow_runs(
            deployment_filter=DeploymentFilter(id=DeploymentFilterId(any_=[deployment_id])),
            flow_run_filter=FlowRunFilter(
                state=FlowRunFilterState(type=FlowRunFilterStateType(any_=[StateType.SCHEDULED]))
            ),
        ):
            client.delete_flow_run(run.id)


def _children(pid: int) -> list[int]:
    import psutil

    return [child.pid for child in psutil.Process(pid).children(recursive=True)]


def _listening(pid: int) -> list[str]:
    """The addresses a process and its children listen on."""
    import psutil

    found = []
    parent = psutil.Process(pid)
    for proc in [parent, *parent.children(recursive=True)]:
        try:
            found += [
                f"{c.laddr.ip}:{c.laddr.port}"
                for c in proc.net_connections("inet")
                if c.status == psutil.CONN_LISTEN
            ]
        except psutil.NoSuchProcess:  # a flow run's process, exiting
            pass
    return found


@pytest.fixture(scope="module")
def worker_run(
    drill: dict[str, Any], nightly: dict[str, Any], prefect_env: dict[str, str], tiny_repo: Path,
    tmp_path_factory,
) -> dict[str, Any]:  # fmt: skip
    """A run of the nightly deployment, triggered with `prefect deployment run`, run by a worker.

    The worker is `.venv/bin/prefect worker start --pool <pool>` in the tiny repository,
    this venv's bin off PATH. The drill has run the whole pipeline there by now; a
    changed `evaluate.bootstrap_resamples` (tracked by `evaluate` alone) leaves that one
    stage for the worker's run to re-run. Returns the finished flow run, the worker's
    name, and what the worker listened on while it ran.
    """
    from prefect.client.orchestration import get_client

    deployment_name = f"fgclip-pipeline/{nightly['name']}"
    with get_client(sync_client=True) as client:
        deployment = client.read_deployment_by_name(deployment_name)
    # The schedule's own run (02:00 UTC, when a nightly CI job may well be here) must not
    # take the one slot first: pausing deletes the upcoming runs; a due one is deleted here.
    [schedule] = deployment.schedules
    _prefect(["deployment", "schedule", "pause", deployment_name, str(schedule.id)], tiny_repo, prefect_env)
    _delete_scheduled_runs(deployment.id)

    params_path = tiny_repo / "params.yaml"
    params = yaml.safe_load(params_path.read_text())
    assert params["evaluate"]["bootstrap_resamples"] != WORKER_BOOTSTRAP_RESAMPLES
    params["evaluate"]["bootstrap_resamples"] = WORKER_BOOTSTRAP_RESAMPLES
    params_path.write_text(yaml.safe_dump(params, sort_keys=False))

    name = f"fgclip-e2e-{uuid.uuid4().hex[:8]}"
    env = {
        **prefect_env,
        "PATH": _path_without(BIN, prefect_env["PATH"]),
        "PREFECT_WORKER_QUERY_SECONDS": "1",  # it polls every 10 s by default
        # Its webserver stays off (no --with-healthcheck); were it on, loopback only.
        "PREFECT_WORKER_WEBSERVER_HOST": "127.0.0.1",
    }
    log_path = tmp_path_factory.mktemp("worker") / "worker.log"
    with log_path.open("w") as log:
        worker = subprocess.Popen(
            [str(BIN / "prefect"), "worker", "start", "--pool", nightly["work_pool"]["name"], "--name", name],
            cwd=tiny_repo, env=env, stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT,
            start_new_session=True,
        )  # fmt: skip
    try:
        # Triggered at once: the run waits in the pool's queue until the worker polls it.
        out = _prefect(["deployment", "run", deployment_name], tiny_repo, env)
        match = re.search(r"UUID: ([0-9a-f-]{36})", out)
        assert match, out
        flow_run_id = uuid.UUID(match[1])

        def final() -> Any:
            if worker.poll() is not None:
                pytest.fail(f"the worker exited {worker.returncode}:\n{log_path.read_text()[-3000:]}")
            with get_client(sync_client=True) as client:
                run = client.read_flow_run(flow_run_id)
            return run if run.state is not None and run.state.is_final() else None

        flow_run = _until(f"the worker to finish flow run {flow_run_id}", final, timeout=300, interval=1.0)
        listening = _listening(worker.pid)
        # The run's process reports its final state, then ships its last logs as it exits:
        # Ctrl-C reaches the whole process group, so a worker stopped before then loses them
        # (seen in CI: the last stage's log never reached the server).
        _until("the flow run's process to exit", lambda: not _children(worker.pid), timeout=60, interval=0.5)
    finally:
        _stop(worker, signal.SIGINT)  # Ctrl-C, as an operator stops it
    return {"flow_run": flow_run, "deployment": deployment, "worker": name, "listening": listening}


def test_the_pools_worker_runs_a_run_triggered_from_the_cli(worker_run, nightly, tiny_repo: Path):
    """The worker of prefect.yaml's pool ran the CLI-triggered run: every stage and cleanup task completed."""
    flow_run = worker_run["flow_run"]
    assert flow_run.state.is_completed(), f"{flow_run.state.name}: {flow_run.state.message}"
    assert flow_run.deployment_id == worker_run["deployment"].id
    pool = nightly["work_pool"]
    assert (flow_run.work_pool_name, flow_run.work_queue_name) == (pool["name"], pool["work_queue_name"])
    submitting = f"Worker '{worker_run['worker']}' submitting flow run '{flow_run.id}'"
    logs = _logs(flow_run.id, containing=submitting)
    assert submitting in logs, logs[-3000:]
    tasks = _task_runs(flow_run.id)
    assert set(tasks) == {*stage_order(tiny_repo), *CLEANUP_TASKS}
    assert all(t.state.is_completed() for t in tasks.values()), {n: t.state.name for n, t in tasks.items()}
    # Its flow runs' control channel is on loopback; its webserver (0.0.0.0:8080 by default) is off.
    listening = worker_run["listening"]
    assert all(address.rsplit(":", 1)[0] == "127.0.0.1" for address in listening), listening
    assert "127.0.0.1:8080" not in listening, listening


def test_the_workers_run_reruns_only_the_stage_whose_param_changed(worker_run, tiny_repo: Path):
    """The changed `evaluate.bootstrap_resamples` re-ran `evaluate`; DVC skipped every other stage."""
    flow_run = worker_run["flow_run"]
    tasks = _task_runs(flow_run.id)
    for stage in stage_order(tiny_repo):
        expected = "Running stage 'evaluate'" if stage == "evaluate" else f"Stage '{stage}' didn't change, skipping"
        logs = _logs(flow_run.id, tasks[stage].id, containing=expected)
        assert expected in logs, logs[-3000:]
        if stage != "evaluate":
            assert "Running stage" not in logs, logs[-3000:]
    lock = yaml.safe_load((tiny_repo / "dvc.lock").read_text())
    evaluated = lock["stages"]["evaluate"]["params"]["params.yaml"]["evaluate"]
    assert evaluated["bootstrap_resamples"] == WORKER_BOOTSTRAP_RESAMPLES


def test_a_stage_failing_for_good_fails_the_flow_with_its_error(served, tiny_repo: Path):
    """`data.root` pointed at a dataset without its split files: extraction fails, and is not retried.

    The stage's error is the CLI's one-line user error (a missing split file): a retry
    would only repeat it, so the task fails at its first attempt despite `retries: 1`.
    The sample stage still writes its own `sample.out` (it never writes into `data.root`).
    """
    from prefect.client.orchestration import get_client

    params_path = tiny_repo / "params.yaml"
    good = params_path.read_text()
    params = yaml.safe_load(good)
    params["data"]["root"] = "data/real_ucf"
    (tiny_repo / "data/real_ucf/videos").mkdir(parents=True)
    params_path.write_text(yaml.safe_dump(params, sort_keys=False))
    try:
        flow_run = _wait_final(_trigger(served).id)
    finally:
        params_path.write_text(good)
    assert flow_run.state.is_failed()
    message = flow_run.state.message
    assert "dvc repro -s extract_frames failed" in message and "Anomaly_Train.txt" in message, message
    tasks = _task_runs(flow_run.id)
    assert tasks["sample"].run_count == 1
    extract = tasks["extract_frames"]
    assert TINY["orchestration"]["retries"] > 0
    assert extract.run_count == 1, "a failure a retry cannot cure must not be retried"
    with get_client(sync_client=True) as client:
        states = [state.name for state in client.read_task_run_states(extract.id)]
    assert "AwaitingRetry" not in states and "Retrying" not in states, states
    permanent = "not retried: a PermanentStageError"
    assert permanent in _logs(flow_run.id, extract.id, containing=permanent)
    assert "validate_boxes" not in tasks, "no stage may run after a failed one"
    # The failed run's summary says so, and where, rather than passing off the files as its own.
    from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterFlowRunId, ArtifactFilterKey

    from pipeline.flow import ARTIFACT_KEY

    with get_client(sync_client=True) as client:
        found = client.read_artifacts(artifact_filter=ArtifactFilter(
            flow_run_id=ArtifactFilterFlowRunId(any_=[flow_run.id]), key=ArtifactFilterKey(any_=[ARTIFACT_KEY])
        ))  # fmt: skip
    assert len(found) == 1, [(a.key, a.type, a.task_run_id, a.created) for a in found]
    assert "FAILED at stage `extract_frames`" in found[0].data, found[0].data


def test_serve_without_a_server_is_one_clear_line(prefect_env, capsys):
    from prefect.settings import PREFECT_API_URL, temporary_settings

    from fgclip.cli import main

    with temporary_settings(restore_defaults={PREFECT_API_URL}):
        assert main(["serve", "--params", str(REPO / "params.yaml")]) == 1
    [line] = capsys.readouterr().err.strip().splitlines()
    assert line.startswith(
        "fgclip serve: error: no Prefect server configured: run `prefect config set PREFECT_API_URL="
    )


@pytest.mark.parametrize(
    ("key", "value", "message"),
    [
        ("cron", "0 2 * *", "orchestration.cron '0 2 \\* \\*' is not a 5-field numeric cron"),
        ("timezone", "Mars/Olympus", "orchestration.timezone 'Mars/Olympus' is not an IANA time zone"),
        ("retries", -1, "retries"),
    ],
)
def test_bad_orchestration_params_are_clear_errors(tmp_path: Path, key: str, value: Any, message: str):
    from fgclip.config import ParamsError

    params = yaml.safe_load((REPO / "params.yaml").read_text())
    params["orchestration"][key] = value
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(params))
    with pytest.raises(ParamsError, match=message):
        load_params(tmp_path / "params.yaml")
