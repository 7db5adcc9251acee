"""Reading other methods' per-snippet scores: each layout gives the same dict, and bad input is refused."""

from __future__ import annotations

import csv
import pickle
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from fgclip.eval.protocol import EvalInputError
from fgclip.eval.score_files import read_snippet_scores, video_key

XD_NAME = "A.Beautiful.Mind.2001__#00-01-45_00-02-50_label_A"

# Not in file-name order, so the directory's sorting and the others' source order differ.
SCORES = {
    "Normal_Videos_003_x264": np.array([0.1, 0.2, 0.3]),
    "Arson011_x264": np.array([0.9, 0.8]),
    "Fighting003_x264": np.array([0.5, 0.25, 0.125, 1.0]),
}
SORTED_KEYS = sorted(SCORES)


def assert_same(got: dict[str, np.ndarray], want: dict[str, np.ndarray]) -> None:
    assert list(got) == list(want)
    for key, scores in want.items():
        assert got[key].dtype == np.float64
        assert got[key].ndim == 1
        np.testing.assert_array_equal(got[key], scores)


def write_dir(root: Path, scores: dict[str, np.ndarray]) -> Path:
    root.mkdir()
    for name, values in scores.items():
        np.save(root / f"{name}.npy", values)
    return root


def table_rows(scores: dict[str, np.ndarray]) -> list[dict]:
    # Snippets listed last-first, so the reader must sort them.
    return [
        {"video": f"Some/Folder/{name}.mp4", "snippet": i, "score": float(values[i]), "extra": "x"}
        for name, values in scores.items()
        for i in reversed(range(len(values)))
    ]


def write_csv(path: Path, rows: list[dict], fields: list[str] | None = None) -> Path:
    fields = fields or list(rows[0])
    with path.open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=fields, extrasaction="ignore")
        writer.writeheader()
        writer.writerows(rows)
    return path


def write_parquet(path: Path, rows: list[dict]) -> Path:
    pq.write_table(pa.Table.from_pylist(rows), path)
    return path


def write_concatenated(tmp_path: Path, scores: dict[str, np.ndarray], repeat: int = 1) -> tuple[Path, Path]:
    array = np.concatenate([np.repeat(v, repeat) for v in scores.values()])
    npy = tmp_path / "pred.npy"
    np.save(npy, array)
    listing = tmp_path / "videos.txt"
    listing.write_text("".join(f"{name} {len(v)}\n" for name, v in scores.items()))
    return npy, listing


# --- video_key ---------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("name", "key"),
    [
        ("Arson/Arson011_x264.mp4", "Arson011_x264"),
        ("Arson011_x264.npy", "Arson011_x264"),
        ("Normal_Videos_003_x264", "Normal_Videos_003_x264"),
        ("C:\\data\\Arson\\Arson011_x264.mp4", "Arson011_x264"),
        ("/abs/Testing_Normal_Videos_Anomaly/Normal_Videos_003_x264.mp4", "Normal_Videos_003_x264"),
        (f"{XD_NAME}.mp4", XD_NAME),
        (XD_NAME, XD_NAME),
        ("video.tar.gz", "video.tar"),  # one extension only
        ("clip.longext", "clip.longext"),  # six characters is not an extension
    ],
)
def test_video_key(name: str, key: str) -> None:
    assert video_key(name) == key


# --- the layouts agree ---------------------------------------------------------------------------------


def test_directory_round_trip_sorted_by_file_name(tmp_path: Path) -> None:
    root = write_dir(tmp_path / "scores", SCORES)
    (root / "README.txt").write_text("not scores")
    got = read_snippet_scores(root)
    assert_same(got, {k: SCORES[k] for k in SORTED_KEYS})


def test_directory_squeezes_trailing_one_and_accepts_integers(tmp_path: Path) -> None:
    root = tmp_path / "scores"
    root.mkdir()
    np.save(root / "a.npy", np.array([[0.5], [0.75]], dtype=np.float32))
    np.save(root / "b.npy", np.array([0, 1, 1], dtype=np.int64))
    got = read_snippet_scores(root)
    assert_same(got, {"a": np.array([0.5, 0.75]), "b": np.array([0.0, 1.0, 1.0])})


def test_csv_round_trip_in_first_appearance_order(tmp_path: Path) -> None:
    path = write_csv(tmp_path / "scores.csv", table_rows(SCORES))
    assert_same(read_snippet_scores(path), SCORES)


def test_csv_keeps_numeric_video_names_as_text(tmp_path: Path) -> None:
    path = write_csv(tmp_path / "s.csv", [{"video": "007", "snippet": 0, "score": 0.5}])
    assert list(read_snippet_scores(path)) == ["007"]


def test_parquet_round_trip(tmp_path: Path) -> None:
    path = write_parquet(tmp_path / "scores.parquet", table_rows(SCORES))
    assert_same(read_snippet_scores(path), SCORES)


