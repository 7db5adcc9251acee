"""Tracker against a real sqlite MLflow store in a temporary directory."""

from __future__ import annotations

import http.server
import json
import socket
import threading
import time
from pathlib import Path

import pytest
from mlflow import MlflowClient

from fgclip.config import Params
from fgclip.train import tracking
from fgclip.train.tracking import Tracker, flatten_params, log_to_run


@pytest.fixture(scope="module")
def store(tracking_uri: str) -> tuple[Params, MlflowClient, Path]:
    """The session's sqlite store (creating one costs seconds), in an experiment of its own."""
    base = Path(tracking_uri[len("sqlite:///") :]).parent
    params = Params(base_dir=base).with_overrides(
        tracking={"uri": tracking_uri, "experiment": "tracking-tests"}
    )
    return params, MlflowClient(tracking_uri=tracking_uri), base


def test_flatten_params_dotted_and_truncated() -> None:
    long_prompt = "x" * 10_000
    params = Params().with_overrides(evaluate={"prompts": {"Normal": [long_prompt]}})
    flat = flatten_params(params)
    assert flat["train.lr"] == "0.0003"
    assert flat["train.health.region_loss_max"] == "0.5"
    assert flat["model.pretrained"] == "null"
    assert flat["sample.anomaly_classes"].startswith('["Arson"')
    assert len(flat["evaluate.prompts.Normal"]) == tracking.MAX_PARAM_VAL_LENGTH
    assert flat["evaluate.prompts.Normal"].endswith("[truncated]")
    assert "base_dir" not in flat


def test_params_metrics_and_artifacts_round_trip(store, tmp_path: Path) -> None:
    params, client, base = store
    steps = 23  # not a multiple of the flush interval: the tail is flushed on close
    artifact = tmp_path / "health.json"
    artifact.write_text('{"passed": true}')
    with Tracker(params, "round-trip", tags={"stage": "test"}) as tracker:
        tracker.log_params(flatten_params(params))
        for step in range(1, steps + 1):
            tracker.log_metrics({"train/loss": 1.0 / step, "train/lr": 0.1}, step=step)
        tracker.log_artifact(artifact)
        run_id = tracker.run_id

    run = client.get_run(run_id)
    assert run.info.status == "FINISHED"
    assert run.data.params["train.batch_size"] == "8"
    assert run.data.tags["stage"] == "test"
    history = client.get_metric_history(run_id, "train/loss")
    assert sorted(m.step for m in history) == list(range(1, steps + 1))
    assert {m.step: m.value for m in history}[4] == pytest.approx(0.25)
    experiment = client.get_experiment(run.info.experiment_id)
    # Artefacts live next to the db, whatever the current directory was.
    assert experiment.artifact_location == (base / "mlartifacts").resolve().as_uri()
    assert [a.path for a in client.list_artifacts(run_id)] == ["health.json"]
    # MLflow 3's UI opens a "Machine learning" experiment on its runs table, not the GenAI views.
    assert experiment.tags["mlflow.experimentKind"] == "custom_model_development"


def test_resume_never_logs_a_step_twice(store) -> None:
    params, client, _ = store
    with Tracker(params, "resume") as tracker:
        for step in range(1, 8):
            tracker.log_metrics({"train/loss": float(step)}, step=step)
        run_id = tracker.run_id
    # A restart from a checkpoint at step 4 replays steps 5..7 before going on.
    with Tracker(params, "resume", run_id=run_id) as tracker:
        tracker.log_params({"train.max_steps": "10"})
        for step in range(5, 11):
            tracker.log_metrics({"train/loss": float(step)}, step=step)
    history = client.get_metric_history(run_id, "train/loss")
    assert sorted(m.step for m in history) == list(range(1, 11))
    assert client.get_run(run_id).info.status == "FINISHED"


