"""The reference protocols against the references' rules, rewritten here as plain loops.

Each reference function below follows its script's steps one by one (MATLAB's 1-based
loops for Sultani et al., VadCLIP's string split and slice, RTFM's appends and count
check) on the annotation lines as written, so that a difference in any rule (an end
inclusive or not, the tail, the ranking variable, the AP) shows up as a number.
"""

from __future__ import annotations

import itertools
import math
from pathlib import Path

import numpy as np
import pytest
from sklearn.metrics import auc, average_precision_score, precision_recall_curve, roc_auc_score, roc_curve

from fgclip.data.ucf import read_temporal_annotations
from fgclip.eval.frame_metrics import bootstrap_intervals, frame_level_metrics
from fgclip.eval.protocol import EvalInputError
from fgclip.eval.protocols import SnippetScores, protocol_videos, sultani_auc, whole_snippets
from fgclip.eval.score_eval import evaluate_scores, export_ground_truth

# name, class, frames (decoded), the line as written. Intervals: at frame 0; at the last
# frame (80 of 80: past it by one, inclusive/exclusive differ); past the end; a ragged tail
# (37, 70, 50 frames); -1s; lines with and without the official two trailing spaces.
VIDEOS = [
    ("Arson/Arson011_x264.mp4", "Arson", 37, "Arson011_x264.mp4  Arson  0  15  -1  -1  "),
    ("Fighting/Fighting003_x264.mp4", "Fighting", 80, "Fighting003_x264.mp4  Fighting  20  40  60  80"),
    ("Burglary/Burglary005_x264.mp4", "Burglary", 70, "Burglary005_x264.mp4  Burglary  30  100  -1  -1  "),
    ("Robbery/Robbery102_x264.mp4", "Robbery", 64, "Robbery102_x264.mp4  Robbery  3  5  40  63  "),
    (
        "Testing_Normal_Videos_Anomaly/Normal_Videos_003_x264.mp4",
        "Normal",
        50,
        "Normal_Videos_003_x264.mp4  Normal  -1  -1  -1  -1  ",
    ),
]


@pytest.fixture()
def annotation_file(tmp_path: Path) -> Path:
    path = tmp_path / "Temporal_Anomaly_Annotation_for_Testing_Videos.txt"
    path.write_text("".join(line + "\n" for *_, line in VIDEOS), encoding="utf-8")
    return path


def _scores(num_snippets: int, seed: int) -> np.ndarray:
    # float64 values that float32 rounds (and that tie after the rounding, here and there).
    rng = np.random.default_rng(seed)
    return np.round(rng.random(num_snippets), 3) + 1e-9 * rng.random(num_snippets)


def _inputs(annotation_file: Path, count) -> list[SnippetScores]:
    entries = {e.name: e for e in read_temporal_annotations(annotation_file).values()}
    out = []
    for i, (video, label, frames, line) in enumerate(VIDEOS):
        entry = entries[line.split("  ")[0]]
        assert entry.line == line.rstrip("\n")
        out.append(SnippetScores(video, label, entry, _scores(count(frames), i), None, frames))
    return out


# --------------------------------------------------------------- the references


def sultani_reference(line: str, frames: int, snippet_scores: list[float]):
    """Evaluate_Anomaly_Detector.m, 1-based: GT(max(s,1):min(e,N)) = 1, tail = last score."""
    fields = line.split()
    gt = [0] * (frames + 1)  # index 0 unused: MATLAB counts from 1
    if fields[1] != "Normal":
        for s, e in ((int(fields[2]), int(fields[3])), (int(fields[4]), int(fields[5]))):
            if s == -1:
                continue  # the .mat annotations hold only real intervals
            for k in range(max(s, 1), min(e, frames) + 1):
                gt[k] = 1
    detection = []
    for score in snippet_scores:
        detection += [score] * 16
    detection += [detection[-1]] * (frames - len(detection))
    return gt[1:], detection


def sultani_reference_auc(gt: list[int], scores: list[float]) -> float:
    order = sorted(range(len(scores)), key=lambda i: -scores[i])  # Python's sort is stable, as MATLAB's
    positives = sum(gt)
    negatives = len(gt) - positives
    tp = fp = 0
    points = []
    for i in order:
        tp += gt[i] > 0
        fp += gt[i] == 0
        points.append((fp / negatives, tp / positives))
    return sum((x2 - x1) * (y1 + y2) / 2 for (x1, y1), (x2, y2) in itertools.pairwise(points))


