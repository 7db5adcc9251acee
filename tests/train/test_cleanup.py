"""Checkpoint cleanup: every removal reason, newest K plus the best, dry run, the run lock, the CLI."""

from __future__ import annotations

import hashlib
import json
import logging
import os
import subprocess
import sys
from fractions import Fraction
from pathlib import Path

import pytest
import torch
from torch import nn

from fgclip.cli import main
from fgclip.config import Params, load_params
from fgclip.errors import FGClipError
from fgclip.train.checkpoints import run_fingerprint, save_checkpoint
from fgclip.train.cleanup import Removal, clean_checkpoints, current_inputs
from fgclip.train.loop import train
from fgclip.train.runlock import LOCK_FILE, RunLock, RunLockedError, read_lock

OLD_TEMPERATURE = {"logit_scale_init_value": 2.6592}  # the users' stale-checkpoint bug


def _save(
    run_dir: Path, step: int, params: Params, loss: float | None, inputs: dict[str, str] | None = None
) -> Path:
    torch.manual_seed(step)
    model = nn.Linear(4, 4)
    fp, fp_params = run_fingerprint(params, inputs)
    meta = {"fingerprint": fp, "fingerprint_params": fp_params, "forward_passes": step}
    if loss is not None:
        meta["loss"] = loss
    # keep=100: the setup must not run into save-time retention.
    return save_checkpoint(run_dir, step, model=model, state={"x": torch.ones(3)}, meta=meta, keep=100)


def _tree(root: Path) -> dict[str, int]:
    return {str(p.relative_to(root)): p.stat().st_size for p in sorted(root.rglob("*")) if p.is_file()}


def _du(path: Path) -> int:
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())


@pytest.fixture
def params() -> Params:
    return Params().with_overrides(train={"run_name": "current", "keep_checkpoints": 2})


