"""Metrics on the held-out region annotations: region-to-caption top-1 and caption-to-video recall.

The test videos' validated boxes (``validate_boxes`` shards, split ``test``:
anomalous test videos only; normal test videos yield no rows) are never seen in
training. They give two checks of what the frame AUC cannot show:

- **region top-1**: each annotated region's dense RoI feature, averaged over the
  keyframes where its box is valid (exactly as in training, but over all of its
  keyframes), is compared with every *distinct* region caption of the test set.
  It is correct when its own caption text ranks first. Identical caption strings
  are one class (compared verbatim), so two regions both captioned "flames burn"
  are not each other's negatives. Chance is ``1 / num_region_captions``.
- **hard-negative accuracy** (FG-CLIP's hard-negative task): the share of
  regions with hard negatives (``validate_boxes`` keeps them in the shards) whose
  own caption is more similar to the region feature than every one of its
  negatives. Chance is ``1 / (1 + negatives per region)``.
- **caption-to-video R@1 / R@5**: each annotated test video's global caption
  ranks every scored test video (normal ones included, as distractors) by the
  similarity of its video embedding. A query is a hit at k when any of the top k
  videos carries the *identical* caption: videos with duplicate captions are
  indistinguishable by text, so retrieving either one is correct.

Video embeddings are the temporal head over ``train.num_frames`` of the video's
evaluation frames, one from the middle of each of as many equal segments (the
validation-mode choice of the training dataset), computed from the embeddings
the frame scoring already holds.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyarrow.compute as pc
import torch
from torch import Tensor
from tqdm import tqdm
from transformers import PreTrainedTokenizerBase

from fgclip.data.dataset import read_boxes
from fgclip.data.images import segment_indices
from fgclip.data.layout import BOX_COORDS
from fgclip.eval.zeroshot import model_device, model_pixels, text_embeddings
from fgclip.model.fgclip import FGCLIPVideoModel
from fgclip.model.tokenizer import tokenize

log = logging.getLogger(__name__)

RECALL_AT = (1, 5)


@dataclass(frozen=True)
class HeldOutVideo:
    """One annotated test video: its global caption and its regions on its keyframes."""

    video: str
    global_caption: str
    keyframes: list[Path]  # distinct box keyframes, in frame order
    boxes: Tensor  # [R, K, 4] normalised xyxy (zero where absent)
    box_mask: Tensor  # [R, K] bool: region r has a validated box on keyframe k
    region_captions: list[str]  # [R]
    region_negatives: list[list[str]]  # [R] hard-negative captions of each region (may be empty)


def load_held_out(boxes_dir: Path, frames_dir: Path, test_videos: Sequence[str]) -> list[HeldOutVideo]:
    """The accepted test-split box rows grouped per video, for the videos being evaluated, in their order.

    Box rows of a test video that is not evaluated (it failed to decode) are left
    out with a warning. An empty list means the shards hold no test annotations.
    """
    table = read_boxes(Path(boxes_dir), "test")
    order = {video: i for i, video in enumerate(test_videos)}
    present = pc.unique(table["video"]).to_pylist()
    absent = sorted(v for v in present if v not in order)
    if absent:
        log.warning(
            "%s: box rows of %d test video(s) that are not evaluated are left out: %s",
            boxes_dir,
            len(absent),
            ", ".join(absent),
        )
    columns = table.to_pydict()
    rows: dict[str, list[int]] = {}
    for i, video in enumerate(columns["video"]):
        if video in order:
            rows.setdefault(video, []).append(i)
    out = []
    for video in sorted(rows, key=order.__getitem__):
        idx = rows[video]
        frames = sorted({columns["frame"][i] for i in idx})
        path_of = {columns["frame"][i]: Path(frames_dir) / columns["frame_path"][i] for i in idx}
        regions = sorted({columns["region"][i] for i in idx})
        boxes = torch.zeros((len(regions), len(frames), 4), dtype=torch.float32)
        mask = torch.zeros((len(regions), len(frames)), dtype=torch.bool)
        captions, negatives = {}, {}
        for i in idx:
            r, k = regions.index(columns["region"][i]), frames.index(columns["frame"][i])
            boxes[r, k] = torch.tensor([columns[c][i] for c in BOX_COORDS])
            mask[r, k] = True
            captions[r] = columns["region_caption"][i]
            negatives[r] = list(columns["region_negatives"][i] or [])
        out.append(
            HeldOutVideo(
                video=video,
                global_caption=columns["global_caption"][idx[0]],
                keyframes=[path_of[f] for f in frames],
                boxes=boxes,
                box_mask=mask,
                region_captions=[captions[r] for r in range(len(regions))],
                region_negatives=[negatives[r] for r in range(len(regions))],
            )
        )
    return out


def _video_groups(held_out: Sequence[HeldOutVideo], batch_size: int) -> list[list[HeldOutVideo]]:
    """Consecutive videos grouped until their keyframes fill a batch (a long video is a group alone)."""
    groups: list[list[HeldOutVideo]] = [[]]
    filled = 0
    for video in held_out:
        if groups[-1] and filled + len(video.keyframes) > batch_size:
            groups.append([])
            filled = 0
        groups[-1].append(video)
        filled += len(video.keyframes)
    return [g for g in groups if g]


@torch.no_grad()
def region_embeddings(
    models: Sequence[FGCLIPVideoModel], held_out: Sequence[HeldOutVideo], batch_size: int
) -> list[Tensor]:
    """Per model, ``[M, D]`` region features of every held-out region, in video then region order.

    Keyframes of consecutive videos share vision batches (a video has a handful,
    and one forward per video would cost more than the frame scoring), and are
    decoded once per input size for all models; each region's feature is the
    model's dense RoI path over the keyframes where its box is valid.
    """
    out: list[list[Tensor]] = [[] for _ in models]
    for group in tqdm(_video_groups(held_out, batch_size), desc="region metrics", unit="batch", disable=None):
        paths = [p for video in group for p in video.keyframes]
        decoded: dict[int, Tensor] = {}
        for feats, model in zip(out, models):
            pixels = model_pixels(decoded, paths, model)
            device = model_device(model)
            patches = torch.cat(
                [
                    model.encode_images(pixels[i : i + batch_size].to(device), with_patches=True)[1]
                    for i in range(0, len(paths), batch_size)
                ]
            )
            for video, video_patches in zip(group, patches.split([len(v.keyframes) for v in group])):
                regions, _, _ = model.encode_regions(
                    video_patches[None], video.boxes[None].to(device), video.box_mask[None].to(device)
                )
                feats.append(regions[0])
    return [torch.cat(feats) for feats in out]


def region_top1(region_feats: Tensor, caption_feats: Tensor, caption_index: Tensor) -> float:
    """Share of regions whose own caption (row ``caption_index[m]`` of ``caption_feats``) ranks first."""
    predicted = (region_feats @ caption_feats.T).argmax(dim=1).cpu()
    return float((predicted == caption_index).double().mean())


def hard_negative_accuracy(
    region_feats: Tensor, positive_feats: Tensor, negative_feats: Tensor, negative_index: Tensor
) -> tuple[float | None, int]:
    """Share of regions whose own caption outranks all of its hard negatives, and how many were scored.

    ``negative_index [M, N]`` holds rows of ``negative_feats`` (-1 = none); regions
    without any negative are not scored (None when no region has one).
    """
    present = negative_index >= 0
    has = present.any(dim=1)
    if not has.any():
        return None, 0
    positive = (region_feats * positive_feats).sum(dim=-1).cpu()
    negative = (region_feats @ negative_feats.T).cpu() if negative_feats.shape[0] else positive[:, None]
    scores = torch.gather(negative, 1, negative_index.clamp(min=0)).masked_fill(~present, float("-inf"))
    wins = (positive[:, None] > scores).all(dim=1)
    return float(wins[has].double().mean()), int(has.sum())


def _distinguishable(
    tokenizer: PreTrainedTokenizerBase,
    max_len: int,
    captions: np.ndarray,
    caption_index: Tensor,
    negative_texts: list[str],
    negative_index: Tensor,
) -> Tensor:
    """``negative_index`` without the negatives whose token ids equal their positive's (-1 there)."""
    present = negative_index >= 0
    if not present.any():
        return negative_index
    positive_ids, _ = tokenize(tokenizer, captions.tolist(), max_len)
    negative_ids, _ = tokenize(tokenizer, negative_texts, max_len)
    rows = caption_index[:, None].expand_as(negative_index)
    same = (negative_ids[negative_index.clamp(min=0)] == positive_ids[rows]).all(dim=-1) & present
    return negative_index.masked_fill(same, -1)


