"""``fgclip evaluate-scores`` and ``fgclip export-gt``: any method's scores, any protocol.

A researcher checks that the tool reproduces a published number from the method's
released per-snippet scores (:mod:`fgclip.eval.score_files` reads them), under the
reference protocol that number was computed with (:mod:`fgclip.eval.protocols`), and
exports the ground truth in a reference's layout to run the reference's own script.

Videos are matched by file name without extension (``score_files.video_key``): the
split file gives the test set and its order, the temporal annotation its intervals.
Every split video must have scores and every scored video must be in the split: a
figure over another set of videos is not the published one.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

import numpy as np

from fgclip.atomic import atomic_path, write_text_atomic
from fgclip.data.ucf import (
    NORMAL_LABEL,
    TemporalAnnotation,
    read_split,
    read_temporal_annotations,
    video_label,
)
from fgclip.data.xd import (
    XDFormatError,
    is_normal,
    read_xd_annotations,
    xd_annotations_by_video,
    xd_frame_ground_truth,
    xd_video_key,
)
from fgclip.eval.frame_metrics import bootstrap_intervals, frame_level_metrics, rounded
from fgclip.eval.protocol import EvalInputError, VideoScores
from fgclip.eval.protocols import (
    SNIPPET,
    SnippetScores,
    as_float32,
    check_protocol,
    ground_truth,
    protocol_videos,
)
from fgclip.eval.score_files import read_snippet_scores, read_video_list, video_key

log = logging.getLogger(__name__)


RESERVED_KEYS = ("table_row", "frame_auc", "frame_ap", "headline", "dataset", "protocol", "scores",
                 "annotations", "split")  # fmt: skip
# More snippets than any real video has (10^7 x 16 frames is 60 days at 30 fps): a typo, not a video.
MAX_SNIPPETS = 10**7


def _annotations(path: Path) -> dict[str, TemporalAnnotation]:
    out: dict[str, TemporalAnnotation] = {}
    for name, entry in read_temporal_annotations(path).items():
        key = video_key(name)
        if key in out:
            raise EvalInputError(f"{path}: {out[key].name} and {name} are the same video ({key})")
        if entry.label == NORMAL_LABEL and entry.intervals:
            raise EvalInputError(f"{path}: {name}: a Normal video cannot have anomaly intervals")
        out[key] = entry
    return out


def check_out(out: Path) -> Path:
    """An output file path: not a directory, not under a file (before any work is done)."""
    out = Path(out)
    if out.is_dir():
        raise EvalInputError(f"--out {out} is a directory: give a file name")
    for parent in out.parents:
        if parent.exists() and not parent.is_dir():
            raise EvalInputError(f"--out {out}: {parent} is a file, not a directory")
    return out


def _counts(entries: list[tuple[str, int]], path: Path, key=video_key) -> dict[str, int]:
    out: dict[str, int] = {}
    for name, n in entries:
        k = key(name)
        if k in out:
            raise EvalInputError(f"{path}: {name} is listed twice")
        if n > MAX_SNIPPETS * SNIPPET:
            raise EvalInputError(f"{path}: {name}: {n} is not a plausible count")
        out[k] = n
    return out


def _num_frames(path: Path | None, protocol: str, key=video_key) -> dict[str, int] | None:
    if protocol not in ("full", "sultani", "xdviodet"):
        return None
    if path is None:
        raise EvalInputError(
            f"protocol {protocol} needs each video's frame count: --num-frames FILE ('NAME NUM_FRAMES' lines)"
        )
    return _counts(read_video_list(Path(path), "frame"), Path(path), key)


def _test_videos(split_path: Path, annotations: dict[str, TemporalAnnotation], ann_path: Path):
    """The split's videos in order as ``(key, label, annotation)``, checked against the annotation."""
    out, seen = [], {}
    for video in read_split(split_path):
        key = video_key(video)
        if key in seen:
            raise EvalInputError(f"{split_path}: {seen[key]} and {video} are the same video ({key})")
        seen[key] = video
        if key not in annotations:
            raise EvalInputError(f"{ann_path}: no temporal annotation for test video {video} (in {split_path})")
        label = video_label(video)
        if label != annotations[key].label:
            raise EvalInputError(
                f"{ann_path}: {annotations[key].name}: class {annotations[key].label!r} disagrees with {video}"
            )
        out.append((key, label, annotations[key]))
    if not out:
        raise EvalInputError(f"empty test set: {split_path} lists no videos")
    return out


