"""Training datasets over the extracted frames and the validated box shards.

- :class:`VideoClipDataset`: one :class:`~fgclip.data.batch.VideoItem` per video
  (T frames, global caption, regions with boxes on keyframes), for video FG-CLIP
  training; :func:`fgclip.data.batch.collate` pads them into a ``Batch``.
- :class:`FramePairDataset`: (image, caption) pairs for the plain-CLIP
  pretraining of the embedded stand-in: every train frame with its video's
  global caption, every accepted box crop with its region caption.

Both read ``<frames>/index.parquet`` and the box shards listed in
``<boxes>/manifest.json`` once, group them with NumPy, and tokenize every
caption once; items then only index arrays and decode JPEGs.

Randomness is a pure function of ``(seed, epoch, index)``: an item does not
depend on which worker loads it, nor on whether training was resumed, which is
what makes a resumed run step-for-step identical to an uninterrupted one.
"""

from __future__ import annotations

import hashlib
import logging
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import torch
from torch.utils.data import Dataset, Sampler
from tqdm import tqdm
from transformers import PreTrainedTokenizerBase

from fgclip.config import Params
from fgclip.data.batch import VideoItem
from fgclip.data.images import CLIP_PIXELS, PixelStats, augment, load_image, normalize, segment_indices
from fgclip.data.layout import (
    ACCEPTED_SCHEMA,
    BOX_COORDS,
    INDEX_FILE,
    DatasetError,
    read_box_shards,
    read_frame_index,
)
from fgclip.model.tokenizer import tokenize

logger = logging.getLogger(__name__)

ItemKey = int | tuple[int, int]  # index, or (epoch, index) from EpochBatchSampler


def caption_ids(texts: Sequence[str]) -> np.ndarray:
    """Stable 63-bit id per caption (blake2b): equal texts, equal ids, in any process."""
    out = np.empty(len(texts), dtype=np.int64)
    for i, text in enumerate(texts):
        digest = hashlib.blake2b(text.encode("utf-8"), digest_size=8).digest()
        out[i] = int.from_bytes(digest, "little") & 0x7FFF_FFFF_FFFF_FFFF
    return out


def region_image_ids(
    videos: np.ndarray, frames: np.ndarray, boxes: np.ndarray, starts: np.ndarray, counts: np.ndarray
) -> np.ndarray:
    """Stable 63-bit id per region of *what it shows*: its video, frames and boxes.

    Regions that share an id pool the same pixels: the whole-frame virtual box of
    a normal video carries every walker's caption, so those regions have one image
    feature and several true captions. The loss must not make them each other's
    negatives (their loss would be at least ln(#captions) however well the model
    learns); equal ids say so, as equal caption ids do for repeated captions.
    """
    out = np.empty(len(starts), dtype=np.int64)
    for i, (s, c) in enumerate(zip(starts, counts)):
        h = hashlib.blake2b(str(videos[s]).encode("utf-8"), digest_size=8)
        order = np.argsort(frames[s : s + c], kind="stable")
        h.update(np.ascontiguousarray(frames[s : s + c][order]).tobytes())
        h.update(np.ascontiguousarray(boxes[s : s + c][order]).tobytes())
        out[i] = int.from_bytes(h.digest(), "little") & 0x7FFF_FFFF_FFFF_FFFF
    return out


# The box columns the datasets use: all but label and virtual.
_BOX_COLUMNS = [name for name in ACCEPTED_SCHEMA.names if name not in ("label", "virtual")]


def read_train_frames(frames_dir: Path, split: str) -> pa.Table:
    """``video, frame, path`` of the ``train``-purpose frames of ``split``, sorted."""
    table = read_frame_index(frames_dir, ["video", "frame", "path"], split=split, purpose="train")
    if table.num_rows == 0:
        raise DatasetError(f"{Path(frames_dir) / INDEX_FILE}: no 'train' frames for split {split!r}")
    return table.sort_by([("video", "ascending"), ("frame", "ascending")])


def read_boxes(boxes_dir: Path, split: str) -> pa.Table:
    """Every accepted box row of ``split``, sorted by video, region, frame."""
    table = read_box_shards(boxes_dir, _BOX_COLUMNS, split=split)
    return table.sort_by([("video", "ascending"), ("region", "ascending"), ("frame", "ascending")])


