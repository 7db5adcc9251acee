"""``fgclip checkpoints clean``: remove the checkpoints a run cannot use or no longer needs.

Scope: the current run only, ``<train.checkpoints>/<train.run_name>/``. Other
run names are other configurations kept on purpose (the old-temperature run
beside the fixed one, to compare them): the current params say nothing about them.

What goes, each with its reason:

- ``broken``: an interrupted save (``checkpoint-*.tmp-<pid>`` / ``.old-<pid>``),
  no ``meta.json``, an unreadable one or one missing a field or holding a
  wrongly typed one, a missing or truncated ``model.safetensors`` or ``state.pt``,
  a file whose content no longer matches the sha256 recorded in ``meta.json``,
  non-finite weights, a state ``torch.load(weights_only=True)`` refuses. Every
  checkpoint of the current configuration is read whole to tell; training never
  resumes from these. One saved before digests were recorded is kept when the
  rest holds, with a warning.
- ``stale``: written with another configuration, named param by param (the
  users' stale-temperature checkpoints, which they deleted by hand). With
  ``inputs`` (:func:`current_inputs`) the whole fingerprint is compared, as
  training does; without, only its params part: hashing the base model and the
  data reads all of them, and paths given to ``fgclip train`` may differ from
  the defaults, which must never make valid checkpoints look stale.
- ``surplus``: all but the newest ``train.keep_checkpoints`` plus the best (the
  lowest ``loss`` recorded in ``meta.json``) of the remaining ones: the rule of
  :func:`fgclip.train.checkpoints.select_kept`, the same one training applies.

It never touches a run whose ``train.lock`` is held by a live process (or one on
another host, which cannot be checked): it logs that and removes nothing. A lock
left by a dead process is stale: reported and taken over. While deleting, cleanup
holds the lock itself, so a training job started meanwhile fails clearly instead
of resuming from a checkpoint being removed.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
from pathlib import Path
from typing import Any, NamedTuple

from fgclip.config import Params
from fgclip.data.layout import INDEX_FILE
from fgclip.errors import FGClipError
from fgclip.train.checkpoints import (
    checkpoint_score,
    describe_difference,
    input_fingerprint,
    run_fingerprint,
    scan_run,
    select_kept,
    verify_checkpoint,
)
from fgclip.train.runlock import RunLock, RunLockedError, describe_holder, holder_state, read_lock

logger = logging.getLogger(__name__)

_INPUT_PREFIX = "input."


class Removal(NamedTuple):
    """A checkpoint directory cleanup removed (or would remove)."""

    path: Path
    reason: str
    size: int  # bytes on disk


def current_inputs(
    params: Params, *, model: str | None = None, frames: Path | None = None, boxes: Path | None = None
) -> dict[str, str]:
    """The input hashes ``fgclip train`` would key its checkpoints on, from these paths or params' defaults."""
    model = params.pretrained_source(model)
    frames = Path(frames) if frames else params.paths.frames
    boxes = Path(boxes) if boxes else params.paths.boxes
    index = frames / INDEX_FILE
    if not index.is_file():
        raise FGClipError(f"cannot hash the training inputs: {index} not found (run extract-frames first)")
    return input_fingerprint(model, frames, boxes)


def clean_checkpoints(
    params: Params,
    *,
    root: Path | None = None,
    dry_run: bool = False,
    inputs: dict[str, str] | None = None,
) -> list[Removal]:
    """Remove (or with ``dry_run`` only list) the current run's stale, broken and surplus checkpoints."""
    root = Path(root) if root else params.paths.checkpoints
    run_dir = root / params.train.run_name
    if not run_dir.is_dir():
        logger.info("No checkpoints to clean: %s does not exist", run_dir)
        return []
    holder = read_lock(run_dir)
    if holder is not None:
        if holder_state(holder) != "stale":
            logger.warning("Not cleaning %s: in use by %s", run_dir, describe_holder(holder))
            return []
        logger.warning("Lock of %s is stale: %s is gone", run_dir, describe_holder(holder))
    if dry_run:
        removals = plan_cleanup(params, run_dir, inputs)
        for removal in removals:
            logger.info("Would remove %s: %s", removal.path, removal.reason)
        return removals

    lock = RunLock(run_dir, owner="checkpoint cleanup")
    try:
        lock.acquire()
    except RunLockedError as exc:  # a training job started since we looked
        logger.warning("Not cleaning %s: %s", run_dir, exc)
        return []
    try:
        removals = plan_cleanup(params, run_dir, inputs)
        for removal in removals:
            try:
                shutil.rmtree(removal.path)
            except OSError as exc:
                raise FGClipError(f"could not remove {removal.path}: {exc}") from exc
            logger.info("Removed %s: %s", removal.path, removal.reason)
    finally:
        lock.release()
    return removals


