"""Atomic, fingerprinted, content-verified training checkpoints.

Layout: ``<checkpoints>/<run_name>/checkpoint-<step:06d>/`` holding
``model.safetensors`` (model weights), ``state.pt`` (optimizer, scheduler,
memory bank, RNG states, counters: tensors, dicts, lists and numbers only, so it
loads with ``weights_only=True``) and ``meta.json``.

A checkpoint is built in ``checkpoint-<step>.tmp-<pid>``, every file fsynced,
``meta.json`` written last, then renamed into place: a directory without
``meta.json`` (or a ``.tmp-*`` one) is an interrupted save and is never resumed
from. A save that fails (a full disk) removes its temporary directory.

``meta.json`` records the size and sha256 of every other file, read back from
disk after the save: a header check alone let a checkpoint with 4 KiB of
overwritten weights be resumed and its NaNs published. Resume and cleanup
re-hash, check each meta.json field's presence and type, require finite weights
and load ``state.pt`` with ``weights_only=True``; a checkpoint failing any of
that is broken, skipped for the previous good one with one warning line.
Checkpoints from before digests were recorded are still resumed, after the same
full read, with a warning that their bytes cannot be checked against the save.

The fingerprint covers every param that changes what the weights mean
(model, loss, batch shapes): resuming across such a change mixed a wrong
temperature into the users' old runs, so a mismatch is an error, never a guess.

Retention keeps the newest ``train.keep_checkpoints`` plus the best (lowest
``loss`` in meta.json) of the run's configuration; ``fgclip.train.cleanup``
applies the same rule (:func:`select_kept`) and also removes stale and broken
checkpoints.
"""

from __future__ import annotations

import hashlib
import io
import json
import logging
import math
import os
import pickle
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
from safetensors.torch import load as load_safetensors
from safetensors.torch import load_file, load_model, save_model
from torch import nn

from fgclip.config import Params, fingerprint, model_source
from fgclip.data.layout import INDEX_FILE, MANIFEST_FILE
from fgclip.errors import FGClipError
from fgclip.model.fgclip import FORMAT_VERSION, WEIGHTS_NAME
from fgclip.model.losses import REGION_NEGATIVES
from fgclip.model.memory_bank import ID_COLUMNS
from fgclip.train.diagnostics import first_nonfinite

logger = logging.getLogger(__name__)

MODEL_FILE = "model.safetensors"
STATE_FILE = "state.pt"
META_FILE = "meta.json"
DIGESTS_KEY = "files"  # meta.json: {file name: {"sha256": hex, "size": bytes}}
_DIGESTED = (MODEL_FILE, STATE_FILE)
_NAME = re.compile(r"^checkpoint-(\d{6,})$")
_SHA256 = re.compile(r"^[0-9a-f]{64}$")

