"""The UCF-Crime dataset layout: split files, temporal annotations, labels and video names.

A video id is the path of the video relative to the videos directory, with forward
slashes, exactly as in the split files (``Arson/Arson003_x264.mp4``). The two normal
folders name their files differently: ``Normal_Videos001_x264.mp4`` for training
and ``Normal_Videos_003_x264.mp4`` for testing.

Temporal annotation intervals are frame numbers, inclusive at both ends, as in the
official ``Temporal_Anomaly_Annotation_for_Testing_Videos.txt``.
"""

from __future__ import annotations

import logging
import os
import re
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath

import pyarrow as pa
import pyarrow.compute as pc

from fgclip.errors import FGClipError

NORMAL_LABEL = "Normal"
TRAIN_NORMAL_DIR = "Training_Normal_Videos_Anomaly"
TEST_NORMAL_DIR = "Testing_Normal_Videos_Anomaly"
NORMAL_DIRS = (TRAIN_NORMAL_DIR, TEST_NORMAL_DIR)
VIDEO_SUFFIX = "_x264"
VIDEO_EXT = ".mp4"

# Reason codes for annotation video references that cannot be used.
PATH_ESCAPES_ROOT = "path_escapes_root"
UNKNOWN_VIDEO = "unknown_video"
# Reason code of a split file line that names no video (unreadable text, a NUL, no class folder, a repeat).
BAD_SPLIT_LINE = "bad_split_line"

logger = logging.getLogger(__name__)

# A normalised path (normalize_ref) escapes its root when it is absolute (POSIX or a Windows
# drive) or has a ``..`` component. One pattern serves the scalar check and the Arrow one, so
# that a video reference and a frame path read from a file can never be judged differently.
_ESCAPES_ROOT = r"^(/|[A-Za-z]:)|(^|/)\.\.(/|$)"
_ESCAPES_ROOT_RE = re.compile(_ESCAPES_ROOT)


class DatasetFormatError(FGClipError, ValueError):
    """A dataset file breaks the UCF-Crime format; the message names the file and line."""


@dataclass(frozen=True)
class TemporalAnnotation:
    """One line of the temporal annotation file: anomalous frame intervals of a test video."""

    name: str
    label: str
    intervals: tuple[tuple[int, int], ...]  # inclusive (start, end) frame numbers
    # The line as written: VadCLIP's parser reads it by two-space fields, which this one does not.
    line: str = field(default="", compare=False)


def normalize_ref(ref: str) -> str:
    """Forward slashes, no leading ``./``: the canonical spelling of a video path."""
    ref = ref.strip().replace("\\", "/")
    while ref.startswith("./"):
        ref = ref[2:]
    return ref


def escapes_root(ref: str) -> bool:
    """True for absolute paths and paths with a ``..`` component (never to be opened)."""
    return bool(_ESCAPES_ROOT_RE.search(normalize_ref(ref)))


def escapes_root_array(refs: pa.Array | pa.ChunkedArray) -> pa.Array | pa.ChunkedArray:
    """:func:`escapes_root` of every string of an Arrow column (null stays null).

    A stage output lists frame paths by the hundred thousand; one Python call per
    path costs seconds where these Arrow kernels take milliseconds. The steps are
    :func:`normalize_ref`'s, in its order.
    """
    refs = pc.replace_substring(pc.utf8_trim_whitespace(refs), "\\", "/")
    refs = pc.replace_substring_regex(refs, r"^(\./)+", "")
    return pc.match_substring_regex(refs, _ESCAPES_ROOT)


def video_label(video_id: str) -> str:
    """The class of a video: its folder, or ``Normal`` for the two normal folders."""
    folder = PurePosixPath(video_id).parts[0] if "/" in video_id else ""
    if not folder:
        raise ValueError(f"video id {video_id!r} has no class folder")
    return NORMAL_LABEL if folder in NORMAL_DIRS else folder


def video_id(label: str, number: int, split: str) -> str:
    """The UCF-Crime id of the ``number``-th video of a class in a split.

    Training normals are ``Normal_Videos001_x264.mp4``, test normals
    ``Normal_Videos_001_x264.mp4`` (the official naming quirk); anomalies
    ``<Class>/<Class>001_x264.mp4`` in both splits.
    """
    if label != NORMAL_LABEL:
        return f"{label}/{label}{number:03d}{VIDEO_SUFFIX}{VIDEO_EXT}"
    if split == "train":
        return f"{TRAIN_NORMAL_DIR}/Normal_Videos{number:03d}{VIDEO_SUFFIX}{VIDEO_EXT}"
    if split == "test":
        return f"{TEST_NORMAL_DIR}/Normal_Videos_{number:03d}{VIDEO_SUFFIX}{VIDEO_EXT}"
    raise ValueError(f"split must be 'train' or 'test', got {split!r}")


@dataclass(frozen=True)
class BadSplitLine:
    """A split file line that names no usable video."""

    where: str  # "<split file name>:<line number>", what the stage's failure rows call the entry
    reason: str  # "<code>: <file>:<line>: <what is wrong>", the code PATH_ESCAPES_ROOT or BAD_SPLIT_LINE


# Bytes that are not UTF-8, as the "surrogateescape" decoding keeps them.
_UNDECODED_RE = re.compile("[\udc80-\udcff]")


