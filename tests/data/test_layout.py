"""Stage contracts: the readers check what they read and name the file and the stage to run."""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
import pytest

from fgclip.data.dataset import read_boxes, read_train_frames
from fgclip.data.layout import (
    ACCEPTED_SCHEMA,
    FAILURES_SCHEMA,
    INDEX_FILE,
    INDEX_SCHEMA,
    MANIFEST_FILE,
    REJECTS_SCHEMA,
    VIDEOS_SCHEMA,
    DatasetError,
    check_inside,
    read_box_shards,
    read_failures,
    read_frame_index,
    read_rejects,
    read_videos,
    shard_name,
)
from fgclip.eval.protocol import EvalInputError

ESCAPING = ["../x.jpg", "a/../../x", "/abs", "..\\x.jpg", "C:/x.jpg", "./../x.jpg"]


def test_dotted_names_stay_inside_and_escapes_do_not():
    check_inside(pa.array(["a..b.jpg", "images/a..b/000001.jpg", "images/x.jpg"]), Path("index"))
    for path in ESCAPING:
        with pytest.raises(DatasetError, match=re.escape(f"index: frame path {path!r} points outside")):
            check_inside(pa.chunked_array([["images/ok.jpg", path]]), Path("index"))


def _frames_with_paths(src: Path, dst: Path, path: str) -> Path:
    """A copy of the tiny frames dir whose train frames all point at ``path``."""
    dst.mkdir()
    for name in ("videos.parquet", INDEX_FILE):
        shutil.copy(src / name, dst / name)
    index = pq.read_table(dst / INDEX_FILE)
    paths = pc.if_else(pc.equal(index["purpose"], "train"), path, index["path"])
    pq.write_table(index.set_column(index.column_names.index("path"), "path", paths), dst / INDEX_FILE)
    return dst


def test_frame_readers_accept_dotted_names_and_refuse_escapes(tiny_frames: Path, tmp_path: Path):
    dotted = _frames_with_paths(tiny_frames, tmp_path / "dotted", "images/a..b.jpg")
    assert set(read_train_frames(dotted, "train")["path"].to_pylist()) == {"images/a..b.jpg"}
    for k, path in enumerate(ESCAPING[:3]):
        frames = _frames_with_paths(tiny_frames, tmp_path / f"escape{k}", path)
        with pytest.raises(DatasetError, match="points outside the frames directory"):
            read_train_frames(frames, "train")
        with pytest.raises(EvalInputError, match="points outside"):
            read_frame_index(frames, ["path"], purpose="train", error=EvalInputError)
        # Rows that are not read are not judged: the eval frames are all inside.
        assert read_frame_index(frames, ["path"], purpose="eval").num_rows > 0


def test_box_readers_check_frame_paths_and_shard_names(tiny_boxes: Path, tmp_path: Path):
    boxes = tmp_path / "boxes"
    shutil.copytree(tiny_boxes, boxes)
    manifest = json.loads((boxes / MANIFEST_FILE).read_text())
    shard = boxes / manifest["shards"][0]["path"]
    table = pq.read_table(shard)
    bad = pc.if_else(pc.equal(table["split"], "test"), "../../etc/passwd", table["frame_path"])
    pq.write_table(table.set_column(table.column_names.index("frame_path"), "frame_path", bad), shard)
    assert read_boxes(boxes, "train").num_rows > 0  # only the rows read are judged
    with pytest.raises(
        DatasetError, match=r"manifest\.json: frame path '\.\./\.\./etc/passwd' points outside"
    ):
        read_boxes(boxes, "test")

    manifest["shards"][0]["path"] = "../elsewhere.parquet"
    (boxes / MANIFEST_FILE).write_text(json.dumps(manifest))
    with pytest.raises(DatasetError, match=r"shard path '\.\./elsewhere\.parquet' points outside"):
        read_box_shards(boxes)


def test_readers_return_the_stage_schemas(tiny_frames: Path, tiny_boxes: Path):
    assert read_frame_index(tiny_frames).schema.remove_metadata() == INDEX_SCHEMA
    assert read_videos(tiny_frames).schema.remove_metadata() == VIDEOS_SCHEMA
    assert read_failures(tiny_frames).schema.remove_metadata() == FAILURES_SCHEMA
    shards = read_box_shards(tiny_boxes)
    assert shards.schema.remove_metadata() == ACCEPTED_SCHEMA
    assert shards.num_rows == json.loads((tiny_boxes / MANIFEST_FILE).read_text())["rows"]
    assert read_rejects(tiny_boxes).schema.remove_metadata() == REJECTS_SCHEMA
    # Only the columns asked for, in that order, even when a filter needs another one.
    test_rows = read_box_shards(tiny_boxes, ["frame", "video"], split="test")
    assert test_rows.column_names == ["frame", "video"] and 0 < test_rows.num_rows < shards.num_rows
    assert shard_name(3) == "part-00003.parquet"


def test_missing_outputs_name_the_file_and_the_stage(tiny_frames: Path, tmp_path: Path):
    missing = re.escape(f"{tmp_path / INDEX_FILE}: not found (run the extract_frames stage)")
    with pytest.raises(DatasetError, match=missing):
        read_frame_index(tmp_path)
    with pytest.raises(EvalInputError, match=r"videos\.parquet: not found \(run the extract_frames stage\)"):
        read_videos(tmp_path, error=EvalInputError)
    with pytest.raises(DatasetError, match=r"manifest\.json: not found \(run the validate_boxes stage\)"):
        read_box_shards(tmp_path)
    with pytest.raises(DatasetError, match=r"rejects\.parquet: not found \(run the validate_boxes stage\)"):
        read_rejects(tmp_path)
    assert read_failures(tmp_path, ["reason"], missing_ok=True).column_names == ["reason"]
    with pytest.raises(DatasetError, match=r"index\.parquet: missing column\(s\) \['nope'\] \(re-run the"):
        read_frame_index(tiny_frames, ["video", "nope"])
    (tmp_path / MANIFEST_FILE).write_text('{"shards": []}')
    with pytest.raises(DatasetError, match="lists no shards"):
        read_box_shards(tmp_path)
    (tmp_path / MANIFEST_FILE).write_text("[1]")
    with pytest.raises(DatasetError, match="not a valid shard manifest"):
        read_box_shards(tmp_path)


def test_filter_columns_and_null_paths_are_reported_not_raised_raw(tiny_frames: Path, tmp_path: Path):
    """A filter's column must exist even when every column is read; a null path is no path."""
    frames = tmp_path / "frames"
    shutil.copytree(tiny_frames, frames)
    index = pq.read_table(frames / INDEX_FILE)
    pq.write_table(index.drop_columns(["split"]), frames / INDEX_FILE)
    with pytest.raises(DatasetError, match=r"missing column\(s\) \['split'\]"):
        read_frame_index(frames, split="train")
    with pytest.raises(DatasetError, match=r"failures\.parquet: missing column\(s\) \['nope'\]"):
        read_failures(tmp_path, ["nope"], missing_ok=True)
    paths = index["path"].to_pylist()
    paths[0] = None
    pq.write_table(
        index.set_column(index.column_names.index("path"), "path", pa.array(paths)), frames / INDEX_FILE
    )
    with pytest.raises(DatasetError, match=r"1 frame path\(s\) are null"):
        read_frame_index(frames)
