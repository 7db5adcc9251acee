"""UCF-Crime layout: names, labels, split files, temporal annotations, video-field resolution."""

import itertools
import os
import re
from pathlib import Path

import pyarrow as pa
import pytest

from fgclip.data.ucf import (
    BAD_SPLIT_LINE,
    PATH_ESCAPES_ROOT,
    UNKNOWN_VIDEO,
    DatasetFormatError,
    VideoResolver,
    escapes_root,
    escapes_root_array,
    format_temporal_line,
    parse_split,
    read_split,
    read_temporal_annotations,
    resolves_outside,
    video_id,
    video_label,
)


def test_video_id_naming_quirk():
    assert video_id("Arson", 3, "train") == "Arson/Arson003_x264.mp4"
    assert video_id("Normal", 1, "train") == "Training_Normal_Videos_Anomaly/Normal_Videos001_x264.mp4"
    assert video_id("Normal", 3, "test") == "Testing_Normal_Videos_Anomaly/Normal_Videos_003_x264.mp4"
    with pytest.raises(ValueError):
        video_id("Normal", 1, "val")


def test_video_label():
    assert video_label("Arson/Arson003_x264.mp4") == "Arson"
    assert video_label("Training_Normal_Videos_Anomaly/Normal_Videos001_x264.mp4") == "Normal"
    assert video_label("Testing_Normal_Videos_Anomaly/Normal_Videos_003_x264.mp4") == "Normal"
    with pytest.raises(ValueError, match="no class folder"):
        video_label("Arson003_x264.mp4")


def test_read_split_normalises(tmp_path: Path):
    f = tmp_path / "Anomaly_Train.txt"
    f.write_text("Arson\\Arson001_x264.mp4\n\n  ./Abuse/Abuse001_x264.mp4  \r\n\n")
    assert read_split(f) == ["Arson/Arson001_x264.mp4", "Abuse/Abuse001_x264.mp4"]


@pytest.mark.parametrize(
    "line,code,match",
    [
        (b"../secret/x.mp4", PATH_ESCAPES_ROOT, "escapes"),
        (b"/etc/passwd", PATH_ESCAPES_ROOT, "escapes"),
        (b"C:\\videos\\a.mp4", PATH_ESCAPES_ROOT, "escapes"),
        (b"Arson001_x264.mp4", BAD_SPLIT_LINE, "no class folder"),
        (b"Arson/Arson0\x0002_x264.mp4", BAD_SPLIT_LINE, "NUL byte"),
        (b"Arson/Arson\xe902_x264.mp4", BAD_SPLIT_LINE, r"not UTF-8 text: b'Arson/Arson\\xe902_x264.mp4'"),
        (b"Arson/Arson003_x264.mp4", BAD_SPLIT_LINE, "listed twice .*line 1"),
    ],
)
def test_read_split_skips_bad_lines_with_their_reason(
    tmp_path: Path, caplog: pytest.LogCaptureFixture, line: bytes, code: str, match: str
):
    """One bad line costs its own entry, not the split: the lines before and after it are read."""
    f = tmp_path / "split.txt"
    f.write_bytes(b"Arson/Arson003_x264.mp4\n" + line + b"\nArson/Arson001_x264.mp4\n")
    ids, bad = parse_split(f)
    assert ids == ["Arson/Arson003_x264.mp4", "Arson/Arson001_x264.mp4"]
    assert [b.where for b in bad] == ["split.txt:2"]
    assert re.fullmatch(rf"{code}: {re.escape(str(f))}:2: .*{match}.*", bad[0].reason), bad[0].reason
    with caplog.at_level("WARNING", logger="fgclip.data.ucf"):
        assert read_split(f) == ids
    assert [r.getMessage() for r in caplog.records] == [f"{bad[0].reason} (line skipped)"]


def test_read_split_byte_order_mark_and_missing_file(tmp_path: Path):
    f = tmp_path / "split.txt"
    f.write_text("A/A001_x264.mp4\n", encoding="utf-8-sig")  # as Windows Notepad saves
    assert parse_split(f) == (["A/A001_x264.mp4"], [])
    with pytest.raises(DatasetFormatError, match="nope.txt"):
        read_split(tmp_path / "nope.txt")


def test_temporal_annotations_parse_any_whitespace(tmp_path: Path):
    f = tmp_path / "t.txt"
    f.write_text(
        "Arson011_x264.mp4  Arson  150  420  680  1267\n"
        "Normal_Videos_003_x264.mp4\tNormal -1   -1  -1  -1\n"
        "\n"
        "Explosion002_x264.mp4  Explosion  10  20  -1  -1\n"
    )
    ann = read_temporal_annotations(f)
    assert ann["Arson011_x264.mp4"].intervals == ((150, 420), (680, 1267))
    assert ann["Arson011_x264.mp4"].label == "Arson"
    assert ann["Normal_Videos_003_x264.mp4"].intervals == ()
    assert ann["Explosion002_x264.mp4"].intervals == ((10, 20),)


@pytest.mark.parametrize(
    "line,match",
    [
        ("Arson011_x264.mp4  Arson  150  420  680", "expected 6 fields"),
        ("Arson011_x264.mp4  Arson  150  4x0  -1  -1", "integers"),
        ("Arson011_x264.mp4  Arson  150  -1  -1  -1", "only one end"),
        ("Arson011_x264.mp4  Arson  420  150  -1  -1", "bad interval"),
    ],
)
def test_temporal_annotations_bad_lines_name_file_and_line(tmp_path: Path, line: str, match: str):
    f = tmp_path / "t.txt"
    f.write_text(f"Normal_Videos_003_x264.mp4  Normal  -1  -1  -1  -1\n{line}\n")
    with pytest.raises(DatasetFormatError, match=rf"t\.txt:2: .*{match}"):
        read_temporal_annotations(f)


