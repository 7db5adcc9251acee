"""Plumbing shared by the end-to-end tests: scratch repositories, free ports, polling, stopping servers."""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import yaml
from tiny_config import TINY_MODEL, TINY_REPO_SAMPLE

PROJECT = Path(__file__).resolve().parents[2]

# The whole pipeline in about a minute on 2 cores: a tiny sample, model and training.
TINY_PIPELINE = {
    "sample": {**TINY_REPO_SAMPLE, "test_per_class": 2, "test_normal": 2},
    "frames": {"workers": 1, "train_frames_per_video": 8},
    "model": dict(TINY_MODEL),
    "pretrain": {"steps": 10, "batch_size": 16, "warmup_steps": 2},
    "train": {
        "max_steps": 6,
        "batch_size": 4,
        "num_frames": 4,
        "memory_bank_warmup_steps": 3,
        "memory_bank_size": 16,
        "checkpoint_every": 3,
        "num_workers": 0,
        "warmup_steps": 1,
        "diag_every": 2,
    },
}


def free_port() -> int:
    """A free TCP port on the loopback interface (servers in tests never bind elsewhere)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def until(what: str, check: Callable[[], Any], timeout: float, interval: float = 0.2) -> Any:
    """Poll ``check`` until it returns something truthy; fail naming ``what`` at the deadline."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = check()
        if value:
            return value
        time.sleep(interval)
    pytest.fail(f"timed out after {timeout:.0f} s waiting for {what}")


def wait_healthy(what: str, url: str, proc: subprocess.Popen, log: Path, timeout: float) -> None:
    """Poll ``url`` until it answers 200; fail with the end of ``log`` if ``proc`` exits first or at the deadline."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            pytest.fail(f"{what} exited {proc.returncode}:\n{log.read_text(errors='replace')[-4000:]}")
        try:
            with urllib.request.urlopen(url, timeout=5) as response:
                if response.status == 200:
                    return
        except OSError:  # refused, reset or timed out while it boots
            pass
        time.sleep(0.5)
    pytest.fail(f"{what} not healthy at {url} after {timeout:.0f} s:\n{log.read_text(errors='replace')[-4000:]}")


def stop_group(proc: subprocess.Popen, sig: int = signal.SIGTERM) -> None:
    """Stop a process started in its own session, with everything it started."""
    if proc.poll() is None:
        os.killpg(proc.pid, sig)
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()


def pipeline_env() -> dict[str, str]:
    """The environment a pipeline command runs in: this venv's tools first, the repository's own mlflow.db."""
    env = dict(os.environ)
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}"
    env["DVC_NO_ANALYTICS"] = "1"
    env.pop("MLFLOW_TRACKING_URI", None)
    return env


def scratch_repo(
    repo: Path, overrides: dict[str, dict], copy: tuple[str, ...] = ("dvc.yaml", "fgclip", "pipeline")
) -> Path:
    """A throwaway git + DVC repository holding this project's pipeline, params overridden per section."""
    for name in copy:
        src = PROJECT / name
        (shutil.copytree if src.is_dir() else shutil.copy2)(src, repo / name)
    params = yaml.safe_load((PROJECT / "params.yaml").read_text())
    params["evaluate"]["bootstrap_resamples"] = 100  # as the unit tests' params: a few ms each
    for section, values in overrides.items():
        params[section].update(values)
    (repo / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    env = {**os.environ, "DVC_NO_ANALYTICS": "1"}
    for cmd in (
        ["git", "init", "-q"],
        [sys.executable, "-m", "dvc", "init", "-q"],
        [sys.executable, "-m", "dvc", "config", "core.analytics", "false"],
    ):
        subprocess.run(cmd, cwd=repo, env=env, check=True, capture_output=True, timeout=120)
    return repo
