"""The users' region annotation format (``annotations.json``), parsed into typed records.

One JSON list entry per video::

    {"video": "Abuse001.mp4", "global_caption": "...", "region_captions": ["...", ...],
     "box_infos": [[{"frame": 192, "bbox": [x1, y1, x2, y2]}, ...], ...],  # one list per region
     "timestamps": null,                                                   # or [start_s, end_s]
     "region_negatives": [["...", ...], ...]}  # optional: negative captions, one list per region

``region_negatives`` (optional) gives each region its own hard-negative captions (FG-CLIP
carries 10 per box); a region whose entry is ``null`` or ``[]`` has none given, and box
validation generates them (``hard_negatives.py``).

Parsing is structural only: a ``NaN`` coordinate (Python's json accepts the token,
and users' files contain it) is a well-formed number here and is rejected later by
box validation with its own reason. Entries of the wrong shape become ``Malformed``
rejects, at the finest level that keeps the rest usable: a bad keyframe entry drops
that keyframe only; a bad record (missing keys, wrong types) drops the record. Negatives
are optional data: a ``region_negatives`` of the wrong shape never drops the record, only
the negatives it gives (all of them, or one region's entry), as a ``Malformed`` whose
``key`` names it.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from fgclip.errors import FGClipError

REQUIRED_KEYS = ("video", "global_caption", "region_captions", "box_infos")
NEGATIVES_KEY = "region_negatives"
_NUMBER_TYPES = (int, float)


class AnnotationFileError(FGClipError, ValueError):
    """The annotation file cannot be read as a JSON list; the message names the file."""


@dataclass(frozen=True)
class Keyframe:
    """A region's box on one frame: normalized ``(x1, y1, x2, y2)``, values as written."""

    frame: int
    bbox: tuple[float, float, float, float]


@dataclass(frozen=True)
class AnnotationRecord:
    """One well-formed entry of ``annotations.json``; ``index`` is its position in the list."""

    index: int
    video: str
    global_caption: str
    region_captions: tuple[str, ...]
    box_infos: tuple[tuple[Keyframe, ...], ...]  # empty, or one tuple of keyframes per region
    timestamps: tuple[float, float] | None
    # One tuple of given negative captions per region (empty: none given for that region);
    # None when the record gives no usable region_negatives at all.
    region_negatives: tuple[tuple[str, ...], ...] | None = None


@dataclass(frozen=True)
class Malformed:
    """An entry that cannot be used as written; ``raw`` is its JSON text.

    ``region`` and ``keyframe`` are ``None`` when the whole record is malformed. ``key`` names
    an optional key whose value is malformed in a record that is kept (``region_negatives``;
    ``region`` set when only that region's entry is bad): no box is lost with it.
    """

    index: int
    video: str | None
    region: int | None
    keyframe: int | None
    raw: str
    detail: str
    key: str | None = None


def _is_number(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)


def _as_frame(v: Any) -> int | None:
    """A frame number: an int, or a float with an integer value (some writers emit ``192.0``)."""
    if isinstance(v, bool):
        return None
    if isinstance(v, int):
        return v
    if isinstance(v, float) and math.isfinite(v) and v.is_integer():
        return int(v)
    return None


def _raw(value: Any) -> str:
    return json.dumps(value, ensure_ascii=False, default=str)


def _record_problem(entry: Any) -> str | None:
    """Why a record's top-level structure is unusable, or None."""
    if not isinstance(entry, dict):
        return f"entry is a {type(entry).__name__}, not an object"
    missing = [k for k in REQUIRED_KEYS if k not in entry]
    if missing:
        return f"missing keys {missing}"
    if not isinstance(entry["video"], str) or not entry["video"].strip():
        return "'video' must be a non-empty string"
    if not isinstance(entry["global_caption"], str):
        return "'global_caption' must be a string"
    captions = entry["region_captions"]
    if not isinstance(captions, list) or not all(isinstance(c, str) for c in captions):
        return "'region_captions' must be a list of strings"
    boxes = entry["box_infos"]
    if not isinstance(boxes, list) or not all(isinstance(r, list) for r in boxes):
        return "'box_infos' must be a list of lists (one per region)"
    if boxes and len(boxes) != len(captions):
        return f"{len(boxes)} box_infos lists for {len(captions)} region_captions"
    ts = entry.get("timestamps")
    if ts is not None and not (
        isinstance(ts, list)
        and len(ts) == 2
        and all(_is_number(t) and math.isfinite(t) for t in ts)
        and ts[0] <= ts[1]
    ):
        return "'timestamps' must be null or [start_s, end_s] with start_s <= end_s"
    return None


