"""Read any method's per-snippet anomaly scores, so other methods are scored by the same protocol.

One score per non-overlapping 16-frame snippet per video, in one of three layouts, told apart
by what the path is:

1. a directory of per-video ``.npy`` files named after the video (``Arson011_x264.npy``),
   each of shape ``(S,)`` or ``(S, 1)``;
2. a ``.csv`` or ``.parquet`` table with columns ``video``, ``snippet``, ``score``, one row
   per snippet;
3. one ``.npy`` array for the whole test set, as RTFM and VadCLIP save it, plus a list file
   (``videos=``) of ``NAME NUM_SNIPPETS`` lines in the array's order. The array holds either
   one score per snippet or the frame-level ``np.repeat(scores, 16)`` the references write.

Videos are matched by :func:`video_key`, so a score file may name ``Arson/Arson011_x264.mp4``
or ``Arson011_x264`` alike. Anything inconsistent is an :class:`EvalInputError` naming the file
(and the video), because a silently misaligned score shifts every frame the AUC is computed on.
"""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.csv as pa_csv
import pyarrow.parquet as pq

from fgclip.eval.protocol import EvalInputError

# The references' frame-level arrays repeat each snippet score over the snippet's frames.
SNIPPET_FRAMES = 16
TABLE_COLUMNS = ("video", "snippet", "score")
TABLE_SUFFIXES = (".csv", ".parquet")

# An extension is short and alphanumeric; XD-Violence names carry dots and '#' inside the
# name itself ("A.Beautiful.Mind.2001__#00-01-45_00-02-50_label_A"), which must survive.
_EXTENSION = re.compile(r"\.[A-Za-z0-9]{1,5}$")
# numpy dtype kinds that convert to float64 without losing meaning: bool, signed, unsigned, float.
_NUMERIC_KINDS = "biuf"
# A count written as a number of another kind (6.0, 1e3) is an error, never a header.
_NUMBER = re.compile(r"[+-]?(\d+\.?\d*|\.\d+)([eE][+-]?\d+)?|[+-]?(inf|nan)", re.IGNORECASE)


def video_key(name: str) -> str:
    """The key a video is matched by: its file name without folders or one short extension.

    ``'Arson/Arson011_x264.mp4'`` and ``'Arson011_x264.npy'`` give ``'Arson011_x264'``;
    backslashes count as folder separators; only one final alphanumeric extension of 1-5
    characters is removed, so names with dots inside keep them.
    """
    base = name.replace("\\", "/").rsplit("/", 1)[-1]
    stem = _EXTENSION.sub("", base)
    # A bare ".npy" names nothing; keeping it lets the caller report it rather than match "".
    return stem if stem else base


def read_snippet_scores(path: Path, *, videos: Path | None = None) -> dict[str, np.ndarray]:
    """``{video_key: float64[S]}`` per-snippet scores, in the order the source lists the videos.

    ``path`` is a directory of per-video ``.npy`` files (sorted by file name), a ``.csv`` /
    ``.parquet`` table (order of first appearance), or one concatenated ``.npy`` array, which
    needs ``videos``, the list file that splits it (its order).
    """
    path = Path(path)
    if not path.exists():
        raise EvalInputError(f"score path not found: {path}")
    if path.is_dir():
        _no_list(path, videos, "a directory of per-video .npy files")
        return _read_directory(path)
    suffix = path.suffix.lower()
    if suffix in TABLE_SUFFIXES:
        _no_list(path, videos, f"a {suffix} table")
        return _read_table(path)
    if suffix == ".npy":
        if videos is None:
            raise EvalInputError(
                f"{path}: one .npy array for all videos needs the list of videos and their snippet "
                "counts to split it; pass it with --videos (lines 'NAME NUM_SNIPPETS')"
            )
        return _read_concatenated(path, Path(videos))
    raise EvalInputError(
        f"{path}: not a score file this reads; expected a directory of per-video .npy files, "
        "a .csv or .parquet table (video, snippet, score), or one .npy array with --videos"
    )


def _no_list(path: Path, videos: Path | None, what: str) -> None:
    # A list file beside a self-describing source would be silently ignored; refuse it instead.
    if videos is not None:
        raise EvalInputError(
            f"{path}: --videos ({videos}) only applies to one concatenated .npy array, "
            f"but this is {what}, which names its videos itself"
        )


def _one_line(exc: BaseException) -> str:
    return " ".join(str(exc).split()) or type(exc).__name__


