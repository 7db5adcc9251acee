"""MLflow tracking: the one module of the project that talks to MLflow.

Everything goes through ``MlflowClient`` with an explicit run id (no fluent,
process-global active run), so a training run, a resumed training run and the
evaluation stage adding its metrics to the finished training run all use the
same few calls. Metrics are buffered and written with ``log_batch``: one sqlite
transaction per call makes per-step logging the slowest part of a tiny run.
"""

from __future__ import annotations

import getpass
import hashlib
import json
import logging
import os
import subprocess
import tempfile
import time
from collections.abc import Iterable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from types import TracebackType
from typing import Any, Self
from urllib.parse import urlsplit

from mlflow import MlflowClient
from mlflow.entities import Dataset, DatasetInput, InputTag, Metric, Param, RunStatus, RunTag
from mlflow.exceptions import MlflowException
from mlflow.utils.validation import MAX_METRICS_PER_BATCH, MAX_PARAM_VAL_LENGTH, MAX_PARAMS_TAGS_PER_BATCH

from fgclip import metric_keys
from fgclip.config import Params, http_status
from fgclip.errors import FGClipError

logger = logging.getLogger(__name__)

# Distinct logged steps kept in memory before a flush; the buffer is also
# flushed on close, so nothing is lost when a run ends between flushes.
FLUSH_EVERY_STEPS = 10


def flatten_params(params: Params) -> dict[str, str]:
    """``{"train.lr": "0.0003", "train.health.region_loss_max": "0.5", ...}``.

    Lists become JSON; values longer than MLflow's limit are cut and marked, so
    a long prompt table never makes ``log_params`` fail.
    """
    flat: dict[str, str] = {}

    def walk(prefix: str, value: object) -> None:
        if isinstance(value, Mapping) and value:
            for key, sub in value.items():
                walk(f"{prefix}.{key}" if prefix else str(key), sub)
            return
        text = value if isinstance(value, str) else json.dumps(value, default=str)
        flat[prefix] = _truncate(text, MAX_PARAM_VAL_LENGTH)

    walk("", params.model_dump(exclude={"base_dir"}))
    return flat


def _truncate(text: str, limit: int) -> str:
    marker = "...[truncated]"
    return text if len(text) <= limit else text[: limit - len(marker)] + marker


def _sqlite_db(tracking_uri: str) -> Path | None:
    """The database file of a ``sqlite:///`` URI, or None for any other store."""
    prefix = "sqlite:///"
    return Path(tracking_uri[len(prefix) :]) if tracking_uri.startswith(prefix) else None


def _artifact_location(tracking_uri: str) -> str | None:
    """``<dir of the sqlite db>/mlartifacts`` as an absolute file URI.

    Without it MLflow resolves a relative ``./mlartifacts`` against the current
    directory of whichever process created the experiment, scattering artefacts.
    Other stores (a tracking server) keep their own default.
    """
    db = _sqlite_db(tracking_uri)
    return None if db is None else (db.parent / "mlartifacts").resolve().as_uri()


def _client(tracking_uri: str) -> MlflowClient:
    db = _sqlite_db(tracking_uri)
    if db is not None:
        # The db's directory must exist before SQLAlchemy can create the file.
        db.parent.mkdir(parents=True, exist_ok=True)
    return MlflowClient(tracking_uri=tracking_uri)


class TrackingUnavailable(FGClipError):
    """The tracking store cannot be used: a server that does not answer, a directory not writable."""


# Seconds to wait for a tracking server's answer: MLflow itself retries for about four minutes.
PROBE_TIMEOUT_S = 3.0


