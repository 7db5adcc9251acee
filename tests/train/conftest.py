"""Fixtures of the training tests: tiny-model params and a tiny pretrained CLIP.

Sizes are chosen so the whole directory runs in well under two minutes on two
CPU cores: 32-pixel images, 8-pixel patches, width 32, one layer per tower.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import pytest
from tiny_config import TINY_MODEL

from fgclip.config import Params
from fgclip.train.pretrain import pretrain_clip

TINY_TRAIN = {
    "num_frames": 4,
    "max_keyframes": 2,
    "max_regions": 3,
    "batch_size": 3,
    "max_steps": 4,
    "warmup_steps": 1,
    "memory_bank_size": 8,
    "memory_bank_warmup_steps": 2,
    "num_workers": 0,
    "checkpoint_every": 2,
    "device": "cpu",
}


@pytest.fixture(scope="session")
def tracking_uri(tmp_path_factory: pytest.TempPathFactory) -> str:
    """One sqlite store for all training tests: creating the schema costs seconds."""
    return f"sqlite:///{tmp_path_factory.mktemp('mlflow') / 'mlflow.db'}"


@pytest.fixture(scope="session")
def train_params(
    tiny_params: Params, tracking_uri: str, tmp_path_factory: pytest.TempPathFactory
) -> Callable[..., Params]:
    """``train_params(train={...}, model={...})``: tiny params in a fresh base dir."""

    def make(**sections: dict) -> Params:
        merged: dict[str, dict] = {
            "model": dict(TINY_MODEL),
            "train": dict(TINY_TRAIN),
            "pretrain": {"steps": 30, "batch_size": 32, "warmup_steps": 3},
            "tracking": {"uri": tracking_uri, "experiment": "train-tests"},
        }
        for name, values in sections.items():
            merged[name] = {**merged.get(name, {}), **values}
        params = tiny_params.with_overrides(**merged)
        base = tmp_path_factory.mktemp("train")
        return Params.model_validate({**params.model_dump(exclude={"base_dir"}), "base_dir": base})

    return make


@pytest.fixture(scope="session")
def tiny_clip(
    train_params: Callable[..., Params], tiny_sample: Path, tiny_frames: Path, tiny_boxes: Path
) -> tuple[Path, dict]:
    """A tiny CLIP pretrained on the tiny sample: ``(directory, pretrain summary)``."""
    params = train_params()
    out = params.paths.stand_in
    summary = pretrain_clip(params, tiny_frames, tiny_boxes, tiny_sample / params.data.annotations, out)
    return out, summary
