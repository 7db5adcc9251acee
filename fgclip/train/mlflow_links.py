"""Links into the MLflow UI: where a run's page is, and how to start a UI that serves it.

Kept apart from ``tracking`` (no MLflow import) so the Prefect flow and the CLI can
print links without loading MLflow. MLflow 3's UI shows whichever view its sidebar
toggle (or the ``workflowType`` query) picks, whatever the experiment's
``mlflow.experimentKind`` tag says: every link carries the query, so it opens on
the runs table and the training charts, not on the GenAI pages.
"""

from __future__ import annotations

import shlex
from urllib.parse import urlsplit

UI_QUERY = "?workflowType=machine_learning"
# Where `mlflow ui` serves when started without --host / --port.
LOCAL_UI = "http://127.0.0.1:5000"


def _serves_ui(tracking_uri: str) -> bool:
    return urlsplit(tracking_uri).scheme.lower() in ("http", "https")


def ui_base(tracking_uri: str) -> str:
    """The UI's address: the tracking server's own, or ``mlflow ui``'s default for a local store."""
    return tracking_uri.rstrip("/") if _serves_ui(tracking_uri) else LOCAL_UI


def ui_command(tracking_uri: str) -> str | None:
    """The command that serves a UI for ``tracking_uri``; None when a tracking server already does."""
    return None if _serves_ui(tracking_uri) else f"mlflow ui --backend-store-uri {shlex.quote(tracking_uri)}"


def experiment_url(tracking_uri: str, experiment_id: str) -> str:
    return f"{ui_base(tracking_uri)}/#/experiments/{experiment_id}/runs{UI_QUERY}"


def run_url(tracking_uri: str, experiment_id: str, run_id: str) -> str:
    return f"{ui_base(tracking_uri)}/#/experiments/{experiment_id}/runs/{run_id}{UI_QUERY}"
