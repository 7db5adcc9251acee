"""The real pipeline through the real DVC: `dvc repro` end to end on a tiny sample,
then a second `dvc repro` that must be a no-op."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
from e2e_helpers import TINY_PIPELINE as TINY
from e2e_helpers import pipeline_env, scratch_repo

from pipeline.stages import StageFailed, run_stage, stage_order

REPO = Path(__file__).resolve().parents[2]
pytestmark = pytest.mark.e2e



def _run(cmd: list[str], cwd: Path) -> str:
    proc = subprocess.run(cmd, cwd=cwd, env=pipeline_env(), capture_output=True, text=True, timeout=600, check=False)
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, f"{' '.join(cmd)} failed:\n{out[-6000:]}"
    return out


@pytest.fixture(scope="module")
def tiny_repo(tmp_path_factory) -> Path:
    """A throwaway git + DVC repository holding this project's pipeline with tiny params."""
    return scratch_repo(tmp_path_factory.mktemp("repo"), TINY)


def test_dvc_repro_runs_every_stage_then_is_a_noop(tiny_repo: Path):
    out = _run([sys.executable, "-m", "dvc", "repro"], tiny_repo)
    for stage in stage_order(tiny_repo):
        assert f"Running stage '{stage}'" in out, f"stage {stage} did not run:\n{out[-3000:]}"

    boxes = json.loads((tiny_repo / "metrics/boxes.json").read_text())
    assert boxes["accepted"] + boxes["rejected"] == boxes["read"] and boxes["rejected"] > 0
    evaluation = json.loads((tiny_repo / "metrics/eval.json").read_text())
    for model in ("finetuned", "pretrained", "untrained"):
        assert 0.0 <= evaluation[model]["frame_auc"] <= 1.0
    health = json.loads((tiny_repo / "metrics/health.json").read_text())
    assert health["checks"]["finite"]["passed"] is True
    assert (tiny_repo / "models/fgclip/model.safetensors").is_file()
    # Every other output at its default path too (DVC would have failed on a missing out).
    outputs = (
        "metrics/train.json",
        "plots/train_loss.csv",
        "plots/train_loss.png",
        "plots/roc.csv",
        "plots/roc.png",
        "plots/models.png",
        "data/eval/frame_scores.parquet",
    )
    for output in outputs:
        assert (tiny_repo / output).is_file(), output
    assert (tiny_repo / "mlflow.db").is_file(), "MLflow must default to <repo>/mlflow.db"

    again = _run([sys.executable, "-m", "dvc", "repro"], tiny_repo)
    assert "Running stage" not in again, again
    for stage in stage_order(tiny_repo):
        assert f"Stage '{stage}' didn't change, skipping" in again


def test_run_stage_drives_one_stage_and_names_unknown_ones(tiny_repo: Path, monkeypatch):
    """The orchestration entry point (pipeline.stages.run_stage) over the same repository."""
    monkeypatch.setenv("PATH", pipeline_env()["PATH"])
    monkeypatch.setenv("DVC_NO_ANALYTICS", "1")
    run_stage(tiny_repo)  # a no-op after the test above; the whole pipeline when run alone
    out = run_stage(tiny_repo, "validate_boxes")
    assert "Stage 'validate_boxes' didn't change, skipping" in out
    with pytest.raises(ValueError, match="unknown stage 'training'"):
        run_stage(tiny_repo, "training")
    params = tiny_repo / "params.yaml"
    good = params.read_text()
    params.write_text(good.replace("min_area_frac: 0.005", "min_area_frac: 2.0"))  # invalid: must be < 1
    try:
        with pytest.raises(StageFailed, match="min_area_frac"):
            run_stage(tiny_repo, "validate_boxes")
    finally:
        params.write_text(good)


