"""The UCF-Crime frame-level protocol on hand-made annotations, checked against scikit-learn directly."""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
from sklearn.metrics import average_precision_score, roc_auc_score

from fgclip.data.ucf import TemporalAnnotation, read_split, read_temporal_annotations
from fgclip.eval.frame_metrics import frame_level_metrics
from fgclip.eval.protocol import (
    EvalInputError,
    VideoScores,
    build_test_set,
    frame_ground_truth,
    frame_score_table,
    snippet_to_frames,
    write_frame_scores,
    write_roc_csv,
)

ARSON = "Arson/Arson011_x264.mp4"
FIGHT = "Fighting/Fighting003_x264.mp4"
NORMAL = "Testing_Normal_Videos_Anomaly/Normal_Videos_003_x264.mp4"


def write_dataset(tmp_path: Path, split: list[str], lines: list[str]) -> tuple[Path, Path]:
    split_path = tmp_path / "Anomaly_Test.txt"
    split_path.write_text("".join(f"{v}\n" for v in split))
    ann_path = tmp_path / "Temporal_Anomaly_Annotation_for_Testing_Videos.txt"
    ann_path.write_text("".join(f"{line}\n" for line in lines))
    return split_path, ann_path


def load_test_set(split_path: Path, ann_path: Path, num_frames: dict[str, int]):
    return build_test_set(
        read_split(split_path), read_temporal_annotations(ann_path), num_frames, split_path, ann_path
    )


def test_ground_truth_two_intervals_and_none():
    entry = TemporalAnnotation("Arson011_x264.mp4", "Arson", ((3, 5), (10, 12)))
    labels, clipped = frame_ground_truth(entry, 16, Path("ann.txt"))
    expected = np.array([0, 0, 0, 1, 1, 1, 0, 0, 0, 0, 1, 1, 1, 0, 0, 0], dtype=np.int8)
    np.testing.assert_array_equal(labels, expected)
    assert not clipped
    normal = TemporalAnnotation("Normal_Videos_003_x264.mp4", "Normal", ())
    labels, clipped = frame_ground_truth(normal, 7, Path("ann.txt"))
    np.testing.assert_array_equal(labels, np.zeros(7, dtype=np.int8))


def test_ground_truth_parsed_from_file_with_minus_one(tmp_path: Path):
    split_path, ann_path = write_dataset(
        tmp_path,
        [ARSON, NORMAL],
        ["Arson011_x264.mp4  Arson  2  4  -1  -1", "Normal_Videos_003_x264.mp4  Normal  -1  -1  -1  -1"],
    )
    test_set = load_test_set(split_path, ann_path, {ARSON: 8, NORMAL: 5})
    assert [v.video for v in test_set] == [ARSON, NORMAL]
    np.testing.assert_array_equal(test_set[0].labels, [0, 0, 1, 1, 1, 0, 0, 0])
    np.testing.assert_array_equal(test_set[1].labels, [0, 0, 0, 0, 0])


def test_interval_past_end_is_clipped_and_reported(caplog: pytest.LogCaptureFixture):
    entry = TemporalAnnotation("Arson011_x264.mp4", "Arson", ((2, 4), (8, 30)))
    with caplog.at_level(logging.WARNING, logger="fgclip.eval.protocol"):
        labels, clipped = frame_ground_truth(entry, 10, Path("ann.txt"))
    np.testing.assert_array_equal(labels, [0, 0, 1, 1, 1, 0, 0, 0, 1, 1])
    assert clipped
    assert "Arson011_x264.mp4" in caplog.text and "clipped" in caplog.text


def test_interval_starting_past_end_is_an_error():
    entry = TemporalAnnotation("Arson011_x264.mp4", "Arson", ((2, 4), (40, 50)))
    with pytest.raises(
        EvalInputError, match=r"ann\.txt: Arson011_x264\.mp4: interval \[40, 50\] starts past"
    ):
        frame_ground_truth(entry, 40, Path("ann.txt"))


def test_snippet_to_frames_ragged_tail():
    frames = snippet_to_frames(np.array([0.1, 0.2, 0.3]), 40, snippet_len=16)
    expected = np.concatenate([np.full(16, 0.1), np.full(16, 0.2), np.full(8, 0.3)])
    np.testing.assert_array_equal(frames, expected)
    # An exact multiple has no tail; one frame over makes a 1-frame tail snippet.
    assert snippet_to_frames(np.arange(2.0), 32).shape == (32,)
    np.testing.assert_array_equal(snippet_to_frames(np.arange(3.0), 33)[-2:], [1.0, 2.0])


def test_snippet_to_frames_rejects_wrong_snippet_count():
    with pytest.raises(EvalInputError, match="40 frames make 3 snippets"):
        snippet_to_frames(np.zeros(2), 40)