def _load_npy(path: Path) -> np.ndarray:
    try:
        # Never unpickle: a score file is untrusted input and a pickle can run code.
        array = np.load(path, allow_pickle=False)
    except MemoryError as exc:  # a header that claims more than the file holds, or than memory
        raise EvalInputError(f"{path}: its .npy header asks for more memory than there is") from exc
    except (ValueError, OSError, EOFError) as exc:
        with open(path, "rb") as f:
            magic = f.read(6)
        if magic != b"\x93NUMPY":
            raise EvalInputError(f"{path}: not a .npy file (no NumPy header)") from exc
        raise EvalInputError(f"{path}: cannot read as a .npy array ({_one_line(exc)})") from exc
    if not isinstance(array, np.ndarray):
        raise EvalInputError(f"{path}: holds an archive of arrays, not one .npy array")
    if array.dtype.kind not in _NUMERIC_KINDS:
        raise EvalInputError(f"{path}: scores must be numbers, but the array's dtype is {array.dtype}")
    if array.ndim == 2 and array.shape[1] == 1:
        array = array[:, 0]
    if array.ndim != 1:
        raise EvalInputError(f"{path}: expected scores of shape (S,) or (S, 1), got shape {array.shape}")
    return array.astype(np.float64)


def _check_scores(source: Path, video: str, scores: np.ndarray) -> np.ndarray:
    if scores.size == 0:
        raise EvalInputError(f"{source}: video {video!r} has no scores")
    bad = np.flatnonzero(~np.isfinite(scores))
    if bad.size:
        i = int(bad[0])
        raise EvalInputError(
            f"{source}: video {video!r} snippet {i}: score is not a finite number ({scores[i]})"
        )
    return scores


def _add(
    out: dict[str, np.ndarray], names: dict[str, str], source: Path, name: str, scores: np.ndarray
) -> None:
    key = video_key(name)
    if not key:
        raise EvalInputError(f"{source}: an empty video name")
    if key in out:
        raise EvalInputError(f"{source}: {names[key]!r} and {name!r} are the same video ({key!r})")
    names[key] = name
    out[key] = _check_scores(source, name, scores)


def _read_directory(path: Path) -> dict[str, np.ndarray]:
    files = sorted(
        (f for f in path.iterdir() if f.is_file() and f.suffix.lower() == ".npy"), key=lambda f: f.name
    )
    if not files:
        raise EvalInputError(f"{path}: no per-video .npy score files in this directory")
    out: dict[str, np.ndarray] = {}
    names: dict[str, str] = {}
    for f in files:
        _add(out, names, f, f.name, _load_npy(f))
    return out


def _load_table(path: Path) -> pa.Table:
    try:
        if path.suffix.lower() == ".parquet":
            table = pq.read_table(path)
        else:
            # Video names like "001" must stay text, not become integers.
            options = pa_csv.ConvertOptions(column_types={"video": pa.string()})
            table = pa_csv.read_csv(path, convert_options=options)
    except (pa.ArrowException, OSError) as exc:
        raise EvalInputError(f"{path}: cannot read the score table ({_one_line(exc)})") from exc
    twice = sorted({c for c in table.column_names if table.column_names.count(c) > 1})
    if twice:
        raise EvalInputError(f"{path}: column(s) {', '.join(twice)} appear more than once")
    return table


def _read_table(path: Path) -> dict[str, np.ndarray]:
    table = _load_table(path)
    missing = [c for c in TABLE_COLUMNS if c not in table.column_names]
    if missing:
        raise EvalInputError(
            f"{path}: missing column(s) {', '.join(missing)}; a score table needs "
            f"{', '.join(TABLE_COLUMNS)} (has {', '.join(table.column_names) or 'none'})"
        )
    if table.num_rows == 0:
        raise EvalInputError(f"{path}: the score table has no rows")
    video_col, snippet_col, score_col = (table.column(c) for c in TABLE_COLUMNS)
    if not pa.types.is_integer(snippet_col.type):
        raise EvalInputError(f"{path}: column snippet must hold integers, but its type is {snippet_col.type}")
    if snippet_col.null_count:
        raise EvalInputError(f"{path}: column snippet has {snippet_col.null_count} empty value(s)")
    stype = score_col.type
    if not (pa.types.is_integer(stype) or pa.types.is_floating(stype) or pa.types.is_boolean(stype)):
        raise EvalInputError(f"{path}: column score must hold numbers, but its type is {stype}")
    if video_col.null_count:
        raise EvalInputError(f"{path}: column video has {video_col.null_count} empty value(s)")
    try:
        video_names = pc.cast(video_col, pa.string()).to_pylist()
    except pa.ArrowException as exc:
        raise EvalInputError(f"{path}: column video must hold names ({_one_line(exc)})") from exc
    snippets = snippet_col.to_numpy().astype(np.int64)
    # A null score becomes NaN here, and is then reported like any non-finite score.
    scores = pc.cast(score_col, pa.float64()).to_numpy(zero_copy_only=False)

    rows: dict[str, list[int]] = {}
    for i, name in enumerate(video_names):
        rows.setdefault(name, []).append(i)
    out: dict[str, np.ndarray] = {}
    names: dict[str, str] = {}
    for name, idx in rows.items():
        index = np.asarray(idx)
        order = np.argsort(snippets[index], kind="stable")
        numbers = snippets[index][order]
        _check_snippet_numbers(path, name, numbers)
        _add(out, names, path, name, scores[index][order])
    return out