def _parse_keyframe(kf: Any) -> Keyframe | str:
    """A keyframe, or why the entry is not one. Runs once per box: kept to exact type checks."""
    if type(kf) is not dict or "frame" not in kf or "bbox" not in kf:
        return "keyframe must be an object with 'frame' and 'bbox'"
    frame = _as_frame(kf["frame"])
    if frame is None:
        return f"frame {kf['frame']!r} is not an integer"
    bbox = kf["bbox"]
    # type() rather than isinstance: bool is an int subclass and never a coordinate
    if type(bbox) is not list or len(bbox) != 4 or not all(type(v) in _NUMBER_TYPES for v in bbox):
        return f"bbox {_raw(bbox)} is not 4 numbers"
    return Keyframe(frame, (float(bbox[0]), float(bbox[1]), float(bbox[2]), float(bbox[3])))


def _parse_negatives(index: int, entry: dict) -> tuple[tuple[tuple[str, ...], ...] | None, list[Malformed]]:
    """The record's given negatives (None: none usable) and the malformed parts of them."""
    value = entry.get(NEGATIVES_KEY)
    if value is None:
        return None, []
    n = len(entry["region_captions"])
    if not isinstance(value, list) or len(value) != n:
        what = f"{len(value)} entries" if isinstance(value, list) else f"a {type(value).__name__}"
        detail = f"'{NEGATIVES_KEY}' must be a list of {n} lists (one per region_caption), got {what}"
        return None, [Malformed(index, entry["video"], None, None, _raw(value), detail, NEGATIVES_KEY)]
    bad, regions = [], []
    for r, negatives in enumerate(value):
        if negatives is None:
            regions.append(())
        elif isinstance(negatives, list) and all(isinstance(c, str) for c in negatives):
            regions.append(tuple(negatives))
        else:
            regions.append(())
            detail = f"'{NEGATIVES_KEY}'[{r}] must be a list of strings"
            bad.append(Malformed(index, entry["video"], r, None, _raw(negatives), detail, NEGATIVES_KEY))
    return (tuple(regions) if any(regions) else None), bad


def parse_entry(index: int, entry: Any) -> tuple[AnnotationRecord | None, list[Malformed]]:
    """Parse one list entry into a record (None if unusable) and its malformed parts."""
    problem = _record_problem(entry)
    if problem is not None:
        video = entry.get("video") if isinstance(entry, dict) else None
        return None, [
            Malformed(index, video if isinstance(video, str) else None, None, None, _raw(entry), problem)
        ]
    bad: list[Malformed] = []
    regions = []
    for r, keyframes in enumerate(entry["box_infos"]):
        good = []
        for k, kf in enumerate(keyframes):
            parsed = _parse_keyframe(kf)
            if isinstance(parsed, Keyframe):
                good.append(parsed)
            else:
                bad.append(Malformed(index, entry["video"], r, k, _raw(kf), parsed))
        regions.append(tuple(good))
    negatives, bad_negatives = _parse_negatives(index, entry)
    bad.extend(bad_negatives)
    ts = entry.get("timestamps")
    record = AnnotationRecord(
        index=index,
        video=entry["video"],
        global_caption=entry["global_caption"],
        region_captions=tuple(entry["region_captions"]),
        box_infos=tuple(regions),
        timestamps=None if ts is None else (float(ts[0]), float(ts[1])),
        region_negatives=negatives,
    )
    return record, bad


def load_annotations(path: Path) -> tuple[list[AnnotationRecord], list[Malformed]]:
    """Read ``annotations.json``: the usable records and every malformed part.

    Raises ``AnnotationFileError`` when the file is missing, not JSON, or not a list.
    """
    path = Path(path)
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except OSError as exc:
        raise AnnotationFileError(f"{path}: cannot read annotations: {exc}") from exc
    except ValueError as exc:  # JSONDecodeError, or bytes that are not UTF-8
        raise AnnotationFileError(f"{path}: not valid JSON: {exc}") from exc
    if not isinstance(data, list):
        raise AnnotationFileError(f"{path}: expected a JSON list of records, got {type(data).__name__}")
    records: list[AnnotationRecord] = []
    malformed: list[Malformed] = []
    for index, entry in enumerate(data):
        record, bad = parse_entry(index, entry)
        if record is not None:
            records.append(record)
        malformed.extend(bad)
    return records, malformed
