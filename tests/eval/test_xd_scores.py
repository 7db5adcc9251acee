"""XD-Violence through `fgclip evaluate-scores --dataset xd`, against its references' rules by hand."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from sklearn.metrics import auc, average_precision_score, precision_recall_curve, roc_auc_score

from fgclip.cli import main
from fgclip.data.xd import write_mini_xd_sample
from fgclip.eval.protocol import EvalInputError
from fgclip.eval.score_eval import evaluate_scores, export_ground_truth


@pytest.fixture()
def xd(tmp_path: Path) -> dict:
    sample = write_mini_xd_sample(tmp_path / "xd", seed=5)
    rng = np.random.default_rng(1)
    scores = tmp_path / "scores"
    scores.mkdir()
    sample["scores"] = {}
    for name in sample["videos"]:
        values = rng.random(sample["num_snippets"][name]).astype(np.float32)
        np.save(scores / f"{name}__0.npy", values)  # the centre crop's file name, as released
        sample["scores"][name] = values
    sample["scores_dir"] = scores
    return sample


def _by_hand(sample: dict, frames: dict[str, int] | None):
    """VadCLIP's make_gt_xd.py ((T + 1) * 16, gt[s:e], drop 16) or XDVioDet's make_gt.py (N frames,
    gt[s:e], drop the last frame and (N - 1) % 16 more); both rank float32 scores repeated 16 times."""
    lines = sample["annotations"].read_text().splitlines()
    gt, ranked = [], []
    for name in sample["videos"]:
        t = sample["num_snippets"][name]
        n = (t + 1) * 16 if frames is None else frames[name]
        vec = np.zeros(n, dtype=np.float32)
        if "_label_A" not in name:
            line = next(line for line in lines if name in line).split()
            for k in range(1, len(line), 2):
                vec[int(line[k]) : int(line[k + 1])] = 1.0
        vec = vec[:-16] if frames is None else vec[: n - 1 - (n - 1) % 16]
        gt.extend(vec)
        ranked.extend(np.repeat(sample["scores"][name], 16))
    return gt, ranked


def test_vadclip_rules_on_a_mini_xd_violence_set(xd: dict, tmp_path: Path):
    out = tmp_path / "xd.json"
    args = ["evaluate-scores", str(xd["scores_dir"]), "--dataset", "xd", "--annotations", str(xd["annotations"]),
            "--split", str(xd["test_list"]), "--out", str(out)]  # fmt: skip
    assert main(args) == 0
    written = json.loads(out.read_text())
    gt, ranked = _by_hand(xd, None)
    assert written["headline"] == "frame_ap" and written["protocol"] == "vadclip" and written["dataset"] == "xd"
    assert written["method"]["frame_ap"] == pytest.approx(average_precision_score(gt, ranked), abs=1e-6)
    assert written["method"]["frame_auc"] == pytest.approx(roc_auc_score(gt, ranked), abs=1e-6)
    precision, recall, _ = precision_recall_curve(gt, ranked)
    assert written["method"]["frame_ap_trapezoid"] == pytest.approx(auc(recall, precision), abs=1e-6)
    export_ground_truth(xd["annotations"], _video_list(xd, tmp_path), tmp_path / "gt.npy", dataset="xd")
    assert np.load(tmp_path / "gt.npy").tolist() == gt


def _video_list(xd: dict, tmp_path: Path) -> Path:
    path = tmp_path / "videos.txt"
    path.write_text("".join(f"{name} {xd['num_snippets'][name]}\n" for name in xd["videos"]))
    return path


def test_xdviodet_rules_take_the_length_from_the_video(xd: dict, tmp_path: Path):
    rng = np.random.default_rng(2)
    # N frames with floor((N - 1) / 16) = T: the decoded count the I3D features came from.
    frames = {name: 16 * t + 1 + int(rng.integers(0, 16)) for name, t in xd["num_snippets"].items()}
    counts = tmp_path / "frames.txt"
    counts.write_text("".join(f"{name}.mp4 {n}\n" for name, n in frames.items()))
    summary = evaluate_scores(xd["scores_dir"], xd["annotations"], xd["test_list"], tmp_path / "m.json",
                              dataset="xd", protocol="xdviodet", num_frames=counts, bootstrap_resamples=0)  # fmt: skip
    gt, ranked = _by_hand(xd, frames)
    precision, recall, _ = precision_recall_curve(gt, ranked)
    assert summary["method"]["frame_ap"] == pytest.approx(auc(recall, precision), abs=1e-6)
    assert summary["method"]["frame_ap_step"] == pytest.approx(average_precision_score(gt, ranked), abs=1e-6)
    # A frame count that does not give the scored snippet count names the video.
    first = xd["videos"][0]
    counts.write_text("".join(f"{name} {n + 16 * (name == first)}\n" for name, n in frames.items()))
    with pytest.raises(EvalInputError, match=f"{first}: .*snippets of 16, but num_snippets is"):
        evaluate_scores(xd["scores_dir"], xd["annotations"], xd["test_list"], tmp_path / "m.json",
                        dataset="xd", protocol="xdviodet", num_frames=counts)  # fmt: skip


def test_xd_scores_must_cover_the_test_list(xd: dict, tmp_path: Path):
    victim = xd["normal"][0]
    (xd["scores_dir"] / f"{victim}__0.npy").unlink()
    with pytest.raises(EvalInputError, match=f"no scores for 1 test video.*{victim}"):
        evaluate_scores(xd["scores_dir"], xd["annotations"], xd["test_list"], tmp_path / "m.json", dataset="xd")
    with pytest.raises(EvalInputError, match="protocol 'rtfm' for xd: choose one of vadclip, xdviodet"):
        evaluate_scores(xd["scores_dir"], xd["annotations"], xd["test_list"], tmp_path / "m.json",
                        dataset="xd", protocol="rtfm")  # fmt: skip
