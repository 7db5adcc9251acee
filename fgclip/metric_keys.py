"""The names every MLflow metric and health tag of a run is logged under: one home for them.

MLflow's UI groups a run's metrics into sections by the part of the name before
the last ``/`` and sorts the sections by name, putting metrics without a ``/``
in its last section ("Model metrics"). The names follow from that:

- ``train/<name>``: the training curves, what users open a run for, in the first section;
- ``train/diag/<name>``: the runtime diagnostics, the section right after it;
- ``eval.<model>.<metric>``: one-off results, logged once at step 0 (the UI draws a
  single-step metric as a bar with its value) and, having no ``/``, kept below the curves.

Health checks are not metrics at all (a 0/1 "metric" reads as a count): each check
is the tags ``health.<check>.passed`` (``true``/``false``) and ``health.<check>.value``,
plus ``health.passed`` for the whole report.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from typing import Any

TRAIN_PREFIX = "train/"
DIAG_PREFIX = "train/diag/"
EVAL_PREFIX = "eval."
HEALTH_PREFIX = "health."
# The three models `evaluate` scores: the run's model, the CLIP it started from, and no training.
FINETUNED, PRETRAINED, UNTRAINED = "finetuned", "pretrained", "untrained"
# The fine-tuned model's frame AUC: the headline number, also logged without a model part.
HEADLINE = "eval.frame_auc"


def train(name: str) -> str:
    return f"{TRAIN_PREFIX}{name}"


def diag(name: str) -> str:
    return f"{DIAG_PREFIX}{name}"


def evaluation(model: str, metric: str) -> str:
    """``eval.finetuned.frame_auc``: model names and metric names hold no dots."""
    return f"{EVAL_PREFIX}{model}.{metric}"


def split_evaluation(key: str) -> tuple[str, str] | None:
    """``(model, metric)`` of an :func:`evaluation` key; None for the headline or any other key."""
    if not key.startswith(EVAL_PREFIX):
        return None
    parts = key.removeprefix(EVAL_PREFIX).split(".")
    return (parts[0], parts[1]) if len(parts) == 2 else None


def current_name(key: str) -> str:
    """``key`` as this version names it: runs logged before the names above used ``eval/<model>/<metric>``
    and ``diag/<name>``, and reading them back (``fgclip compare``, ablation tables) must still find them."""
    if key.startswith("eval/"):
        return EVAL_PREFIX + key.removeprefix("eval/").replace("/", ".")
    if key.startswith("diag/"):
        return DIAG_PREFIX + key.removeprefix("diag/")
    return key


def health_tags(checks: Mapping[str, Mapping[str, Any]]) -> dict[str, str]:
    """The health report as tags: ``health.passed`` and ``health.<check>.passed`` / ``.value``."""
    tags = {f"{HEALTH_PREFIX}passed": _bool(all(c.get("passed") for c in checks.values()))}
    for name, check in checks.items():
        tags[f"{HEALTH_PREFIX}{name}.passed"] = _bool(check.get("passed"))
        value = check.get("value")
        tags[f"{HEALTH_PREFIX}{name}.value"] = value if isinstance(value, str) else json.dumps(value)
    return tags


def failed_health_checks(tags: Mapping[str, str]) -> list[str] | None:
    """Names of the checks a run's health tags record as failed; None when it has no health tags."""
    suffix = ".passed"
    checks = {
        key.removeprefix(HEALTH_PREFIX).removesuffix(suffix): value
        for key, value in tags.items()
        if key.startswith(HEALTH_PREFIX) and key.endswith(suffix) and key != f"{HEALTH_PREFIX}passed"
    }
    if not checks:
        return None
    return sorted(name for name, value in checks.items() if value != "true")


def _bool(value: object) -> str:
    return "true" if value else "false"
