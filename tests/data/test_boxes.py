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
    RAW_BOX_FULL_SCHEMA,
    RAW_BOX_SCHEMA,
    REASONS,
    BoxAccountingError,
    FrameLookup,
    raw_boxes,
    validate_box_batches,
    validate_boxes,
)
from fgclip.data.frames import extract_frames
from fgclip.data.hard_negatives import region_negatives
from fgclip.data.layout import ACCEPTED_SCHEMA, REJECTS_SCHEMA
from fgclip.outputs import MARKER, OutputDirError, owner

VIDEO = "Arson/Arson001_x264.mp4"
OTHER = "Arson/Arson002_x264.mp4"  # a second train video with keyframes: a record of its own


def _accepted(out: Path) -> list[dict]:
    manifest = json.loads((out / "manifest.json").read_text())
    return [row for s in manifest["shards"] for row in pq.read_table(out / s["path"]).to_pylist()]


@pytest.fixture(scope="module")
def frames_facts(tiny_frames: Path) -> dict:
    """An extracted frame of VIDEO, one in range but not extracted, its decoded length; a frame of OTHER."""
    videos = {r["video"]: r for r in pq.read_table(tiny_frames / "videos.parquet").to_pylist()}
    index = pq.read_table(tiny_frames / "index.parquet")
    extracted = set(index.filter(pc.equal(index["video"], VIDEO))["frame"].to_pylist())
    n = videos[VIDEO]["num_frames"]
    other_ok = min(index.filter(pc.equal(index["video"], OTHER))["frame"].to_pylist())
    return {"ok": min(extracted), "missing": min(set(range(n)) - extracted), "n": n, "other_ok": other_ok}


def _without_negatives(rows: list[dict]) -> list[dict]:
    return [{k: v for k, v in row.items() if k != "region_negatives"} for row in rows]


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
    # OTHER spelt another way than the good record's "Arson002.mp4": the same video
    "duplicate_record": lambda f: _record(f["other_ok"], GOOD, video=OTHER),
    "missing_boxes": lambda f: _record(f["ok"], GOOD, box_infos=[]),
    "empty_caption": lambda f: _record(f["ok"], GOOD, region_captions=["  "]),
    "non_finite": lambda f: _record(f["ok"], [0.1, float("nan"), 0.5, 0.6]),
    "out_of_range": lambda f: _record(f["ok"], [0.1, 0.2, 1.4, 0.6]),
    "inverted": lambda f: _record(f["ok"], [0.5, 0.2, 0.1, 0.6]),
    "too_small": lambda f: _record(f["ok"], [0.1, 0.2, 0.15, 0.25]),
    "keyframe_out_of_range": lambda f: _record(f["n"], GOOD),
    "keyframe_not_extracted": lambda f: _record(f["missing"], GOOD),
}


def _every_rule(f: dict) -> list[dict]:
    """Records on which every rule fires, each the first record of its video: the box cases as
    regions of one record of VIDEO, the record cases on their own. The sample's records put
    after them are later records of VIDEO and OTHER: duplicates."""
    per_record = ("path_escapes_root", "unknown_video", "duplicate_record", "missing_boxes")
    merged = _record(f["ok"], GOOD)
    for reason in REASONS:
        if reason not in per_record:
            case = CASES[reason](f)
            merged["region_captions"] += case["region_captions"]
            merged["box_infos"] += case["box_infos"]
    cases = [CASES[reason](f) for reason in ("path_escapes_root", "unknown_video")]
    return [merged, *cases, {**CASES["missing_boxes"](f), "video": OTHER}]


def test_every_reason_has_a_case():
    assert set(CASES) == set(REASONS)


