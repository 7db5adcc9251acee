"""The training loop end to end on the tiny sample: resume, NaN stop, diagnostics, health, tracking."""

from __future__ import annotations

import csv
import hashlib
import json
import logging
import re
from pathlib import Path

import pytest
import torch
from mlflow import MlflowClient
from safetensors.torch import load_file

from fgclip.config import Params
from fgclip.eval.evaluate import evaluate
from fgclip.train.checkpoints import StaleCheckpointError
from fgclip.train.diagnostics import HealthCheckFailed
from fgclip.train.loop import FAULT_ENV, NonFiniteLossError, train


def _run(params: Params, frames: Path, boxes: Path, clip: Path, root: Path, **kwargs) -> dict:
    return train(
        params, frames, boxes, str(clip), root / "out", root / "checkpoints", root / "health.json",
        metrics_path=root / "train.json", loss_csv=root / "loss.csv", **kwargs,
    )  # fmt: skip


def _losses(root: Path) -> list[dict[str, str]]:
    with (root / "loss.csv").open() as f:
        return list(csv.DictReader(f))


def _digest(directory: Path) -> dict[str, str]:
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(directory.iterdir())}


@pytest.fixture(scope="module")
def straight(
    train_params, tiny_clip, tiny_frames: Path, tiny_boxes: Path, tmp_path_factory
) -> tuple[dict, Path]:
    """An uninterrupted 4-step run, the reference for the resume test."""
    root = tmp_path_factory.mktemp("straight")
    return _run(train_params(), tiny_frames, tiny_boxes, tiny_clip[0], root), root


def test_uninterrupted_run_writes_model_run_and_metrics(straight, tracking_uri: str) -> None:
    summary, root = straight
    assert summary["steps"] == 4 and [row["step"] for row in _losses(root)] == ["1", "2", "3", "4"]
    assert json.loads((root / "train.json").read_text()) == json.loads(json.dumps(summary))
    assert summary["final"]["loss"] == float(_losses(root)[-1]["loss"])
    assert {"model.safetensors", "fgclip_config.json", "tokenizer.json", "run.json"} <= {
        p.name for p in (root / "out").iterdir()
    }
    run = json.loads((root / "out" / "run.json").read_text())
    assert run == {
        "run_id": summary["run_id"],
        "experiment_id": summary["experiment_id"],
        "tracking_uri": tracking_uri,
    }
    client = MlflowClient(tracking_uri)
    mlflow_run = client.get_run(run["run_id"])
    assert mlflow_run.info.status == "FINISHED"
    assert mlflow_run.data.params["train.max_steps"] == "4"
    for key in (
        "train/loss",
        "train/loss_global",
        "train/loss_region",
        "train/loss_hardneg",
        "train/logit_scale",
        "train/lr",
        "train/logit_scale_region",
        "train/logit_scale_hardneg",
        "train/temperature",
        "train/temperature_region",
        "train/temperature_hardneg",
        "train/samples_per_s",
        "train/loader_samples_per_s",
    ):
        assert sorted(m.step for m in client.get_metric_history(run["run_id"], key)) == [1, 2, 3, 4], key
    loss = {m.step: m.value for m in client.get_metric_history(run["run_id"], "train/loss")}
    assert loss[3] == pytest.approx(float(_losses(root)[2]["loss"]))
    assert mlflow_run.data.metrics["train/temperature"] == pytest.approx(100.0, rel=1e-3)
    # FG-CLIP's hard-negative loss is on by default and the sample's regions carry negatives.
    assert all(float(row["loss_hardneg"]) > 0 for row in _losses(root))
    assert summary["temperature_hardneg"] == pytest.approx(100.0, rel=1e-2)
    assert "health.json" in [a.path for a in client.list_artifacts(run["run_id"])]
    # Checkpoints every 2 steps, the newest 2 kept.
    assert sorted(p.name for p in (root / "checkpoints" / "fgclip-sample").iterdir()) == [
        "checkpoint-000002",
        "checkpoint-000004",
    ]


