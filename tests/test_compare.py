"""`fgclip compare` against a real sqlite MLflow store filled through the project's Tracker."""

from __future__ import annotations

import csv
import io
import json
import re
from pathlib import Path

import pytest
from mlflow import MlflowClient

from fgclip.cli import build_parser, main
from fgclip.compare import compare, render
from fgclip.config import Params
from fgclip.train.tracking import Tracker, TrackingReadError, flatten_params, log_to_run, read_runs

EXPERIMENT = "compare-tests"
LOSS = {
    "new": [(1.40, 0.50, 1.80), (1.10, 0.30, 1.60), (0.90, 0.20, 1.40)],
    "old-settings": [(1.50, 0.60, 1.38), (1.45, 0.55, 1.37), (1.40, 0.50, 1.36)],
}
SCALE = {"new": (4.6052, 4.6052), "old-settings": (2.6592, 2.6592)}
EVAL = {
    "new": {"eval.frame_auc": 0.8351, "eval.finetuned.frame_auc": 0.8351, "eval.finetuned.auc_Arson": 0.9288,
            "eval.finetuned.region_top1": 0.625, "eval.untrained.frame_auc": 0.6158},
    "old-settings": {"eval.frame_auc": 0.8226, "eval.finetuned.frame_auc": 0.8226,
                     "eval.finetuned.auc_Arson": 0.9097, "eval.finetuned.region_top1": 0.5,
                     "eval.untrained.frame_auc": 0.6158},
}  # fmt: skip
BANK = {
    "new": {"value": 50, "threshold": 50, "passed": True},
    "old-settings": {"value": None, "threshold": 400, "passed": False, "note": "the bank never switched on"},
}


def _log_run(params: Params, name: str, tmp: Path) -> str:
    """A run shaped like the training loop's: all params, per-step metrics, health artefact, eval."""
    health = tmp / name / "health.json"
    health.parent.mkdir(parents=True)
    health.write_text(json.dumps({"passed": False, "checks": {"memory_bank_enabled_at": BANK[name]}}))
    with Tracker(params, name) as tracker:
        tracker.log_params(flatten_params(params))
        for step, (loss, loss_global, loss_region) in enumerate(LOSS[name], start=1):
            scale_global, scale_region = SCALE[name]
            tracker.log_metrics({"train/loss": loss, "train/loss_global": loss_global,
                                 "train/loss_region": loss_region, "train/logit_scale": scale_global,
                                 "train/temperature": 2.718281828459045**scale_global,
                                 "train/temperature_region": 2.718281828459045**scale_region,
                                 "train/lr": 1e-4}, step=step)  # fmt: skip
        tracker.log_health({"memory_bank_enabled_at": BANK[name], "finite": {"passed": True, "value": 0}}, health)
        run_id = tracker.run_id
    log_to_run(params.tracking_uri, run_id, EVAL[name])
    return run_id


@pytest.fixture(scope="module")
def store(tmp_path_factory: pytest.TempPathFactory) -> dict:
    """Two runs differing in the temperature and memory-bank settings, oldest ("new") first."""
    tmp = tmp_path_factory.mktemp("compare")
    uri = f"sqlite:///{tmp / 'mlflow.db'}"
    base = Params(base_dir=tmp).with_overrides(tracking={"uri": uri, "experiment": EXPERIMENT})
    old = base.with_overrides(
        model={"logit_scale_init_value": 2.6592},
        train={"memory_bank_warmup_steps": 400, "run_name": "old-settings"},
    )
    ids = {"new": _log_run(base, "new", tmp), "old-settings": _log_run(old, "old-settings", tmp)}
    params_file = tmp / "params.yaml"
    params_file.write_text(f"tracking:\n  uri: {uri}\n  experiment: {EXPERIMENT}\n")
    return {"params": base, "ids": ids, "uri": uri, "params_file": params_file, "tmp": tmp}


def _csv(text: str) -> tuple[list[str], dict[tuple[str, str], list[str]]]:
    rows = list(csv.reader(io.StringIO(text)))
    return rows[0], {(r[0], r[1]): r[2:] for r in rows[1:]}


def test_differing_params_shown_and_equal_ones_hidden(store) -> None:
    header, rows = _csv(compare(store["params"], fmt="csv"))
    assert header == ["section", "field", store["ids"]["new"], store["ids"]["old-settings"]]
    params = {field: values for (section, field), values in rows.items() if section == "params"}
    assert params == {
        "model.logit_scale_init_value": [json.dumps(store["params"].model.logit_scale_init_value), "2.6592"],
        "train.memory_bank_warmup_steps": ["50", "400"],
        "train.run_name": [store["params"].train.run_name, "old-settings"],
    }
    table = compare(store["params"])
    assert f"params that differ (3 of {len(flatten_params(store['params']))})" in table
    assert "train.lr" not in table and "model.image_size" not in table