def test_failed_run_is_marked_failed_and_flushed(store) -> None:
    params, client, _ = store
    with pytest.raises(RuntimeError, match="boom"), Tracker(params, "fails") as tracker:
        tracker.log_metrics({"train/loss": 2.0}, step=1)
        run_id = tracker.run_id
        raise RuntimeError("boom")
    run = client.get_run(run_id)
    assert run.info.status == "FAILED"
    assert [m.step for m in client.get_metric_history(run_id, "train/loss")] == [1]


def test_disabled_tracker_writes_nothing(tmp_path: Path) -> None:
    uri = f"sqlite:///{tmp_path / 'never.db'}"
    params = Params(base_dir=tmp_path).with_overrides(tracking={"uri": uri})
    with Tracker(params, "rank1", enabled=False) as tracker:
        tracker.log_params({"a": 1})
        tracker.log_metrics({"m": 1.0}, step=1)
        assert tracker.run_id is None
    assert not (tmp_path / "never.db").exists()


def test_log_to_run_adds_to_a_finished_run(store, tmp_path: Path) -> None:
    params, client, _ = store
    with Tracker(params, "evaluated") as tracker:
        run_id = tracker.run_id
    scores = tmp_path / "eval.json"
    scores.write_text('{"frame_auc": 0.8}')
    log_to_run(params.tracking_uri, run_id, {"eval.frame_auc": 0.8}, [scores])
    run = client.get_run(run_id)
    assert run.data.metrics["eval.frame_auc"] == pytest.approx(0.8)
    assert "eval.json" in [a.path for a in client.list_artifacts(run_id)]


def test_resuming_an_unknown_run_starts_a_new_one(store, caplog: pytest.LogCaptureFixture) -> None:
    params, client, _ = store
    with Tracker(params, "orphan", run_id="0123456789abcdef0123456789abcdef") as tracker:
        tracker.log_metrics({"train/loss": 1.0}, step=3)
        run_id = tracker.run_id
    assert run_id != "0123456789abcdef0123456789abcdef"
    assert "starting a new run" in caplog.text
    assert [m.step for m in client.get_metric_history(run_id, "train/loss")] == [3]


# --- the store is checked before training starts: seconds, not MLflow's four minutes of retries ----


@pytest.fixture
def http_server():
    """A real HTTP server on a loopback port that answers every GET with ``status``."""
    servers = []

    def start(status: int) -> str:
        class Handler(http.server.BaseHTTPRequestHandler):
            def do_GET(self) -> None:
                self.send_response(status)
                self.end_headers()

            def log_message(self, *args) -> None:
                pass

        server = http.server.HTTPServer(("127.0.0.1", 0), Handler)
        threading.Thread(target=server.serve_forever, daemon=True).start()
        servers.append(server)
        return f"http://127.0.0.1:{server.server_address[1]}"

    yield start
    for server in servers:
        server.shutdown()
        server.server_close()


def test_a_server_that_answers_passes(http_server) -> None:
    tracking.check_tracking(http_server(200))
    tracking.check_tracking(http_server(404) + "/")  # an answer, even a 404, is a server


def test_a_server_that_is_down_fails_at_once() -> None:
    with socket.socket() as s:  # a port nothing listens on once this socket closes
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    start = time.monotonic()
    with pytest.raises(tracking.TrackingUnavailable) as err:
        tracking.check_tracking(f"http://127.0.0.1:{port}", origin="tracking.uri")
    assert time.monotonic() - start < 2
    assert str(err.value) == (
        f"MLflow tracking server http://127.0.0.1:{port} is not reachable ([Errno 111] Connection refused): "
        "start it, or set tracking.uri to a store this process can reach and write"
    )


def test_a_server_that_never_answers_fails_within_the_timeout(monkeypatch) -> None:
    monkeypatch.setattr(tracking, "PROBE_TIMEOUT_S", 0.5)
    with socket.socket() as listener:  # accepts connections (the backlog), never answers
        listener.bind(("127.0.0.1", 0))
        listener.listen(8)
        start = time.monotonic()
        with pytest.raises(tracking.TrackingUnavailable, match="is not reachable \\(timed out\\)"):
            tracking.check_tracking(f"http://127.0.0.1:{listener.getsockname()[1]}")
        assert time.monotonic() - start < 2