def check_tracking(tracking_uri: str, origin: str = "tracking.uri or MLFLOW_TRACKING_URI") -> None:
    """Fail in seconds, before any model or data is loaded, when ``tracking_uri`` cannot be written to.

    An http(s) server must answer (any HTTP status); a sqlite or file store needs its
    directory, or the nearest existing parent of it, to be a writable directory. Other
    stores (databricks, a database server) are left to MLflow. ``origin`` says where
    the URI came from, for the message.
    """
    scheme = urlsplit(tracking_uri).scheme.lower()
    fix = f"set {origin} to a store this process can reach and write"
    if scheme in ("http", "https"):
        _, why = http_status(tracking_uri.rstrip("/") + "/health", PROBE_TIMEOUT_S)
        if why is not None:
            raise TrackingUnavailable(
                f"MLflow tracking server {tracking_uri} is not reachable ({why}): start it, or {fix}"
            )
        return
    db = _sqlite_db(tracking_uri)
    if db is not None:
        store = db.parent
    elif scheme == "file":
        store = Path(urlsplit(tracking_uri).path)
    elif not scheme or len(scheme) == 1:  # a plain path (or a Windows drive) is a file store
        store = Path(tracking_uri)
    else:
        return
    existing = next(p for p in (store, *store.parents) if p.exists())
    if not existing.is_dir() or not os.access(existing, os.W_OK | os.X_OK):
        what = "is not a directory" if not existing.is_dir() else "is not writable"
        raise TrackingUnavailable(f"tracking URI {tracking_uri}: {existing} {what}: {fix}")
    if db is not None and db.exists() and (not db.is_file() or not os.access(db, os.W_OK)):
        raise TrackingUnavailable(f"tracking URI {tracking_uri}: {db} is not a writable file: {fix}")


# MLflow 3's UI opens an experiment by this tag: without it, it guesses, and a run with no
# models logged opens on the empty GenAI views. "custom_model_development" is the UI's
# "Machine learning" kind (its bundle's experiment-kind enum), whose page is the runs table.
EXPERIMENT_KIND_TAG = "mlflow.experimentKind"
EXPERIMENT_KIND = "custom_model_development"


def _experiment_id(client: MlflowClient, name: str, tracking_uri: str) -> str:
    experiment = client.get_experiment_by_name(name)
    if experiment is not None:
        if EXPERIMENT_KIND_TAG not in experiment.tags:  # made before the tag, or by another tool
            client.set_experiment_tag(experiment.experiment_id, EXPERIMENT_KIND_TAG, EXPERIMENT_KIND)
        return experiment.experiment_id
    try:
        return client.create_experiment(name, artifact_location=_artifact_location(tracking_uri),
                                        tags={EXPERIMENT_KIND_TAG: EXPERIMENT_KIND})  # fmt: skip
    except MlflowException:
        # Another process created it between the lookup and the create.
        experiment = client.get_experiment_by_name(name)
        if experiment is None:
            raise
        return experiment.experiment_id


def _log_tags(client: MlflowClient, run_id: str, tags: Mapping[str, object]) -> None:
    items = [RunTag(k, _truncate(str(v), MAX_PARAM_VAL_LENGTH)) for k, v in tags.items()]
    for i in range(0, len(items), MAX_PARAMS_TAGS_PER_BATCH):
        client.log_batch(run_id, tags=items[i : i + MAX_PARAMS_TAGS_PER_BATCH])


