"""Atomic, fingerprinted checkpoints: round trip, skipped partial saves, stale refusal, retention,
content digests, meta.json field checks, refused pickles, checkpoints from before digests, failed saves.

Also the fault drills of a truncated and an overwritten newest checkpoint, through the real training loop.
"""

from __future__ import annotations

import csv
import hashlib
import json
import logging
import random
import subprocess
import sys
from fractions import Fraction
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file
from torch import nn

from fgclip.config import Params
from fgclip.errors import FGClipError
from fgclip.model.memory_bank import RegionMemoryBank
from fgclip.train.checkpoints import (
    StaleCheckpointError,
    capture_rng_state,
    checkpoint_dir,
    input_fingerprint,
    latest_resumable,
    load_checkpoint,
    restore_rng_state,
    resume_latest,
    run_fingerprint,
    save_checkpoint,
    select_kept,
    verify_export,
)
from fgclip.train.loop import train
from fgclip.train.optim import build_optimizer, cosine_with_warmup


def _parts(seed: int, width: int = 6) -> tuple[nn.Module, torch.optim.Optimizer, object, RegionMemoryBank]:
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Linear(width, width), nn.LayerNorm(width))
    opt = build_optimizer(model, lr=1e-2, weight_decay=0.1)
    sched = cosine_with_warmup(opt, warmup_steps=2, total_steps=10)
    bank = RegionMemoryBank(size=8, dim=6, warmup_steps=1)
    return model, opt, sched, bank


def _train(model, opt, sched, bank, steps: int) -> None:
    for step in range(1, steps + 1):
        x = torch.randn(4, 6)
        loss = model(x).pow(2).mean()
        loss.backward()
        opt.step()
        sched.step()
        opt.zero_grad()
        bank.begin_pass(step)
        bank.enqueue(torch.randn(3, 6), torch.randn(3, 6), torch.arange(3))


def _save(run_dir: Path, step: int, parts, params: Params, keep: int = 5, loss: float | None = None) -> Path:
    model, opt, sched, bank = parts
    fp, fp_params = run_fingerprint(params)
    state = {
        "optimizer": opt.state_dict(),
        "scheduler": sched.state_dict(),
        "memory_bank": bank.state_dict(),
        "rng": capture_rng_state(),
        "forward_passes": step,
    }
    meta = {"fingerprint": fp, "fingerprint_params": fp_params, "forward_passes": step}
    if loss is not None:
        meta["loss"] = loss
    return save_checkpoint(run_dir, step, model=model, state=state, meta=meta, keep=keep)


def test_round_trip_restores_weights_optimizer_bank_and_rng(tmp_path: Path) -> None:
    params = Params()
    parts = _parts(0)
    _train(*parts, steps=3)
    random.seed(5)
    np.random.seed(5)
    path = _save(tmp_path, 3, parts, params)
    expected_draws = (random.random(), np.random.rand(), torch.rand(1).item())

    model, opt, sched, bank = _parts(1)  # different init: everything must come from disk
    state, meta = load_checkpoint(path, model)
    opt.load_state_dict(state["optimizer"])
    sched.load_state_dict(state["scheduler"])
    bank.load_state_dict(state["memory_bank"])
    restore_rng_state(state["rng"])

    src_model, src_opt, src_sched, src_bank = parts
    assert meta["step"] == 3 and meta["forward_passes"] == 3
    for a, b in zip(model.state_dict().values(), src_model.state_dict().values()):
        assert torch.equal(a, b)
    for key, value in src_opt.state_dict()["state"][0].items():
        assert torch.equal(opt.state_dict()["state"][0][key], value)
    assert sched.get_last_lr() == src_sched.get_last_lr()
    assert bank.state() == src_bank.state()
    assert torch.equal(bank.image_queue, src_bank.image_queue)
    assert (random.random(), np.random.rand(), torch.rand(1).item()) == expected_draws


