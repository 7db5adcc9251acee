"""Stage ``extract_frames``: decode each video once, keep the selected frames as JPEG, index them.

Frame selection (frame numbers count decoded frames from 0):

- training videos: ``frames.train_frames_per_video`` frames spread uniformly over the
  video, or over the annotation's ``timestamps`` window for a normal video that has one.
  They are placed from the container's frame count before decoding.
- test videos: one ``eval`` frame per non-overlapping ``frames.snippet_len`` snippet,
  the middle of the frames the snippet has (so a ragged tail snippet counts too). The
  decoder buffers at most one snippet.
- every annotated box keyframe of any video: ``keyframe``.

Each video is decoded in a worker process. A video's outputs end with a done marker
(``images/<id>/_done.json``, holding its index rows), written last: a rerun skips
videos whose marker matches the current plan, so an interrupted run resumes. Bad
videos (missing, corrupt, truncated, empty) fail alone; each problem is a row of
``failures.parquet``. A keyframe past the video's end is recorded there too, but the
video's other frames stay usable (its status stays ``ok``).
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import multiprocessing
import os
import shutil
import time
from concurrent.futures import ProcessPoolExecutor, as_completed
from dataclasses import asdict, dataclass
from pathlib import Path

import av
import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
from av.video.reformatter import VideoReformatter
from PIL import Image
from tqdm import tqdm

from fgclip.atomic import atomic_path, write_text_atomic
from fgclip.config import Params
from fgclip.data.annotations import load_annotations
from fgclip.data.layout import (
    DONE_MARKER,
    FAILURES_FILE,
    FAILURES_SCHEMA,
    IMAGES_DIR,
    INDEX_FILE,
    INDEX_SCHEMA,
    VIDEOS_FILE,
    VIDEOS_SCHEMA,
)
from fgclip.data.ucf import NORMAL_LABEL, DatasetFormatError, VideoResolver, read_split, video_label
from fgclip.errors import FGClipError

logger = logging.getLogger(__name__)


class ExtractionError(FGClipError, RuntimeError):
    """More videos failed than ``frames.max_failure_frac`` allows (all outputs were still written)."""


def uniform_frames(first: int, last: int, count: int) -> np.ndarray:
    """``count`` frame numbers spread over ``[first, last]``: the centres of equal segments."""
    span = last - first + 1
    if span <= 0:
        return np.empty(0, np.int64)
    if span <= count:
        return np.arange(first, last + 1, dtype=np.int64)
    return first + ((np.arange(count) + 0.5) * span / count).astype(np.int64)


def window_frames(window: tuple[float, float], fps: float, num_frames: int) -> tuple[int, int]:
    """The inclusive frame range of a ``[start_s, end_s]`` window (may be empty: first > last)."""
    first = max(math.ceil(window[0] * fps - 1e-6), 0)
    last = min(math.floor(window[1] * fps + 1e-6), num_frames - 1)
    return first, last


def snippet_middles(num_frames: int, snippet_len: int) -> np.ndarray:
    """The ``eval`` frame of each non-overlapping snippet: the middle of the frames it has."""
    starts = np.arange(0, num_frames, snippet_len, dtype=np.int64)
    return starts + (np.minimum(snippet_len, num_frames - starts) // 2)


@dataclass(frozen=True)
class VideoJob:
    """What to extract from one video. ``plan()`` is what a done marker must match to be reused."""

    video: str
    split: str
    label: str
    source: str  # absolute path of the video file
    out: str  # absolute frames output dir
    train_frames: int  # 0 for test videos
    snippet_len: int  # 0 for training videos
    window: tuple[float, float] | None
    keyframes: tuple[int, ...]
    jpeg_quality: int

    @property
    def rel_dir(self) -> str:
        return f"{IMAGES_DIR}/" + self.video.removesuffix(".mp4")

    def plan(self) -> dict:
        plan = {k: v for k, v in asdict(self).items() if k not in ("source", "out")}
        plan["window"] = list(self.window) if self.window else None
        plan["keyframes"] = list(self.keyframes)
        try:  # a regenerated or replaced video must be decoded again
            plan["source_digest"] = source_digest(Path(self.source))
        except OSError:
            plan["source_digest"] = None
        return plan


# Bytes hashed at each end of a video for its digest: MP4's index sits at one end
# (the start with faststart, else the end), the first frames at the start.
DIGEST_SPAN = 1 << 20


def source_digest(path: Path) -> str:
    """Size + BLAKE2b of the first and last ``DIGEST_SPAN`` bytes: a re-encoded video's differ.

    Content, not ``st_mtime``: the done markers are part of the DVC output, and a
    modification time made its hash differ on every clone (same frames, other
    lock). Reading 2 MiB a video costs little beside decoding it, even on UCF-Crime.
    """
    h = hashlib.blake2b(digest_size=16)
    with path.open("rb") as f:
        size = os.fstat(f.fileno()).st_size
        h.update(size.to_bytes(8, "little"))
        h.update(f.read(DIGEST_SPAN))
        if size > DIGEST_SPAN:
            f.seek(max(size - DIGEST_SPAN, DIGEST_SPAN))
            h.update(f.read(DIGEST_SPAN))
    return h.hexdigest()


def _save_jpeg(frame: av.VideoFrame, rgb: VideoReformatter, path: Path, quality: int) -> None:
    # One reformatter reused for the whole video, single-threaded: frame.to_image() builds a
    # fresh swscale context with its own thread pool for every frame (2-3 ms a frame at
    # 320x240, against 0.13 ms reused), and videos are already decoded in parallel.
    image = Image.fromarray(rgb.reformat(frame, format="rgb24", threads=1).to_ndarray())
    with atomic_path(path) as tmp:
        image.save(tmp, format="JPEG", quality=quality)


def _write_json(path: Path, data: dict) -> None:
    write_text_atomic(path, json.dumps(data))


def _failed(job: VideoJob, reason: str, meta: dict | None = None) -> dict:
    shutil.rmtree(Path(job.out) / job.rel_dir, ignore_errors=True)  # partial images are not indexed
    meta = {
        "fps": None,
        "width": None,
        "height": None,
        **(meta or {}),
        "num_frames": None,
        "status": "failed",
    }
    return {
        "video": job.video,
        "frames": [],
        "timestamps": [],
        "purposes": [],
        "meta": meta,
        "failures": [reason],
        "resumed": False,
        "decoded": 0,
    }


def extract_video(job: VideoJob) -> dict:
    """Decode one video and write its selected frames; never raises for bad input.

    Returns ``{"video", "frames", "timestamps", "purposes", "meta", "failures", "resumed", "decoded"}``:
    the index rows as columns, sorted by (frame, purpose).
    """
    image_dir = Path(job.out) / job.rel_dir
    marker = image_dir / DONE_MARKER
    plan = job.plan()
    if marker.is_file():
        try:
            done = json.loads(marker.read_text(encoding="utf-8"))
        except (OSError, ValueError):
            done = {}
        if done.get("plan") == plan:
            return {**done["result"], "resumed": True, "decoded": 0}
    shutil.rmtree(image_dir, ignore_errors=True)
    if not Path(job.source).is_file():
        return _failed(job, f"missing: {job.source} does not exist")

    meta: dict = {}
    rows: list[tuple[int, float, str]] = []  # (frame, timestamp, purpose)
    written: set[int] = set()
    rgb = VideoReformatter()

    def keep(frame: av.VideoFrame, k: int, purpose: str) -> None:
        if k not in written:
            _save_jpeg(frame, rgb, image_dir / f"{k:06d}.jpg", job.jpeg_quality)
            written.add(k)
        # Only kept frames pay for their timestamp (frame.time on every frame: 3-10% of decoding).
        rows.append((k, float(frame.time) if frame.time is not None else k / fps, purpose))

    def keep_middle(snippet: list[av.VideoFrame], last: int) -> None:
        """Keep the middle frame of a snippet whose last frame is number ``last``."""
        mid = len(snippet) // 2
        keep(snippet[mid], last + 1 - len(snippet) + mid, "eval")

    try:
        with av.open(job.source) as container:
            if not container.streams.video:
                return _failed(job, "no video stream")
            stream = container.streams.video[0]
            fps = float(stream.average_rate or stream.guessed_rate or 0.0)
            meta = {
                "fps": fps or None,
                "width": stream.codec_context.width,
                "height": stream.codec_context.height,
            }
            declared = stream.frames
            expected = declared or (
                round(float(stream.duration * stream.time_base) * fps) if stream.duration and fps else 0
            )
            train: set[int] = set()
            if job.train_frames:
                if expected <= 0:
                    return _failed(
                        job, "unknown frame count (container has neither frames nor duration)", meta
                    )
                first, last = window_frames(job.window, fps, expected) if job.window else (0, expected - 1)
                train = set(uniform_frames(first, last, job.train_frames).tolist())
            keyframes = set(job.keyframes)
            image_dir.mkdir(parents=True, exist_ok=True)
            # The frames of the current snippet: decoded frames are dropped as soon as they are
            # not needed, so memory stays at one snippet whatever the video's length.
            snippet: list[av.VideoFrame] = []
            k = -1
            for k, frame in enumerate(container.decode(stream)):
                if k in train:
                    keep(frame, k, "train")
                if k in keyframes:
                    keep(frame, k, "keyframe")
                if job.snippet_len:
                    snippet.append(frame)
                    if len(snippet) == job.snippet_len:
                        keep_middle(snippet, last=k)
                        snippet.clear()
            if snippet:  # the ragged tail snippet
                keep_middle(snippet, last=k)
    except (av.FFmpegError, ValueError) as exc:
        return _failed(job, f"corrupt: decoding failed after {len(written)} kept frames: {exc}", meta)

    decoded = k + 1
    if decoded == 0:
        return _failed(job, "no frames decoded", meta)
    if decoded < declared:  # a file cut at a packet boundary ends without a decoding error
        return _failed(
            job, f"truncated: decoded {decoded} of the {declared} frames the container declares", meta
        )
    failures = []
    past = sorted(f for f in job.keyframes if f >= decoded)
    if past:
        failures.append(f"keyframe past end: frames {past} >= {decoded} decoded frames")
    if job.train_frames and expected != decoded:
        logger.warning("%s: container implies %d frames, decoded %d", job.video, expected, decoded)
    frames, timestamps, purposes = (list(col) for col in zip(*sorted(rows))) if rows else ([], [], [])
    result = {
        "video": job.video,
        "frames": frames,
        "timestamps": timestamps,
        "purposes": purposes,
        "failures": failures,
        "meta": {**meta, "num_frames": decoded, "status": "ok"},
    }
    _write_json(marker, {"plan": plan, "result": result})  # last: the video is complete
    return {**result, "resumed": False, "decoded": decoded}


def _plan_jobs(params: Params, data_root: Path, annotations: Path, out: Path) -> list[VideoJob]:
    dataset = params.resolve_paths(data_root=data_root)
    splits = {"train": read_split(dataset.train_split), "test": read_split(dataset.test_split)}
    both = sorted(set(splits["train"]) & set(splits["test"]))
    if both:
        raise DatasetFormatError(f"{data_root}: videos in both split files: {both[:5]}")
    records, _ = load_annotations(annotations)  # malformed parts are validate_boxes' to report
    resolver = VideoResolver(splits["train"] + splits["test"])
    keyframes: dict[str, set[int]] = {}
    windows: dict[str, tuple[float, float]] = {}
    for rec in records:
        vid, _ = resolver.resolve(rec.video)
        if vid is None:
            continue
        keyframes.setdefault(vid, set()).update(
            kf.frame for region in rec.box_infos for kf in region if kf.frame >= 0
        )
        if rec.timestamps and video_label(vid) == NORMAL_LABEL:
            windows.setdefault(vid, rec.timestamps)
    cfg = params.frames
    return [
        VideoJob(
            video=vid,
            split=split,
            label=video_label(vid),
            source=str(dataset.videos / vid),
            out=str(out),
            train_frames=cfg.train_frames_per_video if split == "train" else 0,
            snippet_len=cfg.snippet_len if split == "test" else 0,
            window=windows.get(vid) if split == "train" else None,
            keyframes=tuple(sorted(keyframes.get(vid, ()))),
            jpeg_quality=cfg.jpeg_quality,
        )
        for split, ids in splits.items()
        for vid in ids
    ]


def _run(jobs: list[VideoJob], workers: int) -> list[dict]:
    """Extract every job, in-process for one worker, else in a process pool; results in job order."""
    results: dict[str, dict] = {}
    started, decoded = time.perf_counter(), 0
    with tqdm(total=len(jobs), desc="extract_frames", unit="video", disable=None) as bar:

        def done(result: dict) -> None:
            nonlocal decoded
            results[result["video"]] = result
            decoded += result["decoded"]
            bar.set_postfix(frames_per_s=f"{decoded / max(time.perf_counter() - started, 1e-9):.0f}")
            bar.update()

        if workers == 1:
            for job in jobs:
                done(extract_video(job))
        else:
            # spawn: forking a parent that holds pyarrow/torch threads can deadlock the child
            ctx = multiprocessing.get_context("spawn")
            with ProcessPoolExecutor(max_workers=workers, mp_context=ctx) as pool:
                for future in as_completed([pool.submit(extract_video, job) for job in jobs]):
                    done(future.result())
    return [results[job.video] for job in jobs]


def _index_table(jobs: list[VideoJob], results: list[dict]) -> pa.Table:
    """Concatenate the videos' index columns; per-video fields repeated, paths built column-wise."""
    counts = np.array([len(r["frames"]) for r in results], dtype=np.int64)

    def repeat(values: list[str]) -> pa.Array:
        return pa.array(np.repeat(np.array(values, dtype=object), counts), pa.string())

    frame = pa.array(np.concatenate([np.asarray(r["frames"], np.int64) for r in results] or [[]]), pa.int64())
    name = pc.utf8_lpad(pc.cast(frame, pa.string()), 6, "0")
    path = pc.binary_join_element_wise(repeat([j.rel_dir for j in jobs]), "/", name, ".jpg", "")
    return pa.table(
        {
            "video": repeat([j.video for j in jobs]),
            "split": repeat([j.split for j in jobs]),
            "label": repeat([j.label for j in jobs]),
            "frame": frame,
            "timestamp": pa.array(
                np.concatenate([np.asarray(r["timestamps"], np.float64) for r in results] or [[]])
            ),
            "path": path,
            "purpose": pa.array([p for r in results for p in r["purposes"]], pa.string()),
        },
        schema=INDEX_SCHEMA,
    ).sort_by([("video", "ascending"), ("frame", "ascending"), ("purpose", "ascending")])


