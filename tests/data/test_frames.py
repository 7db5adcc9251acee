"""Stage extract_frames: selection, index schema, failures, threshold, resume, workers."""

import json
import shutil
from pathlib import Path

import av
import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
import pytest
from PIL import Image

from fgclip.config import Params
from fgclip.data.frames import (
    DONE_MARKER,
    FAILURES_SCHEMA,
    INDEX_SCHEMA,
    VIDEOS_SCHEMA,
    ExtractionError,
    extract_frames,
    snippet_middles,
    uniform_frames,
    window_frames,
)


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
        frame = next(f for k, f in enumerate(c.decode(video=0)) if k == row["frame"]).to_ndarray(format="rgb24")
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
    return {garbage: "corrupt", cut: "corrupt", cut_clean: "truncated", missing: "missing",
            audio: "no video stream"}


def test_bad_videos_fail_alone(tiny_params: Params, tiny_frames: Path, sample_copy: Path, tmp_path: Path):
    broken = _break_videos(sample_copy)
    params = tiny_params.with_overrides(frames={"max_failure_frac": 0.5})
    out = tmp_path / "frames"
    summary = extract_frames(params, sample_copy, sample_copy / "annotations.json", out)
    assert (summary["failed"], summary["ok"]) == (5, 7)
    reasons = {r["video"]: r["reason"] for r in pq.read_table(out / "failures.parquet").to_pylist()
               if not r["reason"].startswith("keyframe past end")}
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
    with pytest.raises(ExtractionError, match=r"5 of 12 videos failed .*max_failure_frac=0.1.*failures.parquet"):
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
        p.relative_to(tiny_frames) for p in tiny_frames.rglob("*.jpg"))


def test_changed_selection_is_not_resumed(tiny_params: Params, tiny_sample: Path, tiny_frames: Path, tmp_path: Path):
    out = tmp_path / "frames"
    shutil.copytree(tiny_frames, out)
    params = tiny_params.with_overrides(frames={"train_frames_per_video": 4})
    summary = extract_frames(params, tiny_sample, tiny_sample / "annotations.json", out)
    assert summary["resumed"] == 6  # the test videos; every training video is decoded again
    train = _rows(out, "Arson/Arson001_x264.mp4", "train")
    assert len(train) == 4
    kept = {p.name for p in (out / "images" / "Arson/Arson001_x264").glob("*.jpg")}
    assert len(kept) < len({p.name for p in (tiny_frames / "images" / "Arson/Arson001_x264").glob("*.jpg")})


def test_process_pool_matches_in_process(tiny_params: Params, tiny_sample: Path, tiny_frames: Path, tmp_path: Path):
    params = tiny_params.with_overrides(frames={"workers": 2})
    out = tmp_path / "frames"
    extract_frames(params, tiny_sample, tiny_sample / "annotations.json", out)
    for name in ("index.parquet", "videos.parquet", "failures.parquet"):
        assert pq.read_table(out / name).equals(pq.read_table(tiny_frames / name)), name