def test_a_local_store_needs_a_writable_directory(tmp_path: Path) -> None:
    a_file = tmp_path / "notes.txt"
    a_file.write_text("x")
    for uri in (f"sqlite:///{a_file}/mlflow.db", f"file://{a_file}/mlruns", f"{a_file}/mlruns"):
        with pytest.raises(tracking.TrackingUnavailable, match=f"{a_file} is not a directory"):
            tracking.check_tracking(uri)
    (tmp_path / "mlflow.db").mkdir()
    with pytest.raises(tracking.TrackingUnavailable, match="mlflow.db is not a writable file"):
        tracking.check_tracking(f"sqlite:///{tmp_path / 'mlflow.db'}")
    # Directories still to be created are fine: MLflow (and _client) create them.
    for uri in (f"sqlite:///{tmp_path / 'new' / 'deeper' / 'mlflow.db'}", str(tmp_path / "mlruns")):
        tracking.check_tracking(uri)
    tracking.check_tracking("postgresql://user@db.invalid/mlflow")  # other stores: left to MLflow


def test_an_experiment_made_without_a_kind_gets_the_runs_table_kind(store) -> None:
    params, client, _ = store
    client.create_experiment("made-elsewhere")
    with Tracker(params.with_overrides(tracking={"experiment": "made-elsewhere"}), "kind"):
        pass
    assert client.get_experiment_by_name("made-elsewhere").tags["mlflow.experimentKind"] == "custom_model_development"


def test_adopting_a_child_renames_only_a_run_its_experiment_trained(store) -> None:
    params, client, _ = store
    parent = tracking.ablation_parent(params.tracking_uri, params.tracking.experiment, "adopt", {})
    exp_id = client.get_experiment_by_name(params.tracking.experiment).experiment_id

    def run(name: str, tags: dict) -> str:
        return client.create_run(exp_id, run_name=name, tags=tags).info.run_id

    trained = run("fgclip-sample", {"dvc.experiment": "adopt-a-s0", "dvc.baseline_rev": "c1"})
    cached = run("fgclip-sample", {"dvc.experiment": "adopt-b-s0", "dvc.baseline_rev": "c0"})
    workspace = run("fgclip-sample", {})
    other = client.create_run(exp_id, run_name="o", tags={"mlflow.parentRunId": "someone-else"}).info.run_id
    notes = {rid: tracking.adopt_child(params.tracking_uri, rid, parent, exp, {tracking.BASELINE_TAG: "c1"})
             for rid, exp in ((trained, "adopt-a-s0"), (cached, "adopt-b-s0"), (workspace, "adopt-c-s0"),
                              (other, "adopt-d-s0"))}  # fmt: skip
    assert notes[trained] == [] and client.get_run(trained).info.run_name == "adopt-a-s0"
    assert "trained on commit c0" in notes[cached][0] and client.get_run(cached).info.run_name == "fgclip-sample"
    assert "nothing was trained again" in notes[workspace][0]
    assert client.get_run(workspace).info.run_name == "fgclip-sample"
    assert any("was a child of run someone-else" in n for n in notes[other])
    for rid in (trained, cached, workspace, other):
        tags = client.get_run(rid).data.tags
        assert tags["mlflow.parentRunId"] == parent and tags[tracking.BASELINE_TAG] == "c1"


def test_a_released_child_leaves_the_ablation(store) -> None:
    params, client, _ = store
    uri, experiment = params.tracking_uri, params.tracking.experiment
    parent = tracking.ablation_parent(uri, experiment, "release", {})
    exp_id = client.get_experiment_by_name(experiment).experiment_id
    old, new = (client.create_run(exp_id, tags={"mlflow.parentRunId": parent}).info.run_id for _ in range(2))
    tracking.release_child(uri, old, new)
    _, children = tracking.ablation_runs(uri, experiment, "release")
    assert [c.run_id for c in children] == [new]
    assert client.get_run(old).data.tags["ablation.superseded_by"] == new


