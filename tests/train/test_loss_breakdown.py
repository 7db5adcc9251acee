"""`fgclip region-loss`: the per-caption region loss agrees with the training loss."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml

from fgclip.cli import main
from fgclip.data.dataset import VideoClipDataset, collate
from fgclip.model.fgclip import FGCLIPVideoModel
from fgclip.model.losses import FGCLIPLoss
from fgclip.model.tokenizer import load_tokenizer
from fgclip.train.loss_breakdown import format_breakdown, region_loss_breakdown


@pytest.fixture(scope="module")
def one_batch(train_params, tiny_clip, tmp_path_factory):
    """Params whose batch holds the whole tiny training set, and a video FG-CLIP saved as `train` saves it."""
    params = train_params(train={"batch_size": 64, "memory_bank_size": 64})
    model_dir = tmp_path_factory.mktemp("fgclip")
    torch.manual_seed(0)
    FGCLIPVideoModel.from_clip(tiny_clip[0], params.model, source=tiny_clip[0]).save_pretrained(model_dir)
    load_tokenizer(tiny_clip[0]).save_pretrained(model_dir)
    return params, model_dir


def test_breakdown_matches_the_training_loss(
    one_batch, tiny_sample: Path, tiny_frames: Path, tiny_boxes: Path
) -> None:
    params, model_dir = one_batch
    # One epoch is one batch (the whole training set), scored while the bank is still
    # empty: the mean over its regions is the training loss of that batch.
    model = FGCLIPVideoModel.from_pretrained(model_dir).eval()
    data = VideoClipDataset(
        params, tiny_frames, tiny_boxes, load_tokenizer(model_dir), split="train", train=True
    )
    assert len(data) <= params.train.batch_size
    order = np.random.default_rng([params.train.seed, 0]).permutation(len(data))
    with torch.no_grad():
        batch = collate([data[(0, int(i))] for i in order])
        expected = FGCLIPLoss(params.train.region_loss_weight)(model(batch))
    single = region_loss_breakdown(params, model_dir, tiny_frames, tiny_boxes, epochs=1)
    assert single["regions"] == expected.region_row_losses.shape[0] > 0
    assert single["region_loss_no_bank"] == pytest.approx(expected.loss_region.item(), rel=1e-5)
    assert single["region_loss"] == pytest.approx(single["region_loss_no_bank"], rel=1e-6)

    # In the second epoch the bank holds the first one's regions: extra negatives only add loss.
    result = region_loss_breakdown(params, model_dir, tiny_frames, tiny_boxes, epochs=2)
    assert result["region_loss"] > result["region_loss_no_bank"]
    captions = result["captions"]
    assert sum(c["regions"] for c in captions) == result["regions"]
    assert sum(c["share"] for c in captions) == pytest.approx(1.0)
    assert [c["share"] for c in captions] == sorted((c["share"] for c in captions), reverse=True)
    weighted = sum(c["loss"] * c["regions"] for c in captions) / result["regions"]
    assert weighted == pytest.approx(result["region_loss"], rel=1e-6)
    annotations = json.loads((tiny_sample / params.data.annotations).read_text())
    assert {c["caption"] for c in captions} <= {c for video in annotations for c in video["region_captions"]}


def test_cli_prints_the_table_and_writes_json(one_batch, tiny_frames: Path, tiny_boxes: Path, capsys) -> None:
    params, model_dir = one_batch
    params_file = params.base_dir / "params.yaml"
    params_file.write_text(yaml.safe_dump(params.model_dump(mode="json", exclude={"base_dir"})))
    out = params.base_dir / "breakdown.json"
    argv = [
        "region-loss",
        "--params",
        str(params_file),
        "--model",
        str(model_dir),
        "--frames",
        str(tiny_frames),
    ]
    argv += ["--boxes", str(tiny_boxes), "--epochs", "1", "--top", "2", "--json", str(out)]
    assert main(argv) == 0
    printed = capsys.readouterr().out
    result = json.loads(out.read_text())
    assert printed == format_breakdown(result, top=2)
    assert result["captions"][0]["caption"] in printed and "more caption(s)" in printed
    assert result["epochs"] == 1 and result["bank_size"] == 64


def test_breakdown_rejects_zero_epochs(one_batch, tiny_frames: Path, tiny_boxes: Path) -> None:
    params, model_dir = one_batch
    with pytest.raises(ValueError, match="epochs"):
        region_loss_breakdown(params, model_dir, tiny_frames, tiny_boxes, epochs=0)
