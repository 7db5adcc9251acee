"""`params.paths`: every stage path resolved once; `model_source`: the one directory-or-hub-id rule."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest
import yaml

from fgclip.config import Params, ParamsError, Paths, load_params, model_source

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
    "loss_plot": "plots/train_loss.png",
    "eval_metrics": "metrics/eval.json",
    "scores": "data/eval/frame_scores.parquet",
    "roc": "plots/roc.csv",
    "roc_plot": "plots/roc.png",
    "models_plot": "plots/models.png",
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
    assert model_source("clip-vit-base") == "clip-vit-base"  # a hub id without a namespace
    assert model_source(str(model_dir)) == model_dir  # a string naming a directory
    assert model_source(str(model_file)) == model_file  # local, though not a model directory
    assert model_source(tmp_path / "missing") == tmp_path / "missing"  # a Path is always local


def test_a_missing_path_is_a_path_not_a_hub_id(tmp_path, monkeypatch):
    """Reported as a missing directory, not as a malformed or unknown hub id (81 lines of traceback)."""
    monkeypatch.chdir(tmp_path)
    (tmp_path / "models").mkdir()
    for missing in (
        str(tmp_path / "missing"),
        "./clip",
        "../clip",
        "~/clip",
        "a/b/c",
        "models/clip-pretrainde",
    ):
        assert model_source(missing) == Path(missing), missing
    assert model_source("modelz/clip") == "modelz/clip"  # `modelz` is nothing here: a hub id


def test_check_model_source_local_directory(tmp_path):
    from fgclip.config import ModelSourceError, check_model_source

    model_dir = tmp_path / "clip"
    model_dir.mkdir()
    with pytest.raises(ModelSourceError, match="not a Hugging Face model directory \\(no config.json\\)"):
        check_model_source(model_dir)
    (model_dir / "config.json").write_text("{}")
    assert check_model_source(str(model_dir)) == model_dir
    (tmp_path / "weights.bin").write_bytes(b"x")
    with pytest.raises(ModelSourceError, match="pretrained CLIP directory not found \\(it is a file\\)"):
        check_model_source(str(tmp_path / "weights.bin"))
    with pytest.raises(ModelSourceError, match="missing: pretrained CLIP directory not found: give"):
        check_model_source(str(tmp_path / "missing"))


@pytest.mark.parametrize(
    ("section", "key", "value", "message"),
    [
        ("model", "patch_size", 0, "model.patch_size: Input should be greater than or equal to 1 (got 0)"),
        (
            "model",
            "image_size",
            -64,
            "model.image_size: Input should be greater than or equal to 1 (got -64)",
        ),
        ("model", "image_size", 60, "model.image_size=60 must be a multiple of model.patch_size=8"),
        ("model", "text_heads", 5, "model.text_heads=5 must divide model.text_hidden=96"),
        ("train", "lr", float("nan"), "train.lr: Input should be a finite number (got nan)"),
        ("train", "lr", -0.001, "train.lr: Input should be greater than 0 (got -0.001)"),
        ("train", "lr", 0, "train.lr: Input should be greater than 0 (got 0)"),
        ("pretrain", "lr", float("inf"), "pretrain.lr: Input should be a finite number (got inf)"),
        ("train", "num_frames", 40, "train.num_frames=40 exceeds model.max_frames=32"),
        ("evaluate", "window_snippets", 33, "evaluate.window_snippets=33 exceeds model.max_frames=32"),
        ("train", "run_name", "../../x", "train.run_name '../../x' must be a plain directory name"),
        ("train", "run_name", "runs/a", "train.run_name 'runs/a' must be a plain directory name"),
        ("train", "run_name", "..", "train.run_name '..' must be a plain directory name"),
        (
            "orchestration",
            "cron",
            "61 2 * * *",
            "orchestration.cron '61 2 * * *': minute field '61' is not valid",
        ),
        ("orchestration", "cron", "0 2 * * 9", "orchestration.cron '0 2 * * 9': day-of-week field '9'"),
        ("orchestration", "cron", "*/0 * * * *", "minute field '*/0' is not valid"),
    ],
)
def test_a_bad_value_is_one_line_at_load(tmp_path, section, key, value, message):
    """Each of these used to load, then fail minutes later with a traceback (or, run_name, write elsewhere)."""
    from fgclip.config import ParamsError

    raw = yaml.safe_load((REPO / "params.yaml").read_text())
    raw[section][key] = value
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(raw))
    with pytest.raises(ParamsError) as err:
        load_params(tmp_path / "params.yaml")
    assert message in str(err.value) and "\n" not in str(err.value)


def test_cron_check_agrees_with_the_scheduler():
    """The same verdict as Prefect's croniter, which reads the schedule only when the flow is served."""
    croniter = pytest.importorskip("prefect._vendor.croniter").croniter
    from fgclip.config import OrchestrationConfig

    crons = ["0 2 * * *", "*/15 1-5 * * 1,3", "5/15 * * * *", "1-5/2 * * * *", "0 0 * * 7", "5-1 * * * *",
             "0 24 * * *", "0 0 0 * *", "0 0 * 13 *", "0 0 * * 8", "1- * * * *", "*/0 * * * *", "1,,2 * * * *"]  # fmt: skip
    for cron in crons:
        try:
            OrchestrationConfig(cron=cron)
            ours = True
        except ValueError:
            ours = False
        assert ours == croniter.is_valid(cron), cron


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