def test_long_captions_train_and_evaluate_through_the_long_path(
    train_params, tiny_clip, tiny_sample: Path, tiny_frames: Path, tiny_boxes: Path, tmp_path: Path
) -> None:
    """model.long_text: global captions through FG-CLIP's 248-position tables and projection."""
    params = train_params(model={"long_text": True}, train={"max_steps": 2, "checkpoint_every": 2})
    assert params.model.caption_len == 248
    summary = _run(params, tiny_frames, tiny_boxes, tiny_clip[0], tmp_path)
    assert summary["steps"] == 2 and summary["health"]["finite"]["passed"]
    state = load_file(str(tmp_path / "out" / "model.safetensors"))
    start = load_file(str(Path(tiny_clip[0]) / "model.safetensors"))
    short = "text_model.embeddings.position_embedding.weight"
    assert state[f"clip.{short}"].shape[0] == 77
    for name in ("position_embedding_ori", "position_embedding_res"):
        assert state[f"clip.text_model.embeddings.{name}.weight"].shape[0] == 248
    # Training moved the long path's own weights away from their copies of the short path.
    assert not torch.equal(state["clip.text_filip_projection.weight"], state["clip.text_projection.weight"])
    assert not torch.equal(state["clip.text_model.embeddings.position_embedding_ori.weight"][:20],
                           start[short][:20])  # fmt: skip
    # Evaluation reads the long model back and queries videos with its global captions (long path).
    result = evaluate(params, tiny_frames, tmp_path / "out", None, tiny_sample, tmp_path / "eval.json",
                      tmp_path / "scores.parquet", boxes_dir=tiny_boxes)  # fmt: skip
    assert 0.0 <= result["finetuned"]["retrieval_r1"] <= 1.0
    assert result["finetuned"]["hardneg_accuracy"] is not None


def test_resume_equals_uninterrupted(
    straight,
    train_params,
    tiny_clip,
    tiny_frames: Path,
    tiny_boxes: Path,
    tmp_path: Path,
    caplog: pytest.LogCaptureFixture,
    tracking_uri: str,
) -> None:
    _, ref_root = straight
    params = train_params()
    first = _run(params, tiny_frames, tiny_boxes, tiny_clip[0], tmp_path, max_steps=2)
    assert first["steps"] == 2 and len(_losses(tmp_path)) == 2
    with caplog.at_level(logging.INFO):
        second = _run(params, tiny_frames, tiny_boxes, tiny_clip[0], tmp_path)
    assert second["start_step"] == 2
    # The resumed value is the checkpoint's (moved by 2 steps of training), in the users' grep format.
    assert re.search(
        r"\[global\] Loaded logit_scale = 4\.\d{4} \(exp=\d+\.\d\) from .*checkpoint-", caplog.text
    )
    assert "[region] Loaded logit_scale = " in caplog.text
    assert "[hardneg] Loaded logit_scale = " in caplog.text
    # Identical losses at every step (the curve spans both invocations) and identical final weights.
    assert _losses(tmp_path) == _losses(ref_root)
    resumed = load_file(tmp_path / "out" / "model.safetensors")
    straight_weights = load_file(ref_root / "out" / "model.safetensors")
    assert resumed.keys() == straight_weights.keys()
    assert all((resumed[k] == straight_weights[k]).all() for k in resumed)
    # One MLflow run over both invocations, every step exactly once.
    assert second["run_id"] == first["run_id"]
    history = MlflowClient(tracking_uri).get_metric_history(second["run_id"], "train/loss")
    assert sorted(m.step for m in history) == [1, 2, 3, 4]

    # Another configuration in the same run directory is refused, naming what differs.
    changed = train_params(train={"batch_size": 2}, model={"logit_scale_max": 4.0})
    with pytest.raises(StaleCheckpointError) as err:
        _run(changed, tiny_frames, tiny_boxes, tiny_clip[0], tmp_path)
    assert "train.batch_size: 3 -> 2" in str(err.value) and "model.logit_scale_max: 4.6052 -> 4.0" in str(
        err.value
    )


