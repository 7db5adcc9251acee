"""XD-Violence: labels from file names, the annotation file, and frame ground truth per reference rule.

The reference computations below follow the two ground-truth scripts step by step
with plain Python lists (VadCLIP list/make_gt_xd.py, XDVioDet list/make_gt.py), so
that the vectorised builder is checked against the procedure, not against itself.
"""

from pathlib import Path

import numpy as np
import pytest

from fgclip.data.xd import (
    GT_RULES,
    XD_CLASSES,
    XDFormatError,
    is_normal,
    read_xd_annotations,
    write_mini_xd_sample,
    xd_annotations_by_video,
    xd_frame_ground_truth,
    xd_labels,
    xd_video_key,
)
from fgclip.errors import FGClipError

CLIP = 16


def _mark(vec: list[float], intervals) -> None:
    """``vec[start:end] = 1`` one frame at a time, with the clipping Python slices do."""
    for start, end in intervals:
        frame = start
        while frame < end and frame < len(vec):
            vec[frame] = 1.0
            frame += 1


def vadclip_reference(intervals, num_snippets: int) -> list[int]:
    # make_gt_xd.py: (T + 1) * 16 zeros, mark, keep all but the last 16.
    vec = [0.0] * ((num_snippets + 1) * CLIP)
    _mark(vec, intervals)
    vec = vec[: len(vec) - CLIP]
    return [int(v) for v in vec]


def xdviodet_reference(intervals, num_frames: int) -> list[int]:
    # make_gt.py: N zeros, mark, drop the last frame, then drop (N - 1) % 16 more.
    vec = [0.0] * num_frames
    _mark(vec, intervals)
    mod = (num_frames - 1) % CLIP
    vec = vec[:-1]
    if mod:
        vec = vec[:-mod]
    return [int(v) for v in vec]


# (num_snippets, intervals): edges of a video of T snippets = 16 T frames.
CASES = [
    (5, [(0, 1)]),  # frame 0 only
    (5, [(0, 30)]),  # from frame 0
    (5, [(79, 80)]),  # the last frame only
    (5, [(70, 80)]),  # ends on the last frame
    (5, [(75, 200)]),  # runs past the end
    (5, [(80, 96)]),  # wholly past the end: in the (T + 1)-th snippet VadCLIP allocates, then cuts
    (5, [(500, 900)]),  # far past the end
    (5, [(3, 9), (9, 20), (15, 40), (60, 61)]),  # touching, overlapping, several
    (1, [(0, 16)]),  # a one-snippet video, all violent
    (0, [(0, 10)]),  # no snippets at all
    (7, []),  # a normal video
    (12, [(20, 37), (101, 150), (190, 191)]),  # ragged: ends inside snippets
]


@pytest.mark.parametrize("num_snippets,intervals", CASES)
def test_vadclip_rule_matches_reference(num_snippets, intervals):
    got = xd_frame_ground_truth(intervals, num_snippets, "vadclip")
    assert got.dtype == np.int8
    assert got.shape == (num_snippets * CLIP,)
    assert got.tolist() == vadclip_reference(intervals, num_snippets)


@pytest.mark.parametrize("num_snippets,intervals", CASES)
@pytest.mark.parametrize("tail", [1, 2, 9, 16])  # frames beyond the whole snippets: N = 16 T + tail
def test_xdviodet_rule_matches_reference(num_snippets, intervals, tail):
    num_frames = num_snippets * CLIP + tail
    want = xdviodet_reference(intervals, num_frames)
    got = xd_frame_ground_truth(intervals, None, "xdviodet", num_frames=num_frames)
    assert got.dtype == np.int8
    assert got.tolist() == want
    # N - 1 frames make floor((N - 1) / 16) snippets; the count can be passed as a check.
    whole = (num_frames - 1) // CLIP
    assert len(want) == whole * CLIP
    checked = xd_frame_ground_truth(intervals, whole, "xdviodet", num_frames=num_frames)
    assert checked.tolist() == want


def test_xdviodet_tiny_videos():
    for num_frames in (0, 1, 2, 16, 17, 18):
        want = xdviodet_reference([(0, 5)], num_frames)
        got = xd_frame_ground_truth([(0, 5)], None, "xdviodet", num_frames=num_frames)
        assert got.tolist() == want, num_frames
    assert xd_frame_ground_truth([(0, 5)], None, "xdviodet", num_frames=17).tolist() == [1] * 5 + [0] * 11


