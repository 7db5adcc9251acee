"""``fgclip compare``: the runs of an MLflow experiment side by side.

One column per run and one row per field, like MLflow's own compare view, so two
to six runs fit a terminal or a README. Rows: the params that differ (the equal
ones are noise: a run logs over a hundred), final losses, temperatures, when the
memory bank switched on, failed health checks and the evaluation metrics.
Reading MLflow is ``fgclip.train.tracking``'s job; this module only lays out the
values, as a plain table, Markdown or CSV.
"""

from __future__ import annotations

import csv
import io
import json
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import TYPE_CHECKING

from fgclip import metric_keys
from fgclip.errors import FGClipError

if TYPE_CHECKING:
    from fgclip.config import Params
    from fgclip.train.tracking import RunRecord

FORMATS = ("table", "markdown", "csv")
# Without --runs: the newest runs only, as more columns stop fitting a terminal.
DEFAULT_LAST = 6
MISSING = "-"
# Table and Markdown cut long values (the prompt tables are params too); CSV keeps them whole.
MAX_CELL = 40
LOSSES = ("train/loss", "train/loss_global", "train/loss_region")
# The headline metrics first in each model's block (the order evaluate.py logs them in);
# per-class AUCs and anything newer follow alphabetically.
EVAL_FIRST = {
    name: i
    for i, name in enumerate(
        ("frame_auc", "frame_ap", "anomalous_auc", "region_top1", "retrieval_r1", "retrieval_r5")
    )
}


@dataclass(frozen=True)
class Row:
    label: str
    values: tuple[object, ...]  # one per run; None where the run has no value


@dataclass(frozen=True)
class Section:
    key: str  # the CSV ``section`` column
    title: str  # the heading in the table and Markdown
    rows: tuple[Row, ...]


def compare(
    params: Params,
    *,
    experiment: str | None = None,
    runs: Sequence[str] = (),
    fmt: str = "table",
    last: int = DEFAULT_LAST,
) -> str:
    """The comparison of the selected runs of the experiment, rendered as ``fmt``."""
    if fmt not in FORMATS:
        raise FGClipError(f"unknown format {fmt!r}: expected one of {', '.join(FORMATS)}")
    from fgclip.train.tracking import read_runs  # MLflow takes seconds to import

    records = read_runs(params.tracking_uri, experiment or params.tracking.experiment, runs, last)
    return render(records, fmt)


def compare_ablation(params: Params, name: str, *, experiment: str | None = None, fmt: str = "table") -> str:
    """Ablation ``name``'s table from its MLflow child runs: Markdown (``table``, ``markdown``) or CSV."""
    if fmt not in FORMATS:
        raise FGClipError(f"unknown format {fmt!r}: expected one of {', '.join(FORMATS)}")
    from fgclip.ablation.grid import check_name
    from fgclip.ablation.report import CHART_METRICS, METRICS, build_table
    from fgclip.ablation.table import csv_text, markdown
    from fgclip.train.tracking import (
        BASELINE_TAG,
        GRID_TAG,
        REFERENCE_TAG,
        SEED_TAG,
        SEEDS_TAG,
        ablation_runs,
    )

    parent, children = ablation_runs(params.tracking_uri, experiment or params.tracking.experiment, check_name(name))
    reference = parent.tags.get(REFERENCE_TAG)
    try:
        cells = list(json.loads(parent.tags.get(GRID_TAG, "")))
    except (ValueError, TypeError):
        cells = []
    if not reference or not cells:
        raise FGClipError(f"ablation {name!r}: its parent run {parent.run_id} has no ablation.reference / ablation.grid tags")
    # The children of the ablation's last run: same commit (a name reused on a later commit adopts anew).
    baseline = parent.tags.get(BASELINE_TAG)
    try:
        seeds = {str(seed) for seed in json.loads(parent.tags.get(SEEDS_TAG, ""))}
    except (ValueError, TypeError):
        seeds = None  # a parent tagged before the seed list: every seed
    children = [c for c in children if c.tags.get(BASELINE_TAG) == baseline
                and (seeds is None or c.tags.get(SEED_TAG) in seeds)]  # fmt: skip
    table = build_table(children, reference, cells)
    if fmt == "csv":
        return csv_text(table, list(METRICS))
    return markdown(table, list(METRICS), diff_metrics=CHART_METRICS)


def render(records: Sequence[RunRecord], fmt: str) -> str:
    sections = build_sections(records)
    if fmt == "csv":
        return _csv(records, sections)
    labels = [f"{r.name or '(unnamed)'} ({r.run_id[:8]})" for r in records]
    return (_markdown if fmt == "markdown" else _table)(labels, sections)


