"""Faults around `dvc repro`, with the real DVC: two runs at once, and a stage that hangs.

(The SIGKILLed training, transient and permanent stage failures are drilled under
the Prefect flow in test_prefect_flow.py.)
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import psutil
import pytest
import yaml
from e2e_helpers import until

from pipeline.stages import StageFailed, run_stage

REPO = Path(__file__).resolve().parents[2]
BIN = Path(sys.executable).parent
pytestmark = pytest.mark.e2e

# Large enough that `fgclip sample` runs for some seconds: the second `dvc repro` must
# start while the first one's stage command is still writing.
SLOW_SAMPLE = {
    "anomaly_classes": ["Arson", "RoadAccidents"],
    "train_per_class": 3,
    "test_per_class": 2,
    "train_normal": 3,
    "test_normal": 2,
    "min_video_frames": 160,
    "max_video_frames": 200,
    "width": 160,
    "height": 120,
}
DVC_LOCK_ERROR = re.compile(r"is busy, it is being blocked by|Unable to acquire lock")


def _env() -> dict[str, str]:
    env = {**os.environ, "DVC_NO_ANALYTICS": "1"}
    env["PATH"] = f"{BIN}{os.pathsep}{env.get('PATH', '')}"
    return env


def _dvc(repo: Path, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "dvc", *args],
        cwd=repo,
        env=_env(),
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )


def _init(repo: Path) -> None:
    for cmd in (["git", "init", "-q"], [sys.executable, "-m", "dvc", "init", "-q"]):
        subprocess.run(cmd, cwd=repo, env=_env(), check=True, capture_output=True, timeout=120)


def _writers(repo: Path) -> dict[str, Any]:
    """DVC's per-path write locks: ``{path: {"pid", "cmd"}}`` (held while a stage command runs)."""
    try:
        return json.loads((repo / ".dvc" / "tmp" / "rwlock").read_text()).get("write", {})
    except (FileNotFoundError, ValueError):  # not written yet, or being rewritten
        return {}


def test_second_dvc_repro_fails_cleanly_on_the_lock_and_nothing_is_corrupted(tmp_path: Path):
    repo = tmp_path / "repo"
    repo.mkdir()
    shutil.copy2(REPO / "dvc.yaml", repo / "dvc.yaml")
    shutil.copytree(REPO / "fgclip", repo / "fgclip")  # the stage's code dependency
    params = yaml.safe_load((REPO / "params.yaml").read_text())
    params["sample"].update(SLOW_SAMPLE)
    (repo / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    _init(repo)

    first = subprocess.Popen(
        [sys.executable, "-m", "dvc", "repro", "-s", "sample"],
        cwd=repo, env=_env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
    )  # fmt: skip
    try:
        # The first run is inside its stage command once it holds the write lock on data/sample.
        until(
            "the first dvc repro to start its stage command",
            lambda: (
                any(w.get("pid") == first.pid for w in _writers(repo).values()) or first.poll() is not None
            ),
            timeout=120,
            interval=0.05,
        )
        assert first.poll() is None, f"the first dvc repro ended too early:\n{first.stdout.read()}"
        second = _dvc(repo, "repro", "-s", "sample")
        first_out, _ = first.communicate(timeout=300)
    finally:
        if first.poll() is None:
            first.kill()
            first.wait()

    second_out = second.stdout + second.stderr
    assert second.returncode != 0, second_out
    assert DVC_LOCK_ERROR.search(second_out), second_out
    assert first.returncode == 0, first_out
    assert "Running stage 'sample'" in first_out

    # Nothing corrupted: sample's outputs hash to what the first run recorded in dvc.lock,
    # no lock is left behind, and the next run finds the stage up to date.
    status = _dvc(repo, "status", "sample")
    assert status.returncode == 0 and "Data and pipelines are up to date." in status.stdout, status.stdout
    assert _writers(repo) == {}
    again = _dvc(repo, "repro", "-s", "sample")
    assert again.returncode == 0 and "Stage 'sample' didn't change, skipping" in again.stdout, again.stdout
    assert json.loads((repo / "data/sample/sample.json").read_text())["videos"] == 15


def test_stage_timeout_kills_dvc_and_the_stage_command(tmp_path: Path, monkeypatch):
    """A hung stage is killed with everything it started: no orphan keeps running."""
    repo = tmp_path / "repo"
    repo.mkdir()
    hang = "import os, time; open('stage.pid', 'w').write(str(os.getpid())); time.sleep(600)"
    stage = {"cmd": f'{sys.executable} -c "{hang}"', "outs": ["out"]}
    (repo / "dvc.yaml").write_text(yaml.safe_dump({"stages": {"sample": stage}}))
    _init(repo)
    monkeypatch.setenv("PATH", _env()["PATH"])
    monkeypatch.setenv("DVC_NO_ANALYTICS", "1")

    with pytest.raises(StageFailed, match=r"dvc repro -s sample timed out after 10 s"):
        run_stage(repo, "sample", timeout=10)
    pid = int((repo / "stage.pid").read_text())

    def gone() -> bool:
        try:
            return psutil.Process(pid).status() == psutil.STATUS_ZOMBIE
        except psutil.NoSuchProcess:
            return True

    until(f"the stage command (pid {pid}) to be gone", gone, timeout=10, interval=0.05)