def test_auc_matches_sklearn_on_hand_made_annotation(tmp_path: Path):
    # Arson: 37 frames (ragged tail of 5), anomalies at frames 5..9 and 30..40 (clipped at 36).
    split_path, ann_path = write_dataset(
        tmp_path,
        [ARSON, NORMAL],
        ["Arson011_x264.mp4  Arson  5  9  30  40", "Normal_Videos_003_x264.mp4  Normal  -1  -1  -1  -1"],
    )
    test_set = load_test_set(split_path, ann_path, {ARSON: 37, NORMAL: 20})
    assert test_set[0].clipped and not test_set[1].clipped
    snippet_scores = {ARSON: np.array([0.6, 0.2, 0.9]), NORMAL: np.array([0.3, 0.5])}
    videos = [
        VideoScores(v.video, v.label, v.labels, snippet_to_frames(snippet_scores[v.video], v.labels.size))
        for v in test_set
    ]
    metrics = frame_level_metrics(videos)

    # The same frames built by hand.
    arson_labels = [0] * 5 + [1] * 5 + [0] * 20 + [1] * 7
    arson_scores = [0.6] * 16 + [0.2] * 16 + [0.9] * 5
    normal_scores = [0.3] * 16 + [0.5] * 4
    labels = arson_labels + [0] * 20
    scores = arson_scores + normal_scores
    assert metrics["frame_auc"] == pytest.approx(roc_auc_score(labels, scores))
    assert metrics["frame_ap"] == pytest.approx(average_precision_score(labels, scores))
    assert metrics["anomalous_auc"] == pytest.approx(roc_auc_score(arson_labels, arson_scores))
    assert metrics["num_frames"] == 57
    assert metrics["num_anomalous_frames"] == 12
    assert metrics["num_videos"] == 2 and metrics["num_anomalous_videos"] == 1


def test_per_class_auc_uses_class_videos_plus_normals():
    rng = np.random.default_rng(0)

    def video(name: str, label: str, labels: list[int]) -> VideoScores:
        y = np.array(labels, dtype=np.int8)
        return VideoScores(name, label, y, rng.random(y.size))

    videos = [
        video(ARSON, "Arson", [0, 1, 1, 0, 0, 1]),
        video(NORMAL, "Normal", [0] * 5),
        video(FIGHT, "Fighting", [1, 1, 0, 0]),
        video("Testing_Normal_Videos_Anomaly/Normal_Videos_004_x264.mp4", "Normal", [0] * 3),
    ]
    metrics = frame_level_metrics(videos)
    for cls, members in {"Arson": [0, 1, 3], "Fighting": [1, 2, 3]}.items():
        y = np.concatenate([videos[i].labels for i in members])
        s = np.concatenate([videos[i].scores for i in members])
        assert metrics["per_class_auc"][cls] == pytest.approx(roc_auc_score(y, s))
    anomalous = [videos[0], videos[2]]
    assert metrics["anomalous_auc"] == pytest.approx(
        roc_auc_score(
            np.concatenate([v.labels for v in anomalous]), np.concatenate([v.scores for v in anomalous])
        )
    )
    assert set(metrics["per_class_auc"]) == {"Arson", "Fighting"}


def test_undefined_sub_auc_is_none():
    videos = [
        VideoScores(ARSON, "Arson", np.ones(4, dtype=np.int8), np.linspace(0, 1, 4)),
        VideoScores(NORMAL, "Normal", np.zeros(4, dtype=np.int8), np.linspace(0, 1, 4)),
    ]
    metrics = frame_level_metrics(videos)
    assert metrics["anomalous_auc"] is None  # the anomalous video has no normal frame
    # Identical score ranges for the anomalous and the normal frames: chance.
    assert metrics["per_class_auc"]["Arson"] == pytest.approx(0.5)


def test_missing_annotation_entry_is_an_error(tmp_path: Path):
    split_path, ann_path = write_dataset(
        tmp_path, [ARSON, NORMAL], ["Arson011_x264.mp4  Arson  5  9  -1  -1"]
    )
    with pytest.raises(EvalInputError, match=f"{ann_path.name}: no temporal annotation .*{NORMAL}"):
        load_test_set(split_path, ann_path, {ARSON: 37, NORMAL: 20})


def test_annotation_entry_not_in_split_is_an_error(tmp_path: Path):
    split_path, ann_path = write_dataset(
        tmp_path,
        [ARSON],
        ["Arson011_x264.mp4  Arson  5  9  -1  -1", "Fighting003_x264.mp4  Fighting  1  2  -1  -1"],
    )
    with pytest.raises(
        EvalInputError, match=f"{ann_path.name}: entry Fighting003_x264.mp4 is not a test video"
    ):
        load_test_set(split_path, ann_path, {ARSON: 37})