def check_coverage(scores: dict[str, np.ndarray], keys: list[str], source: Path) -> None:
    """Every test video scored, and no score for a video outside the test set."""
    missing = [key for key in keys if key not in scores]
    if missing:
        raise EvalInputError(
            f"{source}: no scores for {len(missing)} test video(s): {', '.join(missing[:5])}"
            + (" ..." if len(missing) > 5 else "")
        )
    known = set(keys)
    extra = [key for key in scores if key not in known]
    if extra:
        raise EvalInputError(f"{source}: scores for {', '.join(extra[:5])}, not in the test split")


def snippet_scores_for(
    scores: dict[str, np.ndarray],
    tests: list[tuple[str, str, TemporalAnnotation]],
    num_frames: dict[str, int] | None,
    source: Path,
) -> list[SnippetScores]:
    check_coverage(scores, [key for key, _, _ in tests], source)
    out = []
    for key, label, entry in tests:
        n = None
        if num_frames is not None:
            if key not in num_frames:
                raise EvalInputError(f"--num-frames: no frame count for {key}")
            n = num_frames[key]
        out.append(SnippetScores(key, label, entry, scores[key], None, n))
    return out


def _xd_test_list(split_path: Path) -> list[str]:
    """XD-Violence test videos in list order: names, or feature paths (5 crops per video) reduced to names.

    VadCLIP's ``xd_CLIP_rgbtest.csv`` (a ``path,label`` header, the path first) is read too.
    """
    try:
        lines = Path(split_path).read_text(encoding="utf-8-sig").splitlines()
    except (OSError, UnicodeDecodeError) as exc:
        raise EvalInputError(f"{split_path}: cannot read the test list: {exc}") from exc
    first = [line.split(",")[0].strip() for line in lines if line.strip()]
    if first and first[0].lower() in ("path", "video", "name"):
        first = first[1:]
    names = list(dict.fromkeys(xd_video_key(entry) for entry in first))
    if not names:
        raise EvalInputError(f"empty test set: {split_path} lists no videos")
    return names


def xd_videos(
    scores: dict[str, np.ndarray],
    split_path: Path,
    annotations_path: Path,
    protocol: str,
    num_frames: dict[str, int] | None,
    source: Path,
) -> list[VideoScores]:
    """XD-Violence test videos under a reference's rules: labels from file names, intervals from the file.

    Scores are float32, repeated 16 times, as both references rank them.
    """
    check_protocol(protocol, "xd")
    try:
        annotated = xd_annotations_by_video(read_xd_annotations(Path(annotations_path)))
    except XDFormatError as exc:
        raise EvalInputError(str(exc)) from exc
    names = _xd_test_list(split_path)
    by_name = {}
    for key, values in scores.items():
        name = xd_video_key(key)
        if name in by_name:
            raise EvalInputError(f"{source}: two score entries for {name}")
        by_name[name] = values
    check_coverage(by_name, names, source)
    out = []
    for name in names:
        try:
            normal = is_normal(name)
        except XDFormatError as exc:
            raise EvalInputError(f"{split_path}: {exc}") from exc
        if normal == (name in annotated):
            raise EvalInputError(
                f"{annotations_path}: {name} is "
                + ("normal by its name but annotated" if normal else "violent by its name but has no intervals")
            )
        values = by_name[name]
        frames = None
        if protocol == "xdviodet":
            if num_frames is None or name not in num_frames:
                raise EvalInputError(f"protocol xdviodet needs {name}'s frame count: --num-frames FILE")
            frames = num_frames[name]
        try:
            labels = xd_frame_ground_truth(annotated.get(name, ()), len(values), protocol, num_frames=frames)
        except XDFormatError as exc:
            raise EvalInputError(f"{name}: {exc}") from exc
        ranked = np.repeat(as_float32(values, name), SNIPPET)
        out.append(VideoScores(name, NORMAL_LABEL if normal else "Violent", labels, ranked))
    return out