def test_rules_agree_when_frame_count_fits_the_snippets():
    """With N = 16 T + r (1 <= r <= 16) frames both rules give the same 16 T labels."""
    rng = np.random.default_rng(7)
    for _ in range(200):
        snippets = int(rng.integers(0, 20))
        frames = snippets * CLIP + int(rng.integers(1, CLIP + 1))
        starts = rng.integers(0, frames + 20, size=int(rng.integers(0, 5)))
        intervals = [(int(s), int(s + rng.integers(1, 60))) for s in starts]
        vad = xd_frame_ground_truth(intervals, snippets, "vadclip")
        xdv = xd_frame_ground_truth(intervals, None, "xdviodet", num_frames=frames)
        assert vad.tolist() == vadclip_reference(intervals, snippets)
        assert vad.tolist() == xdv.tolist()


def test_snippet_len_other_than_16():
    got = xd_frame_ground_truth([(3, 7), (10, 40)], 3, "vadclip", snippet_len=4)
    assert got.tolist() == [0, 0, 0, 1, 1, 1, 1, 0, 0, 0, 1, 1]


@pytest.mark.parametrize(
    "kwargs,match",
    [
        ({"intervals": [(0, 5)], "num_snippets": 3, "rule": "rtfm"}, "unknown .*rule 'rtfm'"),
        ({"intervals": [(0, 5)], "num_snippets": None, "rule": "vadclip"}, "needs num_snippets"),
        ({"intervals": [(0, 5)], "num_snippets": 3, "rule": "vadclip", "num_frames": 60}, "not num_frames"),
        ({"intervals": [(0, 5)], "num_snippets": 3, "rule": "xdviodet"}, "needs num_frames"),
        (
            {"intervals": [(0, 5)], "num_snippets": 4, "rule": "xdviodet", "num_frames": 60},
            "3 snippets .* is 4",
        ),
        ({"intervals": [(5, 5)], "num_snippets": 3, "rule": "vadclip"}, "empty"),
        ({"intervals": [(-1, 5)], "num_snippets": 3, "rule": "vadclip"}, "non-negative"),
        ({"intervals": [(0, 5, 9)], "num_snippets": 3, "rule": "vadclip"}, "pair"),
        ({"intervals": [(0, 5)], "num_snippets": -1, "rule": "vadclip"}, "num_snippets"),
        ({"intervals": [(0, 5)], "num_snippets": 3, "rule": "vadclip", "snippet_len": 0}, "snippet_len"),
    ],
)
def test_ground_truth_rejects_bad_requests(kwargs, match):
    with pytest.raises(XDFormatError, match=match):
        xd_frame_ground_truth(**kwargs)


def test_rule_names():
    assert GT_RULES == ("vadclip", "xdviodet")


def test_classes_are_the_references_label_map():
    assert XD_CLASSES == {
        "A": "normal",
        "B1": "fighting",
        "B2": "shooting",
        "B4": "riot",
        "B5": "abuse",
        "B6": "car accident",
        "G": "explosion",
    }


@pytest.mark.parametrize(
    "name,codes",
    [
        ("Bad.Boys.1995__#01-11-55_01-12-40_label_G-B2-B6", ("G", "B2", "B6")),
        ("Black.Hawk.Down.2001__#01-13-59_01-14-49_label_B2-0-0", ("B2",)),
        ("Bad.Boys.II.2003__#00-06-42_00-10-00_label_B2-G-0", ("B2", "G")),
        ("v=U6MC8JJJZSY__#1_label_G-0-0.mp4", ("G",)),
        ("v=78u9uBJBqIw__#1_label_B4-B5-0", ("B4", "B5")),
        ("Rush.Hour.3.2007.BluRay__#00-04-59_00-05-31_label_B2-0-0", ("B2",)),
        ("/media/x/RGBTest/Casino.Royale.2006__#00-50-05_00-51-16_label_B1-B2-B6__3.npy", ("B1", "B2", "B6")),
        ("C:\\feats\\City.of.God.2002__#00-37-20_00-38-02_label_B5-0-0__0.npy", ("B5",)),
        ("v=uyvM-vq5DwA__#1_label_A", ("A",)),
        ("wangted.2008__#0-27-17_0-28-07_label_A__4.npy", ("A",)),
        ("v=-5RWxUUJ7lQ__#1_label_A.mp4", ("A",)),
        ("x__#1_label_B1-B1-0", ("B1",)),  # a repeated code counts once
    ],
)
def test_labels_from_names(name, codes):
    assert xd_labels(name) == codes
    assert is_normal(name) == (codes == ("A",))