def vadclip_reference(line: str, num_snippets: int) -> list[float]:
    """list/make_gt_ucf.py for one video: (S + 1) * 16 zeros, split('  ')[1:-1], gt[s:e] = 1, drop 16."""
    gt = np.zeros((num_snippets + 1) * 16).astype(np.float32)
    name = line.split("  ")[0][: -len(".mp4")]
    if "Normal" not in name:
        content = line.strip("\n").split("  ")[1:-1]
        fragments = [
            [int(content[i]), int(content[j])]
            for i in range(1, len(content), 2)
            for j in range(2, len(content), 2)
            if j == i + 1
        ]
        for start, end in fragments:
            if start != -1 and end != -1:
                gt[start:end] = 1.0
    return list(gt[:-16])


def rtfm_reference(line: str, num_snippets: int) -> list[float]:
    """list/make_gt_ucf.py of RTFM for one video, with its count check."""
    num_frame = num_snippets * 16
    fields = line.split()
    gt: list[float] = []
    if "Normal_" in fields[0]:
        gt += [0.0] * num_frame
    else:
        events = [(int(fields[k]), int(fields[k + 1])) for k in (2, 4) if int(fields[k]) != -1]
        start, end = events[0]
        if len(events) == 1:
            gt += [0.0 for _ in range(start)]
            if not (end + 1) > num_frame:
                gt += [1.0 for _ in range(start, end + 1)] + [0.0 for _ in range(end + 1, num_frame)]
            else:
                gt += [1.0 for _ in range(start, end)]
        else:
            start2, end2 = events[1]
            gt += [0.0 for _ in range(start)] + [1.0 for _ in range(start, end + 1)]
            gt += [0.0 for _ in range(end + 1, start2)]
            if not (end2 + 1) > num_frame:
                gt += [1.0 for _ in range(start2, end2 + 1)] + [0.0 for _ in range(end2 + 1, num_frame)]
            else:
                gt += [1.0 for _ in range(start2, end2)]
    if len(gt) != num_frame:
        raise SystemExit("Num of frames is not correct!!")
    return gt


# --------------------------------------------------------------------- the tests


def test_sultani_protocol_equals_the_matlab_rules(annotation_file: Path):
    # Scored as this project scores (a ragged tail of its own); Sultani takes whole snippets.
    videos = [whole_snippets(v) for v in _inputs(annotation_file, lambda n: math.ceil(n / 16))]
    got = protocol_videos("sultani", videos, annotation_file)
    # The script walks dir(Model_Score_Folder): score files sorted by name, not the split.
    listing = sorted(range(len(VIDEOS)), key=lambda i: Path(VIDEOS[i][0]).stem + ".mat")
    assert [g.video for g in got] == [VIDEOS[i][0] for i in listing]
    all_gt, all_scores = [], []
    for g, i in zip(got, listing):
        _, _, frames, line = VIDEOS[i]
        gt, detection = sultani_reference(line, frames, videos[i].scores.tolist())
        assert g.labels.tolist() == gt and g.scores.tolist() == detection
        all_gt += gt
        all_scores += detection
    metrics = frame_level_metrics(got, "sultani")
    assert metrics["frame_auc"] == pytest.approx(sultani_reference_auc(all_gt, all_scores), abs=1e-12)
    assert metrics["frame_ap"] == pytest.approx(average_precision_score(all_gt, all_scores), abs=1e-12)
    # Frame 0 and a start of 0 are the same frame in MATLAB's count; the 16 frames of the
    # Burglary interval past its end are clamped, not an error.
    arson = next(g for g in got if "Arson" in g.video)
    assert arson.labels[:15].all() and not arson.labels[15:].any()


def test_sultani_auc_keeps_ties_in_frame_order():
    """Not scikit-learn's AUC: one step per frame, so ties count in the order the frames come."""
    labels = np.array([0, 1, 1, 0, 1, 0])
    scores = np.array([0.5, 0.5, 0.9, 0.5, 0.1, 0.1])
    want = sultani_reference_auc(labels.tolist(), scores.tolist())
    assert sultani_auc(labels, scores) == pytest.approx(want, abs=1e-15)
    assert abs(want - roc_auc_score(labels, scores)) > 0.05


def test_vadclip_protocol_equals_make_gt_ucf_and_ucf_test(annotation_file: Path):
    videos = _inputs(annotation_file, lambda n: math.ceil(n / 16))
    got = protocol_videos("vadclip", videos, annotation_file)
    gt, ranked = [], []
    for v, g, (_, _, _, line) in zip(videos, got, VIDEOS):
        want = vadclip_reference(line, len(v.scores))
        assert g.labels.tolist() == want
        gt += want
        # ucf_test.py: torch float32 probabilities, .tolist(), np.repeat(..., 16).
        ranked += np.repeat(np.float32(v.scores).tolist(), 16).tolist()
    metrics = frame_level_metrics(got, "vadclip")
    assert metrics["frame_auc"] == roc_auc_score(gt, ranked)
    assert metrics["frame_ap"] == average_precision_score(gt, ranked)
    # The Fighting line has no trailing spaces: VadCLIP's split drops its last number and,
    # with it, the second interval (60-80). Frames 20..39 only, end exclusive.
    fighting = got[1].labels
    assert fighting[20:40].all() and fighting.sum() == 20


