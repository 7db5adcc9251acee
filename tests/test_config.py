"""`params.paths`: every stage path resolved once; `model_source`: the one directory-or-hub-id rule."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest

from fgclip.config import Params, Paths, load_params, model_source

REPO = Path(__file__).resolve().parents[1]
HUB_ID = "openai/clip-vit-base-patch32"

# The paths the stages wrote before they were params (literals in the CLI and the training
# loop): the defaults must keep every output where it was.
DEFAULTS = {
    "sample": "data/sample",
    "data_root": "data/sample",
    "videos": "data/sample/videos",
    "train_split": "data/sample/Anomaly_Train.txt",
    "test_split": "data/sample/Anomaly_Test.txt",
    "temporal_annotations": "data/sample/Temporal_Anomaly_Annotation_for_Testing_Videos.txt",
    "annotations": "data/sample/annotations.json",
    "frames": "data/frames",
    "boxes": "data/boxes",
    "boxes_metrics": "metrics/boxes.json",
    "stand_in": "models/clip-pretrained",
    "model": "models/fgclip",
    "checkpoints": "checkpoints",
    "health": "metrics/health.json",
    "train_metrics": "metrics/train.json",
    "loss_curve": "plots/train_loss.csv",
    "eval_metrics": "metrics/eval.json",
    "scores": "data/eval/frame_scores.parquet",
    "roc": "plots/roc.csv",
}


@pytest.mark.parametrize(
    "params", [load_params(REPO / "params.yaml"), Params(base_dir=REPO)], ids=["yaml", "code"]
)
def test_default_paths_are_where_the_stages_always_wrote(params: Params):
    """params.yaml and the code defaults agree, and both put every file where it was."""
    assert {f.name for f in dataclasses.fields(Paths)} == set(DEFAULTS)
    assert dataclasses.asdict(params.paths) == {name: REPO / rel for name, rel in DEFAULTS.items()}


def test_paths_resolve_against_the_params_file_not_the_working_directory(tmp_path, monkeypatch):
    params_file = tmp_path / "cfg" / "params.yaml"
    params_file.parent.mkdir()
    params_file.write_text("frames:\n  out: /abs/frames\ntrain:\n  metrics: out/train.json\n")
    monkeypatch.chdir(tmp_path)
    paths = load_params(params_file).paths
    assert paths.frames == Path("/abs/frames")  # absolute: as written
    assert paths.train_metrics == tmp_path / "cfg" / "out" / "train.json"
    assert all(p.is_absolute() for p in dataclasses.astuple(paths))


def test_another_data_root_moves_only_the_dataset_files():
    params = load_params(REPO / "params.yaml")
    default, other = params.paths, params.resolve_paths(data_root=Path("elsewhere/UCF"))
    dataset = {"data_root", "videos", "train_split", "test_split", "temporal_annotations", "annotations"}
    for name in DEFAULTS:
        if name in dataset:  # relative to the given root, kept as given (the CLI's --data-root)
            assert getattr(other, name) == Path("elsewhere/UCF") / getattr(default, name).relative_to(
                default.data_root
            )
        else:
            assert getattr(other, name) == getattr(default, name)
    assert Paths.key("annotations") == "data.annotations" and Paths.key("frames") == "frames.out"


def test_a_real_data_root_is_never_the_sample_stages_output():
    """DVC removes a stage's outputs before running it: the sample writes only sample.out."""
    params = load_params(REPO / "params.yaml").with_overrides(data={"root": "/datasets/UCF_Crimes"})
    assert params.paths.data_root == Path("/datasets/UCF_Crimes")
    assert params.paths.sample == REPO / "data" / "sample"
    dvc = (REPO / "dvc.yaml").read_text(encoding="utf-8")
    assert "      - ${sample.out}\n" in dvc.split("extract_frames:")[0]


def test_pretrained_source_is_the_override_then_model_pretrained_then_the_stand_in():
    params = load_params(REPO / "params.yaml")
    assert params.pretrained_source() == str(params.paths.stand_in)
    assert params.pretrained_source("some/dir") == "some/dir"
    hub = params.with_overrides(model={"pretrained": HUB_ID})
    assert hub.pretrained_source() == HUB_ID


def test_model_source_local_path_or_hub_id(tmp_path):
    model_dir, model_file = tmp_path / "clip", tmp_path / "weights.bin"
    model_dir.mkdir()
    model_file.write_bytes(b"x")
    assert model_source(HUB_ID) == HUB_ID and isinstance(model_source(HUB_ID), str)
    assert model_source(str(tmp_path / "missing")) == str(tmp_path / "missing")  # a name nothing on disk has
    assert model_source(str(model_dir)) == model_dir  # a string naming a directory
    assert model_source(str(model_file)) == model_file  # local, though not a model directory
    assert model_source(tmp_path / "missing") == tmp_path / "missing"  # a Path is always local


def test_every_caller_applies_the_model_source_rule(tmp_path):
    """Training's fingerprint hashes a local directory only; evaluation refuses a local non-directory."""
    from fgclip.eval.evaluate import EvalInputError, load_pretrained
    from fgclip.train.checkpoints import input_fingerprint

    model_dir, model_file = tmp_path / "clip", tmp_path / "weights.bin"
    model_dir.mkdir()
    (model_dir / "config.json").write_text("{}")
    model_file.write_bytes(b"x")
    frames, boxes = tmp_path / "frames", tmp_path / "boxes"
    frames.mkdir()
    boxes.mkdir()
    (frames / "index.parquet").write_bytes(b"index")

    def base_model(source) -> str:
        return input_fingerprint(source, frames, boxes)["input.base_model"]

    assert base_model(HUB_ID) == HUB_ID
    assert base_model(str(model_dir)) == base_model(model_dir) != str(model_dir)  # content hash
    assert base_model(str(model_file)) == str(model_file)
    assert base_model(tmp_path / "missing") == str(tmp_path / "missing")
    for local_non_dir in (tmp_path / "missing", model_file, str(model_file)):
        with pytest.raises(EvalInputError, match="pretrained CLIP directory not found"):
            load_pretrained(local_non_dir, like=None, tolerance=1e-4)  # refused before anything loads


def test_dataset_files_must_be_relative_to_the_data_root():
    """dvc.yaml joins ${data.root}/${data.annotations}: an absolute name would be another file there."""
    with pytest.raises(ValueError, match=r"data\.annotations must be relative to data\.root"):
        load_params(REPO / "params.yaml").with_overrides(data={"annotations": "/elsewhere/ann.json"})