@pytest.mark.parametrize(
    "name,match",
    [
        ("Bad.Boys.1995__#01-11-55_01-12-40", "no '_label_' part"),
        ("v=uyvM-vq5DwA__#1_labelA", "no '_label_' part"),
        ("x__#1_label_", "empty label code"),
        ("x__#1_label_B1--G", "empty label code"),
        ("x__#1_label_B3-0-0", "unknown label code 'B3'"),
        ("x__#1_label_b1-0-0", "unknown label code 'b1'"),
        ("x__#1_label_0-0-0", "only placeholder"),
        ("x__#1_label_A-B1-0", "both normal and violent"),
    ],
)
def test_bad_names(name, match):
    with pytest.raises(XDFormatError, match=match) as info:
        xd_labels(name)
    assert isinstance(info.value, ValueError) and isinstance(info.value, FGClipError)
    assert "\n" not in str(info.value)


def test_video_key():
    assert xd_video_key("/a/b/Bad.Boys.1995__#01-33-51_01-34-37_label_B2-0-0__0.npy") == (
        "Bad.Boys.1995__#01-33-51_01-34-37_label_B2-0-0"
    )
    assert xd_video_key("v=U6MC8JJJZSY__#1_label_G-0-0.mp4") == "v=U6MC8JJJZSY__#1_label_G-0-0"
    assert xd_video_key("v=uyvM-vq5DwA__#1_label_A") == "v=uyvM-vq5DwA__#1_label_A"


# Lines as in the official annotations.txt (single spaces; a few names carry ".mp4").
OFFICIAL_LINES = (
    "v=S-7rRLrxnVQ__#1_label_B4-0-0 0 1517 1970 3038\n"
    "Bad.Boys.1995__#01-11-55_01-12-40_label_G-B2-B6 157 180 185 244 250 360 582 810\n"
    "v=U6MC8JJJZSY__#1_label_G-0-0.mp4 150 779\n"
    "v=BXR3d22BhHs__#00-06-00_00-07-00_label_B4-0-0 1 1425\n"
)


def test_read_annotations(tmp_path: Path):
    f = tmp_path / "annotations.txt"
    f.write_text("\ufeff" + OFFICIAL_LINES.replace("\n", "\r\n", 1) + "\n   \nx__#1_label_B1-0-0  5\t9\n")
    got = read_xd_annotations(f)
    assert got == {
        "v=S-7rRLrxnVQ__#1_label_B4-0-0": ((0, 1517), (1970, 3038)),
        "Bad.Boys.1995__#01-11-55_01-12-40_label_G-B2-B6": ((157, 180), (185, 244), (250, 360), (582, 810)),
        "v=U6MC8JJJZSY__#1_label_G-0-0.mp4": ((150, 779),),
        "v=BXR3d22BhHs__#00-06-00_00-07-00_label_B4-0-0": ((1, 1425),),
        "x__#1_label_B1-0-0": ((5, 9),),
    }
    by_video = xd_annotations_by_video(got)
    assert by_video["v=U6MC8JJJZSY__#1_label_G-0-0"] == ((150, 779),)
    assert len(by_video) == len(got)


def test_read_annotations_keeps_overlaps_and_order(tmp_path: Path):
    f = tmp_path / "annotations.txt"
    f.write_text("x__#1_label_G-0-0 50 60 10 55\n")
    assert read_xd_annotations(f) == {"x__#1_label_G-0-0": ((50, 60), (10, 55))}