def test_partial_and_corrupt_saves_are_skipped(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    params = Params()
    fp, fp_params = run_fingerprint(params)
    parts = _parts(0)
    good = _save(tmp_path, 4, parts, params)
    # An interrupted save (still in its temporary directory) ...
    tmp = tmp_path / "checkpoint-000005.tmp-4242"
    tmp.mkdir()
    (tmp / "model.safetensors").write_bytes((good / "model.safetensors").read_bytes())
    # ... a directory whose meta.json (written last) never landed ...
    no_meta = checkpoint_dir(tmp_path, 6)
    no_meta.mkdir()
    (no_meta / "model.safetensors").write_bytes((good / "model.safetensors").read_bytes())
    # ... and one whose state.pt was truncated.
    corrupt = _save(tmp_path, 7, parts, params)
    data = (corrupt / "state.pt").read_bytes()
    (corrupt / "state.pt").write_bytes(data[: len(data) // 2])

    with caplog.at_level(logging.WARNING, logger="fgclip.train.checkpoints"):
        assert latest_resumable(tmp_path, fp, fp_params) == good
    text = caplog.text
    assert "checkpoint-000005.tmp-4242" in text and "interrupted" in text
    assert "checkpoint-000006" in text and "no meta.json" in text
    assert "checkpoint-000007" in text and "state.pt" in text


def test_no_checkpoint_means_fresh_start(tmp_path: Path) -> None:
    fp, fp_params = run_fingerprint(Params())
    assert latest_resumable(tmp_path / "missing", fp, fp_params) is None


def test_stale_fingerprint_is_refused_naming_each_param(tmp_path: Path) -> None:
    old = Params().with_overrides(model={"logit_scale_init_value": 2.6592}, train={"batch_size": 4})
    _save(tmp_path, 2, _parts(0), old)
    new = Params()
    fp, fp_params = run_fingerprint(new)
    with pytest.raises(StaleCheckpointError) as err:
        latest_resumable(tmp_path, fp, fp_params)
    message = str(err.value)
    assert "model.logit_scale_init_value: 2.6592 -> 4.605170185988092" in message
    assert "train.batch_size: 4 -> 8" in message
    assert "train.run_name" in message and str(tmp_path) in message
    # Params outside the fingerprint (run length, logging) do not make a checkpoint stale.
    same = Params().with_overrides(train={"max_steps": 999, "log_every": 5, "num_workers": 0})
    assert run_fingerprint(same)[0] == fp


def test_a_checkpoint_from_before_fgclips_recipe_is_refused_by_name(tmp_path: Path) -> None:
    """Weights trained without the value branch, adaptive RoIAlign and hard negatives."""
    path = _save(tmp_path, 2, _parts(0), Params())
    meta = json.loads((path / "meta.json").read_text())
    for key in ("model.format_version", "model.roi_sampling_ratio", "model.max_caption_len",
                "train.hardneg_loss_weight", "train.max_hard_negatives"):  # fmt: skip
        del meta["fingerprint_params"][key]
    meta["fingerprint"] = "written-by-an-older-version"
    (path / "meta.json").write_text(json.dumps(meta))
    fp, fp_params = run_fingerprint(Params())
    with pytest.raises(StaleCheckpointError) as err:
        latest_resumable(tmp_path, fp, fp_params)
    message = str(err.value)
    assert "model.format_version: '<absent>' -> 2" in message
    assert "model.roi_sampling_ratio: '<absent>' -> -1" in message
    assert "train.hardneg_loss_weight: '<absent>' -> 0.5" in message


def test_changed_learning_rate_is_refused(tmp_path: Path) -> None:
    """Resuming a finished run after an lr change would hand back the old model unchanged."""
    _save(tmp_path, 2, _parts(0), Params())
    fp, fp_params = run_fingerprint(Params().with_overrides(train={"lr": 1e-4}))
    with pytest.raises(StaleCheckpointError, match=r"train.lr: 0.0003 -> 0.0001"):
        latest_resumable(tmp_path, fp, fp_params)


def test_input_fingerprint_follows_base_model_and_data_contents(tmp_path: Path) -> None:
    base, frames, boxes = tmp_path / "clip", tmp_path / "frames", tmp_path / "boxes"
    for d in (base, frames, boxes):
        d.mkdir()
    (base / "model.safetensors").write_bytes(b"weights v1")
    (frames / "index.parquet").write_bytes(b"index v1")
    (boxes / "part-00000.parquet").write_bytes(b"boxes v1")
    (boxes / "manifest.json").write_text("{}")
    first = input_fingerprint(base, frames, boxes)
    assert input_fingerprint(base, frames, boxes) == first
    assert input_fingerprint("openai/clip-vit-base-patch32", frames, boxes)["input.base_model"] == (
        "openai/clip-vit-base-patch32"
    )
    # A run report beside the weights (its timing differs between identical runs) is not the model.
    (base / "pretrain.json").write_text('{"seconds": 76.3}')
    assert input_fingerprint(base, frames, boxes) == first
    (base / "config.json").write_text('{"hidden_size": 96}')
    assert input_fingerprint(base, frames, boxes)["input.base_model"] != first["input.base_model"]
    first = input_fingerprint(base, frames, boxes)
    (base / "model.safetensors").write_bytes(b"weights v2")  # a re-pretrained stand-in
    second = input_fingerprint(base, frames, boxes)
    assert second["input.base_model"] != first["input.base_model"]
    (boxes / "part-00000.parquet").write_bytes(b"boxes v2")  # re-validated boxes
    assert input_fingerprint(base, frames, boxes)["input.boxes"] != second["input.boxes"]
    fp1, _ = run_fingerprint(Params(), first)
    fp2, _ = run_fingerprint(Params(), second)
    assert fp1 != fp2


def test_retention_keeps_newest_and_overwrite_is_atomic(tmp_path: Path) -> None:
    params = Params()
    parts = _parts(0)
    for step in (1, 2, 3):
        _save(tmp_path, step, parts, params, keep=2)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["checkpoint-000002", "checkpoint-000003"]
    # A fresh run saving a step that already exists replaces it whole.
    _train(*parts, steps=1)
    path = _save(tmp_path, 3, parts, params, keep=2)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["checkpoint-000002", "checkpoint-000003"]
    model = nn.Sequential(nn.Linear(6, 6), nn.LayerNorm(6))
    load_checkpoint(path, model)
    assert torch.equal(model[0].weight, parts[0][0].weight)
    assert json.loads((path / "meta.json").read_text())["step"] == 3


def _names(run_dir: Path) -> list[str]:
    return sorted(p.name for p in run_dir.iterdir() if p.name.startswith("checkpoint-"))


def test_retention_also_keeps_the_lowest_loss_of_this_configuration(tmp_path: Path) -> None:
    params = Params()
    parts = _parts(0)
    # An old configuration's checkpoint with the lowest loss of all: it must not be pinned as
    # the best, or every later resume would be refused as stale.
    _save(tmp_path, 1, parts, Params().with_overrides(model={"logit_scale_init_value": 2.6592}), loss=0.01)
    for step, loss in ((2, 0.2), (3, 0.9), (4, 0.5), (5, 0.6)):
        _save(tmp_path, step, parts, params, keep=2, loss=loss)
    assert _names(tmp_path) == ["checkpoint-000002", "checkpoint-000004", "checkpoint-000005"]
    # Without any recorded loss it is the newest K, as before.
    other = tmp_path / "no-loss"
    for step in (1, 2, 3):
        _save(other, step, parts, params, keep=2)
    assert _names(other) == ["checkpoint-000002", "checkpoint-000003"]


def test_a_save_behind_later_checkpoints_is_never_deleted_by_them(tmp_path: Path) -> None:
    """A run resumed past broken later checkpoints: those must not push out what it saves."""
    params, parts = Params(), _parts(0)
    for step in (4, 5):
        _save(tmp_path, step, parts, params, keep=2, loss=0.01)  # say both later turned out broken
    _save(tmp_path, 1, parts, params, keep=1, loss=0.9)
    _save(tmp_path, 2, parts, params, keep=1, loss=0.8)
    # The newest and best up to step 2 is step 2; 4 and 5 are left for the run to overwrite.
    assert _names(tmp_path) == ["checkpoint-000002", "checkpoint-000004", "checkpoint-000005"]


def test_select_kept_breaks_ties_towards_the_newer_and_ignores_non_finite() -> None:
    ckpts = [
        (1, Path("c1"), {"fingerprint": "a", "loss": 0.3}),
        (2, Path("c2"), {"fingerprint": "a", "loss": float("nan")}),
        (3, Path("c3"), {"fingerprint": "a", "loss": 0.3}),
        (4, Path("c4"), {"fingerprint": "a", "loss": 0.7}),
        (5, Path("c5"), {"fingerprint": "a"}),
    ]
    kept, best = select_kept(ckpts, 1)
    assert best is not None and best[1] == Path("c3")
    assert kept == {Path("c3"), Path("c5")}
    assert select_kept(ckpts, 1, "b") == ({Path("c5")}, None)


def _train_into(root: Path, params, frames: Path, boxes: Path, clip: Path) -> dict:
    """`fgclip train` with every output under ``root``."""
    return train(
        params, frames, boxes, str(clip), root / "out", root / "checkpoints", root / "health.json",
        metrics_path=root / "train.json", loss_csv=root / "loss.csv",
    )  # fmt: skip


def _loss_rows(path: Path) -> list[dict[str, str]]:
    with path.open() as f:
        return list(csv.DictReader(f))


def test_truncated_newest_checkpoint_is_skipped_when_training_resumes(
    train_params,
    tiny_clip,
    tiny_frames: Path,
    tiny_boxes: Path,
    tmp_path: Path,
    caplog: pytest.LogCaptureFixture,
) -> None:
    """Fault drill: the newest checkpoint's weights cut in half (a full disk, a copy killed midway)."""
    params = train_params(train={"max_steps": 3})  # checkpoints at step 2 and at the last one, 3

    def run(root: Path) -> dict:
        return _train_into(root, params, tiny_frames, tiny_boxes, tiny_clip[0])

    first = run(tmp_path)
    assert first["steps"] == 3
    run_dir = tmp_path / "checkpoints" / params.train.run_name
    assert _names(run_dir) == ["checkpoint-000002", "checkpoint-000003"]
    reference = [float(row["loss"]) for row in _loss_rows(tmp_path / "loss.csv")]
    # Each checkpoint is scored with the mean loss of the steps since the previous one.
    good = json.loads((run_dir / "checkpoint-000002" / "meta.json").read_text())
    assert good["loss"] == pytest.approx((reference[0] + reference[1]) / 2)
    weights = run_dir / "checkpoint-000003" / "model.safetensors"
    data = weights.read_bytes()
    weights.write_bytes(data[: len(data) // 2])

    with caplog.at_level(logging.WARNING, logger="fgclip.train.checkpoints"):
        second = run(tmp_path)
    assert second["start_step"] == 2 and second["steps"] == 3
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert any("checkpoint-000003" in w and "model.safetensors unreadable" in w for w in warnings), warnings
    # Resumed from step 2 exactly: step 3 is trained again and gives the same loss.
    assert [float(row["loss"]) for row in _loss_rows(tmp_path / "loss.csv")] == reference
    # Step 3 is saved whole again (scored with its own loss), and the run's lock is gone.
    meta = json.loads((run_dir / "checkpoint-000003" / "meta.json").read_text())
    assert meta["loss"] == pytest.approx(reference[2])
    resumable = latest_resumable(run_dir, meta["fingerprint"], meta["fingerprint_params"])
    assert resumable == run_dir / "checkpoint-000003"
    assert not (run_dir / "train.lock").exists()


def _overwrite_4k(path: Path) -> None:
    """Overwrite 4 KiB of tensor data mid-file with 0xFF (1,024 float32 NaNs); the size stays the same."""
    data = bytearray(path.read_bytes())
    header = 8 + int.from_bytes(data[:8], "little")
    start = header + (len(data) - header - 4096) // 8 * 4
    assert start >= header, "the file holds less than 4 KiB of tensor data"
    data[start : start + 4096] = b"\xff" * 4096
    path.write_bytes(bytes(data))


def _edit_meta(path: Path, edit) -> None:
    meta = json.loads((path / "meta.json").read_text())
    edit(meta)
    (path / "meta.json").write_text(json.dumps(meta))


def _warnings(caplog: pytest.LogCaptureFixture) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]


def test_overwritten_weights_fail_their_digest_and_the_previous_is_used(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    params = Params()
    fp, fp_params = run_fingerprint(params)
    parts = _parts(0, width=48)
    good = _save(tmp_path, 2, parts, params)
    newest = _save(tmp_path, 3, parts, params)
    meta = json.loads((newest / "meta.json").read_text())
    digests = {
        name: hashlib.sha256((newest / name).read_bytes()).hexdigest() for name in meta.get("files", {})
    }
    size = (newest / "model.safetensors").stat().st_size
    _overwrite_4k(newest / "model.safetensors")
    assert (newest / "model.safetensors").stat().st_size == size

    with caplog.at_level(logging.WARNING, logger="fgclip.train.checkpoints"):
        assert latest_resumable(tmp_path, fp, fp_params) == good
    (warning,) = _warnings(caplog)
    assert warning.startswith(f"Skipping checkpoint {newest}: model.safetensors does not match the sha256")
    # Loading it directly is a one-line error, and the model is left as it was.
    model = _parts(1, width=48)[0]
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(FGClipError, match="model.safetensors does not match the sha256") as err:
        load_checkpoint(newest, model)
    assert "\n" not in str(err.value)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    # What meta.json recorded is what the save wrote: hashed by reading the files back.
    assert {name: record["sha256"] for name, record in meta["files"].items()} == digests
    assert meta["files"]["model.safetensors"]["size"] == size and set(digests) == {
        "model.safetensors",
        "state.pt",
    }


@pytest.mark.parametrize(
    ("edit", "reason"),
    [
        (lambda m: m.pop("forward_passes"), "meta.json lacks forward_passes"),
        (lambda m: m.update(forward_passes="12"), "meta.json field forward_passes is '12' (str), not int"),
        (
            lambda m: m.update(fingerprint_params=[1, 2]),
            "field fingerprint_params is [1, 2] (list), not dict",
        ),
        (lambda m: m.update(step=7), "meta.json says step 7, its directory name step 3"),
        (lambda m: m["files"].pop("state.pt"), "field files holds no valid sha256 and size for state.pt"),
    ],
    ids=["missing", "mistyped", "fingerprint_params-list", "wrong-step", "digest-missing"],
)
def test_missing_or_mistyped_meta_field_is_a_broken_checkpoint(
    tmp_path: Path, caplog: pytest.LogCaptureFixture, edit, reason: str
) -> None:
    params = Params()
    fp, fp_params = run_fingerprint(params)
    parts = _parts(0)
    good = _save(tmp_path, 2, parts, params)
    bad = _save(tmp_path, 3, parts, params)
    _edit_meta(bad, edit)
    with caplog.at_level(logging.WARNING, logger="fgclip.train.checkpoints"):
        assert latest_resumable(tmp_path, fp, fp_params) == good
    (warning,) = _warnings(caplog)
    assert warning.startswith(f"Skipping checkpoint {bad}: ") and reason in warning
    # With no good one left, resuming is a fresh start with the model untouched, not a traceback.
    _edit_meta(good, edit)
    model = _parts(1)[0]
    before = {k: v.clone() for k, v in model.state_dict().items()}
    assert resume_latest(tmp_path, fp, fp_params, model) is None
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())


def test_state_refused_by_weights_only_is_a_broken_checkpoint(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    params = Params()
    fp, fp_params = run_fingerprint(params)
    parts = _parts(0)
    good = _save(tmp_path, 2, parts, params)
    bad = _save(tmp_path, 3, parts, params)
    torch.save({"optimizer": Fraction(1, 2)}, bad / "state.pt")  # a global weights_only refuses
    data = (bad / "state.pt").read_bytes()
    # Recorded as if saved so: the refusal, not the digest, is what rejects it.
    record = {"sha256": hashlib.sha256(data).hexdigest(), "size": len(data)}
    _edit_meta(bad, lambda m: m.setdefault("files", {}).update({"state.pt": record}))
    with caplog.at_level(logging.WARNING, logger="fgclip.train.checkpoints"):
        assert latest_resumable(tmp_path, fp, fp_params) == good
    (warning,) = _warnings(caplog)
    assert "state.pt refused by torch.load(weights_only=True)" in warning and "fractions.Fraction" in warning
    with pytest.raises(FGClipError, match="refused by torch.load"):
        load_checkpoint(bad, _parts(1)[0])


def test_checkpoint_from_before_digests_is_resumed_with_a_warning_unless_its_weights_are_not_finite(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """The previous code wrote no ``files`` in meta.json: still resumable, never silently trusted."""
    params = Params()
    fp, fp_params = run_fingerprint(params)
    parts = _parts(0, width=48)
    old_good = _save(tmp_path, 2, parts, params)
    old_newest = _save(tmp_path, 3, parts, params)
    for path in (old_good, old_newest):
        _edit_meta(path, lambda m: m.pop("files", None))
    with caplog.at_level(logging.WARNING, logger="fgclip.train.checkpoints"):
        assert latest_resumable(tmp_path, fp, fp_params) == old_newest
    (warning,) = _warnings(caplog)
    assert warning.startswith(f"Resuming from checkpoint {old_newest} although it records no content digests")

    caplog.clear()
    _overwrite_4k(old_newest / "model.safetensors")  # nothing to compare with: the NaNs give it away
    with caplog.at_level(logging.WARNING, logger="fgclip.train.checkpoints"):
        assert latest_resumable(tmp_path, fp, fp_params) == old_good
    warnings = _warnings(caplog)
    assert len(warnings) == 2, warnings  # the broken one, then the caveat of the one resumed
    assert warnings[0] == (
        f"Skipping checkpoint {old_newest}: model.safetensors holds 1024 NaN/Inf weights "
        "(first in 0.weight, nan)"
    )


_FULL_DISK_CHILD = """
import json, resource, signal, sys
from pathlib import Path
import torch
from torch import nn
from fgclip.config import Params
from fgclip.train.checkpoints import run_fingerprint, save_checkpoint

run_dir = Path(sys.argv[1])
fp, fp_params = run_fingerprint(Params())
meta = {"fingerprint": fp, "fingerprint_params": fp_params, "forward_passes": 1}
model = nn.Linear(6, 6)
save_checkpoint(run_dir, 1, model=model, state={"x": torch.ones(3)}, meta=meta, keep=5)
# A real write limit: a write past 16 KiB fails (EFBIG), as on a full disk (ENOSPC).
signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
resource.setrlimit(resource.RLIMIT_FSIZE, (16384, 16384))
errors = []
for step, big_model, state in ((2, nn.Linear(128, 128), {"x": torch.ones(3)}),
                               (3, model, {"x": torch.ones(100_000)})):
    try:
        save_checkpoint(run_dir, step, model=big_model, state=state, meta=meta, keep=5)
    except Exception as exc:
        errors.append([type(exc).__name__, str(exc), isinstance(exc.__cause__, Exception)])
print(json.dumps(errors))
"""


def test_failed_save_on_a_full_disk_removes_its_temporary_files(tmp_path: Path) -> None:
    run_dir = tmp_path / "run"
    child = subprocess.run(
        [sys.executable, "-c", _FULL_DISK_CHILD, str(run_dir)],
        check=False,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert child.returncode == 0, child.stderr
    errors = json.loads(child.stdout.strip().splitlines()[-1])
    assert len(errors) == 2  # the weights failed to write, then the state
    assert sorted(p.name for p in run_dir.iterdir()) == ["checkpoint-000001"]  # no .tmp-<pid> left
    for (kind, message, chained), step in zip(errors, (2, 3)):
        assert kind == "CheckpointSaveError" and chained
        assert message.startswith(f"could not save checkpoint {checkpoint_dir(run_dir, step)}: ")
        assert "partial files were removed" in message and "\n" not in message
    fp, fp_params = run_fingerprint(Params())
    assert latest_resumable(run_dir, fp, fp_params) == checkpoint_dir(run_dir, 1)


def test_export_is_read_back_and_a_corrupt_one_is_removed(tmp_path: Path) -> None:
    model = _parts(0, width=48)[0]
    weights = tmp_path / "model.safetensors"
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(weights))
    verify_export(tmp_path, model)
    _overwrite_4k(weights)
    with pytest.raises(FGClipError, match=r"holds 1024 NaN/Inf weights .*the model was not published"):
        verify_export(tmp_path, model)
    assert not weights.exists()
    save_file({k: v.contiguous() + 1 for k, v in model.state_dict().items()}, str(weights))
    with pytest.raises(FGClipError, match=r"differs from the trained weights in 4 tensor"):
        verify_export(tmp_path, model)


def test_overwritten_newest_checkpoint_is_neither_resumed_nor_published(
    train_params,
    tiny_clip,
    tiny_frames: Path,
    tiny_boxes: Path,
    tmp_path: Path,
    caplog: pytest.LogCaptureFixture,
) -> None:
    """Fault drill of the issue: 4 KiB of the finished run's last checkpoint overwritten, then a rerun."""
    params = train_params(train={"max_steps": 3})  # checkpoints at step 2 and at the last one, 3

    def run(root: Path) -> dict:
        return _train_into(root, params, tiny_frames, tiny_boxes, tiny_clip[0])

    run(tmp_path)
    reference = load_file(tmp_path / "out" / "model.safetensors")
    losses = _loss_rows(tmp_path / "loss.csv")
    newest = tmp_path / "checkpoints" / params.train.run_name / "checkpoint-000003"
    _overwrite_4k(newest / "model.safetensors")

    with caplog.at_level(logging.WARNING, logger="fgclip.train.checkpoints"):
        second = run(tmp_path)
    expected = (
        f"Skipping checkpoint {newest}: model.safetensors does not match the sha256 in meta.json: "
        "its content changed after the save"
    )
    assert [w for w in _warnings(caplog) if "checkpoint-" in w] == [expected]
    # Resumed from step 2, step 3 trained again: the same losses and the same, finite, weights.
    assert second["start_step"] == 2 and second["steps"] == 3
    assert _loss_rows(tmp_path / "loss.csv") == losses
    published = load_file(tmp_path / "out" / "model.safetensors")
    assert published.keys() == reference.keys()
    assert all(torch.isfinite(v).all() and torch.equal(v, reference[k]) for k, v in published.items())
    finite = json.loads((tmp_path / "health.json").read_text())["checks"]["finite"]
    assert finite["passed"] is True and finite["weights_checked_at"] == 3