def test_interval_past_end_in_test_set_names_file_and_entry(tmp_path: Path):
    split_path, ann_path = write_dataset(tmp_path, [ARSON], ["Arson011_x264.mp4  Arson  50  60  -1  -1"])
    with pytest.raises(EvalInputError, match=f"{ann_path.name}: Arson011_x264.mp4: interval \\[50, 60\\]"):
        load_test_set(split_path, ann_path, {ARSON: 37})


def test_empty_test_set_is_an_error(tmp_path: Path):
    split_path, ann_path = write_dataset(tmp_path, [], [])
    with pytest.raises(EvalInputError, match=f"empty test set: .*{split_path.name} lists no videos"):
        load_test_set(split_path, ann_path, {})
    with pytest.raises(EvalInputError, match="empty test set"):
        frame_level_metrics([])


def test_undecoded_videos_leave_an_empty_test_set_error(tmp_path: Path):
    split_path, ann_path = write_dataset(tmp_path, [ARSON], ["Arson011_x264.mp4  Arson  5  9  -1  -1"])
    with pytest.raises(EvalInputError, match="none of the 1 videos .* was decoded"):
        load_test_set(split_path, ann_path, {})


def test_class_disagreeing_with_folder_is_an_error(tmp_path: Path):
    split_path, ann_path = write_dataset(tmp_path, [ARSON], ["Arson011_x264.mp4  Fighting  5  9  -1  -1"])
    with pytest.raises(EvalInputError, match="Arson011_x264.mp4: class 'Fighting' disagrees"):
        load_test_set(split_path, ann_path, {ARSON: 37})


def test_normal_video_with_interval_is_an_error(tmp_path: Path):
    split_path, ann_path = write_dataset(
        tmp_path, [NORMAL], ["Normal_Videos_003_x264.mp4  Normal  1  5  -1  -1"]
    )
    with pytest.raises(EvalInputError, match="Normal_Videos_003_x264.mp4: a Normal video cannot have"):
        load_test_set(split_path, ann_path, {NORMAL: 20})


def test_frame_scores_parquet_recomputes_the_metric(tmp_path: Path):
    videos = [
        VideoScores(ARSON, "Arson", np.array([0, 1, 1, 0] * 5, dtype=np.int8), np.linspace(0, 1, 20)),
        VideoScores(NORMAL, "Normal", np.zeros(18, dtype=np.int8), np.linspace(1, 0, 18)),
    ]
    tables = [frame_score_table(videos, "finetuned", 16), frame_score_table(videos[::-1], "untrained", 16)]
    path = tmp_path / "eval" / "frame_scores.parquet"
    assert write_frame_scores(path, tables) == 76
    table = pq.read_table(path)
    assert table.column_names == ["video", "class", "frame", "snippet", "score", "log_odds", "label", "model"]
    finetuned = table.filter(table["model"].to_numpy(zero_copy_only=False) == "finetuned").to_pydict()
    assert finetuned["frame"][:3] == [0, 1, 2] and finetuned["frame"][20:22] == [0, 1]
    assert finetuned["snippet"][15:17] == [0, 1]
    assert finetuned["video"][19:21] == [ARSON, NORMAL]
    assert roc_auc_score(finetuned["label"], finetuned["score"]) == pytest.approx(
        frame_level_metrics(videos)["frame_auc"]
    )


def test_roc_csv(tmp_path: Path):
    videos = [
        VideoScores(ARSON, "Arson", np.array([0, 0, 1, 1], dtype=np.int8), np.array([0.1, 0.4, 0.35, 0.8]))
    ]
    path = tmp_path / "plots" / "roc.csv"
    write_roc_csv(path, videos)
    lines = path.read_text().splitlines()
    assert lines[0] == "fpr,tpr,threshold"
    points = np.loadtxt(path, delimiter=",", skiprows=1)
    assert points[0, :2].tolist() == [0.0, 0.0] and points[-1, :2].tolist() == [1.0, 1.0]
    assert np.all(np.diff(points[:, 0]) >= 0) and np.all(np.diff(points[:, 1]) >= 0)


def test_auc_ranks_by_log_odds_when_scores_saturate():
    """Two anomalous and two normal frames all score 1.0 in float64; their log-odds still rank them."""
    labels = np.array([1, 1, 0, 0], dtype=np.int8)
    log_odds = np.array([60.0, 55.0, 50.0, 40.0])
    scores = 1 / (1 + np.exp(-log_odds))
    assert (scores == 1.0).all()  # ranking by the score would be a four-way tie: AUC 0.5
    video = VideoScores("Arson/Arson001_x264.mp4", "Arson", labels, scores, log_odds)
    other = VideoScores(NORMAL, "Normal", np.zeros(2, np.int8), np.full(2, 1.0), np.array([10.0, 20.0]))
    metrics = frame_level_metrics([video, other])
    assert metrics["frame_auc"] == pytest.approx(1.0)
    assert metrics["saturated_frac"] == pytest.approx(1.0)