@pytest.mark.parametrize("reason", REASONS)
def test_each_reject_reason(
    reason: str, tiny_params: Params, tiny_frames: Path, frames_facts: dict, tmp_path: Path
):
    records = [_record(frames_facts["other_ok"], GOOD, video="Arson002.mp4"), CASES[reason](frames_facts)]
    metrics, out = _run(tiny_params, records, tiny_frames, tmp_path)
    assert (metrics["read"], metrics["accepted"], metrics["rejected"]) == (2, 1, 1)
    assert metrics["by_reason"] == {r: int(r == reason) for r in REASONS}
    (reject,) = pq.read_table(out / "rejects.parquet").to_pylist()
    assert reject["reason"] == reason and reject["record"] == 1
    assert reject["video"] == records[1]["video"]  # as written
    (row,) = _accepted(out)
    assert (row["video"], row["frame"], row["region_caption"]) == (
        OTHER,
        frames_facts["other_ok"],
        "flames burn",
    )
    assert [row[c] for c in ("x1", "y1", "x2", "y2")] == pytest.approx(GOOD)


def test_first_failing_rule_wins(tiny_params: Params, tiny_frames: Path, frames_facts: dict, tmp_path: Path):
    records = [
        _record(frames_facts["n"], [float("nan"), 0.2, 0.5, 0.6]),  # non_finite before keyframe range
        _record(frames_facts["other_ok"], [0.5, 0.2, 0.1, 1.5], video=OTHER),  # out_of_range before inverted
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
        _record(frames_facts["other_ok"], [float("nan"), 0.2, 0.5, 0.6], video=OTHER),
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
    assert sorted(p.name for p in out.iterdir()) == [
        ".fgclip-stage",
        "manifest.json",
        "part-00000.parquet",
        "rejects.parquet",
    ]


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
    records = _every_rule(frames_facts) + json.loads((tiny_sample / "annotations.json").read_text())
    ann = tmp_path / "annotations.json"
    ann.write_text(json.dumps(records))
    whole = validate_boxes(tiny_params, ann, tiny_frames, tmp_path / "whole", tmp_path / "m.json")

    videos = pq.read_table(tiny_frames / "videos.parquet")
    index = pq.read_table(tiny_frames / "index.parquet")
    records, malformed = load_annotations(ann)
    negatives = region_negatives(records, malformed, tiny_params.boxes.hard_negatives)
    raw = raw_boxes(records, malformed, videos, index, negatives.lists)
    assert raw.schema == RAW_BOX_FULL_SCHEMA
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


def test_raw_boxes_without_negatives_still_validate(
    tiny_params: Params, tiny_sample: Path, tiny_frames: Path, tiny_boxes: Path, tmp_path: Path
):
    """Raw-box files written before hard negatives (RAW_BOX_SCHEMA only) stream as before:
    the same boxes, each with no negatives."""
    videos = pq.read_table(tiny_frames / "videos.parquet")
    index = pq.read_table(tiny_frames / "index.parquet")
    raw = raw_boxes(*load_annotations(tiny_sample / "annotations.json"), videos, index)
    old = raw.select(RAW_BOX_SCHEMA.names).to_batches()
    counts = validate_box_batches(old, FrameLookup(videos, index), tiny_params.boxes, tmp_path / "old")
    rows = _accepted(tmp_path / "old")
    assert len(rows) == counts["accepted"] > 0 and all(r["region_negatives"] == [] for r in rows)
    assert _without_negatives(rows) == _without_negatives(_accepted(tiny_boxes))


def test_stream_without_a_column_is_refused(
    tiny_params: Params, tiny_frames: Path, tiny_boxes: Path, tmp_path: Path
):
    lookup = FrameLookup.from_frames_dir(tiny_frames)
    batch = pa.record_batch({"video": ["Arson001.mp4"], "frame": [3]})
    with pytest.raises(
        ValueError, match=r"raw boxes lack columns \['detail', 'duplicate_of', 'global_caption'"
    ):
        validate_box_batches([batch], lookup, tiny_params.boxes, tiny_boxes)
    assert (tiny_boxes / "manifest.json").is_file()  # the previous outputs are untouched
    assert not list(tiny_boxes.parent.glob(f".{tiny_boxes.name}.tmp"))


@pytest.mark.parametrize("spelling", ["Arson001.mp4", "Arson/Arson001_x264.mp4"])
def test_a_second_record_of_a_video_is_rejected_not_mixed(
    spelling: str, tiny_params: Params, tiny_sample: Path, tiny_boxes: Path, tmp_path: Path
):
    """The users' story: a car-crash record appended for the fire video put its caption on the
    fire's boxes (regions are grouped by video and region index). The first record is kept."""
    records = json.loads((tiny_sample / "annotations.json").read_text())
    first = next(k for k, r in enumerate(records) if r["video"] == VIDEO)
    crash = {
        "video": spelling,
        "global_caption": "two cars crash at a crossing",
        "region_captions": ["a red car hits a blue car"],
        "box_infos": [[{"frame": 3, "bbox": GOOD}, {"frame": 5, "bbox": [0.2, 0.2, 0.6, 0.7]}]],
        "timestamps": None,
    }
    metrics, out = _run(tiny_params, [*records, crash], tiny_params.paths.frames, tmp_path)
    assert metrics["by_reason"]["duplicate_record"] == 2  # one reject per box, as for every reason
    rejects = [r for r in pq.read_table(out / "rejects.parquet").to_pylist() if r["record"] == len(records)]
    assert [(r["reason"], r["video"], r["frame"]) for r in rejects] == [
        ("duplicate_record", spelling, 3),
        ("duplicate_record", spelling, 5),
    ]
    assert all(f"record {first}" in r["detail"] and VIDEO in r["detail"] for r in rejects)
    # the fire's captions and boxes as without it (its negatives draw on the crash's words too)
    assert _without_negatives(_accepted(out)) == _without_negatives(_accepted(tiny_boxes))


def test_frames_dir_as_out_is_refused_and_kept(
    tiny_params: Params, tiny_sample: Path, tiny_frames: Path, tmp_path: Path
):
    """`validate-boxes --frames X --out X` deleted the frames it was reading, exit 0."""
    frames = tmp_path / "frames"
    shutil.copytree(tiny_frames, frames)
    before = sorted(p.relative_to(frames) for p in frames.rglob("*"))
    with pytest.raises(OutputDirError, match=r"is, or holds, its own --frames"):
        validate_boxes(tiny_params, tiny_sample / "annotations.json", frames, frames, tmp_path / "m.json")
    assert sorted(p.relative_to(frames) for p in frames.rglob("*")) == before
    assert not (tmp_path / "m.json").exists()


def test_a_foreign_directory_is_refused_and_kept(
    tiny_params: Params, tiny_sample: Path, tiny_frames: Path, tmp_path: Path
):
    out = tmp_path / "results"
    out.mkdir()
    (out / "notes.txt").write_text("mine")
    with pytest.raises(
        OutputDirError, match=r"results is not empty and was not written by the validate_boxes"
    ):
        validate_boxes(tiny_params, tiny_sample / "annotations.json", tiny_frames, out, tmp_path / "m.json")
    assert [p.name for p in out.iterdir()] == ["notes.txt"]
    # the streaming entry point guards it too
    with pytest.raises(OutputDirError):
        validate_box_batches([], FrameLookup.from_frames_dir(tiny_frames), tiny_params.boxes, out)
    assert [p.name for p in out.iterdir()] == ["notes.txt"]
    assert not list(tmp_path.glob(".results.*"))


def test_own_output_is_replaced_and_marked(
    tiny_params: Params, tiny_sample: Path, tiny_frames: Path, tiny_boxes: Path, tmp_path: Path
):
    out = tmp_path / "boxes"
    shutil.copytree(tiny_boxes, out)
    assert owner(out) == "validate_boxes"
    (out / "part-00007.parquet").write_bytes(b"stale shard of an earlier run")
    validate_boxes(tiny_params, tiny_sample / "annotations.json", tiny_frames, out, tmp_path / "m.json")
    assert not (out / "part-00007.parquet").exists() and owner(out) == "validate_boxes"
    assert _accepted(out) == _accepted(tiny_boxes)
    # an output written before markers existed is this stage's own too
    (out / MARKER).unlink()
    validate_boxes(tiny_params, tiny_sample / "annotations.json", tiny_frames, out, tmp_path / "m.json")
    assert owner(out) == "validate_boxes"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["boxes", "m.json"]  # no .tmp / .old left