def test_hub_probe_answers_401_as_unknown_and_a_cached_model_survives_an_unreachable_hub(
    tmp_path, monkeypatch
):
    """A loopback 'hub' that answers 401 (the hub's answer for an unknown repo without a token)."""
    import http.server
    import threading

    from huggingface_hub import constants

    from fgclip.config import ModelSourceError, check_model_source

    class Unauthorized(http.server.BaseHTTPRequestHandler):
        def do_GET(self):
            self.send_response(401)
            self.end_headers()

        def log_message(self, *args):
            pass

    server = http.server.HTTPServer(("127.0.0.1", 0), Unauthorized)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    monkeypatch.delenv("HF_TOKEN", raising=False)
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf-home"))  # no stored token
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "cache"))
    try:
        monkeypatch.setattr(constants, "ENDPOINT", f"http://127.0.0.1:{server.server_port}")
        with pytest.raises(ModelSourceError, match="neither a local directory nor a model on"):
            check_model_source("someone/no-such-clip", timeout=2)
    finally:
        server.shutdown()
    # The same id in the cache, the hub out of reach: the client would load the cached copy.
    repo = tmp_path / "cache" / "models--someone--no-such-clip"
    commit = "0" * 40
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text(commit)
    (repo / "snapshots" / commit).mkdir(parents=True)
    (repo / "snapshots" / commit / "config.json").write_text("{}")
    monkeypatch.setattr(constants, "ENDPOINT", "http://127.0.0.1:9")
    assert check_model_source("someone/no-such-clip", timeout=2) == "someone/no-such-clip"


def test_short_text_length_is_77_for_a_pretrained_clip_and_32_for_the_stand_in():
    from fgclip.config import ModelConfig

    assert (ModelConfig().text_len, ModelConfig().caption_len) == (32, 32)  # the sample's figures
    assert (ModelConfig(pretrained="x").text_len, ModelConfig(pretrained="x").caption_len) == (77, 77)
    assert ModelConfig(pretrained="x", long_text=True).caption_len == 248
    assert ModelConfig(pretrained="x", max_text_len=40).text_len == 40  # an explicit value wins
    with pytest.raises(ValueError, match="max_text_len=78 exceeds the 77"):
        ModelConfig(max_text_len=78)


def test_the_ucf_crime_vitb32_params_load_with_their_documented_values(monkeypatch):
    params = load_params(REPO / "configs" / "ucf-crime-vitb32.yaml")
    train, model = params.train, params.model
    # FG-CLIP's backbone warm-up, the users' low-end backbone rate, a head rate 50x that.
    assert (train.backbone_lr, train.backbone_warmup_steps) == (2e-6, 200)
    assert (train.lr, train.warmup_steps, train.weight_decay) == (1e-4, 50, 0.001)
    assert (model.text_len, model.caption_len, model.long_text) == (77, 248, True)
    assert (model.image_size, model.patch_size, model.vision_hidden, model.text_hidden) == (224, 32, 768, 512)
    assert (model.projection_dim, model.loaded_logit_scale) == (512, "error")
    assert params.evaluate.templates[0] == "a surveillance video of {}"
    classes = {"Abuse", "Arrest", "Arson", "Assault", "Burglary", "Explosion", "Fighting", "RoadAccidents",
               "Robbery", "Shooting", "Shoplifting", "Stealing", "Vandalism"}  # fmt: skip
    assert set(params.evaluate.prompts) == classes | {"Normal"}
    # `../` paths land where params.yaml's do, not under configs/.
    default = load_params(REPO / "params.yaml").paths
    paths = params.paths
    # Every path but the dataset's (the config points data.root at the real UCF-Crime).
    dataset = {"data_root", "videos", "train_split", "test_split", "temporal_annotations", "annotations"}
    for name in (f.name for f in dataclasses.fields(Paths) if f.name not in dataset):
        assert getattr(paths, name) == getattr(default, name), name
    # model.pretrained is read from the working directory: the repository root's models/.
    monkeypatch.chdir(REPO)
    assert Path(model_source(params.pretrained_source())).resolve() == REPO / "models" / "openai-vitb32"


def test_validation_errors_are_one_line_each_and_never_echo_a_section(tmp_path: Path):
    raw = yaml.safe_load((Path(__file__).resolve().parents[1] / "params.yaml").read_text())
    raw["train"]["batch_size"] = "eight"
    raw["evaluate"]["protocl"] = "full"
    raw["trian"] = {"lr": 1}
    path = tmp_path / "params.yaml"
    path.write_text(yaml.safe_dump(raw))
    with pytest.raises(ParamsError) as err:
        load_params(path)
    lines = str(err.value).splitlines()
    assert lines[0] == f"{path}: 3 invalid params:"
    assert sorted(line.strip() for line in lines[1:]) == [
        "evaluate.protocl: unknown key (did you mean evaluate.protocol?)",
        "train.batch_size: expected an integer, got 'eight'",
        "trian: unknown key (did you mean train?)",
    ]
    raw.pop("trian")
    raw["evaluate"].pop("protocl")
    path.write_text(yaml.safe_dump(raw))
    with pytest.raises(ParamsError, match=r"invalid params: train\.batch_size: expected an integer, got 'eight'$"):
        load_params(path)
