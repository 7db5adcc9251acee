"""Tracking and data off the machine, proven on loopback: the README's scaling section.

One tiny repository runs the real pipeline (`dvc repro`: `fgclip train` and
`fgclip evaluate` among its stages) against an `mlflow server` whose runs live in
a real PostgreSQL and whose artefacts live in an S3 bucket (moto's S3 server,
reached over HTTP), then `dvc push`es its data and run cache to a DVC remote in
the same bucket. The tests read the run back through the server, and fresh
clones get the pipeline's outputs from the remote instead of computing them.
"""

from __future__ import annotations

import json
import subprocess
import sys
from collections.abc import Iterator
from contextlib import ExitStack
from pathlib import Path

import pytest
from e2e_helpers import TINY_PIPELINE, pipeline_env, scratch_repo
from loopback_stack import (
    BUCKET,
    S3_CREDENTIALS,
    TrackingStack,
    mlflow_server,
    postgres_server,
    s3_client,
    s3_server,
)

from pipeline.stages import stage_order

pytestmark = pytest.mark.e2e

EXPERIMENT = "scaling-e2e"
REMOTE = f"s3://{BUCKET}/dvc"
GIT_ID = ["-c", "user.name=fgclip-tests", "-c", "user.email=tests@fgclip.invalid"]


def _run(cmd: list[str], cwd: Path, env: dict[str, str]) -> str:
    proc = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=600, check=False)
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, f"{' '.join(cmd)} failed:\n{out[-6000:]}"
    return out


def _dvc(*args: str, cwd: Path, env: dict[str, str]) -> str:
    return _run([sys.executable, "-m", "dvc", *args], cwd, env)


@pytest.fixture(scope="module")
def stack(tmp_path_factory) -> Iterator[TrackingStack]:
    """PostgreSQL, the S3 server and an MLflow server on both, all on 127.0.0.1."""
    work = tmp_path_factory.mktemp("servers")
    with ExitStack() as servers:
        backend = servers.enter_context(postgres_server())
        endpoint = servers.enter_context(s3_server(work))
        yield servers.enter_context(mlflow_server(backend, endpoint, work))


def _client_env() -> dict[str, str]:
    """A pipeline command's environment with no S3 credentials: artefacts must go through the server."""
    env = pipeline_env()
    for key in [k for k in env if k.startswith("AWS_") or k == "MLFLOW_S3_ENDPOINT_URL"]:
        del env[key]
    return env


def _remote_env() -> dict[str, str]:
    """A DVC command's environment: the bucket's credentials, as `aws configure` would give them."""
    return {**pipeline_env(), **S3_CREDENTIALS}


@pytest.fixture(scope="module")
def pushed(stack: TrackingStack, tmp_path_factory) -> dict:
    """`dvc repro` logging to the server, committed, then `dvc push --run-cache` to the S3 remote."""
    repo = scratch_repo(
        tmp_path_factory.mktemp("origin"),
        {**TINY_PIPELINE, "tracking": {"uri": stack.url, "experiment": EXPERIMENT}},
        copy=("dvc.yaml", "fgclip", "pipeline", ".gitignore"),
    )
    out = _dvc("repro", cwd=repo, env=_client_env())
    env = _remote_env()
    _dvc("remote", "add", "-d", "storage", REMOTE, cwd=repo, env=env)
    _dvc("remote", "modify", "storage", "endpointurl", stack.s3_endpoint, cwd=repo, env=env)
    _run(["git", "add", "-A"], repo, env)
    _run(["git", *GIT_ID, "commit", "-q", "-m", "tiny pipeline run"], repo, env)
    push = _dvc("push", "--run-cache", cwd=repo, env=env)
    return {"repo": repo, "repro": out, "push": push}


def _clone(origin: Path, into: Path) -> Path:
    _run(["git", "clone", "-q", str(origin), str(into)], into.parent, pipeline_env())
    return into


# --- MLflow: PostgreSQL backend, S3 artefacts, read back through the server ------------------


def _the_run(stack: TrackingStack):
    from mlflow import MlflowClient

    client = MlflowClient(stack.url)
    experiment = client.get_experiment_by_name(EXPERIMENT)
    [run] = client.search_runs([experiment.experiment_id])
    return client, run


def test_training_metrics_and_params_come_back_through_the_server(stack, pushed) -> None:
    client, run = _the_run(stack)
    repo = pushed["repo"]
    assert run.info.status == "FINISHED"
    steps = TINY_PIPELINE["train"]["max_steps"]
    history = client.get_metric_history(run.info.run_id, "train/loss")
    assert sorted(m.step for m in history) == list(range(1, steps + 1)), "a step is missing or logged twice"
    curve = (repo / "plots/train_loss.csv").read_text().splitlines()
    header = curve[0].split(",")
    written = {
        int(row.split(",")[header.index("step")]): float(row.split(",")[header.index("loss")])
        for row in curve[1:]
    }
    assert {m.step: m.value for m in history} == pytest.approx(written)
    assert run.data.params["train.max_steps"] == str(steps)
    assert run.data.params["train.batch_size"] == str(TINY_PIPELINE["train"]["batch_size"])
    evaluation = json.loads((repo / "metrics/eval.json").read_text())
    assert run.data.metrics["eval.frame_auc"] == pytest.approx(evaluation["finetuned"]["frame_auc"], abs=5e-5)