def build_sections(records: Sequence[RunRecord]) -> list[Section]:
    def metric_rows(keys: Sequence[str]) -> tuple[Row, ...]:
        return tuple(Row(k, tuple(r.metrics.get(k) for r in records)) for k in keys)

    logged = set().union(*(r.metrics for r in records))
    temperatures = sorted(
        (k for k in logged if k.startswith(("train/temperature", "train/logit_scale"))),
        key=lambda k: (not k.startswith("train/temperature"), k),
    )
    evaluation = sorted((k for k in logged if k.startswith(metric_keys.EVAL_PREFIX)), key=_eval_order)
    run = (
        Row("status", tuple(r.status for r in records)),
        Row("started (UTC)", tuple(_started(r.start_time) for r in records)),
        Row("last step", tuple(r.last_step for r in records)),
    )
    health = (
        Row("memory bank on at (forward pass)", tuple(_bank_on(r.health) for r in records)),
        Row("failed health checks", tuple(_failed_checks(r) for r in records)),
    )
    sections = [
        Section("run", "run", run),
        _param_section(records),
        Section("losses", "final losses", metric_rows([k for k in LOSSES if k in logged])),
        Section("temperatures", "temperatures and logit scales", metric_rows(temperatures)),
        Section("health", "health", tuple(row for row in health if any(v is not None for v in row.values))),
        Section("eval", "evaluation", metric_rows(evaluation)),
    ]
    # The params section stays when empty: "all N equal" is worth saying.
    return [s for s in sections if s.rows or s.key == "params"]


def _param_section(records: Sequence[RunRecord]) -> Section:
    keys = sorted(set().union(*(r.params for r in records)))
    differ = [k for k in keys if len({r.params.get(k) for r in records}) > 1]
    title = (
        f"params that differ ({len(differ)} of {len(keys)})" if differ else f"params: all {len(keys)} equal"
    )
    return Section("params", title, tuple(Row(k, tuple(r.params.get(k) for r in records)) for k in differ))


def _eval_order(key: str) -> tuple:
    # "eval.frame_auc" (the fine-tuned model's, the headline) first, then model by model.
    parts = metric_keys.split_evaluation(key)
    if parts is None:
        return (0, key)
    model, metric = parts
    return (1, model, EVAL_FIRST.get(metric, len(EVAL_FIRST)), metric)


def _started(ms: int | None) -> str | None:
    return None if ms is None else datetime.fromtimestamp(ms / 1000, tz=UTC).strftime("%Y-%m-%d %H:%M:%S")


def _bank_on(health: dict | None) -> object:
    """Forward pass at which the memory bank switched on, "never", or "disabled" (size 0)."""
    check = (health or {}).get("memory_bank_enabled_at")
    if not isinstance(check, dict):
        return None
    if check.get("value") is not None:
        return check["value"]
    return "disabled" if "disabled" in str(check.get("note", "")) else "never"


def _failed_checks(record: RunRecord) -> str | None:
    # The health.<check>.passed tags; a run without them (older, or still training) has its artefact.
    failed = metric_keys.failed_health_checks(record.tags)
    if failed is None and record.health:
        failed = sorted(name for name, check in record.health.items() if not check.get("passed"))
    if failed is None:
        return None
    return ", ".join(failed) or "none"


# --- renderers -------------------------------------------------------------------


def _cell(value: object, escape: Callable[[str], str] = str) -> str:
    if value is None:
        return MISSING
    if isinstance(value, float):
        return f"{value:.4f}"
    text = str(value)
    return escape(text if len(text) <= MAX_CELL else text[: MAX_CELL - 3] + "...")


def _table(labels: list[str], sections: list[Section]) -> str:
    body: list[list[str]] = []
    for section in sections:
        body.append([section.title])
        body.extend([f"  {row.label}", *(_cell(v) for v in row.values)] for row in section.rows)
    widths = [
        max(len(line[i]) for line in [["", *labels], *body] if len(line) > i) for i in range(1 + len(labels))
    ]
    out = []
    for line in [["", *labels], *body]:
        if len(line) == 1:  # a section heading spans the row
            out.append(line[0])
            continue
        cells = [line[0].ljust(widths[0]), *(c.rjust(w) for c, w in zip(line[1:], widths[1:], strict=True))]
        out.append("  ".join(cells).rstrip())
    return "\n".join(out) + "\n"


def _markdown(labels: list[str], sections: list[Section]) -> str:
    def md(text: str) -> str:
        return text.replace("|", "\\|")

    blank = [""] * len(labels)
    lines = [["", *map(md, labels)], ["---", *["---:"] * len(labels)]]
    for section in sections:
        lines.append([f"**{md(section.title)}**", *blank])
        lines.extend([md(row.label), *(_cell(v, md) for v in row.values)] for row in section.rows)
    return "".join("| " + " | ".join(line) + " |\n" for line in lines)


def _csv(records: Sequence[RunRecord], sections: list[Section]) -> str:
    def raw(value: object) -> object:
        # Full precision and no cutting: CSV is for scripts, not eyes.
        return "" if value is None else repr(value) if isinstance(value, float) else value

    buf = io.StringIO()
    writer = csv.writer(buf, lineterminator="\n")
    writer.writerow(["section", "field", *(r.run_id for r in records)])
    writer.writerow(["run", "name", *(r.name for r in records)])
    for section in sections:
        writer.writerows([section.key, row.label, *map(raw, row.values)] for row in section.rows)
    return buf.getvalue()
