"""The ``evaluate`` stage end to end on the tiny generated sample, with tiny saved models."""

from __future__ import annotations

import json
import shutil
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
import pytest
import torch
from sklearn.metrics import average_precision_score, roc_auc_score

from fgclip.cli import main
from fgclip.config import Params
from fgclip.data.dataset import read_boxes
from fgclip.data.layout import DatasetError, read_scores
from fgclip.data.ucf import read_split, read_temporal_annotations
from fgclip.eval.evaluate import (
    build_untrained,
    decoded_test_videos,
    eval_frame_paths,
    evaluate,
    training_run,
)
from fgclip.eval.protocol import EvalInputError, build_test_set, snippet_to_frames
from fgclip.eval.zeroshot import class_embeddings, frame_features, grid_boxes, region_grid_log_odds
from fgclip.model.fgclip import FGCLIPVideoModel
from fgclip.model.tokenizer import load_tokenizer
from fgclip.train import tracking

MODELS = ("finetuned", "pretrained", "untrained")


@pytest.fixture(scope="module")
def run_eval(
    eval_params: Params,
    tiny_frames: Path,
    tiny_sample: Path,
    tiny_boxes: Path,
    tmp_path_factory: pytest.TempPathFactory,
) -> Callable[..., tuple[dict, Path]]:
    """``run_eval(model_dir, pretrained, frames_dir=..., boxes_dir=..., ...)`` -> (summary, output dir)."""

    def run(
        model_dir: Path,
        pretrained: Path | None,
        frames_dir: Path = tiny_frames,
        boxes_dir: Path | None = tiny_boxes,
        params: Params = eval_params,
        data_root: Path = tiny_sample,
    ) -> tuple[dict, Path]:
        out = tmp_path_factory.mktemp("eval")
        summary = evaluate(
            params,
            frames_dir,
            model_dir,
            pretrained,
            data_root,
            out / "metrics" / "eval.json",
            out / "eval" / "frame_scores.parquet",
            out / "plots" / "roc.csv",
            boxes_dir=boxes_dir,
        )
        return summary, out

    return run


@pytest.fixture(scope="module")
def first_run(run_eval, save_model_dir: Callable[[int], Path], pretrained_dir: Path) -> tuple[dict, Path]:
    return run_eval(save_model_dir(1), pretrained_dir)


def scores_of(out: Path, model: str) -> dict[str, list]:
    table = read_scores(out / "eval" / "frame_scores.parquet")
    return table.filter(pc.equal(table["model"], model)).to_pydict()


def test_end_to_end_writes_all_three_models(
    first_run, tiny_frames: Path, tiny_sample: Path, eval_params: Params
):
    summary, out = first_run
    assert json.loads((out / "metrics" / "eval.json").read_text()) == summary
    assert summary["frame_auc"] == summary["finetuned"]["frame_auc"]
    split = read_split(tiny_sample / eval_params.data.test_split)
    videos = pq.read_table(tiny_frames / "videos.parquet").to_pydict()
    test_frames = sum(n for v, n in zip(videos["video"], videos["num_frames"]) if v in split)
    for name in MODELS:
        m = summary[name]
        assert m["num_videos"] == len(split) and m["num_frames"] == test_frames
        assert set(m["per_class_auc"]) == {"Arson", "RoadAccidents"}
        rows = scores_of(out, name)
        assert len(rows["score"]) == test_frames
        assert all(0.0 <= s <= 1.0 for s in rows["score"])
        # Every metric can be recomputed from the Parquet rows: the AUC ranks by the
        # log-odds, of which the score is the sigmoid (same order, no saturation at 1.0).
        assert roc_auc_score(rows["label"], rows["log_odds"]) == pytest.approx(m["frame_auc"], abs=1e-4)
        assert np.allclose(1 / (1 + np.exp(-np.asarray(rows["log_odds"]))), rows["score"])
        assert m["frame_auc"] == round(m["frame_auc"], 4)
    assert summary["skipped_videos"] == [] and summary["clipped_intervals"] == []
    assert summary["scoring"] == "frame"
    roc = (out / "plots" / "roc.csv").read_text().splitlines()
    assert roc[0] == "fpr,tpr,threshold" and len(roc) > 2
    assert scores_of(out, "untrained")["score"] != scores_of(out, "finetuned")["score"]


