"""Stage validate_boxes: every reject reason, accounting, virtual boxes, shards, outputs, streaming."""

import json
import math
import shutil
from pathlib import Path

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
import pytest

import fgclip.data.boxes as boxes_mod
from fgclip.config import Params
from fgclip.data.annotations import load_annotations
from fgclip.data.boxes import (
    RAW_BOX_SCHEMA,
    REASONS,
    BoxAccountingError,
    FrameLookup,
    raw_boxes,
    validate_box_batches,
    validate_boxes,
)
from fgclip.data.frames import extract_frames
from fgclip.data.layout import ACCEPTED_SCHEMA, REJECTS_SCHEMA

VIDEO = "Arson/Arson001_x264.mp4"


def _accepted(out: Path) -> list[dict]:
    manifest = json.loads((out / "manifest.json").read_text())
    return [row for s in manifest["shards"] for row in pq.read_table(out / s["path"]).to_pylist()]


@pytest.fixture(scope="module")
def frames_facts(tiny_frames: Path) -> dict:
    """An extracted frame of VIDEO, one in range but not extracted, and its decoded length."""
    videos = {r["video"]: r for r in pq.read_table(tiny_frames / "videos.parquet").to_pylist()}
    index = pq.read_table(tiny_frames / "index.parquet")
    extracted = set(index.filter(pc.equal(index["video"], VIDEO))["frame"].to_pylist())
    n = videos[VIDEO]["num_frames"]
    return {"ok": min(extracted), "missing": min(set(range(n)) - extracted), "n": n}


def _record(frame: int, bbox: list, **fields) -> dict:
    return {
        "video": "Arson001.mp4",
        "global_caption": "a fire spreads and burns",
        "region_captions": ["flames burn"],
        "box_infos": [[{"frame": frame, "bbox": bbox}]],
        "timestamps": None,
        **fields,
    }


def _run(params: Params, records: list, frames: Path, tmp_path: Path) -> tuple[dict, Path]:
    ann = tmp_path / "annotations.json"
    ann.write_text(json.dumps(records))
    out = tmp_path / "boxes"
    metrics = validate_boxes(params, ann, frames, out, tmp_path / "metrics" / "boxes.json")
    return metrics, out


GOOD = [0.1, 0.2, 0.5, 0.6]
CASES = {
    "malformed": lambda f: _record(f["ok"], [0.1, 0.2, 0.5]),
    "path_escapes_root": lambda f: _record(f["ok"], GOOD, video="../videos/Arson/Arson001_x264.mp4"),
    "unknown_video": lambda f: _record(f["ok"], GOOD, video="Arson099.mp4"),
    "missing_boxes": lambda f: _record(f["ok"], GOOD, box_infos=[]),
    "empty_caption": lambda f: _record(f["ok"], GOOD, region_captions=["  "]),
    "non_finite": lambda f: _record(f["ok"], [0.1, float("nan"), 0.5, 0.6]),
    "out_of_range": lambda f: _record(f["ok"], [0.1, 0.2, 1.4, 0.6]),
    "inverted": lambda f: _record(f["ok"], [0.5, 0.2, 0.1, 0.6]),
    "too_small": lambda f: _record(f["ok"], [0.1, 0.2, 0.15, 0.25]),
    "keyframe_out_of_range": lambda f: _record(f["n"], GOOD),
    "keyframe_not_extracted": lambda f: _record(f["missing"], GOOD),
}


def test_every_reason_has_a_case():
    assert set(CASES) == set(REASONS)


@pytest.mark.parametrize("reason", REASONS)
def test_each_reject_reason(
    reason: str, tiny_params: Params, tiny_frames: Path, frames_facts: dict, tmp_path: Path
):
    records = [_record(frames_facts["ok"], GOOD), CASES[reason](frames_facts)]
    metrics, out = _run(tiny_params, records, tiny_frames, tmp_path)
    assert (metrics["read"], metrics["accepted"], metrics["rejected"]) == (2, 1, 1)
    assert metrics["by_reason"] == {r: int(r == reason) for r in REASONS}
    (reject,) = pq.read_table(out / "rejects.parquet").to_pylist()
    assert reject["reason"] == reason and reject["record"] == 1
    assert reject["video"] == records[1]["video"]  # as written
    (row,) = _accepted(out)
    assert (row["video"], row["frame"], row["region_caption"]) == (VIDEO, frames_facts["ok"], "flames burn")
    assert [row[c] for c in ("x1", "y1", "x2", "y2")] == pytest.approx(GOOD)