def test_rtfm_protocol_equals_its_make_gt_and_test(annotation_file: Path):
    videos = [v for v in _inputs(annotation_file, lambda n: math.ceil(n / 16)) if "Burglary" not in v.video]
    got = protocol_videos("rtfm", videos, annotation_file)
    gt, ranked = [], []
    for v, g in zip(videos, got):
        line = next(line for video, *_, line in VIDEOS if video == v.video)
        want = rtfm_reference(line, len(v.scores))
        assert g.labels.tolist() == want
        gt += want
        ranked += np.repeat(np.float32(v.scores), 16).tolist()
    metrics = frame_level_metrics(got, "rtfm")
    fpr, tpr, _ = roc_curve(gt, ranked)
    precision, recall, _ = precision_recall_curve(gt, ranked)
    assert metrics["frame_auc"] == pytest.approx(auc(fpr, tpr), abs=1e-15)
    assert metrics["frame_ap"] == pytest.approx(auc(recall, precision), abs=1e-15)
    assert metrics["frame_ap_step"] == pytest.approx(average_precision_score(gt, ranked), abs=1e-15)
    # 60-80 on 80 frames: RTFM's exclusive branch, 60..79.
    assert got[1].labels[60:80].all() and got[1].labels[41:60].sum() == 0


def test_rtfm_stops_where_its_script_stops(annotation_file: Path):
    burglary = [v for v in _inputs(annotation_file, lambda n: math.ceil(n / 16)) if "Burglary" in v.video]
    line = VIDEOS[2][3]
    with pytest.raises(SystemExit):
        rtfm_reference(line, len(burglary[0].scores))
    with pytest.raises(EvalInputError, match="Burglary005_x264.mp4: .*RTFM's make_gt_ucf.py stops"):
        protocol_videos("rtfm", burglary, annotation_file)


def test_full_protocol_is_the_projects_own(annotation_file: Path):
    videos = _inputs(annotation_file, lambda n: math.ceil(n / 16))
    got = protocol_videos("full", videos, annotation_file)
    for v, g, (_, _, frames, line) in zip(videos, got, VIDEOS):
        fields = line.split()
        want = np.zeros(frames, dtype=np.int8)
        for s, e in ((int(fields[2]), int(fields[3])), (int(fields[4]), int(fields[5]))):
            if s != -1:
                want[s : min(e, frames - 1) + 1] = 1  # 0-based, inclusive, clipped
        assert g.labels.tolist() == want.tolist()
        assert g.scores.tolist() == np.repeat(v.scores, 16)[:frames].tolist()  # the ragged tail scored


def test_four_protocols_give_four_numbers(annotation_file: Path):
    """The point of the option: the same scores, four different published-style figures."""
    full = _inputs(annotation_file, lambda n: math.ceil(n / 16))
    aucs = {}
    for protocol in ("full", "sultani", "vadclip", "rtfm"):
        videos = [whole_snippets(v) for v in full] if protocol == "sultani" else full
        if protocol == "rtfm":
            videos = [v for v in videos if "Burglary" not in v.video]
        aucs[protocol] = frame_level_metrics(protocol_videos(protocol, videos, annotation_file), protocol)
    assert len({round(m["frame_auc"], 9) for m in aucs.values()}) == 4
    assert all(m["protocol"] == p for p, m in aucs.items())


def test_bootstrap_interval_is_seeded_and_brackets_the_figure(annotation_file: Path):
    videos = protocol_videos("full", _inputs(annotation_file, lambda n: math.ceil(n / 16)), annotation_file)
    a = bootstrap_intervals(videos, "full", resamples=200, seed=3)
    b = bootstrap_intervals(videos, "full", resamples=200, seed=3)
    assert a == b and a["resamples"] == 200 and a["unit"] == "video"
    lo, hi = a["frame_auc"]
    assert 0.0 <= lo < hi <= 1.0
    assert bootstrap_intervals(videos, "full", resamples=200, seed=4) != a
    # The same draws by hand: videos with replacement, one-label resamples drawn again.
    rng, aucs, aps = np.random.default_rng(3), [], []
    while len(aucs) < 200:
        pick = rng.integers(0, len(videos), len(videos))
        y = np.concatenate([videos[i].labels for i in pick])
        if y.min() == y.max():
            continue
        s = np.concatenate([videos[i].ranking for i in pick])
        aucs.append(roc_auc_score(y, s))
        aps.append(average_precision_score(y, s))
    assert a["frame_auc"] == pytest.approx([np.percentile(aucs, 2.5), np.percentile(aucs, 97.5)], abs=1e-12)
    assert a["frame_ap"] == pytest.approx([np.percentile(aps, 2.5), np.percentile(aps, 97.5)], abs=1e-12)