def test_held_out_region_metrics_for_all_three_models(first_run, tiny_boxes: Path, tiny_sample: Path):
    summary, _ = first_run
    rows = read_boxes(tiny_boxes, "test").to_pylist()
    regions = {(r["video"], r["region"]) for r in rows}
    assert summary["held_out"] == {
        "videos": len({r["video"] for r in rows}),
        "regions": len(regions),
        "region_captions": len({r["region_caption"] for r in rows}),
        "hardneg_regions": len({(r["video"], r["region"]) for r in rows if r["region_negatives"]}),
        "hardneg_captions": len({t for r in rows for t in r["region_negatives"]}),
        "retrieval_queries": len({r["video"] for r in rows}),
        "retrieval_videos": len(read_split(tiny_sample / "Anomaly_Test.txt")),
    }
    assert summary["held_out"]["hardneg_regions"] > 0
    for name in MODELS:
        m = summary[name]
        for key in ("region_top1", "hardneg_accuracy", "retrieval_r1", "retrieval_r5"):
            assert 0.0 <= m[key] <= 1.0 and m[key] == round(m[key], 4)
        assert m["retrieval_r1"] <= m["retrieval_r5"]
    assert [summary["pretrained"][k] for k in ("region_top1", "retrieval_r1", "retrieval_r5")] != [
        summary["untrained"][k] for k in ("region_top1", "retrieval_r1", "retrieval_r5")
    ]


def test_region_grid_scoring_changes_the_scoring_path(
    first_run,
    run_eval,
    save_model_dir: Callable[[int], Path],
    eval_params: Params,
    tiny_sample: Path,
    tiny_frames: Path,
):
    _, frame_out = first_run
    params = eval_params.with_overrides(evaluate={"scoring": "region_grid", "region_grid": 2})
    model_dir = save_model_dir(1)
    summary, out = run_eval(model_dir, None, params=params)
    assert summary["scoring"] == "region_grid"
    grid_rows, frame_rows = scores_of(out, "finetuned"), scores_of(frame_out, "finetuned")
    assert grid_rows["video"] == frame_rows["video"] and grid_rows["frame"] == frame_rows["frame"]
    assert not np.allclose(grid_rows["log_odds"], frame_rows["log_odds"], atol=1e-3)
    # The region metrics do not depend on how frames are scored.
    for key in ("region_top1", "retrieval_r1", "retrieval_r5"):
        assert summary["finetuned"][key] == first_run[0]["finetuned"][key]

    # The stage's scores are the region-grid reference on the first test video.
    model = FGCLIPVideoModel.from_pretrained(model_dir).eval()
    cfg = params.evaluate
    names, classes = class_embeddings(model, load_tokenizer(model_dir), cfg.prompts, cfg.templates, 16, 8)
    video = _test_set(params, tiny_sample, tiny_frames)[0]
    paths = eval_frame_paths(tiny_frames, [video], 16)[video.video]
    [(_, regions)] = frame_features([model], paths, 8, grid_boxes(2))
    expected = snippet_to_frames(
        region_grid_log_odds(model, regions, classes, names.index("Normal")).numpy(), video.labels.size
    )
    got = [lo for v, lo in zip(grid_rows["video"], grid_rows["log_odds"]) if v == video.video]
    np.testing.assert_allclose(got, expected, atol=1e-6)


def test_untrained_baseline_comes_from_the_seed_not_the_model_dir(
    first_run, run_eval, save_model_dir: Callable[[int], Path], eval_params: Params
):
    _, first_out = first_run
    other_dir = save_model_dir(2)
    summary, out = run_eval(other_dir, None, boxes_dir=None)
    # Different fine-tuned weights, identical untrained baseline: nothing of it comes from model_dir.
    assert scores_of(out, "finetuned")["score"] != scores_of(first_out, "finetuned")["score"]
    assert scores_of(out, "untrained")["score"] == scores_of(first_out, "untrained")["score"]
    assert summary["pretrained"] == {"skipped": "no pretrained CLIP given"}
    assert scores_of(out, "pretrained")["score"] == []
    assert summary["held_out"] == {"skipped": "no boxes directory given"}
    assert summary["finetuned"]["region_top1"] is None and summary["untrained"]["retrieval_r5"] is None

    finetuned = FGCLIPVideoModel.from_pretrained(other_dir)
    untrained = build_untrained(finetuned, eval_params.train.seed)
    again = build_untrained(finetuned, eval_params.train.seed)
    key = "clip.vision_model.embeddings.patch_embedding.weight"
    assert not torch.equal(untrained.state_dict()[key], finetuned.state_dict()[key])
    assert torch.equal(untrained.state_dict()[key], again.state_dict()[key])