def test_nan_stops_cleanly_and_keeps_the_last_checkpoint(
    train_params,
    tiny_clip,
    tiny_frames: Path,
    tiny_boxes: Path,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    tracking_uri: str,
) -> None:
    params = train_params()
    _run(params, tiny_frames, tiny_boxes, tiny_clip[0], tmp_path, max_steps=2)
    run_dir = tmp_path / "checkpoints" / params.train.run_name
    before = _digest(run_dir / "checkpoint-000002")

    monkeypatch.setenv(FAULT_ENV, "3")
    with pytest.raises(NonFiniteLossError, match="non-finite loss = nan at optimizer step 3") as err:
        _run(params, tiny_frames, tiny_boxes, tiny_clip[0], tmp_path)
    assert err.value.step == 3 and err.value.what == "loss"
    assert "checkpoint-000002" in str(err.value)
    assert [p.name for p in run_dir.iterdir()] == ["checkpoint-000002"]
    assert _digest(run_dir / "checkpoint-000002") == before
    health = json.loads((tmp_path / "health.json").read_text())
    assert health["checks"]["finite"]["passed"] is False and health["checks"]["finite"]["step"] == 3
    meta = json.loads((run_dir / "checkpoint-000002" / "meta.json").read_text())
    assert MlflowClient(tracking_uri).get_run(meta["run_id"]).info.status == "FAILED"


def test_checkpoint_missing_a_meta_field_is_skipped_not_a_traceback(
    train_params,
    tiny_clip,
    tiny_frames: Path,
    tiny_boxes: Path,
    tmp_path: Path,
    caplog: pytest.LogCaptureFixture,
) -> None:
    params = train_params(train={"max_steps": 2})
    _run(params, tiny_frames, tiny_boxes, tiny_clip[0], tmp_path)
    reference = _losses(tmp_path)
    checkpoint = tmp_path / "checkpoints" / params.train.run_name / "checkpoint-000002"
    meta = json.loads((checkpoint / "meta.json").read_text())
    passes = meta.pop("forward_passes")  # was a KeyError in the resume, blocking every rerun
    (checkpoint / "meta.json").write_text(json.dumps(meta))

    with caplog.at_level(logging.WARNING, logger="fgclip.train.checkpoints"):
        summary = _run(params, tiny_frames, tiny_boxes, tiny_clip[0], tmp_path)
    warnings = [r.getMessage() for r in caplog.records if r.name == "fgclip.train.checkpoints"]
    assert warnings == [
        f"Skipping checkpoint {checkpoint}: meta.json lacks forward_passes",
        f"No usable checkpoint in {checkpoint.parent}: training starts from step 0",
    ]
    # A fresh start, as deterministic as the first run; the broken checkpoint is saved whole again.
    assert summary["start_step"] == 0 and summary["steps"] == 2 and _losses(tmp_path) == reference
    assert json.loads((checkpoint / "meta.json").read_text())["forward_passes"] == passes


def test_diagnostics_and_health_gates(
    train_params,
    tiny_clip,
    tiny_frames: Path,
    tiny_boxes: Path,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
    tracking_uri: str,
) -> None:
    monkeypatch.setenv("ENABLE_RUNTIME_DIAG", "1")
    params = train_params(train={"diag_every": 2, "max_steps": 2})
    with caplog.at_level(logging.INFO, logger="fgclip"):
        summary = _run(params, tiny_frames, tiny_boxes, tiny_clip[0], tmp_path)
    lines = [r.getMessage() for r in caplog.records if r.name == "fgclip.train"]
    assert "[LOSS] step=2 loss=" in "\n".join(lines)
    diag = [line for line in lines if line.startswith("[DIAG]")]
    assert any(
        re.fullmatch(r"\[DIAG\] logit_scale \(finegrained\): 4\.60\d{4} \(exp=99\.\d{4}\)", line)
        for line in diag
    )
    assert any(
        re.fullmatch(r"\[DIAG\] logit_scale \(global\): 4\.60\d{4} \(exp=\d+\.\d{4}\)", line) for line in diag
    )
    assert any(
        line.startswith("[DIAG] logits_i2t: min=") and ", max=" in line and ", mean=" in line for line in diag
    )
    assert any(line.startswith("[DIAG] memory_bank: ptr=") and ", full=" in line for line in diag)
    assert any(line.startswith("[DIAG] img_norms: zero_frac=") for line in diag)
    assert "[Memory Bank] enabled @ training_step 2" in caplog.text
    run = MlflowClient(tracking_uri).get_run(summary["run_id"])
    assert {"train/diag/logit_scale_region", "train/diag/logits_i2t_max", "train/diag/memory_bank_ptr"} <= set(
        run.data.metrics
    )
    # Health is tags, not 0/1 metrics: a one-point "metric" reads as a count.
    assert not [key for key in run.data.metrics if key.startswith("health")]
    assert run.data.tags["health.finite.passed"] == "true"
    assert run.data.tags["health.memory_bank_enabled_at.value"] == "2"

    checks = json.loads((tmp_path / "health.json").read_text())["checks"]
    assert checks["memory_bank_enabled_at"] == {
        **checks["memory_bank_enabled_at"],
        "value": 2,
        "threshold": 2,
        "passed": True,
    }
    assert checks["logit_scale_init"]["passed"] is True
    assert checks["finite"]["passed"] is True
    assert checks["finite"]["weights_checked_at"] == 2  # the weights too, not only the losses
    assert checks["zero_norm_frac"]["passed"] is True
    assert checks["region_loss"]["step"] == 2 and checks["region_loss"]["action"] == "warn"
    assert summary["health"] == checks


