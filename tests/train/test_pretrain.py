"""Stage pretrain: the tiny CLIP stand-in learns, saves and reloads as a Hugging Face model."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from transformers import CLIPModel

from fgclip.config import Params
from fgclip.model.tokenizer import load_tokenizer, tokenize
from fgclip.train.pretrain import pretrain_clip, vocabulary_texts


def test_loss_decreases_and_the_model_reloads(tiny_clip, train_params: Callable[..., Params]) -> None:
    out, summary = tiny_clip
    params = train_params()
    assert summary["steps"] == params.pretrain.steps
    assert summary["final_loss"] < 0.8 * summary["first_loss"]
    # The file is a DVC output: the wall time stays in the returned summary only.
    assert "seconds" in summary
    assert json.loads((out / "pretrain.json").read_text()) == {
        k: v for k, v in summary.items() if k != "seconds"
    }

    clip = CLIPModel.from_pretrained(out)
    tokenizer = load_tokenizer(out)
    assert tokenizer.eos_token_id != 2
    assert clip.config.text_config.eos_token_id == tokenizer.eos_token_id
    assert clip.config.vision_config.image_size == params.model.image_size
    assert clip.logit_scale.item() == pytest.approx(summary["final_logit_scale"])
    # Started from CLIP's from-scratch temperature, not the fine-tuning one.
    assert clip.logit_scale.item() < params.model.logit_scale_init_value


def test_prompts_are_in_vocabulary(tiny_clip, tiny_sample: Path, train_params: Callable[..., Params]) -> None:
    out, _ = tiny_clip
    params = train_params()
    tokenizer = load_tokenizer(out)
    prompts = [
        t.format(p) for t in params.evaluate.templates for ps in params.evaluate.prompts.values() for p in ps
    ]
    ids, mask = tokenize(tokenizer, prompts, params.model.text_len)
    assert not (ids[mask.bool()] == tokenizer.unk_token_id).any()
    texts = vocabulary_texts(params, tiny_sample / params.data.annotations)
    assert set(prompts) <= set(texts)


def test_trained_model_separates_captions(
    tiny_clip, tiny_frames: Path, tiny_boxes: Path, train_params: Callable[..., Params]
) -> None:
    """After pretraining, frames score their own caption above a chance guess."""
    from fgclip.data.dataset import FramePairDataset

    out, _ = tiny_clip
    params = train_params()
    clip = CLIPModel.from_pretrained(out).eval()
    pairs = FramePairDataset(params, tiny_frames, tiny_boxes, load_tokenizer(out))
    batch = pairs.batch(torch.arange(pairs.num_frames))
    with torch.no_grad():
        image = torch.nn.functional.normalize(
            clip.get_image_features(pixel_values=batch["pixels"]).pooler_output, dim=-1
        )
        text = torch.nn.functional.normalize(
            clip.get_text_features(
                input_ids=batch["text_token_ids"], attention_mask=batch["text_mask"]
            ).pooler_output,
            dim=-1,
        )
    # Distinct captions only: accuracy of picking the frame's own caption among them.
    unique, first = torch.unique(batch["caption_ids"], return_inverse=True)
    caption_rows = torch.stack([torch.nonzero(first == u)[0, 0] for u in range(len(unique))])
    predicted = (image @ text[caption_rows].T).argmax(dim=1)
    accuracy = (predicted == first).float().mean().item()
    assert accuracy > 1.5 / len(unique)


def test_skipped_when_a_pretrained_model_is_configured(
    train_params: Callable[..., Params], tmp_path: Path
) -> None:
    params = train_params(model={"pretrained": "openai/clip-vit-base-patch32"})
    out = tmp_path / "clip"
    summary = pretrain_clip(params, tmp_path, tmp_path, tmp_path / "annotations.json", out)
    assert summary == {"skipped": True, "pretrained": "openai/clip-vit-base-patch32"}
    # Only a note for DVC's output, no model: train must load the configured CLIP instead.
    assert sorted(p.name for p in out.iterdir()) == [".fgclip-stage", "pretrain.json"]
    assert json.loads((out / "pretrain.json").read_text())["skipped"] is True
