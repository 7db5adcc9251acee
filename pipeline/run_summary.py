"""The flow run's summary artefact: key metrics, health and the MLflow run, from the metrics files.

Pure functions over what the stages wrote (``train.metrics``, ``train.health_report``,
``evaluate.out``), so the Markdown is tested without a Prefect server; the flow
publishes it (:func:`pipeline.flow.fgclip_pipeline`).
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from fgclip.config import Paths
from fgclip.metric_keys import FINETUNED, PRETRAINED, UNTRAINED
from fgclip.train.mlflow_links import run_url, ui_command

# name -> the Paths field of the metrics file it is read from.
METRICS_FILES = {"train": "train_metrics", "health": "health", "eval": "eval_metrics"}


def read_run_metrics(paths: Paths) -> tuple[dict[str, dict], list[str]]:
    """The metrics files of a run, ``{"train"|"health"|"eval": content}``, and what is missing.

    A missing or unreadable file (a stage skipped or failed) is named in the second
    value, ``"<path> (<params key>): <why>"``, instead of failing the run.
    """
    found: dict[str, dict] = {}
    missing: list[str] = []
    for name, field in METRICS_FILES.items():
        path = getattr(paths, field)
        try:
            content = json.loads(Path(path).read_text(encoding="utf-8"))
        except FileNotFoundError:
            missing.append(f"{path} ({Paths.key(field)}): not found")
            continue
        except (OSError, ValueError) as exc:
            missing.append(f"{path} ({Paths.key(field)}): unreadable: {exc}")
            continue
        if isinstance(content, dict):
            found[name] = content
        else:
            missing.append(f"{path} ({Paths.key(field)}): not a JSON object")
    return found, missing


# (label, key in an evaluated model's metrics) of the evaluation table.
EVAL_ROWS = (
    ("frame AUC", "frame_auc"),
    ("frame AP", "frame_ap"),
    ("region top-1", "region_top1"),
    ("hard-negative accuracy", "hardneg_accuracy"),
    ("retrieval R@1", "retrieval_r1"),
)
EVAL_MODELS = (FINETUNED, PRETRAINED, UNTRAINED)
# (label, path of keys in train.json) of the training table.
TRAIN_ROWS = (
    ("steps", ("steps",)),
    ("final loss", ("final", "loss")),
    ("final loss (global)", ("final", "loss_global")),
    ("final loss (region)", ("final", "loss_region")),
    ("final loss (hard negatives)", ("final", "loss_hardneg")),
    ("temperature (global)", ("temperature_global",)),
    ("temperature (region)", ("temperature_region",)),
    ("temperature (hard negatives)", ("temperature_hardneg",)),
)


def summary_markdown(
    metrics: Mapping[str, Mapping[str, Any]], missing: Sequence[str] = (), failed_stage: str | None = None
) -> str:
    """The artefact's Markdown: the MLflow run, evaluation, training and health tables.

    ``metrics`` is :func:`read_run_metrics`'s first value; a table whose file is
    absent is left out, and ``missing`` lists why. ``failed_stage``: the run failed
    there, and the files (stages after it did not run) may be an earlier run's.
    """
    train, health, evaluation = (metrics.get(k) or {} for k in ("train", "health", "eval"))
    parts = ["# fgclip-vad run summary"]
    if failed_stage:
        parts.append(f"**This flow run FAILED at stage `{_cell(failed_stage)}`**: the figures below are what "
                     "the metrics files hold now; those of the stages it did not reach may be an earlier run's.")  # fmt: skip
    parts += [_mlflow_line(train), _health_line(health, train)]
    if evaluation:
        header = ["metric", *EVAL_MODELS]
        rows = [
            [label, *(_fmt(_dig(evaluation, model, key)) for model in EVAL_MODELS)]
            for label, key in EVAL_ROWS
        ]
        parts += ["## Evaluation", _table(header, rows)]
    if train:
        rows = [[label, _fmt(_dig(train, *keys))] for label, keys in TRAIN_ROWS]
        parts += ["## Training", _table(["metric", "value"], rows)]
    checks = _health_checks(health, train)
    if checks:
        rows = [[name, _fmt(_dig(c, "passed")), _fmt(_dig(c, "value")), _fmt(_dig(c, "threshold"))]
                for name, c in checks.items()]  # fmt: skip
        parts += ["## Health checks", _table(["check", "passed", "value", "threshold"], rows)]
    if missing:
        parts += ["## Missing", "\n".join(f"- {_cell(m)}" for m in missing)]
    return "\n\n".join(parts) + "\n"


def _mlflow_line(train: Mapping[str, Any]) -> str:
    run_id, experiment_id, uri = (train.get(k) for k in ("run_id", "experiment_id", "tracking_uri"))
    if not run_id:
        return "**MLflow run**: unknown (no run id in the training metrics)"
    if not (experiment_id and uri):
        return f"**MLflow run** `{run_id}` (no tracking URI in the training metrics)"
    url, command = run_url(str(uri), str(experiment_id), str(run_id)), ui_command(str(uri))
    if command is None:
        return f"**MLflow run** `{run_id}`: [{url}]({url})"
    return f"**MLflow run** `{run_id}` in `{uri}`: start the UI with `{command}`, then open {url}"


def _health_line(health: Mapping[str, Any], train: Mapping[str, Any]) -> str:
    passed = health.get("passed", train.get("health_passed"))
    checks = _health_checks(health, train)
    failed = [name for name, c in checks.items() if _dig(c, "passed") is False]
    if passed is None:
        return "**Health**: unknown (no health report)"
    verdict = "passed" if passed else "FAILED"
    detail = f" (failed: {', '.join(failed)})" if failed else ""
    return f"**Health**: {verdict}, {len(checks) - len(failed)} of {len(checks)} checks passed{detail}"


def _health_checks(health: Mapping[str, Any], train: Mapping[str, Any]) -> dict[str, Any]:
    # health.json is written even when a gate fails training; train.json only after a finished run.
    checks = health.get("checks", train.get("health"))
    return {str(k): v for k, v in checks.items()} if isinstance(checks, dict) else {}


def _dig(data: Any, *keys: str) -> Any:
    for key in keys:
        data = data.get(key) if isinstance(data, Mapping) else None
    return data


def _fmt(value: Any) -> str:
    """A table cell: 4 significant digits, yes/no, ``key=value`` pairs; ``–`` for absent."""
    if value is None:
        return "–"
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, float):
        return f"{value:.4g}"
    if isinstance(value, Mapping):
        return ", ".join(f"{k}={_fmt(v)}" for k, v in value.items())
    return _cell(str(value))


def _cell(text: str) -> str:
    # A "|" would split the cell; a newline would end the table.
    return text.replace("|", "\\|").replace("\n", " ")


def _table(header: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    lines = [header, ["---"] * len(header), *rows]
    return "\n".join(f"| {' | '.join(line)} |" for line in lines)
