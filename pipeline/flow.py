"""The Prefect flow ``fgclip-pipeline``: the DVC stages in order, as retried tasks.

Each stage is one task running ``dvc repro -s <stage>`` in the repository
(:func:`pipeline.stages.run_stage`), so DVC still decides what is up to date and
the flow adds what a pile of ``nohup`` scripts lacks: retries with a delay
(``orchestration.retries`` / ``retry_delay_s``), one place to watch every run
(the Prefect UI, stage output in its logs), a schedule, and a failed stage's
error as the flow run's failure message.

Checkpoint cleanup (:func:`fgclip.train.cleanup.clean_checkpoints`, with the
input hashes, as training checks them) runs as a task before training, so
checkpoints of another configuration (the users' stale-temperature ones) never
make ``train`` refuse to start, and after it. A retried ``train`` task resumes
from the last good checkpoint: ``checkpoints/`` is not a DVC output, so ``dvc
repro`` leaves it in place and the training loop picks up its newest checkpoint.

A failure that a retry would repeat (a missing executable, invalid params, a
stage's own one-line user error: :func:`pipeline.stages.is_permanent`) fails its
task at once; DVC's lock error, a killed or timed-out stage and a traceback are
retried.

The flow run's id and name reach the training run's MLflow tags through the
environment (``dvc repro`` passes it to the stage command): see
``fgclip.train.loop.ORCHESTRATOR_TAG_ENV``. A completed run publishes the Markdown
artefact ``fgclip-run-summary`` (:func:`summary_markdown`): the key metrics, the
health checks and the link to the MLflow run, read from the metrics files.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import TYPE_CHECKING

from prefect import flow, get_run_logger, task
from prefect.cache_policies import NO_CACHE
from prefect.exceptions import MissingContextError
from prefect.runtime import flow_run

from fgclip.config import Params, load_params
from fgclip.errors import FGClipError
from pipeline.stages import DVC_FILE, is_permanent, run_stage, stage_order

if TYPE_CHECKING:
    from prefect import Task
    from prefect.client.schemas.objects import TaskRun
    from prefect.deployments.runner import RunnerDeployment
    from prefect.states import State

FLOW_NAME = "fgclip-pipeline"
# Read by fgclip.train.loop (ORCHESTRATOR_TAG_ENV): the MLflow run's prefect.* tags.
FLOW_RUN_ID_ENV = "FGCLIP_FLOW_RUN_ID"
FLOW_RUN_NAME_ENV = "FGCLIP_FLOW_RUN_NAME"
# Lines of a stage's output copied into the Prefect log (the [LOSS] lines of a long run are in MLflow).
LOG_TAIL_LINES = 200
# The flow run's summary artefact (Prefect: lowercase letters, digits and dashes).
ARTIFACT_KEY = "fgclip-run-summary"


def retry_wanted(task: Task, task_run: TaskRun, state: State) -> bool:
    """Prefect's ``retry_condition_fn``: False for a failure that a retry would only repeat."""
    exc = state.data  # the task engine hands the raised exception over as Failed(data=exc)
    if isinstance(exc, BaseException) and is_permanent(exc):
        _run_logger().error(
            "not retried: a %s cannot pass on a retry; fix its cause, then run again", type(exc).__name__
        )
        return False
    return True


def _run_logger() -> logging.Logger | logging.LoggerAdapter:
    # The engine asks the retry condition inside the task run's context; a direct call has none.
    try:
        return get_run_logger()
    except MissingContextError:
        return logging.getLogger(__name__)


@task(
    name="dvc-stage",
    task_run_name="{stage}",
    cache_policy=NO_CACHE,
    persist_result=False,
    retry_condition_fn=retry_wanted,
)
def stage_task(repo: Path, stage: str, timeout_s: float | None, env: dict[str, str]) -> str:
    """``dvc repro -s <stage>``; ``"ran"`` or ``"up to date"``. Retries come from ``with_options``."""
    logger = get_run_logger()
    output = run_stage(repo, stage, timeout=timeout_s, env=env)
    lines = output.splitlines()
    logger.info("dvc repro -s %s:\n%s", stage, "\n".join(lines[-LOG_TAIL_LINES:]))
    return "ran" if f"Running stage '{stage}'" in output else "up to date"


@task(
    name="clean-checkpoints",
    task_run_name="clean-checkpoints-{when}",
    cache_policy=NO_CACHE,
    persist_result=False,
)
def clean_task(params_path: Path, when: str) -> list[str]:
    """Remove the current run's stale, broken and surplus checkpoints; ``["<path>: <reason>", ...]``."""
    # Imported here: the cleanup reads checkpoints with torch, which the other tasks never need.
    from fgclip.train.cleanup import clean_checkpoints, current_inputs

    logger = get_run_logger()
    params = load_params(params_path)
    removals = clean_checkpoints(params, inputs=current_inputs(params))
    for removal in removals:
        logger.info("removed %s: %s", removal.path, removal.reason)
    if not removals:
        logger.info("no checkpoint to remove (%s)", when)
    return [f"{r.path}: {r.reason}" for r in removals]


def _orchestrator_env() -> dict[str, str]:
    env = {FLOW_RUN_ID_ENV: flow_run.get_id() or "", FLOW_RUN_NAME_ENV: flow_run.get_name() or ""}
    return {k: v for k, v in env.items() if v}