def test_concatenated_snippet_level_round_trip(tmp_path: Path) -> None:
    npy, listing = write_concatenated(tmp_path, SCORES)
    assert_same(read_snippet_scores(npy, videos=listing), SCORES)


def test_concatenated_frame_level_keeps_one_value_per_snippet(tmp_path: Path) -> None:
    npy, listing = write_concatenated(tmp_path, SCORES, repeat=16)
    assert np.load(npy).size == 16 * sum(len(v) for v in SCORES.values())
    assert_same(read_snippet_scores(npy, videos=listing), SCORES)


def test_video_list_with_header_commas_blank_lines_and_paths(tmp_path: Path) -> None:
    npy, _ = write_concatenated(tmp_path, SCORES)
    listing = tmp_path / "videos.csv"
    body = "".join(f"\nFolder/{name}.mp4, {len(v)}\n" for name, v in SCORES.items())
    listing.write_text("video,num_snippets\n" + body)
    assert_same(read_snippet_scores(npy, videos=listing), SCORES)


def test_concatenated_accepts_column_array(tmp_path: Path) -> None:
    npy, listing = write_concatenated(tmp_path, SCORES)
    np.save(npy, np.load(npy)[:, None])
    assert_same(read_snippet_scores(npy, videos=listing), SCORES)


# --- errors: paths and layouts --------------------------------------------------------------------------


def test_missing_path(tmp_path: Path) -> None:
    with pytest.raises(EvalInputError, match="score path not found: .*nowhere"):
        read_snippet_scores(tmp_path / "nowhere")


def test_unknown_file_type(tmp_path: Path) -> None:
    path = tmp_path / "scores.json"
    path.write_text("{}")
    with pytest.raises(EvalInputError, match=r"scores\.json: not a score file"):
        read_snippet_scores(path)


def test_npy_without_video_list(tmp_path: Path) -> None:
    npy, _ = write_concatenated(tmp_path, SCORES)
    with pytest.raises(EvalInputError, match=r"pred\.npy: .*--videos"):
        read_snippet_scores(npy)


def test_video_list_with_directory_or_table(tmp_path: Path) -> None:
    listing = tmp_path / "videos.txt"
    listing.write_text("a 1\n")
    root = write_dir(tmp_path / "scores", SCORES)
    table = write_csv(tmp_path / "s.csv", table_rows(SCORES))
    with pytest.raises(EvalInputError, match=r"--videos .* directory"):
        read_snippet_scores(root, videos=listing)
    with pytest.raises(EvalInputError, match=r"s\.csv: --videos .* \.csv table"):
        read_snippet_scores(table, videos=listing)


def test_missing_video_list(tmp_path: Path) -> None:
    npy, _ = write_concatenated(tmp_path, SCORES)
    with pytest.raises(EvalInputError, match="video list not found: .*absent.txt"):
        read_snippet_scores(npy, videos=tmp_path / "absent.txt")


# --- errors: per-video .npy directory -------------------------------------------------------------------


def test_directory_without_npy(tmp_path: Path) -> None:
    root = tmp_path / "scores"
    root.mkdir()
    (root / "notes.txt").write_text("x")
    with pytest.raises(EvalInputError, match="no per-video .npy"):
        read_snippet_scores(root)


@pytest.mark.parametrize("shape", [(3, 2), (2, 2, 1), ()])
def test_directory_bad_shape_names_the_file(tmp_path: Path, shape: tuple[int, ...]) -> None:
    root = tmp_path / "scores"
    root.mkdir()
    np.save(root / "bad_video.npy", np.zeros(shape))
    with pytest.raises(EvalInputError, match=r"bad_video\.npy: expected scores of shape"):
        read_snippet_scores(root)


def test_directory_never_unpickles(tmp_path: Path) -> None:
    root = tmp_path / "scores"
    root.mkdir()
    np.save(root / "obj.npy", np.array([0.1, "x"], dtype=object), allow_pickle=True)
    with pytest.raises(EvalInputError, match=r"obj\.npy: cannot read as a \.npy array"):
        read_snippet_scores(root)


def test_directory_rejects_a_pickle_named_npy(tmp_path: Path) -> None:
    root = tmp_path / "scores"
    root.mkdir()
    (root / "evil.npy").write_bytes(pickle.dumps([0.1, 0.2]))
    with pytest.raises(EvalInputError, match=r"evil\.npy: not a \.npy file"):
        read_snippet_scores(root)


def test_directory_rejects_string_dtype(tmp_path: Path) -> None:
    root = tmp_path / "scores"
    root.mkdir()
    np.save(root / "text.npy", np.array(["0.1", "0.2"]))
    with pytest.raises(EvalInputError, match=r"text\.npy: scores must be numbers.*<U3"):
        read_snippet_scores(root)


