"""What each stage leaves on disk, in one place: file names, Arrow schemas, and the readers.

A stage's outputs are the next stage's inputs. When the writer and every reader
spell a file name or a column list on their own, a rename in one of them only
shows up as a ``KeyError`` two stages later; here the writers take their names
and schemas, and the readers check that the columns they need are there and say
which stage to (re)run. Column meanings are in ``docs/contracts.md``.

Every path read from a file (frame paths, shard names) goes through one
containment check, the UCF module's :func:`~fgclip.data.ucf.escapes_root` rule
over Arrow columns: a path written in a file is never opened outside its root.

Readers raise :class:`DatasetError` unless the caller passes its own ``error``
type (evaluation reports its inputs as ``EvalInputError``).
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from fgclip.data.ucf import escapes_root_array
from fgclip.errors import FGClipError

ErrorType = type[Exception]


class DatasetError(FGClipError, ValueError):
    """The frame index or the box shards cannot be used; the message names the file."""


# --------------------------------------------------------------------------- extract_frames -> <frames.out>/

EXTRACT_FRAMES = "extract_frames"
IMAGES_DIR = "images"  # images/<video id without .mp4>/<frame:06d>.jpg
DONE_MARKER = "_done.json"  # per video, in its images dir: written last, the resume marker
INDEX_FILE = "index.parquet"
VIDEOS_FILE = "videos.parquet"
FAILURES_FILE = "failures.parquet"

# Every per-video table starts with the video's identity: its id (the path under the videos
# directory, as in the split files), its split and its label.
VIDEO_KEY = [("video", pa.string()), ("split", pa.string()), ("label", pa.string())]
INDEX_SCHEMA = pa.schema(
    [
        *VIDEO_KEY,
        ("frame", pa.int64()),
        ("timestamp", pa.float64()),
        ("path", pa.string()),
        ("purpose", pa.string()),
    ]
)
VIDEOS_SCHEMA = pa.schema(
    [
        *VIDEO_KEY,
        ("num_frames", pa.int64()),
        ("fps", pa.float64()),
        ("width", pa.int64()),  # of the extracted (upright) frames
        ("height", pa.int64()),
        ("status", pa.string()),
        ("rotation", pa.int64()),  # clockwise degrees the frames were turned to stand upright
    ]
)
FAILURES_SCHEMA = pa.schema([("video", pa.string()), ("reason", pa.string())])

# --------------------------------------------------------------------------- validate_boxes -> <boxes.out>/

VALIDATE_BOXES = "validate_boxes"
MANIFEST_FILE = "manifest.json"  # {"shards": [{"path", "rows"}], "rows": N}
REJECTS_FILE = "rejects.parquet"

# A box's normalized corners: float32 once accepted (what the model reads), the values as
# written (float64) in a reject.
BOX_COORDS = ("x1", "y1", "x2", "y2")
ACCEPTED_SCHEMA = pa.schema(
    [
        *VIDEO_KEY,
        ("region", pa.int32()),
        ("region_caption", pa.string()),
        ("global_caption", pa.string()),
        ("frame", pa.int64()),
        *[(c, pa.float32()) for c in BOX_COORDS],
        ("frame_path", pa.string()),
        ("virtual", pa.bool_()),
        # the region's hard-negative captions, the same list on each of its rows (may be empty)
        ("region_negatives", pa.list_(pa.string())),
    ]
)
REJECTS_SCHEMA = pa.schema(
    [
        ("record", pa.int64()),  # position of the record in annotations.json
        ("video", pa.string()),  # the record's video field as written
        ("region", pa.int32()),
        ("frame", pa.int64()),
        *[(c, pa.float64()) for c in BOX_COORDS],
        ("virtual", pa.bool_()),
        ("raw", pa.string()),  # JSON text of a malformed entry, or of a dropped negative caption
        ("reason", pa.string()),
        ("detail", pa.string()),
    ]
)

# --------------------------------------------------------------------------- evaluate -> <evaluate.scores>

EVALUATE = "evaluate"
FRAME_SCORES_SCHEMA = pa.schema(
    [
        ("video", pa.string()),
        ("class", pa.string()),
        ("frame", pa.int64()),
        ("snippet", pa.int64()),
        ("score", pa.float64()),
        ("log_odds", pa.float64()),
        ("label", pa.int8()),
        ("model", pa.string()),
    ]
)


def shard_name(number: int) -> str:
    """``part-NNNNN.parquet``: zero-padded, so that a listing sorts in shard order."""
    return f"part-{number:05d}.parquet"


def write_manifest(directory: Path, shards: list[dict], rows: int) -> None:
    """The shard list readers go through: ``rejects.parquet`` shares the directory, so no glob will do."""
    manifest = {"shards": shards, "rows": rows}
    (Path(directory) / MANIFEST_FILE).write_text(json.dumps(manifest, indent=1) + "\n", encoding="utf-8")


# --------------------------------------------------------------------------- checks and readers


def check_inside(
    paths: pa.Array | pa.ChunkedArray,
    source: Path,
    *,
    what: str = "frame path",
    root: str = "the frames directory",
    error: ErrorType = DatasetError,
) -> None:
    """Raise ``error`` naming ``source`` when a path read from it would leave its root (or is null)."""
    if paths.null_count:
        raise error(f"{source}: {paths.null_count} {what}(s) are null")
    bad = escapes_root_array(paths)
    if pc.any(bad).as_py():
        first = pc.filter(paths, bad)[0].as_py()
        raise error(f"{source}: {what} {first!r} points outside {root}")


def _wanted(columns: Sequence[str] | None, *extra: str) -> list[str] | None:
    """``columns`` plus the ones a reader filters on (``None``: every column)."""
    return None if columns is None else list(dict.fromkeys([*columns, *extra]))


def _missing(path: Path, have: Sequence[str], wanted: Sequence[str], stage: str, error: ErrorType) -> None:
    missing = sorted(set(wanted) - set(have))
    if missing:
        raise error(f"{path}: missing column(s) {missing} (re-run the {stage} stage)")


def _read(
    path: Path, columns: Sequence[str] | None, stage: str, error: ErrorType, required: Sequence[str] = ()
) -> pa.Table:
    """The file's ``columns`` (``None``: all); ``required`` columns must exist either way."""
    if not path.is_file():
        raise error(f"{path}: not found (run the {stage} stage)")
    _missing(path, pq.read_schema(path).names, [*(columns or ()), *required], stage, error)
    return pq.read_table(path, columns=columns)