def evaluate_scores(
    scores_path: Path,
    annotations_path: Path,
    split_path: Path,
    out: Path,
    *,
    dataset: str = "ucf",
    protocol: str = "vadclip",
    videos: Path | None = None,
    num_frames: Path | None = None,
    name: str = "method",
    far_threshold: float = 0.5,
    bootstrap_resamples: int = 1000,
    bootstrap_seed: int = 0,
    bootstrap_level: float = 0.95,
) -> dict:
    """Score ``scores_path`` under ``protocol``; write and return the metrics JSON.

    The JSON has ``evaluate``'s layout: the headline ``frame_auc`` at the top, the
    method's metrics under ``name``, and the protocol that produced them.
    """
    if dataset not in ("ucf", "xd"):
        raise EvalInputError(f"dataset {dataset!r}: ucf or xd")
    if name in RESERVED_KEYS:
        raise EvalInputError(f"--name {name}: a key of the summary itself; choose another name")
    check_protocol(protocol, dataset)
    check_out(out)
    scores_path, annotations_path, split_path = Path(scores_path), Path(annotations_path), Path(split_path)
    scores = read_snippet_scores(scores_path, videos=Path(videos) if videos is not None else None)
    if dataset == "xd":
        frames = _num_frames(num_frames, protocol, xd_video_key) if protocol == "xdviodet" else None
        videos_scored = xd_videos(scores, split_path, annotations_path, protocol, frames, scores_path)
    else:
        annotations = _annotations(annotations_path)
        tests = _test_videos(split_path, annotations, annotations_path)
        frames = _num_frames(num_frames, protocol)
        snippets = snippet_scores_for(scores, tests, frames, scores_path)
        videos_scored = protocol_videos(protocol, snippets, annotations_path)
    metrics = frame_level_metrics(videos_scored, protocol, far_threshold=far_threshold)
    if bootstrap_resamples:
        metrics["intervals"] = bootstrap_intervals(
            videos_scored, protocol, resamples=bootstrap_resamples, seed=bootstrap_seed, level=bootstrap_level
        )
    summary = {
        "table_row": table_row(name, protocol, metrics),
        "frame_auc": round(metrics["frame_auc"], 4),
        # XD-Violence's headline is AP; UCF-Crime's is AUC.
        "frame_ap": round(metrics["frame_ap"], 4),
        "headline": "frame_ap" if dataset == "xd" else "frame_auc",
        name: rounded(metrics, 6),
        "dataset": dataset,
        "protocol": protocol,
        "scores": str(scores_path),
        "annotations": str(annotations_path),
        "split": str(split_path),
    }
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    write_text_atomic(out, json.dumps(summary, indent=2) + "\n")
    log.info(
        "%s under %s: frame AUC %.4f, AP %.4f on %d videos (%d frames)",
        scores_path, protocol, metrics["frame_auc"], metrics["frame_ap"], metrics["num_videos"],
        metrics["num_frames"],
    )  # fmt: skip
    return summary


TABLE_HEADER = "| Method | Protocol | AUC (%) | AP (%) |"


