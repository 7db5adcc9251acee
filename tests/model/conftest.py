"""Tiny model fixtures: a 32-pixel, 2-layer CLIP with a word-level tokenizer."""

from __future__ import annotations

from collections.abc import Callable

import pytest
import torch
from model_tiny import CAPTIONS, TINY
from transformers import CLIPModel, PreTrainedTokenizerFast

from fgclip.config import ModelConfig
from fgclip.data.batch import Batch
from fgclip.model.fgclip import FGCLIPVideoModel, tiny_clip_config
from fgclip.model.tokenizer import build_tokenizer, tokenize


@pytest.fixture(scope="session")
def tokenizer() -> PreTrainedTokenizerFast:
    return build_tokenizer(CAPTIONS)


@pytest.fixture
def tiny_cfg() -> ModelConfig:
    return ModelConfig(**TINY)


@pytest.fixture
def make_model(tokenizer: PreTrainedTokenizerFast) -> Callable[..., FGCLIPVideoModel]:
    """``make_model(**model_config_overrides)``: a seeded from-scratch model in eval mode."""

    def make(seed: int = 0, **overrides) -> FGCLIPVideoModel:
        torch.manual_seed(seed)
        cfg = ModelConfig(**{**TINY, **overrides})
        return FGCLIPVideoModel(CLIPModel(tiny_clip_config(cfg, tokenizer)), cfg).eval()

    return make


@pytest.fixture
def make_batch(tokenizer: PreTrainedTokenizerFast) -> Callable[..., Batch]:
    """``make_batch(b, t, k, r, n)``: a seeded training batch; every region has a box on keyframe 0.

    Each region carries ``n`` hard-negative slots; region i's first ``i % (n + 1)`` are filled.
    """

    def make(b: int = 2, t: int = 3, k: int = 2, r: int = 3, seed: int = 0, n: int = 2) -> Batch:
        g = torch.Generator().manual_seed(seed)
        size, max_len = TINY["image_size"], TINY["max_text_len"]
        ids, mask = tokenize(tokenizer, [CAPTIONS[i % len(CAPTIONS)] for i in range(b)], max_len)
        region_texts = [CAPTIONS[(i + 1) % len(CAPTIONS)] for i in range(b * r)]
        rids, rmask = tokenize(tokenizer, region_texts, max_len)
        xy1 = torch.rand(b, r, k, 2, generator=g) * 0.5
        wh = 0.2 + torch.rand(b, r, k, 2, generator=g) * 0.3
        box_mask = torch.rand(b, r, k, generator=g) > 0.3
        box_mask[:, :, 0] = True
        region_caption_ids = 100 + torch.arange(b * r).view(b, r)
        negative_texts = [CAPTIONS[(i + 2) % len(CAPTIONS)] for i in range(b * r * n)]
        if n:
            nids, nmask = tokenize(tokenizer, negative_texts, max_len)
        else:
            nids = nmask = torch.zeros((0, max_len), dtype=torch.long)
        present = (torch.arange(n)[None, :] < (torch.arange(b * r) % (n + 1))[:, None]).view(b, r, n)
        return Batch(
            videos=[f"video{i}" for i in range(b)],
            frames=torch.randn(b, t, 3, size, size, generator=g),
            text_token_ids=ids,
            text_mask=mask,
            caption_ids=torch.arange(b),
            keyframes=torch.randn(b, k, 3, size, size, generator=g),
            boxes=torch.cat([xy1, xy1 + wh], dim=-1),
            box_mask=box_mask,
            region_token_ids=rids.view(b, r, max_len),
            region_text_mask=rmask.view(b, r, max_len),
            region_caption_ids=region_caption_ids,
            region_image_ids=1000 + region_caption_ids,  # every region its own pixels
            region_mask=torch.ones(b, r, dtype=torch.bool),
            region_negative_token_ids=nids.view(b, r, n, max_len),
            region_negative_text_mask=nmask.view(b, r, n, max_len) * present[..., None],
            region_negative_mask=present,
        )

    return make