def test_first_failing_rule_wins(tiny_params: Params, tiny_frames: Path, frames_facts: dict, tmp_path: Path):
    records = [
        _record(frames_facts["n"], [float("nan"), 0.2, 0.5, 0.6]),  # non_finite before keyframe range
        _record(frames_facts["ok"], [0.5, 0.2, 0.1, 1.5]),  # out_of_range before inverted
        _record(frames_facts["ok"], GOOD, video="Nope.mp4", region_captions=[""]),  # unknown before empty
    ]
    _, out = _run(tiny_params, records, tiny_frames, tmp_path)
    reasons = pq.read_table(out / "rejects.parquet")["reason"].to_pylist()
    assert reasons == ["non_finite", "out_of_range", "unknown_video"]


def test_rejects_keep_original_values(
    tiny_params: Params, tiny_frames: Path, frames_facts: dict, tmp_path: Path
):
    records = [
        _record(frames_facts["ok"], [0.1, 0.2, 1.4, 0.6]),
        _record(frames_facts["ok"], [1, 2, 3]),
        "not a record",
        _record(frames_facts["ok"], [float("nan"), 0.2, 0.5, 0.6]),
    ]
    _, out = _run(tiny_params, records, tiny_frames, tmp_path)
    rejects = pq.read_table(out / "rejects.parquet")
    assert rejects.schema.remove_metadata() == REJECTS_SCHEMA
    rows = rejects.to_pylist()
    assert [r["record"] for r in rows] == [0, 1, 2, 3]
    assert rows[0]["x2"] == 1.4 and rows[0]["frame"] == frames_facts["ok"] and rows[0]["region"] == 0
    assert json.loads(rows[1]["raw"]) == {"frame": frames_facts["ok"], "bbox": [1, 2, 3]}
    assert rows[1]["region"] == 0 and "4 numbers" in rows[1]["detail"]
    assert json.loads(rows[2]["raw"]) == "not a record" and rows[2]["region"] is None
    assert math.isnan(rows[3]["x1"])


@pytest.mark.parametrize("clip,expected", [(True, "accepted"), (False, "out_of_range")])
def test_overshoot_within_tolerance(
    clip: bool, expected: str, tiny_params: Params, tiny_frames: Path, frames_facts: dict, tmp_path: Path
):
    params = tiny_params.with_overrides(boxes={"clip_overshoot": clip, "clip_tolerance": 0.02})
    metrics, out = _run(
        params, [_record(frames_facts["ok"], [-0.01, 0.2, 1.015, 0.6])], tiny_frames, tmp_path
    )
    if expected == "accepted":
        (row,) = _accepted(out)
        assert [row[c] for c in ("x1", "y1", "x2", "y2")] == pytest.approx([0.0, 0.2, 1.0, 0.6])
        assert metrics["clipped"] == 1
    else:
        assert metrics["by_reason"]["out_of_range"] == 1 and metrics["accepted"] == 0


def test_clipping_then_inverted(tiny_params: Params, tiny_frames: Path, frames_facts: dict, tmp_path: Path):
    """A box that only exists outside the frame collapses when clipped: inverted, not accepted."""
    metrics, _ = _run(
        tiny_params, [_record(frames_facts["ok"], [1.005, 0.2, 1.015, 0.6])], tiny_frames, tmp_path
    )
    assert metrics["by_reason"]["inverted"] == 1


def test_sample_boxes(tiny_params: Params, tiny_boxes: Path, tiny_frames: Path, tiny_sample: Path):
    metrics = json.loads(tiny_params.paths.boxes_metrics.read_text())
    assert metrics["accepted"] + metrics["rejected"] == metrics["read"]
    assert set(metrics["by_reason"]) == set(REASONS)
    planted = ("out_of_range", "too_small", "non_finite", "inverted", "keyframe_out_of_range")
    assert {r: n for r, n in metrics["by_reason"].items() if n} == {r: 1 for r in planted}
    rows = _accepted(tiny_boxes)
    assert len(rows) == metrics["accepted"]
    assert pq.read_schema(tiny_boxes / "part-00000.parquet").remove_metadata() == ACCEPTED_SCHEMA
    for row in rows:
        assert (tiny_frames / row["frame_path"]).is_file()
        assert 0 <= row["x1"] < row["x2"] <= 1 and 0 <= row["y1"] < row["y2"] <= 1