def table_row(name: str, protocol: str, metrics: dict) -> str:
    """The method's line in a published table's layout (percent, two decimals), intervals beside."""

    def cell(key: str) -> str:
        value = f"{100 * metrics[key]:.2f}"
        if "intervals" in metrics:
            lo, hi = metrics["intervals"][key]
            value += f" [{100 * lo:.2f}, {100 * hi:.2f}]"
        return value

    return f"| {name} | {protocol} | {cell('frame_auc')} | {cell('frame_ap')} |"


def export_ground_truth(
    annotations_path: Path,
    videos: Path,
    out: Path,
    *,
    dataset: str = "ucf",
    protocol: str = "vadclip",
    num_frames: Path | None = None,
) -> dict:
    """The concatenated frame-level ground truth of ``videos`` (``NAME NUM_SNIPPETS``, in that order).

    As the references save theirs: VadCLIP's ``gt_ucf.npy`` / ``gt_xd.npy`` and XDVioDet's
    ``gt.npy`` are float32, RTFM's ``gt-ucf.npy`` float64; ``full`` and ``sultani`` are
    saved as float64 too.
    """
    if dataset not in ("ucf", "xd"):
        raise EvalInputError(f"dataset {dataset!r}: ucf or xd")
    check_protocol(protocol, dataset)
    annotations_path, videos, out = Path(annotations_path), Path(videos), check_out(out)
    listed = read_video_list(videos)
    _counts([(name, n * SNIPPET) for name, n in listed], videos)  # no video twice, no absurd count
    if dataset == "xd":
        gt = _xd_ground_truth(annotations_path, listed, protocol, num_frames)
        return _save_ground_truth(out, gt, protocol, listed)
    annotations = _annotations(annotations_path)
    frames = _num_frames(num_frames, protocol)
    parts = []
    for name, count in listed:
        key = video_key(name)
        if key not in annotations:
            raise EvalInputError(f"{annotations_path}: no temporal annotation for {name} (listed in {videos})")
        entry = annotations[key]
        n = None
        if frames is not None:
            if key not in frames:
                raise EvalInputError(f"--num-frames: no frame count for {key}")
            n = frames[key]
        video = SnippetScores(key, entry.label, entry, np.zeros(count), None, n)
        parts.append(ground_truth(protocol, video, annotations_path))
    return _save_ground_truth(out, np.concatenate(parts), protocol, parts)


def _xd_ground_truth(
    annotations_path: Path, listed: list[tuple[str, int]], protocol: str, num_frames: Path | None
) -> np.ndarray:
    try:
        annotated = xd_annotations_by_video(read_xd_annotations(annotations_path))
        frames = _num_frames(num_frames, protocol, xd_video_key) if protocol == "xdviodet" else None
        parts = []
        for entry, count in listed:
            name = xd_video_key(entry)
            if not is_normal(name) and name not in annotated:
                raise EvalInputError(f"{annotations_path}: no intervals for violent video {name}")
            n = None
            if frames is not None:
                if name not in frames:
                    raise EvalInputError(f"--num-frames: no frame count for {name}")
                n = frames[name]
            parts.append(xd_frame_ground_truth(annotated.get(name, ()), count, protocol, num_frames=n))
    except XDFormatError as exc:
        raise EvalInputError(str(exc)) from exc
    return np.concatenate(parts)


def _save_ground_truth(out: Path, gt: np.ndarray, protocol: str, videos: list) -> dict:
    # As the references save theirs: VadCLIP's and XDVioDet's float32, RTFM's float64.
    gt = gt.astype(np.float32 if protocol in ("vadclip", "xdviodet") else np.float64)
    out.parent.mkdir(parents=True, exist_ok=True)
    with atomic_path(out) as tmp, open(tmp, "wb") as f:
        np.save(f, gt)
    log.info("%s: %d frames of ground truth (%d anomalous) for %d videos, protocol %s",
             out, gt.size, int(gt.sum()), len(videos), protocol)  # fmt: skip
    return {"out": str(out), "frames": int(gt.size), "anomalous_frames": int(gt.sum()), "videos": len(videos)}