def _write_parquet(table: pa.Table, path: Path) -> None:
    with atomic_path(path) as tmp:
        pq.write_table(table, tmp)


def extract_frames(params: Params, data_root: Path, annotations: Path, out: Path) -> dict:
    """Run the stage: images, ``index.parquet``, ``videos.parquet``, ``failures.parquet`` under ``out``."""
    started = time.perf_counter()
    data_root, out = Path(data_root), Path(out)
    jobs = _plan_jobs(params, data_root, Path(annotations), out)
    if not jobs:
        raise ExtractionError(f"{data_root}: the split files list no videos")
    (out / IMAGES_DIR).mkdir(parents=True, exist_ok=True)
    results = _run(jobs, params.frames.workers or os.cpu_count() or 1)

    index = _index_table(jobs, results)
    videos = pa.Table.from_pylist(
        [{"video": j.video, "split": j.split, "label": j.label, **r["meta"]} for j, r in zip(jobs, results)],
        schema=VIDEOS_SCHEMA,
    ).sort_by("video")
    failures = pa.Table.from_pylist(
        [{"video": r["video"], "reason": reason} for r in results for reason in r["failures"]],
        schema=FAILURES_SCHEMA,
    ).sort_by("video")
    for table, name in ((index, INDEX_FILE), (videos, VIDEOS_FILE), (failures, FAILURES_FILE)):
        _write_parquet(table, out / name)

    failed = [r["video"] for r in results if r["meta"]["status"] == "failed"]
    summary = {
        "out": str(out),
        "videos": len(jobs),
        "ok": len(jobs) - len(failed),
        "failed": len(failed),
        "resumed": sum(r["resumed"] for r in results),
        "rows": index.num_rows,
        "images": pc.count_distinct(index.column("path")).as_py(),
        "failures": failures.to_pylist(),
        "seconds": round(time.perf_counter() - started, 2),
    }
    logger.info(
        "extract_frames: %d videos (%d ok, %d failed, %d resumed), %d index rows, %d images -> %s in %.1fs",
        summary["videos"],
        summary["ok"],
        summary["failed"],
        summary["resumed"],
        summary["rows"],
        summary["images"],
        out,
        summary["seconds"],
    )
    for row in summary["failures"]:
        logger.warning("extract_frames: %s: %s", row["video"], row["reason"])
    if jobs and len(failed) / len(jobs) > params.frames.max_failure_frac:
        raise ExtractionError(
            f"{len(failed)} of {len(jobs)} videos failed ({len(failed) / len(jobs):.1%} > "
            f"frames.max_failure_frac={params.frames.max_failure_frac}); see {out / FAILURES_FILE}: "
            + "; ".join(f"{r['video']}: {r['reason']}" for r in summary["failures"][:3])
        )
    return summary
