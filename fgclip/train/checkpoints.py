"""Atomic, fingerprinted training checkpoints.

Layout: ``<checkpoints>/<run_name>/checkpoint-<step:06d>/`` holding
``model.safetensors`` (model weights), ``state.pt`` (optimizer, scheduler,
memory bank, RNG states, counters: tensors, dicts, lists and numbers only, so it
loads with ``weights_only=True``) and ``meta.json``.

A checkpoint is built in ``checkpoint-<step>.tmp-<pid>``, every file fsynced,
``meta.json`` written last, then renamed into place: a directory without
``meta.json`` (or a ``.tmp-*`` one) is an interrupted save and is never resumed
from. The fingerprint covers every param that changes what the weights mean
(model, loss, batch shapes): resuming across such a change mixed a wrong
temperature into the users' old runs, so a mismatch is an error, never a guess.

Retention keeps the newest ``train.keep_checkpoints`` plus the best (lowest
``loss`` in meta.json) of the run's configuration; ``fgclip.train.cleanup``
applies the same rule (:func:`select_kept`) and also removes stale and broken
checkpoints.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import os
import random
import re
import shutil
import time
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors import safe_open
from safetensors.torch import load_model, save_model
from torch import nn

from fgclip.config import Params, fingerprint, model_source
from fgclip.data.layout import INDEX_FILE, MANIFEST_FILE
from fgclip.errors import FGClipError
from fgclip.model.losses import REGION_NEGATIVES
from fgclip.model.memory_bank import ID_COLUMNS

logger = logging.getLogger(__name__)

MODEL_FILE = "model.safetensors"
STATE_FILE = "state.pt"
META_FILE = "meta.json"
_NAME = re.compile(r"^checkpoint-(\d{6,})$")

# train.* keys that change the model or the loss: a different batch size changes
# the number of in-batch negatives, the bank warm-up when it switches on, etc.
FINGERPRINT_TRAIN_KEYS = [
    "num_frames",
    "max_regions",
    "max_keyframes",
    "region_loss_weight",
    "memory_bank_size",
    "memory_bank_warmup_steps",
    "grad_accum_steps",
    "batch_size",
    # The optimisation trajectory: resuming a finished run after changing one of
    # these would silently hand back the old model.
    "lr",
    "weight_decay",
    "warmup_steps",
    "max_grad_norm",
    "seed",
]
# pretrain.* keys that define the embedded stand-in base model (used when
# model.pretrained is null): a re-pretrained base is a different run.
FINGERPRINT_PRETRAIN_KEYS = [
    "steps",
    "batch_size",
    "lr",
    "warmup_steps",
    "weight_decay",
    "logit_scale_init_value",
    "seed",
]


class StaleCheckpointError(FGClipError, RuntimeError):
    """A checkpoint of this run was written with different model/loss params."""


def fingerprint_params(params: Params) -> dict[str, Any]:
    """The flat ``{"model.image_size": 64, "train.batch_size": 8, ...}`` a run is keyed on."""
    fp = {f"model.{k}": v for k, v in params.model.model_dump().items()}
    train = params.train.model_dump()
    fp.update({f"train.{k}": train[k] for k in FINGERPRINT_TRAIN_KEYS})
    if params.model.pretrained is None:
        pretrain = params.pretrain.model_dump()
        fp.update({f"pretrain.{k}": pretrain[k] for k in FINGERPRINT_PRETRAIN_KEYS})
    # Not a param but the loss's definition: checkpoints from before regions carried
    # image ids hold a one-column bank and were trained with another negative set.
    fp["loss.region_id_columns"] = ID_COLUMNS
    # Checkpoints trained when only shared ids were masked learnt against false negatives.
    fp["loss.region_negatives"] = REGION_NEGATIVES
    return fp


def _digest(paths: list[Path]) -> str:
    h = hashlib.sha256()
    for path in paths:
        h.update(path.name.encode())
        with path.open("rb") as f:
            for block in iter(lambda: f.read(1 << 20), b""):
                h.update(block)
    return h.hexdigest()[:16]


# Reports written beside a model (timings, run ids): not part of what the model is,
# and they differ between two runs that produce bit-identical weights.
PRETRAIN_SUMMARY_FILE = "pretrain.json"
RUN_FILE = "run.json"
MODEL_REPORT_FILES = frozenset({PRETRAIN_SUMMARY_FILE, RUN_FILE})


def input_fingerprint(model_path: str | Path, frames_dir: Path, boxes_dir: Path) -> dict[str, str]:
    """Content hashes of what a run trains on: the base model and the data.

    Params alone cannot tell a re-pretrained stand-in or re-extracted frames from
    the old ones, and resuming across such a change hands back a model trained on
    something else (the users' stale-checkpoint story). A hub id stands for itself
    (:func:`fgclip.config.model_source` tells a directory from a hub id), and so
    does a local path that is not a model directory.
    """
    base = model_source(model_path)
    if isinstance(base, Path) and base.is_dir():
        files = sorted(
            p
            for p in base.iterdir()
            if p.suffix in {".safetensors", ".bin", ".json"} and p.name not in MODEL_REPORT_FILES
        )
        base_id = _digest(files) if files else str(model_path)
    else:
        base_id = str(model_path)
    shards = sorted(Path(boxes_dir).glob("*.parquet")) + [Path(boxes_dir) / MANIFEST_FILE]
    return {
        "input.base_model": base_id,
        "input.frames_index": _digest([Path(frames_dir) / INDEX_FILE]),
        "input.boxes": _digest([p for p in shards if p.is_file()]),
    }


def run_fingerprint(params: Params, inputs: dict[str, str] | None = None) -> tuple[str, dict[str, Any]]:
    """The run's fingerprint and the flat params (plus input hashes, when given) behind it."""
    fp_params = {**fingerprint_params(params), **(inputs or {})}
    return fingerprint(fp_params), fp_params


def checkpoint_dir(run_dir: Path, step: int) -> Path:
    return run_dir / f"checkpoint-{step:06d}"


def capture_rng_state() -> dict[str, Any]:
    """Python, NumPy, torch and CUDA generator states as weights_only-loadable values."""
    version, internal, gauss_next = random.getstate()
    np_state = np.random.get_state(legacy=False)
    return {
        "python": {
            "version": version,
            "state": torch.tensor(internal, dtype=torch.int64),
            "gauss_next": gauss_next,
        },
        "numpy": {
            "bit_generator": np_state["bit_generator"],
            "key": torch.from_numpy(np_state["state"]["key"].astype(np.int64)),
            "pos": int(np_state["state"]["pos"]),
            "has_gauss": int(np_state["has_gauss"]),
            "gauss": float(np_state["gauss"]),
        },
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
    }


def restore_rng_state(state: dict[str, Any]) -> None:
    py = state["python"]
    random.setstate((py["version"], tuple(py["state"].tolist()), py["gauss_next"]))
    npy = state["numpy"]
    np.random.set_state(
        {
            "bit_generator": npy["bit_generator"],
            "state": {"key": npy["key"].numpy().astype(np.uint32), "pos": npy["pos"]},
            "has_gauss": npy["has_gauss"],
            "gauss": npy["gauss"],
        }
    )
    torch.set_rng_state(state["torch"])
    if state["cuda"] and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def _fsync(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def save_checkpoint(
    run_dir: Path,
    step: int,
    *,
    model: nn.Module,
    state: dict[str, Any],
    meta: dict[str, Any],
    keep: int,
) -> Path:
    """Write ``checkpoint-<step>`` atomically, then keep the newest ``keep`` plus the best (:func:`select_kept`).

    ``meta`` must hold ``fingerprint`` and ``fingerprint_params``; ``step`` and
    ``time`` are added here.
    """
    run_dir.mkdir(parents=True, exist_ok=True)
    final = checkpoint_dir(run_dir, step)
    tmp = final.with_name(f"{final.name}.tmp-{os.getpid()}")
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir()
    save_model(model, str(tmp / MODEL_FILE))
    torch.save(state, tmp / STATE_FILE)
    meta = {**meta, "step": step, "time": time.strftime("%Y-%m-%dT%H:%M:%S%z")}
    (tmp / META_FILE).write_text(json.dumps(meta, indent=2, default=str), encoding="utf-8")
    for name in (MODEL_FILE, STATE_FILE, META_FILE):
        _fsync(tmp / name)
    _fsync(tmp)
    if final.exists():
        # A fresh (non-resumed) run reaching a step an older run also saved:
        # os.replace cannot replace a non-empty directory, so move it aside first.
        old = final.with_name(f"{final.name}.old-{os.getpid()}")
        os.replace(final, old)
        os.replace(tmp, final)
        shutil.rmtree(old)
    else:
        os.replace(tmp, final)
    _fsync(run_dir)
    _apply_retention(run_dir, keep)
    logger.info("Saved checkpoint %s", final)
    return final


@dataclass(frozen=True)
class CheckpointEntry:
    """One ``checkpoint-*`` directory of a run, usable or not."""

    path: Path
    step: int | None  # None: not a ``checkpoint-<step>`` name (an interrupted save's .tmp-/.old- directory)
    meta: dict[str, Any] | None  # None when ``problem`` is set
    problem: str | None  # why it cannot be resumed from, or None


def scan_run(run_dir: Path) -> list[CheckpointEntry]:
    """Every ``checkpoint-*`` directory of ``run_dir`` in name order, each checked for completeness."""
    entries: list[CheckpointEntry] = []
    if not run_dir.is_dir():
        return entries
    for path in sorted(run_dir.iterdir()):
        if not path.is_dir() or not path.name.startswith("checkpoint-"):
            continue
        match = _NAME.match(path.name)
        if match is None:
            entries.append(CheckpointEntry(path, None, None, "left by an interrupted checkpoint save"))
            continue
        problem, meta = _inspect(path)
        entries.append(CheckpointEntry(path, int(match.group(1)), meta, problem))
    return entries


def _complete_checkpoints(run_dir: Path, *, warn: bool = True) -> list[tuple[int, Path, dict[str, Any]]]:
    """``(step, path, meta)`` of every readable checkpoint, oldest first; others warned about."""
    found = []
    for entry in scan_run(run_dir):
        if entry.problem is None:
            found.append((entry.step, entry.path, entry.meta))
        elif warn and entry.step is None:
            logger.warning("Skipping %s: %s", entry.path, entry.problem)
        elif warn:
            logger.warning("Skipping checkpoint %s: %s", entry.path, entry.problem)
    return sorted(found, key=lambda item: item[0])


def _inspect(path: Path) -> tuple[str | None, dict[str, Any] | None]:
    """``(why path is not a usable checkpoint, None)`` or ``(None, its meta)``."""
    if not (path / META_FILE).is_file():
        return f"no {META_FILE} (incomplete save)", None
    try:
        meta = json.loads((path / META_FILE).read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        return f"{META_FILE} unreadable ({exc})", None
    if not isinstance(meta, dict):
        return f"{META_FILE} is not a JSON object", None
    missing = {"step", "fingerprint", "fingerprint_params"} - set(meta)
    if missing:
        return f"{META_FILE} lacks {sorted(missing)}", None
    try:
        with safe_open(str(path / MODEL_FILE), framework="pt"):
            pass
    except Exception as exc:  # noqa: BLE001 - safetensors raises several types for a bad file
        return f"{MODEL_FILE} unreadable ({type(exc).__name__}: {exc})", None
    try:
        with zipfile.ZipFile(path / STATE_FILE) as archive:
            bad = archive.testzip()
    except (OSError, zipfile.BadZipFile) as exc:
        return f"{STATE_FILE} unreadable ({type(exc).__name__}: {exc})", None
    if bad is not None:
        return f"{STATE_FILE} is corrupt (member {bad})", None
    return None, meta


def checkpoint_score(meta: dict[str, Any]) -> float | None:
    """The checkpoint's ``loss`` (lower is better), or None when it has no usable one.

    ``loss`` is the mean training loss over the optimizer steps since the previous
    checkpoint (written by the training loop). Older checkpoints lack it and are
    never "the best"; neither is a non-finite one.
    """
    loss = meta.get("loss")
    if isinstance(loss, bool) or not isinstance(loss, (int, float)) or not math.isfinite(loss):
        return None
    return float(loss)


Checkpoint = tuple[int, Path, dict[str, Any]]


def select_kept(
    checkpoints: list[Checkpoint], keep: int, fingerprint_: str | None = None
) -> tuple[set[Path], Checkpoint | None]:
    """What retention keeps of ``checkpoints`` (complete ones, oldest first): ``(kept paths, best)``.

    The newest ``keep``, plus the best one: the lowest :func:`checkpoint_score`
    (the newer on a tie). With ``fingerprint_``, only checkpoints of that
    configuration may be the best, so an old configuration's low loss never pins
    a checkpoint that ``latest_resumable`` would refuse. The one rule used both
    when training saves and by ``fgclip checkpoints clean``.
    """
    kept = {path for _, path, _ in checkpoints[-keep:]} if keep > 0 else set()
    eligible = [
        c
        for c in checkpoints
        if checkpoint_score(c[2]) is not None
        and (fingerprint_ is None or c[2]["fingerprint"] == fingerprint_)
    ]
    best = min(eligible, key=lambda c: (checkpoint_score(c[2]), -c[0])) if eligible else None
    if best is not None:
        kept.add(best[1])
    return kept, best


def _apply_retention(run_dir: Path, keep: int) -> None:
    complete = _complete_checkpoints(run_dir, warn=False)
    if not complete:
        return
    kept, best = select_kept(complete, keep, complete[-1][2]["fingerprint"])
    for _, path, _ in complete:
        if path not in kept:
            shutil.rmtree(path)
            logger.info("Removed old checkpoint %s (train.keep_checkpoints=%d, best kept: %s)",
                        path, keep, best[1].name if best else None)  # fmt: skip


def describe_difference(old: dict[str, Any], new: dict[str, Any]) -> list[str]:
    """``["model.logit_scale_init_value: 2.6592 -> 4.6052", ...]`` for every differing key."""
    keys = sorted(set(old) | set(new))
    missing = "<absent>"
    return [
        f"{k}: {old.get(k, missing)!r} -> {new.get(k, missing)!r}"
        for k in keys
        if old.get(k, missing) != new.get(k, missing)
    ]


def latest_resumable(run_dir: Path, fingerprint_: str, fingerprint_params_: dict[str, Any]) -> Path | None:
    """Newest complete checkpoint of this configuration, or None when there is none.

    Raises :class:`StaleCheckpointError` when a complete checkpoint in ``run_dir``
    was written with another fingerprint, naming each differing param.
    """
    complete = _complete_checkpoints(run_dir)
    for _, path, meta in complete:
        if meta["fingerprint"] != fingerprint_:
            # JSON round-trips tuples to lists etc.: compare in the same form.
            current = json.loads(json.dumps(fingerprint_params_, default=str))
            diffs = describe_difference(meta["fingerprint_params"], current)
            # Cleanup compares input hashes only when asked to (they cost a read of all the data).
            clean = "fgclip checkpoints clean" + (
                " --check-inputs" if any(d.startswith("input.") for d in diffs) else ""
            )
            raise StaleCheckpointError(
                f"{path} was written with different model/loss params "
                f"({'; '.join(diffs) or 'fingerprint ' + meta['fingerprint'] + ' -> ' + fingerprint_}). "
                f"It will not be resumed from: run `{clean}` (or delete {run_dir}), "
                "or set train.run_name to a new name to start a separate run."
            )
    return complete[-1][1] if complete else None


def read_meta(path: Path) -> dict[str, Any]:
    return json.loads((path / META_FILE).read_text(encoding="utf-8"))


def load_checkpoint(path: Path, model: nn.Module, device: torch.device | str = "cpu") -> tuple[dict, dict]:
    """Load weights into ``model`` (strict) and return ``(state, meta)``."""
    load_model(model, str(path / MODEL_FILE), strict=True, device=str(device))
    state = torch.load(path / STATE_FILE, map_location="cpu", weights_only=True)
    return state, read_meta(path)