def test_virtual_boxes_for_normals(tiny_boxes: Path, tiny_frames: Path, tiny_sample: Path):
    ann = {r["video"]: r for r in json.loads((tiny_sample / "annotations.json").read_text())}
    index = pq.read_table(tiny_frames / "index.parquet")
    rows = _accepted(tiny_boxes)
    normals = [v for v in ann if "Normal" in v]
    for vid in normals:
        mine = [r for r in rows if r["video"] == vid]
        if vid.startswith("Testing"):
            assert mine == []  # evaluation videos
            continue
        train = index.filter(pc.and_(pc.equal(index["video"], vid), pc.equal(index["purpose"], "train")))
        t0, t1 = ann[vid]["timestamps"]
        assert all(t0 - 1e-6 <= t <= t1 + 1e-6 for t in train["timestamp"].to_pylist())
        captions = ann[vid]["region_captions"]
        expected = sorted(
            (r, f, p)
            for r in range(len(captions))
            for f, p in zip(train["frame"].to_pylist(), train["path"].to_pylist())
        )
        assert sorted((r["region"], r["frame"], r["frame_path"]) for r in mine) == expected
        assert all(r["virtual"] and (r["x1"], r["y1"], r["x2"], r["y2"]) == (0, 0, 1, 1) for r in mine)
        assert all(r["region_caption"] == captions[r["region"]] for r in mine)
    assert not any(r["virtual"] for r in rows if "Normal" not in r["video"])


def test_failed_video_rows_are_not_extracted(tiny_params: Params, tiny_sample: Path, tmp_path: Path):
    root = tmp_path / "sample"
    shutil.copytree(tiny_sample, root)
    normal = "Training_Normal_Videos_Anomaly/Normal_Videos001_x264.mp4"
    for vid in ("RoadAccidents/RoadAccidents002_x264.mp4", normal):
        (root / "videos" / vid).unlink()
    params = tiny_params.with_overrides(frames={"max_failure_frac": 1.0})
    extract_frames(params, root, root / "annotations.json", tmp_path / "frames")
    validate_boxes(
        params, root / "annotations.json", tmp_path / "frames", tmp_path / "boxes", tmp_path / "m.json"
    )
    ann = {r["video"]: r for r in json.loads((root / "annotations.json").read_text())}
    rejects = pq.read_table(tmp_path / "boxes" / "rejects.parquet").to_pylist()
    road = [r for r in rejects if r["video"] == "RoadAccidents/RoadAccidents002_x264.mp4"]
    # every keyframe is rejected; the planted inverted box fails its earlier rule
    assert len(road) == sum(len(k) for k in ann["RoadAccidents/RoadAccidents002_x264.mp4"]["box_infos"])
    assert sorted({r["reason"] for r in road}) == ["inverted", "keyframe_not_extracted"]
    placeholders = [r for r in rejects if r["video"] == normal]
    assert [r["region"] for r in placeholders] == list(range(len(ann[normal]["region_captions"])))
    assert all(
        r["reason"] == "keyframe_not_extracted" and r["frame"] is None and r["virtual"] for r in placeholders
    )
    assert not any(
        r["video"] in (normal, "RoadAccidents/RoadAccidents002_x264.mp4")
        for r in _accepted(tmp_path / "boxes")
    )


