"""The frame-level protocols: the project's own (``full``) and three references of the field.

A published UCF-Crime AUC is a number under one reference's rules. They differ in
four places, and each shifts the third decimal:

- the ground truth: which frames an annotated interval ``start  end`` covers, and how
  many frames a video has;
- the tail: what happens to the frames after the last whole 16-frame snippet;
- the score that is ranked (float64 log-odds, float64 probabilities, float32 ones);
- the AP: scikit-learn's step sum, or the trapezoid under the precision-recall curve.

The rules, each from the reference's own file (read at the commits the README names):

``full`` (this project's own): the decoded frame count N; intervals are 0-based frame
numbers, both ends inclusive, clipped at the decoded end with a warning; every frame is
scored, the ragged tail as its own snippet (ceil(N / 16) snippets); ranked by float64
log-odds (no ties from saturation); AUC and AP from scikit-learn.

``sultani`` (Sultani et al. 2018, ``WaqasSultani/AnomalyDetectionCVPR2018``,
``Evaluate_Anomaly_Detector.m``): a video has ``round(duration * 30)`` frames (here the
decoded count, equal for 30 fps video: ``num_frames``); interval numbers are MATLAB's
1-based frame indices, both ends inclusive, clamped to ``[1, N]``
(``GT(max(s,1):min(e,N)) = 1``); the whole 16-frame snippets' scores are repeated 16
times and the tail past them takes the last snippet's score (``repmat(...(end))``);
normal videos are all zero; the AUC is ``trapz(fpr, tpr)`` over the frames sorted by
descending score with ties left in frame order (MATLAB's stable ``sort``), one step per
frame. The script computes no AP: ``frame_ap`` here is scikit-learn's.

``vadclip`` (VadCLIP, ``nwpu-zxr/VadCLIP``, ``list/make_gt_ucf.py`` and
``src/ucf_test.py``): a video of S snippets gets a vector of ``(S + 1) * 16`` zeros;
the annotation line is split on two spaces and its first and last fields dropped
(``split('  ')[1:-1]``; the official file ends its lines with two spaces, so this keeps
every number; a line without them loses its last number), pairs ``(s, e)`` are read from
the fields after the class and ``gt[s:e] = 1`` (0-based, end exclusive) unless either is
-1; the last 16 entries are dropped, so the video is 16 S frames. Videos whose name
contains ``Normal`` are all zero. Scores are float32 probabilities (torch), repeated 16
times; AUC and AP from scikit-learn (``roc_auc_score``, ``average_precision_score``).

``rtfm`` (RTFM, ``tianyu0207/RTFM``, ``list/make_gt_ucf.py`` and ``test_10crop.py``):
16 S frames; an interval covers ``range(s, e + 1)`` (0-based, inclusive), or
``range(s, e)`` when ``e + 1`` passes the end, and the script stops unless the video then
has exactly 16 S labels (an interval past the end, or a start past it, is an error here
too); an anomalous video without an interval stops it as well. Scores are float32,
repeated 16 times; AUC is ``auc(roc_curve)``, AP is ``auc(recall, precision)`` of
``precision_recall_curve`` (the trapezoid, which UR-DMU and PEL4VAD use too).

Where this module differs from a reference, on purpose: a video is found by its exact
file name, where VadCLIP takes the first annotation line that contains the name.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path, PurePosixPath

import numpy as np
from sklearn.metrics import auc, average_precision_score, precision_recall_curve, roc_auc_score, roc_curve

from fgclip.data.ucf import NORMAL_LABEL, TemporalAnnotation, format_temporal_line
from fgclip.eval.protocol import EvalInputError, VideoScores, frame_ground_truth, snippet_to_frames

PROTOCOLS = ("full", "sultani", "vadclip", "rtfm")
# XD-Violence's (fgclip.data.xd): VadCLIP's make_gt_xd.py / xd_test.py, and the dataset
# authors' make_gt.py / test.py (Roc-Ng/XDVioDet), whose AP is the trapezoid.
XD_PROTOCOLS = ("vadclip", "xdviodet")
SNIPPET = 16  # every reference's snippet length (C3D / I3D / CLIP features of 16 frames)


@dataclass(frozen=True)
class SnippetScores:
    """One test video's scores, one per 16-frame snippet, before any protocol expands them."""

    video: str  # the split's id ("Arson/Arson011_x264.mp4") or the scores' name
    label: str  # class; NORMAL_LABEL for normal videos
    annotation: TemporalAnnotation
    scores: np.ndarray  # float64 [S]: 1 - p(Normal) or any method's anomaly score
    log_odds: np.ndarray | None = None  # float64 [S]: the same order without saturation (full only)
    num_frames: int | None = None  # decoded frames (full) / round(duration * 30) (sultani)


