"""Held-out region metrics: region-to-caption top-1 and caption-to-video recall, against direct references."""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from transformers import PreTrainedTokenizerFast

from fgclip.config import Params
from fgclip.data.dataset import read_boxes
from fgclip.data.images import load_image, normalize
from fgclip.data.ucf import read_split
from fgclip.eval.region_metrics import (
    held_out_metrics,
    load_held_out,
    region_embeddings,
    region_top1,
    retrieval_recall,
    video_clip,
    video_embeddings,
)
from fgclip.model.fgclip import FGCLIPVideoModel
from fgclip.model.tokenizer import tokenize


@pytest.fixture(scope="module")
def test_videos(eval_params: Params, tiny_sample: Path) -> list[str]:
    return read_split(tiny_sample / eval_params.data.test_split)


def test_load_held_out_groups_the_test_rows_per_video(tiny_boxes: Path, tiny_frames: Path, test_videos):
    held_out = load_held_out(tiny_boxes, tiny_frames, test_videos)
    rows = read_boxes(tiny_boxes, "test").to_pylist()
    annotated = {r["video"] for r in rows}
    assert annotated and all(v.startswith(("Arson", "RoadAccidents")) for v in annotated)
    # Split order, normal test videos absent (they yield no box rows).
    assert [v.video for v in held_out] == [v for v in test_videos if v in annotated]
    for video in held_out:
        mine = [r for r in rows if r["video"] == video.video]
        frames = sorted({r["frame"] for r in mine})
        regions = sorted({r["region"] for r in mine})
        assert [int(p.stem) for p in video.keyframes] == frames
        assert all(p.is_file() for p in video.keyframes)
        assert video.boxes.shape == (len(regions), len(frames), 4)
        assert int(video.box_mask.sum()) == len(mine)
        assert video.global_caption == mine[0]["global_caption"]
        for r in mine:
            ri, ki = regions.index(r["region"]), frames.index(r["frame"])
            assert video.box_mask[ri, ki]
            assert video.boxes[ri, ki].tolist() == pytest.approx([r["x1"], r["y1"], r["x2"], r["y2"]])
            assert video.region_captions[ri] == r["region_caption"]


def test_rows_of_a_video_not_evaluated_are_left_out_with_a_warning(
    tiny_boxes: Path, tiny_frames: Path, test_videos, caplog: pytest.LogCaptureFixture
):
    full = load_held_out(tiny_boxes, tiny_frames, test_videos)
    dropped = full[0].video
    with caplog.at_level(logging.WARNING):
        held_out = load_held_out(tiny_boxes, tiny_frames, [v for v in test_videos if v != dropped])
    assert [v.video for v in held_out] == [v.video for v in full[1:]]
    assert f"not evaluated are left out: {dropped}" in caplog.text


def test_region_top1_counts_identical_captions_as_one_class():
    captions = F.normalize(torch.tensor([[1.0, 0.0, 0.0], [0.0, 1.0, 0.0], [0.0, 0.0, 1.0]]), dim=-1)
    regions = F.normalize(
        torch.tensor([[0.9, 0.1, 0.0], [0.1, 0.9, 0.0], [0.8, 0.0, 0.2], [0.0, 0.2, 0.9]]), dim=-1
    )
    # Regions 0 and 2 share caption 0 (one class); region 3's own caption is 1, but it is nearer 2.
    assert region_top1(regions, captions, torch.tensor([0, 1, 0, 1])) == pytest.approx(3 / 4)
    assert region_top1(regions, captions, torch.tensor([0, 1, 0, 2])) == 1.0


def test_retrieval_recall_counts_any_video_with_the_identical_caption():
    videos = F.normalize(torch.eye(6)[:, :4] + 0.01, dim=-1)  # 6 videos in 4 dims: videos 4, 5 near-uniform
    queries = F.normalize(
        torch.tensor([[1.0, 0.2, 0.1, 0.0], [0.0, 1.0, 0.0, 0.3], [0.0, 0.0, 0.0, 1.0]]), dim=-1
    )
    # Query 0's own video is 0 (ranked first). Query 1's is video 5, but video 1 carries the
    # same caption and ranks first: a hit. Query 2's only relevant video is 2: its
    # top two are video 3 and a near-uniform one, so it is a miss until k reaches video 2.
    relevant = torch.zeros(3, 6, dtype=torch.bool)
    relevant[0, 0] = True
    relevant[1, [1, 5]] = True
    relevant[2, 2] = True
    assert retrieval_recall(queries, videos, relevant, ks=(1, 2)) == {
        1: pytest.approx(2 / 3),
        2: pytest.approx(2 / 3),
    }
    assert retrieval_recall(queries, videos, relevant, ks=(6,)) == {6: 1.0}


def _reference_region_feature(model: FGCLIPVideoModel, video, r: int) -> torch.Tensor:
    """Region r on its own keyframes only (the ones where its box is valid), one region at a time."""
    keep = video.box_mask[r].nonzero().flatten().tolist()
    size = model.clip.config.vision_config.image_size
    pixels = normalize(torch.stack([load_image(video.keyframes[k], size) for k in keep]), model.pixel_stats)
    _, patches = model.encode_images(pixels, with_patches=True)
    boxes = video.boxes[r, keep][None, None]
    feats, valid, _ = model.encode_regions(
        patches[None], boxes, torch.ones(1, 1, len(keep), dtype=torch.bool)
    )
    assert valid.all()
    return feats[0, 0]


def _reference_text(model: FGCLIPVideoModel, tokenizer, texts: list[str]) -> torch.Tensor:
    ids, mask = tokenize(tokenizer, texts, model.cfg.text_len)
    return model.encode_text(ids, mask)