def retrieval_recall(
    query_feats: Tensor, video_feats: Tensor, relevant: Tensor, ks: Sequence[int] = RECALL_AT
) -> dict[int, float]:
    """``{k: share of queries with a relevant video among the k most similar}``.

    ``relevant [Q, V]`` marks, per query, every video carrying its caption.
    """
    order = (query_feats @ video_feats.T).argsort(dim=1, descending=True, stable=True).cpu()
    hits = torch.gather(relevant, 1, order)  # [Q, V]: relevance in ranked order
    return {k: float(hits[:, :k].any(dim=1).double().mean()) for k in ks}


def video_clip(frame_embeds: Tensor, num_frames: int) -> Tensor:
    """``[num_frames, D]``: the frames at the middle of ``num_frames`` equal segments, as validation picks them."""
    picked = torch.from_numpy(segment_indices(len(frame_embeds), num_frames, None))
    return frame_embeds[picked.to(frame_embeds.device)]


@torch.no_grad()
def video_embeddings(model: FGCLIPVideoModel, clips: Sequence[Tensor], batch_size: int) -> Tensor:
    """``[V, D]`` video embeddings of clips ``[T, D]`` (from :func:`video_clip`), batch by batch."""
    stacked = torch.stack(list(clips))
    return torch.cat(
        [model.encode_video(stacked[i : i + batch_size]) for i in range(0, len(stacked), batch_size)]
    )


