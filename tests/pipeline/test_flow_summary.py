"""The flow's run summary artefact, its retry condition, and its params check, without a Prefect server.

The metrics below have the structure of a real run's metrics/train.json,
metrics/health.json and metrics/eval.json (trimmed to the fields the summary reads
and a few it ignores).
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import yaml
from prefect.states import Failed

from fgclip.config import ParamsError, load_params
from fgclip.errors import FGClipError
from pipeline.flow import ARTIFACT_KEY, fgclip_pipeline, retry_wanted, stage_task
from pipeline.run_summary import read_run_metrics, summary_markdown
from pipeline.stages import PermanentStageError, StageFailed

REPO = Path(__file__).resolve().parents[2]
RUN_ID = "226dee4c2ab740e495d7fcc15bfa9cb1"

CHECKS = {
    "logit_scale_init": {
        "value": {"global": 4.605199813842773, "region": 4.605199813842773, "hardneg": 4.605199813842773},
        "threshold": 4.6052,
        "passed": True,
        "step": 0,
        "note": "re-initialised",
    },
    "memory_bank_enabled_at": {"value": 50, "threshold": 50, "passed": True},
    "finite": {"value": 0, "threshold": 0, "passed": True, "step": 500},
    "region_loss": {"value": 0.6431522559374571, "threshold": 0.5, "passed": False, "action": "warn"},
}
TRAIN = {
    "steps": 500,
    "start_step": 0,
    "final": {
        "step": 500,
        "loss": 0.06126594543457031,
        "loss_global": 3.9476988604292274e-05,
        "loss_region": 0.11870801448822021,
        "loss_hardneg": 0.0037449204828590155,
    },
    "temperature_global": 97.96118820889038,
    "temperature_region": 100.00296282935913,
    "temperature_hardneg": 100.00296282935913,
    "run_id": RUN_ID,
    "experiment_id": "1",
    "tracking_uri": "sqlite:////work/clone/mlflow.db",
    "health_passed": True,
    "health": CHECKS,
}
HEALTH = {"passed": True, "checks": CHECKS}


def _model(auc: float, ap: float, top1: float, hardneg: float, r1: float) -> dict:
    return {
        "protocol": "full",
        "frame_auc": auc,
        "frame_ap": ap,
        "intervals": {"frame_auc": [auc - 0.1, auc + 0.05], "level": 0.95},
        "region_top1": top1,
        "hardneg_accuracy": hardneg,
        "retrieval_r1": r1,
        "retrieval_r5": 0.6875,
    }


EVAL = {
    "frame_auc": 0.8251,
    "finetuned": _model(0.8251, 0.7559, 0.75, 0.95, 0.1875),
    "pretrained": _model(0.7008, 0.577, 0.175, 0.0, 0.125),
    "untrained": _model(0.5105, 0.3841, 0.05, 0.025, 0.25),
}
METRICS = {"train": TRAIN, "health": HEALTH, "eval": EVAL}


def _rows(markdown: str) -> dict[str, list[str]]:
    """``{first cell: other cells}`` of every table row of ``markdown``."""
    rows = [line.strip("|").split(" | ") for line in markdown.splitlines() if line.startswith("| ")]
    return {cells[0].strip(): [c.strip() for c in cells[1:]] for cells in rows}


def test_summary_tables_the_key_metrics_of_each_model():
    markdown = summary_markdown(METRICS)
    assert "## Evaluation\n\n| metric | finetuned | pretrained | untrained |\n" in markdown
    rows = _rows(markdown)
    assert rows["frame AUC"] == ["0.8251", "0.7008", "0.5105"]
    assert rows["frame AP"] == ["0.7559", "0.577", "0.3841"]
    assert rows["region top-1"] == ["0.75", "0.175", "0.05"]
    assert rows["hard-negative accuracy"] == ["0.95", "0", "0.025"]
    assert rows["retrieval R@1"] == ["0.1875", "0.125", "0.25"]


def test_summary_tables_training_and_every_health_check():
    markdown = summary_markdown(METRICS)
    rows = _rows(markdown)
    assert rows["final loss"] == ["0.06127"] and rows["final loss (global)"] == ["3.948e-05"]
    assert rows["temperature (global)"] == ["97.96"] and rows["temperature (region)"] == ["100"]
    assert rows["logit_scale_init"] == ["yes", "global=4.605, region=4.605, hardneg=4.605", "4.605"]
    assert rows["region_loss"] == ["no", "0.6432", "0.5"]  # a warn gate: the run still passed
    assert "**Health**: passed, 3 of 4 checks passed (failed: region_loss)" in markdown
    assert "## Missing" not in markdown


def test_summary_links_a_sqlite_run_through_mlflow_ui():
    markdown = summary_markdown(METRICS)
    assert (
        f"**MLflow run** `{RUN_ID}` in `sqlite:////work/clone/mlflow.db`: start the UI with "
        "`mlflow ui --backend-store-uri sqlite:////work/clone/mlflow.db`, then open "
        f"http://127.0.0.1:5000/#/experiments/1/runs/{RUN_ID}?workflowType=machine_learning"
    ) in markdown


def test_mlflow_link_of_a_tracking_server_is_its_own_page():
    markdown = summary_markdown({"train": {**TRAIN, "tracking_uri": "http://10.0.0.5:5000"}})
    link = f"http://10.0.0.5:5000/#/experiments/1/runs/{RUN_ID}?workflowType=machine_learning"
    assert f"**MLflow run** `{RUN_ID}`: [{link}]({link})" in markdown


def test_missing_metrics_files_are_named_not_a_crash(tmp_path: Path):
    """A run whose training and evaluation did not write their files: the artefact says so."""
    shutil.copy2(REPO / "params.yaml", tmp_path / "params.yaml")
    paths = load_params(tmp_path / "params.yaml").paths
    paths.health.parent.mkdir(parents=True)
    paths.health.write_text(json.dumps(HEALTH))
    paths.eval_metrics.write_text("{not json")
    metrics, missing = read_run_metrics(paths)
    assert set(metrics) == {"health"}
    assert missing[0] == f"{paths.train_metrics} (train.metrics): not found"
    assert missing[1].startswith(f"{paths.eval_metrics} (evaluate.out): unreadable: ")
    markdown = summary_markdown(metrics, missing)
    assert "**MLflow run**: unknown (no run id in the training metrics)" in markdown
    assert "## Evaluation" not in markdown and "## Training" not in markdown
    assert "## Health checks" in markdown
    assert f"- {paths.train_metrics} (train.metrics): not found" in markdown


def test_no_metrics_at_all_is_still_a_summary():
    markdown = summary_markdown({}, ["metrics/train.json (train.metrics): not found"])
    assert "**Health**: unknown (no health report)" in markdown
    assert markdown.endswith("- metrics/train.json (train.metrics): not found\n")


def test_a_cell_cannot_break_the_table():
    checks = {"odd": {"value": "a|b\nc", "threshold": None, "passed": True}}
    assert _rows(summary_markdown({"health": {"passed": True, "checks": checks}}))["odd"] == [
        "yes",
        "a\\|b c",
        "–",
    ]


def test_the_artefact_key_is_one_prefect_accepts():
    from prefect.artifacts import Artifact

    assert Artifact(type="markdown", key=ARTIFACT_KEY, data="x").key == ARTIFACT_KEY


@pytest.mark.parametrize(
    ("exc", "retry"),
    [
        (PermanentStageError("dvc repro -s sample failed (exit 1):\nfgclip sample: error: bad"), False),
        (FGClipError("invalid params"), False),
        (ValueError("unknown stage 'x'; stages: sample"), False),
        (StageFailed("dvc repro -s train failed (exit 255):\nERROR: Unable to acquire lock."), True),
        (StageFailed("dvc repro -s train timed out after 10 s and was killed:"), True),
        (RuntimeError("a bug"), True),
    ],
)
def test_retry_condition_retries_only_what_may_pass(exc: Exception, retry: bool):
    """The state is what Prefect's task engine passes: ``Failed(data=<the raised exception>)``."""
    assert retry_wanted(stage_task, None, Failed(data=exc)) is retry


def test_the_retried_stage_task_keeps_the_retry_condition():
    assert stage_task.with_options(retries=3, retry_delay_seconds=1).retry_condition_fn is retry_wanted


def test_invalid_params_fail_the_flow_before_any_task(tmp_path: Path):
    """Params are validated at the flow's start, outside any (retried) task."""
    shutil.copy2(REPO / "dvc.yaml", tmp_path / "dvc.yaml")
    params = yaml.safe_load((REPO / "params.yaml").read_text())
    params["orchestration"]["retries"] = -1
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(params))
    with pytest.raises(ParamsError, match="retries"):
        fgclip_pipeline.fn(repo=str(tmp_path))  # the flow's body, no Prefect run: it must not get to a task


def test_a_failed_run_is_marked_failed_at_its_stage():
    markdown = summary_markdown(METRICS, failed_stage="train")
    assert "**This flow run FAILED at stage `train`**" in markdown
    assert "FAILED at stage" not in summary_markdown(METRICS)