@torch.no_grad()
def test_held_out_metrics_match_a_direct_reference(
    tiny_boxes: Path,
    tiny_frames: Path,
    test_videos,
    make_model: Callable[[int], FGCLIPVideoModel],
    eval_tokenizer: PreTrainedTokenizerFast,
):
    held_out = load_held_out(tiny_boxes, tiny_frames, test_videos)
    # Two videos share a global caption: retrieving either counts for both queries.
    held_out[1] = dataclasses.replace(held_out[1], global_caption=held_out[0].global_caption)
    models = {"a": make_model(0), "b": make_model(1)}
    g = torch.Generator().manual_seed(0)
    video_embeds = {
        name: F.normalize(torch.randn(len(test_videos), 16, generator=g), dim=-1) for name in models
    }
    results, counts = held_out_metrics(
        {name: (m, eval_tokenizer) for name, m in models.items()},
        held_out,
        test_videos,
        video_embeds,
        batch_size=2,
    )
    region_texts = [c for v in held_out for c in v.region_captions]
    distinct = sorted(set(region_texts))
    assert len(distinct) < len(region_texts)  # the tiny sample repeats region captions
    assert counts == {
        "videos": len(held_out),
        "regions": len(region_texts),
        "region_captions": len(distinct),
        "hardneg_regions": sum(bool(n) for v in held_out for n in v.region_negatives),
        "hardneg_captions": len({t for v in held_out for n in v.region_negatives for t in n}),
        "retrieval_queries": len(held_out),
        "retrieval_videos": len(test_videos),
    }
    caption_of = {v.video: v.global_caption for v in held_out}
    for name, model in models.items():
        captions = _reference_text(model, eval_tokenizer, distinct)
        correct, features = [], []
        for video in held_out:
            for r, text in enumerate(video.region_captions):
                features.append(_reference_region_feature(model, video, r))
                correct.append(distinct[int((captions @ features[-1]).argmax())] == text)
        # The batched path (all of a video's keyframes at once, masked; several videos per vision
        # batch, or a video split over batches) gives the same features.
        for batch_size in (2, 64):
            [batched] = region_embeddings([model], held_out, batch_size=batch_size)
            torch.testing.assert_close(batched, torch.stack(features), atol=1e-5, rtol=1e-5)
        assert results[name]["region_top1"] == pytest.approx(sum(correct) / len(correct))

        # Hard negatives: a region scores when its caption beats each of its own negatives.
        wins, m = [], 0
        for video in held_out:
            for r, text in enumerate(video.region_captions):
                negatives = video.region_negatives[r]
                if negatives:
                    own = _reference_text(model, eval_tokenizer, [text])[0] @ features[m]
                    others = _reference_text(model, eval_tokenizer, negatives) @ features[m]
                    wins.append(bool((own > others).all()))
                m += 1
        assert wins, "the tiny sample's shards carry generated hard negatives"
        assert results[name]["hardneg_accuracy"] == pytest.approx(sum(wins) / len(wins))

        queries = _reference_text(model, eval_tokenizer, [v.global_caption for v in held_out])
        for k in (1, 5):
            hits = []
            for query, video in zip(queries, held_out):
                top = (video_embeds[name] @ query).argsort(descending=True)[:k].tolist()
                hits.append(any(caption_of.get(test_videos[i]) == video.global_caption for i in top))
            assert results[name][f"retrieval_r{k}"] == pytest.approx(sum(hits) / len(hits))
    assert results["a"] != results["b"]


@torch.no_grad()
def test_video_embeddings_use_segment_middles(make_model: Callable[[int], FGCLIPVideoModel]):
    model = make_model(0)
    g = torch.Generator().manual_seed(0)
    a, b = torch.randn(10, 16, generator=g), torch.randn(3, 16, generator=g)
    # 10 frames in 4 segments [0, 2.5), [2.5, 5), [5, 7.5), [7.5, 10) -> middles 0, 3, 5, 8;
    # 3 frames in 4 segments: neighbouring segments share a frame.
    assert torch.equal(video_clip(a, 4), a[[0, 3, 5, 8]])
    assert torch.equal(video_clip(b, 4), b[[0, 0, 1, 2]])
    embeds = video_embeddings(model, [video_clip(a, 4), video_clip(b, 4)], batch_size=1)
    expected = model.encode_video(torch.stack([a[[0, 3, 5, 8]], b[[0, 0, 1, 2]]]))
    torch.testing.assert_close(embeds, expected)


@torch.no_grad()
def test_held_out_metrics_resolve_a_null_text_length(
    tiny_boxes: Path,
    tiny_frames: Path,
    test_videos,
    make_model: Callable[[int], FGCLIPVideoModel],
    eval_tokenizer: PreTrainedTokenizerFast,
):
    """params.yaml's ``model.max_text_len: null`` (77 with a pretrained CLIP, 32 for the stand-in):
    the stand-in's word-level tokenizer has no length of its own, so the model's resolved one must
    reach every tokenization, the hard negatives' check included."""
    held_out = load_held_out(tiny_boxes, tiny_frames, test_videos)
    embeds = {
        "m": F.normalize(
            torch.randn(len(test_videos), 16, generator=torch.Generator().manual_seed(0)), dim=-1
        )
    }
    results = {}
    for length in (None, 32):
        model = make_model(0)
        model.cfg = model.cfg.model_copy(update={"max_text_len": length})
        assert model.cfg.text_len == 32
        results[length], _ = held_out_metrics(
            {"m": (model, eval_tokenizer)}, held_out, test_videos, embeds, 4
        )
    assert results[None] == results[32] and results[None]["m"]["hardneg_accuracy"] is not None
