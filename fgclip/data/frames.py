"""Stage ``extract_frames``: decode what each video's selection needs, keep those frames as JPEG, index them.

Frame selection (frame numbers count decoded frames from 0):

- training videos: ``frames.train_frames_per_video`` frames spread uniformly over the
  video, or over the annotation's ``timestamps`` window for a normal video that has one.
  They are placed from the container's frame count before decoding.
- test videos: one ``eval`` frame per non-overlapping ``frames.snippet_len`` snippet,
  the middle of the frames the snippet has (so a ragged tail snippet counts too). The
  decoder buffers at most one snippet.
- every annotated box keyframe of any video: ``keyframe``.

Where the container's packets address frames exactly (H.264 in MP4), only the packets
the selection needs are decoded (:mod:`fgclip.data.frame_reader`: seeks for a training
video's few frames, one pass without unwanted non-reference pictures for a test video);
elsewhere, or with ``frames.decode: all``, every frame is. The frames are the same.

Each video is decoded in a worker process, which ends with the stage process however
that dies: a local process pool, or one Dask task a video (``frames.executor``; the
workers are :mod:`fgclip.data.extract_executors`' business). A video's outputs end
with a done marker (``images/<id>/_done.json``, holding its index rows and the size of each image), written last: a rerun skips
videos whose marker matches the current plan and whose images are all there and
whole, so an interrupted run resumes. Frames are turned upright as a player shows
them when the video's display matrix says so. Bad videos (missing, corrupt,
truncated, empty, linked from outside the data root) and bad split file lines fail
alone; each problem is a row of ``failures.parquet``. A keyframe past the video's
end is recorded there too, but the video's other frames stay usable (its status
stays ``ok``).
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import os
import shutil
import struct
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Literal

import av
import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
from av.video.reformatter import VideoReformatter
from PIL import Image
from tqdm import tqdm

from fgclip.atomic import atomic_path, write_text_atomic
from fgclip.config import FramesConfig, Params
from fgclip.data.annotations import load_annotations
from fgclip.data.extract_executors import run_jobs
from fgclip.data.frame_reader import NotExact, plan_runs, read_frames, scan_packets
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
from fgclip.data.ucf import (
    NORMAL_LABEL,
    PATH_ESCAPES_ROOT,
    BadSplitLine,
    DatasetFormatError,
    VideoResolver,
    parse_split,
    resolves_outside,
    video_label,
)
from fgclip.errors import FGClipError
from fgclip.outputs import claim_output_dir

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
    roots: tuple[str, ...] = ()  # resolved dirs the video's real path must stay in (none: no check)
    # "auto": only the packets the selection needs, when the packet table is exact (frame_reader);
    # "all": every frame. Same frames; "all" is in the plan (an "auto" marker does not vouch
    # for a check it never made), and an "all" marker also serves "auto".
    decode: Literal["auto", "all"] = "auto"

    @property
    def rel_dir(self) -> str:
        return f"{IMAGES_DIR}/" + self.video.removesuffix(".mp4")

    def plan(self) -> dict:
        plan = {k: v for k, v in asdict(self).items() if k not in ("source", "out", "roots", "decode")}
        plan["format"] = MARKER_FORMAT
        plan["window"] = list(self.window) if self.window else None
        plan["keyframes"] = list(self.keyframes)
        if self.decode == "all":
            plan["decode"] = "all"
        try:  # a regenerated or replaced video must be decoded again
            plan["source_digest"] = source_digest(Path(self.source))
        except OSError:
            plan["source_digest"] = None
        return plan


# Version of the done marker's contents. 2: image sizes, upright frames (the rotation recorded);
# a marker of another version is not trusted, its video is extracted again.
MARKER_FORMAT = 2

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


# How to turn a stored picture upright: (transpose, flip rows, flip columns), in that order.
Turn = tuple[bool, bool, bool]
UPRIGHT: Turn = (False, False, False)
# Clockwise degrees of the turns that are rotations; each other turn is a left-right mirror, then one of these.
_CLOCKWISE = {UPRIGHT: 0, (True, False, True): 90, (False, True, True): 180, (True, True, False): 270}


def clockwise_degrees(turn: Turn) -> int:
    """The rotation ``videos.parquet`` records for a turn (a mirror first, when the turn mirrors)."""
    transpose, flip_rows, flip_cols = turn
    if transpose ^ flip_rows ^ flip_cols:  # mirrored: turn(A) is rotation(fliplr(A)), this rotation:
        turn = (transpose, flip_rows ^ transpose, flip_cols ^ (not transpose))
    return _CLOCKWISE[turn]


class UnsupportedRotation(ValueError):
    """The display matrix turns the picture by an angle that is not a multiple of 90 degrees."""


def upright_turn(frame: av.VideoFrame) -> Turn:
    """The turn a player gives ``frame``, from its display matrix.

    The matrix maps a stored pixel (x, y) (y down) to (a x + c y, b x + d y) on screen;
    at a right angle two of a, b, c, d are 0 and the signs of the others say which
    axes flip. This is FFmpeg's own autorotation (checked against the ffmpeg 5.1 CLI
    on all eight orientations): boxes are drawn on what a player shows.
    """
    matrix = next((bytes(sd) for sd in frame.side_data if sd.type.name == "DISPLAYMATRIX"), None)
    if matrix is None:
        return UPRIGHT
    a, b, _, c, d, *_ = struct.unpack("<9i", matrix[:36])
    tan_1deg = 0.0175  # FFmpeg's tolerance: within 1 degree of a right angle
    if max(abs(b), abs(c)) <= tan_1deg * min(abs(a), abs(d)):
        return (False, d < 0, a < 0)
    if max(abs(a), abs(d)) <= tan_1deg * min(abs(b), abs(c)):
        return (True, b < 0, c < 0)
    raise UnsupportedRotation(f"the display matrix turns the picture by {-frame.rotation} degrees clockwise")


def _save_jpeg(frame: av.VideoFrame, rgb: VideoReformatter, turn: Turn, path: Path, quality: int) -> None:
    # One reformatter reused for the whole video, single-threaded: frame.to_image() builds a
    # fresh swscale context with its own thread pool for every frame (2-3 ms a frame at
    # 320x240, against 0.13 ms reused), and videos are already decoded in parallel.
    pixels = rgb.reformat(frame, format="rgb24", threads=1).to_ndarray()
    if turn != UPRIGHT:
        transpose, flip_rows, flip_cols = turn
        pixels = pixels.transpose(1, 0, 2) if transpose else pixels
        pixels = np.ascontiguousarray(pixels[:: -1 if flip_rows else 1, :: -1 if flip_cols else 1])
    image = Image.fromarray(pixels)
    with atomic_path(path) as tmp:
        image.save(tmp, format="JPEG", quality=quality)


JPEG_EOI = b"\xff\xd9"  # the last two bytes of every complete JPEG


def damaged_images(image_dir: Path, frames: list, sizes: object) -> str | None:
    """Why the images a done marker vouches for are not all there and whole (``None``: they are).

    The marker is written after the images, but a file can still be deleted or cut
    afterwards (a full disk, a sync gone wrong), and training only finds out when it
    draws that frame. The check stats each image and reads its last two bytes.
    Names come from the frame numbers, never from the marker's text.
    """
    try:
        for k in sorted(set(frames)):
            name = f"{k:06d}.jpg"
            size = sizes.get(name) if isinstance(sizes, dict) else None
            if not isinstance(size, int):
                return f"its done marker records no size for {name}"
            with (image_dir / name).open("rb") as f:
                actual = os.fstat(f.fileno()).st_size
                if actual != size:
                    return f"{name} has {actual} bytes, {size} were written"
                f.seek(max(size - 2, 0))
                if f.read(2) != JPEG_EOI:
                    return f"{name} does not end as a JPEG does"
    except FileNotFoundError:
        return f"{name} is missing"
    except (OSError, TypeError, ValueError) as exc:
        return f"its images cannot be checked: {exc}"
    return None


def _write_json(path: Path, data: dict) -> None:
    write_text_atomic(path, json.dumps(data))


def _failed(job: VideoJob, reason: str, meta: dict | None = None) -> dict:
    shutil.rmtree(Path(job.out) / job.rel_dir, ignore_errors=True)  # partial images are not indexed
    meta = {
        "fps": None,
        "width": None,
        "height": None,
        "rotation": None,
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

    Returns ``{"video", "frames", "timestamps", "purposes", "meta", "failures", "resumed", "decoded",
    "damage"}``: the index rows as columns, sorted by (frame, purpose); ``damage`` says why the
    images of a matching done marker failed the check (the video was extracted again), else ``None``.
    """
    image_dir = Path(job.out) / job.rel_dir
    marker = image_dir / DONE_MARKER
    outside = resolves_outside(Path(job.source), map(Path, job.roots)) if job.roots else None
    if outside is not None:  # judged before the digest: a file outside the root is never read
        reason = (
            f"{PATH_ESCAPES_ROOT}: {job.source} leads to {outside} through a symlink, outside {job.roots[0]}"
        )
        return {**_failed(job, reason), "damage": None}
    plan = job.plan()
    damage = None
    if marker.is_file():
        try:
            done = json.loads(marker.read_text(encoding="utf-8"))
        except (OSError, ValueError):
            done = {}
        done_plan = done.get("plan")
        if isinstance(done_plan, dict) and job.decode == "auto" and done_plan.get("decode") == "all":
            done_plan = {k: v for k, v in done_plan.items() if k != "decode"}  # stricter: it serves
        if done_plan == plan:
            damage = damaged_images(image_dir, done["result"]["frames"], done.get("images"))
            if damage is None:
                return {**done["result"], "resumed": True, "decoded": 0, "damage": None}
    return {**_decode(job, image_dir, plan), "damage": damage}