def _git(repo: Path, *args: str) -> str:
    import subprocess

    env = {"GIT_AUTHOR_NAME": "t", "GIT_AUTHOR_EMAIL": "t@t", "GIT_COMMITTER_NAME": "t",
           "GIT_COMMITTER_EMAIL": "t@t", "PATH": "/usr/bin:/bin"}  # fmt: skip
    return subprocess.run(["git", *args], cwd=repo, env=env, check=True, capture_output=True, text=True).stdout.strip()


def test_source_tags_name_the_commit_the_lock_and_dirtiness(tmp_path: Path) -> None:
    import hashlib

    _git(tmp_path, "init", "-q")
    (tmp_path / "dvc.lock").write_text("schema: '2.0'\n")
    _git(tmp_path, "add", "dvc.lock")
    _git(tmp_path, "commit", "-q", "-m", "lock")
    tags = tracking.source_tags(tmp_path, "fgclip train")
    assert tags["mlflow.source.git.commit"] == _git(tmp_path, "rev-parse", "HEAD")
    assert tags["git.dirty"] == "false"
    committed = hashlib.sha256(b"schema: '2.0'\n").hexdigest()
    assert tags["dvc.lock_sha256"] == committed
    assert tags["mlflow.source.name"] == "fgclip train" and tags["mlflow.source.type"] == "LOCAL"
    (tmp_path / "dvc.lock").write_text("schema: '2.0'\nstages: {}\n")
    dirty = tracking.source_tags(tmp_path, "fgclip train")
    # The committed lock's digest, not the working file `dvc repro` is rewriting.
    assert dirty["git.dirty"] == "true" and dirty["dvc.lock_sha256"] == committed
    # Outside a checkout: no commit and no claim about dirtiness, rather than a failed run.
    outside = tracking.source_tags(tmp_path / "nowhere", "fgclip train")
    assert "mlflow.source.git.commit" not in outside and "git.dirty" not in outside


def _table(client: MlflowClient, run_id: str) -> dict[str, list]:
    """The run's health table, column by column, from MLflow's table layout (``{"columns", "data"}``)."""
    split = json.loads(Path(client.download_artifacts(run_id, tracking.HEALTH_TABLE)).read_text())
    return {column: [row[i] for row in split["data"]] for i, column in enumerate(split["columns"])}


