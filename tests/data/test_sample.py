"""The synthetic UCF-Crime-style sample: determinism, layout, formats, content."""

import json
import math
import re
from pathlib import Path

import av
import numpy as np
import pytest

from fgclip.config import Params
from fgclip.data.sample import BAD_BOX_KINDS, PALETTE, generate_sample
from fgclip.data.ucf import read_split, read_temporal_annotations, video_label


def _decode(path: Path) -> np.ndarray:
    with av.open(str(path)) as c:
        return np.stack([f.to_ndarray(format="rgb24") for f in c.decode(video=0)])


def _annotations(root: Path) -> dict[str, dict]:
    return {r["video"]: r for r in json.loads((root / "annotations.json").read_text())}


def _ids(params: Params, root: Path) -> dict[str, list[str]]:
    return {s: read_split(root / getattr(params.data, f"{s}_split")) for s in ("train", "test")}


def test_deterministic_from_seed(tiny_params: Params, tiny_sample: Path, tmp_path: Path):
    again = tmp_path / "again"
    generate_sample(tiny_params.sample, tiny_params.data, again)
    generate_sample(tiny_params.sample, tiny_params.data, again)  # a rerun over its own output is allowed
    for name in (
        "annotations.json",
        "Anomaly_Train.txt",
        "Anomaly_Test.txt",
        "Temporal_Anomaly_Annotation_for_Testing_Videos.txt",
    ):
        assert (again / name).read_bytes() == (tiny_sample / name).read_bytes(), name
    videos = sorted(p.relative_to(tiny_sample) for p in tiny_sample.rglob("*.mp4"))
    assert videos == sorted(p.relative_to(again) for p in again.rglob("*.mp4"))
    for rel in videos:
        assert np.array_equal(_decode(tiny_sample / rel), _decode(again / rel)), rel

    other = tmp_path / "other"
    generate_sample(tiny_params.sample.model_copy(update={"seed": 1}), tiny_params.data, other)
    assert (other / "annotations.json").read_bytes() != (tiny_sample / "annotations.json").read_bytes()


def test_layout_and_counts(tiny_params: Params, tiny_sample: Path):
    cfg = tiny_params.sample
    ids = _ids(tiny_params, tiny_sample)
    expected = {
        s: {c: n for c in cfg.anomaly_classes} | {"Normal": m}
        for s, n, m in (
            ("train", cfg.train_per_class, cfg.train_normal),
            ("test", cfg.test_per_class, cfg.test_normal),
        )
    }
    for split, vids in ids.items():
        labels = [video_label(v) for v in vids]
        assert {c: labels.count(c) for c in set(labels)} == expected[split]
    assert not set(ids["train"]) & set(ids["test"])
    on_disk = {p.relative_to(tiny_sample / "videos").as_posix() for p in tiny_sample.rglob("*.mp4")}
    assert on_disk == set(ids["train"]) | set(ids["test"])
    assert all(
        re.fullmatch(r"Training_Normal_Videos_Anomaly/Normal_Videos\d{3}_x264\.mp4", v)
        for v in ids["train"]
        if video_label(v) == "Normal"
    )
    assert all(
        re.fullmatch(r"Testing_Normal_Videos_Anomaly/Normal_Videos_\d{3}_x264\.mp4", v)
        for v in ids["test"]
        if video_label(v) == "Normal"
    )
    assert all(
        re.fullmatch(rf"{video_label(v)}/{video_label(v)}\d{{3}}_x264\.mp4", v)
        for v in ids["train"] + ids["test"]
        if video_label(v) != "Normal"
    )
    assert set(_annotations(tiny_sample)) == on_disk  # train AND test videos annotated


def test_videos_are_h264_with_ragged_lengths(tiny_params: Params, tiny_sample: Path):
    cfg = tiny_params.sample
    lengths = []
    for path in sorted(tiny_sample.rglob("*.mp4")):
        with av.open(str(path)) as c:
            s = c.streams.video[0]
            assert (s.codec_context.name, s.codec_context.pix_fmt) == ("h264", "yuv420p")
            assert (s.codec_context.width, s.codec_context.height) == (cfg.width, cfg.height)
            assert float(s.average_rate) == cfg.fps
            n = sum(1 for _ in c.decode(video=0))
        assert s.frames == n
        assert cfg.min_video_frames <= n <= cfg.max_video_frames
        lengths.append(n)
    assert any(n % 16 for n in lengths)