def _decode(job: VideoJob, image_dir: Path, plan: dict) -> dict:
    """:func:`extract_video` once no done marker vouches for the video's images."""
    shutil.rmtree(image_dir, ignore_errors=True)
    if not Path(job.source).is_file():
        return _failed(job, f"missing: {job.source} does not exist")

    meta: dict = {}
    rows: list[tuple[int, float, str]] = []  # (frame, timestamp, purpose)
    written: set[int] = set()
    turns: list[Turn] = []  # the first kept frame's: what videos.parquet records
    rgb = VideoReformatter()

    def keep(frame: av.VideoFrame, k: int, purpose: str) -> None:
        if k not in written:
            turn = upright_turn(frame)  # each frame's own: side data may change mid-stream
            turns[:] = turns or [turn]
            _save_jpeg(frame, rgb, turn, image_dir / f"{k:06d}.jpg", job.jpeg_quality)
            written.add(k)
        # Only kept frames pay for their timestamp (frame.time on every frame: 3-10% of decoding).
        rows.append((k, float(frame.time) if frame.time is not None else k / fps, purpose))

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
            decoded, decoding = None, "all"
            table, why = None, "frames.decode: all"
            if job.decode == "auto":
                try:
                    table, why = scan_packets(container, stream)
                except av.FFmpegError as exc:  # the full decode meets it too, and reports it
                    why = f"demuxing failed: {exc}"
            if table is not None:
                wanted: dict[int, list[str]] = {}
                for purpose, ks in (
                    ("train", train),
                    ("keyframe", (k for k in keyframes if k < table.num_frames)),
                    ("eval", snippet_middles(table.num_frames, job.snippet_len) if job.snippet_len else ()),
                ):
                    for k in ks:
                        wanted.setdefault(int(k), []).append(purpose)
                runs = plan_runs(table, wanted)
                try:
                    for k, frame in read_frames(container, stream, table, runs, set(wanted)):
                        for purpose in wanted[k]:
                            keep(frame, k, purpose)
                    decoded = table.num_frames
                    one_pass = len(runs) == 1 and runs[0].first == 0
                    decoding = "skipping" if one_pass else "sparse"
                except (NotExact, av.FFmpegError) as exc:
                    # The table was wrong about this video: what a full decode gives is the answer.
                    logger.info("%s: %s; decoding every frame", job.video, exc)
                    for collected in (rows, written, turns):
                        collected.clear()
                    shutil.rmtree(image_dir)
                    image_dir.mkdir(parents=True)
            else:
                logger.debug("%s: decoding every frame: %s", job.video, why)
        if decoded is None:
            decoded = _decode_all(job, train, keyframes, keep)
    except UnsupportedRotation as exc:
        return _failed(job, f"unsupported: {exc}", meta)
    except (av.FFmpegError, ValueError) as exc:
        return _failed(job, f"corrupt: decoding failed after {len(written)} kept frames: {exc}", meta)

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
    turn = turns[0] if turns else UPRIGHT
    if turn[0]:  # width and height describe the frames as written
        meta["width"], meta["height"] = meta["height"], meta["width"]
    result = {
        "video": job.video,
        "frames": frames,
        "timestamps": timestamps,
        "purposes": purposes,
        "failures": failures,
        "meta": {**meta, "num_frames": decoded, "status": "ok", "rotation": clockwise_degrees(turn)},
    }
    sizes = {f"{k:06d}.jpg": (image_dir / f"{k:06d}.jpg").stat().st_size for k in sorted(written)}
    # last: the video is complete
    _write_json(image_dir / DONE_MARKER, {"plan": plan, "result": result, "images": sizes})
    return {**result, "resumed": False, "decoded": decoded, "decoding": decoding}