class Tracker:
    """One MLflow run, started or resumed; a no-op when ``enabled`` is false.

    Used as a context manager: the run ends FINISHED on a normal exit, FAILED on
    an exception and KILLED on Ctrl-C, after the metric buffer is flushed.
    When resuming a run, metric points at steps the run already holds are not
    written again, so each metric's history has every step exactly once even
    when training restarts from a checkpoint older than the last logged step.
    """

    def __init__(
        self,
        params: Params,
        run_name: str,
        *,
        run_id: str | None = None,
        enabled: bool = True,
        tags: Mapping[str, str] | None = None,
    ) -> None:
        self.enabled = enabled
        self.tracking_uri = params.tracking_uri
        self.run_id: str | None = None
        self.experiment_id: str | None = None
        self.resumed = False
        self._buffer: list[Metric] = []
        self._buffered_steps: set[int] = set()
        self._logged_upto: dict[str, int] = {}
        if not enabled:
            return
        self._client = _client(self.tracking_uri)
        if run_id is not None:
            try:
                run = self._client.get_run(run_id)
            except MlflowException:
                logger.warning("MLflow run %s (from the checkpoint) is not in %s: starting a new run",
                               run_id, self.tracking_uri)  # fmt: skip
                run_id = None
        if run_id is not None:
            self.run_id, self.experiment_id, self.resumed = run_id, run.info.experiment_id, True
            self._client.update_run(run_id, status=RunStatus.to_string(RunStatus.RUNNING))
            for key in run.data.metrics:
                history = self._client.get_metric_history(run_id, key)
                self._logged_upto[key] = max(m.step for m in history)
            logger.info("Resumed MLflow run %s (experiment %s)", run_id, self.experiment_id)
        else:
            self.experiment_id = _experiment_id(self._client, params.tracking.experiment, self.tracking_uri)
            run = self._client.create_run(self.experiment_id, run_name=run_name)
            self.run_id = run.info.run_id
            logger.info("Started MLflow run %s (experiment %s)", self.run_id, self.experiment_id)
        if tags:
            self.set_tags(tags)

    def __enter__(self) -> Self:
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        if exc_type is None:
            status = RunStatus.FINISHED
        elif issubclass(exc_type, KeyboardInterrupt):
            status = RunStatus.KILLED
        else:
            status = RunStatus.FAILED
        self.close(RunStatus.to_string(status))

    def log_params(self, flat: Mapping[str, object]) -> None:
        """Log flat params; on a resumed run, keys already logged are left alone.

        MLflow refuses to change a logged param; a changed value on resume (say a
        longer ``train.max_steps``) is reported as a warning and kept as a tag.
        """
        if not self.enabled:
            return
        existing = self._client.get_run(self.run_id).data.params
        new: list[Param] = []
        changed: dict[str, str] = {}
        for key, value in flat.items():
            text = _truncate(str(value), MAX_PARAM_VAL_LENGTH)
            if key not in existing:
                new.append(Param(key, text))
            elif existing[key] != text:
                changed[key] = text
                logger.warning("param %s changed on resume: %s -> %s", key, existing[key], text)
        for i in range(0, len(new), MAX_PARAMS_TAGS_PER_BATCH):
            self._client.log_batch(self.run_id, params=new[i : i + MAX_PARAMS_TAGS_PER_BATCH])
        if changed:
            self.set_tags({f"changed_param.{k}": v for k, v in changed.items()})

    def set_tags(self, tags: Mapping[str, object]) -> None:
        if not self.enabled:
            return
        _log_tags(self._client, self.run_id, tags)

    def log_metrics(self, metrics: Mapping[str, float], step: int) -> None:
        """Buffer metric points for ``step``; flushed every few steps and on close."""
        if not self.enabled:
            return
        now = int(time.time() * 1000)
        for key, value in metrics.items():
            if step <= self._logged_upto.get(key, -1):
                continue
            self._buffer.append(Metric(key, float(value), now, step))
        self._buffered_steps.add(step)
        if len(self._buffered_steps) >= FLUSH_EVERY_STEPS or len(self._buffer) >= MAX_METRICS_PER_BATCH:
            self.flush()

    def flush(self) -> None:
        if not self.enabled or not self._buffer:
            return
        for i in range(0, len(self._buffer), MAX_METRICS_PER_BATCH):
            self._client.log_batch(self.run_id, metrics=self._buffer[i : i + MAX_METRICS_PER_BATCH])
        self._buffer.clear()
        self._buffered_steps.clear()

    def log_artifact(self, path: str | Path, artifact_path: str | None = None) -> None:
        if not self.enabled:
            return
        self._client.log_artifact(self.run_id, str(path), artifact_path)

    def log_health(self, checks: Mapping[str, Mapping[str, Any]], report: Path) -> None:
        """The health report as ``health.*`` tags, its JSON file and a table the UI shows as one."""
        if not self.enabled:
            return
        self.set_tags(metric_keys.health_tags(checks))
        self.log_artifact(report)
        # MLflow's own log_table appends to a table the run already has: a resumed run that
        # finishes again would list every check twice. Written whole, in log_table's layout
        # (pandas' "split" orient), and announced to the UI as a table the way log_table does.
        columns = ["check", "passed", "value", "threshold", "step", "note"]
        rows = [[name, bool(c.get("passed")), *(_cell_text(c.get(k)) for k in columns[2:])] for name, c in checks.items()]
        with tempfile.TemporaryDirectory(prefix="fgclip-health-") as tmp:
            table = Path(tmp) / HEALTH_TABLE
            table.write_text(json.dumps({"columns": columns, "data": rows}), encoding="utf-8")
            self.log_artifact(table)
        logged = json.loads(self._client.get_run(self.run_id).data.tags.get(LOGGED_ARTIFACTS_TAG, "[]"))
        entry = {"path": HEALTH_TABLE, "type": "table"}
        if entry not in logged:
            self.set_tags({LOGGED_ARTIFACTS_TAG: json.dumps([*logged, entry])})

    def log_datasets(self, datasets: Sequence[DatasetRef], context: str = "training") -> None:
        """Record what the run read as MLflow dataset inputs (the UI's Dataset column)."""
        if not self.enabled or not datasets:
            return
        tags = [InputTag("mlflow.data.context", context)]
        inputs = [DatasetInput(_dataset(d), tags=tags) for d in datasets]
        self._client.log_inputs(self.run_id, datasets=inputs)

    @contextmanager
    def system_metrics(self, enabled: bool, interval_s: float) -> Iterator[None]:
        """MLflow's system metrics (``system/*``) sampled on a thread while the block runs."""
        if not (enabled and self.enabled):
            yield
            return
        from mlflow.system_metrics.system_metrics_monitor import SystemMetricsMonitor

        monitor = SystemMetricsMonitor(self.run_id, sampling_interval=interval_s, resume_logging=self.resumed,
                                       tracking_uri=self.tracking_uri)  # fmt: skip
        monitor.start()
        try:
            yield
        finally:
            monitor.finish()

    def close(self, status: str = "FINISHED") -> None:
        """Flush and end the run (idempotent)."""
        if not self.enabled or self.run_id is None:
            return
        try:
            self.flush()
        finally:
            self._client.set_terminated(self.run_id, status=status)
            self.enabled = False