def test_false_alarm_rate_counts_normal_frames_at_the_threshold(annotation_file: Path):
    videos = protocol_videos("full", _inputs(annotation_file, lambda n: math.ceil(n / 16)), annotation_file)
    normal = videos[-1]
    for threshold in (0.3, 0.5, 0.8):
        metrics = frame_level_metrics(videos, "full", far_threshold=threshold)
        assert metrics["false_alarm_rate"] == pytest.approx(float((normal.scores >= threshold).mean()))


# ------------------------------------------------------- evaluate-scores, export-gt


def _split(tmp_path: Path) -> Path:
    path = tmp_path / "Anomaly_Test.txt"
    path.write_text("".join(f"{video}\n" for video, *_ in VIDEOS))
    return path


def test_export_gt_writes_the_references_arrays(tmp_path: Path, annotation_file: Path):
    videos = tmp_path / "videos.txt"
    counts = {video: math.ceil(frames / 16) for video, _, frames, _ in VIDEOS}
    videos.write_text("".join(f"{Path(v).stem} {n}\n" for v, n in counts.items()))
    export_ground_truth(annotation_file, videos, tmp_path / "gt_ucf.npy", protocol="vadclip")
    gt = np.load(tmp_path / "gt_ucf.npy")
    want = [x for (video, *_, line) in VIDEOS for x in vadclip_reference(line, counts[video])]
    assert gt.dtype == np.float32 and gt.tolist() == want
    frames = tmp_path / "frames.csv"
    frames.write_text("video,num_frames\n" + "".join(f"{Path(v).name},{n}\n" for v, _, n, _ in VIDEOS))
    export_ground_truth(annotation_file, videos, tmp_path / "gt_s.npy", protocol="sultani", num_frames=frames)
    want = [x for (_, _, n, line) in VIDEOS for x in sultani_reference(line, n, [0.0])[0]]
    assert np.load(tmp_path / "gt_s.npy").tolist() == want
    with pytest.raises(EvalInputError, match="needs each video's frame count"):
        export_ground_truth(annotation_file, videos, tmp_path / "x.npy", protocol="full")


def test_evaluate_scores_reads_any_layout_and_says_what_is_wrong(tmp_path: Path, annotation_file: Path):
    split = _split(tmp_path)
    scores_dir = tmp_path / "scores"
    scores_dir.mkdir()
    videos = _inputs(annotation_file, lambda n: math.ceil(n / 16))
    for v in videos:
        np.save(scores_dir / f"{Path(v.video).stem}.npy", v.scores.astype(np.float32))
    summary = evaluate_scores(scores_dir, annotation_file, split, tmp_path / "m.json", protocol="vadclip",
                              bootstrap_resamples=50)  # fmt: skip
    ranked = protocol_videos(
        "vadclip",
        [SnippetScores(v.video, v.label, v.annotation, np.float32(v.scores).astype(np.float64)) for v in videos],
        annotation_file,
    )
    assert summary["frame_auc"] == round(frame_level_metrics(ranked, "vadclip")["frame_auc"], 4)
    assert summary["protocol"] == "vadclip" and len(summary["method"]["intervals"]["frame_auc"]) == 2
    (scores_dir / f"{Path(videos[0].video).stem}.npy").unlink()
    with pytest.raises(EvalInputError, match="no scores for 1 test video.*Arson011_x264"):
        evaluate_scores(scores_dir, annotation_file, split, tmp_path / "m.json", protocol="vadclip")
    np.save(scores_dir / "Stealing001_x264.npy", np.zeros(3))
    np.save(scores_dir / "Arson011_x264.npy", np.zeros(3))
    with pytest.raises(EvalInputError, match="scores for Stealing001_x264, not in the test split"):
        evaluate_scores(scores_dir, annotation_file, split, tmp_path / "m.json", protocol="vadclip")
    (scores_dir / "Stealing001_x264.npy").unlink()
    frames = tmp_path / "frames.txt"
    frames.write_text("".join(f"{Path(v).name} {n}\n" for v, _, n, _ in VIDEOS))
    # Under full, 80 frames are 5 snippets: 4 scores are an error naming the video.
    np.save(scores_dir / "Fighting003_x264.npy", np.zeros(4))
    with pytest.raises(EvalInputError, match="Fighting003_x264: 80 frames make 5 snippets of 16, got"):
        evaluate_scores(scores_dir, annotation_file, split, tmp_path / "m.json", protocol="full",
                        num_frames=frames)  # fmt: skip