def _decode_all(job: VideoJob, train: set[int], keyframes: set[int], keep) -> int:
    """Decode every frame of the video, keep the selected ones; returns the number decoded.

    The frame count is what the decoder gives, so a ragged tail snippet and keyframes
    are placed by it, whatever the container declares.
    """

    def keep_middle(snippet: list[av.VideoFrame], last: int) -> None:
        """Keep the middle frame of a snippet whose last frame is number ``last``."""
        mid = len(snippet) // 2
        keep(snippet[mid], last + 1 - len(snippet) + mid, "eval")

    with av.open(job.source) as container:
        stream = container.streams.video[0]
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
    return k + 1


def _plan_jobs(
    params: Params, data_root: Path, annotations: Path, out: Path
) -> tuple[list[VideoJob], list[BadSplitLine]]:
    """The videos to extract, and the split file lines that name none."""
    dataset = params.resolve_paths(data_root=data_root)
    (train, bad_train), (test, bad_test) = parse_split(dataset.train_split), parse_split(dataset.test_split)
    splits = {"train": train, "test": test}
    # The videos dir's own location is the dataset's configuration (it may be a link to another
    # disk); the links below it must stay inside it or the data root.
    roots = tuple(dict.fromkeys(os.path.realpath(p) for p in (data_root, dataset.videos)))
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
            roots=roots,
            decode=cfg.decode,
        )
        for split, ids in splits.items()
        for vid in ids
    ], bad_train + bad_test