@pytest.fixture
def messy_run(tmp_path: Path, params: Params) -> Path:
    """A run directory with one checkpoint of every kind cleanup judges; returns the checkpoint root."""
    run_dir = tmp_path / "current"
    # The old temperature, with the lowest loss of all: stale, never "the best".
    _save(run_dir, 1, params.with_overrides(model=OLD_TEMPERATURE), loss=0.05)
    for step, loss in ((2, 0.2), (3, 0.9), (4, 0.5), (5, 0.6)):
        _save(run_dir, step, params, loss)
    truncated = _save(run_dir, 6, params, 0.1)
    data = (truncated / "model.safetensors").read_bytes()
    (truncated / "model.safetensors").write_bytes(data[: len(data) // 2])
    cut_state = _save(run_dir, 7, params, 0.1)
    data = (cut_state / "state.pt").read_bytes()
    (cut_state / "state.pt").write_bytes(data[: len(data) // 2])
    interrupted = run_dir / "checkpoint-000008.tmp-4242"
    interrupted.mkdir()
    (interrupted / "model.safetensors").write_bytes(b"half a save")
    no_meta = run_dir / "checkpoint-000009"
    no_meta.mkdir()
    (no_meta / "model.safetensors").write_bytes(b"meta.json never landed")
    garbled = _save(run_dir, 10, params, 0.1)
    (garbled / "meta.json").write_text("{not json")
    # Another run name is another configuration, kept on purpose: out of scope.
    _save(tmp_path / "old-temperature", 1, params.with_overrides(model=OLD_TEMPERATURE), loss=0.3)
    return tmp_path


EXPECTED = {
    "checkpoint-000001": "stale: written with other params (model.logit_scale_init_value: 2.6592 -> 4.605170185988092)",
    "checkpoint-000003": "surplus: older than the newest 2 (train.keep_checkpoints), loss 0.9; "
    "best is checkpoint-000002, loss 0.2",
}
BROKEN = {
    "checkpoint-000006": "broken: model.safetensors unreadable",
    "checkpoint-000007": "broken: state.pt unreadable",
    "checkpoint-000008.tmp-4242": "broken: left by an interrupted checkpoint save",
    "checkpoint-000009": "broken: no meta.json (incomplete save)",
    "checkpoint-000010": "broken: meta.json unreadable",
}


def _by_name(removals: list[Removal]) -> dict[str, Removal]:
    return {r.path.name: r for r in removals}


def test_each_reason_and_newest_k_plus_best(
    messy_run: Path, params: Params, caplog: pytest.LogCaptureFixture
) -> None:
    run_dir = messy_run / "current"
    sizes = {p.name: _du(p) for p in run_dir.iterdir()}
    other_before = _tree(messy_run / "old-temperature")
    with caplog.at_level(logging.INFO, logger="fgclip.train.cleanup"):
        removals = clean_checkpoints(params, root=messy_run)

    found = _by_name(removals)
    assert set(found) == set(EXPECTED) | set(BROKEN)
    for name, reason in EXPECTED.items():
        assert found[name].reason == reason
    for name, start in BROKEN.items():
        assert found[name].reason.startswith(start), found[name].reason
    assert all(found[name].size == sizes[name] and sizes[name] > 0 for name in found)
    assert all(r.path.parent == run_dir for r in removals)
    # Newest K=2 of the complete matching ones (4, 5) plus the best (2); nothing else is left.
    assert sorted(p.name for p in run_dir.iterdir()) == [
        "checkpoint-000002",
        "checkpoint-000004",
        "checkpoint-000005",
    ]
    assert _tree(messy_run / "old-temperature") == other_before
    for removal in removals:  # each one said what it removed and why
        assert f"Removed {removal.path}: {removal.reason}" in caplog.text
    # The lock cleanup held while deleting is gone again; a second pass finds nothing.
    assert not (run_dir / LOCK_FILE).exists()
    assert clean_checkpoints(params, root=messy_run) == []


def test_content_and_field_faults_are_broken_and_an_undigested_one_is_kept_with_a_warning(
    tmp_path: Path, params: Params, caplog: pytest.LogCaptureFixture
) -> None:
    run_dir = tmp_path / "current"
    fp, fp_params = run_fingerprint(params)

    def save(step: int) -> Path:
        meta = {"fingerprint": fp, "fingerprint_params": fp_params, "forward_passes": step, "loss": 0.5}
        model = nn.Linear(48, 48)  # 9 KiB of weights
        return save_checkpoint(run_dir, step, model=model, state={"x": torch.ones(3)}, meta=meta, keep=100)

    def edit_meta(path: Path, edit) -> None:
        meta = json.loads((path / "meta.json").read_text())
        edit(meta)
        (path / "meta.json").write_text(json.dumps(meta))

    overwritten = save(1) / "model.safetensors"
    data = bytearray(overwritten.read_bytes())
    data[-4096:] = b"\xff" * 4096  # same size, 1,024 NaN weights: the header still reads
    overwritten.write_bytes(bytes(data))
    edit_meta(save(2), lambda m: m.pop("forward_passes"))
    pickled = save(3)
    torch.save({"x": Fraction(1, 2)}, pickled / "state.pt")
    state = (pickled / "state.pt").read_bytes()
    record = {"sha256": hashlib.sha256(state).hexdigest(), "size": len(state)}
    edit_meta(pickled, lambda m: m.setdefault("files", {}).update({"state.pt": record}))
    undigested = save(4)  # as the code before digests wrote it
    edit_meta(undigested, lambda m: m.pop("files", None))
    save(5)
    stale = _save(run_dir, 6, params.with_overrides(model=OLD_TEMPERATURE), 0.05)
    edit_meta(stale, lambda m: m.pop("forward_passes"))  # what it was trained with still says "stale"

    with caplog.at_level(logging.WARNING, logger="fgclip.train.cleanup"):
        removals = clean_checkpoints(params, root=tmp_path, dry_run=True)
    reasons = {r.path.name: r.reason for r in removals}
    assert reasons == {
        "checkpoint-000001": "broken: model.safetensors does not match the sha256 in meta.json: "
        "its content changed after the save",
        "checkpoint-000002": "broken: meta.json lacks forward_passes",
        "checkpoint-000003": "broken: state.pt refused by torch.load(weights_only=True) "
        "(a pickled object: fractions.Fraction)",
        "checkpoint-000006": EXPECTED["checkpoint-000001"],
    }
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    (warning,) = warnings
    assert warning.startswith(f"Keeping {undigested} although it records no content digests")


def test_dry_run_deletes_nothing_and_lists_the_same(messy_run: Path, params: Params) -> None:
    before = _tree(messy_run)
    planned = clean_checkpoints(params, root=messy_run, dry_run=True)
    assert _tree(messy_run) == before
    assert set(_by_name(planned)) == set(EXPECTED) | set(BROKEN)
    assert clean_checkpoints(params, root=messy_run) == planned


def test_default_root_comes_from_params(tmp_path: Path) -> None:
    params = Params.model_validate(
        {**Params().model_dump(exclude={"base_dir"}), "base_dir": tmp_path, "train": {"run_name": "r"}}
    )
    stale = _save(tmp_path / "checkpoints" / "r", 1, params.with_overrides(train={"batch_size": 2}), 0.5)
    assert [r.path for r in clean_checkpoints(params)] == [stale]
    assert clean_checkpoints(params.with_overrides(train={"run_name": "absent"})) == []


def test_input_hashes_are_compared_only_when_given(tmp_path: Path, params: Params) -> None:
    old_inputs = {"input.base_model": "aaa", "input.frames_index": "bbb", "input.boxes": "ccc"}
    new_inputs = {**old_inputs, "input.boxes": "ddd"}  # the boxes were re-validated since
    path = _save(tmp_path / "current", 1, params, 0.5, inputs=old_inputs)
    assert clean_checkpoints(params, root=tmp_path, inputs=None) == []
    assert clean_checkpoints(params, root=tmp_path, inputs=old_inputs) == []
    (removal,) = clean_checkpoints(params, root=tmp_path, inputs=new_inputs)
    assert (
        removal.path == path
        and removal.reason == "stale: written with other params (input.boxes: 'ccc' -> 'ddd')"
    )


def test_current_inputs_without_frames_is_a_clear_error(tmp_path: Path, params: Params) -> None:
    with pytest.raises(FGClipError, match=r"index\.parquet not found"):
        current_inputs(params, model="openai/clip-vit-base-patch32", frames=tmp_path / "frames")


def _hold_lock_in_child(run_dir: Path) -> subprocess.Popen:
    """A separate process that takes the run lock and keeps it until its stdin closes."""
    code = (
        "import sys; from pathlib import Path; from fgclip.train.runlock import RunLock; "
        "RunLock(Path(sys.argv[1])).acquire(Path(sys.argv[1]) / 'checkpoint-000005'); "
        "print('locked', flush=True); sys.stdin.read()"
    )
    child = subprocess.Popen(
        [sys.executable, "-c", code, str(run_dir)], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True
    )
    assert child.stdout.readline().strip() == "locked"
    return child


def test_live_lock_protects_the_run_and_a_dead_one_does_not(
    messy_run: Path, params: Params, caplog: pytest.LogCaptureFixture
) -> None:
    run_dir = messy_run / "current"
    child = _hold_lock_in_child(run_dir)
    before = _tree(run_dir)
    try:
        with caplog.at_level(logging.WARNING, logger="fgclip.train"):
            assert clean_checkpoints(params, root=messy_run) == []
            assert clean_checkpoints(params, root=messy_run, dry_run=True) == []
        assert _tree(run_dir) == before
        assert f"Not cleaning {run_dir}: in use by train (pid {child.pid} on " in caplog.text
        assert "checkpoint-000005" in caplog.text  # the checkpoint the holder uses
        # SIGKILL: the lock file stays behind. Wait for the exit without reaping the child:
        # a zombie still answers os.kill(pid, 0), yet its lock is stale.
        child.kill()
        os.waitid(os.P_PID, child.pid, os.WEXITED | os.WNOWAIT)
        assert read_lock(run_dir)["pid"] == child.pid
        caplog.clear()
        with caplog.at_level(logging.WARNING, logger="fgclip.train"):
            dry = clean_checkpoints(params, root=messy_run, dry_run=True)
            assert read_lock(run_dir)["pid"] == child.pid  # a dry run changes nothing, the lock included
            removals = clean_checkpoints(params, root=messy_run)
        assert f"pid {child.pid}" in caplog.text and "is stale" in caplog.text
    finally:
        child.kill()
        child.wait()
        child.stdout.close()
        child.stdin.close()
    assert set(_by_name(removals)) == set(_by_name(dry)) == set(EXPECTED) | set(BROKEN)
    assert not (run_dir / LOCK_FILE).exists()


def test_second_training_job_on_a_locked_run_fails_clearly(tmp_path: Path, params: Params) -> None:
    params = params.with_overrides(train={"device": "cpu"})
    run_dir = tmp_path / "checkpoints" / "current"
    with RunLock(run_dir) as lock:
        lock.update(run_dir / "checkpoint-000002")
        assert read_lock(run_dir)["checkpoint"] == str(run_dir / "checkpoint-000002")
        # Nothing of the second job runs: it fails before reading its (here absent) inputs.
        with pytest.raises(RunLockedError) as err:
            train(params, tmp_path / "f", tmp_path / "b", "m", tmp_path / "out", tmp_path / "checkpoints",
                  tmp_path / "health.json")  # fmt: skip
        message = str(err.value)
        assert f"{run_dir} is in use by train (pid {os.getpid()} on " in message
        assert str(run_dir / LOCK_FILE) in message and "checkpoint-000002" in message
        # The failed job left the holder's lock alone.
        assert read_lock(run_dir)["pid"] == os.getpid()
    assert not (run_dir / LOCK_FILE).exists()


def _params_file(tmp_path: Path) -> Path:
    path = tmp_path / "params.yaml"
    path.write_text("train:\n  run_name: current\n  checkpoints: ckpts\n  keep_checkpoints: 2\n")
    return path


def test_cli_lists_then_removes_with_reasons_and_a_total(
    messy_run: Path, tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    params_file = _params_file(tmp_path)
    params = load_params(params_file)
    assert params.train.run_name == "current"
    before = _tree(messy_run)
    args = ["checkpoints", "clean", "--params", str(params_file), "--checkpoints", str(messy_run)]

    assert main([*args, "--dry-run"]) == 0
    out = capsys.readouterr().out.splitlines()
    assert _tree(messy_run) == before
    run_dir = messy_run / "current"
    assert f"would remove {run_dir / 'checkpoint-000001'}: {EXPECTED['checkpoint-000001']}" in out
    assert f"would remove {run_dir / 'checkpoint-000003'}: {EXPECTED['checkpoint-000003']}" in out
    assert len(out) == len(EXPECTED) + len(BROKEN) + 1
    assert out[-1].startswith("would remove 7 checkpoint(s), ") and out[-1].endswith("KiB")

    assert main(args) == 0
    out = capsys.readouterr().out.splitlines()
    assert f"removed {run_dir / 'checkpoint-000003'}: {EXPECTED['checkpoint-000003']}" in out
    assert out[-1].startswith("removed 7 checkpoint(s), ")
    assert sorted(p.name for p in run_dir.iterdir()) == [
        "checkpoint-000002",
        "checkpoint-000004",
        "checkpoint-000005",
    ]
    assert main(args) == 0
    assert capsys.readouterr().out == "removed 0 checkpoint(s), 0 B\n"


def test_cli_errors_are_one_line(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    params_file = _params_file(tmp_path)
    (tmp_path / "ckpts" / "current").mkdir(parents=True)
    code = main(["checkpoints", "clean", "--params", str(params_file), "--check-inputs", "--model", "m"])
    assert code == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("fgclip checkpoints: error: cannot hash the training inputs")


def test_lock_file_is_json_naming_its_holder(tmp_path: Path) -> None:
    with RunLock(tmp_path / "run", owner="train") as lock:
        holder = json.loads(lock.path.read_text())
        assert holder["pid"] == os.getpid() and holder["owner"] == "train" and holder["checkpoint"] is None
    assert not lock.path.exists()
