"""The UCF-Crime frame-level evaluation protocol (numpy / scikit-learn only).

Ground truth comes from ``Temporal_Anomaly_Annotation_for_Testing_Videos.txt``
(parsed by :mod:`fgclip.data.ucf`): one line per test video,
``name  Class  start1  end1  start2  end2``, where the name is the video's file
name (``Arson011_x264.mp4``, no class folder), the intervals are inclusive
decoded-frame numbers counted from 0 (the numbering of the frame index) and
``-1  -1`` means "no interval". Normal videos are all zero.

Scores follow the common protocol: one score per non-overlapping 16-frame
snippet, repeated to every frame of the snippet. All test frames are
concatenated in split-file order and scored with ROC AUC (the headline metric)
and average precision.

Consistency between the split file and the annotation file is strict: a test
video without an annotation and an annotation for a video that is not in the
split are both errors (naming the file and the entry), because either one
silently changes the set of frames the AUC is computed over.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path, PurePosixPath

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
from sklearn.metrics import roc_curve

from fgclip.atomic import atomic_path
from fgclip.data.layout import FRAME_SCORES_SCHEMA
from fgclip.data.ucf import NORMAL_LABEL as NORMAL
from fgclip.data.ucf import TemporalAnnotation, video_label
from fgclip.errors import FGClipError

log = logging.getLogger(__name__)

# Which model produced a row of the frame-score table.
MODEL_KINDS = ("finetuned", "pretrained", "untrained")


class EvalInputError(FGClipError, ValueError):
    """The test split, the temporal annotation or the decoded videos disagree."""


@dataclass(frozen=True)
class AnnotatedVideo:
    """A test video with its per-frame ground truth."""

    video: str  # video id as in the split file: "Arson/Arson011_x264.mp4"
    label: str
    labels: np.ndarray  # int8[num_frames], 1 = anomalous frame
    clipped: bool  # an interval ran past the decoded end and was clipped
    annotation: TemporalAnnotation | None = None  # its line, for the reference protocols' own rules


@dataclass(frozen=True)
class VideoScores:
    """Per-frame ground truth and scores of one test video."""

    video: str
    label: str
    labels: np.ndarray  # int8[num_frames]
    scores: np.ndarray  # float[num_frames]: 1 - p(Normal)
    # float[num_frames]: the same order as ``scores`` without float saturation; the
    # metrics rank by it when given (see zeroshot.snippet_log_odds).
    log_odds: np.ndarray | None = None

    @property
    def ranking(self) -> np.ndarray:
        return self.scores if self.log_odds is None else self.log_odds


def frame_ground_truth(entry: TemporalAnnotation, num_frames: int, source: Path) -> tuple[np.ndarray, bool]:
    """Per-frame 0/1 labels of a video with ``num_frames`` decoded frames.

    An interval that ends past the last frame is clipped (the annotation was
    made on a slightly longer decode) and reported; one that *starts* past the
    end cannot belong to this video and is an error.
    """
    labels = np.zeros(num_frames, dtype=np.int8)
    clipped = False
    for start, end in entry.intervals:
        if start >= num_frames:
            raise EvalInputError(
                f"{source}: {entry.name}: interval [{start}, {end}] starts past the "
                f"video's end (decoded {num_frames} frames, last frame {num_frames - 1})"
            )
        if end >= num_frames:
            log.warning(
                "%s: %s: interval [%d, %d] clipped to the decoded end (last frame %d)",
                source,
                entry.name,
                start,
                end,
                num_frames - 1,
            )
            clipped = True
        labels[start : min(end, num_frames - 1) + 1] = 1
    return labels, clipped


def build_test_set(
    split: Sequence[str],
    annotations: Mapping[str, TemporalAnnotation],
    num_frames: Mapping[str, int],
    split_path: Path,
    annotation_path: Path,
) -> list[AnnotatedVideo]:
    """Match the split to the annotation and build every video's ground truth, in split order.

    ``num_frames`` maps video id to its decoded frame count; videos of the split
    that are absent from it (failed to decode, recorded by the caller) are left
    out, but still count as "in the split" for the consistency checks.
    """
    if not split:
        raise EvalInputError(f"empty test set: {split_path} lists no videos")
    by_name: dict[str, str] = {}
    for video in split:
        name = PurePosixPath(video).name
        if name in by_name:
            raise EvalInputError(f"{split_path}: {video} and {by_name[name]} share the file name {name}")
        by_name[name] = video
    missing = [video for name, video in by_name.items() if name not in annotations]
    if missing:
        raise EvalInputError(
            f"{annotation_path}: no temporal annotation for test video(s) {', '.join(missing)} (listed in {split_path})"
        )
    extra = [name for name in annotations if name not in by_name]
    if extra:
        raise EvalInputError(
            f"{annotation_path}: entry {extra[0]} is not a test video in {split_path}"
            + (f" (and {len(extra) - 1} more: {', '.join(extra[1:])})" if len(extra) > 1 else "")
        )
    test_set = []
    for name, video in by_name.items():
        if video not in num_frames:
            continue
        entry = annotations[name]
        if entry.label != video_label(video):
            raise EvalInputError(
                f"{annotation_path}: {name}: class {entry.label!r} disagrees with the video's folder "
                f"({video}, class {video_label(video)!r})"
            )
        if entry.label == NORMAL and entry.intervals:
            raise EvalInputError(f"{annotation_path}: {name}: a Normal video cannot have anomaly intervals")
        labels, clipped = frame_ground_truth(entry, num_frames[video], annotation_path)
        test_set.append(AnnotatedVideo(video, entry.label, labels, clipped, entry))
    if not test_set:
        raise EvalInputError(f"empty test set: none of the {len(split)} videos in {split_path} was decoded")
    return test_set


def num_snippets(num_frames: int, snippet_len: int = 16) -> int:
    """Snippets of a video: ceil(num_frames / snippet_len), the ragged tail counting as one."""
    return -(-num_frames // snippet_len)


def snippet_to_frames(snippet_scores: np.ndarray, num_frames: int, snippet_len: int = 16) -> np.ndarray:
    """Repeat each snippet's score to every frame of its non-overlapping snippet.

    The video has S = ceil(num_frames / snippet_len) snippets. The last one may
    be ragged (shorter than ``snippet_len``): it was scored from its own middle
    frame and its score covers only its own frames, so no frame is dropped and
    none is padded.
    """
    snippet_scores = np.asarray(snippet_scores)
    expected = num_snippets(num_frames, snippet_len)
    if snippet_scores.shape != (expected,):
        raise EvalInputError(
            f"{num_frames} frames make {expected} snippets of {snippet_len}, "
            f"got scores of shape {snippet_scores.shape}"
        )
    return np.repeat(snippet_scores, snippet_len)[:num_frames]


def roc_points(videos: Sequence[VideoScores]) -> dict[str, np.ndarray]:
    """The frame-level ROC curve over all test frames: ``fpr``, ``tpr``, ``threshold``."""
    labels = np.concatenate([v.labels for v in videos])
    scores = np.concatenate([v.ranking for v in videos])
    fpr, tpr, threshold = roc_curve(labels, scores)
    return {"fpr": fpr, "tpr": tpr, "threshold": threshold}


def write_roc_csv(path: Path, videos: Sequence[VideoScores]) -> None:
    """ROC curve points as CSV (``fpr,tpr,threshold``) for ``dvc plots``."""
    points = roc_points(videos)
    path.parent.mkdir(parents=True, exist_ok=True)
    table = np.column_stack([points["fpr"], points["tpr"], points["threshold"]])
    np.savetxt(path, table, delimiter=",", header="fpr,tpr,threshold", comments="", fmt="%.12g")


def frame_score_table(videos: Sequence[VideoScores], model: str, snippet_len: int = 16) -> pa.Table:
    """One row per (video, frame) of one model, enough to recompute any metric."""
    if model not in MODEL_KINDS:
        raise ValueError(f"model must be one of {MODEL_KINDS}, got {model!r}")
    lengths = np.array([v.labels.shape[0] for v in videos], dtype=np.int64)
    total = int(lengths.sum())
    starts = np.repeat(np.cumsum(lengths) - lengths, lengths)
    frame = np.arange(total, dtype=np.int64) - starts
    return pa.Table.from_pydict(
        {
            "video": np.repeat(np.array([v.video for v in videos], dtype=object), lengths),
            "class": np.repeat(np.array([v.label for v in videos], dtype=object), lengths),
            "frame": frame,
            "snippet": frame // snippet_len,
            "score": np.concatenate([v.scores for v in videos]).astype(np.float64),
            "log_odds": np.concatenate([v.ranking for v in videos]).astype(np.float64),
            "label": np.concatenate([v.labels for v in videos]).astype(np.int8),
            "model": np.full(total, model, dtype=object),
        },
        schema=FRAME_SCORES_SCHEMA,
    )


def write_frame_scores(path: Path, rows: Iterable[pa.Table]) -> int:
    """Write frame-score tables (from :func:`frame_score_table`) to one Parquet file; returns rows."""
    tables = list(rows)
    table = pa.concat_tables(tables) if tables else FRAME_SCORES_SCHEMA.empty_table()
    path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_path(path) as tmp:  # a crash never leaves a half-written scores file behind
        pq.write_table(table, tmp, compression="zstd")
    return table.num_rows