def _dataset(ref: DatasetRef) -> Dataset:
    profile = json.dumps(ref.profile) if ref.profile else None
    return Dataset(ref.name, ref.digest, "local", json.dumps({"uri": str(ref.path)}), profile=profile)


def _cell_text(value: object) -> str:
    return "" if value is None else value if isinstance(value, str) else json.dumps(value)


# The run's health report as a table artefact: the UI's artefact view draws it as one,
# being listed in MLflow's own tag of table artefacts.
HEALTH_TABLE = "health_table.json"
LOGGED_ARTIFACTS_TAG = "mlflow.loggedArtifacts"


@dataclass(frozen=True)
class DatasetRef:
    """A dataset a run read: a name, a content digest (at most 36 characters: MLflow's limit), a path."""

    name: str
    digest: str
    path: Path
    profile: dict[str, Any] | None = None


def source_tags(repo: Path, entry_point: str) -> dict[str, str]:
    """What the run was made from, as tags: MLflow's own source tags and the ``dvc.lock`` digest.

    ``mlflow.source.*`` and ``mlflow.user`` fill the UI's Source and Created-by columns;
    ``mlflow.source.git.commit`` is the commit it shows; ``git.dirty`` says whether tracked
    files differed from it. ``dvc.lock_sha256`` is the digest of that commit's ``dvc.lock``:
    the pipeline state ``git checkout`` and ``dvc pull`` restore. The working file is no
    use for that: ``dvc repro`` rewrites it stage by stage, before and after training (so
    ``git.dirty`` is true during a repro of changed stages, and the run's own inputs are
    pinned by its ``fingerprint`` and dataset digests instead).
    """
    tags = {"mlflow.source.type": "LOCAL", "mlflow.source.name": entry_point}
    try:
        tags["mlflow.user"] = getpass.getuser()
    except (KeyError, OSError):  # no user name in a bare container: leave the column empty
        pass
    commit = _git(repo, "rev-parse", "HEAD")
    if commit:
        tags["mlflow.source.git.commit"] = commit
        status = _git(repo, "status", "--porcelain", "--untracked-files=no")
        tags["git.dirty"] = "false" if status == "" else "true"
        committed = _git(repo, "show", "HEAD:dvc.lock", strip=False)
        if committed is not None:
            tags["dvc.lock_sha256"] = hashlib.sha256(committed.encode()).hexdigest()
    return tags