def test_failed_test_video_fails_evaluation_unless_allowed_then_is_recorded(
    run_eval, eval_params: Params, save_model_dir: Callable[[int], Path], tiny_frames: Path, tmp_path: Path
):
    frames = tmp_path / "frames"
    shutil.copytree(tiny_frames, frames)
    videos = pq.read_table(frames / "videos.parquet")
    victim = "Arson/Arson003_x264.mp4"
    assert victim in videos["video"].to_pylist()
    status = pc.if_else(pc.equal(videos["video"], victim), "failed", videos["status"])
    pq.write_table(
        videos.set_column(videos.column_names.index("status"), "status", status), frames / "videos.parquet"
    )
    with pytest.raises(EvalInputError, match=f"1 test video.*failed to decode \\({victim}\\).*allow_missing_videos"):
        run_eval(save_model_dir(1), None, frames_dir=frames)
    allowed = eval_params.with_overrides(evaluate={"allow_missing_videos": True})
    summary, out = run_eval(save_model_dir(1), None, frames_dir=frames, params=allowed)
    assert [s["video"] for s in summary["skipped_videos"]] == [victim]
    assert summary["finetuned"]["num_videos"] == 5
    assert victim not in scores_of(out, "finetuned")["video"]


def test_model_dir_without_model_is_an_error(run_eval, tmp_path: Path):
    empty = tmp_path / "models" / "fgclip"
    empty.mkdir(parents=True)
    with pytest.raises(EvalInputError, match=f"{empty}: no fine-tuned model .*model.safetensors"):
        run_eval(empty, None)


