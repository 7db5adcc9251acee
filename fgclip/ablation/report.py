"""An ablation's report from its MLflow child runs: the table as Markdown, LaTeX and CSV,
every run's own figures (``runs.csv``, each row an MLflow run id) and a bar chart.

The figures are read from MLflow, not from DVC's metrics files, so every number
of the table traces to a child run of the ablation's parent run.
"""

from __future__ import annotations

import csv
import io
import logging
from collections.abc import Mapping, Sequence
from pathlib import Path

from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure as MplFigure

from fgclip.ablation.table import Figure, SeedRun, csv_text, latex, markdown, read_csv_text, summarise
from fgclip.atomic import atomic_path, write_text_atomic
from fgclip.metric_keys import FINETUNED, evaluation
from fgclip.train.tracking import CELL_TAG, EXPERIMENT_TAG, SEED_TAG, RunRecord

logger = logging.getLogger(__name__)

# Table column <- MLflow metric of the child run (its value at the last step logged).
METRICS: dict[str, str] = {
    "frame_auc": evaluation(FINETUNED, "frame_auc"),
    "frame_ap": evaluation(FINETUNED, "frame_ap"),
    "region_top1": evaluation(FINETUNED, "region_top1"),
    "hardneg_acc": evaluation(FINETUNED, "hardneg_accuracy"),
    "cap2vid_r1": evaluation(FINETUNED, "retrieval_r1"),
    "loss": "train/loss",
    "loss_global": "train/loss_global",
    "loss_region": "train/loss_region",
    "loss_hardneg": "train/loss_hardneg",
    "temp_global": "train/temperature",
    "temp_region": "train/temperature_region",
}
# The bar chart: the evaluation figures, on one 0-1 axis each.
CHART_METRICS = ("frame_auc", "frame_ap", "region_top1", "hardneg_acc", "cap2vid_r1")
# The README's table of an ablation (README_BLOCK markers around it): fewer columns, 3 digits.
README_METRICS = ("frame_auc", "frame_ap", "region_top1", "hardneg_acc", "cap2vid_r1", "loss_region",
                  "temp_global", "temp_region")  # fmt: skip
README_DIFFS = ("frame_auc", "region_top1", "hardneg_acc")
REPORT_FILES = ("table.md", "table.tex", "table.csv", "runs.csv", "bars.png")


def seed_runs(children: Sequence[RunRecord]) -> list[SeedRun]:
    """The children as table input; a run without its cell and seed tags is left out, with a warning."""
    out = []
    for run in children:
        cell, seed = run.tags.get(CELL_TAG), run.tags.get(SEED_TAG)
        if cell is None or seed is None or not seed.lstrip("-").isdigit():
            logger.warning("MLflow run %s has no %s / %s tags: left out of the table", run.run_id, CELL_TAG, SEED_TAG)
            continue
        if run.status != "FINISHED":
            logger.warning("MLflow run %s (%s, seed %s) is %s", run.run_id, cell, seed, run.status)
        out.append(SeedRun(cell, int(seed), {col: run.metrics.get(key) for col, key in METRICS.items()}))
    return out


def build_table(children: Sequence[RunRecord], reference: str, cells: Sequence[str] | None = None):
    """``{cell: {metric: Figure}}`` with cells in ``cells``' order when given."""
    # A (cell, seed) adopted twice (an experiment removed and run again): its newest run counts.
    newest = {(r.cell, r.seed): r for r in seed_runs(sorted(children, key=lambda c: c.start_time or 0))}
    runs = list(newest.values())
    if cells is not None:
        order = {c: i for i, c in enumerate(cells)}
        runs = sorted((r for r in runs if r.cell in order), key=lambda r: (order[r.cell], r.seed))
    return summarise(runs, list(METRICS), reference)


def runs_csv(children: Sequence[RunRecord]) -> str:
    buf = io.StringIO()
    writer = csv.writer(buf, lineterminator="\n")
    writer.writerow(["cell", "seed", "dvc_experiment", "mlflow_run_id", *METRICS])
    for run in children:
        writer.writerow([run.tags.get(CELL_TAG, ""), run.tags.get(SEED_TAG, ""), run.tags.get(EXPERIMENT_TAG, ""),
                         run.run_id, *("" if run.metrics.get(k) is None else repr(run.metrics[k])
                                       for k in METRICS.values())])  # fmt: skip
    return buf.getvalue()


def write_bar_chart(path: Path, table: Mapping[str, Mapping[str, Figure]], title: str) -> None:
    """One panel per evaluation metric: each cell's mean over seeds, the std as its error bar."""
    fig = MplFigure(figsize=(3.2 * len(CHART_METRICS), 3.8), dpi=100)
    FigureCanvasAgg(fig)
    cells = list(table)
    for i, metric in enumerate(CHART_METRICS):
        ax = fig.add_subplot(1, len(CHART_METRICS), i + 1)
        means = [table[c][metric].mean for c in cells]
        stds = [table[c][metric].std or 0.0 for c in cells]
        ax.bar(range(len(cells)), [0.0 if m is None else m for m in means], yerr=stds, capsize=3,
               color=[f"C{j}" for j in range(len(cells))])  # fmt: skip
        ax.set_xticks(range(len(cells)), cells, rotation=45, ha="right", fontsize=8)
        ax.set_ylim(0, 1.05)
        ax.set_title(metric, fontsize=10)
    fig.suptitle(title)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png")


def write_report(out_dir: Path, name: str, table: Mapping[str, Mapping[str, Figure]],
                 children: Sequence[RunRecord]) -> list[Path]:  # fmt: skip
    """The report files under ``out_dir``; returns their paths."""
    out_dir.mkdir(parents=True, exist_ok=True)
    metrics = list(METRICS)
    texts = {"table.md": markdown(table, metrics, diff_metrics=CHART_METRICS), "table.tex": latex(table, metrics),
             "table.csv": csv_text(table, metrics), "runs.csv": runs_csv(children)}  # fmt: skip
    for file, text in texts.items():
        write_text_atomic(out_dir / file, text)
    seeds = max((f.n for figs in table.values() for f in figs.values()), default=0)
    write_bar_chart(out_dir / "bars.png", table, f"ablation {name}: mean ± std over {seeds} seeds")
    return [out_dir / f for f in REPORT_FILES]


def readme_table(table_csv: str) -> str:
    """The README's Markdown table from a report's ``table.csv``: a test keeps the two equal."""
    return markdown(read_csv_text(table_csv), README_METRICS, digits=3, diff_metrics=README_DIFFS)
