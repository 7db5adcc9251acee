"""Frame images as model input: decoding, CLIP normalisation, augmentation, frame picking.

Training and evaluation must feed a model the same pixels for the same frame
(a different resize or normalisation is a silent distribution shift between
the loss and the metric), so both take them from here. Validation's choice of
frames in a clip (:func:`segment_indices` without a generator) is shared too:
evaluation's video embeddings pick frames exactly as a validation item does.
"""

from __future__ import annotations

import json
import logging
import math
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from fgclip.data.layout import DatasetError

logger = logging.getLogger(__name__)

# OpenAI CLIP's pixel statistics (clip/clip.py's _transform): the stand-in, OpenAI's,
# open_clip's OpenAI-trained and FG-CLIP's weights share them.
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
# Where a Hugging Face model directory says how its images are normalised.
PREPROCESSOR_NAME = "preprocessor_config.json"


@dataclass(frozen=True)
class PixelStats:
    """Per-channel RGB mean and std a model's images are normalised with (0-1 pixel scale).

    A property of the weights, not of the data: a model trained with other statistics
    (some open_clip models use ImageNet's or 0.5/0.5) sees shifted inputs under CLIP's.
    """

    mean: tuple[float, float, float] = CLIP_MEAN
    std: tuple[float, float, float] = CLIP_STD

    def __post_init__(self) -> None:
        for name in ("mean", "std"):
            value = getattr(self, name)
            if (
                not isinstance(value, (tuple, list))
                or len(value) != 3
                or not all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in value)
            ):
                raise ValueError(f"image_{name} must be 3 finite numbers (R, G, B), got {value!r}")
            try:
                floats = tuple(float(v) for v in value)
            except OverflowError:  # an integer too large for a float
                floats = (math.inf,)
            if len(floats) != 3 or not all(math.isfinite(v) for v in floats):
                raise ValueError(f"image_{name} must be 3 finite numbers (R, G, B), got {value!r}")
            object.__setattr__(self, name, floats)
        if min(self.std) <= 0:
            raise ValueError(f"image_std must be positive, got {list(self.std)}")
        # Statistics of 0-255 pixels (123.675, 58.395) applied after the /255 would be silently wrong.
        if max(map(abs, self.mean)) > 1 or max(self.std) > 1:
            raise ValueError(
                f"image_mean {list(self.mean)} / image_std {list(self.std)} are not on the 0-1 scale "
                "pixels are normalised on (divide 0-255 statistics by 255)"
            )

    def to_json(self) -> dict[str, list[float]]:
        return {"image_mean": list(self.mean), "image_std": list(self.std)}

    @classmethod
    def from_json(cls, doc: dict, where: str) -> PixelStats:
        """From a dict with ``image_mean``/``image_std`` (CLIPImageProcessor's keys); absent = CLIP's.

        ``do_normalize: false`` means the model takes the 0-1 pixels as they are.
        """
        if doc.get("do_normalize", True) is False:
            return cls((0.0, 0.0, 0.0), (1.0, 1.0, 1.0))
        try:
            return cls(doc.get("image_mean", CLIP_MEAN), doc.get("image_std", CLIP_STD))
        except (TypeError, ValueError) as exc:
            raise DatasetError(f"{where}: {exc}") from exc


CLIP_PIXELS = PixelStats()


def read_pixel_stats(source: str | os.PathLike) -> PixelStats:
    """The statistics in a model's ``preprocessor_config.json``; CLIP's when it has none.

    ``source`` is a model directory or a hub id (its file is read through the Hugging
    Face cache, as the model's own files are).
    """
    path = Path(source) / PREPROCESSOR_NAME
    if not Path(source).is_dir():
        from transformers.utils import cached_file

        found = cached_file(
            str(source),
            PREPROCESSOR_NAME,
            _raise_exceptions_for_missing_entries=False,
            _raise_exceptions_for_connection_errors=False,
        )
        if found is None:
            logger.info("%s: no %s in reach (cache or hub): CLIP's image statistics", source, PREPROCESSOR_NAME)
            return CLIP_PIXELS
        path = Path(found)
    elif not path.is_file():
        return CLIP_PIXELS
    try:
        doc = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise DatasetError(f"{path}: not readable JSON: {exc}") from exc
    if not isinstance(doc, dict):
        raise DatasetError(f"{path}: expected a JSON object")
    return PixelStats.from_json(doc, str(path))


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
    # Channels first in memory, not a permuted view: stacking permuted views into a batch
    # took 7 ms for 8 frames on 2 threads, against 0.55 ms contiguous (benchmarks/loader.py).
    return torch.from_numpy(np.ascontiguousarray(array.transpose(2, 0, 1)))


def normalize(pixels: torch.Tensor, stats: PixelStats = CLIP_PIXELS) -> torch.Tensor:
    """``uint8 [..., 3, H, W]`` to float32 normalised with the model's ``stats``."""
    mean = torch.tensor(stats.mean).view(3, 1, 1)
    std = torch.tensor(stats.std).view(3, 1, 1)
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