def test_kept_wrong_temperature_short_run_and_failing_gate(
    train_params, tiny_clip, tiny_frames: Path, tiny_boxes: Path, tmp_path: Path
) -> None:
    """loaded_logit_scale=keep keeps the pretrained 2.65: the users' temperature bug, flagged."""
    params = train_params(
        model={"loaded_logit_scale": "keep"},
        train={"max_steps": 1, "memory_bank_warmup_steps": 5, "health": {"region_loss_action": "fail"}},
    )
    with pytest.raises(HealthCheckFailed, match="region loss"):
        _run(params, tiny_frames, tiny_boxes, tiny_clip[0], tmp_path)
    checks = json.loads((tmp_path / "health.json").read_text())["checks"]
    scale = checks["logit_scale_init"]
    assert scale["passed"] is False
    assert scale["value"]["global"] == pytest.approx(tiny_clip[1]["final_logit_scale"], abs=1e-5)
    assert "loaded_logit_scale=keep" in scale["note"]
    bank = checks["memory_bank_enabled_at"]
    assert bank["passed"] is False and "before the warm-up of 5" in bank["note"]
    assert checks["region_loss"]["passed"] is False and checks["region_loss"]["action"] == "fail"
    # The model is still written: the gate fails the stage, not the artefacts.
    assert (tmp_path / "out" / "model.safetensors").is_file()


def test_sync_every_keeps_every_step_and_stops_at_the_bad_one(
    straight,
    train_params,
    tiny_clip,
    tiny_frames: Path,
    tiny_boxes: Path,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """train.sync_every 4 over 4 steps (checkpoint at 4 only): steps 1-3 are read at step 4.

    The loss curve and the weights equal the every-step reference; a NaN injected at step 2
    is found at the step-4 sync, named as step 2, and nothing is saved.
    """
    _, ref_root = straight
    params = train_params(train={"sync_every": 4, "checkpoint_every": 4})
    lazy = tmp_path / "lazy"
    _run(params, tiny_frames, tiny_boxes, tiny_clip[0], lazy)
    assert _losses(lazy) == _losses(ref_root)
    weights, reference = load_file(lazy / "out" / "model.safetensors"), load_file(ref_root / "out" / "model.safetensors")
    assert weights.keys() == reference.keys() and all(torch.equal(weights[k], reference[k]) for k in weights)

    monkeypatch.setenv(FAULT_ENV, "2")
    bad = tmp_path / "bad"
    with pytest.raises(NonFiniteLossError, match="non-finite loss = nan at optimizer step 2") as err:
        _run(params, tiny_frames, tiny_boxes, tiny_clip[0], bad)
    assert err.value.step == 2 and err.value.what == "loss"
    assert not any((bad / "checkpoints" / params.train.run_name).glob("checkpoint-*"))
    health = json.loads((bad / "health.json").read_text())
    assert health["checks"]["finite"]["passed"] is False and health["checks"]["finite"]["step"] == 2
