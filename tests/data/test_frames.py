"""Stage extract_frames: selection, index schema, failures, threshold, resume, workers."""

import json
import math
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import av
import numpy as np
import psutil
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
import pytest
import yaml
from PIL import Image

from fgclip.config import Params
from fgclip.data.frames import (
    ExtractionError,
    VideoJob,
    extract_frames,
    extract_video,
    snippet_middles,
    source_digest,
    uniform_frames,
    window_frames,
)
from fgclip.data.layout import DONE_MARKER, FAILURES_SCHEMA, INDEX_SCHEMA, VIDEOS_SCHEMA


def _rows(frames: Path, video: str, purpose: str) -> list[int]:
    index = pq.read_table(frames / "index.parquet")
    mask = pc.and_(pc.equal(index["video"], video), pc.equal(index["purpose"], purpose))
    return index.filter(mask)["frame"].to_pylist()


def _videos(frames: Path) -> dict[str, dict]:
    return {r["video"]: r for r in pq.read_table(frames / "videos.parquet").to_pylist()}


def _annotations(root: Path) -> dict[str, dict]:
    return {r["video"]: r for r in json.loads((root / "annotations.json").read_text())}


def test_uniform_frames():
    assert uniform_frames(0, 99, 4).tolist() == [12, 37, 62, 87]
    assert uniform_frames(10, 13, 8).tolist() == [10, 11, 12, 13]  # fewer frames than asked: all of them
    assert uniform_frames(5, 4, 3).tolist() == []


def test_snippet_middles_ragged_tail():
    assert snippet_middles(40, 16).tolist() == [8, 24, 36]  # tail 32..39 has 8 frames: middle 36
    assert snippet_middles(33, 16).tolist() == [8, 24, 32]  # tail of one frame
    assert snippet_middles(32, 16).tolist() == [8, 24]


def test_window_frames():
    assert window_frames((1.0, 2.0), 30.0, 100) == (30, 60)
    assert window_frames((0.0, 10.0), 30.0, 100) == (0, 99)
    assert window_frames((1 / 30, 49 / 30), 30.0, 50) == (1, 49)  # float error does not lose an end frame


def test_schemas(tiny_frames: Path):
    assert pq.read_schema(tiny_frames / "index.parquet").remove_metadata() == INDEX_SCHEMA
    assert pq.read_schema(tiny_frames / "videos.parquet").remove_metadata() == VIDEOS_SCHEMA
    assert pq.read_schema(tiny_frames / "failures.parquet").remove_metadata() == FAILURES_SCHEMA


def _decoded(path: Path) -> tuple[int, list[float]]:
    with av.open(str(path)) as c:
        times = [f.time for f in c.decode(video=0)]
    return len(times), times