def _git(repo: Path, *args: str, strip: bool = True) -> str | None:
    """``git <args>``'s output in ``repo``; None outside a git checkout, without git, or on an error."""
    try:
        proc = subprocess.run(["git", "-C", str(repo), *args], capture_output=True, text=True, timeout=30,
                              check=False)  # fmt: skip
    except (OSError, subprocess.TimeoutExpired):
        return None
    if proc.returncode != 0:
        return None
    return proc.stdout.strip() if strip else proc.stdout


def log_to_run(
    tracking_uri: str,
    run_id: str,
    metrics: Mapping[str, float],
    artifacts: Iterable[Path] = (),
    step: int | None = None,
) -> None:
    """Add metrics and artefacts to an existing (possibly finished) run."""
    client = _client(tracking_uri)
    now = int(time.time() * 1000)
    points = [Metric(k, float(v), now, step or 0) for k, v in metrics.items()]
    for i in range(0, len(points), MAX_METRICS_PER_BATCH):
        client.log_batch(run_id, metrics=points[i : i + MAX_METRICS_PER_BATCH])
    for path in artifacts:
        client.log_artifact(run_id, str(path))


MODEL_ARTIFACT = "model"
# The registered version's record of which weights it holds (sha256 of the model directory).
WEIGHTS_TAG = "model.sha256"
# Run tags copied onto a registered version besides health.*: where the model came from.
VERSION_RUN_TAGS = ("mlflow.source.git.commit", "dvc.lock_sha256", "fingerprint")


def register_model(tracking_uri: str, run_id: str, name: str, model_dir: Path, tags: Mapping[str, object]) -> str:
    """The run's model as a version of registered model ``name``, with ``tags``; returns the version.

    The model's files are logged to the run under ``model/<digest>/`` and the version points
    at them (``runs:/<run>/model/<digest>``: the one source a tracking server accepts without
    sharing a disk). Evaluating the same weights again keeps their version and updates its
    tags; a run whose weights changed (resumed to more steps) gets a new version, and the
    old one keeps the files it was made from.
    """
    client = _client(tracking_uri)
    try:
        client.create_registered_model(name, description="fgclip-vad fine-tuned video FG-CLIP models")
    except MlflowException as exc:
        if exc.error_code != "RESOURCE_ALREADY_EXISTS":
            raise
    digest = _directory_digest(model_dir)
    found = client.search_model_versions(f"name = '{name}' and run_id = '{run_id}'")
    same = [v for v in found if v.tags.get(WEIGHTS_TAG) == digest]
    if same:
        version = str(max(int(v.version) for v in same))
    else:
        artifact_path = f"{MODEL_ARTIFACT}/{digest[:12]}"
        client.log_artifacts(run_id, str(model_dir), artifact_path)
        version = str(client.create_model_version(name, f"runs:/{run_id}/{artifact_path}", run_id=run_id,
                                                  tags={WEIGHTS_TAG: digest}).version)  # fmt: skip
    # The training run's health and source travel with the version: the registry's page
    # then says whether the model passed its checks without opening the run.
    run_tags = client.get_run(run_id).data.tags
    inherited = {k: v for k, v in run_tags.items() if k.startswith(metric_keys.HEALTH_PREFIX) or k in VERSION_RUN_TAGS}
    for key, value in {**inherited, **tags}.items():
        client.set_model_version_tag(name, version, key, _truncate(str(value), MAX_PARAM_VAL_LENGTH))
    return version


