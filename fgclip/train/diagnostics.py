"""Runtime diagnostics (``[DIAG]`` lines) and the health gates of a training run.

The ``[DIAG]`` lines reproduce, in the same words, what the users grepped their
logs for when the region temperature and the memory bank were broken; the health
gates check the same symptoms automatically and write the health report
(``train.health_report``, ``metrics/health.json``).
"""

from __future__ import annotations

import json
import logging
import math
import os
from collections import deque
from collections.abc import Iterable
from pathlib import Path
from typing import Any, NamedTuple

import torch
from torch import nn

from fgclip import metric_keys
from fgclip.atomic import write_text_atomic
from fgclip.config import HealthConfig, Params
from fgclip.errors import FGClipError

logger = logging.getLogger(__name__)

DIAG_ENV = "ENABLE_RUNTIME_DIAG"


class HealthCheckFailed(FGClipError, RuntimeError):
    """A health gate whose action is ``fail`` did not pass; health.json says which."""


def runtime_diag_enabled(params: Params) -> bool:
    """``ENABLE_RUNTIME_DIAG=1`` (or true/yes/on) in the environment, or ``train.runtime_diag``."""
    env = os.environ.get(DIAG_ENV, "").strip().lower()
    return env in {"1", "true", "yes", "on"} or params.train.runtime_diag


def diag_figures(
    scale_global: float,
    scale_region: float,
    logits_i2t: torch.Tensor,
    bank_state: dict[str, Any],
    zero_norm_frac: float,
) -> dict[str, float]:
    """The figures behind the ``[DIAG]`` lines, keyed as they are logged to MLflow.

    ``memory_bank_full`` is the filled fraction of the queue (0…1; 1 = full).
    """
    logits = logits_i2t.detach().float()
    logits = logits[torch.isfinite(logits)]
    size = bank_state["size"]
    return {
        metric_keys.diag("logit_scale_region"): scale_region,
        metric_keys.diag("logit_scale_global"): scale_global,
        metric_keys.diag("logits_i2t_min"): float(logits.min()) if logits.numel() else math.nan,
        metric_keys.diag("logits_i2t_max"): float(logits.max()) if logits.numel() else math.nan,
        metric_keys.diag("logits_i2t_mean"): float(logits.mean()) if logits.numel() else math.nan,
        metric_keys.diag("memory_bank_ptr"): float(bank_state["ptr"]),
        metric_keys.diag("memory_bank_full"): bank_state["filled"] / size if size else 0.0,
        metric_keys.diag("img_norms_zero_frac"): zero_norm_frac,
    }


def log_diag(step: int, figures: dict[str, float]) -> None:
    """Log the ``[DIAG]`` lines of one optimizer step (``full`` = filled fraction of the bank)."""
    log = logging.getLogger("fgclip.train")
    log.info("[DIAG] step=%d", step)
    for name, label in (("region", "finegrained"), ("global", "global")):
        scale = figures[metric_keys.diag(f"logit_scale_{name}")]
        log.info("[DIAG] logit_scale (%s): %.6f (exp=%.4f)", label, scale, math.exp(scale))
    log.info(
        "[DIAG] logits_i2t: min=%.4f, max=%.4f, mean=%.4f",
        figures[metric_keys.diag("logits_i2t_min")],
        figures[metric_keys.diag("logits_i2t_max")],
        figures[metric_keys.diag("logits_i2t_mean")],
    )
    log.info(
        "[DIAG] memory_bank: ptr=%d, full=%.3f",
        int(figures[metric_keys.diag("memory_bank_ptr")]),
        figures[metric_keys.diag("memory_bank_full")],
    )
    log.info("[DIAG] img_norms: zero_frac=%.4f", figures[metric_keys.diag("img_norms_zero_frac")])


class NonFinite(NamedTuple):
    """The NaN/Inf values found among named tensors."""

    name: str  # the first tensor holding one
    value: float  # its first non-finite value
    count: int  # non-finite values over all the tensors


def first_nonfinite(tensors: Iterable[tuple[str, torch.Tensor]]) -> NonFinite | None:
    """The NaN/Inf among named floating-point tensors (weights), or None when all are finite."""
    first: tuple[str, float] | None = None
    count = 0
    for name, tensor in tensors:
        if not tensor.is_floating_point():
            continue
        bad = ~torch.isfinite(tensor.detach())
        found = int(bad.sum())
        if found:
            count += found
            if first is None:
                first = (name, float(tensor.detach()[bad].flatten()[0]))
    return NonFinite(first[0], first[1], count) if first is not None else None