def plan_cleanup(params: Params, run_dir: Path, inputs: dict[str, str] | None = None) -> list[Removal]:
    """What :func:`clean_checkpoints` removes from ``run_dir``, without removing it (nor checking the lock)."""
    fingerprint, fp_params = run_fingerprint(params, inputs)
    # JSON round-trips tuples to lists etc.: compare in the form meta.json holds.
    current = json.loads(json.dumps(fp_params, default=str))
    removals: list[Removal] = []
    matching: list[tuple[int, Path, dict[str, Any]]] = []
    notes: dict[Path, str] = {}  # usable, yet unverifiable: said once, if it is kept
    for entry in scan_run(run_dir):
        if entry.problem is not None:
            removals.append(Removal(entry.path, f"broken: {entry.problem}", _size(entry.path)))
            continue
        stale = _staleness(entry.meta, fingerprint, current, with_inputs=inputs is not None)
        if stale is not None:
            removals.append(
                Removal(entry.path, f"stale: written with other params ({stale})", _size(entry.path))
            )
            continue
        # Only this configuration's checkpoints are read whole: the others go anyway.
        problem, note = verify_checkpoint(entry.path, entry.meta)
        if problem is not None:
            removals.append(Removal(entry.path, f"broken: {problem}", _size(entry.path)))
            continue
        if note is not None:
            notes[entry.path] = note
        matching.append((entry.step, entry.path, entry.meta))

    matching.sort(key=lambda c: c[0])
    keep = params.train.keep_checkpoints
    kept, best = select_kept(matching, keep)
    if best is None:
        best_note = "no checkpoint records a loss"
    else:
        best_note = f"best is {best[1].name}, loss {checkpoint_score(best[2]):.4g}"
    for _, path, meta in matching:
        if path not in kept:
            score = checkpoint_score(meta)
            own = f"loss {score:.4g}" if score is not None else "no loss recorded"
            reason = f"surplus: older than the newest {keep} (train.keep_checkpoints), {own}; {best_note}"
            removals.append(Removal(path, reason, _size(path)))
        elif path in notes:
            logger.warning("Keeping %s although %s", path, notes[path])
    return removals


def _staleness(
    meta: dict[str, Any], fingerprint: str, current: dict[str, Any], *, with_inputs: bool
) -> str | None:
    """Why ``meta`` belongs to another configuration, or None when it is this one."""
    old = meta["fingerprint_params"]
    if not isinstance(old, dict):
        return f"unreadable fingerprint_params {old!r}"
    if with_inputs:
        if meta["fingerprint"] == fingerprint:
            return None
        return (
            "; ".join(describe_difference(old, current))
            or f"fingerprint {meta['fingerprint']} -> {fingerprint}"
        )
    old = {k: v for k, v in old.items() if not k.startswith(_INPUT_PREFIX)}
    new = {k: v for k, v in current.items() if not k.startswith(_INPUT_PREFIX)}
    return "; ".join(describe_difference(old, new)) or None


def _size(path: Path) -> int:
    total = 0
    for folder, _, files in os.walk(path):
        for name in files:
            try:
                total += os.lstat(os.path.join(folder, name)).st_size
            except OSError:  # removed meanwhile: nothing to count
                pass
    return total


def format_size(size: int) -> str:
    value = float(size)
    for unit in ("B", "KiB", "MiB"):
        if value < 1024:
            return f"{size} B" if unit == "B" else f"{value:.1f} {unit}"
        value /= 1024
    return f"{value:.1f} GiB"