def test_values_are_the_last_logged_ones(store) -> None:
    _, rows = _csv(compare(store["params"], fmt="csv"))
    assert rows[("run", "name")] == ["new", "old-settings"]
    assert rows[("run", "status")] == ["FINISHED", "FINISHED"]
    assert rows[("run", "last step")] == ["3", "3"]
    for i, key in enumerate(("train/loss", "train/loss_global", "train/loss_region")):
        assert [float(v) for v in rows[("losses", key)]] == [LOSS["new"][-1][i], LOSS["old-settings"][-1][i]]
    temperature = [float(v) for v in rows[("temperatures", "train/temperature")]]
    assert temperature == pytest.approx([100.0, 14.2848], rel=1e-4)
    assert ("temperatures", "train/logit_scale") in rows and ("temperatures", "train/lr") not in rows
    assert rows[("health", "memory bank on at (forward pass)")] == ["50", "never"]
    assert rows[("health", "failed health checks")] == ["none", "memory_bank_enabled_at"]
    for key in EVAL["new"]:
        assert [float(v) for v in rows[("eval", key)]] == [EVAL["new"][key], EVAL["old-settings"][key]]
    # The headline AUC leads the evaluation block; each model's headline metrics lead its per-class AUCs.
    eval_keys = [field for section, field in rows if section == "eval"]
    assert eval_keys == [
        "eval.frame_auc", "eval.finetuned.frame_auc", "eval.finetuned.region_top1", "eval.finetuned.auc_Arson",
        "eval.untrained.frame_auc",
    ]  # fmt: skip


def test_markdown_is_a_well_formed_table(store) -> None:
    lines = compare(store["params"], fmt="markdown").splitlines()
    cells = [[c.strip() for c in re.split(r"(?<!\\)\|", line)[1:-1]] for line in lines]
    assert all(line.startswith("| ") and line.endswith(" |") for line in lines)
    assert {len(row) for row in cells} == {3}
    ids = store["ids"]
    assert cells[0] == ["", f"new ({ids['new'][:8]})", f"old-settings ({ids['old-settings'][:8]})"]
    assert all(re.fullmatch(r"-{3,}:?", c) for c in cells[1])
    by_label = {row[0]: row[1:] for row in cells[2:]}
    assert by_label["train/loss_region"] == ["1.4000", "1.3600"]
    assert by_label["eval.frame_auc"] == ["0.8351", "0.8226"]
    assert "**final losses**" in by_label and "**evaluation**" in by_label


def test_plain_table_columns_line_up(store) -> None:
    lines = compare(store["params"]).splitlines()
    header, value_lines = lines[0], [line for line in lines[1:] if line.startswith("  ")]
    assert "new (" in header and "old-settings (" in header
    # Values are right-aligned under their run's label: every value row ends where the header ends.
    assert {len(line) for line in value_lines} == {len(header)}
    assert any(line.split()[-2:] == ["4.6052", "2.6592"] for line in value_lines)


def test_selection_by_name_prefix_and_order(store) -> None:
    uri, ids = store["uri"], store["ids"]
    picked = read_runs(uri, EXPERIMENT, ["old-settings", ids["new"][:6]])
    assert [r.run_id for r in picked] == [ids["old-settings"], ids["new"]]
    assert [r.run_id for r in read_runs(uri, EXPERIMENT, last=1)] == [ids["old-settings"]]
    with pytest.raises(TrackingReadError, match=r"run 'nope' .* 'compare-tests' of sqlite:///"):
        read_runs(uri, EXPERIMENT, ["nope"])


def test_a_name_picks_the_newest_run_of_that_name(store) -> None:
    params = store["params"].with_overrides(tracking={"experiment": "same-name"})
    with Tracker(params, "retrained") as first:
        first.log_metrics({"train/loss": 2.0}, step=1)
    with Tracker(params, "retrained") as second:
        second.log_metrics({"train/loss": 1.0}, step=1)
    picked = read_runs(store["uri"], "same-name", ["retrained"])
    assert [r.run_id for r in picked] == [second.run_id] and picked[0].metrics == {"train/loss": 1.0}
    # Without a health artefact or health metrics the health rows are left out, not guessed.
    assert "memory bank" not in render(picked, "table")


def test_missing_database_is_an_error_and_is_not_created(tmp_path: Path) -> None:
    db = tmp_path / "nowhere" / "mlflow.db"
    with pytest.raises(TrackingReadError, match=f"no MLflow database at {re.escape(str(db))}"):
        read_runs(f"sqlite:///{db}", EXPERIMENT)
    assert not db.parent.exists()


def test_unknown_and_empty_experiments_are_errors(store) -> None:
    uri = store["uri"]
    with pytest.raises(TrackingReadError, match=rf"experiment 'nope' not found in {re.escape(uri)}"):
        read_runs(uri, "nope")
    MlflowClient(tracking_uri=uri).create_experiment("empty")
    with pytest.raises(TrackingReadError, match=rf"experiment 'empty' in {re.escape(uri)} has no runs"):
        read_runs(uri, "empty")


def test_cli_prints_writes_and_fails_cleanly(store, tmp_path: Path, capsys) -> None:
    params_file = str(store["params_file"])
    assert main(["compare", "--params", params_file, "--format", "csv"]) == 0
    header, _ = _csv(capsys.readouterr().out)
    assert header[2:] == [store["ids"]["new"], store["ids"]["old-settings"]]

    out = tmp_path / "reports" / "runs.md"
    assert main(["compare", "--params", params_file, "--runs", "old-settings", "--format", "markdown",
                 "--out", str(out)]) == 0  # fmt: skip
    assert capsys.readouterr().out == ""
    assert out.read_text().splitlines()[0].startswith("|  | old-settings (")

    assert main(["compare", "--params", params_file, "--experiment", "nope"]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith(
        f"fgclip compare: error: experiment 'nope' not found in {store['uri']} (experiments: "
    )
    with pytest.raises(SystemExit) as exc:
        build_parser().parse_args(["compare", "--format", "html"])
    assert exc.value.code == 2