def _group_starts(keys: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """``(start, count)`` of each run of equal consecutive keys (keys already sorted)."""
    if len(keys) == 0:
        return np.zeros(0, np.int64), np.zeros(0, np.int64)
    change = np.flatnonzero(keys[1:] != keys[:-1]) + 1
    starts = np.concatenate([[0], change]).astype(np.int64)
    counts = np.diff(np.concatenate([starts, [len(keys)]])).astype(np.int64)
    return starts, counts


def _keep_videos_with_both(frames: pa.Table, boxes: pa.Table, what: str) -> tuple[pa.Table, pa.Table]:
    """Restrict both tables to videos present in both; the rest are reported, not dropped silently."""
    frame_videos = pc.unique(frames["video"])
    box_videos = pc.unique(boxes["video"])
    no_caption = pc.filter(frame_videos, pc.invert(pc.is_in(frame_videos, box_videos))).to_pylist()
    no_frames = pc.filter(box_videos, pc.invert(pc.is_in(box_videos, frame_videos))).to_pylist()
    if no_caption:
        logger.warning(
            "%s: %d video(s) have frames but no accepted box rows (so no caption) and are left out: %s",
            what,
            len(no_caption),
            ", ".join(no_caption),
        )
    if no_frames:
        logger.warning(
            "%s: %d video(s) have box rows but no extracted train frames and are left out: %s",
            what,
            len(no_frames),
            ", ".join(no_frames),
        )
    frames = frames.filter(pc.is_in(frames["video"], box_videos))
    boxes = boxes.filter(pc.is_in(boxes["video"], frame_videos))
    if frames.num_rows == 0:
        raise DatasetError(f"{what}: no video has both extracted frames and accepted box rows")
    return frames, boxes


@dataclass
class _Captions:
    """Every distinct caption, tokenized once."""

    ids: torch.Tensor  # [N, L]
    mask: torch.Tensor  # [N, L]
    hashes: torch.Tensor  # [N] int64
    texts: list[str]


def _tokenize_captions(tokenizer: PreTrainedTokenizerBase, texts: list[str], max_len: int) -> _Captions:
    ids, mask = tokenize(tokenizer, texts, max_len)
    return _Captions(ids, mask, torch.from_numpy(caption_ids(texts)), texts)


def _warn_short_videos(frame_counts: np.ndarray, params: Params, split: str) -> None:
    """Say so when videos have fewer extracted frames than a clip takes: their clips repeat frames.

    A warning, not an error: a few short videos (or a short ``timestamps`` window of a
    normal video) are normal in a real dataset, and a repeated frame is still that video.
    """
    short = frame_counts < params.train.num_frames
    if short.any():
        logger.warning(
            "train.num_frames=%d but %d of %d %s videos have fewer extracted frames (fewest %d; "
            "frames.train_frames_per_video=%d): their clips repeat frames. Raise "
            "frames.train_frames_per_video and re-run extract_frames, or lower train.num_frames",
            params.train.num_frames,
            int(short.sum()),
            len(frame_counts),
            split,
            int(frame_counts.min()),
            params.frames.train_frames_per_video,
        )


class VideoClipDataset(Dataset):
    """One item per video of ``split``: frames, global caption, regions on keyframes.

    Keys are an index, or ``(epoch, index)`` (see :class:`EpochBatchSampler`):
    with ``train=True`` the frame of each of the T segments, the regions kept
    when a video has more than ``max_regions``, and the keyframes kept when the
    regions' box frames exceed ``max_keyframes`` are drawn from a generator
    seeded with ``(seed, epoch, index)``; with ``train=False`` they are fixed.
    Keyframes first cover every kept region once, so a region has no valid box
    only when there are more regions than keyframes.
    """

    def __init__(
        self,
        params: Params,
        frames_dir: Path,
        boxes_dir: Path,
        tokenizer: PreTrainedTokenizerBase,
        split: str = "train",
        *,
        train: bool = True,
        pixel_stats: PixelStats = CLIP_PIXELS,
    ) -> None:
        self.frames_dir = Path(frames_dir)
        self.image_size = params.model.image_size
        # The model's own normalisation (FGCLIPVideoModel.pixel_stats): evaluation uses the same.
        self.pixel_stats = pixel_stats
        self.num_frames = params.train.num_frames
        self.max_regions = params.train.max_regions
        self.max_keyframes = params.train.max_keyframes
        # Off with a zero weight: nothing is tokenized, loaded or encoded for them.
        self.max_negatives = params.train.max_hard_negatives if params.train.hardneg_loss_weight > 0 else 0
        self.seed = params.train.seed
        self.train = train

        frames = read_train_frames(self.frames_dir, split)
        boxes = read_boxes(Path(boxes_dir), split)
        frames, boxes = _keep_videos_with_both(frames, boxes, f"{split} dataset")

        frame_videos = frames["video"].to_numpy(zero_copy_only=False)
        self.frame_start, self.frame_count = _group_starts(frame_videos)
        self.videos: list[str] = frame_videos[self.frame_start].tolist()
        _warn_short_videos(self.frame_count, params, split)
        self.frame_paths = frames["path"].to_numpy(zero_copy_only=False)

        box_videos = boxes["video"].to_numpy(zero_copy_only=False)
        regions = boxes["region"].to_numpy().astype(np.int64)
        self.row_frame = boxes["frame"].to_numpy().astype(np.int64)
        self.row_box = np.stack([boxes[c].to_numpy().astype(np.float32) for c in BOX_COORDS], 1)
        self.row_path = boxes["frame_path"].to_numpy(zero_copy_only=False)
        video_row_start, _ = _group_starts(box_videos)
        # Region groups: a new group wherever the video or the region index changes.
        region_change = np.ones(len(regions), dtype=bool)
        region_change[1:] = (box_videos[1:] != box_videos[:-1]) | (regions[1:] != regions[:-1])
        self.region_row_start = np.flatnonzero(region_change).astype(np.int64)
        self.region_row_count = np.diff(np.concatenate([self.region_row_start, [len(regions)]]))
        region_video = np.searchsorted(video_row_start, self.region_row_start, side="right") - 1
        self.region_image_id = region_image_ids(
            box_videos, self.row_frame, self.row_box, self.region_row_start, self.region_row_count
        )
        self.video_region_start, self.video_region_count = _group_starts(region_video)

        # Both tables hold the same videos, sorted the same way: group i is video i.
        global_texts = boxes["global_caption"].to_numpy(zero_copy_only=False)[video_row_start]
        distinct_global, self.video_caption = np.unique(global_texts.astype(object), return_inverse=True)
        # Global captions have their own length (and, with model.long_text, their own path).
        self.global_captions = _tokenize_captions(
            tokenizer, distinct_global.tolist(), params.model.caption_len
        )
        # Short texts: region captions and their hard negatives, one table.
        region_texts = boxes["region_caption"].to_numpy(zero_copy_only=False)[self.region_row_start].tolist()
        negatives = boxes["region_negatives"].take(pa.array(self.region_row_start))
        lengths = np.minimum(
            pc.list_value_length(negatives).to_numpy(zero_copy_only=False), self.max_negatives
        )
        per_region = [row[:n] for row, n in zip(negatives.to_pylist(), lengths)]
        negative_texts = [t for row in per_region for t in row]
        texts, inverse = np.unique(np.array(region_texts + negative_texts, dtype=object), return_inverse=True)
        self.captions = _tokenize_captions(tokenizer, texts.tolist(), params.model.text_len)
        self.region_caption = inverse[: len(region_texts)]
        # [regions, N] rows of self.captions, -1 where a region has fewer negatives.
        self.region_negatives = np.full((len(region_texts), self.max_negatives), -1, dtype=np.int64)
        owner = np.repeat(np.arange(len(region_texts)), lengths)
        slot = np.arange(len(negative_texts)) - np.repeat(np.cumsum(lengths) - lengths, lengths)
        self.region_negatives[owner, slot] = inverse[len(region_texts) :]
        self._drop_indistinguishable_negatives()

    def _drop_indistinguishable_negatives(self) -> None:
        """A negative whose token ids equal its positive's is no negative: the model can only tie.

        It happens when the swapped word lies past ``model.max_text_len`` or is outside the
        tokenizer's vocabulary; such negatives are left out, and counted.
        """
        present = self.region_negatives >= 0
        if not present.any():
            return
        ids = self.captions.ids
        positive = np.broadcast_to(self.region_caption[:, None], present.shape)[present]
        same = (ids[self.region_negatives[present]] == ids[positive]).all(dim=1).numpy()
        if same.any():
            rows, cols = np.nonzero(present)
            self.region_negatives[rows[same], cols[same]] = -1
            logger.warning(
                "%d hard negative(s) of %d regions get the same token ids as their positive caption "
                "(a word swapped past model.max_text_len=%d tokens, or outside the tokenizer's "
                "vocabulary) and are left out",
                int(same.sum()),
                len(np.unique(rows[same])),
                self.captions.ids.shape[1],
            )

    def __len__(self) -> int:
        return len(self.videos)

    def __getitem__(self, key: ItemKey) -> VideoItem:
        epoch, index = key if isinstance(key, tuple) else (0, key)
        rng = np.random.default_rng([self.seed, epoch, index]) if self.train else None

        start, count = self.frame_start[index], self.frame_count[index]
        picked = start + segment_indices(int(count), self.num_frames, rng)
        frames = [load_image(self.frames_dir / p, self.image_size) for p in self.frame_paths[picked]]

        regions = self.video_region_start[index] + self._pick_regions(
            int(self.video_region_count[index]), rng
        )
        key_paths, boxes, box_mask = self._region_boxes(regions, rng)
        keyframe_pixels = [load_image(self.frames_dir / p, self.image_size) for p in key_paths]

        caption = self.video_caption[index]
        region_captions = self.region_caption[regions]
        negatives = self.region_negatives[regions]  # [R, N]
        present = negatives >= 0
        rows = torch.from_numpy(np.where(present, negatives, 0))
        return VideoItem(
            video=self.videos[index],
            frames=normalize(torch.stack(frames), self.pixel_stats),
            text_token_ids=self.global_captions.ids[caption],
            text_mask=self.global_captions.mask[caption],
            caption_id=self.global_captions.hashes[caption],
            keyframes=normalize(torch.stack(keyframe_pixels), self.pixel_stats),
            boxes=torch.from_numpy(boxes),
            box_mask=torch.from_numpy(box_mask),
            region_token_ids=self.captions.ids[region_captions],
            region_text_mask=self.captions.mask[region_captions],
            region_caption_ids=self.captions.hashes[region_captions],
            region_image_ids=torch.from_numpy(self.region_image_id[regions]),
            region_negative_token_ids=self.captions.ids[rows],
            region_negative_text_mask=self.captions.mask[rows] * torch.from_numpy(present)[..., None],
            region_negative_mask=torch.from_numpy(present),
        )

    def _pick_regions(self, count: int, rng: np.random.Generator | None) -> np.ndarray:
        if count <= self.max_regions:
            return np.arange(count)
        if rng is None:
            return np.arange(self.max_regions)
        return np.sort(rng.choice(count, self.max_regions, replace=False))

    def _region_boxes(
        self, regions: np.ndarray, rng: np.random.Generator | None
    ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Keyframe image paths, ``boxes [R, K, 4]`` and ``box_mask [R, K]``."""
        spans = [
            np.arange(s, s + c)
            for s, c in zip(self.region_row_start[regions], self.region_row_count[regions])
        ]
        rows = np.concatenate(spans)
        row_region = np.repeat(np.arange(len(regions)), [len(s) for s in spans])
        union = np.unique(self.row_frame[rows])
        if len(union) <= self.max_keyframes:
            keyframes = union
        else:
            # One frame per region first (random, or the region's middle box), then fill.
            if rng is None:
                cover = [self.row_frame[s[len(s) // 2]] for s in spans]
            else:
                cover = [self.row_frame[rng.choice(s)] for s in spans]
            chosen = np.unique(np.asarray(cover))[: self.max_keyframes]
            rest = np.setdiff1d(union, chosen)
            need = self.max_keyframes - len(chosen)
            if rng is None:
                fill = (
                    rest[np.linspace(0, len(rest) - 1, need).round().astype(np.int64)] if need else rest[:0]
                )
            else:
                fill = rng.choice(rest, need, replace=False)
            keyframes = np.sort(np.concatenate([chosen, fill]))
        col = np.searchsorted(keyframes, self.row_frame[rows])
        on_keyframe = (col < len(keyframes)) & (
            keyframes[np.minimum(col, len(keyframes) - 1)] == self.row_frame[rows]
        )
        boxes = np.zeros((len(regions), len(keyframes), 4), dtype=np.float32)
        box_mask = np.zeros((len(regions), len(keyframes)), dtype=bool)
        boxes[row_region[on_keyframe], col[on_keyframe]] = self.row_box[rows[on_keyframe]]
        box_mask[row_region[on_keyframe], col[on_keyframe]] = True
        # Every keyframe comes from some row; all rows of one (video, frame) share its image.
        path_of = np.empty(len(keyframes), dtype=object)
        path_of[col[on_keyframe]] = self.row_path[rows[on_keyframe]]
        return path_of, boxes, box_mask


class EpochBatchSampler(Sampler[list[tuple[int, int]]]):
    """Shuffled batches of ``(epoch, index)`` keys, resumable at any batch.

    The order of epoch ``e`` is a permutation seeded with ``(seed, e)``, so it
    can be rebuilt after a restart; :meth:`set_position` picks the epoch and the
    first batch. Incomplete last batches are dropped (contrastive losses want a
    constant number of in-batch negatives). With ``world_size > 1`` each rank
    takes every ``world_size``-th batch, so ranks never see uneven batches.
    """

    def __init__(self, size: int, batch_size: int, seed: int, *, rank: int = 0, world_size: int = 1) -> None:
        if size < batch_size * world_size:
            raise DatasetError(
                f"{size} videos cannot fill one batch of {batch_size} per process × {world_size} "
                "process(es): lower train.batch_size"
            )
        self.size, self.batch_size, self.seed = size, batch_size, seed
        self.rank, self.world_size = rank, world_size
        self.epoch, self.start_batch = 0, 0

    def __len__(self) -> int:
        """Batches per epoch for this rank."""
        return self.size // (self.batch_size * self.world_size)

    def set_position(self, epoch: int, start_batch: int = 0) -> None:
        self.epoch, self.start_batch = epoch, start_batch

    def __iter__(self) -> Iterator[list[tuple[int, int]]]:
        generator = torch.Generator().manual_seed(self.seed * 1_000_003 + self.epoch)
        order = torch.randperm(self.size, generator=generator).tolist()
        for batch in range(self.start_batch, len(self)):
            first = (batch * self.world_size + self.rank) * self.batch_size
            yield [(self.epoch, i) for i in order[first : first + self.batch_size]]


class FramePairDataset(Dataset):
    """(image, caption) pairs for plain CLIP pretraining, decoded once into memory.

    Pairs: each frame that holds an accepted box (an anomaly's keyframe, or a
    normal video's frame inside its window) with its video's global caption, and
    each accepted box (virtual whole-frame boxes included) cropped from its frame
    with its region caption. ``caption_ids`` let the loss treat repeated
    captions (one caption per video, 16 frames) as positives, not negatives.
    """

    def __init__(
        self,
        params: Params,
        frames_dir: Path,
        boxes_dir: Path,
        tokenizer: PreTrainedTokenizerBase,
        split: str = "train",
    ) -> None:
        frames_dir = Path(frames_dir)
        size = params.model.image_size
        boxes = read_boxes(Path(boxes_dir), split)
        if boxes.num_rows == 0:
            raise DatasetError(f"{boxes_dir}: no accepted {split} boxes: nothing to pretrain on")
        # Whole frames are paired with their video's caption only where the caption
        # is known to hold: box keyframes (inside the annotated event) and the
        # frames inside a normal video's window (its virtual boxes). A uniformly
        # sampled frame of an anomalous video often shows only the street, and
        # pairing it with "two cars collide" teaches that a quiet street is a crash.
        crop_paths = boxes["frame_path"].to_numpy(zero_copy_only=False)
        frame_paths, first = np.unique(crop_paths.astype(object), return_index=True)
        frame_texts = boxes["global_caption"].to_numpy(zero_copy_only=False)[first]
        crop_boxes = np.stack([boxes[c].to_numpy().astype(np.float32) for c in BOX_COORDS], 1)
        texts = np.concatenate([frame_texts, boxes["region_caption"].to_numpy(zero_copy_only=False)])

        jobs = [(p, None) for p in frame_paths] + list(zip(crop_paths, crop_boxes.tolist()))
        self.pixels = torch.stack(
            [
                load_image(frames_dir / p, size, box)
                for p, box in tqdm(jobs, desc="decode pairs", disable=None)
            ]
        )
        unique, inverse = np.unique(texts.astype(object), return_inverse=True)
        self.captions = _tokenize_captions(tokenizer, unique.tolist(), params.model.text_len)
        self.caption_index = torch.from_numpy(inverse.astype(np.int64))
        self.num_frames, self.num_crops = len(frame_paths), len(crop_paths)

    def __len__(self) -> int:
        return self.pixels.shape[0]

    def batch(
        self, indices: torch.Tensor, generator: torch.Generator | None = None
    ) -> dict[str, torch.Tensor]:
        """``pixels [B,3,S,S]`` (normalised), ``text_token_ids``/``text_mask [B,L]``, ``caption_ids [B]``.

        ``L`` is the longest caption of the batch: CLIP's text tower is causal and
        pools at EOS, so trailing padding columns change nothing but the cost.
        With a ``generator`` the images are augmented (:func:`augment`).
        """
        captions = self.caption_index[indices]
        mask = self.captions.mask[captions]
        length = max(int(mask.sum(dim=1).max()), 1)
        pixels = normalize(self.pixels[indices])
        return {
            "pixels": pixels if generator is None else augment(pixels, generator),
            "text_token_ids": self.captions.ids[captions, :length],
            "text_mask": mask[:, :length],
            "caption_ids": self.captions.hashes[captions],
        }

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        return {k: v[0] for k, v in self.batch(torch.tensor([index])).items()}