def check_protocol(protocol: str, dataset: str = "ucf") -> str:
    known = {"ucf": PROTOCOLS, "xd": XD_PROTOCOLS, "any": (*PROTOCOLS, "xdviodet")}[dataset]
    if protocol not in known:
        raise EvalInputError(f"protocol {protocol!r} for {dataset}: choose one of {', '.join(known)}")
    return protocol


# ----------------------------------------------------------------- ground truth


def _sultani_truth(entry: TemporalAnnotation, num_frames: int) -> np.ndarray:
    labels = np.zeros(num_frames, dtype=np.int8)
    if entry.label == NORMAL_LABEL:
        return labels
    for start, end in entry.intervals:
        # MATLAB's GT(max(s,1):min(e,N)) = 1, 1-based and inclusive, as a 0-based slice.
        labels[max(start, 1) - 1 : min(end, num_frames)] = 1
    return labels


def vadclip_fields(line: str) -> list[tuple[int, int]]:
    """The ``(start, end)`` pairs VadCLIP's parser reads from one annotation line, -1s included."""
    fields = line.split("  ")[1:-1]
    pairs = []
    for i in range(1, len(fields) - 1, 2):  # after the class: s1 e1 s2 e2 ...
        try:
            pairs.append((int(fields[i]), int(fields[i + 1])))
        except ValueError as exc:
            raise EvalInputError(f"VadCLIP's parser cannot read {line!r}: {exc}") from exc
    return pairs


def _vadclip_truth(entry: TemporalAnnotation, num_snippets: int) -> np.ndarray:
    labels = np.zeros((num_snippets + 1) * SNIPPET, dtype=np.int8)
    if "Normal" not in entry.name:
        # An annotation built in code has no line: the official file's, two trailing spaces and all.
        line = entry.line or format_temporal_line(entry.name, entry.label, entry.intervals)
        for start, end in vadclip_fields(line):
            if start != -1 and end != -1:
                labels[start:end] = 1
    return labels[:-SNIPPET]


def _rtfm_truth(entry: TemporalAnnotation, num_snippets: int, source: str) -> np.ndarray:
    n = num_snippets * SNIPPET
    if "Normal_" in entry.name:
        return np.zeros(n, dtype=np.int8)
    events = list(entry.intervals)
    why = None
    if not events or len(events) > 2:
        why = f"{len(events)} anomaly intervals (its .mat annotations hold one or two)"
    out: list[int] = []
    if why is None and any(max(s, e) > n for s, e in events):
        # The script's count check fails on these; found here before building lists of that size.
        why = f"an interval {events} past the end of its {num_snippets} snippets ({n} frames)"
    if why is None:
        (s1, e1), rest = events[0], events[1:]
        out += [0] * max(s1, 0)
        if rest:
            # Two events: the first is taken inclusive with no end check, as the script does.
            s2, e2 = rest[0]
            out += [1] * max(e1 + 1 - s1, 0) + [0] * max(s2 - (e1 + 1), 0)
            s1, e1 = s2, e2
        if e1 + 1 <= n:
            out += [1] * max(e1 + 1 - s1, 0) + [0] * max(n - (e1 + 1), 0)
        else:
            out += [1] * max(e1 - s1, 0)
        if len(out) != n:
            why = f"{len(out)} ground-truth frames for {n} (an interval past the end of its {num_snippets} snippets)"
    if why is not None:
        raise EvalInputError(
            f"{source}: {entry.name}: {why}: RTFM's make_gt_ucf.py stops on this video "
            "('Num of frames is not correct'); use another protocol or fix the annotation"
        )
    return np.asarray(out, dtype=np.int8)


def ground_truth(protocol: str, video: SnippetScores, source: str | Path) -> np.ndarray:
    """Per-frame 0/1 labels of one video under ``protocol`` (its length is the protocol's frame count)."""
    s = len(video.scores)
    if protocol in ("full", "sultani"):
        if video.num_frames is None:
            raise EvalInputError(f"{video.video}: protocol {protocol} needs the video's frame count")
        if protocol == "full":
            return frame_ground_truth(video.annotation, video.num_frames, Path(source))[0]
        return _sultani_truth(video.annotation, video.num_frames)
    if protocol == "vadclip":
        return _vadclip_truth(video.annotation, s)
    return _rtfm_truth(video.annotation, s, str(source))


# ------------------------------------------------------------------ frame scores