def test_temporal_annotation_file(tiny_params: Params, tiny_sample: Path):
    path = tiny_sample / tiny_params.data.temporal_annotations
    lines = path.read_text().splitlines()
    # The official layout: two-space fields and two trailing spaces (VadCLIP's parser needs them).
    assert all(re.fullmatch(r"\S+  \S+  -?\d+  -?\d+  -?\d+  -?\d+  ", line) for line in lines)
    temporal = read_temporal_annotations(path)
    test_ids = _ids(tiny_params, tiny_sample)["test"]
    assert sorted(temporal) == sorted(v.rsplit("/", 1)[1] for v in test_ids)
    for vid in test_ids:
        ann = temporal[vid.rsplit("/", 1)[1]]
        assert ann.label == video_label(vid)
        n = len(_decode(tiny_sample / "videos" / vid))
        if ann.label == "Normal":
            assert ann.intervals == ()
        else:
            assert 1 <= len(ann.intervals) <= 2
            assert all(0 <= s <= e < n for s, e in ann.intervals)


def _is_bad(kf: dict, n: int) -> bool:
    x1, y1, x2, y2 = kf["bbox"]
    if not all(math.isfinite(v) for v in kf["bbox"]):
        return True
    return (
        min(kf["bbox"]) < 0
        or max(kf["bbox"]) > 1
        or x1 >= x2
        or y1 >= y2
        or (x2 - x1) * (y2 - y1) < 0.005
        or kf["frame"] >= n
    )


def test_annotations_boxes_and_planted_bad_boxes(tiny_params: Params, tiny_sample: Path):
    ids = _ids(tiny_params, tiny_sample)
    temporal = read_temporal_annotations(tiny_sample / tiny_params.data.temporal_annotations)
    bad = 0
    for vid, rec in _annotations(tiny_sample).items():
        n = len(_decode(tiny_sample / "videos" / vid))
        assert 1 <= len(rec["region_captions"]) <= 4 and all(rec["region_captions"])
        if video_label(vid) == "Normal":
            assert rec["box_infos"] == []
            start, end = rec["timestamps"]
            assert 0 <= start < end <= (n - 1) / tiny_params.sample.fps
            assert end - start >= 0.7 * (n - 1) / tiny_params.sample.fps  # covers most of the video
            continue
        assert rec["timestamps"] is None and len(rec["box_infos"]) == len(rec["region_captions"])
        for region in rec["box_infos"]:
            good = [kf for kf in region if not _is_bad(kf, n)]
            assert 1 <= len(good) <= 3  # keyframes of the first interval, plus one in a second
            bad += len(region) - len(good)
            if vid in ids["test"]:
                intervals = temporal[vid.rsplit("/", 1)[1]].intervals
                assert all(any(s <= kf["frame"] <= e for s, e in intervals) for kf in good)
        if vid in ids["test"]:
            assert all(not _is_bad(kf, n) for region in rec["box_infos"] for kf in region)
    assert bad == len(BAD_BOX_KINDS)


def test_captions_use_prompt_vocabulary(tiny_params: Params, tiny_sample: Path):
    vocab = {
        label: {w for p in prompts for w in p.split() if len(w) > 3}
        for label, prompts in tiny_params.evaluate.prompts.items()
    }
    for vid, rec in _annotations(tiny_sample).items():
        words = set(rec["global_caption"].split())
        assert words & vocab[video_label(vid)], (vid, rec["global_caption"])


def _color_fraction(patch: np.ndarray, color: tuple[int, int, int]) -> float:
    return float((np.abs(patch.astype(int) - color).max(axis=-1) < 60).mean())


def test_region_captions_name_the_colour_in_the_box(tiny_params: Params, tiny_sample: Path):
    checked = 0
    for vid, rec in _annotations(tiny_sample).items():
        if video_label(vid) != "RoadAccidents":
            continue
        frames = _decode(tiny_sample / "videos" / vid)
        h, w = frames.shape[1:3]
        color = next(c for c in PALETTE if c in rec["region_captions"][0].split())  # "the red car"
        kf = rec["box_infos"][0][0]
        x1, y1, x2, y2 = kf["bbox"]
        patch = frames[kf["frame"], int(y1 * h) : math.ceil(y2 * h), int(x1 * w) : math.ceil(x2 * w)]
        assert _color_fraction(patch, PALETTE[color]) > 0.3, (vid, color)
        checked += 1
    assert checked > 0