def _directory_digest(directory: Path) -> str:
    """sha256 over every file of ``directory`` (relative name, then bytes), in name order."""
    h = hashlib.sha256()
    for path in sorted(p for p in Path(directory).rglob("*") if p.is_file()):
        h.update(path.relative_to(directory).as_posix().encode() + b"\0")
        with path.open("rb") as f:
            for block in iter(lambda: f.read(1 << 20), b""):
                h.update(block)
    return h.hexdigest()


# --- reading runs back (``fgclip compare``) -------------------------------------

# The artefact the training loop logs from ``metrics/health.json``: the only place
# the memory bank's switch-on point is recorded for a finished run.
HEALTH_ARTIFACT = "health.json"
PROGRESS_BAR_ENV = "MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR"


class TrackingReadError(FGClipError):
    """The tracking database, experiment or run asked for is not there."""


@dataclass(frozen=True)
class RunRecord:
    """One MLflow run as plain values, so code outside this module never sees MLflow types."""

    run_id: str
    name: str
    status: str
    start_time: int | None  # ms since the epoch
    params: dict[str, str]
    metrics: dict[str, float]  # each metric's value at its last step
    last_step: int | None  # last step logged for ``train/loss``
    health: dict[str, Any] | None  # the ``checks`` of the run's health.json artefact, if it has one
    tags: dict[str, str] = field(default_factory=dict)


def _open_experiment(tracking_uri: str, experiment: str, hint: str) -> tuple[MlflowClient, Any]:
    """A reading client and the experiment, or an error naming what is there; ``hint`` says what to do."""
    db = _sqlite_db(tracking_uri)
    # Checked first: MLflow would silently create an empty database at a mistyped path.
    if db is not None and not db.is_file():
        raise TrackingReadError(f"no MLflow database at {db} (tracking URI {tracking_uri}); {hint}")
    client = MlflowClient(tracking_uri=tracking_uri)
    found = client.get_experiment_by_name(experiment)
    if found is None:
        names = ", ".join(sorted(e.name for e in client.search_experiments())) or "none"
        raise TrackingReadError(f"experiment {experiment!r} not found in {tracking_uri} (experiments: {names})")
    return client, found


def _search_all(client: MlflowClient, experiment_id: str, order_by: str, filter_string: str = "") -> list:
    """Every run of the search, all pages."""
    runs, token = [], None
    while True:
        page = client.search_runs([experiment_id], filter_string=filter_string, order_by=[order_by], page_token=token)
        runs.extend(page)
        token = page.token
        if not token:
            return runs


def read_runs(
    tracking_uri: str, experiment: str, selectors: Sequence[str] = (), last: int | None = None
) -> list[RunRecord]:
    """Runs of ``experiment``: those named by ``selectors``, in that order, else the newest ``last``.

    A selector is a run id, a run name (the newest run of that name: a retrain
    with changed params starts a new run under the same name) or a unique id
    prefix. Without selectors the runs come oldest first, so columns read as a timeline.
    """
    client, found = _open_experiment(tracking_uri, experiment, "train a model first")
    runs = _search_all(client, found.experiment_id, order_by="attributes.start_time DESC")
    if not runs:
        raise TrackingReadError(f"experiment {experiment!r} in {tracking_uri} has no runs")
    if selectors:
        chosen = list(dict.fromkeys(_select_run(runs, s, experiment, tracking_uri) for s in selectors))
        by_id = {r.info.run_id: r for r in runs}
        picked = [by_id[run_id] for run_id in chosen]
    else:
        picked = runs[:last] if last and last > 0 else runs
        if len(picked) < len(runs):
            logger.info("showing the %d newest of the %d runs of %r; pick others with --runs",
                        len(picked), len(runs), experiment)  # fmt: skip
        picked.reverse()
    return [_run_record(client, run) for run in picked]


