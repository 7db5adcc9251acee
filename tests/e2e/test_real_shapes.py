"""The real path at a real model's shapes: an OpenAI-layout ViT-B/32, imported, trained, evaluated.

Nothing is downloaded: OpenAI's own model code (the ``openai-clip`` package, loaded by
file path because its ``__init__`` imports torchvision) builds a ViT-B/32 with random
weights, saved in half precision as the released checkpoints are. ``model.pretrained``
names that file and the pretrain stage converts it (``fgclip import-weights``, with
CLIP's BPE tokenizer) into its output; then the pipeline runs on the
tiny sample at 224 px with real prompts for two optimizer steps on CPU: training
(MLflow, checkpoints, health checks) and evaluation of the three models.
"""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest
import torch
from mlflow import MlflowClient

from fgclip.config import ModelSourceError, Params
from fgclip.eval.evaluate import evaluate
from fgclip.model.sources import check_pretrained
from fgclip.model.tokenizer import load_tokenizer
from fgclip.outputs import owner
from fgclip.train.loop import train
from fgclip.train.pretrain import pretrain_clip

pytestmark = pytest.mark.e2e

VITB32 = {  # OpenAI's ViT-B/32 (clip/model.py build_model reads these from the weights)
    "embed_dim": 512,
    "image_resolution": 224,
    "vision_layers": 12,
    "vision_width": 768,
    "vision_patch_size": 32,
    "context_length": 77,
    "vocab_size": 49408,
    "transformer_width": 512,
    "transformer_heads": 8,
    "transformer_layers": 12,
}


def _openai_model_module():
    package = Path(importlib.util.find_spec("clip").submodule_search_locations[0])
    spec = importlib.util.spec_from_file_location("openai_clip_model_e2e", package / "model.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture()
def openai_vitb32_pt(tmp_path: Path) -> Path:
    torch.manual_seed(0)
    model = _openai_model_module().CLIP(**VITB32)
    model.half()  # as released
    torch.save(model.state_dict(), tmp_path / "ViT-B-32.pt")
    return tmp_path / "ViT-B-32.pt"


@pytest.mark.timeout(900)
def test_vitb32_trains_and_evaluates_on_the_sample(
    openai_vitb32_pt: Path,
    tiny_params: Params,
    tiny_sample: Path,
    tiny_frames: Path,
    tiny_boxes: Path,
    tmp_path: Path,
) -> None:
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    params = tiny_params.with_overrides(
        model={
            # The released file itself: the pretrain stage converts it into pretrain.out.
            # A plain state dict in that layout may be open_clip too: say which.
            "pretrained": str(openai_vitb32_pt),
            "pretrained_format": "openai",
            "image_size": 224,
            "patch_size": 32,
            "vision_hidden": 768,
            "vision_layers": 12,
            "vision_heads": 12,
            "text_hidden": 512,
            "text_layers": 12,
            "text_heads": 8,
            "projection_dim": 512,
            "temporal_heads": 8,
        },
        train={
            "num_frames": 2,
            "max_keyframes": 1,
            "max_regions": 2,
            "batch_size": 2,
            "max_steps": 2,
            "warmup_steps": 1,
            "checkpoint_every": 2,
            "memory_bank_size": 8,
            "memory_bank_warmup_steps": 1,
            "num_workers": 0,
            "device": "cpu",
        },
        evaluate={"templates": ["a surveillance video of {}"], "batch_size": 16},
        tracking={"uri": uri, "experiment": "vitb32"},
        pretrain={"out": str(tmp_path / "clip-pretrained")},
    )
    assert params.model.text_len == 77  # CLIP's context for a pretrained CLIP
    with pytest.raises(ModelSourceError, match="holds no conversion"):
        check_pretrained(params)  # named, not converted yet: training would refuse it
    converted = pretrain_clip(
        params, tiny_frames, tiny_boxes, tiny_sample / "annotations.json", params.paths.stand_in
    )
    assert converted["imported"] and converted["format"] == "openai"
    imported_vitb32 = check_pretrained(params)
    assert imported_vitb32 == params.paths.stand_in and owner(imported_vitb32) == "pretrain"
    openai_vitb32_pt.unlink()  # 300 MB the rest of the run does not need
    tokenizer = load_tokenizer(imported_vitb32)
    assert tokenizer.eos_token_id == 49407 and len(tokenizer) == 49408
    out = tmp_path / "fgclip"
    summary = train(
        params, tiny_frames, tiny_boxes, str(imported_vitb32), out, tmp_path / "checkpoints",
        tmp_path / "health.json", metrics_path=tmp_path / "train.json", loss_csv=tmp_path / "loss.csv",
    )  # fmt: skip
    assert summary["steps"] == 2 and summary["final"]["loss_hardneg"] > 0
    health = json.loads((tmp_path / "health.json").read_text())["checks"]
    # OpenAI's 2.6592 re-initialised to 100 (params: loaded_logit_scale reinit) for all three scales.
    assert health["logit_scale_init"]["passed"] and health["finite"]["passed"]
    assert summary["temperature_global"] == pytest.approx(100.0, rel=1e-2)
    run = MlflowClient(uri).get_run(summary["run_id"])
    assert run.info.status == "FINISHED" and "train/loss_hardneg" in run.data.metrics

    result = evaluate(
        params, tiny_frames, out, imported_vitb32, tiny_sample, tmp_path / "eval.json",
        tmp_path / "scores.parquet", boxes_dir=tiny_boxes,
    )  # fmt: skip
    for name in ("finetuned", "pretrained", "untrained"):
        assert 0.0 <= result[name]["frame_auc"] <= 1.0
        assert result[name]["hardneg_accuracy"] is not None
    logged = MlflowClient(uri).get_run(summary["run_id"]).data.metrics
    assert "eval.finetuned.hardneg_accuracy" in logged
