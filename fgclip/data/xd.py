"""The XD-Violence test set: labels in file names, the temporal annotation file, frame ground truth.

A video is named ``<source>__#<time range or 1>_label_<codes>``, for instance
``Bad.Boys.1995__#01-11-55_01-12-40_label_G-B2-B6`` or ``v=uyvM-vq5DwA__#1_label_A``.
``<codes>`` is ``A`` for a normal video, else up to three class codes joined by ``-``
with ``0`` filling the unused places (``B2-0-0``, ``B2-G-0``). Feature files add the
crop, ``<name>__<k>.npy`` (``k`` = 0 is the centre crop), and a few lines of the
official annotation file carry the video's ``.mp4`` extension: :func:`xd_video_key`
reduces all of these spellings to the bare name.

The test annotation file (``annotations.txt``) has one line per violent test video:
the name, then start and end frame numbers in pairs, separated by single spaces.
Frames are counted from 0 and the end is exclusive: both reference ground-truth
builders mark ``gt[start:end]``. Normal videos have no line.

The rules, with the reference files and lines they come from, are in the README's
evaluation section ("XD-Violence").
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping
from pathlib import Path

import numpy as np

from fgclip.errors import FGClipError

# Class codes as the references name them (VadCLIP src/xd_test.py:92, src/xd_train.py label_map).
XD_CLASSES: dict[str, str] = {
    "A": "normal",
    "B1": "fighting",
    "B2": "shooting",
    "B4": "riot",
    "B5": "abuse",
    "B6": "car accident",
    "G": "explosion",
}
NORMAL_CODE = "A"
LABEL_MARK = "_label_"
PLACEHOLDER_CODE = "0"  # fills the unused label places: B2-0-0
SNIPPET_LEN = 16  # frames per feature row in both references
ANNOTATION_FILE = "annotations.txt"
GT_RULES = ("vadclip", "xdviodet")

_CROP_SUFFIX_RE = re.compile(r"__\d+$")
_UINT_RE = re.compile(r"[0-9]+")


class XDFormatError(FGClipError, ValueError):
    """An XD-Violence name, annotation line or ground-truth request is malformed."""


def xd_video_key(name: str) -> str:
    """The bare video name of a path, a feature file (``__k.npy``) or a ``.mp4`` file name."""
    key = name.strip().replace("\\", "/").rsplit("/", 1)[-1]
    key = key.removesuffix(".npy")
    key = _CROP_SUFFIX_RE.sub("", key)
    return key.removesuffix(".mp4")


def xd_labels(name: str) -> tuple[str, ...]:
    """The class codes of a video from its name, in the order written; ``('A',)`` for a normal video.

    Accepts any spelling :func:`xd_video_key` does. Placeholders (``0``) are dropped
    and a repeated code counts once. A name without a ``_label_`` part, an unknown
    code, or ``A`` next to a violent code raises :class:`XDFormatError`.
    """
    key = xd_video_key(name)
    at = key.rfind(LABEL_MARK)
    if at < 0:
        raise XDFormatError(f"XD-Violence name {name!r} has no {LABEL_MARK!r} part")
    part = key[at + len(LABEL_MARK) :]
    parts = part.split("-")
    if not part or "" in parts:
        raise XDFormatError(f"XD-Violence name {name!r} has an empty label code in {part!r}")
    unknown = [c for c in parts if c != PLACEHOLDER_CODE and c not in XD_CLASSES]
    if unknown:
        known = ", ".join(XD_CLASSES)
        raise XDFormatError(
            f"XD-Violence name {name!r} has unknown label code {unknown[0]!r} (known: {known})"
        )
    codes = tuple(dict.fromkeys(c for c in parts if c != PLACEHOLDER_CODE))
    if not codes:
        raise XDFormatError(f"XD-Violence name {name!r} has only placeholder label codes ({part!r})")
    if NORMAL_CODE in codes and len(codes) > 1:
        raise XDFormatError(f"XD-Violence name {name!r} is labelled both normal and violent ({part!r})")
    return codes


def is_normal(name: str) -> bool:
    """True for a normal video (label ``A``); raises :class:`XDFormatError` as :func:`xd_labels` does."""
    return xd_labels(name) == (NORMAL_CODE,)


def read_xd_annotations(path: Path) -> dict[str, tuple[tuple[int, int], ...]]:
    """The test annotation file as ``{video name as written: ((start, end), ...)}``.

    Frame numbers are 0-based, ends exclusive (module docstring). Fields may be
    separated by any whitespace; blank lines are skipped. A line raises
    :class:`XDFormatError` naming ``file:line`` when its name has no violent label,
    a number is not a non-negative integer, the numbers do not pair up, an interval
    is empty (end <= start), it lists no interval, or it repeats a video (also as
    ``<name>.mp4``). Intervals are kept as written, overlaps and order included.
    """
    try:
        text = Path(path).read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise XDFormatError(f"{path}: cannot read XD-Violence annotations: {exc}") from exc
    out: dict[str, tuple[tuple[int, int], ...]] = {}
    seen: dict[str, int] = {}  # video key -> line number
    for lineno, line in enumerate(text.removeprefix("\ufeff").splitlines(), start=1):
        fields = line.split()
        if not fields:
            continue
        where = f"{path}:{lineno}"
        name, numbers = fields[0], fields[1:]
        try:
            codes = xd_labels(name)
        except XDFormatError as exc:
            raise XDFormatError(f"{where}: {exc}") from None
        if codes == (NORMAL_CODE,):
            raise XDFormatError(f"{where}: {name!r} is a normal video; only violent videos are annotated")
        bad = next((v for v in numbers if not _UINT_RE.fullmatch(v)), None)
        if bad is not None:
            raise XDFormatError(f"{where}: frame number {bad!r} is not a non-negative integer")
        if not numbers:
            raise XDFormatError(f"{where}: {name!r} lists no interval")
        if len(numbers) % 2:
            raise XDFormatError(
                f"{where}: {len(numbers)} frame numbers do not pair up (start end ...); the last has no end"
            )
        values = [int(v) for v in numbers]
        intervals = tuple(zip(values[0::2], values[1::2], strict=True))
        for start, end in intervals:
            if end <= start:
                raise XDFormatError(f"{where}: interval {start} {end} is empty (end must exceed start)")
        key = xd_video_key(name)
        if key in seen:
            raise XDFormatError(f"{where}: video {key!r} is annotated twice (first on line {seen[key]})")
        seen[key] = lineno
        out[name] = intervals
    return out


def xd_annotations_by_video(
    annotations: Mapping[str, tuple[tuple[int, int], ...]],
) -> dict[str, tuple[tuple[int, int], ...]]:
    """:func:`read_xd_annotations` keyed by :func:`xd_video_key` (the ``.mp4`` lines lose the extension)."""
    return {xd_video_key(name): intervals for name, intervals in annotations.items()}


def _check_count(value: int | None, what: str) -> int | None:
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 0:
        raise XDFormatError(f"{what} must be a non-negative integer, got {value!r}")
    return int(value)


def xd_frame_ground_truth(
    intervals: Iterable[tuple[int, int]],
    num_snippets: int | None,
    rule: str,
    snippet_len: int = SNIPPET_LEN,
    *,
    num_frames: int | None = None,
) -> np.ndarray:
    """Per-frame labels (int8, 1 = violent) of one test video, as the named reference builds them.

    Both references mark ``gt[start:end]`` for every interval (0-based, end
    exclusive) on a zero vector, then cut the vector to whole snippets; frames an
    interval places past the cut are lost. They differ in where the length comes from:

    ``"vadclip"`` (nwpu-zxr/VadCLIP list/make_gt_xd.py, commit 8f554d1a):
        the video's feature rows ``T`` = ``num_snippets`` (line 22 loads the centre
        crop's features). Line 23 allocates ``(T + 1) * 16`` frames, line 39 marks
        the intervals and line 41 keeps all but the last 16: ``T * snippet_len`` frames.
        ``num_frames`` must not be given.

    ``"xdviodet"`` (Roc-Ng/XDVioDet list/make_gt.py, commit 473447c7, the dataset
        authors' builder; RTFM's public code has none for XD): the decoded video's frame count
        ``N`` = ``num_frames`` (line 25, OpenCV's frame count). Line 29 allocates ``N``
        frames, line 39 marks the intervals, line 42 drops the last frame and lines
        41-44 then drop ``(N - 1) % 16`` more: ``16 * floor((N - 1) / 16)`` frames,
        one per frame of the ``floor((N - 1) / 16)`` I3D snippets (the comment on
        line 41). ``num_snippets`` may be given as a check; it must equal that count.

    A normal video has no intervals: all zeros.
    """
    if rule not in GT_RULES:
        raise XDFormatError(f"unknown XD-Violence ground-truth rule {rule!r} (known: {', '.join(GT_RULES)})")
    if isinstance(snippet_len, bool) or not isinstance(snippet_len, (int, np.integer)) or snippet_len < 1:
        raise XDFormatError(f"snippet_len must be a positive integer, got {snippet_len!r}")
    snippets = _check_count(num_snippets, "num_snippets")
    frames = _check_count(num_frames, "num_frames")
    if rule == "vadclip":
        if frames is not None:
            raise XDFormatError("rule 'vadclip' counts feature rows: give num_snippets, not num_frames")
        if snippets is None:
            raise XDFormatError("rule 'vadclip' needs num_snippets (the video's feature rows)")
        length = snippets * snippet_len
    else:
        if frames is None:
            raise XDFormatError("rule 'xdviodet' needs num_frames (the decoded video's frame count)")
        whole = max(frames - 1, 0) // snippet_len
        if snippets is not None and snippets != whole:
            raise XDFormatError(
                f"rule 'xdviodet': a video of {frames} frames has {whole} snippets of {snippet_len}, "
                f"but num_snippets is {snippets}"
            )
        length = whole * snippet_len
    gt = np.zeros(length, dtype=np.int8)
    for interval in intervals:
        try:
            start, end = interval
        except (TypeError, ValueError):
            raise XDFormatError(f"an interval is a (start, end) pair, got {interval!r}") from None
        start, end = _check_count(start, "an interval start"), _check_count(end, "an interval end")
        if end <= start:
            raise XDFormatError(f"interval ({start}, {end}) is empty (end must exceed start)")
        gt[start:end] = 1  # numpy clips the slice at the vector's end, as the references' slices do
    return gt


def write_mini_xd_sample(root: Path, seed: int) -> dict:
    """Write a mini XD-Violence test set under ``root``; return what a test needs to know of it.

    Files: ``annotations.txt`` in the official format for 6 violent videos (one line
    spelled with ``.mp4``, lines in no particular order, as in the official file),
    ``normal.list`` with 6 normal video names, and ``test.list`` with all 12 names in
    the references' test order (violent videos sorted, then normal ones sorted).
    Snippet counts and interval positions vary with ``seed``; the edge cases do not:
    an interval starting at frame 0, one ending on the last frame, one ending past
    the end, one lying wholly past the end, a video with several intervals.

    Returns ``{"root", "annotations", "normal_list", "test_list": Path, "videos": [names
    in test order], "violent": [...], "normal": [...], "num_snippets": {name: int},
    "intervals": {name: ((start, end), ...)} (normal videos: ()), "labels": {name: codes}}``.
    """
    rng = np.random.default_rng(seed)
    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)
    violent = [
        "Mini.Heist.1999__#00-01-10_00-02-05_label_B1-0-0",
        "Mini.Heist.1999__#00-12-00_00-13-30_label_B2-G-0",
        "Mini.Riot.2012__#1_label_B4-0-0",
        "v=Ab3_Zx-9QkE__#00-00-00_00-01-00_label_B6-0-0",
        "v=-mIn1_Tst0A__#1_label_B5-B1-0",
        "Mini.Blast.2005.BluRay__#01-02-03_01-02-40_label_G-B2-B6",
    ]
    normal = [
        "Mini.Heist.1999__#00-20-00_00-21-00_label_A",
        "Mini.Garden.2016__#0-05-52_0-08-22_label_A",
        "v=Qq0-nrmL_1c__#1_label_A",
        "v=Zz9_nrmL-2d__#00-03-00_00-06-00_label_A",
        "v=aa1NrmL__x3__#1_label_A",
        "quiet.evening.2008__#0-27-17_0-28-07_label_A",
    ]
    counts = {name: int(rng.integers(6, 40)) for name in violent + normal}
    intervals: dict[str, tuple[tuple[int, int], ...]] = {}
    for i, name in enumerate(violent):
        frames = counts[name] * SNIPPET_LEN
        mid = int(rng.integers(SNIPPET_LEN, frames - 2 * SNIPPET_LEN))
        width = int(rng.integers(3, SNIPPET_LEN))
        if i == 0:  # from frame 0
            spans = [(0, int(rng.integers(5, frames // 2)))]
        elif i == 1:  # ends on the last frame, and one more
            spans = [(mid, mid + width), (frames - width, frames)]
        elif i == 2:  # runs past the end
            spans = [(frames - width, frames + int(rng.integers(1, 3 * SNIPPET_LEN)))]
        elif i == 3:  # several, the last wholly past the end
            spans = [(1, 1 + width), (mid, mid + width), (frames + 2, frames + 2 + width)]
        elif i == 4:  # touching intervals and a one-frame one
            spans = [(mid, mid + width), (mid + width, mid + 2 * width), (frames - 1, frames)]
        else:  # a ragged tail: ends inside the last snippet
            spans = [(mid, frames - SNIPPET_LEN // 2)]
        intervals[name] = tuple(spans)
    lines = []
    for i in rng.permutation(len(violent)):
        name = violent[int(i)]
        written = name + ".mp4" if name.startswith("v=Ab3") else name
        lines.append(" ".join([written] + [f"{s} {e}" for s, e in intervals[name]]))
    annotations = root / ANNOTATION_FILE
    annotations.write_text("\n".join(lines) + "\n", encoding="utf-8")
    normal_list = root / "normal.list"
    normal_list.write_text("".join(n + "\n" for n in normal), encoding="utf-8")
    order = sorted(violent) + sorted(normal)
    test_list = root / "test.list"
    test_list.write_text("".join(n + "\n" for n in order), encoding="utf-8")
    for name in normal:
        intervals[name] = ()
    return {
        "root": root,
        "annotations": annotations,
        "normal_list": normal_list,
        "test_list": test_list,
        "videos": order,
        "violent": sorted(violent),
        "normal": sorted(normal),
        "num_snippets": counts,
        "intervals": intervals,
        "labels": {name: xd_labels(name) for name in order},
    }