def test_frame_selection(tiny_params: Params, tiny_sample: Path, tiny_frames: Path):
    cfg = tiny_params.frames
    ann = _annotations(tiny_sample)
    videos = _videos(tiny_frames)
    index = pq.read_table(tiny_frames / "index.parquet")
    tails = []
    for vid, meta in videos.items():
        n, times = _decoded(tiny_sample / "videos" / vid)
        assert meta["status"] == "ok" and meta["num_frames"] == n
        assert (meta["width"], meta["height"], meta["fps"]) == (96, 72, 30.0)
        train, evals = _rows(tiny_frames, vid, "train"), _rows(tiny_frames, vid, "eval")
        if meta["split"] == "train":
            assert evals == [] and len(train) == cfg.train_frames_per_video
            lo, hi = (0, n - 1)
            if ann[vid]["timestamps"]:  # normal videos: inside the window
                lo, hi = (round(t * 30) for t in ann[vid]["timestamps"])
                assert (lo, hi) != (0, n - 1)
            assert lo <= min(train) and max(train) <= hi
            gaps = np.diff(train)  # uniform: equal gaps up to rounding
            assert gaps.max() - gaps.min() <= 1
        else:
            assert train == []
            expected = [s + min(cfg.snippet_len, n - s) // 2 for s in range(0, n, cfg.snippet_len)]
            assert evals == expected
            tails.append(n % cfg.snippet_len)
        keyframes = {kf["frame"] for region in ann[vid]["box_infos"] for kf in region if kf["frame"] < n}
        assert set(_rows(tiny_frames, vid, "keyframe")) == keyframes
        rows = index.filter(pc.equal(index["video"], vid)).to_pylist()
        for row in rows:
            assert row["timestamp"] == pytest.approx(times[row["frame"]])
            assert row["path"] == f"images/{vid[:-4]}/{row['frame']:06d}.jpg"
            assert row["label"] == ("Normal" if "Normal" in vid else vid.split("/")[0])
    assert any(tails)  # a ragged tail snippet was exercised


def test_images_are_jpegs_of_the_frames(tiny_sample: Path, tiny_frames: Path):
    index = pq.read_table(tiny_frames / "index.parquet").to_pylist()
    row = next(r for r in index if r["purpose"] == "eval")
    with av.open(str(tiny_sample / "videos" / row["video"])) as c:
        frame = next(f for k, f in enumerate(c.decode(video=0)) if k == row["frame"]).to_ndarray(
            format="rgb24"
        )
    image = Image.open(tiny_frames / row["path"])
    assert image.format == "JPEG" and image.size == (96, 72)
    assert np.abs(np.asarray(image, dtype=int) - frame).mean() < 4  # quality 95: nearly lossless
    for r in index:
        assert (tiny_frames / r["path"]).is_file()
    assert not list(tiny_frames.rglob("*.tmp"))


def test_keyframe_past_end_recorded_but_video_ok(tiny_frames: Path):
    failures = pq.read_table(tiny_frames / "failures.parquet").to_pylist()
    assert len(failures) == 1 and failures[0]["reason"].startswith("keyframe past end")
    assert _videos(tiny_frames)[failures[0]["video"]]["status"] == "ok"


@pytest.fixture
def sample_copy(tiny_sample: Path, tmp_path: Path) -> Path:
    root = tmp_path / "sample"
    shutil.copytree(tiny_sample, root)
    return root


def _break_videos(root: Path) -> dict[str, str]:
    """Garbage bytes, two cut files, a missing file, audio only; returns video -> expected reason prefix."""
    ids = (root / "Anomaly_Train.txt").read_text().split()
    garbage, cut, cut_clean, missing, audio = ids[0], ids[2], ids[3], ids[4], ids[5]
    (root / "videos" / garbage).write_bytes(np.random.default_rng(0).bytes(5000))
    data = (root / "videos" / cut).read_bytes()
    (root / "videos" / cut).write_bytes(data[: len(data) // 2])  # mid-packet: the decoder errors
    with av.open(str(root / "videos" / cut_clean)) as c:  # at a packet boundary: decoding just stops
        boundary = [p.pos for p in c.demux(video=0) if p.size][-5]
    data = (root / "videos" / cut_clean).read_bytes()
    (root / "videos" / cut_clean).write_bytes(data[:boundary])
    (root / "videos" / missing).unlink()
    with av.open(str(root / "videos" / audio), "w", format="mp4") as c:
        stream = c.add_stream("aac", rate=8000)
        for i in range(4):
            frame = av.AudioFrame.from_ndarray(np.zeros((1, 1024), np.float32), format="fltp", layout="mono")
            frame.sample_rate, frame.pts = 8000, i * 1024
            for packet in stream.encode(frame):
                c.mux(packet)
        for packet in stream.encode():
            c.mux(packet)
    return {
        garbage: "corrupt",
        cut: "corrupt",
        cut_clean: "truncated",
        missing: "missing",
        audio: "no video stream",
    }


def test_bad_videos_fail_alone(tiny_params: Params, tiny_frames: Path, sample_copy: Path, tmp_path: Path):
    broken = _break_videos(sample_copy)
    params = tiny_params.with_overrides(frames={"max_failure_frac": 0.5})
    out = tmp_path / "frames"
    summary = extract_frames(params, sample_copy, sample_copy / "annotations.json", out)
    assert (summary["failed"], summary["ok"]) == (5, 7)
    reasons = {
        r["video"]: r["reason"]
        for r in pq.read_table(out / "failures.parquet").to_pylist()
        if not r["reason"].startswith("keyframe past end")
    }
    assert {v: r.split(":")[0] for v, r in reasons.items()} == broken
    videos = _videos(out)
    assert {v for v, m in videos.items() if m["status"] == "failed"} == set(broken)
    assert all(videos[v]["num_frames"] is None for v in broken)
    index = pq.read_table(out / "index.parquet")
    assert not set(index["video"].to_pylist()) & set(broken)
    assert not any((out / "images" / v[:-4]).exists() for v in broken)
    # every other video is complete and identical to a clean run
    clean = pq.read_table(tiny_frames / "index.parquet")
    keep = pc.invert(pc.is_in(clean["video"], pa.array(list(broken))))
    assert index.equals(clean.filter(keep))


def test_failure_threshold_raises_after_writing(tiny_params: Params, sample_copy: Path, tmp_path: Path):
    broken = _break_videos(sample_copy)
    out = tmp_path / "frames"
    with pytest.raises(
        ExtractionError, match=r"5 of 12 videos failed .*max_failure_frac=0.1.*failures.parquet"
    ):
        extract_frames(tiny_params, sample_copy, sample_copy / "annotations.json", out)
    assert pq.read_table(out / "videos.parquet").num_rows == 12
    assert set(pq.read_table(out / "failures.parquet")["video"].to_pylist()) >= set(broken)
    assert pq.read_table(out / "index.parquet").num_rows > 0


def test_resume_after_interruption(tiny_params: Params, tiny_sample: Path, tiny_frames: Path, tmp_path: Path):
    out = tmp_path / "frames"
    shutil.copytree(tiny_frames, out)
    ids = sorted(_videos(out))
    # an interrupted run: one video lost its marker mid-way (images half written), one never started
    (out / "images" / ids[0][:-4] / DONE_MARKER).unlink()
    for jpg in sorted((out / "images" / ids[0][:-4]).glob("*.jpg"))[::2]:
        jpg.unlink()
    shutil.rmtree(out / "images" / ids[1][:-4])
    (out / "index.parquet").unlink()
    summary = extract_frames(tiny_params, tiny_sample, tiny_sample / "annotations.json", out)
    assert summary["resumed"] == len(ids) - 2
    for name in ("index.parquet", "videos.parquet", "failures.parquet"):
        assert pq.read_table(out / name).equals(pq.read_table(tiny_frames / name)), name
    assert sorted(p.relative_to(out) for p in out.rglob("*.jpg")) == sorted(
        p.relative_to(tiny_frames) for p in tiny_frames.rglob("*.jpg")
    )


def test_done_markers_follow_video_content_not_path_or_mtime(
    tiny_params: Params, tiny_sample: Path, tiny_frames: Path, tmp_path: Path
):
    """Two clones extract byte-identical outputs (DVC hashes them); a replaced video is decoded again."""
    root = tmp_path / "clone" / "sample"
    shutil.copytree(tiny_sample, root)  # another path, other modification times
    video = "Arson/Arson001_x264.mp4"
    path = root / tiny_params.data.videos_dir / video
    os.utime(path, ns=(1, 1))
    out = tmp_path / "clone" / "frames"
    extract_frames(tiny_params, root, root / "annotations.json", out)
    for marker in sorted(tiny_frames.rglob(DONE_MARKER)):
        assert (out / marker.relative_to(tiny_frames)).read_bytes() == marker.read_bytes(), marker

    # Same size, same modification time, other bytes (within the hashed spans: at this
    # size the whole file is): not the video the frames came from.
    data = bytearray(path.read_bytes())
    data[len(data) // 2 : len(data) // 2 + 64] = bytes(64)
    stat = path.stat()
    path.write_bytes(bytes(data))
    os.utime(path, ns=(stat.st_atime_ns, stat.st_mtime_ns))
    assert (
        source_digest(path)
        != json.loads((out / "images" / video.removesuffix(".mp4") / DONE_MARKER).read_text())["plan"][
            "source_digest"
        ]
    )
    summary = extract_frames(tiny_params, root, root / "annotations.json", out)
    assert summary["resumed"] == len(_videos(out)) - 1


def test_changed_selection_is_not_resumed(
    tiny_params: Params, tiny_sample: Path, tiny_frames: Path, tmp_path: Path
):
    out = tmp_path / "frames"
    shutil.copytree(tiny_frames, out)
    params = tiny_params.with_overrides(frames={"train_frames_per_video": 4})
    summary = extract_frames(params, tiny_sample, tiny_sample / "annotations.json", out)
    assert summary["resumed"] == 6  # the test videos; every training video is decoded again
    train = _rows(out, "Arson/Arson001_x264.mp4", "train")
    assert len(train) == 4
    kept = {p.name for p in (out / "images" / "Arson/Arson001_x264").glob("*.jpg")}
    assert len(kept) < len({p.name for p in (tiny_frames / "images" / "Arson/Arson001_x264").glob("*.jpg")})


def test_process_pool_matches_in_process(
    tiny_params: Params, tiny_sample: Path, tiny_frames: Path, tmp_path: Path
):
    params = tiny_params.with_overrides(frames={"workers": 2})
    out = tmp_path / "frames"
    extract_frames(params, tiny_sample, tiny_sample / "annotations.json", out)
    for name in ("index.parquet", "videos.parquet", "failures.parquet"):
        assert pq.read_table(out / name).equals(pq.read_table(tiny_frames / name)), name


def _done_markers(out: Path) -> list[Path]:
    return list((out / "images").rglob(DONE_MARKER)) if (out / "images").exists() else []


def test_resume_after_kill(tiny_params: Params, tiny_sample: Path, tiny_frames: Path, tmp_path: Path):
    """SIGKILL the real CLI once some videos are done; a rerun completes them, identical to a clean run."""
    out = tmp_path / "frames"
    # niced: on a busy machine the poll below still gets to kill it halfway
    cmd = ["nice", "-n", "10", *_extract_cli(tiny_params, tiny_sample, out, tmp_path)]
    log = tmp_path / "stderr.log"
    # Its own session: the kill takes the whole process group, as a scheduler or OOM killer would.
    with log.open("w") as stderr:
        proc = subprocess.Popen(cmd, start_new_session=True, stdout=subprocess.DEVNULL, stderr=stderr)
        try:
            deadline = time.monotonic() + 60
            while not _done_markers(out) and proc.poll() is None and time.monotonic() < deadline:
                time.sleep(0.002)
            if proc.poll() is None:
                os.killpg(proc.pid, signal.SIGKILL)
        finally:
            proc.wait()
    assert proc.returncode == -signal.SIGKILL, f"the stage ended before it was killed: {log.read_text()}"
    done_at_kill = len(_done_markers(out))
    assert 0 < done_at_kill < len(_videos(tiny_frames))
    assert not (out / "index.parquet").exists()
    # Images are renamed into place whole: whatever the kill interrupted, no *.jpg is partial.
    for jpg in out.rglob("*.jpg"):
        with Image.open(jpg) as image:
            image.load()

    summary = extract_frames(tiny_params, tiny_sample, tiny_sample / "annotations.json", out)
    assert summary["resumed"] == done_at_kill  # every finished video is reused, no other
    for name in ("index.parquet", "videos.parquet", "failures.parquet"):
        assert pq.read_table(out / name).equals(pq.read_table(tiny_frames / name)), name
    # The rerun left no temporary file, and exactly the clean run's images.
    assert not [p for p in out.rglob("*") if ".tmp" in p.name]
    assert sorted(p.relative_to(out) for p in out.rglob("*.jpg")) == sorted(
        p.relative_to(tiny_frames) for p in tiny_frames.rglob("*.jpg")
    )


LONG_VIDEO_FRAMES = 3300


@pytest.fixture(scope="module")
def long_video(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A 110 s video at UCF-Crime's 320x240, 30 fps (x264 ultrafast: a few seconds to write)."""
    path = tmp_path_factory.mktemp("long") / "long.mp4"
    rng = np.random.default_rng(0)
    texture = rng.integers(0, 256, (30, 80, 3), dtype=np.uint8).repeat(8, 0).repeat(8, 1)  # 8x8 blocks
    with av.open(str(path), "w") as container:
        stream = container.add_stream("libx264", rate=30)
        stream.width, stream.height, stream.pix_fmt = 320, 240, "yuv420p"
        stream.options = {"preset": "ultrafast", "crf": "30"}
        for t in range(LONG_VIDEO_FRAMES):
            shift = t % 320  # a texture sliding by: every frame differs, so none is skipped
            frame = av.VideoFrame.from_ndarray(
                np.ascontiguousarray(texture[:, shift : shift + 320]), format="rgb24"
            )
            container.mux(stream.encode(frame))
        container.mux(stream.encode())
    return path


# Run in a fresh interpreter and read its peak RSS from VmHWM: a child's ru_maxrss starts at
# its parent's RSS (Linux keeps it across fork and exec), so under pytest it would hide growth.
_MEASURE = """
import json, sys
from fgclip.data.frames import VideoJob, extract_video

def peak_kib():
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith("VmHWM:"))

job = VideoJob(video="Testing_Normal_Videos_Anomaly/Normal_Videos_001_x264.mp4", split="test", label="Normal",
               source=sys.argv[1], out=sys.argv[2], train_frames=0, snippet_len=16, window=None,
               keyframes=(5, 3000), jpeg_quality=95)
before = peak_kib()
result = extract_video(job)
print(json.dumps({"growth_kib": peak_kib() - before, "decoded": result["decoded"], "rows": len(result["frames"])}))
"""


def test_long_video_in_bounded_memory(long_video: Path, tmp_path: Path):
    proc = subprocess.run(
        [sys.executable, "-c", _MEASURE, str(long_video), str(tmp_path)],
        capture_output=True,
        text=True,
        check=True,
    )
    result = json.loads(proc.stdout)
    assert result["decoded"] == LONG_VIDEO_FRAMES
    assert result["rows"] == math.ceil(LONG_VIDEO_FRAMES / 16) + 2  # eval frames + the two keyframes
    # Holding every decoded frame (yuv420p: 1.5 bytes a pixel) would take 380 MB (measured:
    # 480 MB), one snippet of 16 frames 1.8 MB (measured growth: 11 MB with the decoder's
    # and JPEG buffers). The bound is far from both.
    all_frames_kib = LONG_VIDEO_FRAMES * 320 * 240 * 1.5 / 1024
    assert result["growth_kib"] < 64 * 1024 < all_frames_kib / 5, result


def _extract_cli(params: Params, root: Path, out: Path, tmp_path: Path) -> list[str]:
    """The real `fgclip extract-frames` command line, with ``params`` written to a params file."""
    params_file = tmp_path / "params.yaml"
    params_file.write_text(yaml.safe_dump(params.model_dump(mode="json", exclude={"base_dir"})))
    return [
        sys.executable,
        "-m",
        "fgclip.cli",
        "extract-frames",
        "--params",
        str(params_file),
        "--data-root",
        str(root),
        "--out",
        str(out),
    ]


def test_workers_end_with_a_killed_parent(
    tiny_params: Params, sample_copy: Path, long_video: Path, tmp_path: Path
):
    """SIGKILL only the stage process (as the OOM killer does) while both workers decode a long video."""
    ids = (sample_copy / "Anomaly_Train.txt").read_text().split()
    long_dirs = []
    for vid in ids[:2]:  # the first jobs submitted: each worker starts on one
        shutil.copyfile(long_video, sample_copy / "videos" / vid)
        long_dirs.append(tmp_path / "frames" / "images" / vid.removesuffix(".mp4"))
    params = tiny_params.with_overrides(frames={"workers": 2})
    cmd = _extract_cli(params, sample_copy, tmp_path / "frames", tmp_path)
    log = tmp_path / "stderr.log"
    with log.open("w") as stderr:
        proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=stderr)
    workers: list[psutil.Process] = []
    try:
        deadline = time.monotonic() + 60
        while not any(d.is_dir() and any(d.glob("*.jpg")) for d in long_dirs):
            assert proc.poll() is None and time.monotonic() < deadline, (
                f"no decoding began: {log.read_text()}"
            )
            time.sleep(0.01)
        workers = psutil.Process(proc.pid).children(recursive=True)
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait()
        _, alive = psutil.wait_procs(workers, timeout=3)
        # Each would otherwise decode on for seconds (110 s of video), writing images and a marker.
        assert not alive, f"orphaned workers: {[p.cmdline()[-3:] for p in alive]}"
    finally:
        proc.kill()
        proc.wait()
        for p in workers:  # the orphans of a failed run: ended by their pid
            if p.is_running():
                p.kill()
    assert len(workers) >= 2


def test_resume_checks_what_markers_vouch_for(
    tiny_params: Params,
    tiny_sample: Path,
    tiny_frames: Path,
    tmp_path: Path,
    caplog: pytest.LogCaptureFixture,
):
    """A deleted, a cut and a scribbled-on JPEG of finished videos: those videos are extracted again."""
    out = tmp_path / "frames"
    shutil.copytree(tiny_frames, out)
    ids = sorted(_videos(out))
    deleted, cut, scribbled = (out / "images" / v.removesuffix(".mp4") for v in ids[:3])
    jpgs = {d: sorted(d.glob("*.jpg")) for d in (deleted, cut, scribbled)}
    jpgs[deleted][3].unlink()
    jpgs[cut][0].write_bytes(jpgs[cut][0].read_bytes()[:-100])
    data = bytearray(jpgs[scribbled][-1].read_bytes())
    data[-2:] = b"\0\0"  # same size, no end marker
    jpgs[scribbled][-1].write_bytes(bytes(data))

    with caplog.at_level("WARNING", logger="fgclip.data.frames"):
        summary = extract_frames(tiny_params, tiny_sample, tiny_sample / "annotations.json", out)
    for jpg in tiny_frames.rglob("*.jpg"):
        assert (out / jpg.relative_to(tiny_frames)).read_bytes() == jpg.read_bytes(), jpg
    assert (summary["resumed"], summary["reextracted"]) == (len(ids) - 3, 3)
    again = [r.getMessage() for r in caplog.records if "extracted again" in r.getMessage()]
    assert len(again) == 3
    for vid, what in zip(ids[:3], ("is missing", "were written", "does not end as a JPEG")):
        assert any(m.startswith(f"extract_frames: {vid}: ") and what in m for m in again), again
    for name in ("index.parquet", "videos.parquet", "failures.parquet"):
        assert pq.read_table(out / name).equals(pq.read_table(tiny_frames / name)), name
    # An intact frames directory stays a no-op to resume.
    summary = extract_frames(tiny_params, tiny_sample, tiny_sample / "annotations.json", out)
    assert (summary["resumed"], summary["reextracted"]) == (len(ids), 0)


def test_marker_of_an_older_format_is_not_trusted(
    tiny_params: Params, tiny_sample: Path, tiny_frames: Path, tmp_path: Path
):
    """Frames extracted before markers recorded image sizes and rotation are extracted again, once."""
    out = tmp_path / "frames"
    shutil.copytree(tiny_frames, out)
    vid = min(_videos(out))
    marker_path = out / "images" / vid.removesuffix(".mp4") / DONE_MARKER
    marker = json.loads(marker_path.read_text())
    del marker["plan"]["format"], marker["images"], marker["result"]["meta"]["rotation"]
    marker_path.write_text(json.dumps(marker))
    summary = extract_frames(tiny_params, tiny_sample, tiny_sample / "annotations.json", out)
    assert summary["resumed"] == len(_videos(out)) - 1
    assert marker_path.read_bytes() == (tiny_frames / marker_path.relative_to(out)).read_bytes()


def _quadrants(height: int, width: int) -> np.ndarray:
    """A picture whose every turn and mirror differs: red, green, blue corners on grey."""
    picture = np.full((height, width, 3), 128, np.uint8)
    picture[:16, :16] = (255, 0, 0)
    picture[:16, -16:] = (0, 255, 0)
    picture[-16:, :16] = (0, 0, 255)
    return picture


def _write_video(
    path: Path, picture: np.ndarray, frames: int, rotation: tuple[int, bool, bool] | None
) -> None:
    """H.264 of ``picture``; ``rotation``: PyAV's (counter-clockwise degrees, hflip, vflip) display matrix."""
    with av.open(str(path), "w") as container:
        stream = container.add_stream("libx264", rate=30)
        stream.height, stream.width = picture.shape[:2]
        stream.pix_fmt = "yuv420p"
        if rotation is not None:
            stream.set_display_rotation(rotation[0], hflip=rotation[1], vflip=rotation[2])
        for _ in range(frames):
            container.mux(stream.encode(av.VideoFrame.from_ndarray(picture, format="rgb24")))
        container.mux(stream.encode())


def _test_job(source: Path, out: Path) -> VideoJob:
    return VideoJob(
        video="A/v.mp4",
        split="test",
        label="A",
        source=str(source),
        out=str(out),
        train_frames=0,
        snippet_len=16,
        window=None,
        keyframes=(),
        jpeg_quality=95,
    )


def _close(image: np.ndarray, expected: np.ndarray) -> bool:
    return image.shape == expected.shape and np.abs(image.astype(int) - expected).mean() < 8


def test_rotated_video_is_extracted_upright(
    tiny_params: Params, tiny_frames: Path, sample_copy: Path, tmp_path: Path
):
    """A phone-style video: stored landscape, with a display matrix saying "turn 90 degrees clockwise"."""
    vid = (sample_copy / "Anomaly_Test.txt").read_text().split()[0]
    upright = _quadrants(64, 48)  # what the camera saw and a player shows; boxes are drawn on it
    _write_video(sample_copy / "videos" / vid, np.rot90(upright), 40, rotation=(-90, False, False))
    out = tmp_path / "frames"
    extract_frames(tiny_params, sample_copy, sample_copy / "annotations.json", out)
    for k in _rows(out, vid, "eval"):
        assert _close(np.asarray(Image.open(out / "images" / vid[:-4] / f"{k:06d}.jpg")), upright), k
    meta = _videos(out)[vid]
    assert (meta["status"], meta["rotation"], meta["width"], meta["height"]) == ("ok", 90, 48, 64)
    assert {m["rotation"] for v, m in _videos(out).items() if v != vid} == {0}


# (PyAV's counter-clockwise degrees, hflip, vflip) -> the picture the ffmpeg 5.1 CLI shows
# (autorotation on), as np.rot90 turns then a left-right mirror, and the rotation recorded:
# clockwise degrees, after the mirror for a mirrored matrix.
ORIENTATIONS = [
    ((0, False, False), (0, False), 0),
    ((0, False, True), (2, True), 180),
    ((0, True, False), (0, True), 0),
    ((0, True, True), (2, False), 180),
    ((90, False, False), (1, False), 270),
    ((90, False, True), (3, True), 270),
    ((90, True, False), (1, True), 90),
    ((90, True, True), (3, False), 90),
]


@pytest.mark.parametrize("matrix,shown,recorded", ORIENTATIONS)
def test_every_display_orientation_as_a_player_shows_it(
    matrix: tuple[int, bool, bool], shown: tuple[int, bool], recorded: int, tmp_path: Path
):
    stored = _quadrants(48, 64)
    source = tmp_path / "v.mp4"
    _write_video(source, stored, 3, rotation=matrix)
    expected = np.rot90(stored, shown[0])
    expected = np.fliplr(expected) if shown[1] else expected
    if shutil.which("ffmpeg"):  # the table itself, where a player is installed
        cmd = ["ffmpeg", "-v", "error", "-i", str(source), "-frames:v", "1", "-f", "rawvideo"]
        raw = subprocess.run([*cmd, "-pix_fmt", "rgb24", "-"], capture_output=True, check=True).stdout
        assert _close(np.frombuffer(raw, np.uint8).reshape(expected.shape), expected)
    result = extract_video(_test_job(source, tmp_path))
    assert _close(np.asarray(Image.open(tmp_path / "images" / "A" / "v" / "000001.jpg")), expected)
    assert (result["meta"]["rotation"], result["meta"]["width"]) == (recorded, expected.shape[1])


def test_rotation_off_a_right_angle_fails_the_video(tmp_path: Path):
    source = tmp_path / "v.mp4"
    _write_video(source, _quadrants(48, 64), 3, rotation=(45, False, False))
    result = extract_video(_test_job(source, tmp_path))
    assert result["meta"]["status"] == "failed"
    assert result["failures"] == [
        "unsupported: the display matrix turns the picture by -45 degrees clockwise"
    ]


def test_symlinks_out_of_the_data_root_are_refused(
    tiny_params: Params, tiny_frames: Path, sample_copy: Path, tmp_path: Path
):
    videos = sample_copy / "videos"
    outside = tmp_path / "elsewhere"
    outside.mkdir()
    linked_file, linked_dir, inside = "Arson/Arson001_x264.mp4", "RoadAccidents", "Arson/Arson002_x264.mp4"
    shutil.move(videos / linked_file, outside / "x.mp4")
    (videos / linked_file).symlink_to(outside / "x.mp4")
    shutil.move(videos / linked_dir, outside / linked_dir)
    (videos / linked_dir).symlink_to(outside / linked_dir)
    (sample_copy / "spare").mkdir()  # a link that stays in the data root is followed
    shutil.move(videos / inside, sample_copy / "spare" / "y.mp4")
    (videos / inside).symlink_to(sample_copy / "spare" / "y.mp4")
    out = tmp_path / "frames"
    params = tiny_params.with_overrides(frames={"max_failure_frac": 0.9})
    summary = extract_frames(params, sample_copy, sample_copy / "annotations.json", out)
    refused = {
        r["video"]: r["reason"] for r in summary["failures"] if r["reason"].startswith("path_escapes_root")
    }
    assert sorted(refused) == [linked_file, *sorted(v for v in _videos(out) if v.startswith(linked_dir))]
    assert f"leads to {outside / 'x.mp4'} through a symlink" in refused[linked_file]
    assert not any((out / "images" / v[:-4]).exists() for v in refused)
    assert _videos(out)[inside]["status"] == "ok"
    assert summary["ok"] == len(_videos(out)) - len(refused)


def test_videos_dir_may_itself_be_a_link(
    tiny_params: Params, tiny_sample: Path, tiny_frames: Path, tmp_path: Path
):
    """The videos on another disk, linked in: the dataset's configuration, not an escape."""
    root = tmp_path / "root"
    root.mkdir()
    for f in tiny_sample.iterdir():
        if f.is_file():
            shutil.copy(f, root / f.name)
    (root / "videos").symlink_to(tiny_sample / "videos")
    out = tmp_path / "frames"
    extract_frames(tiny_params, root, root / "annotations.json", out)
    assert pq.read_table(out / "index.parquet").equals(pq.read_table(tiny_frames / "index.parquet"))


def test_bad_split_lines_fail_alone(
    tiny_params: Params, tiny_frames: Path, sample_copy: Path, tmp_path: Path
):
    split = sample_copy / "Anomaly_Train.txt"
    good = split.read_bytes()
    bad = [
        b"Arson/Arson0\x0009_x264.mp4",
        b"Arson/Arson\xff\xfe9_x264.mp4",
        b"../outside/x.mp4",
        b"NoFolder.mp4",
    ]
    split.write_bytes(good + b"\n".join([*bad, good.splitlines()[0]]) + b"\n")
    first = len(good.splitlines()) + 1
    out = tmp_path / "frames"
    params = tiny_params.with_overrides(frames={"max_failure_frac": 0.5})
    summary = extract_frames(params, sample_copy, sample_copy / "annotations.json", out)
    assert (summary["ok"], summary["failed"], summary["bad_split_lines"]) == (12, 0, 5)
    reasons = {r["video"]: r["reason"] for r in pq.read_table(out / "failures.parquet").to_pylist()}
    lines = {
        f"Anomaly_Train.txt:{first + i}": reasons.get(f"Anomaly_Train.txt:{first + i}", "") for i in range(5)
    }
    assert [r.split(":")[0] for r in lines.values()] == ["bad_split_line"] * 2 + ["path_escapes_root"] + [
        "bad_split_line"
    ] * 2
    for (where, reason), what in zip(
        lines.items(), ("NUL byte", "not UTF-8", "escapes the videos dir", "no class folder", "listed twice")
    ):
        assert f"{split}:{where.split(':')[1]}: " in reason and what in reason, reason
    assert pq.read_table(out / "index.parquet").equals(pq.read_table(tiny_frames / "index.parquet"))
    # Lost entries count against the threshold like failed videos.
    with pytest.raises(ExtractionError, match=r"5 of 17 videos failed"):
        extract_frames(tiny_params, sample_copy, sample_copy / "annotations.json", tmp_path / "frames2")
