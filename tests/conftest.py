"""Shared session fixtures: a tiny generated UCF-Crime-style sample run through the data stages.

Every fixture builds on the previous one and is created once per test session, so
model, training and evaluation tests get real H.264 videos, a real frame index and
real validated box shards in a couple of seconds:

- ``tiny_params``: the project's ``params.yaml`` shrunk to a tiny sample, with
  ``base_dir`` in a temporary directory so every relative output path lands there.
- ``tiny_sample``: the generated dataset root (``tiny_params.paths.data_root``).
- ``tiny_frames``: the extracted frames directory (``tiny_params.frames.out``).
- ``tiny_boxes``: the validated boxes directory (``tiny_params.boxes.out``); its
  metrics JSON is at ``tiny_params.paths.boxes_metrics``.
- ``train_params``, ``tiny_clip``, ``tracking_uri``: tiny-model training params, a tiny
  CLIP pretrained on the sample, one sqlite MLflow store (the training tests' and the
  end-to-end multi-node test's).

Tests that modify data must copy it first (``shutil.copytree``): these are shared.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import pytest
from tiny_config import TINY_MODEL, TINY_TRAIN

from fgclip.config import Params, load_params

REPO_ROOT = Path(__file__).resolve().parents[1]

TINY_SAMPLE = {
    "anomaly_classes": ["Arson", "RoadAccidents"],
    "train_per_class": 2,
    "test_per_class": 2,
    "train_normal": 2,
    "test_normal": 2,
    "min_video_frames": 40,
    "max_video_frames": 56,
    "width": 96,
    "height": 72,
}


def rebase(params: Params, base_dir: Path) -> Params:
    """A copy of ``params`` whose relative paths resolve under ``base_dir``.

    ``Params.with_overrides`` deliberately keeps ``base_dir``; tests need their
    outputs in a temporary directory instead of the repository.
    """
    return Params.model_validate({**params.model_dump(exclude={"base_dir"}), "base_dir": base_dir})


@pytest.fixture(scope="session")
def params_factory(tmp_path_factory: pytest.TempPathFactory) -> Callable[..., Params]:
    """Build tiny ``Params`` in a fresh temporary base dir: ``params_factory(frames={"workers": 2})``."""

    def make(**sections: dict) -> Params:
        base = tmp_path_factory.mktemp("params")
        # 100 bootstrap resamples, not 1,000: each costs a few ms even on the tiny sample, and the
        # tests check the intervals' bracketing and equality by hand, not their precision.
        merged = {"sample": dict(TINY_SAMPLE), "frames": {"workers": 1}, "evaluate": {"bootstrap_resamples": 100}}
        for name, values in sections.items():
            merged[name] = {**merged.get(name, {}), **values}
        return rebase(load_params(REPO_ROOT / "params.yaml").with_overrides(**merged), base)

    return make


@pytest.fixture(scope="session")
def tiny_params(params_factory: Callable[..., Params]) -> Params:
    return params_factory()


@pytest.fixture(scope="session")
def tiny_sample(tiny_params: Params) -> Path:
    from fgclip.data.sample import generate_sample

    generate_sample(tiny_params.sample, tiny_params.data, tiny_params.paths.data_root)
    return tiny_params.paths.data_root


@pytest.fixture(scope="session")
def tiny_frames(tiny_params: Params, tiny_sample: Path) -> Path:
    from fgclip.data.frames import extract_frames

    out = tiny_params.paths.frames
    extract_frames(tiny_params, tiny_sample, tiny_params.paths.annotations, out)
    return out


@pytest.fixture(scope="session")
def tiny_boxes(tiny_params: Params, tiny_sample: Path, tiny_frames: Path) -> Path:
    from fgclip.data.boxes import validate_boxes

    out = tiny_params.paths.boxes
    validate_boxes(
        tiny_params,
        tiny_params.paths.annotations,
        tiny_frames,
        out,
        tiny_params.paths.boxes_metrics,
    )
    return out


@pytest.fixture(scope="session")
def tracking_uri(tmp_path_factory: pytest.TempPathFactory) -> str:
    """One sqlite store for all training tests: creating the schema costs seconds."""
    return f"sqlite:///{tmp_path_factory.mktemp('mlflow') / 'mlflow.db'}"


@pytest.fixture(scope="session")
def train_params(
    tiny_params: Params, tracking_uri: str, tmp_path_factory: pytest.TempPathFactory
) -> Callable[..., Params]:
    """``train_params(train={...}, model={...})``: tiny params in a fresh base dir.

    Sizes are chosen so the training tests run in well under two minutes on two CPU
    cores: 32-pixel images, 8-pixel patches, width 32, one layer per tower.
    """

    def make(**sections: dict) -> Params:
        merged: dict[str, dict] = {
            "model": dict(TINY_MODEL),
            "train": dict(TINY_TRAIN),
            "pretrain": {"steps": 30, "batch_size": 32, "warmup_steps": 3},
            "tracking": {"uri": tracking_uri, "experiment": "train-tests"},
        }
        for name, values in sections.items():
            merged[name] = {**merged.get(name, {}), **values}
        return rebase(tiny_params.with_overrides(**merged), tmp_path_factory.mktemp("train"))

    return make


@pytest.fixture(scope="session")
def tiny_clip(
    train_params: Callable[..., Params], tiny_sample: Path, tiny_frames: Path, tiny_boxes: Path
) -> tuple[Path, dict]:
    """A tiny CLIP pretrained on the tiny sample: ``(directory, pretrain summary)``."""
    from fgclip.train.pretrain import pretrain_clip

    params = train_params()
    out = params.paths.stand_in
    summary = pretrain_clip(params, tiny_frames, tiny_boxes, tiny_sample / params.data.annotations, out)
    return out, summary