@pytest.mark.parametrize(
    "line,match",
    [
        ("x__#1_label_B1-0-0 5 9 12", "3 frame numbers do not pair up"),
        ("x__#1_label_B1-0-0 5 9.5", "'9.5' is not a non-negative integer"),
        ("x__#1_label_B1-0-0 5 -9", "'-9' is not a non-negative integer"),
        ("x__#1_label_B1-0-0 five 9", "'five' is not"),
        ("x__#1_label_B1-0-0 9 9", "interval 9 9 is empty"),
        ("x__#1_label_B1-0-0 9 5", "interval 9 5 is empty"),
        ("x__#1_label_B1-0-0", "lists no interval"),
        ("x__#1_label_A 0 10", "normal video"),
        ("x__#1 0 10", "no '_label_' part"),
        ("x__#1_label_B9-0-0 0 10", "unknown label code 'B9'"),
        ("v=U6MC8JJJZSY__#1_label_G-0-0 1 2", "annotated twice \\(first on line 3\\)"),
        ("Bad.Boys.1995__#01-11-55_01-12-40_label_G-B2-B6 1 2", "annotated twice \\(first on line 2\\)"),
    ],
)
def test_read_annotations_bad_line_names_file_and_line(tmp_path: Path, line, match):
    f = tmp_path / "annotations.txt"
    f.write_text(OFFICIAL_LINES + "\n" + line + "\n")  # the bad line is line 6
    with pytest.raises(XDFormatError, match=match) as info:
        read_xd_annotations(f)
    assert str(info.value).startswith(f"{f}:6: ")
    assert "\n" not in str(info.value)


def test_read_annotations_unreadable(tmp_path: Path):
    with pytest.raises(XDFormatError, match="cannot read"):
        read_xd_annotations(tmp_path / "missing.txt")
    bad = tmp_path / "latin1.txt"
    bad.write_bytes(b"caf\xe9__#1_label_B1-0-0 0 5\n")
    with pytest.raises(XDFormatError, match="cannot read"):
        read_xd_annotations(bad)


def test_mini_sample(tmp_path: Path):
    sample = write_mini_xd_sample(tmp_path / "xd", seed=3)
    ann = read_xd_annotations(sample["annotations"])
    assert sample["annotations"].name == "annotations.txt"
    assert len(ann) == 6 and any(name.endswith(".mp4") for name in ann)
    by_video = xd_annotations_by_video(ann)
    assert sorted(by_video) == sample["violent"]
    normal = sample["normal_list"].read_text().split()
    assert sorted(normal) == sample["normal"] and len(normal) == 6
    assert all(is_normal(n) for n in normal) and not any(is_normal(v) for v in sample["violent"])
    assert sample["test_list"].read_text().split() == sample["videos"] == sample["violent"] + sample["normal"]
    assert set(sample["num_snippets"]) == set(sample["videos"])
    assert {c for v in sample["violent"] for c in sample["labels"][v]} == set(XD_CLASSES) - {"A"}
    edges = {"at 0": False, "last frame": False, "past end": False, "wholly past": False, "several": False}
    for name in sample["videos"]:
        t = sample["num_snippets"][name]
        spans = sample["intervals"][name]
        assert by_video.get(name, ()) == spans
        gt = xd_frame_ground_truth(spans, t, "vadclip")
        assert gt.tolist() == vadclip_reference(spans, t)
        assert gt.any() == (name in by_video)  # every violent video keeps violent frames after the cut
        frames = t * CLIP
        edges["at 0"] |= any(s == 0 for s, _ in spans)
        edges["last frame"] |= any(s < frames <= e for s, e in spans)
        edges["past end"] |= any(s < frames < e for s, e in spans)
        edges["wholly past"] |= any(s >= frames for s, _ in spans)
        edges["several"] |= len(spans) > 2
    assert all(edges.values()), edges


def test_mini_sample_depends_on_seed_only(tmp_path: Path):
    a = write_mini_xd_sample(tmp_path / "a", seed=11)
    b = write_mini_xd_sample(tmp_path / "b", seed=11)
    c = write_mini_xd_sample(tmp_path / "c", seed=12)
    assert a["annotations"].read_text() == b["annotations"].read_text()
    assert a["num_snippets"] == b["num_snippets"]
    assert (a["num_snippets"], a["intervals"]) != (c["num_snippets"], c["intervals"])