def _run(jobs: list[VideoJob], cfg: FramesConfig) -> list[dict]:
    """Extract every job on ``frames.executor`` (:mod:`fgclip.data.extract_executors`); results in job order."""
    results: dict[str, dict] = {}
    started, decoded = time.perf_counter(), 0
    with tqdm(total=len(jobs), desc="extract_frames", unit="video", disable=None) as bar:

        def done(result: dict) -> None:
            nonlocal decoded
            results[result["video"]] = result
            decoded += result["decoded"]
            bar.set_postfix(frames_per_s=f"{decoded / max(time.perf_counter() - started, 1e-9):.0f}")
            bar.update()

        run_jobs(
            jobs,
            extract_video,
            done,
            executor=cfg.executor,
            workers=cfg.workers or os.cpu_count() or 1,
            dask_address=cfg.dask_address,
        )
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
    # Resumes from its own earlier output; any other non-empty directory is refused.
    claim_output_dir(out, "extract_frames", {"--data-root": data_root, "--annotations": Path(annotations)})
    jobs, bad_lines = _plan_jobs(params, data_root, Path(annotations), out)
    if not jobs:
        first_bad = f" ({len(bad_lines)} bad lines; the first: {bad_lines[0].reason})" if bad_lines else ""
        raise ExtractionError(f"{data_root}: the split files list no videos{first_bad}")
    (out / IMAGES_DIR).mkdir(parents=True, exist_ok=True)
    results = _run(jobs, params.frames)
    for r in results:
        if r["damage"]:
            logger.warning("extract_frames: %s: %s: extracted again", r["video"], r["damage"])

    index = _index_table(jobs, results)
    videos = pa.Table.from_pylist(
        [{"video": j.video, "split": j.split, "label": j.label, **r["meta"]} for j, r in zip(jobs, results)],
        schema=VIDEOS_SCHEMA,
    ).sort_by("video")
    failures = pa.Table.from_pylist(
        [{"video": r["video"], "reason": reason} for r in results for reason in r["failures"]]
        + [{"video": line.where, "reason": line.reason} for line in bad_lines],
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
        "reextracted": sum(bool(r["damage"]) for r in results),
        # How the videos decoded this run were read: sparse (seeking between runs of packets),
        # skipping (one pass, non-reference pictures nobody wants left out), all (every frame).
        "decoding": {
            how: sum(r.get("decoding") == how for r in results) for how in ("sparse", "skipping", "all")
        },
        "bad_split_lines": len(bad_lines),
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
    # A bad split line is a video lost as surely as a corrupt file is.
    lost, entries = len(failed) + len(bad_lines), len(jobs) + len(bad_lines)
    if lost / entries > params.frames.max_failure_frac:
        raise ExtractionError(
            f"{lost} of {entries} videos failed ({lost / entries:.1%} > "
            f"frames.max_failure_frac={params.frames.max_failure_frac}); see {out / FAILURES_FILE}: "
            + "; ".join(f"{r['video']}: {r['reason']}" for r in summary["failures"][:3])
        )
    return summary