def test_the_pipelines_finetuned_scores_under_vadclip_equal_its_rules_by_hand(tiny_repo: Path, tmp_path: Path):
    """`fgclip evaluate-scores --protocol vadclip` on the fine-tuned snippet scores `dvc repro` wrote,
    against VadCLIP's make_gt_ucf.py + ucf_test.py steps rewritten here; the MLflow run holds the
    bootstrap interval of the fine-tuned AUC."""
    import numpy as np
    import pyarrow as pa
    import pyarrow.compute as pc
    import pyarrow.parquet as pq
    from mlflow import MlflowClient
    from sklearn.metrics import average_precision_score, roc_auc_score

    _run([sys.executable, "-m", "dvc", "repro"], tiny_repo)  # a no-op after the first test
    table = pq.read_table(tiny_repo / "data/eval/frame_scores.parquet")
    table = table.filter(pc.equal(table["model"], "finetuned"))
    snippets = table.group_by(["video", "snippet"], use_threads=False).aggregate([("score", "first")])
    scores_file = tmp_path / "finetuned.parquet"
    pq.write_table(pa.table({"video": snippets["video"], "snippet": snippets["snippet"],
                             "score": snippets["score_first"]}), scores_file)  # fmt: skip
    per_video: dict[str, dict[int, float]] = {}
    for video, snippet, score in zip(*(snippets[c].to_pylist() for c in ("video", "snippet", "score_first"))):
        per_video.setdefault(video, {})[snippet] = score
    data = tiny_repo / "data/sample"
    lines = (data / "Temporal_Anomaly_Annotation_for_Testing_Videos.txt").read_text().splitlines(keepends=True)
    gt, ranked = [], []
    for video in (data / "Anomaly_Test.txt").read_text().split():
        scores = [per_video[video][k] for k in sorted(per_video[video])]
        name = Path(video).stem
        vec = np.zeros((len(scores) + 1) * 16, dtype=np.float32)
        if "Normal" not in name:
            content = next(line for line in lines if name in line).strip("\n").split("  ")[1:-1]
            for i in range(1, len(content) - 1, 2):
                if int(content[i]) != -1 and int(content[i + 1]) != -1:
                    vec[int(content[i]) : int(content[i + 1])] = 1.0
        gt.extend(vec[:-16])
        ranked.extend(np.repeat(np.float32(scores).tolist(), 16))
    out = tmp_path / "vadclip.json"
    _run(["fgclip", "evaluate-scores", str(scores_file), "--protocol", "vadclip", "--out", str(out)], tiny_repo)
    written = json.loads(out.read_text())["method"]
    assert written["frame_auc"] == pytest.approx(roc_auc_score(gt, ranked), abs=1e-6)
    assert written["frame_ap"] == pytest.approx(average_precision_score(gt, ranked), abs=1e-6)

    evaluation = json.loads((tiny_repo / "metrics/eval.json").read_text())
    run = json.loads((tiny_repo / "models/fgclip/run.json").read_text())
    logged = MlflowClient(run["tracking_uri"]).get_run(run["run_id"]).data.metrics
    lo, hi = evaluation["finetuned"]["intervals"]["frame_auc"]
    assert logged["eval.finetuned.frame_auc_lo"] == pytest.approx(lo, abs=1e-4)
    assert logged["eval.finetuned.frame_auc_hi"] == pytest.approx(hi, abs=1e-4)


def test_dvc_plots_page_renders_offline(tiny_repo: Path, tmp_path: Path):
    """`dvc plots show`'s page, loaded in headless Chromium with every network request refused."""
    from browser import browser, screenshot

    out = tmp_path / "dvc_plots"
    _run([sys.executable, "-m", "dvc", "plots", "show", "--out", str(out)], tiny_repo)
    with browser(offline=True) as page:
        page.goto((out / "index.html").as_uri())
        page.wait_for_load_state("load")
        images = page.eval_on_selector_all(
            "img", "els => els.map(e => ({src: e.getAttribute('src'), w: e.naturalWidth, h: e.naturalHeight}))"
        )
        screenshot(page, "dvc-plots")
    # One image per plot definition (no duplicates from stage-level plots), each decoded.
    # DVC copies each into static/<revision>_<path with _ for />.
    names = sorted(Path(img["src"]).name.removeprefix("workspace_plots_") for img in images)
    assert names == ["models.png", "roc.png", "train_loss.png"], images
    assert all(img["w"] > 100 and img["h"] > 100 for img in images), images
    # The page did ask the network for something (DVC's template links Vega from a CDN): only
    # scripts, which image plots do not need, and each was refused.
    assert all(url.startswith("https://") and url.endswith(".js") or "vega" in url for url in page.context.blocked), (
        page.context.blocked
    )