def test_temporal_annotations_duplicate(tmp_path: Path):
    f = tmp_path / "t.txt"
    f.write_text("A001_x264.mp4  A  1  2  -1  -1\nA001_x264.mp4  A  3  4  -1  -1\n")
    with pytest.raises(DatasetFormatError, match="t.txt:2: duplicate"):
        read_temporal_annotations(f)


def test_format_temporal_line_round_trip(tmp_path: Path):
    line = format_temporal_line("Arson011_x264.mp4", "Arson", [(150, 420), (680, 1267)])
    assert line == "Arson011_x264.mp4  Arson  150  420  680  1267  "  # the official file's trailing spaces
    assert format_temporal_line("N_x264.mp4", "Normal", []) == "N_x264.mp4  Normal  -1  -1  -1  -1  "
    (tmp_path / "t.txt").write_text(line + "\n")
    assert read_temporal_annotations(tmp_path / "t.txt")["Arson011_x264.mp4"].intervals == (
        (150, 420),
        (680, 1267),
    )
    with pytest.raises(ValueError, match="at most two"):
        format_temporal_line("x", "A", [(1, 2), (3, 4), (5, 6)])


IDS = [
    "Abuse/Abuse001_x264.mp4",
    "Arson/Arson011_x264.mp4",
    "Training_Normal_Videos_Anomaly/Normal_Videos001_x264.mp4",
    "Testing_Normal_Videos_Anomaly/Normal_Videos_003_x264.mp4",
]


@pytest.mark.parametrize(
    "ref,expected",
    [
        ("Abuse/Abuse001_x264.mp4", "Abuse/Abuse001_x264.mp4"),
        ("Abuse001.mp4", "Abuse/Abuse001_x264.mp4"),  # the users' spelling
        ("Abuse001_x264.mp4", "Abuse/Abuse001_x264.mp4"),
        ("Abuse/Abuse001.mp4", "Abuse/Abuse001_x264.mp4"),
        ("Abuse\\Abuse001_x264.mp4", "Abuse/Abuse001_x264.mp4"),
        ("Normal_Videos001.mp4", "Training_Normal_Videos_Anomaly/Normal_Videos001_x264.mp4"),
        ("Normal_Videos_003_x264.mp4", "Testing_Normal_Videos_Anomaly/Normal_Videos_003_x264.mp4"),
    ],
)
def test_resolver_spellings(ref: str, expected: str):
    assert VideoResolver(IDS).resolve(ref) == (expected, None)


@pytest.mark.parametrize(
    "ref,reason",
    [
        ("../Abuse/Abuse001_x264.mp4", PATH_ESCAPES_ROOT),
        ("Abuse/../../etc/passwd", PATH_ESCAPES_ROOT),
        ("/data/Abuse/Abuse001_x264.mp4", PATH_ESCAPES_ROOT),
        ("..\\Abuse001.mp4", PATH_ESCAPES_ROOT),
        ("Abuse002.mp4", UNKNOWN_VIDEO),
        ("Arson/Abuse001.mp4", UNKNOWN_VIDEO),  # right name, wrong folder
        ("Normal_Videos003.mp4", UNKNOWN_VIDEO),  # train-style name of a test video
    ],
)
def test_resolver_refuses(ref: str, reason: str):
    assert VideoResolver(IDS).resolve(ref) == (None, reason)


def test_resolver_ambiguous_short_name_does_not_resolve():
    resolver = VideoResolver(["A/Same001_x264.mp4", "B/Same001_x264.mp4"])
    assert resolver.resolve("Same001.mp4") == (None, UNKNOWN_VIDEO)
    assert resolver.resolve("B/Same001.mp4") == ("B/Same001_x264.mp4", None)


def test_escapes_root():
    assert escapes_root("a/../../b") and escapes_root("/x") and escapes_root("D:/x")
    assert not escapes_root("a/b..c.mp4")


def test_escapes_root_array_judges_every_path_as_the_scalar_rule():
    """Every string of up to 5 of these characters: separators, dots, drives, whitespace."""
    refs = ["".join(t) for n in range(6) for t in itertools.product(". /\\aC:\t", repeat=n)]
    assert escapes_root_array(pa.array(refs)).to_pylist() == [escapes_root(r) for r in refs]
    assert escapes_root_array(pa.chunked_array([["a..b.jpg", None, "../x"]])).to_pylist() == [
        False,
        None,
        True,
    ]


def test_resolves_outside_follows_links_in_any_component(tmp_path: Path):
    root, elsewhere = tmp_path / "root", tmp_path / "elsewhere"
    (root / "videos").mkdir(parents=True)
    (elsewhere / "Arson").mkdir(parents=True)
    (elsewhere / "Arson" / "a.mp4").touch()
    (root / "videos" / "Arson").symlink_to(elsewhere / "Arson")  # a folder above the file
    (root / "videos" / "b.mp4").symlink_to(root / "videos" / "Arson" / "a.mp4")  # a link to that link
    (root / "c.mp4").touch()
    (root / "videos" / "c.mp4").symlink_to(os.path.relpath(root / "c.mp4", root / "videos"))
    roots, target = [root.resolve()], (elsewhere / "Arson" / "a.mp4").resolve()
    assert resolves_outside(root / "videos" / "Arson" / "a.mp4", roots) == target
    assert resolves_outside(root / "videos" / "b.mp4", roots) == target
    assert resolves_outside(root / "videos" / "c.mp4", roots) is None  # a link that stays inside
    assert resolves_outside(root / "videos" / "missing.mp4", roots) is None
    assert resolves_outside(root / "videos" / "Arson" / "a.mp4", [*roots, elsewhere.resolve()]) is None
