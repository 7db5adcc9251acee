"""Frame images as model input: the one preprocessing training and evaluation share."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from fgclip.data.images import CLIP_MEAN, CLIP_STD, load_image, normalize, segment_indices
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
