"""The ablation table against the statistics computed directly from the runs."""

from __future__ import annotations

import csv
import io
import math

import numpy as np
import pytest
from scipy import stats

from fgclip.ablation.table import AblationTableError, SeedRun, csv_text, latex, markdown, summarise

AUC = {("global only", 0): 0.70, ("global only", 1): 0.74, ("global only", 2): 0.71,
       ("+ region_loss", 0): 0.78, ("+ region_loss", 1): 0.77, ("+ region_loss", 2): 0.81}  # fmt: skip


def _records(extra: dict | None = None) -> list[SeedRun]:
    out = []
    for (cell, seed), auc in AUC.items():
        metrics = {"frame_auc": auc, "region_top1": None if cell == "global only" else 0.5 + seed / 10}
        out.append(SeedRun(cell, seed, {**metrics, **(extra or {})}))
    return out


def test_mean_std_and_paired_test_over_seeds():
    table = summarise(_records(), ["frame_auc", "region_top1"], reference="global only")
    ref, cell = np.array([0.70, 0.74, 0.71]), np.array([0.78, 0.77, 0.81])
    f = table["+ region_loss"]["frame_auc"]
    assert f.n == 3 and f.mean == pytest.approx(cell.mean()) and f.std == pytest.approx(cell.std(ddof=1))
    assert f.diff == pytest.approx((cell - ref).mean())
    assert f.p_value == pytest.approx(stats.ttest_rel(cell, ref).pvalue)
    # By hand too: t = mean(d) / (sd(d) / sqrt(n)), two-sided, n - 1 degrees of freedom.
    d = cell - ref
    t = d.mean() / (d.std(ddof=1) / math.sqrt(3))
    assert f.p_value == pytest.approx(2 * stats.t.sf(abs(t), 2))
    assert table["global only"]["frame_auc"].diff is None  # the reference itself
    # A metric the reference never reported has no difference; its own figures stand.
    region = table["+ region_loss"]["region_top1"]
    assert region.mean == pytest.approx(0.6) and region.diff is None and region.pairs == 0
    assert table["global only"]["region_top1"].n == 0 and table["global only"]["region_top1"].mean is None


def test_writers_carry_the_same_figures():
    metrics = ["frame_auc", "region_top1"]
    table = summarise(_records(), metrics, reference="global only")
    md = markdown(table, metrics)
    assert "| + region_loss | 3 | 0.7867 ± 0.0208 | 0.6000 ± 0.1000 | +0.0700 (p=" in md
    assert "| global only | 3 | 0.7167 ± 0.0208 | n/a |" in md
    tex = latex(table, metrics)
    assert tex.startswith(r"\begin{tabular}{lccc}") and r"\toprule" in tex and r"\bottomrule" in tex
    assert r"+ region\_loss & 3 & 0.7867 $\pm$ 0.0208" in tex and r"frame\_auc" in tex
    rows = list(csv.DictReader(io.StringIO(csv_text(table, metrics))))
    row = next(r for r in rows if r["cell"] == "+ region_loss" and r["metric"] == "frame_auc")
    assert float(row["mean"]) == table["+ region_loss"]["frame_auc"].mean and row["pairs"] == "3"


def test_one_seed_has_no_spread_and_identical_differences_no_p_value():
    records = [SeedRun("a", 0, {"m": 0.5}), SeedRun("b", 0, {"m": 0.6}),
               SeedRun("a", 1, {"m": 0.4}), SeedRun("b", 1, {"m": 0.5})]  # fmt: skip
    table = summarise(records, ["m"], reference="a")
    assert table["b"]["m"].diff == pytest.approx(0.1) and table["b"]["m"].p_value is None  # d = 0.1, 0.1
    single = summarise(records[:2], ["m"], reference="a")
    assert single["b"]["m"].std is None and single["b"]["m"].p_value is None


def test_bad_runs_are_one_line_errors():
    with pytest.raises(AblationTableError, match="no runs of the reference cell 'nope'"):
        summarise(_records(), ["frame_auc"], reference="nope")
    with pytest.raises(AblationTableError, match="cell 'a' has seed 0 twice"):
        summarise([SeedRun("a", 0, {}), SeedRun("a", 0, {})], ["frame_auc"], reference="a")


def test_the_csv_reads_back_to_the_same_table():
    from fgclip.ablation.table import read_csv_text

    metrics = ["frame_auc", "region_top1"]
    table = summarise(_records(), metrics, "global only")
    assert read_csv_text(csv_text(table, metrics)) == table  # repr() of a float reads back exactly