def _check(value: Any, threshold: Any, passed: bool, **extra: Any) -> dict[str, Any]:
    return {"value": value, "threshold": threshold, "passed": bool(passed), **extra}


class HealthMonitor:
    """Collects the figures the health gates need while training, then judges them.

    Checks (each ``{value, threshold, passed}`` plus ``step``/``note``):

    - ``logit_scale_init``: the scales training started from equal
      ``model.logit_scale_init_value`` within the tolerance. A model loaded with
      ``loaded_logit_scale: keep`` may start elsewhere on purpose; that still
      fails, with a note saying the loaded value was kept (it is the users'
      "temperature 14.24 instead of 100" symptom).
    - ``memory_bank_enabled_at``: the bank switched on at the configured forward
      pass (passes when the bank is disabled with size 0; fails with a note when
      the run was too short to reach the warm-up).
    - ``finite``: no NaN/Inf in a loss or the gradient norm of any step, nor in
      the weights at each checkpoint and at the end (:meth:`check_weights`): a
      NaN in a weight the loss never reads (4 KiB of a corrupt checkpoint) would
      otherwise be published with this check passing.
    - ``zero_norm_frac``: the largest fraction of zero-norm region features seen.
    - ``region_loss``: mean region loss of the last ``region_loss_window`` steps
      at step ``region_loss_by_step`` (or the last step, if sooner) under the limit.

    Only ``region_loss`` with ``region_loss_action: fail`` stops the stage
    (:class:`HealthCheckFailed` from :meth:`raise_if_failed`); every other failed
    check is a WARNING in the log and ``passed: false`` in health.json.
    """

    def __init__(self, cfg: HealthConfig, params: Params) -> None:
        self.cfg = cfg
        self.params = params
        self.init_scales: dict[str, float] | None = None
        self.init_note = ""
        self.zero_norm_max = 0.0
        self.zero_norm_step = 0
        self.nonfinite: dict[str, Any] | None = None
        self.region_window: deque[float] = deque(maxlen=cfg.region_loss_window)
        self.region_at: dict[str, float] | None = None
        self.last_step = 0
        self.weights_checked_at: int | None = None

    def record_init(self, scales: dict[str, float], note: str = "") -> None:
        """The scales training starts from, by name (``global``, ``region``, ``hardneg``).

        A fresh run records them; a resumed run restores them with the checkpoint.
        """
        self.init_scales = dict(scales)
        self.init_note = note

    def observe(self, step: int, loss_region: float, zero_norm_frac: float) -> None:
        """Figures of one finished optimizer step."""
        self.last_step = step
        if zero_norm_frac > self.zero_norm_max:
            self.zero_norm_max, self.zero_norm_step = zero_norm_frac, step
        if self.region_at is None:
            self.region_window.append(loss_region)
            if step >= self.cfg.region_loss_by_step:
                self.region_at = {"step": step, "value": sum(self.region_window) / len(self.region_window)}

    def record_nonfinite(self, step: int, what: str, value: float) -> None:
        self.nonfinite = {"step": step, "what": what, "value": value}

    def check_weights(self, step: int, model: nn.Module) -> tuple[str, float] | None:
        """``(what, value)`` of the first NaN/Inf in ``model``'s weights after ``step``, or None.

        The caller stops the run on a finding (recording it with
        :meth:`record_nonfinite`), as for a non-finite loss: nothing is saved.
        """
        self.weights_checked_at = step
        bad = first_nonfinite(model.state_dict().items())
        if bad is None:
            return None
        return f"weight {bad.name} ({bad.count} NaN/Inf values in the model)", bad.value

    def state_dict(self) -> dict[str, Any]:
        """Plain numbers and strings: saved in checkpoints, so a resumed run is judged as a whole."""
        return {
            "init_scales": self.init_scales,
            "init_note": self.init_note,
            "zero_norm_max": self.zero_norm_max,
            "zero_norm_step": self.zero_norm_step,
            "region_window": list(self.region_window),
            "region_at": self.region_at,
            "last_step": self.last_step,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.init_scales = state["init_scales"]
        self.init_note = state["init_note"]
        self.zero_norm_max = state["zero_norm_max"]
        self.zero_norm_step = state["zero_norm_step"]
        self.region_window = deque(state["region_window"], maxlen=self.cfg.region_loss_window)
        self.region_at = state["region_at"]
        self.last_step = state["last_step"]

    def checks(self, bank_state: dict[str, Any]) -> dict[str, dict[str, Any]]:
        """Judge every gate with what was observed so far."""
        return {
            "logit_scale_init": self._logit_scale_check(),
            "memory_bank_enabled_at": self._bank_check(bank_state),
            "finite": self._finite_check(),
            "zero_norm_frac": _check(
                self.zero_norm_max,
                self.cfg.zero_norm_frac_max,
                self.zero_norm_max < self.cfg.zero_norm_frac_max,
                step=self.zero_norm_step,
                note="largest fraction of zero-norm region features in one optimizer step",
            ),
            "region_loss": self._region_check(),
        }

    def _logit_scale_check(self) -> dict[str, Any]:
        expected = self.params.model.logit_scale_init_value
        tol = self.cfg.logit_scale_tolerance
        if self.init_scales is None:
            return _check(None, expected, False, note="training never started")
        worst = max(abs(v - expected) for v in self.init_scales.values())
        passed = worst <= tol
        note = self.init_note
        if not passed:
            shown = ", ".join(f"{k}={v:.4f} (exp={math.exp(v):.2f})" for k, v in self.init_scales.items())
            note = (
                f"training started at {shown}, configured {expected:.4f} (exp={math.exp(expected):.2f})"
                + (
                    "; model.loaded_logit_scale=keep kept the loaded value: set it to reinit to start "
                    "from the configured temperature"
                    if self.params.model.loaded_logit_scale == "keep"
                    else ""
                )
                + (f"; {self.init_note}" if self.init_note else "")
            )
        return _check(self.init_scales, expected, passed, step=0, tolerance=tol, note=note)

    def _bank_check(self, bank_state: dict[str, Any]) -> dict[str, Any]:
        expected = self.params.train.memory_bank_warmup_steps
        if bank_state["size"] == 0:
            return _check(None, expected, True, note="memory bank disabled (train.memory_bank_size=0)")
        enabled_at = bank_state["enabled_at"] if bank_state["enabled"] else None
        passes = bank_state["forward_passes"]
        if enabled_at is None:
            note = (
                f"the run ended after {passes} forward passes, before the warm-up of {expected}: "
                "the bank never switched on"
                if passes < expected
                else f"the bank is still off after {passes} forward passes (warm-up {expected})"
            )
            return _check(None, expected, False, note=note)
        return _check(
            enabled_at,
            expected,
            enabled_at == max(expected, 1),
            note=f"forward passes counted: {passes}; ptr={bank_state['ptr']}, filled={bank_state['filled']}",
        )

    def _finite_check(self) -> dict[str, Any]:
        if self.nonfinite is None:
            checked = self.weights_checked_at
            weights = "not checked" if checked is None else f"checked after optimizer step {checked}"
            return _check(
                0,
                0,
                True,
                step=self.last_step,
                weights_checked_at=checked,
                note=f"losses and gradient norms finite at every step; weights {weights}",
            )
        nf = self.nonfinite
        return _check(
            1, 0, False, step=nf["step"], note=f"{nf['what']} = {nf['value']} at optimizer step {nf['step']}"
        )

    def _region_check(self) -> dict[str, Any]:
        limit, by = self.cfg.region_loss_max, self.cfg.region_loss_by_step
        if self.region_at is not None:
            step, value = self.region_at["step"], self.region_at["value"]
        elif self.region_window:
            step, value = self.last_step, sum(self.region_window) / len(self.region_window)
        else:
            return _check(None, limit, False, note="no training step finished")
        return _check(
            value,
            limit,
            value < limit,
            step=step,
            action=self.cfg.region_loss_action,
            note=f"mean region loss of the last {len(self.region_window)} steps up to step {step} "
            f"(gate: by step {by} or the last step)",
        )

    def write(self, path: Path, bank_state: dict[str, Any]) -> dict[str, dict[str, Any]]:
        """Judge, log failed checks as warnings and write ``path``; returns the checks."""
        checks = self.checks(bank_state)
        for name, check in checks.items():
            if not check["passed"]:
                logger.warning(
                    "health check %s failed: value=%s threshold=%s: %s",
                    name,
                    check["value"],
                    check["threshold"],
                    check.get("note", ""),
                )
        path.parent.mkdir(parents=True, exist_ok=True)
        payload = {"passed": all(c["passed"] for c in checks.values()), "checks": checks}
        write_text_atomic(path, json.dumps(payload, indent=2, default=str) + "\n")
        return checks

    def raise_if_failed(self, checks: dict[str, dict[str, Any]], report: Path) -> None:
        """Raise when a gate set to "fail" failed; ``report`` is where :meth:`write` put the checks."""
        region = checks["region_loss"]
        if not region["passed"] and self.cfg.region_loss_action == "fail":
            raise HealthCheckFailed(
                f"region loss {region['value']:.4f} is not under {region['threshold']} by step {region['step']} "
                f"(train.health.region_loss_action=fail); see {report}"
            )