def test_the_backend_is_postgresql_and_the_artefacts_are_in_the_bucket(stack, pushed) -> None:
    import psycopg

    _, run = _the_run(stack)
    with psycopg.connect(stack.backend) as conn:
        [(points,)] = conn.execute(
            "SELECT count(*) FROM metrics WHERE run_uuid = %s AND key = 'train/loss'", (run.info.run_id,)
        ).fetchall()
    assert points == TINY_PIPELINE["train"]["max_steps"]
    assert run.info.artifact_uri.startswith("mlflow-artifacts:/"), (
        "clients must reach artefacts through the server"
    )
    prefix = f"mlflow-artifacts/{run.info.experiment_id}/{run.info.run_id}/artifacts/"
    listing = s3_client(stack.s3_endpoint).list_objects_v2(Bucket=BUCKET, Prefix=prefix)
    keys = {obj["Key"][len(prefix) :] for obj in listing.get("Contents", [])}
    assert {"roc.png", "frame_scores.parquet", "train_loss.png"} <= keys, sorted(keys)
    assert any(k.startswith("model/") and k.endswith("model.safetensors") for k in keys), sorted(keys)


def test_roc_and_frame_scores_download_through_the_server(stack, pushed, tmp_path: Path) -> None:
    client, run = _the_run(stack)
    repo = pushed["repo"]
    for name, local in (
        ("roc.png", "plots/roc.png"),
        ("frame_scores.parquet", "data/eval/frame_scores.parquet"),
    ):
        got = Path(client.download_artifacts(run.info.run_id, name, str(tmp_path)))
        assert got.read_bytes() == (repo / local).read_bytes(), name


def test_the_evaluated_model_is_a_registered_version(stack, pushed, tmp_path: Path) -> None:
    client, run = _the_run(stack)
    [version] = client.search_model_versions(f"name = 'fgclip-vad' and run_id = '{run.info.run_id}'")
    assert version.source == f"runs:/{run.info.run_id}/model/{version.tags['model.sha256'][:12]}"
    assert float(version.tags["eval.frame_auc"]) == pytest.approx(
        run.data.metrics["eval.frame_auc"], abs=1e-4
    )
    from mlflow.artifacts import download_artifacts

    # The version's own source, resolved by the server: what a user on another machine downloads.
    weights = Path(
        download_artifacts(artifact_uri=version.source, dst_path=str(tmp_path), tracking_uri=stack.url)
    )
    local = pushed["repo"] / "models/fgclip/model.safetensors"
    assert (weights / "model.safetensors").read_bytes() == local.read_bytes()


# --- DVC: a remote in the same bucket ----------------------------------------------------------


def test_a_fresh_clone_pulls_and_every_stage_is_up_to_date(pushed, tmp_path: Path) -> None:
    origin = pushed["repo"]
    clone = _clone(origin, tmp_path / "clone")
    env = _remote_env()
    _dvc("pull", cwd=clone, env=env)
    out = _dvc("repro", cwd=clone, env=env)
    assert "Running stage" not in out, out[-3000:]
    for stage in stage_order(clone):
        assert f"Stage '{stage}' didn't change, skipping" in out
    for output in ("models/fgclip/model.safetensors", "data/eval/frame_scores.parquet"):
        assert (clone / output).read_bytes() == (origin / output).read_bytes(), output


# What DVC 3's run cache can restore on another machine: a stage whose outputs are all in the
# remote. `dvc push --run-cache` uploads the run records only; `dvc push` uploads what dvc.lock
# caches. So `validate_boxes` (its git-tracked metrics/boxes.json is `cache: false`) runs again,
# and `train` / `evaluate` are never run-cached (DVC skips stages with uncached non-metric
# outputs: their git-tracked CSVs). The data-heavy stages come back without recomputing.
RUN_CACHED = ("sample", "extract_frames", "pretrain")
RERUN = ("validate_boxes",)


def test_with_no_cache_and_no_lock_the_remote_run_cache_restores_the_data_stages(
    pushed, tmp_path: Path
) -> None:
    origin = pushed["repo"]
    clone = _clone(origin, tmp_path / "clone")
    (clone / "dvc.lock").unlink()  # no record of the outputs: only the remote's run cache knows them
    assert not (clone / ".dvc" / "cache").exists()
    env = _remote_env()
    _dvc("fetch", "--run-cache", cwd=clone, env=env)
    out = _dvc("repro", "--pull", "pretrain", cwd=clone, env=env)
    for stage in RUN_CACHED:
        assert f"Stage '{stage}' is cached - skipping run, checking out outputs" in out, out[:4000]
    assert [s for s in stage_order(clone) if f"Running stage '{s}'" in out] == list(RERUN), out[:4000]
    for output in ("models/clip-pretrained/model.safetensors", "data/frames/index.parquet"):
        assert (clone / output).read_bytes() == (origin / output).read_bytes(), output