@flow(name=FLOW_NAME, description="fgclip-vad: the DVC pipeline, stage by stage, with retries")
def fgclip_pipeline(repo: str = ".", params_file: str = "params.yaml") -> dict[str, str]:
    """Run every DVC stage of ``repo`` in dvc.yaml's order; ``{stage: "ran" | "up to date"}``.

    ``params_file`` (relative to ``repo``) supplies the retries and the checkpoint
    settings; it must be the file dvc.yaml's stage commands read (``params.yaml``),
    or the cleanup would judge checkpoints by other params than training.
    """
    root = Path(repo).resolve()
    params_path = root / params_file
    params = load_params(params_path)
    _check_repo(root, params)
    orch = params.orchestration
    stage = stage_task.with_options(retries=orch.retries, retry_delay_seconds=orch.retry_delay_s)
    env = _orchestrator_env()
    results: dict[str, str] = {}
    current = None
    try:
        for current in stage_order(root):
            if current == "train":
                clean_task(params_path, "before")
            results[current] = stage(root, current, orch.stage_timeout_s, env)
            if current == "train":
                clean_task(params_path, "after")
    except BaseException:
        # A failed run gets its summary too (a failed health gate is worth a table), marked failed.
        _publish_summary(params, failed_stage=current)
        raise
    _publish_summary(params)
    return results


def _publish_summary(params: Params, failed_stage: str | None = None) -> None:
    """The run summary artefact; a failure to publish it is logged, never the flow run's failure."""
    from prefect.artifacts import create_markdown_artifact

    from pipeline.run_summary import read_run_metrics, summary_markdown

    logger = _run_logger()
    try:
        metrics, missing = read_run_metrics(params.paths)
        run_id = (metrics.get("train") or {}).get("run_id")
        create_markdown_artifact(
            key=ARTIFACT_KEY,
            markdown=summary_markdown(metrics, missing, failed_stage=failed_stage),
            description=f"fgclip-vad metrics and health of {params.base_dir}"
            + (f", MLflow run {run_id}" if run_id else ""),
        )
    except Exception as exc:  # noqa: BLE001 - the stages' outcome stands whatever happens to the summary
        logger.warning("could not publish the artefact %s: %s", ARTIFACT_KEY, exc)
        return
    logger.info("published the artefact %s (MLflow run %s)", ARTIFACT_KEY, run_id or "unknown")


def _check_repo(root: Path, params: Params) -> None:
    if not (root / DVC_FILE).is_file():
        raise FGClipError(f"{root} is not the pipeline's repository: no {DVC_FILE} there")
    if params.base_dir.resolve() != root:
        raise FGClipError(f"params file must be in the repository {root}, not in {params.base_dir}")


def deployment(params_path: Path) -> RunnerDeployment:
    """The flow's deployment for ``params_path``'s repository, on ``orchestration.cron``."""
    from prefect.schedules import Cron
    from prefect.types.entrypoint import EntrypointType

    params = load_params(params_path)
    orch = params.orchestration
    return fgclip_pipeline.to_deployment(
        name=orch.deployment,
        schedules=[Cron(orch.cron, timezone=orch.timezone)],
        parameters={"repo": str(params.base_dir.resolve()), "params_file": Path(params_path).name},
        # Loaded as pipeline.flow in each run's process: installed with the project, so
        # it does not depend on the directory `fgclip serve` was started from.
        entrypoint_type=EntrypointType.MODULE_PATH,
        # One pipeline at a time per deployment: a second would only fail on DVC's lock.
        concurrency_limit=1,
        description=f"fgclip-vad pipeline of {params.base_dir} ({orch.cron}, {orch.timezone})",
    )


def serve(params_path: Path) -> None:
    """Serve the deployment from this process until interrupted (``fgclip serve``)."""
    from prefect import serve as prefect_serve
    from prefect.settings import PREFECT_API_URL

    api = PREFECT_API_URL.value()
    if not api:
        # This order: `prefect server start` gives its UI the API address PREFECT_API_URL has then.
        raise FGClipError(
            "no Prefect server configured: run `prefect config set PREFECT_API_URL=http://127.0.0.1:4200/api`, "
            "then `prefect server start --host 127.0.0.1 --port 4200` (or export PREFECT_API_URL)"
        )
    _check_reachable(api)
    dep = deployment(params_path)
    orch = load_params(params_path).orchestration
    name = f"{FLOW_NAME}/{dep.name}"
    ui = api.removesuffix("/api")
    print(
        f"Serving {name} on {orch.cron!r} ({orch.timezone}) against {api}\n"
        f"  run it now:   prefect deployment run '{name}'\n"
        f"  watch runs:   {ui}/runs  (the Prefect UI)\n"
        "  stop serving: Ctrl-C (scheduled runs then wait for the next `fgclip serve`)",
        flush=True,
    )
    prefect_serve(dep, print_starting_message=False, limit=1)


def _check_reachable(api: str) -> None:
    from prefect.client.orchestration import get_client

    with get_client(sync_client=True) as client:
        problem = client.api_healthcheck()
    if problem is not None:
        raise FGClipError(f"the Prefect server at {api} is not reachable ({problem}): is it running?")


if __name__ == "__main__":  # `python -m pipeline.flow [repo]`: one run without a deployment
    import sys

    print(fgclip_pipeline(repo=sys.argv[1] if len(sys.argv) > 1 else os.getcwd()))