def held_out_metrics(
    models: Mapping[str, tuple[FGCLIPVideoModel, PreTrainedTokenizerBase]],
    held_out: Sequence[HeldOutVideo],
    gallery: Sequence[str],
    video_embeds: Mapping[str, Tensor],
    batch_size: int,
    max_negatives: int | None = None,
) -> tuple[dict[str, dict[str, float]], dict[str, int]]:
    """Region top-1 and caption-to-video recall of each model, and the counts they were computed over.

    Args:
        models: name -> (model, its tokenizer).
        held_out: from :func:`load_held_out`, restricted to ``gallery`` videos.
        gallery: the evaluated test videos; ``video_embeds[name]`` is ``[V, D]`` in this order.
        max_negatives: hard negatives scored per region, as training uses them
            (``train.max_hard_negatives``); None = all. Per model, a negative whose token ids
            equal its positive's is left out (it could only tie), as in training.
    """
    region_texts = [c for v in held_out for c in v.region_captions]
    distinct, caption_index = np.unique(np.array(region_texts, dtype=object), return_inverse=True)
    region_negatives = [n[:max_negatives] for v in held_out for n in v.region_negatives]
    negative_texts = sorted({t for row in region_negatives for t in row})
    row_of = {t: i for i, t in enumerate(negative_texts)}
    width = max([0, *(len(row) for row in region_negatives)])
    negative_index = torch.full((len(region_negatives), width), -1, dtype=torch.long)
    for m, row in enumerate(region_negatives):
        negative_index[m, : len(row)] = torch.tensor([row_of[t] for t in row], dtype=torch.long)
    caption_of = {v.video: v.global_caption for v in held_out}
    gallery_captions = [caption_of.get(video) for video in gallery]
    relevant = torch.tensor(
        [[c == v.global_caption for c in gallery_captions] for v in held_out], dtype=torch.bool
    )
    names = list(models)
    feats = region_embeddings([models[n][0] for n in names], held_out, batch_size)
    results = {}
    for name, region_feats in zip(names, feats):
        model, tokenizer = models[name]
        captions = text_embeddings(model, tokenizer, distinct.tolist(), model.cfg.text_len, batch_size)
        negative_feats = text_embeddings(model, tokenizer, negative_texts, model.cfg.text_len, batch_size)
        queries = text_embeddings(
            model,
            tokenizer,
            [v.global_caption for v in held_out],
            model.cfg.caption_len,
            batch_size,
            long=True,
        )
        recall = retrieval_recall(queries, video_embeds[name].to(queries.device), relevant)
        index = torch.from_numpy(caption_index.astype(np.int64))
        hardneg, _ = hard_negative_accuracy(
            region_feats,
            captions[index.to(captions.device)],
            negative_feats,
            _distinguishable(
                tokenizer, model.cfg.text_len, distinct, index, negative_texts, negative_index
            ),
        )
        results[name] = {
            "region_top1": region_top1(region_feats, captions, index),
            "hardneg_accuracy": hardneg,
            **{f"retrieval_r{k}": value for k, value in recall.items()},
        }
    counts = {
        "videos": len(held_out),
        "regions": len(region_texts),
        "region_captions": len(distinct),
        "hardneg_regions": int((negative_index >= 0).any(dim=1).sum()),
        "hardneg_captions": len(negative_texts),
        "retrieval_queries": len(held_out),
        "retrieval_videos": len(gallery),
    }
    return results, counts