def test_directory_empty_array(tmp_path: Path) -> None:
    root = tmp_path / "scores"
    root.mkdir()
    np.save(root / "empty.npy", np.zeros(0))
    with pytest.raises(EvalInputError, match=r"empty\.npy: video 'empty\.npy' has no scores"):
        read_snippet_scores(root)


@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf])
def test_directory_non_finite(tmp_path: Path, bad: float) -> None:
    root = tmp_path / "scores"
    root.mkdir()
    np.save(root / "v1.npy", np.array([0.1, 0.2, bad]))
    with pytest.raises(EvalInputError, match=r"v1\.npy: video 'v1\.npy' snippet 2: score is not a finite"):
        read_snippet_scores(root)


def test_directory_duplicate_keys(tmp_path: Path) -> None:
    root = tmp_path / "scores"
    root.mkdir()
    np.save(root / "v1.npy", np.zeros(2))
    with (root / "v1.NPY").open("wb") as f:  # np.save would append ".npy" to this name
        np.save(f, np.zeros(2))
    if len(list(root.iterdir())) < 2:
        pytest.skip("case-insensitive file system")
    with pytest.raises(EvalInputError, match=r"'v1\.NPY' and 'v1\.npy' are the same video \('v1'\)"):
        read_snippet_scores(root)


# --- errors: tables --------------------------------------------------------------------------------------


def test_table_missing_columns_named(tmp_path: Path) -> None:
    rows = [{"video": "a", "value": 0.1}]
    for path in (write_csv(tmp_path / "s.csv", rows), write_parquet(tmp_path / "s.parquet", rows)):
        with pytest.raises(EvalInputError, match=r"s\.(csv|parquet): missing column\(s\) snippet, score"):
            read_snippet_scores(path)


def test_table_without_rows(tmp_path: Path) -> None:
    path = tmp_path / "s.csv"
    path.write_text("video,snippet,score\n")
    with pytest.raises(EvalInputError, match=r"s\.csv: the score table has no rows"):
        read_snippet_scores(path)


@pytest.mark.parametrize(
    ("snippets", "message"),
    [
        ([0, 2], "snippet 1 is missing"),
        ([1, 2], "snippet 0 is missing"),
        ([0, 1, 1], "snippet 1 appears more than once"),
        ([-1, 0], "snippet -1 is negative"),
    ],
)
def test_table_snippet_numbers_must_be_a_range(tmp_path: Path, snippets: list[int], message: str) -> None:
    rows = [{"video": "good", "snippet": 0, "score": 0.5}]
    rows += [{"video": "Arson/Arson011_x264.mp4", "snippet": s, "score": 0.5} for s in snippets]
    path = write_csv(tmp_path / "s.csv", rows)
    with pytest.raises(EvalInputError, match=rf"s\.csv: video 'Arson/Arson011_x264\.mp4': {message}"):
        read_snippet_scores(path)


@pytest.mark.parametrize("cell", ["nan", "inf", ""])
def test_table_non_finite_or_empty_score(tmp_path: Path, cell: str) -> None:
    path = tmp_path / "s.csv"
    path.write_text(f"video,snippet,score\nv1,1,{cell}\nv1,0,0.5\n")
    with pytest.raises(EvalInputError, match=r"s\.csv: video 'v1' snippet 1: score is not a finite"):
        read_snippet_scores(path)


def test_table_non_numeric_score(tmp_path: Path) -> None:
    path = tmp_path / "s.parquet"
    write_parquet(path, [{"video": "v1", "snippet": 0, "score": "high"}])
    with pytest.raises(EvalInputError, match=r"s\.parquet: column score must hold numbers"):
        read_snippet_scores(path)


def test_table_non_integer_snippet(tmp_path: Path) -> None:
    path = tmp_path / "s.csv"
    path.write_text("video,snippet,score\nv1,0.5,0.1\n")
    with pytest.raises(EvalInputError, match=r"s\.csv: column snippet must hold integers"):
        read_snippet_scores(path)


def test_table_two_names_for_one_video(tmp_path: Path) -> None:
    rows = [
        {"video": "Arson/Arson011_x264.mp4", "snippet": 0, "score": 0.1},
        {"video": "Arson011_x264", "snippet": 0, "score": 0.2},
    ]
    path = write_parquet(tmp_path / "s.parquet", rows)
    with pytest.raises(
        EvalInputError, match=r"'Arson/Arson011_x264\.mp4' and 'Arson011_x264' are the same video"
    ):
        read_snippet_scores(path)


def test_unreadable_parquet(tmp_path: Path) -> None:
    path = tmp_path / "s.parquet"
    path.write_bytes(b"not parquet at all")
    with pytest.raises(EvalInputError, match=r"s\.parquet: cannot read the score table") as info:
        read_snippet_scores(path)
    assert "\n" not in str(info.value)