@pytest.mark.parametrize(
    ("broken", "match"),
    [
        ("weights", r"model\.safetensors: weights do not fit the model"),
        ("config", r"fgclip_config\.json: not an FG-CLIP model config"),
        ("keys", r"fgclip_config\.json: not an FG-CLIP model config.*model_config"),
    ],
)
def test_model_dir_with_a_broken_model_is_an_error(
    run_eval, save_model_dir: Callable[[int], Path], tmp_path: Path, broken: str, match: str
):
    model_dir = tmp_path / "fgclip"
    shutil.copytree(save_model_dir(1), model_dir)
    if broken == "weights":
        data = (model_dir / "model.safetensors").read_bytes()
        (model_dir / "model.safetensors").write_bytes(data[: len(data) // 2])  # an interrupted copy
    elif broken == "config":
        (model_dir / "fgclip_config.json").write_text("{not json")
    else:
        config = json.loads((model_dir / "fgclip_config.json").read_text())
        del config["model_config"]
        (model_dir / "fgclip_config.json").write_text(json.dumps(config))
    with pytest.raises(EvalInputError, match=f"{model_dir}/{match}"):
        run_eval(model_dir, None)


def test_no_test_box_rows_skips_the_region_metrics(
    run_eval, save_model_dir: Callable[[int], Path], tiny_boxes: Path, tmp_path: Path
):
    boxes = tmp_path / "boxes"
    shutil.copytree(tiny_boxes, boxes)
    manifest = json.loads((boxes / "manifest.json").read_text())
    for shard in manifest["shards"]:
        table = pq.read_table(boxes / shard["path"])
        pq.write_table(table.filter(pc.equal(table["split"], "train")), boxes / shard["path"])
    summary, _ = run_eval(save_model_dir(1), None, boxes_dir=boxes)
    assert summary["held_out"] == {"skipped": f"no accepted box rows of evaluated test videos in {boxes}"}
    assert summary["finetuned"]["region_top1"] is None
    assert summary["finetuned"]["frame_auc"] is not None


def test_missing_box_manifest_is_an_error(run_eval, save_model_dir: Callable[[int], Path], tmp_path: Path):
    with pytest.raises(DatasetError, match=f"{tmp_path / 'boxes' / 'manifest.json'}: not found"):
        run_eval(save_model_dir(1), None, boxes_dir=tmp_path / "boxes")


def test_metrics_logged_to_the_training_run(
    run_eval, save_model_dir: Callable[[int], Path], eval_params: Params, tmp_path: Path
):
    model_dir = tmp_path / "fgclip"
    shutil.copytree(save_model_dir(1), model_dir)
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    params = eval_params.with_overrides(tracking={"uri": uri, "experiment": "eval-tests"})
    with tracking.Tracker(params, "fgclip-test") as tracker:
        run_id = tracker.run_id
    (model_dir / "run.json").write_text(
        json.dumps({"run_id": run_id, "tracking_uri": uri, "experiment_id": "1"})
    )
    summary, out = run_eval(model_dir, None)
    run = tracking._client(uri).get_run(run_id)
    assert run.data.metrics["eval.frame_auc"] == pytest.approx(summary["frame_auc"], abs=1e-4)
    assert run.data.metrics["eval.untrained.frame_auc"] == pytest.approx(
        summary["untrained"]["frame_auc"], abs=1e-4
    )
    assert "eval.pretrained.frame_auc" not in run.data.metrics
    for key in ("region_top1", "retrieval_r1", "retrieval_r5"):
        assert run.data.metrics[f"eval.finetuned.{key}"] == pytest.approx(summary["finetuned"][key], abs=1e-4)
    client = tracking._client(uri)
    artifacts = {a.path for a in client.list_artifacts(run_id)}
    assert {"frame_scores.parquet", "eval.json", "roc.csv", "roc.png"} <= artifacts
    # The files themselves are in the run's artifact store: a real PNG, the full scores table.
    fetched = Path(client.download_artifacts(run_id, "roc.png", str(tmp_path / "fetched")))
    assert fetched.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and fetched.stat().st_size > 5000
    fetched = Path(client.download_artifacts(run_id, "frame_scores.parquet", str(tmp_path / "fetched")))
    assert pq.read_table(fetched).equals(pq.read_table(out / "eval" / "frame_scores.parquet"))


def test_malformed_run_json_is_an_error(tmp_path: Path):
    (tmp_path / "run.json").write_text('{"run_id": "abc"}')
    with pytest.raises(EvalInputError, match="run.json: expected a JSON object with run_id and tracking_uri"):
        training_run(tmp_path)
    (tmp_path / "run.json").unlink()
    assert training_run(tmp_path) is None


# --- input checks that need no model ------------------------------------------


def _test_set(params: Params, data_root: Path, frames_dir: Path):
    split_path = data_root / params.data.test_split
    ann_path = data_root / params.data.temporal_annotations
    split = read_split(split_path)
    decoded, _ = decoded_test_videos(split, frames_dir)
    return build_test_set(split, read_temporal_annotations(ann_path), decoded, split_path, ann_path)


def _rewrite_index(src: Path, dst: Path, edit: Callable[[pa.Table], pa.Table]) -> Path:
    dst.mkdir()
    for name in ("videos.parquet", "index.parquet"):
        shutil.copy(src / name, dst / name)
    pq.write_table(edit(pq.read_table(dst / "index.parquet")), dst / "index.parquet")
    return dst


def test_eval_frames_follow_the_snippet_protocol(eval_params: Params, tiny_sample: Path, tiny_frames: Path):
    test_set = _test_set(eval_params, tiny_sample, tiny_frames)
    paths = eval_frame_paths(tiny_frames, test_set, 16)
    for video in test_set:
        frames = [int(p.stem) for p in paths[video.video]]
        assert len(frames) == -(-video.labels.size // 16)
        assert [f // 16 for f in frames] == list(range(len(frames)))
        assert all(p.is_file() for p in paths[video.video])


def test_missing_eval_frame_is_an_error(
    eval_params: Params, tiny_sample: Path, tiny_frames: Path, tmp_path: Path
):
    test_set = _test_set(eval_params, tiny_sample, tiny_frames)
    video = test_set[0].video

    def drop_last(index: pa.Table) -> pa.Table:
        rows = np.flatnonzero(
            (index["video"].to_numpy(zero_copy_only=False) == video)
            & (index["purpose"].to_numpy(zero_copy_only=False) == "eval")
        )
        keep = np.ones(index.num_rows, dtype=bool)
        keep[rows[index["frame"].to_numpy()[rows].argmax()]] = False
        return index.filter(pa.array(keep))

    frames = _rewrite_index(tiny_frames, tmp_path / "frames", drop_last)
    with pytest.raises(EvalInputError, match=f"index.parquet: {video} has .* eval frames"):
        eval_frame_paths(frames, test_set, 16)


def test_frame_path_outside_frames_dir_is_an_error(
    eval_params: Params, tiny_sample: Path, tiny_frames: Path, tmp_path: Path
):
    test_set = _test_set(eval_params, tiny_sample, tiny_frames)

    def escape(index: pa.Table) -> pa.Table:
        paths = pc.if_else(pc.equal(index["purpose"], "eval"), "../../etc/passwd", index["path"])
        return index.set_column(index.column_names.index("path"), "path", paths)

    frames = _rewrite_index(tiny_frames, tmp_path / "frames", escape)
    with pytest.raises(EvalInputError, match="points outside"):
        eval_frame_paths(frames, test_set, 16)


def test_test_video_absent_from_frames_is_an_error(tiny_sample: Path, tiny_frames: Path, tmp_path: Path):
    split = read_split(tiny_sample / "Anomaly_Test.txt") + ["Arson/Arson999_x264.mp4"]
    with pytest.raises(EvalInputError, match=r"videos\.parquet: test video\(s\) Arson/Arson999_x264\.mp4"):
        decoded_test_videos(split, tiny_frames)


# --- the temporal annotation and the split disagree: errors name the file and the entry ----------


def _data_root(src: Path, dst: Path, split: list[str] | None = None, lines: list[str] | None = None) -> Path:
    dst.mkdir()
    for name in ("Anomaly_Test.txt", "Temporal_Anomaly_Annotation_for_Testing_Videos.txt"):
        shutil.copy(src / name, dst / name)
    if split is not None:
        (dst / "Anomaly_Test.txt").write_text("".join(f"{v}\n" for v in split))
    if lines is not None:
        (dst / "Temporal_Anomaly_Annotation_for_Testing_Videos.txt").write_text(
            "".join(f"{x}\n" for x in lines)
        )
    return dst


@pytest.mark.parametrize("case", ["missing", "extra", "past_end", "empty"])
def test_split_and_temporal_annotation_disagreeing_is_an_error(
    run_eval,
    save_model_dir: Callable[[int], Path],
    tiny_sample: Path,
    tiny_frames: Path,
    tmp_path: Path,
    case: str,
):
    split = read_split(tiny_sample / "Anomaly_Test.txt")
    ann_file = tiny_sample / "Temporal_Anomaly_Annotation_for_Testing_Videos.txt"
    lines = ann_file.read_text().splitlines()
    victim = split[0]
    victim_name = victim.split("/")[-1]
    victim_line = next(x for x in lines if x.startswith(victim_name))
    if case == "missing":
        root = _data_root(tiny_sample, tmp_path / "data", lines=[x for x in lines if x != victim_line])
        match = f"{root / ann_file.name}: no temporal annotation for test video\\(s\\) {victim}"
    elif case == "extra":
        root = _data_root(tiny_sample, tmp_path / "data", split=split[1:])
        match = f"{root / ann_file.name}: entry {victim_name} is not a test video"
    elif case == "past_end":
        # The annotation was made on a longer video than the one decoded.
        num_frames = dict(
            zip(
                *pq.read_table(tiny_frames / "videos.parquet", columns=["video", "num_frames"])
                .to_pydict()
                .values()
            )
        )
        n = num_frames[victim]
        fields = victim_line.split("  ")
        fields[2:4] = [str(n + 5), str(n + 20)]
        edited = [("  ".join(fields) if x == victim_line else x) for x in lines]
        root = _data_root(tiny_sample, tmp_path / "data", lines=edited)
        match = f"{root / ann_file.name}: {victim_name}: interval \\[{n + 5}, {n + 20}\\] starts past the video's end \\(decoded {n} frames"
    else:
        root = _data_root(tiny_sample, tmp_path / "data", split=[], lines=[])
        match = f"empty test set: {root / 'Anomaly_Test.txt'} lists no videos"
    with pytest.raises(EvalInputError, match=match):
        run_eval(save_model_dir(1), None, data_root=root)


def _vadclip_by_hand(annotation_lines: list[str], snippets: dict[str, np.ndarray], order: list[str]):
    """VadCLIP's make_gt_ucf.py + ucf_test.py, rewritten: the first line holding the name, two-space
    fields, [1:-1], gt[s:e] on (S + 1) * 16 zeros, the last 16 dropped; float32 probabilities x 16."""
    gt, ranked = [], []
    for video in order:
        name = Path(video).stem
        scores = snippets[video]
        vec = np.zeros((len(scores) + 1) * 16, dtype=np.float32)
        if "Normal" not in name:
            line = next(line for line in annotation_lines if name in line)
            content = line.strip("\n").split("  ")[1:-1]
            for i in range(1, len(content) - 1, 2):
                s, e = int(content[i]), int(content[i + 1])
                if s != -1 and e != -1:
                    vec[s:e] = 1.0
        gt.extend(vec[:-16])
        ranked.extend(np.repeat(np.float32(scores).tolist(), 16))
    return roc_auc_score(gt, ranked), average_precision_score(gt, ranked)


def test_evaluate_scores_on_the_samples_finetuned_scores_equals_vadclips_rules(
    first_run, tiny_sample: Path, eval_params: Params, tmp_path: Path
):
    """The sample's fine-tuned snippet scores, exported as a method would release them, scored by
    `fgclip evaluate-scores --protocol vadclip`, against VadCLIP's rules recomputed here."""
    _, out = first_run
    rows = scores_of(out, "finetuned")
    table = pa.table({"video": rows["video"], "snippet": rows["snippet"], "score": rows["score"]})
    snippet_rows = table.group_by(["video", "snippet"], use_threads=False).aggregate([("score", "first")])
    pq.write_table(snippet_rows.rename_columns(["video", "snippet", "score"]), tmp_path / "scores.parquet")
    snippets: dict[str, list] = {}
    for video, snippet, score in zip(*(snippet_rows[c].to_pylist() for c in ("video", "snippet", "score_first"))):
        snippets.setdefault(video, {})[snippet] = score
    snippets = {v: np.array([d[k] for k in sorted(d)]) for v, d in snippets.items()}
    split_path = tiny_sample / eval_params.data.test_split
    ann_path = tiny_sample / eval_params.data.temporal_annotations
    order = read_split(split_path)
    want_auc, want_ap = _vadclip_by_hand(ann_path.read_text().splitlines(keepends=True), snippets, order)
    result = tmp_path / "vadclip.json"
    assert main(["evaluate-scores", str(tmp_path / "scores.parquet"), "--protocol", "vadclip",
                 "--annotations", str(ann_path), "--split", str(split_path), "--out", str(result)]) == 0  # fmt: skip
    written = json.loads(result.read_text())
    assert written["protocol"] == "vadclip" and written["headline"] == "frame_auc"
    assert written["method"]["frame_auc"] == pytest.approx(want_auc, abs=1e-6)
    assert written["method"]["frame_ap"] == pytest.approx(want_ap, abs=1e-6)
    lo, hi = written["method"]["intervals"]["frame_auc"]
    assert lo <= written["method"]["frame_auc"] <= hi
    auc_cell = f"{100 * want_auc:.2f} [{100 * lo:.2f}, {100 * hi:.2f}]"
    assert written["table_row"].startswith(f"| method | vadclip | {auc_cell} | {100 * want_ap:.2f} [")


def test_evaluate_reports_its_protocol_and_intervals(
    run_eval, eval_params: Params, save_model_dir: Callable[[int], Path], first_run
):
    full, _ = first_run
    assert full["protocol"] == "full" and full["finetuned"]["protocol"] == "full"
    lo, hi = full["finetuned"]["intervals"]["frame_auc"]
    assert lo <= full["finetuned"]["frame_auc"] <= hi
    assert full["finetuned"]["false_alarm_rate"] is not None
    params = eval_params.with_overrides(evaluate={"protocol": "vadclip", "bootstrap_resamples": 0})
    summary, _ = run_eval(save_model_dir(1), None, params=params)
    assert summary["protocol"] == "vadclip" and "intervals" not in summary["finetuned"]
    # Same scores, VadCLIP's frames (16 per snippet, the ragged tail padded to 16): other counts.
    assert summary["finetuned"]["num_frames"] != full["finetuned"]["num_frames"]
    assert summary["finetuned"]["num_frames"] % 16 == 0