def _select_run(runs: list, selector: str, experiment: str, tracking_uri: str) -> str:
    """The id of the run ``selector`` names (``runs`` newest first)."""
    exact = [r for r in runs if r.info.run_id == selector] or [r for r in runs if r.info.run_name == selector]
    if exact:
        return exact[0].info.run_id
    hits = [r for r in runs if r.info.run_id.startswith(selector)]
    if len(hits) == 1:
        return hits[0].info.run_id
    known = ", ".join(f"{r.info.run_name} ({r.info.run_id[:8]})" for r in runs[:10])
    what = "matches several runs" if hits else "is neither a run id, a run name nor an id prefix"
    raise TrackingReadError(
        f"run {selector!r} {what} in experiment {experiment!r} of {tracking_uri} (newest runs: {known})"
    )


def _run_record(client: MlflowClient, run: Any) -> RunRecord:
    run_id = run.info.run_id
    metrics = {metric_keys.current_name(k): v for k, v in run.data.metrics.items()}
    steps = (
        [m.step for m in client.get_metric_history(run_id, "train/loss")] if "train/loss" in metrics else []
    )
    return RunRecord(
        run_id=run_id,
        name=run.info.run_name or "",
        status=run.info.status,
        start_time=run.info.start_time,
        params=dict(run.data.params),
        metrics=metrics,
        last_step=max(steps, default=None),
        health=_health_checks(client, run_id),
        tags=dict(run.data.tags),
    )


def _health_checks(client: MlflowClient, run_id: str) -> dict[str, Any] | None:
    """The ``checks`` of the run's health artefact; None (with a warning if unreadable) without one."""
    try:
        if HEALTH_ARTIFACT not in {a.path for a in client.list_artifacts(run_id)}:
            return None
        with tempfile.TemporaryDirectory() as tmp, _no_progress_bar():
            local = client.download_artifacts(run_id, HEALTH_ARTIFACT, tmp)
            checks = json.loads(Path(local).read_text(encoding="utf-8"))["checks"]
    except (MlflowException, OSError, ValueError, KeyError, TypeError) as exc:
        logger.warning("run %s: cannot read its %s artefact: %s", run_id, HEALTH_ARTIFACT, exc)
        return None
    return checks if isinstance(checks, dict) else None


@contextmanager
def _no_progress_bar() -> Iterator[None]:
    """MLflow draws a download progress bar on stderr even for a 1 kB JSON: noise in ``compare``."""
    previous = os.environ.get(PROGRESS_BAR_ENV)
    os.environ[PROGRESS_BAR_ENV] = "false"
    try:
        yield
    finally:
        if previous is None:
            os.environ.pop(PROGRESS_BAR_ENV, None)
        else:
            os.environ[PROGRESS_BAR_ENV] = previous


# --- ablations: one parent run, the cells' runs as its children -------------------

ABLATION_TAG = "ablation.name"
ROLE_TAG = "ablation.role"
CELL_TAG = "ablation.cell"
SEED_TAG = "ablation.seed"
# The parent's record of the grid: its reference cell, cells (JSON list) and seeds (JSON list).
REFERENCE_TAG = "ablation.reference"
GRID_TAG = "ablation.grid"
SEEDS_TAG = "ablation.seeds"
# MLflow's own tag: the UI nests a run under the run it names.
PARENT_TAG = "mlflow.parentRunId"


def _parent_filter(name: str) -> str:
    # Grid names are letters, digits, '_' and '-' (fgclip.config): nothing to escape.
    return f"tags.`{ABLATION_TAG}` = '{name}' and tags.`{ROLE_TAG}` = 'parent'"


def ablation_parent(tracking_uri: str, experiment: str, name: str, tags: Mapping[str, object]) -> str:
    """The parent run of ablation ``name``: the newest one already there (a rerun resumes it), else a new one."""
    client = _client(tracking_uri)
    experiment_id = _experiment_id(client, experiment, tracking_uri)
    found = client.search_runs([experiment_id], filter_string=_parent_filter(name),
                               order_by=["attributes.start_time DESC"], max_results=1)  # fmt: skip
    if found:
        run_id = found[0].info.run_id
        client.update_run(run_id, status=RunStatus.to_string(RunStatus.RUNNING))
    else:
        run_id = client.create_run(experiment_id, run_name=f"ablation-{name}").info.run_id
    tag_run(tracking_uri, run_id, {ABLATION_TAG: name, ROLE_TAG: "parent", **tags})
    return run_id