def parse_split(path: Path) -> tuple[list[str], list[BadSplitLine]]:
    """Video ids of a split file, one per line, and the lines that name none, each with its reason.

    Blank lines are skipped, backslashes normalised. A bad line costs only its own
    entry: one stray byte (a NUL, a Latin-1 name) in a 1,900-line file used to stop
    the stage with a traceback, and an escaping path stopped it too.
    """
    try:
        data = Path(path).read_bytes()
    except OSError as exc:
        raise DatasetFormatError(f"{path}: cannot read split file: {exc}") from exc
    text = data.decode("utf-8", errors="surrogateescape").removeprefix("\ufeff")
    ids: dict[str, int] = {}  # id -> line number
    bad: list[BadSplitLine] = []
    for lineno, line in enumerate(text.splitlines(), start=1):
        ref = normalize_ref(line)
        if not ref:
            continue
        code = BAD_SPLIT_LINE
        if _UNDECODED_RE.search(ref):
            why = f"not UTF-8 text: {ref.encode('utf-8', 'surrogateescape')!r}"
        elif "\0" in ref:
            why = f"video path {ref!r} holds a NUL byte"
        elif escapes_root(ref):
            code, why = PATH_ESCAPES_ROOT, f"video path {line.strip()!r} escapes the videos dir"
        elif "/" not in ref:
            why = f"video path {ref!r} has no class folder"
        elif ref in ids:
            why = f"{ref} is listed twice (first on line {ids[ref]})"
        else:
            ids[ref] = lineno
            continue
        bad.append(BadSplitLine(f"{Path(path).name}:{lineno}", f"{code}: {path}:{lineno}: {why}"))
    return list(ids), bad


def read_split(path: Path) -> list[str]:
    """The video ids of :func:`parse_split`; each bad line is skipped with a warning."""
    ids, bad = parse_split(path)
    for line in bad:
        logger.warning("%s (line skipped)", line.reason)
    return ids


def resolves_outside(path: Path, roots: Iterable[Path]) -> Path | None:
    """Where ``path`` really leads when a symlink on the way takes it out of every root, else ``None``.

    :func:`escapes_root` judges the spelling; a link in the videos tree (the file or a
    folder above it) can still lead anywhere. ``roots`` must be resolved already.
    """
    real = Path(os.path.realpath(path))
    return None if any(real.is_relative_to(root) for root in roots) else real


def read_temporal_annotations(path: Path) -> dict[str, TemporalAnnotation]:
    """Parse the temporal annotation file into ``{video file name: annotation}``.

    Fields are separated by whitespace of any width (officially two spaces);
    ``-1`` marks a missing interval. Bad lines raise ``DatasetFormatError``.
    """
    try:
        # utf-8-sig: a byte-order mark (an editor's) is not part of the first video's name.
        lines = Path(path).read_text(encoding="utf-8-sig").splitlines()
    except (OSError, UnicodeDecodeError) as exc:
        raise DatasetFormatError(f"{path}: cannot read temporal annotations: {exc}") from exc
    out: dict[str, TemporalAnnotation] = {}
    for lineno, line in enumerate(lines, start=1):
        fields = line.split()
        if not fields:
            continue
        where = f"{path}:{lineno}"
        if len(fields) != 6:
            raise DatasetFormatError(
                f"{where}: expected 6 fields (name class s1 e1 s2 e2), got {len(fields)}"
            )
        name, label, *raw = fields
        try:
            s1, e1, s2, e2 = (int(v) for v in raw)
        except ValueError as exc:
            raise DatasetFormatError(f"{where}: frame numbers must be integers: {raw}") from exc
        intervals = []
        for start, end in ((s1, e1), (s2, e2)):
            if (start == -1) != (end == -1):
                raise DatasetFormatError(f"{where}: interval ({start}, {end}) has only one end set")
            if start == -1:
                continue
            if start < 0 or end < start:
                raise DatasetFormatError(f"{where}: bad interval ({start}, {end})")
            intervals.append((start, end))
        if name in out:
            raise DatasetFormatError(f"{where}: duplicate entry for {name}")
        out[name] = TemporalAnnotation(name, label, tuple(intervals), line)
    return out


def format_temporal_line(name: str, label: str, intervals: Iterable[tuple[int, int]]) -> str:
    """One line of the official temporal annotation format: two-space separated, and ending in two
    spaces as the official file's lines do (VadCLIP's parser needs them to keep the last number)."""
    flat = [v for pair in intervals for v in pair]
    if len(flat) > 4:
        raise ValueError(f"{name}: at most two intervals, got {len(flat) // 2}")
    flat += [-1] * (4 - len(flat))
    return "  ".join([name, label, *map(str, flat)]) + "  "


def _strip_suffix(name: str) -> str:
    stem = name.removesuffix(VIDEO_EXT)
    return stem.removesuffix(VIDEO_SUFFIX)


class VideoResolver:
    """Map an annotation's ``video`` field to a split video id.

    Accepted spellings of ``Abuse/Abuse001_x264.mp4``: the id itself, without the
    class folder (``Abuse001_x264.mp4``), and either of those without ``_x264``
    (``Abuse001.mp4``, as in the users' annotations). A short spelling shared by
    two ids is ambiguous and does not resolve.
    """

    def __init__(self, video_ids: Iterable[str]):
        self._ids = frozenset(video_ids)
        short: dict[str, str | None] = {}
        for vid in sorted(self._ids):
            folder, _, name = vid.rpartition("/")
            stem = _strip_suffix(name)
            for key in (f"{folder}/{stem}", stem):
                short[key] = vid if short.get(key, vid) == vid else None  # None: ambiguous
        self._short = short

    def resolve(self, ref: str) -> tuple[str | None, str | None]:
        """``(video_id, None)`` when ``ref`` names a known video, else ``(None, reason code)``."""
        if escapes_root(ref):
            return None, PATH_ESCAPES_ROOT
        ref = normalize_ref(ref)
        if ref in self._ids:
            return ref, None
        folder, _, name = ref.rpartition("/")
        stem = _strip_suffix(name)
        vid = self._short.get(f"{folder}/{stem}" if folder else stem)
        return (vid, None) if vid else (None, UNKNOWN_VIDEO)