def test_shards_and_stale_outputs(tiny_params: Params, tiny_frames: Path, tiny_sample: Path, tmp_path: Path):
    params = tiny_params.with_overrides(boxes={"shard_rows": 40, "row_group_rows": 16})
    out = tmp_path / "boxes"
    metrics = validate_boxes(params, tiny_sample / "annotations.json", tiny_frames, out, tmp_path / "m.json")
    manifest = json.loads((out / "manifest.json").read_text())
    sizes = [s["rows"] for s in manifest["shards"]]
    assert all(n <= 40 for n in sizes) and sum(sizes) == manifest["rows"] == metrics["accepted"]
    assert len(sizes) == math.ceil(metrics["accepted"] / 40) >= 2
    for shard in manifest["shards"]:
        meta = pq.ParquetFile(out / shard["path"]).metadata
        assert meta.num_rows == shard["rows"]
        assert all(meta.row_group(i).num_rows <= 16 for i in range(meta.num_row_groups))
        assert meta.row_group(0).column(0).compression == "ZSTD"
    # a rerun with bigger shards leaves no stale shard behind
    validate_boxes(tiny_params, tiny_sample / "annotations.json", tiny_frames, out, tmp_path / "m.json")
    assert sorted(p.name for p in out.iterdir()) == ["manifest.json", "part-00000.parquet", "rejects.parquet"]


def test_accounting_error_when_a_row_is_lost(
    tiny_params: Params, tiny_frames: Path, tiny_sample: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
):
    real = boxes_mod._accepted
    monkeypatch.setattr(boxes_mod, "_accepted", lambda *a: real(*a).slice(1))  # a bug that drops a row
    with pytest.raises(BoxAccountingError, match=r"read \d+ rows but accepted \d+ \+ rejected"):
        validate_boxes(
            tiny_params, tiny_sample / "annotations.json", tiny_frames, tmp_path / "b", tmp_path / "m"
        )
    assert not (tmp_path / "m").exists()


def test_unreadable_annotations_name_the_file(tiny_params: Params, tiny_frames: Path, tmp_path: Path):
    (tmp_path / "annotations.json").write_text("{}")
    with pytest.raises(ValueError, match="annotations.json: expected a JSON list"):
        validate_boxes(
            tiny_params, tmp_path / "annotations.json", tiny_frames, tmp_path / "b", tmp_path / "m"
        )


def test_streaming_matches_whole_table(
    tiny_params: Params, tiny_sample: Path, tiny_frames: Path, frames_facts: dict, tmp_path: Path
):
    """Raw boxes streamed from Parquet in small dictionary-encoded batches == the stage's one-batch run."""
    records = json.loads((tiny_sample / "annotations.json").read_text())
    records += [CASES[reason](frames_facts) for reason in REASONS]  # every rule fires
    ann = tmp_path / "annotations.json"
    ann.write_text(json.dumps(records))
    whole = validate_boxes(tiny_params, ann, tiny_frames, tmp_path / "whole", tmp_path / "m.json")

    videos = pq.read_table(tiny_frames / "videos.parquet")
    index = pq.read_table(tiny_frames / "index.parquet")
    raw = raw_boxes(*load_annotations(ann), videos, index)
    assert raw.schema == RAW_BOX_SCHEMA
    pq.write_table(raw, tmp_path / "raw.parquet", row_group_size=7)
    source = pq.ParquetFile(tmp_path / "raw.parquet", read_dictionary=["video", "region_caption", "raw"])
    streamed = validate_box_batches(
        source.iter_batches(batch_size=7), FrameLookup(videos, index), tiny_params.boxes, tmp_path / "stream"
    )
    assert source.num_row_groups > 10
    assert streamed == {k: whole[k] for k in streamed}
    assert all(n for n in whole["by_reason"].values())
    assert _accepted(tmp_path / "stream") == _accepted(tmp_path / "whole")
    rejects = [pq.read_table(tmp_path / d / "rejects.parquet").to_pylist() for d in ("stream", "whole")]
    assert str(rejects[0]) == str(rejects[1])  # str(): NaN coordinates compare equal


def test_stream_without_a_column_is_refused(
    tiny_params: Params, tiny_frames: Path, tiny_boxes: Path, tmp_path: Path
):
    lookup = FrameLookup.from_frames_dir(tiny_frames)
    batch = pa.record_batch({"video": ["Arson001.mp4"], "frame": [3]})
    with pytest.raises(ValueError, match=r"raw boxes lack columns \['detail', 'global_caption'"):
        validate_box_batches([batch], lookup, tiny_params.boxes, tiny_boxes)
    assert (tiny_boxes / "manifest.json").is_file()  # the previous outputs are untouched
    assert not list(tiny_boxes.parent.glob(f".{tiny_boxes.name}.tmp"))