def test_event_only_inside_its_intervals(tiny_params: Params, tiny_sample: Path):
    """Arson: flames (orange) fill part of the frame late in each interval and never outside."""
    temporal = read_temporal_annotations(tiny_sample / tiny_params.data.temporal_annotations)
    checked = 0
    for vid in _ids(tiny_params, tiny_sample)["test"]:
        if video_label(vid) != "Arson":
            continue
        frames = _decode(tiny_sample / "videos" / vid).astype(int)
        r, g, b = frames[..., 0], frames[..., 1], frames[..., 2]
        orange = ((r > 200) & (g > 60) & (g < 200) & (b < 80)).sum(axis=(1, 2))
        inside = np.zeros(len(frames), bool)
        for s, e in temporal[vid.rsplit("/", 1)[1]].intervals:
            inside[s : e + 1] = True
            assert orange[s + (e - s) * 3 // 4] > 30
        assert orange[~inside].max(initial=0) <= 3
        checked += 1
    assert checked > 0


def test_refuses_to_overwrite_a_foreign_dataset(tiny_params: Params, tmp_path: Path):
    (tmp_path / "videos" / "Arson").mkdir(parents=True)
    (tmp_path / "videos" / "Arson" / "Arson001_x264.mp4").write_bytes(b"real data")
    with pytest.raises(FileExistsError, match="refusing to overwrite"):
        generate_sample(tiny_params.sample, tiny_params.data, tmp_path)
    assert (tmp_path / "videos" / "Arson" / "Arson001_x264.mp4").read_bytes() == b"real data"


@pytest.mark.parametrize(
    "update,match",
    [
        ({"width": 97}, "must be even"),
        ({"anomaly_classes": ["Arson", "Shoplifting"]}, "no renderer for \\['Shoplifting'\\]"),
    ],
)
def test_bad_config(tiny_params: Params, tmp_path: Path, update: dict, match: str):
    with pytest.raises(ValueError, match=match):
        generate_sample(tiny_params.sample.model_copy(update=update), tiny_params.data, tmp_path)


def test_summary(tiny_params: Params, tmp_path: Path):
    cfg = tiny_params.sample.model_copy(update={"bad_boxes": False})
    summary = generate_sample(cfg, tiny_params.data, tmp_path)
    assert summary["bad_boxes"] == 0
    assert summary["by_split"]["train"] == {"Arson": 2, "RoadAccidents": 2, "Normal": 2}
    assert summary["videos"] == 12
    marker = json.loads((tmp_path / "sample.json").read_text())
    assert marker["videos"] == 12
    # Part of the DVC output: nothing in it may depend on the machine or the clone's path.
    assert "root" not in marker and "seconds" not in marker


def test_region_paraphrases_switch_only_changes_region_wording(
    tiny_params: Params, tiny_sample: Path, tmp_path: Path
):
    """Off (default): one wording per concept. On: random paraphrases; everything else identical."""
    from fgclip.data.sample import REGION_CAPTIONS

    firsts = [re.compile(re.sub(r"\{[ab]\}", r"\\w+", opts[0])) for opts in REGION_CAPTIONS.values()]
    plain = _annotations(tiny_sample)
    assert not tiny_params.sample.region_paraphrases
    for rec in plain.values():
        for caption in rec["region_captions"]:
            assert any(f.fullmatch(caption) for f in firsts), caption

    root = tmp_path / "paraphrased"
    generate_sample(
        tiny_params.sample.model_copy(update={"region_paraphrases": True}), tiny_params.data, root
    )
    varied = _annotations(root)
    assert varied.keys() == plain.keys()
    changed = 0
    for vid, rec in varied.items():
        assert rec["global_caption"] == plain[vid]["global_caption"]
        assert rec["box_infos"] == plain[vid]["box_infos"] and rec["timestamps"] == plain[vid]["timestamps"]
        changed += rec["region_captions"] != plain[vid]["region_captions"]
    assert changed > 0
