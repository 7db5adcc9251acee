"""`fgclip region-loss`: the per-caption region loss agrees with the training loss."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import yaml

from fgclip.cli import main
from fgclip.data.batch import collate
from fgclip.data.dataset import EpochBatchSampler, VideoClipDataset
from fgclip.model.fgclip import FGCLIPVideoModel
from fgclip.model.losses import FGCLIPLoss
from fgclip.model.tokenizer import load_tokenizer
from fgclip.train.loss_breakdown import format_breakdown, region_loss_breakdown


@pytest.fixture(scope="module")
def model_dir(train_params, tiny_clip, tmp_path_factory):
    """Params with several batches per epoch, and a video FG-CLIP saved as `train` saves it."""
    params = train_params(train={"batch_size": 3, "memory_bank_size": 64})
    out = tmp_path_factory.mktemp("fgclip")
    torch.manual_seed(0)
    tolerance = params.train.health.logit_scale_tolerance
    FGCLIPVideoModel.from_clip(
        tiny_clip[0], params.model, source=tiny_clip[0], tolerance=tolerance
    ).save_pretrained(out)
    load_tokenizer(tiny_clip[0]).save_pretrained(out)
    return params, out


def test_breakdown_matches_the_training_loss(
    model_dir, tiny_sample: Path, tiny_frames: Path, tiny_boxes: Path
) -> None:
    params, out = model_dir
    # Without the bank, each region's loss is that of its training batch: the
    # batches training draws (EpochBatchSampler), scored by the training loss.
    model = FGCLIPVideoModel.from_pretrained(out).eval()
    data = VideoClipDataset(params, tiny_frames, tiny_boxes, load_tokenizer(out), split="train", train=True)
    sampler = EpochBatchSampler(len(data), params.train.batch_size, params.train.seed)
    assert len(sampler) >= 2, "the test needs several batches per epoch"
    rows = []
    with torch.no_grad():
        for keys in sampler:
            result = FGCLIPLoss(params.train.region_loss_weight, params.train.hardneg_loss_weight)(
                model(collate([data[k] for k in keys]))
            )
            assert result.region_row_losses.mean().item() == pytest.approx(
                result.loss_region.item(), rel=1e-5
            )
            rows.append(result.region_row_losses)
    expected = torch.cat(rows)
    single = region_loss_breakdown(params, out, tiny_frames, tiny_boxes, epochs=1)
    assert single["regions"] == expected.shape[0] > 0
    assert single["region_loss_no_bank"] == pytest.approx(expected.mean().item(), rel=1e-5)

    # The bank only adds negatives, so it only adds loss; in the second epoch it is well filled.
    result = region_loss_breakdown(params, out, tiny_frames, tiny_boxes, epochs=2)
    assert result["region_loss"] > result["region_loss_no_bank"]
    assert single["region_loss"] > single["region_loss_no_bank"]
    captions = result["captions"]
    assert sum(c["regions"] for c in captions) == result["regions"]
    assert all(c["loss"] >= c["loss_no_bank"] - 1e-6 for c in captions)
    assert sum(c["share"] for c in captions) == pytest.approx(1.0)
    assert [c["share"] for c in captions] == sorted((c["share"] for c in captions), reverse=True)
    weighted = sum(c["loss"] * c["regions"] for c in captions) / result["regions"]
    assert weighted == pytest.approx(result["region_loss"], rel=1e-6)
    annotations = json.loads((tiny_sample / params.data.annotations).read_text())
    assert {c["caption"] for c in captions} <= {c for video in annotations for c in video["region_captions"]}


def test_cli_prints_the_table_and_writes_json(model_dir, tiny_frames: Path, tiny_boxes: Path, capsys) -> None:
    params, out = model_dir
    params_file = params.base_dir / "params.yaml"
    params_file.write_text(yaml.safe_dump(params.model_dump(mode="json", exclude={"base_dir"})))
    report = params.base_dir / "breakdown.json"
    argv = ["region-loss", "--params", str(params_file), "--model", str(out), "--frames", str(tiny_frames)]
    argv += ["--boxes", str(tiny_boxes), "--epochs", "1", "--top", "2", "--json", str(report)]
    assert main(argv) == 0
    printed = capsys.readouterr().out
    result = json.loads(report.read_text())
    assert printed == format_breakdown(result, top=2)
    assert result["captions"][0]["caption"] in printed and "more caption(s)" in printed
    assert result["epochs"] == 1 and result["bank_size"] == 64


def test_breakdown_rejects_zero_epochs(model_dir, tiny_frames: Path, tiny_boxes: Path) -> None:
    params, out = model_dir
    with pytest.raises(ValueError, match="epochs"):
        region_loss_breakdown(params, out, tiny_frames, tiny_boxes, epochs=0)