# train.* keys that change the model or the loss: a different batch size changes
# the number of in-batch negatives, the bank warm-up when it switches on, etc.
FINGERPRINT_TRAIN_KEYS = [
    "num_frames",
    "max_regions",
    "max_keyframes",
    "region_loss_weight",
    "hardneg_loss_weight",
    "max_hard_negatives",
    "memory_bank_size",
    "memory_bank_warmup_steps",
    "grad_accum_steps",
    "batch_size",
    # The optimisation trajectory: resuming a finished run after changing one of
    # these would silently hand back the old model.
    "lr",
    "weight_decay",
    "warmup_steps",
    # Always present (null by default): checkpoints from before them hold a two-group
    # optimizer state that the four groups cannot load, so they must read as stale.
    "backbone_lr",
    "backbone_warmup_steps",
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


class CorruptCheckpointError(FGClipError):
    """A checkpoint failed verification (digest, meta.json field, unreadable file, refused pickle)."""

    def __init__(self, path: Path, reason: str) -> None:
        self.path, self.reason = path, reason
        super().__init__(f"checkpoint {path} is broken: {reason}; run `fgclip checkpoints clean`")


class CheckpointSaveError(FGClipError):
    """Writing a checkpoint failed (a full disk, a read-only directory); its partial files are gone."""


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
    # Not params either: the model's own recipe. Checkpoints from before FG-CLIP's
    # value-branch dense path, its short/long text tables and the hard-negative scale
    # hold other weights for the same params.
    fp["model.format_version"] = FORMAT_VERSION
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


def _file_record(path: Path) -> dict[str, Any]:
    h = hashlib.sha256()
    size = 0
    with path.open("rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
            size += len(block)
    return {"sha256": h.hexdigest(), "size": size}


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

    ``meta`` must hold ``forward_passes``, ``fingerprint`` and ``fingerprint_params``;
    ``step``, ``time`` and the file digests are added here. Raises
    :class:`CheckpointSaveError` when writing fails, after removing what it wrote.
    """
    final = checkpoint_dir(run_dir, step)
    tmp = final.with_name(f"{final.name}.tmp-{os.getpid()}")
    meta = {**meta, "step": step, "time": time.strftime("%Y-%m-%dT%H:%M:%S%z")}
    problem = _meta_problem(meta, step)
    if problem is not None:  # a caller's bug: never write a checkpoint resume would call broken
        raise ValueError(f"save_checkpoint: {problem}")
    try:
        run_dir.mkdir(parents=True, exist_ok=True)
        if tmp.exists():
            shutil.rmtree(tmp)
        tmp.mkdir()
        _write_files(tmp, model, state, meta)
        _move_into_place(tmp, final)
    except BaseException as exc:
        # A full disk must not leave a .tmp-<pid> directory (the size of a checkpoint) behind.
        shutil.rmtree(tmp, ignore_errors=True)
        if not isinstance(exc, Exception):
            raise
        raise CheckpointSaveError(
            f"could not save checkpoint {final}: {_describe(exc)}{_free_space(run_dir)}; its partial "
            f"files were removed and earlier checkpoints are untouched: free space under {run_dir} "
            "(or make it writable) and rerun to resume"
        ) from exc
    _fsync(run_dir)
    _apply_retention(run_dir, keep, step)
    logger.info("Saved checkpoint %s", final)
    return final


def _write_files(tmp: Path, model: nn.Module, state: dict[str, Any], meta: dict[str, Any]) -> None:
    save_model(model, str(tmp / MODEL_FILE))
    torch.save(state, tmp / STATE_FILE)
    for name in _DIGESTED:
        _fsync(tmp / name)
    # Hashed by reading the written files back: the digests describe the bytes resume will read.
    meta[DIGESTS_KEY] = {name: _file_record(tmp / name) for name in _DIGESTED}
    (tmp / META_FILE).write_text(json.dumps(meta, indent=2, default=str), encoding="utf-8")
    _fsync(tmp / META_FILE)
    _fsync(tmp)


def _move_into_place(tmp: Path, final: Path) -> None:
    if not final.exists():
        os.replace(tmp, final)
        return
    # A fresh (non-resumed) run reaching a step an older run also saved:
    # os.replace cannot replace a non-empty directory, so move it aside first.
    old = final.with_name(f"{final.name}.old-{os.getpid()}")
    os.replace(final, old)
    try:
        os.replace(tmp, final)
    except BaseException:
        os.replace(old, final)
        raise
    shutil.rmtree(old)


def _describe(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {text[0]}" if text else type(exc).__name__


def _free_space(run_dir: Path) -> str:
    existing = next((p for p in (run_dir, *run_dir.parents) if p.is_dir()), None)
    if existing is None:
        return ""
    return f" ({shutil.disk_usage(existing).free / 2**20:.0f} MiB free there)"


@dataclass(frozen=True)
class CheckpointEntry:
    """One ``checkpoint-*`` directory of a run, usable or not."""

    path: Path
    step: int | None  # None: not a ``checkpoint-<step>`` name (an interrupted save's .tmp-/.old- directory)
    meta: dict[str, Any] | None  # None when ``problem`` is set
    problem: str | None  # why it cannot be resumed from, or None


def scan_run(run_dir: Path) -> list[CheckpointEntry]:
    """Every ``checkpoint-*`` directory of ``run_dir`` in name order, each checked for completeness.

    Complete: meta.json names its step and configuration and the headers read,
    enough to tell a stale checkpoint. Whether it is intact is
    :func:`verify_checkpoint`'s full read.
    """
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


def verify_checkpoint(path: Path, meta: dict[str, Any]) -> tuple[str | None, str | None]:
    """``(why it is broken, None)`` or ``(None, its caveat or None)``, after reading it whole."""
    try:
        _verify_content(path, meta)
    except CorruptCheckpointError as exc:
        return exc.reason, None
    return None, _undigested_note(meta)


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


# meta.json fields every checkpoint needs, and their JSON types: resume reads them
# all, and a missing or mistyped one used to be a KeyError/AttributeError traceback.
# The first three tell the checkpoint's configuration: checked first, so that a stale
# checkpoint is told as stale even when something else about it is wrong.
_CONFIG_FIELDS: dict[str, type] = {"step": int, "fingerprint": str, "fingerprint_params": dict}
_META_FIELDS: dict[str, type] = {**_CONFIG_FIELDS, "forward_passes": int}


def _fields_problem(meta: dict[str, Any], fields: dict[str, type]) -> str | None:
    for key, kind in fields.items():
        if key not in meta:
            return f"{META_FILE} lacks {key}"
        value = meta[key]
        if isinstance(value, bool) or not isinstance(value, kind):
            return f"{META_FILE} field {key} is {_short(value)} ({type(value).__name__}), not {kind.__name__}"
    return None


def _meta_problem(meta: dict[str, Any], step: int) -> str | None:
    """Why ``meta`` cannot describe checkpoint ``step``, or None."""
    problem = _fields_problem(meta, _META_FIELDS)
    if problem is not None:
        return problem
    if meta["step"] != step:
        return f"{META_FILE} says step {meta['step']}, its directory name step {step}"
    if meta["forward_passes"] < 0:
        return f"{META_FILE} field forward_passes is negative ({meta['forward_passes']})"
    if meta.get("run_id") is not None and not isinstance(meta["run_id"], str):
        return f"{META_FILE} field run_id is {_short(meta['run_id'])}, not a string"
    loss = meta.get("loss")
    if loss is not None and (isinstance(loss, bool) or not isinstance(loss, (int, float))):
        return f"{META_FILE} field loss is {_short(loss)}, not a number"
    if DIGESTS_KEY not in meta:
        return None  # saved before digests were recorded: see _undigested_note
    files = meta[DIGESTS_KEY]
    for name in _DIGESTED:
        record = files.get(name) if isinstance(files, dict) else None
        if not (
            isinstance(record, dict)
            and isinstance(record.get("sha256"), str)
            and _SHA256.match(record["sha256"])
            and isinstance(record.get("size"), int)
            and not isinstance(record["size"], bool)
        ):
            return f"{META_FILE} field {DIGESTS_KEY} holds no valid sha256 and size for {name}"
    return None


def _short(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


def _inspect(path: Path) -> tuple[str | None, dict[str, Any] | None]:
    """``(why path is not a complete checkpoint, None)`` or ``(None, its meta)``."""
    if not (path / META_FILE).is_file():
        return f"no {META_FILE} (incomplete save)", None
    try:
        meta = json.loads((path / META_FILE).read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        return f"{META_FILE} unreadable ({exc})", None
    if not isinstance(meta, dict):
        return f"{META_FILE} is not a JSON object", None
    problem = _fields_problem(meta, _CONFIG_FIELDS)
    if problem is not None:
        return problem, None
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


def _verify_content(path: Path, meta: dict[str, Any]) -> dict[str, Any]:
    """The checkpoint's state, after checking every byte: raises :class:`CorruptCheckpointError`.

    Every meta.json field first; then each file is read once: hashed against
    meta.json, then parsed from the same bytes. The weights must be finite (an
    undigested checkpoint has no other defence against overwritten bytes), the
    state must load with ``weights_only``.
    """
    problem = _meta_problem(meta, int(_NAME.match(path.name).group(1)))
    if problem is not None:
        raise CorruptCheckpointError(path, problem)
    data: dict[str, bytes] = {}
    for name in _DIGESTED:
        try:
            data[name] = (path / name).read_bytes()
        except OSError as exc:
            raise CorruptCheckpointError(path, f"{name} unreadable ({_describe(exc)})") from exc
    digests = meta.get(DIGESTS_KEY, {})  # none in a checkpoint saved before they were recorded
    for name, record in digests.items():
        if name not in data:
            continue
        if len(data[name]) != record["size"]:
            saved = record["size"]
            raise CorruptCheckpointError(path, f"{name} is {len(data[name])} bytes, {saved} were saved")
        if hashlib.sha256(data[name]).hexdigest() != record["sha256"]:
            raise CorruptCheckpointError(
                path, f"{name} does not match the sha256 in {META_FILE}: its content changed after the save"
            )
    try:
        weights = load_safetensors(data[MODEL_FILE])
    except Exception as exc:  # safetensors raises several types for a bad file
        raise CorruptCheckpointError(path, f"{MODEL_FILE} unreadable ({_describe(exc)})") from exc
    bad = first_nonfinite(weights.items())
    if bad is not None:
        raise CorruptCheckpointError(
            path, f"{MODEL_FILE} holds {bad.count} NaN/Inf weights (first in {bad.name}, {bad.value})"
        )
    try:
        state = torch.load(io.BytesIO(data[STATE_FILE]), map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exc:
        refused = re.search(r"Unsupported global: GLOBAL (\S+)", str(exc))
        what = f": {refused.group(1)}" if refused else ""
        raise CorruptCheckpointError(
            path, f"{STATE_FILE} refused by torch.load(weights_only=True) (a pickled object{what})"
        ) from exc
    except Exception as exc:  # torch raises RuntimeError, EOFError, ... for a bad file
        raise CorruptCheckpointError(path, f"{STATE_FILE} unreadable ({_describe(exc)})") from exc
    if not isinstance(state, dict):
        raise CorruptCheckpointError(path, f"{STATE_FILE} holds a {type(state).__name__}, not a dict")
    return state


def _undigested_note(meta: dict[str, Any]) -> str | None:
    if DIGESTS_KEY in meta:
        return None
    return (
        f"it records no content digests (saved before {META_FILE} had them): it was read whole, its "
        "weights are finite and its state loads, but its bytes cannot be checked against the save"
    )


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


def _apply_retention(run_dir: Path, keep: int, saved_step: int) -> None:
    """Retention after saving ``saved_step``, among the checkpoints up to that step.

    Later steps are not this run's history: a resume that skipped broken checkpoints
    (or ignored them, resume=False) left them behind. Counted, they would take the
    newest-K and best slots and delete the checkpoint just saved; they are left alone,
    and the run overwrites them when it reaches their step.
    """
    complete = [c for c in _complete_checkpoints(run_dir, warn=False) if c[0] <= saved_step]
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


def _candidates(run_dir: Path, fingerprint_: str, fingerprint_params_: dict[str, Any]) -> list[Checkpoint]:
    """Complete checkpoints (meta.json and headers) of this configuration, newest first.

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
    return complete[::-1]


def latest_resumable(run_dir: Path, fingerprint_: str, fingerprint_params_: dict[str, Any]) -> Path | None:
    """Newest checkpoint of this configuration that passes verification, or None when there is none.

    A broken one is skipped for the previous with one warning line; raises
    :class:`StaleCheckpointError` as :func:`_candidates` does.
    """
    for _, path, meta in _candidates(run_dir, fingerprint_, fingerprint_params_):
        try:
            _verify_content(path, meta)
        except CorruptCheckpointError as exc:
            logger.warning("Skipping checkpoint %s: %s", path, exc.reason)
            continue
        _warn_undigested(path, meta)
        return path
    return None


def resume_latest(
    run_dir: Path,
    fingerprint_: str,
    fingerprint_params_: dict[str, Any],
    model: nn.Module,
    device: torch.device | str = "cpu",
) -> tuple[Path, dict[str, Any], dict[str, Any]] | None:
    """Load the newest verified checkpoint of this configuration into ``model``: ``(path, state, meta)``.

    Like :func:`latest_resumable`, with each file read and checked once; None
    when no checkpoint passes, and ``model`` is then untouched (a fresh start).
    """
    candidates = _candidates(run_dir, fingerprint_, fingerprint_params_)
    for _, path, _ in candidates:
        try:
            state, meta = load_checkpoint(path, model, device)
        except CorruptCheckpointError as exc:
            logger.warning("Skipping checkpoint %s: %s", path, exc.reason)
            continue
        return path, state, meta
    if candidates or any(run_dir.glob("checkpoint-*")):
        logger.warning("No usable checkpoint in %s: training starts from step 0", run_dir)
    return None


def _warn_undigested(path: Path, meta: dict[str, Any]) -> None:
    note = _undigested_note(meta)
    if note is not None:
        logger.warning("Resuming from checkpoint %s although %s", path, note)


def read_meta(path: Path) -> dict[str, Any]:
    return json.loads((path / META_FILE).read_text(encoding="utf-8"))


def load_checkpoint(path: Path, model: nn.Module, device: torch.device | str = "cpu") -> tuple[dict, dict]:
    """Verify ``path`` whole, then load its weights into ``model`` (strict) and return ``(state, meta)``.

    Raises :class:`CorruptCheckpointError`, with ``model`` untouched, when a check fails.
    """
    if _NAME.match(path.name) is None:
        raise CorruptCheckpointError(path, "not a checkpoint-<step> directory")
    problem, meta = _inspect(path)
    if problem is not None:
        raise CorruptCheckpointError(path, problem)
    state = _verify_content(path, meta)
    _warn_undigested(path, meta)
    load_model(model, str(path / MODEL_FILE), strict=True, device=str(device))
    return state, meta


class ExportError(FGClipError):
    """The model written to ``train.out`` does not read back as the weights just trained."""


def verify_export(model_dir: Path, model: nn.Module) -> None:
    """Re-read the weights written to ``model_dir``: finite and bit-equal to ``model``'s, or :class:`ExportError`.

    A file that fails is removed: evaluation must not pick up weights that are not the trained ones.
    """
    weights_file = Path(model_dir) / WEIGHTS_NAME
    problem = _export_problem(weights_file, model)
    if problem is not None:
        weights_file.unlink(missing_ok=True)
        raise ExportError(
            f"{weights_file} {problem}: the model was not published; check the disk under it and rerun "
            "`fgclip train` (it resumes from the last checkpoint)"
        )


def _export_problem(weights_file: Path, model: nn.Module) -> str | None:
    try:
        written = load_file(str(weights_file))
    except Exception as exc:  # noqa: BLE001 - safetensors raises several types for a bad file
        return f"does not read back ({_describe(exc)})"
    bad = first_nonfinite(written.items())
    if bad is not None:
        return f"holds {bad.count} NaN/Inf weights (first in {bad.name})"
    expected = model.state_dict()
    differ = sorted(
        k
        for k in expected.keys() | written.keys()
        if k not in written or k not in expected or not torch.equal(written[k], expected[k].detach().cpu())
    )
    if differ:
        return f"differs from the trained weights in {len(differ)} tensor(s) (first {differ[0]})"
    return None
