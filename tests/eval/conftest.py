"""Evaluation fixtures: tiny params, and tiny video FG-CLIP models saved like the train stage saves them."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from tiny_config import TINY_MODEL as SHARED_TINY_MODEL
from transformers import CLIPModel, PreTrainedTokenizerFast

from fgclip.config import Params
from fgclip.model.fgclip import FGCLIPVideoModel, tiny_clip_config
from fgclip.model.tokenizer import build_tokenizer

TINY_MODEL = {**SHARED_TINY_MODEL, "projection_dim": 16, "max_frames": 8}


@pytest.fixture(scope="session")
def eval_params(tiny_params: Params) -> Params:
    """The tiny-sample params with a tiny model and 4-snippet clips."""
    return tiny_params.with_overrides(model=TINY_MODEL, train={"num_frames": 4, "device": "cpu"})


@pytest.fixture(scope="session")
def eval_tokenizer(eval_params: Params) -> PreTrainedTokenizerFast:
    """A word-level tokenizer covering every prompt and template word."""
    cfg = eval_params.evaluate
    return build_tokenizer(
        [t.format(p) for texts in cfg.prompts.values() for p in texts for t in cfg.templates]
    )


@pytest.fixture(scope="session")
def make_model(
    eval_params: Params, eval_tokenizer: PreTrainedTokenizerFast
) -> Callable[[int], FGCLIPVideoModel]:
    """``make_model(seed)``: a randomly initialised tiny video FG-CLIP in eval mode."""

    def make(seed: int) -> FGCLIPVideoModel:
        torch.manual_seed(seed)
        cfg = eval_params.model
        return FGCLIPVideoModel(CLIPModel(tiny_clip_config(cfg, eval_tokenizer)), cfg).eval()

    return make


@pytest.fixture(scope="session")
def save_model_dir(
    tmp_path_factory: pytest.TempPathFactory,
    eval_tokenizer: PreTrainedTokenizerFast,
    make_model: Callable[[int], FGCLIPVideoModel],
) -> Callable[[int], Path]:
    """``save_model_dir(seed)``: a fine-tuned-model directory as ``train`` writes it (weights from ``seed``)."""

    def save(seed: int) -> Path:
        out = tmp_path_factory.mktemp(f"fgclip-seed{seed}")
        make_model(seed).save_pretrained(out)
        eval_tokenizer.save_pretrained(out)
        return out

    return save


@pytest.fixture(scope="session")
def pretrained_dir(
    tmp_path_factory: pytest.TempPathFactory,
    eval_tokenizer: PreTrainedTokenizerFast,
    make_model: Callable[[int], FGCLIPVideoModel],
) -> Path:
    """A plain CLIP directory as the ``pretrain`` stage writes it."""
    out = tmp_path_factory.mktemp("clip-pretrained")
    make_model(7).clip.save_pretrained(out)
    eval_tokenizer.save_pretrained(out)
    return out
