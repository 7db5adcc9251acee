"""Each stage owns its output directory and touches no other.

A path option can point a stage at anything: another stage's output, a dataset, a home
directory. Replacing (or writing into) such a directory destroys what someone else
wrote, and the stage still exits 0. So every stage writes a marker naming itself into the
directory it writes, and refuses a non-empty directory that holds no marker, or another
stage's. DVC empties a stage's declared outputs before running it; the check is for CLI
runs and for a directory a user points ``--out`` at.

Two ways to write: ``claim_output_dir`` for a stage that writes in place (extract_frames
resumes from its earlier output), ``replacing_output_dir`` for one that builds a fresh
directory and swaps it in, so readers see the old output or the whole new one.
"""

from __future__ import annotations

import json
import os
import shutil
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path

from fgclip.atomic import write_text_atomic
from fgclip.errors import FGClipError

# No suffix: no reader's glob (a model's *.json for its fingerprint, *.parquet shards) matches it.
MARKER = ".fgclip-stage"

# What each stage's output held before markers existed. Such a directory is taken as the
# stage's own (the marker is added), so that an upgrade does not refuse the users' own
# outputs; extract_frames resumes from them.
_LEGACY = {
    "extract_frames": ("index.parquet", "videos.parquet"),
    "validate_boxes": ("manifest.json", "rejects.parquet"),
    "pretrain": ("pretrain.json",),
    "train": ("fgclip_config.json", "run.json"),
}


class OutputDirError(FGClipError):
    """A stage's output path is not the stage's to write; the message names it and what to do."""


def owner(directory: Path) -> str | None:
    """The stage named by the directory's marker, or None (no marker, or not one we wrote)."""
    try:
        stage = json.loads((Path(directory) / MARKER).read_text(encoding="utf-8")).get("stage")
    except (OSError, ValueError, AttributeError):
        return None
    return stage if isinstance(stage, str) else None


def _overlap(out: Path, others: Mapping[str, Path | str | None]) -> tuple[str, Path] | None:
    """The first other path that ``out`` is, or holds: replacing ``out`` would delete it."""
    for option, path in others.items():
        if not isinstance(path, Path):  # None: not given; a str: a hub id, nothing on disk
            continue
        resolved = path.resolve()
        if resolved == out or out in resolved.parents:
            return option, path
    return None


def check_output_dir(out: Path, stage: str, others: Mapping[str, Path | str | None] | None = None) -> None:
    """Refuse ``out`` unless ``stage`` may write it: absent, empty, or marked as the stage's own.

    ``others`` are the stage's other paths by option name (inputs, and outputs kept
    elsewhere such as checkpoints), as ``Path``s (a ``str`` is a hub id and is skipped):
    ``out`` may not be one of them or hold one.
    """
    out = Path(out)
    resolved = out.resolve()
    hit = _overlap(resolved, others or {})
    if hit is not None:
        raise OutputDirError(
            f"{out}: the {stage} output directory is, or holds, its own {hit[0]} {hit[1]}; "
            "choose another output directory"
        )
    if not out.exists():
        return
    if not out.is_dir():
        raise OutputDirError(f"{out}: is a file; the {stage} output is a directory: choose another path")
    if not any(out.iterdir()):
        return
    found = owner(out)
    if found == stage:
        return
    if found is not None:
        raise OutputDirError(
            f"{out} holds the output of the {found} stage ({MARKER}); refusing to replace it "
            f"with the {stage} output: choose another output directory"
        )
    # A stage with no pre-marker layout accepts no unmarked directory (all(()) would accept any).
    legacy = _LEGACY.get(stage)
    if legacy and all((out / name).is_file() for name in legacy):
        return
    raise OutputDirError(
        f"{out} is not empty and was not written by the {stage} stage (no {MARKER}); refusing to "
        "replace it: choose another output directory, or empty it yourself"
    )


def _mark(directory: Path, stage: str) -> None:
    # Constant content: the marker is part of the DVC output, whose hash must not vary.
    write_text_atomic(directory / MARKER, json.dumps({"stage": stage}) + "\n")


def claim_output_dir(out: Path, stage: str, others: Mapping[str, Path | str | None] | None = None) -> Path:
    """Check ``out`` (``check_output_dir``), create it and mark it as ``stage``'s; for in-place writers."""
    out = Path(out)
    check_output_dir(out, stage, others)
    out.mkdir(parents=True, exist_ok=True)
    if owner(out) != stage:
        _mark(out, stage)
    return out


@contextmanager
def replacing_output_dir(
    out: Path, stage: str, others: Mapping[str, Path | str | None] | None = None
) -> Iterator[Path]:
    """Yield a fresh hidden directory beside ``out``; on success it replaces ``out``, marked.

    ``out`` is checked first (``check_output_dir``). The old output is renamed aside
    before the new one takes its name and only then deleted, so an interrupted swap never
    leaves a half-deleted output under ``out``. On an exception ``out`` is left as it was.
    """
    check_output_dir(out, stage, others)
    out = Path(out).resolve()  # `--out .` has no name to put a sibling beside
    tmp, old = out.with_name(f".{out.name}.tmp"), out.with_name(f".{out.name}.old")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    try:
        yield tmp
        _mark(tmp, stage)
        shutil.rmtree(old, ignore_errors=True)
        if out.exists():
            os.replace(out, old)
        os.replace(tmp, out)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    shutil.rmtree(old, ignore_errors=True)  # only once the new output is in place


def check_output_files(files: Mapping[str, Path | None], inputs: Mapping[str, Path | str | None]) -> None:
    """Refuse an output file that names a directory, or lies inside an input (another stage's output)."""
    for option, path in files.items():
        if path is None:
            continue
        path = Path(path)
        if path.is_dir():
            raise OutputDirError(f"{option} {path}: is a directory; name the file to write")
        target = path.resolve()
        for name, given in inputs.items():
            if isinstance(given, Path) and given.resolve() in (target, *target.parents):
                raise OutputDirError(
                    f"{option} {path}: lies inside the input {name} {given}; writing it would change "
                    "what another stage wrote: choose a path outside it"
                )