# --- errors: one concatenated array ----------------------------------------------------------------------


def test_concatenated_wrong_length_states_all_three(tmp_path: Path) -> None:
    npy, listing = write_concatenated(tmp_path, SCORES)
    np.save(npy, np.zeros(10))
    with pytest.raises(EvalInputError, match=r"pred\.npy: the array has 10 values.* must have 9 .* or 144 "):
        read_snippet_scores(npy, videos=listing)


def test_concatenated_frame_level_must_be_a_repeat(tmp_path: Path) -> None:
    npy, listing = write_concatenated(tmp_path, SCORES, repeat=16)
    frames = np.load(npy)
    frames[3 * 16 + 16 + 5] += 0.01  # second video (Arson011_x264), its snippet 1
    np.save(npy, frames)
    with pytest.raises(
        EvalInputError, match=r"pred\.npy: .*not a repeat of snippet scores: video 'Arson011_x264' snippet 1"
    ):
        read_snippet_scores(npy, videos=listing)


def test_concatenated_frame_level_nan_is_not_finite_error(tmp_path: Path) -> None:
    npy, listing = write_concatenated(tmp_path, SCORES, repeat=16)
    frames = np.load(npy)
    frames[16 + 3] = np.nan  # first video, snippet 1, frame 3
    np.save(npy, frames)
    with pytest.raises(
        EvalInputError,
        match=r"video 'Normal_Videos_003_x264' snippet 1 \(frame 3 of it\): score is not a finite",
    ):
        read_snippet_scores(npy, videos=listing)


def test_concatenated_snippet_level_nan(tmp_path: Path) -> None:
    npy, listing = write_concatenated(tmp_path, SCORES)
    array = np.load(npy)
    array[3 + 2 + 1] = np.inf  # third video, snippet 1
    np.save(npy, array)
    with pytest.raises(EvalInputError, match=r"video 'Fighting003_x264' snippet 1: score is not a finite"):
        read_snippet_scores(npy, videos=listing)


def test_concatenated_string_array(tmp_path: Path) -> None:
    npy, listing = write_concatenated(tmp_path, SCORES)
    np.save(npy, np.array(["x"] * 9))
    with pytest.raises(EvalInputError, match=r"pred\.npy: scores must be numbers"):
        read_snippet_scores(npy, videos=listing)


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("a 2\nb\n", r"videos\.txt:2: expected 'NAME NUM_SNIPPETS'"),
        ("a 2\nb x\n", r"videos\.txt:2: video 'b': the snippet count 'x' is not an integer"),
        ("a 2\nb 0\n", r"videos\.txt:2: video 'b' has 0 snippets"),
        ("video,num_snippets\n\n", r"videos\.txt: the video list names no videos"),
        ("a 2\na.mp4 1\n", r"'a' and 'a\.mp4' are the same video"),
    ],
)
def test_bad_video_list(tmp_path: Path, text: str, message: str) -> None:
    npy = tmp_path / "pred.npy"
    np.save(npy, np.zeros(3))
    listing = tmp_path / "videos.txt"
    listing.write_text(text)
    with pytest.raises(EvalInputError, match=message):
        read_snippet_scores(npy, videos=listing)


def test_what_once_crashed_is_a_one_line_error(tmp_path: Path):
    (tmp_path / "dup.csv").write_text("video,snippet,score,score\na,0,0.1,0.2\n")
    with pytest.raises(EvalInputError, match="column\\(s\\) score appear more than once"):
        read_snippet_scores(tmp_path / "dup.csv")
    big = tmp_path / "big"
    big.mkdir()
    header = "{'descr': '<f8', 'fortran_order': False, 'shape': (1000000000000,), }"
    header += " " * (117 - len(header)) + "\n"
    (big / "a.npy").write_bytes(b"\x93NUMPY\x01\x00" + len(header).to_bytes(2, "little") + header.encode() + b"\0" * 8)
    with pytest.raises(EvalInputError, match="a.npy"):
        read_snippet_scores(big)
    (tmp_path / "noise").mkdir()
    (tmp_path / "noise" / "b.npy").write_bytes(b"\x00garbage\xff" * 10)
    with pytest.raises(EvalInputError, match="b.npy: not a .npy file"):
        read_snippet_scores(tmp_path / "noise")


def test_a_count_that_is_not_an_integer_is_never_taken_for_a_header(tmp_path: Path):
    np.save(tmp_path / "all.npy", np.zeros(8))
    (tmp_path / "videos.txt").write_text("Arson011_x264 6.0\nb 2\n")
    with pytest.raises(EvalInputError, match="videos.txt:1: video 'Arson011_x264': the snippet count '6.0'"):
        read_snippet_scores(tmp_path / "all.npy", videos=tmp_path / "videos.txt")
