"""The users' region annotation format: typed records, malformed parts as rejects."""

import json
import math
from pathlib import Path

import pytest

from fgclip.data.annotations import AnnotationFileError, Keyframe, load_annotations

GOOD = {
    "video": "Abuse001.mp4",
    "global_caption": "a man attacks a woman inside a shop",
    "region_captions": ["a man pulls the woman's red bag", "another man hits her"],
    "box_infos": [
        [{"frame": 192, "bbox": [0.10, 0.35, 0.61, 0.92]}],
        [{"frame": 816.0, "bbox": [0.09, 0.39, 0.58, 0.88]}],
    ],
    "timestamps": None,
}
NORMAL = {
    "video": "Normal_Videos001_x264.mp4",
    "global_caption": "people walk",
    "region_captions": ["a person walks"],
    "box_infos": [],
    "timestamps": [1.5, 9],
}


def _write(tmp_path: Path, data, name: str = "annotations.json") -> Path:
    path = tmp_path / name
    path.write_text(data if isinstance(data, str) else json.dumps(data))
    return path


def test_load_typed_records(tmp_path: Path):
    records, bad = load_annotations(_write(tmp_path, [GOOD, NORMAL]))
    assert bad == []
    abuse, normal = records
    assert abuse.index == 0 and abuse.video == "Abuse001.mp4"
    assert abuse.region_captions == ("a man pulls the woman's red bag", "another man hits her")
    assert abuse.box_infos[1] == (Keyframe(816, (0.09, 0.39, 0.58, 0.88)),)
    assert isinstance(abuse.box_infos[1][0].frame, int)
    assert abuse.timestamps is None
    assert normal.box_infos == () and normal.timestamps == (1.5, 9.0)


def test_nan_token_is_kept_for_validation(tmp_path: Path):
    text = json.dumps([GOOD]).replace("0.61", "NaN")
    records, bad = load_annotations(_write(tmp_path, text))
    assert bad == []
    assert math.isnan(records[0].box_infos[0][0].bbox[2])


@pytest.mark.parametrize(
    "entry,detail",
    [
        ("just a string", "not an object"),
        ({k: v for k, v in GOOD.items() if k != "region_captions"}, "missing keys"),
        ({**GOOD, "video": 7}, "'video'"),
        ({**GOOD, "global_caption": None}, "'global_caption'"),
        ({**GOOD, "region_captions": ["ok", 3]}, "'region_captions'"),
        ({**GOOD, "box_infos": {"frame": 1}}, "'box_infos'"),
        ({**GOOD, "box_infos": GOOD["box_infos"][:1]}, "1 box_infos lists for 2 region_captions"),
        ({**GOOD, "timestamps": [3, 1]}, "'timestamps'"),
        ({**GOOD, "timestamps": "0-3"}, "'timestamps'"),
    ],
)
def test_malformed_records_are_rejects(tmp_path: Path, entry, detail: str):
    records, bad = load_annotations(_write(tmp_path, [NORMAL, entry]))
    assert [r.video for r in records] == [NORMAL["video"]]
    assert len(bad) == 1
    assert bad[0].index == 1 and bad[0].region is None and detail in bad[0].detail
    assert json.loads(bad[0].raw) == entry


@pytest.mark.parametrize(
    "keyframe,detail",
    [
        ({"frame": 3, "bbox": [0.1, 0.2, 0.3]}, "not 4 numbers"),
        ({"frame": 3, "bbox": [0.1, 0.2, 0.3, "0.4"]}, "not 4 numbers"),
        ({"frame": 3, "bbox": [0.1, 0.2, 0.3, True]}, "not 4 numbers"),
        ({"frame": 3.5, "bbox": [0.1, 0.2, 0.3, 0.4]}, "not an integer"),
        ({"frame": "3", "bbox": [0.1, 0.2, 0.3, 0.4]}, "not an integer"),
        ({"bbox": [0.1, 0.2, 0.3, 0.4]}, "'frame' and 'bbox'"),
        ([3, [0.1, 0.2, 0.3, 0.4]], "'frame' and 'bbox'"),
    ],
)
def test_malformed_keyframe_drops_only_that_keyframe(tmp_path: Path, keyframe, detail: str):
    entry = {**GOOD, "box_infos": [GOOD["box_infos"][0] + [keyframe], GOOD["box_infos"][1]]}
    records, bad = load_annotations(_write(tmp_path, [entry]))
    assert len(records) == 1
    assert [len(r) for r in records[0].box_infos] == [1, 1]  # the good keyframes survive
    assert len(bad) == 1
    assert (bad[0].index, bad[0].region, bad[0].keyframe, bad[0].video) == (0, 0, 1, "Abuse001.mp4")
    assert detail in bad[0].detail


@pytest.mark.parametrize(
    "content,match",
    [
        ('{"video": "a.mp4"}', "expected a JSON list"),
        ("[{", "not valid JSON"),
        (b"\xff\xfe[]", "not valid JSON"),
    ],
)
def test_unreadable_file_is_a_clear_error(tmp_path: Path, content, match: str):
    path = tmp_path / "ann.json"
    path.write_bytes(content if isinstance(content, bytes) else content.encode())
    with pytest.raises(AnnotationFileError, match=rf"ann\.json: {match}"):
        load_annotations(path)


def test_missing_file_names_it(tmp_path: Path):
    with pytest.raises(AnnotationFileError, match="missing.json"):
        load_annotations(tmp_path / "missing.json")


def test_given_negatives_are_parsed(tmp_path: Path):
    given = [["a man pulls the woman's blue bag", "a woman pulls the man's red bag"], None]
    records, bad = load_annotations(_write(tmp_path, [{**GOOD, "region_negatives": given}, NORMAL]))
    assert bad == []
    abuse, normal = records
    assert abuse.region_negatives == (tuple(given[0]), ())
    assert normal.region_negatives is None  # the key is optional
    # a list of empty or null entries gives nothing: as if the key were absent
    records, bad = load_annotations(_write(tmp_path, [{**GOOD, "region_negatives": [[], None]}]))
    assert bad == [] and records[0].region_negatives is None


@pytest.mark.parametrize(
    "negatives,region,detail,kept",
    [
        ("not a list", None, "must be a list of 2 lists (one per region_caption), got a str", None),
        ([["x"]], None, "got 1 entries", None),
        ([["a woman hits her"], "a man hits her"], 1, "'region_negatives'[1] must be a list of strings", 0),
        ([["a woman hits her", 3], ["ok"]], 0, "'region_negatives'[0] must be a list of strings", 1),
    ],
)
def test_malformed_negatives_keep_the_record(tmp_path: Path, negatives, region, detail: str, kept):
    records, bad = load_annotations(_write(tmp_path, [{**GOOD, "region_negatives": negatives}]))
    (record,) = records  # the record, its captions and boxes survive
    assert record.region_captions == tuple(GOOD["region_captions"])
    assert [len(r) for r in record.box_infos] == [1, 1]
    (m,) = bad
    assert (m.index, m.video, m.region, m.keyframe) == (0, "Abuse001.mp4", region, None)
    assert m.key == "region_negatives"
    assert detail in m.detail
    assert json.loads(m.raw) == (negatives if region is None else negatives[region])
    if kept is None:
        assert record.region_negatives is None
    else:  # only the bad region's entry is dropped
        assert record.region_negatives[region] == ()
        assert record.region_negatives[kept] == tuple(negatives[kept])
