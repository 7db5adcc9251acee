"""The ablation table: each cell's metrics over seeds, against a reference cell.

Input is one record per finished run, ``(cell, seed, {metric: value})``, as the MLflow
child runs of an ablation hold them. Per cell and metric: the number of seeds, the mean
and the sample standard deviation (``ddof=1``; none with a single seed). Against the
reference cell, over the seeds both cells ran: the mean paired difference and the
two-sided paired t-test's p-value (``scipy.stats.ttest_rel``): seeds pair the runs,
since one seed fixes the data order and the initial weights of both.

Written as Markdown, LaTeX (booktabs) and CSV. A metric a run did not report (a
region metric when region metrics were skipped) is left out of that cell's figures,
and the seed count says how many remain.
"""

from __future__ import annotations

import csv
import io
import math
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass

import numpy as np
from scipy import stats

from fgclip.errors import FGClipError


class AblationTableError(FGClipError, ValueError):
    """Runs that cannot make a table: no reference cell, a seed twice in a cell."""


@dataclass(frozen=True)
class SeedRun:
    cell: str
    seed: int
    metrics: Mapping[str, float | None]


@dataclass(frozen=True)
class Figure:
    """One cell's one metric."""

    n: int
    mean: float | None
    std: float | None  # None with fewer than two seeds
    diff: float | None  # mean paired difference to the reference (None for the reference itself)
    p_value: float | None  # paired t-test; None with fewer than two pairs or no variation at all
    pairs: int


def _finite(value) -> bool:
    return value is not None and isinstance(value, (int, float)) and math.isfinite(value)


def summarise(
    records: Iterable[SeedRun], metrics: Sequence[str], reference: str
) -> dict[str, dict[str, Figure]]:
    """``{cell: {metric: Figure}}`` in the order cells first appear."""
    by_cell: dict[str, dict[int, Mapping[str, float | None]]] = {}
    for r in records:
        cell = by_cell.setdefault(r.cell, {})
        if r.seed in cell:
            raise AblationTableError(f"cell {r.cell!r} has seed {r.seed} twice")
        cell[r.seed] = r.metrics
    if reference not in by_cell:
        raise AblationTableError(f"no runs of the reference cell {reference!r} (cells: {', '.join(by_cell)})")
    out: dict[str, dict[str, Figure]] = {}
    for cell, runs in by_cell.items():
        out[cell] = {}
        for metric in metrics:
            values = {seed: m[metric] for seed, m in runs.items() if _finite(m.get(metric))}
            arr = np.array(list(values.values()), dtype=np.float64)
            ref = {s: m[metric] for s, m in by_cell[reference].items() if _finite(m.get(metric))}
            common = sorted(set(values) & set(ref))
            diff = p_value = None
            if cell != reference and common:
                d = np.array([values[s] - ref[s] for s in common])
                diff = float(d.mean())
                if len(common) >= 2 and np.ptp(d) > 0:
                    p_value = float(stats.ttest_rel([values[s] for s in common], [ref[s] for s in common]).pvalue)
            out[cell][metric] = Figure(
                n=len(arr),
                mean=float(arr.mean()) if len(arr) else None,
                std=float(arr.std(ddof=1)) if len(arr) >= 2 else None,
                diff=diff,
                p_value=p_value,
                pairs=len(common) if cell != reference else 0,
            )
    return out


def _cell(f: Figure, digits: int, pm: str) -> str:
    if f.mean is None:
        return "n/a"
    text = f"{f.mean:.{digits}f}"
    if f.std is not None:
        text += f" {pm} {f.std:.{digits}f}"
    return text


def _diff(f: Figure, digits: int) -> str:
    if f.diff is None:
        return ""
    text = f"{f.diff:+.{digits}f}"
    return text + (f" (p={f.p_value:.2g})" if f.p_value is not None else "")


def markdown(table: Mapping[str, Mapping[str, Figure]], metrics: Sequence[str], digits: int = 4,
             diff_metrics: Sequence[str] | None = None) -> str:  # fmt: skip
    """One row per cell: ``mean ± std`` per metric, then its difference to the reference
    for each of ``diff_metrics`` (default: every metric)."""
    diffs = list(metrics if diff_metrics is None else diff_metrics)
    header = ["cell", "seeds", *metrics, *(f"Δ {m}" for m in diffs)]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for cell, figures in table.items():
        seeds = max((f.n for f in figures.values()), default=0)
        row = [cell, str(seeds), *(_cell(figures[m], digits, "±") for m in metrics),
               *(_diff(figures[m], digits) for m in diffs)]  # fmt: skip
        lines.append("| " + " | ".join(row) + " |")
    return "\n".join(lines) + "\n"


_LATEX_SPECIAL = {"\\": r"\textbackslash{}", "&": r"\&", "%": r"\%", "$": r"\$", "#": r"\#",
                  "_": r"\_", "{": r"\{", "}": r"\}", "~": r"\textasciitilde{}", "^": r"\textasciicircum{}"}  # fmt: skip


def latex_escape(text: str) -> str:
    return "".join(_LATEX_SPECIAL.get(c, c) for c in text)


def latex(table: Mapping[str, Mapping[str, Figure]], metrics: Sequence[str], digits: int = 4) -> str:
    """A booktabs ``tabular``: ``mean $\\pm$ std`` per metric (differences are in the CSV)."""
    cols = "l" + "c" * (len(metrics) + 1)
    lines = [rf"\begin{{tabular}}{{{cols}}}", r"\toprule",
             " & ".join(["cell", "seeds", *(latex_escape(m) for m in metrics)]) + r" \\", r"\midrule"]  # fmt: skip
    for cell, figures in table.items():
        seeds = max((f.n for f in figures.values()), default=0)
        row = [latex_escape(cell), str(seeds), *(_cell(figures[m], digits, r"$\pm$") for m in metrics)]
        lines.append(" & ".join(row) + r" \\")
    lines += [r"\bottomrule", r"\end{tabular}"]
    return "\n".join(lines) + "\n"


def csv_text(table: Mapping[str, Mapping[str, Figure]], metrics: Sequence[str]) -> str:
    """One row per (cell, metric), every figure at full precision."""
    buf = io.StringIO()
    writer = csv.writer(buf, lineterminator="\n")
    writer.writerow(["cell", "metric", "seeds", "mean", "std", "diff", "p_value", "pairs"])
    for cell, figures in table.items():
        for metric in metrics:
            f = figures[metric]
            writer.writerow([cell, metric, f.n, *("" if v is None else repr(v) for v in
                                                  (f.mean, f.std, f.diff, f.p_value)), f.pairs])  # fmt: skip
    return buf.getvalue()


def read_csv_text(text: str) -> dict[str, dict[str, Figure]]:
    """The table back from :func:`csv_text`'s output (cells and metrics in file order)."""
    def number(value: str) -> float | None:
        return float(value) if value else None

    out: dict[str, dict[str, Figure]] = {}
    for row in csv.DictReader(io.StringIO(text)):
        out.setdefault(row["cell"], {})[row["metric"]] = Figure(
            n=int(row["seeds"]), mean=number(row["mean"]), std=number(row["std"]), diff=number(row["diff"]),
            p_value=number(row["p_value"]), pairs=int(row["pairs"]))  # fmt: skip
    return out