def test_health_datasets_and_registered_version(store, tmp_path: Path) -> None:
    params, client, _ = store
    report = tmp_path / "health.json"
    checks = {"memory_bank_enabled_at": {"value": 50, "threshold": 50, "passed": True, "note": "n"},
              "region_loss": {"value": 0.7, "threshold": 0.5, "passed": False, "step": 500}}  # fmt: skip
    report.write_text(json.dumps({"passed": False, "checks": checks}))
    model = tmp_path / "model"
    model.mkdir()
    (model / "model.safetensors").write_bytes(b"weights")
    with Tracker(params, "registry", tags={"fingerprint": "abc"}) as tracker:
        tracker.log_health(checks, report)
        tracker.log_datasets([tracking.DatasetRef("frames_index", "0123456789abcdef", tmp_path / "index.parquet",
                                                  {"training_videos": 12})])  # fmt: skip
        run_id = tracker.run_id
    run = client.get_run(run_id)
    assert not run.data.metrics  # health is tags, not 0/1 metrics
    assert run.data.tags["health.passed"] == "false"
    assert run.data.tags["health.memory_bank_enabled_at.passed"] == "true"
    assert run.data.tags["health.memory_bank_enabled_at.value"] == "50"
    assert run.data.tags["health.region_loss.passed"] == "false"
    assert {a.path for a in client.list_artifacts(run_id)} >= {"health.json", tracking.HEALTH_TABLE}
    table = _table(client, run_id)
    assert list(table["check"]) == ["memory_bank_enabled_at", "region_loss"]
    assert list(table["passed"]) == [True, False] and list(table["value"]) == ["50", "0.7"]
    # Listed in MLflow's tag of table artefacts, which the UI reads to draw it as a table.
    assert {"path": tracking.HEALTH_TABLE, "type": "table"} in json.loads(run.data.tags["mlflow.loggedArtifacts"])
    [given] = run.inputs.dataset_inputs  # one input: order is not at stake
    assert (given.dataset.name, given.dataset.digest) == ("frames_index", "0123456789abcdef")
    assert json.loads(given.dataset.profile) == {"training_videos": 12}
    assert [(t.key, t.value) for t in given.tags] == [("mlflow.data.context", "training")]

    name = "fgclip-vad-test"
    version = tracking.register_model(params.tracking_uri, run_id, name, model, {"eval.frame_auc": 0.83})
    again = tracking.register_model(params.tracking_uri, run_id, name, model, {"eval.frame_auc": 0.84})
    assert again == version  # the same run's model is one version, with the newest tags
    [mv] = client.search_model_versions(f"name = '{name}'")
    assert (str(mv.version), mv.run_id) == (version, run_id)
    assert mv.tags["eval.frame_auc"] == "0.84"
    assert mv.tags["health.passed"] == "false" and mv.tags["fingerprint"] == "abc"
    [weights] = client.list_artifacts(run_id, "model")
    assert mv.source == f"runs:/{run_id}/{weights.path}" and mv.tags["model.sha256"].startswith(weights.path[-12:])
    # The same run resumed to more steps: new weights, a new version; the old one keeps its files.
    (model / "model.safetensors").write_bytes(b"weights, trained longer")
    newer = tracking.register_model(params.tracking_uri, run_id, name, model, {"eval.frame_auc": 0.85})
    assert int(newer) == int(version) + 1
    assert len(client.list_artifacts(run_id, "model")) == 2

    # Finishing the run again (a resumed run) rewrites the health table, it does not append to it.
    with Tracker(params, "registry", run_id=run_id) as again:
        again.log_health(checks, report)
    assert len(_table(client, run_id)["check"]) == 2
    assert json.loads(client.get_run(run_id).data.tags["mlflow.loggedArtifacts"]).count(
        {"path": tracking.HEALTH_TABLE, "type": "table"}
    ) == 1


def test_system_metrics_are_sampled_when_asked(store) -> None:
    params, client, _ = store
    with Tracker(params, "system") as tracker, tracker.system_metrics(True, 0.2):
        time.sleep(1.5)
    with Tracker(params, "no-system") as quiet, quiet.system_metrics(False, 0.2):
        time.sleep(0.5)
    assert any(k.startswith("system/cpu_utilization") for k in client.get_run(tracker.run_id).data.metrics)
    assert not client.get_run(quiet.run_id).data.metrics


def test_run_url_opens_the_training_view() -> None:
    from fgclip.train.mlflow_links import experiment_url, run_url, ui_command

    assert run_url("http://127.0.0.1:5001/", "3", "abc") == (
        "http://127.0.0.1:5001/#/experiments/3/runs/abc?workflowType=machine_learning"
    )
    assert experiment_url("https://mlflow.example.org", "3").endswith("/#/experiments/3/runs?workflowType=machine_learning")
    assert run_url("sqlite:////tmp/mlflow.db", "1", "r").startswith("http://127.0.0.1:5000/#/experiments/1/")
    assert ui_command("sqlite:////tmp/mlflow.db") == "mlflow ui --backend-store-uri sqlite:////tmp/mlflow.db"
    assert ui_command("http://127.0.0.1:5001") is None


def test_runs_logged_under_the_old_names_read_back_under_the_new(store) -> None:
    params, _, _ = store
    with Tracker(params, "old-names") as tracker:
        tracker.log_metrics({"eval/finetuned/frame_auc": 0.8, "eval/frame_auc": 0.8, "diag/memory_bank_ptr": 3.0},
                            step=0)  # fmt: skip
    record = tracking.read_run(params.tracking_uri, tracker.run_id)
    assert record.metrics == {"eval.finetuned.frame_auc": 0.8, "eval.frame_auc": 0.8, "train/diag/memory_bank_ptr": 3.0}