def _read_rows(
    files: Sequence[Path],
    columns: Sequence[str] | None,
    stage: str,
    error: ErrorType,
    *,
    source: Path,
    path_column: str,
    **equal: str | None,
) -> pa.Table:
    """The rows of ``files`` (one table, in order) whose ``equal`` columns hold the values given.

    A ``None`` value filters nothing. The ``path_column`` of the rows kept is
    checked, naming ``source``, before anyone opens those paths.
    """
    filters = {name: value for name, value in equal.items() if value is not None}
    table = pa.concat_tables(
        [_read(path, _wanted(columns, *filters), stage, error, required=list(filters)) for path in files]
    )
    for name, value in filters.items():
        table = table.filter(pc.equal(table[name], value))
    if path_column in table.column_names:
        check_inside(table[path_column], source, error=error)
    return table if columns is None else table.select(list(columns))


def read_frame_index(
    frames_dir: Path,
    columns: Sequence[str] | None = None,
    *,
    split: str | None = None,
    purpose: str | None = None,
    error: ErrorType = DatasetError,
) -> pa.Table:
    """``index.parquet`` rows of ``split`` and ``purpose`` (``None``: all), in file order."""
    path = Path(frames_dir) / INDEX_FILE
    return _read_rows(
        [path], columns, EXTRACT_FRAMES, error, source=path, path_column="path", split=split, purpose=purpose
    )


def read_videos(
    frames_dir: Path, columns: Sequence[str] | None = None, *, error: ErrorType = DatasetError
) -> pa.Table:
    """``videos.parquet``: the decoded frame count and status of every video, ``ok`` or not."""
    return _read(Path(frames_dir) / VIDEOS_FILE, columns, EXTRACT_FRAMES, error)


def read_failures(
    frames_dir: Path,
    columns: Sequence[str] | None = None,
    *,
    missing_ok: bool = False,
    error: ErrorType = DatasetError,
) -> pa.Table:
    """``failures.parquet``; with ``missing_ok`` an absent file reads as no failures.

    Only the reasons hang on it, so a frames directory copied without it (the
    index and videos tables alone) is still usable where reasons are a courtesy.
    """
    path = Path(frames_dir) / FAILURES_FILE
    if missing_ok and not path.is_file():
        empty = FAILURES_SCHEMA.empty_table()
        _missing(path, empty.column_names, columns or (), EXTRACT_FRAMES, error)
        return empty if columns is None else empty.select(list(columns))
    return _read(path, columns, EXTRACT_FRAMES, error)


def box_shard_paths(boxes_dir: Path, *, error: ErrorType = DatasetError) -> list[Path]:
    """The accepted-box shards ``manifest.json`` lists, in its order."""
    boxes_dir = Path(boxes_dir)
    manifest_path = boxes_dir / MANIFEST_FILE
    try:
        manifest = json.loads(manifest_path.read_text(encoding="utf-8"))
        names = [shard["path"] for shard in manifest["shards"]]
        shard_paths = [boxes_dir / name for name in names]
    except FileNotFoundError as exc:
        raise error(f"{manifest_path}: not found (run the {VALIDATE_BOXES} stage)") from exc
    except (json.JSONDecodeError, KeyError, TypeError) as exc:
        raise error(f"{manifest_path}: not a valid shard manifest: {exc}") from exc
    if not shard_paths:
        raise error(f"{manifest_path}: lists no shards")
    check_inside(
        pa.array(names, pa.string()), manifest_path, what="shard path", root=str(boxes_dir), error=error
    )
    return shard_paths


def read_box_shards(
    boxes_dir: Path,
    columns: Sequence[str] | None = None,
    *,
    split: str | None = None,
    error: ErrorType = DatasetError,
) -> pa.Table:
    """Accepted box rows of ``split`` (``None``: all) from every shard, in manifest then file order.

    Frame paths are relative to the frames directory and checked like the index's.
    """
    shards = box_shard_paths(boxes_dir, error=error)
    manifest = Path(boxes_dir) / MANIFEST_FILE
    return _read_rows(
        shards, columns, VALIDATE_BOXES, error, source=manifest, path_column="frame_path", split=split
    )


def read_rejects(
    boxes_dir: Path, columns: Sequence[str] | None = None, *, error: ErrorType = DatasetError
) -> pa.Table:
    """``rejects.parquet``: every box row not accepted, with the first rule it failed."""
    return _read(Path(boxes_dir) / REJECTS_FILE, columns, VALIDATE_BOXES, error)


def read_scores(
    path: Path, columns: Sequence[str] | None = None, *, error: ErrorType = DatasetError
) -> pa.Table:
    """The evaluate stage's per-frame scores (its path is a param, ``evaluate.scores``, not a directory)."""
    return _read(Path(path), columns, EVALUATE, error)
