"""The training batch of video FG-CLIP: what :func:`collate` builds and the model's ``forward`` takes.

Three kinds of id travel with a batch, and their names say which:

- ``*_token_ids``: tokenizer ids of a caption, one row of ``L`` per text;
- ``*caption_ids``: one stable 63-bit hash per caption *text* (equal texts,
  equal ids), so the loss can tell a repeated caption from a negative;
- ``region_image_ids``: one stable 63-bit hash per region of *what it shows*
  (video, frames, boxes), so regions that pool the same pixels are known matches.

Padded regions and keyframes have ``region_mask`` / ``box_mask`` False, zero
pixels and ids ``PAD_ID``. Each region carries up to N hard-negative captions
(``region_negative_*``; ``region_negative_mask`` says which exist, N = 0 when
hard negatives are off). Token tensors are cut after the batch's longest text:
CLIP's text attention is causal, so padding after a caption's EOS never changes
its embedding, and the encoder's cost follows the real lengths.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, fields, replace

import torch

# Ids of padded regions: caption and image ids are 63-bit hashes, never negative.
PAD_ID = -1


@dataclass(frozen=True)
class VideoItem:
    """One video of :class:`~fgclip.data.dataset.VideoClipDataset` (R regions, K keyframes)."""

    video: str
    frames: torch.Tensor  # [T, 3, S, S] CLIP-normalised
    text_token_ids: torch.Tensor  # [L]
    text_mask: torch.Tensor  # [L]
    caption_id: torch.Tensor  # [] int64
    keyframes: torch.Tensor  # [K, 3, S, S]
    boxes: torch.Tensor  # [R, K, 4] normalised xyxy
    box_mask: torch.Tensor  # [R, K] bool
    region_token_ids: torch.Tensor  # [R, L]
    region_text_mask: torch.Tensor  # [R, L]
    region_caption_ids: torch.Tensor  # [R] int64
    region_image_ids: torch.Tensor  # [R] int64
    region_negative_token_ids: torch.Tensor  # [R, N, L]
    region_negative_text_mask: torch.Tensor  # [R, N, L]
    region_negative_mask: torch.Tensor  # [R, N] bool: a real negative


@dataclass(frozen=True)
class Batch:
    """B videos, padded to the batch's largest R (regions) and K (keyframes)."""

    videos: list[str]
    frames: torch.Tensor  # [B, T, 3, S, S]
    text_token_ids: torch.Tensor  # [B, L]
    text_mask: torch.Tensor  # [B, L]
    caption_ids: torch.Tensor  # [B]
    keyframes: torch.Tensor  # [B, K, 3, S, S]
    boxes: torch.Tensor  # [B, R, K, 4]
    box_mask: torch.Tensor  # [B, R, K] bool
    region_token_ids: torch.Tensor  # [B, R, L]
    region_text_mask: torch.Tensor  # [B, R, L]
    region_caption_ids: torch.Tensor  # [B, R], PAD_ID where padded
    region_image_ids: torch.Tensor  # [B, R], PAD_ID where padded
    region_mask: torch.Tensor  # [B, R] bool: a real region
    region_negative_token_ids: torch.Tensor  # [B, R, N, L]
    region_negative_text_mask: torch.Tensor  # [B, R, N, L]
    region_negative_mask: torch.Tensor  # [B, R, N] bool: a real negative

    def _map(self, fn: Callable[[torch.Tensor], torch.Tensor]) -> Batch:
        return replace(
            self, **{f.name: fn(getattr(self, f.name)) for f in fields(self) if f.name != "videos"}
        )

    def to(self, device: torch.device | str, *, non_blocking: bool = False) -> Batch:
        return self._map(lambda t: t.to(device, non_blocking=non_blocking))

    def pin_memory(self) -> Batch:
        """Called by ``DataLoader(pin_memory=True)`` on custom batch types."""
        return self._map(torch.Tensor.pin_memory)


def _used_length(*masks: torch.Tensor) -> int:
    """The longest text in ``masks`` (at least 1 token, so every tensor keeps its shape)."""
    return max([1, *(int(m.sum(dim=-1).max()) for m in masks if m.numel())])


def collate(items: list[VideoItem]) -> Batch:
    """Stack items into a :class:`Batch`, padding regions (R), keyframes (K) and negatives (N)."""
    b = len(items)
    r = max(item.region_token_ids.shape[0] for item in items)
    k = max(item.keyframes.shape[0] for item in items)
    n = max(item.region_negative_mask.shape[1] for item in items)
    first = items[0]
    length = first.region_token_ids.shape[-1]
    keyframes = torch.zeros((b, k, *first.keyframes.shape[1:]), dtype=first.keyframes.dtype)
    boxes = torch.zeros((b, r, k, 4), dtype=torch.float32)
    box_mask = torch.zeros((b, r, k), dtype=torch.bool)
    region_token_ids = torch.zeros((b, r, length), dtype=first.region_token_ids.dtype)
    region_text_mask = torch.zeros((b, r, length), dtype=first.region_text_mask.dtype)
    region_caption_ids = torch.full((b, r), PAD_ID, dtype=torch.int64)
    region_image_ids = torch.full((b, r), PAD_ID, dtype=torch.int64)
    region_mask = torch.zeros((b, r), dtype=torch.bool)
    negative_ids = torch.zeros((b, r, n, length), dtype=first.region_token_ids.dtype)
    negative_text_mask = torch.zeros((b, r, n, length), dtype=first.region_text_mask.dtype)
    negative_mask = torch.zeros((b, r, n), dtype=torch.bool)
    for i, item in enumerate(items):
        ri, ki = item.boxes.shape[:2]
        keyframes[i, :ki] = item.keyframes
        boxes[i, :ri, :ki] = item.boxes
        box_mask[i, :ri, :ki] = item.box_mask
        region_token_ids[i, :ri] = item.region_token_ids
        region_text_mask[i, :ri] = item.region_text_mask
        region_caption_ids[i, :ri] = item.region_caption_ids
        region_image_ids[i, :ri] = item.region_image_ids
        region_mask[i, :ri] = True
        ni = item.region_negative_mask.shape[1]
        negative_ids[i, :ri, :ni] = item.region_negative_token_ids
        negative_text_mask[i, :ri, :ni] = item.region_negative_text_mask
        negative_mask[i, :ri, :ni] = item.region_negative_mask
    text_ids = torch.stack([item.text_token_ids for item in items])
    text_mask = torch.stack([item.text_mask for item in items])
    used = _used_length(text_mask)
    short = _used_length(region_text_mask, negative_text_mask)
    return Batch(
        videos=[item.video for item in items],
        frames=torch.stack([item.frames for item in items]),
        text_token_ids=text_ids[:, :used].contiguous(),
        text_mask=text_mask[:, :used].contiguous(),
        caption_ids=torch.stack([item.caption_id for item in items]),
        keyframes=keyframes,
        boxes=boxes,
        box_mask=box_mask,
        region_token_ids=region_token_ids[..., :short].contiguous(),
        region_text_mask=region_text_mask[..., :short].contiguous(),
        region_caption_ids=region_caption_ids,
        region_image_ids=region_image_ids,
        region_mask=region_mask,
        region_negative_token_ids=negative_ids[..., :short].contiguous(),
        region_negative_text_mask=negative_text_mask[..., :short].contiguous(),
        region_negative_mask=negative_mask,
    )
