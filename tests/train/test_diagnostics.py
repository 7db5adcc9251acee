"""HealthMonitor gates and the runtime-diagnostics switch, without a training run."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import pytest
import torch
from torch import nn

from fgclip.config import Params
from fgclip.train.diagnostics import (
    HealthCheckFailed,
    HealthMonitor,
    diag_figures,
    log_diag,
    runtime_diag_enabled,
)


def _bank(enabled_at: int = -1, passes: int = 10, size: int = 128) -> dict:
    return {
        "ptr": 4,
        "filled": 20,
        "enabled": enabled_at >= 0,
        "enabled_at": enabled_at,
        "forward_passes": passes,
        "size": size,
    }


def _monitor(**health) -> HealthMonitor:
    params = Params().with_overrides(train={"health": {**Params().train.health.model_dump(), **health}})
    return HealthMonitor(params.train.health, params)


def test_region_gate_judges_the_window_at_its_step() -> None:
    monitor = _monitor(region_loss_by_step=3, region_loss_window=2, region_loss_max=0.7)
    monitor.record_init({"global": 4.6052, "region": 4.6052, "hardneg": 4.6052})
    for step, loss in enumerate([1.0, 0.9, 0.3, 5.0, 5.0], start=1):
        monitor.observe(step, loss, 0.0)
    check = monitor.checks(_bank(50))["region_loss"]
    # Later steps do not change a gate already judged at step 3.
    assert check["step"] == 3 and check["value"] == pytest.approx(0.6) and check["passed"] is True


def test_short_run_is_judged_at_its_last_step_and_fail_action_raises(tmp_path: Path) -> None:
    monitor = _monitor(region_loss_by_step=500, region_loss_action="fail")
    monitor.record_init({"global": 4.6052, "region": 4.6052, "hardneg": 4.6052})
    monitor.observe(1, 1.4, 0.0)
    monitor.observe(2, 1.2, 0.25)
    checks = monitor.write(tmp_path / "health.json", _bank(passes=2))
    assert checks["region_loss"]["step"] == 2 and checks["region_loss"]["value"] == pytest.approx(1.3)
    assert checks["zero_norm_frac"] == {**checks["zero_norm_frac"], "value": 0.25, "passed": False, "step": 2}
    assert checks["memory_bank_enabled_at"]["passed"] is False
    assert "before the warm-up of 50" in checks["memory_bank_enabled_at"]["note"]
    written = json.loads((tmp_path / "health.json").read_text())
    assert written["passed"] is False and written["checks"]["region_loss"]["action"] == "fail"
    with pytest.raises(HealthCheckFailed, match="region loss 1.3000 is not under 0.5 by step 2") as err:
        monitor.raise_if_failed(checks, tmp_path / "health.json")
    assert str(err.value).endswith(f"see {tmp_path / 'health.json'}")


def test_bank_gate() -> None:
    monitor = _monitor()
    assert monitor.checks(_bank(50, passes=80))["memory_bank_enabled_at"]["passed"] is True
    assert monitor.checks(_bank(400, passes=800))["memory_bank_enabled_at"]["passed"] is False
    assert monitor.checks(_bank(size=0))["memory_bank_enabled_at"]["passed"] is True


def test_logit_scale_gate_judges_the_hard_negative_scale_too() -> None:
    """A hard-negative temperature re-created at CLIP's 14.3 fails the same gate (the users' bug)."""
    monitor = _monitor()
    monitor.record_init({"global": 4.6052, "region": 4.6052, "hardneg": 2.6592})
    check = monitor.checks(_bank(50))["logit_scale_init"]
    assert check["passed"] is False and "hardneg=2.6592 (exp=14.28)" in check["note"]


def test_logit_scale_gate_and_state_round_trip() -> None:
    monitor = _monitor()
    monitor.record_init({"global": 2.6592, "region": 4.6052, "hardneg": 4.6052}, "kept")
    check = monitor.checks(_bank(50))["logit_scale_init"]
    assert check["passed"] is False and "exp=14.28" in check["note"]
    monitor.record_nonfinite(7, "loss_region", float("inf"))
    restored = _monitor()
    restored.load_state_dict(monitor.state_dict())
    assert restored.checks(_bank(50))["logit_scale_init"] == check
    # The non-finite record belongs to the failed invocation, not the checkpointed state.
    assert restored.checks(_bank(50))["finite"]["passed"] is True
    assert monitor.checks(_bank(50))["finite"]["note"] == "loss_region = inf at optimizer step 7"


def test_finite_gate_covers_the_weights() -> None:
    """A NaN in a weight the loss never reads used to pass the gate and be published."""
    monitor = _monitor()
    model = nn.Sequential(nn.Linear(4, 4), nn.LayerNorm(4))
    assert monitor.check_weights(2, model) is None
    check = monitor.checks(_bank(50))["finite"]
    assert check["passed"] is True and check["weights_checked_at"] == 2
    assert (
        check["note"]
        == "losses and gradient norms finite at every step; weights checked after optimizer step 2"
    )
    with torch.no_grad():
        model[1].bias[1:3] = float("nan")
        model[0].weight[0, 0] = float("inf")
    what, value = monitor.check_weights(4, model)
    assert what == "weight 0.weight (3 NaN/Inf values in the model)" and value == float("inf")
    monitor.record_nonfinite(4, what, value)  # what the training loop does before it stops
    check = monitor.checks(_bank(50))["finite"]
    assert check["passed"] is False and check["step"] == 4
    assert check["note"] == "weight 0.weight (3 NaN/Inf values in the model) = inf at optimizer step 4"


def test_runtime_diag_switch(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("ENABLE_RUNTIME_DIAG", raising=False)
    assert runtime_diag_enabled(Params()) is False
    assert runtime_diag_enabled(Params().with_overrides(train={"runtime_diag": True})) is True
    monkeypatch.setenv("ENABLE_RUNTIME_DIAG", "1")
    assert runtime_diag_enabled(Params()) is True
    monkeypatch.setenv("ENABLE_RUNTIME_DIAG", "0")
    assert runtime_diag_enabled(Params()) is False


def test_diag_lines_use_the_users_format(caplog: pytest.LogCaptureFixture) -> None:
    logits = torch.tensor([[-15.0, 20.0], [1.0, 0.0]])
    figures = diag_figures(4.6052, 4.6052, logits, _bank(50, passes=60), 0.05)
    assert figures["train/diag/memory_bank_full"] == pytest.approx(20 / 128)
    with caplog.at_level(logging.INFO, logger="fgclip.train"):
        log_diag(25, figures)
    lines = [r.getMessage() for r in caplog.records]
    assert lines == [
        "[DIAG] step=25",
        "[DIAG] logit_scale (finegrained): 4.605200 (exp=100.0030)",
        "[DIAG] logit_scale (global): 4.605200 (exp=100.0030)",
        "[DIAG] logits_i2t: min=-15.0000, max=20.0000, mean=1.5000",
        "[DIAG] memory_bank: ptr=4, full=0.156",
        "[DIAG] img_norms: zero_frac=0.0500",
    ]
