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
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
import pytest
import yaml
from PIL import Image

from fgclip.config import Params
from fgclip.data.frames import (
    ExtractionError,
    extract_frames,
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
    params_file = tmp_path / "params.yaml"
    params_file.write_text(yaml.safe_dump(tiny_params.model_dump(mode="json", exclude={"base_dir"})))
    out = tmp_path / "frames"
    # niced: on a busy machine the poll below still gets to kill it halfway
    cmd = [
        "nice",
        "-n",
        "10",
        sys.executable,
        "-m",
        "fgclip.cli",
        "extract-frames",
        "--params",
        str(params_file),
        "--data-root",
        str(tiny_sample),
        "--out",
        str(out),
    ]
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
