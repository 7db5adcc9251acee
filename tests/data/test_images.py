"""Frame images as model input: the one preprocessing training and evaluation share."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from fgclip.data.images import (
    CLIP_MEAN,
    CLIP_PIXELS,
    CLIP_STD,
    PixelStats,
    load_image,
    normalize,
    read_pixel_stats,
    segment_indices,
)
from fgclip.data.layout import DatasetError


def test_normalize_uses_clip_statistics() -> None:
    white = torch.full((3, 2, 2), 255, dtype=torch.uint8)
    out = normalize(white)
    expected = (1 - torch.tensor(CLIP_MEAN)) / torch.tensor(CLIP_STD)
    assert torch.allclose(out[:, 0, 0], expected)


def test_load_image_resizes_to_a_square_and_crops_boxes(tmp_path: Path) -> None:
    pixels = np.zeros((20, 40, 3), dtype=np.uint8)
    pixels[:, 20:] = 255  # right half white
    Image.fromarray(pixels).save(tmp_path / "f.png")
    whole = load_image(tmp_path / "f.png", 8)
    assert whole.shape == (3, 8, 8) and whole.dtype == torch.uint8
    assert (load_image(tmp_path / "f.png", 4, box=(0.5, 0.0, 1.0, 1.0)) == 255).all()
    with pytest.raises(DatasetError, match="missing"):
        load_image(tmp_path / "absent.jpg", 8)


def test_segment_indices_one_per_segment() -> None:
    assert segment_indices(16, 4, None).tolist() == [1, 5, 9, 13]
    assert segment_indices(2, 4, None).tolist() == [0, 0, 1, 1]  # segments share frames
    drawn = segment_indices(16, 4, np.random.default_rng(0))
    assert ((drawn >= [0, 4, 8, 12]) & (drawn < [4, 8, 12, 16])).all()


def test_pixel_statistics_are_read_from_the_model_directory(tmp_path: Path):
    assert read_pixel_stats(tmp_path) == CLIP_PIXELS  # none given: CLIP's
    (tmp_path / "preprocessor_config.json").write_text(
        json.dumps({"image_mean": [0.5, 0.5, 0.5], "image_std": [0.25, 0.5, 1], "size": 224})
    )
    stats = read_pixel_stats(tmp_path)
    assert stats == PixelStats((0.5, 0.5, 0.5), (0.25, 0.5, 1.0))
    pixels = torch.full((1, 3, 2, 2), 255, dtype=torch.uint8)
    assert normalize(pixels, stats)[0, :, 0, 0].tolist() == [2.0, 1.0, 0.5]


@pytest.mark.parametrize(
    ("doc", "match"),
    [
        ("{not json", "not readable JSON"),
        ("[1, 2, 3]", "expected a JSON object"),
        ('{"image_mean": [0.5, 0.5]}', "image_mean must be 3 finite numbers"),
        ('{"image_std": [0.5, 0, 0.5]}', "image_std must be positive"),
        ('{"image_mean": [0.5, NaN, 0.5]}', "image_mean must be 3 finite numbers"),
        ('{"image_mean": "0.5"}', "image_mean must be 3 finite numbers"),
        ('{"image_mean": [1' + "0" * 400 + ', 0.5, 0.5]}', "image_mean must be 3 finite numbers"),
        ('{"image_mean": [123.675, 116.28, 103.53], "image_std": [58.395, 57.12, 57.375]}', "not on the 0-1 scale"),
    ],
)
def test_bad_pixel_statistics_name_their_file(tmp_path: Path, doc: str, match: str):
    (tmp_path / "preprocessor_config.json").write_text(doc)
    with pytest.raises(DatasetError, match=rf"preprocessor_config.json: .*{match}|{match}"):
        read_pixel_stats(tmp_path)


def test_a_model_that_takes_unnormalised_pixels_says_so(tmp_path: Path):
    (tmp_path / "preprocessor_config.json").write_text(json.dumps({"do_normalize": False, "image_mean": [0.5] * 3}))
    assert read_pixel_stats(tmp_path) == PixelStats((0.0, 0.0, 0.0), (1.0, 1.0, 1.0))