def test_evaluate_scores_refuses_what_would_give_a_wrong_number(tmp_path: Path, annotation_file: Path):
    split = _split(tmp_path)
    scores_dir = tmp_path / "scores"
    scores_dir.mkdir()
    for video, _, frames, _ in VIDEOS:
        np.save(scores_dir / f"{Path(video).stem}.npy", np.full(math.ceil(frames / 16), 0.5))
    run = {"protocol": "vadclip", "bootstrap_resamples": 0}
    # The same video twice in the split would count its frames twice.
    twice = tmp_path / "twice.txt"
    twice.write_text(split.read_text() + "Arson/old/Arson011_x264.mp4\n")
    with pytest.raises(EvalInputError, match="Arson011_x264.mp4 and Arson/old/Arson011_x264.mp4 are the same"):
        evaluate_scores(scores_dir, annotation_file, twice, tmp_path / "m.json", **run)
    with pytest.raises(EvalInputError, match="--name frame_auc: a key of the summary itself"):
        evaluate_scores(scores_dir, annotation_file, split, tmp_path / "m.json", name="frame_auc", **run)
    with pytest.raises(EvalInputError, match="is a directory"):
        evaluate_scores(scores_dir, annotation_file, split, tmp_path, **run)
    with pytest.raises(EvalInputError, match="is a file, not a directory"):
        evaluate_scores(scores_dir, annotation_file, split, split / "m.json", **run)
    # Past float32, a reference protocol cannot rank it.
    np.save(scores_dir / "Arson011_x264.npy", np.array([1e39, 0.5, 0.5]))
    with pytest.raises(EvalInputError, match="Arson011_x264: score .* beyond float32's range"):
        evaluate_scores(scores_dir, annotation_file, split, tmp_path / "m.json", **run)
    assert not (tmp_path / "m.json").exists()  # nothing written on any of these


def test_sultani_ties_follow_the_score_files_dir_order(annotation_file: Path):
    """Equal scores across videos: the order they come in changes Sultani's AUC, so it is the script's."""
    videos = [whole_snippets(v) for v in _inputs(annotation_file, lambda n: math.ceil(n / 16))]
    flat = [SnippetScores(v.video, v.label, v.annotation, np.full(v.scores.shape, 0.5), None, v.num_frames)
            for v in videos]  # fmt: skip
    forward = frame_level_metrics(protocol_videos("sultani", flat, annotation_file), "sultani")["frame_auc"]
    backward = frame_level_metrics(protocol_videos("sultani", flat[::-1], annotation_file), "sultani")
    assert backward["frame_auc"] == forward  # the input order does not matter: dir() order does
    gt, scores = [], []
    for i in sorted(range(len(VIDEOS)), key=lambda i: Path(VIDEOS[i][0]).name):
        g, d = sultani_reference(VIDEOS[i][3], VIDEOS[i][2], flat[i].scores.tolist())
        gt, scores = gt + g, scores + d
    assert forward == pytest.approx(sultani_reference_auc(gt, scores), abs=1e-12)


@pytest.mark.parametrize("protocol", ["full", "sultani", "vadclip", "rtfm", "xdviodet"])
def test_runs_of_equal_frames_weigh_as_the_frames_do(protocol: str):
    """The bootstrap scores runs of equal (label, score) frames as one weighted row: the same figures."""
    from fgclip.eval.frame_metrics import _runs
    from fgclip.eval.protocols import protocol_ap, protocol_auc

    rng = np.random.default_rng(7)
    labels = np.repeat(rng.integers(0, 2, 60), rng.integers(1, 20, 60)).astype(np.int8)
    scores = np.repeat(np.round(rng.random(labels.size // 4 + 1), 1), 4)[: labels.size]  # many ties
    s, y, w = _runs(labels, scores)
    assert w.sum() == labels.size and len(w) < labels.size
    assert protocol_auc(protocol, y, s, w) == pytest.approx(protocol_auc(protocol, labels, scores), abs=1e-12)
    assert protocol_ap(protocol, y, s, w) == pytest.approx(protocol_ap(protocol, labels, scores), abs=1e-12)