def tag_run(tracking_uri: str, run_id: str, tags: Mapping[str, object]) -> None:
    """Set ``tags`` on a run, finished or not."""
    _log_tags(_client(tracking_uri), run_id, tags)


EXPERIMENT_TAG = "ablation.experiment"
BASELINE_TAG = "ablation.baseline_rev"
TRAINED_BY_TAG = "dvc.experiment"  # set by the training run itself, from DVC's DVC_EXP_NAME


def adopt_child(tracking_uri: str, run_id: str, parent_id: str, experiment: str, tags: Mapping[str, object]) -> list[str]:
    """Make ``run_id`` a child of ``parent_id``; returns warnings worth showing.

    The run is renamed after the experiment only when that experiment trained it: a run
    DVC handed over unchanged (the workspace's own, or one from its run cache) keeps its name.
    """
    client = _client(tracking_uri)
    run = client.get_run(run_id)
    notes = []
    old_parent = run.data.tags.get(PARENT_TAG)
    if old_parent and old_parent != parent_id:
        notes.append(f"MLflow run {run_id} was a child of run {old_parent}, now of {parent_id}: a run has one parent")
    trained_on = run.data.tags.get("dvc.baseline_rev")
    if run.data.tags.get(TRAINED_BY_TAG) == experiment and trained_on and trained_on != tags.get(BASELINE_TAG):
        notes.append(f"experiment {experiment} reuses MLflow run {run_id}, trained on commit {trained_on[:8]}: "
                     "DVC restored its outputs from its run cache")  # fmt: skip
    elif run.data.tags.get(TRAINED_BY_TAG) == experiment:
        if run.info.run_name != experiment:
            client.update_run(run_id, name=experiment)
    else:
        notes.append(f"experiment {experiment} reuses MLflow run {run_id} ({run.info.run_name}): DVC found its "
                     "outputs up to date or in its run cache, so nothing was trained again")  # fmt: skip
    tag_run(tracking_uri, run_id, {PARENT_TAG: parent_id, EXPERIMENT_TAG: experiment, **tags})
    return notes


def release_child(tracking_uri: str, run_id: str, superseded_by: str) -> None:
    """Take a run out of its ablation: another run now stands for its cell and seed."""
    client = _client(tracking_uri)
    client.delete_tag(run_id, PARENT_TAG)
    client.set_tag(run_id, "ablation.superseded_by", superseded_by)


def end_run(tracking_uri: str, run_id: str, status: str = "FINISHED") -> None:
    _client(tracking_uri).set_terminated(run_id, status=status)


def read_run(tracking_uri: str, run_id: str) -> RunRecord:
    client = MlflowClient(tracking_uri=tracking_uri)
    return _run_record(client, client.get_run(run_id))


def ablation_runs(tracking_uri: str, experiment: str, name: str) -> tuple[RunRecord, list[RunRecord]]:
    """Ablation ``name``'s parent run and its children (oldest first)."""
    client, found = _open_experiment(tracking_uri, experiment, "run `fgclip ablate` first")
    parents = client.search_runs([found.experiment_id], filter_string=_parent_filter(name),
                                 order_by=["attributes.start_time DESC"], max_results=1)  # fmt: skip
    if not parents:
        raise TrackingReadError(f"no ablation {name!r} in experiment {experiment!r} of {tracking_uri}")
    parent = parents[0]
    children = _search_all(client, found.experiment_id, order_by="attributes.start_time ASC",
                           filter_string=f"tags.`{PARENT_TAG}` = '{parent.info.run_id}'")  # fmt: skip
    return _run_record(client, parent), [_run_record(client, run) for run in children]