def _check_snippet_numbers(path: Path, video: str, numbers: np.ndarray) -> None:
    """``numbers`` (sorted) must be exactly 0..S-1, or the scores would sit on the wrong frames."""
    wrong = np.flatnonzero(numbers != np.arange(numbers.size))
    if not wrong.size:
        return
    i = int(wrong[0])
    n = int(numbers[i])
    if n < 0:
        problem = f"snippet {n} is negative"
    elif i > 0 and n == numbers[i - 1]:
        problem = f"snippet {n} appears more than once"
    else:
        problem = f"snippet {i} is missing (snippets must be 0..S-1 each once)"
    raise EvalInputError(f"{path}: video {video!r}: {problem}")


def read_video_list(path: Path, what: str = "snippet") -> list[tuple[str, int]]:
    """``NAME COUNT`` lines (whitespace or a comma; an optional header): videos in order with a count.

    The count is of ``what``: snippets (a video list) or frames (``--num-frames``).
    """
    if not path.is_file():
        raise EvalInputError(f"video list not found: {path}")
    try:
        text = path.read_text(encoding="utf-8-sig")
    except (OSError, UnicodeDecodeError) as exc:
        raise EvalInputError(f"{path}: cannot read the video list ({_one_line(exc)})") from exc
    entries: list[tuple[str, int]] = []
    first = True
    for lineno, line in enumerate(text.splitlines(), start=1):
        fields = [f for f in re.split(r"[,\s]+", line.strip()) if f]
        if not fields:
            continue
        is_first, first = first, False
        if len(fields) != 2:
            raise EvalInputError(f"{path}:{lineno}: expected 'NAME NUM_{what.upper()}S', got {line.strip()!r}")
        name, count = fields
        try:
            n = int(count)
        except ValueError:
            if is_first and not _NUMBER.fullmatch(count):  # a header such as "video,num_snippets"
                continue
            raise EvalInputError(
                f"{path}:{lineno}: video {name!r}: the {what} count {count!r} is not an integer"
            ) from None
        if n <= 0:
            raise EvalInputError(f"{path}:{lineno}: video {name!r} has {n} {what}s; it needs at least one")
        entries.append((name, n))
    if not entries:
        raise EvalInputError(f"{path}: the video list names no videos")
    return entries


def _read_concatenated(path: Path, videos: Path) -> dict[str, np.ndarray]:
    entries = read_video_list(videos)
    array = _load_npy(path)
    total = sum(n for _, n in entries)
    if array.size == total:
        per = 1
    elif array.size == SNIPPET_FRAMES * total:
        per = SNIPPET_FRAMES
    else:
        raise EvalInputError(
            f"{path}: the array has {array.size} values, but {videos} lists {total} snippets, so it "
            f"must have {total} (one per snippet) or {SNIPPET_FRAMES * total} (one per frame)"
        )
    out: dict[str, np.ndarray] = {}
    names: dict[str, str] = {}
    start = 0
    for name, n in entries:
        values = array[start : start + n * per]
        start += n * per
        if per > 1:
            values = _snippet_values(path, name, values.reshape(n, per))
        _add(out, names, path, name, values)
    return out


def _snippet_values(path: Path, video: str, frames: np.ndarray) -> np.ndarray:
    """One score per snippet from its frames' values, which must all be the same finite number."""
    # Non-finite first: NaN != NaN would otherwise be misreported as "not a repeat".
    bad = np.argwhere(~np.isfinite(frames))
    if bad.size:
        snippet, frame = (int(v) for v in bad[0])
        raise EvalInputError(
            f"{path}: video {video!r} snippet {snippet} (frame {frame} of it): score is not a finite "
            f"number ({frames[snippet, frame]})"
        )
    uneven = np.flatnonzero(np.any(frames != frames[:, :1], axis=1))
    if uneven.size:
        raise EvalInputError(
            f"{path}: the frame-level array is not a repeat of snippet scores: video {video!r} "
            f"snippet {int(uneven[0])} has {frames.shape[1]} frame values that differ"
        )
    return frames[:, 0].copy()