def frame_scores(protocol: str, video: SnippetScores) -> tuple[np.ndarray, np.ndarray | None]:
    """Per-frame scores under ``protocol``, and the ranking values when they are not the scores."""
    scores = np.asarray(video.scores, dtype=np.float64)
    s = scores.shape[0]
    if protocol == "full":
        n = video.num_frames
        try:
            expanded = snippet_to_frames(scores, n, SNIPPET)
        except EvalInputError as exc:
            raise EvalInputError(f"{video.video}: {exc}") from exc
        odds = None if video.log_odds is None else snippet_to_frames(video.log_odds, n, SNIPPET)
        return expanded, odds
    if protocol == "sultani":
        n = video.num_frames
        if s * SNIPPET > n:
            raise EvalInputError(
                f"{video.video}: {s} snippets of {SNIPPET} = {s * SNIPPET} frames, more than its {n}: "
                f"Sultani's script fails on this; give one score per whole snippet ({n // SNIPPET})"
            )
        if s == 0:
            raise EvalInputError(f"{video.video}: no whole 16-frame snippet in {n} frames")
        return np.concatenate([np.repeat(scores, SNIPPET), np.full(n - s * SNIPPET, scores[-1])]), None
    # VadCLIP and RTFM hold float32 model outputs; their ties are those of float32.
    return np.repeat(as_float32(scores, video.video), SNIPPET), None


def as_float32(scores: np.ndarray, video: str) -> np.ndarray:
    """Scores as the references rank them, float32 (held in float64); past float32's range, an error."""
    big = np.abs(scores) > np.finfo(np.float32).max
    if big.any():
        raise EvalInputError(
            f"{video}: score {scores[big][0]!r} is beyond float32's range, which this protocol ranks in"
        )
    return scores.astype(np.float32).astype(np.float64)


def whole_snippets(video: SnippetScores) -> SnippetScores:
    """The video's scores of whole 16-frame snippets only: a C3D feature exists for each of those.

    This project scores the ragged tail as a snippet of its own; Sultani's protocol
    pads the tail with the last whole snippet's score instead.
    """
    whole = video.num_frames // SNIPPET
    return SnippetScores(
        video.video,
        video.label,
        video.annotation,
        video.scores[:whole],
        None if video.log_odds is None else video.log_odds[:whole],
        video.num_frames,
    )


def protocol_videos(
    protocol: str, videos: Sequence[SnippetScores], source: str | Path
) -> list[VideoScores]:
    """Every video's frame labels and scores under ``protocol``, lengths checked."""
    check_protocol(protocol)
    if protocol == "sultani":
        # The script concatenates the videos in dir() order, its score files sorted by name
        # (Normal_* between Fighting* and RoadAccidents*): the order its AUC breaks ties in.
        videos = sorted(videos, key=lambda v: PurePosixPath(v.video).name)
    out = []
    for video in videos:
        labels = ground_truth(protocol, video, source)
        scores, log_odds = frame_scores(protocol, video)
        if labels.shape != scores.shape:
            raise EvalInputError(
                f"{video.video}: {labels.shape[0]} ground-truth frames but {scores.shape[0]} frame scores "
                f"under protocol {protocol}"
            )
        out.append(VideoScores(video.video, video.label, labels, scores, log_odds))
    return out


# ----------------------------------------------------------------------- metrics


def sultani_auc(labels: np.ndarray, scores: np.ndarray, sample_weight: np.ndarray | None = None) -> float:
    """``Evaluate_Anomaly_Detector.m``'s AUC: one ROC step per frame, ties in frame order.

    ``sample_weight`` counts a row as that many consecutive frames of one label and
    score (their steps lie on one line, so the area is the same).
    """
    w = np.ones(len(labels)) if sample_weight is None else np.asarray(sample_weight, dtype=np.float64)
    order = np.argsort(-scores, kind="stable")
    hits = labels[order] > 0
    weights = w[order]
    tpr = np.cumsum(np.where(hits, weights, 0.0)) / weights[hits].sum()
    fpr = np.cumsum(np.where(hits, 0.0, weights)) / weights[~hits].sum()
    return float(np.trapezoid(tpr, fpr))


def trapezoid_ap(labels: np.ndarray, scores: np.ndarray, sample_weight: np.ndarray | None = None) -> float:
    """AP as the area under the precision-recall curve, ``auc(recall, precision)`` (RTFM's)."""
    precision, recall, _ = precision_recall_curve(labels, scores, sample_weight=sample_weight)
    return float(auc(recall, precision))


def protocol_auc(
    protocol: str, labels: np.ndarray, scores: np.ndarray, sample_weight: np.ndarray | None = None
) -> float:
    """The protocol's AUC (XDVioDet reports none: scikit-learn's is given beside its AP)."""
    if protocol == "sultani":
        return sultani_auc(labels, scores, sample_weight)
    if protocol == "rtfm":
        fpr, tpr, _ = roc_curve(labels, scores, sample_weight=sample_weight)
        return float(auc(fpr, tpr))
    return float(roc_auc_score(labels, scores, sample_weight=sample_weight))


def protocol_ap(
    protocol: str, labels: np.ndarray, scores: np.ndarray, sample_weight: np.ndarray | None = None
) -> float:
    if protocol in ("rtfm", "xdviodet"):
        return trapezoid_ap(labels, scores, sample_weight)
    return float(average_precision_score(labels, scores, sample_weight=sample_weight))
