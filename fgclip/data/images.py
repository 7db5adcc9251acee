"""Frame images as model input: decoding, CLIP normalisation, augmentation, frame picking.

Training and evaluation must feed a model the same pixels for the same frame
(a different resize or normalisation is a silent distribution shift between
the loss and the metric), so both take them from here. Validation's choice of
frames in a clip (:func:`segment_indices` without a generator) is shared too:
evaluation's video embeddings pick frames exactly as a validation item does.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from fgclip.data.layout import DatasetError

# OpenAI CLIP's pixel statistics: the stand-in and OpenAI weights share them.
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)


def load_image(path: Path, size: int, box: Sequence[float] | None = None) -> torch.Tensor:
    """A JPEG as ``uint8 [3, size, size]``, optionally cropped to a normalized xyxy box.

    Frames are resized to a square without cropping: boxes are normalized to the
    full frame, and a centre crop would cut boxes near the left and right edges.
    """
    try:
        with Image.open(path) as img:
            img = img.convert("RGB")
            if box is not None:
                w, h = img.size
                x1, y1, x2, y2 = box
                left, top = int(np.floor(x1 * w)), int(np.floor(y1 * h))
                right, bottom = max(left + 1, int(np.ceil(x2 * w))), max(top + 1, int(np.ceil(y2 * h)))
                img = img.crop((left, top, right, bottom))
            img = img.resize((size, size), Image.Resampling.BICUBIC)
            array = np.asarray(img, dtype=np.uint8)
    except FileNotFoundError as exc:
        raise DatasetError(f"{path}: frame image listed by the extraction stage is missing") from exc
    except OSError as exc:
        raise DatasetError(f"{path}: cannot decode frame image: {exc}") from exc
    return torch.from_numpy(array.copy()).permute(2, 0, 1)


def normalize(pixels: torch.Tensor) -> torch.Tensor:
    """``uint8 [..., 3, H, W]`` to CLIP-normalised float32."""
    mean = torch.tensor(CLIP_MEAN).view(3, 1, 1)
    std = torch.tensor(CLIP_STD).view(3, 1, 1)
    return (pixels.float() / 255.0 - mean) / std


def augment(pixels: torch.Tensor, generator: torch.Generator, min_scale: float = 0.7) -> torch.Tensor:
    """Random horizontal flip and zoom-in crop of ``float [B, 3, H, W]``, one affine warp per image.

    A tiny CLIP trained on a few dozen videos memorises their exact framing; random
    crops and flips make it key on what happens instead. Colours are left alone:
    captions name them ("the red car").
    """
    b = pixels.shape[0]
    scale = min_scale + (1 - min_scale) * torch.rand(b, generator=generator)
    flip = torch.where(torch.rand(b, generator=generator) < 0.5, -1.0, 1.0)
    # The crop stays inside the image: its centre moves at most (1 - scale).
    shift = (torch.rand(b, 2, generator=generator) * 2 - 1) * (1 - scale)[:, None]
    theta = torch.zeros(b, 2, 3)
    theta[:, 0, 0] = scale * flip
    theta[:, 1, 1] = scale
    theta[:, :, 2] = shift
    grid = torch.nn.functional.affine_grid(theta, list(pixels.shape), align_corners=False)
    return torch.nn.functional.grid_sample(pixels, grid, mode="bilinear", align_corners=False)


def segment_indices(n: int, t: int, rng: np.random.Generator | None) -> np.ndarray:
    """``t`` indices into ``n`` sorted frames: one per equal segment (random or middle).

    With fewer frames than segments, neighbouring segments share a frame.
    """
    bounds = np.arange(t + 1) * n / t
    lo = np.floor(bounds[:-1]).astype(np.int64)
    hi = np.maximum(lo + 1, np.floor(bounds[1:]).astype(np.int64))
    if rng is None:
        return (lo + hi - 1) // 2
    return lo + np.floor(rng.random(t) * (hi - lo)).astype(np.int64)
