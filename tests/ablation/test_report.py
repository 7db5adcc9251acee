"""The report from child runs: which runs count, the files, the chart."""

from __future__ import annotations

import csv
import io
from pathlib import Path

import numpy as np
import pytest

from fgclip.ablation.report import METRICS, REPORT_FILES, build_table, seed_runs, write_report
from fgclip.train.tracking import CELL_TAG, EXPERIMENT_TAG, SEED_TAG, RunRecord


def _run(run_id: str, cell: str | None, seed: int | None, auc: float, start: int = 0, **extra) -> RunRecord:
    tags = {} if cell is None else {CELL_TAG: cell, SEED_TAG: str(seed), EXPERIMENT_TAG: f"x-{cell}-s{seed}"}
    metrics = {"eval.finetuned.frame_auc": auc, "train/loss": 1.0 - auc, **extra}
    return RunRecord(run_id=run_id, name=run_id, status="FINISHED", start_time=start, params={},
                     metrics=metrics, last_step=None, health=None, tags=tags)  # fmt: skip


def test_runs_without_their_tags_are_left_out_and_a_rerun_replaces_its_older_run():
    children = [_run("a0", "ref", 0, 0.60), _run("a1", "ref", 1, 0.62), _run("b0", "new", 0, 0.70, start=1),
                _run("b0-again", "new", 0, 0.75, start=5), _run("b1", "new", 1, 0.71), _run("stray", None, None, 0.1)]  # fmt: skip
    assert len(seed_runs(children)) == 5
    table = build_table(children, "ref", ["ref", "new"])
    assert list(table) == ["ref", "new"]
    new = table["new"]["frame_auc"]
    assert new.n == 2
    assert new.mean == pytest.approx(np.mean([0.75, 0.71]))
    assert new.std == pytest.approx(np.std([0.75, 0.71], ddof=1))
    assert new.diff == pytest.approx(np.mean([0.75 - 0.60, 0.71 - 0.62]))
    assert table["ref"]["region_top1"].mean is None  # a metric no run reported


def test_write_report_writes_every_file_and_runs_csv_names_each_run(tmp_path: Path):
    children = [_run(f"r{c}{s}", c, s, 0.6 + 0.1 * (c == "b") + 0.01 * s) for c in "ab" for s in range(3)]
    table = build_table(children, "a")
    files = write_report(tmp_path / "out", "x", table, children)
    assert [f.name for f in files] == list(REPORT_FILES)
    assert all(f.is_file() and f.stat().st_size > 0 for f in files)
    assert (tmp_path / "out" / "bars.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    rows = list(csv.DictReader(io.StringIO((tmp_path / "out" / "runs.csv").read_text())))
    assert [r["mlflow_run_id"] for r in rows] == [c.run_id for c in children]
    assert float(rows[3]["frame_auc"]) == pytest.approx(0.7)
    assert set(METRICS) <= set(rows[0])
    md = (tmp_path / "out" / "table.md").read_text()
    assert "| b | 3 | 0.7100 ± 0.0100 |" in md
    assert "\\toprule" in (tmp_path / "out" / "table.tex").read_text()


def test_runs_csv_names_each_run_s_experiment():
    from fgclip.ablation.report import runs_csv

    rows = list(csv.DictReader(io.StringIO(runs_csv([_run("r1", "a", 0, 0.5)]))))
    assert (rows[0]["dvc_experiment"], rows[0]["cell"], rows[0]["seed"]) == ("x-a-s0", "a", "0")
