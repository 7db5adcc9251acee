"""VideoClipDataset, collate, EpochBatchSampler and FramePairDataset on the tiny sample."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
import pytest
import torch

from fgclip.config import Params
from fgclip.data.batch import PAD_ID, collate
from fgclip.data.dataset import (
    EpochBatchSampler,
    FramePairDataset,
    VideoClipDataset,
    caption_ids,
)
from fgclip.data.images import CLIP_MEAN, CLIP_STD, PixelStats
from fgclip.data.layout import DatasetError
from fgclip.model.tokenizer import load_tokenizer


@pytest.fixture(scope="module")
def setup(train_params: Callable[..., Params], tiny_clip, tiny_frames: Path, tiny_boxes: Path):
    params = train_params()
    tokenizer = load_tokenizer(tiny_clip[0])
    return params, tokenizer, tiny_frames, tiny_boxes


@pytest.fixture(scope="module")
def dataset(setup) -> VideoClipDataset:
    params, tokenizer, frames, boxes = setup
    return VideoClipDataset(params, frames, boxes, tokenizer)


def _boxes_table(boxes_dir: Path) -> pa.Table:
    manifest = json.loads((boxes_dir / "manifest.json").read_text())
    return pa.concat_tables([pq.read_table(boxes_dir / s["path"]) for s in manifest["shards"]])


def test_one_item_per_train_video_with_shapes_and_masks(dataset, setup) -> None:
    params, tokenizer, frames_dir, boxes_dir = setup
    index = pq.read_table(frames_dir / "index.parquet").to_pandas()
    train_videos = sorted(index.loc[(index.split == "train") & (index.purpose == "train"), "video"].unique())
    assert dataset.videos == train_videos

    rows = _boxes_table(boxes_dir).to_pandas()
    s, t, k_max, r_max = (
        params.model.image_size,
        params.train.num_frames,
        params.train.max_keyframes,
        params.train.max_regions,
    )
    for i, video in enumerate(dataset.videos):
        item = dataset[(0, i)]
        assert item.video == video
        assert item.frames.shape == (t, 3, s, s) and item.frames.dtype == torch.float32
        r, k = item.boxes.shape[:2]
        n_regions = rows.loc[rows.video == video, "region"].nunique()
        assert r == min(n_regions, r_max)
        assert 1 <= k <= k_max and item.keyframes.shape == (k, 3, s, s)
        assert item.box_mask.shape == (r, k) and item.region_token_ids.shape == (r, params.model.text_len)
        # Boxes exist exactly where the mask says, and are valid normalized xyxy there.
        b = item.boxes[item.box_mask]
        assert ((b >= 0) & (b <= 1)).all() and (b[:, 2] > b[:, 0]).all() and (b[:, 3] > b[:, 1]).all()
        assert (item.boxes[~item.box_mask] == 0).all()
        # Every kept region has a box on a keyframe whenever there are enough keyframe slots.
        if r <= k_max:
            assert item.box_mask.any(dim=1).all()
        # The global caption's tokens end with EOS (CLIP pools there).
        last = int(item.text_mask.sum()) - 1
        assert item.text_token_ids[last].item() == tokenizer.eos_token_id


def test_items_match_the_box_rows(dataset, setup) -> None:
    """Each masked box equals the validated row of that region on that keyframe."""
    _, _, _, boxes_dir = setup
    rows = _boxes_table(boxes_dir).to_pandas()
    video = next(v for v in dataset.videos if not v.startswith("Training_Normal"))
    i = dataset.videos.index(video)
    item = dataset[(0, i)]
    expected = rows[rows.video == video].sort_values(["region", "frame"])
    regions = sorted(expected.region.unique())[: item.boxes.shape[0]]
    found = 0
    for r, region in enumerate(regions):
        for k in range(item.boxes.shape[1]):
            if item.box_mask[r, k]:
                box = item.boxes[r, k].numpy()
                match = expected[(expected.region == region)][["x1", "y1", "x2", "y2"]].to_numpy()
                assert np.isclose(match, box).all(axis=1).any()
                found += 1
    assert found >= 1
    caption = expected.global_caption.iloc[0]
    assert item.caption_id.item() == caption_ids([caption])[0]


def test_train_items_are_seeded_per_epoch_and_eval_items_fixed(dataset, setup) -> None:
    params, tokenizer, frames, boxes = setup
    a, b = dataset[(0, 1)], dataset[(0, 1)]
    for key in ("frames", "keyframes", "boxes", "box_mask"):
        assert torch.equal(getattr(a, key), getattr(b, key))
    # Another epoch draws other frames from the segments (16 frames, 4 segments).
    assert any(not torch.equal(dataset[(e, 1)].frames, a.frames) for e in range(1, 4))
    fixed = VideoClipDataset(params, frames, boxes, tokenizer, train=False)
    assert torch.equal(fixed[(0, 1)].frames, fixed[(5, 1)].frames)


def test_caption_ids_are_stable_63_bit() -> None:
    ids = caption_ids(["a man runs", "a man runs", "a fire burns"])
    assert ids[0] == ids[1] != ids[2]
    assert (ids >= 0).all() and ids.dtype == np.int64
    # Independent of the process (blake2b, not Python's salted hash).
    assert caption_ids(["a man runs"])[0] == 809336677680276056


def test_collate_pads_regions_and_keyframes(dataset) -> None:
    items = [dataset[(0, i)] for i in range(len(dataset))]
    batch = collate(items)
    b = len(items)
    r = max(it.boxes.shape[0] for it in items)
    k = max(it.boxes.shape[1] for it in items)
    assert batch.frames.shape[:2] == (b, items[0].frames.shape[0])
    assert batch.boxes.shape == (b, r, k, 4) and batch.box_mask.shape == (b, r, k)
    assert batch.region_mask.shape == (b, r) and batch.region_caption_ids.shape == (b, r)
    assert batch.videos == [it.video for it in items]
    for i, it in enumerate(items):
        ri, ki = it.boxes.shape[:2]
        assert batch.region_mask[i].tolist() == [True] * ri + [False] * (r - ri)
        assert (batch.region_caption_ids[i, ri:] == PAD_ID).all()
        assert not batch.box_mask[i, ri:].any() and not batch.box_mask[i, :, ki:].any()
        assert (batch.keyframes[i, ki:] == 0).all()
        assert torch.equal(batch.boxes[i, :ri, :ki], it.boxes)


def test_epoch_sampler_resumes_mid_epoch_and_splits_ranks() -> None:
    sampler = EpochBatchSampler(10, 3, seed=7)
    assert len(sampler) == 3  # the incomplete last batch is dropped
    sampler.set_position(2)
    full = list(sampler)
    sampler.set_position(2, start_batch=1)
    assert list(sampler) == full[1:]
    assert all(epoch == 2 for batch in full for epoch, _ in batch)
    sampler.set_position(3)
    assert [i for b in list(sampler) for _, i in b] != [i for b in full for _, i in b]
    ranks = [EpochBatchSampler(10, 2, seed=7, rank=r, world_size=2) for r in (0, 1)]
    seen = [i for s in ranks for b in s for _, i in b]
    assert len(seen) == len(set(seen)) == 8
    with pytest.raises(DatasetError, match="lower train.batch_size"):
        EpochBatchSampler(3, 4, seed=0)


def test_frame_pairs_cover_frames_and_box_crops(setup) -> None:
    params, tokenizer, frames_dir, boxes_dir = setup
    pairs = FramePairDataset(params, frames_dir, boxes_dir, tokenizer)
    rows = _boxes_table(boxes_dir).to_pandas()
    # Whole frames come only from frames that hold a box (keyframes, normal videos'
    # windows): a uniformly sampled anomaly frame may show no anomaly at all.
    n_frames = rows[rows.split == "train"].frame_path.nunique()
    assert pairs.num_frames == n_frames
    assert pairs.num_crops == (rows.split == "train").sum()
    assert len(pairs) == n_frames + pairs.num_crops
    batch = pairs.batch(torch.arange(len(pairs)))
    s = params.model.image_size
    assert batch["pixels"].shape == (len(pairs), 3, s, s)
    # Frames of one video share their caption id; a crop carries its region caption.
    ids = batch["caption_ids"]
    assert ids[0] == ids[1]
    assert (
        ids[-1].item()
        == caption_ids(
            [rows[rows.split == "train"].sort_values(["video", "region", "frame"]).region_caption.iloc[-1]]
        )[0]
    )
    assert pairs[0]["pixels"].shape == (3, s, s)


def test_missing_inputs_are_named(setup, tmp_path: Path) -> None:
    params, tokenizer, frames, boxes = setup
    with pytest.raises(DatasetError, match="index.parquet"):
        VideoClipDataset(params, tmp_path, boxes, tokenizer)
    with pytest.raises(DatasetError, match="manifest.json"):
        VideoClipDataset(params, frames, tmp_path, tokenizer)


def test_a_video_without_box_rows_is_reported_not_silently_dropped(
    setup, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    params, tokenizer, frames, boxes = setup
    table = _boxes_table(boxes)
    dropped = "Arson/Arson002_x264.mp4"
    kept = table.filter(pc.not_equal(table["video"], dropped))
    pq.write_table(kept, tmp_path / "part-00000.parquet")
    manifest = {"shards": [{"path": "part-00000.parquet", "rows": kept.num_rows}], "rows": kept.num_rows}
    (tmp_path / "manifest.json").write_text(json.dumps(manifest))
    dataset = VideoClipDataset(params, frames, tmp_path, tokenizer)
    assert dropped not in dataset.videos and len(dataset.videos) == 5
    assert f"have frames but no accepted box rows (so no caption) and are left out: {dropped}" in caplog.text


def test_region_image_ids_join_regions_that_show_the_same_pixels(dataset) -> None:
    """A normal video's regions all pool its whole frame: one image id. Boxed regions: one id each."""
    checked_virtual = checked_boxed = 0
    seen: dict[int, str] = {}
    for i, video in enumerate(dataset.videos):
        item = dataset[i]
        ids = item.region_image_ids.tolist()
        assert len(ids) == item.boxes.shape[0]
        whole = bool((item.boxes[item.box_mask] == torch.tensor([0.0, 0.0, 1.0, 1.0])).all())
        if "Normal" in video and len(ids) > 1:
            assert whole and len(set(ids)) == 1, video
            checked_virtual += 1
        elif "Normal" not in video:
            assert len(set(ids)) == len(ids), video
            checked_boxed += 1
        for image_id in ids:  # never shared across videos
            assert seen.setdefault(image_id, video) == video
    assert checked_virtual > 0 and checked_boxed > 0
    batch = collate([dataset[i] for i in range(3)])
    assert batch.region_image_ids.shape == batch.region_caption_ids.shape


def test_items_are_normalised_with_the_models_own_statistics(dataset, setup) -> None:
    """Training feeds the weights the statistics they were trained with (preprocessor_config.json)."""
    params, tokenizer, frames, boxes = setup
    half = PixelStats((0.5, 0.5, 0.5), (0.5, 0.5, 0.5))
    other = VideoClipDataset(params, frames, boxes, tokenizer, train=False, pixel_stats=half)
    clip_items = VideoClipDataset(params, frames, boxes, tokenizer, train=False)
    a, b = clip_items[(0, 0)], other[(0, 0)]
    for key in ("frames", "keyframes"):
        # Undo each normalisation: the same 0-1 pixels underneath.
        raw_a = getattr(a, key) * torch.tensor(CLIP_STD).view(3, 1, 1) + torch.tensor(CLIP_MEAN).view(3, 1, 1)
        raw_b = getattr(b, key) * 0.5 + 0.5
        torch.testing.assert_close(raw_a, raw_b, atol=1e-5, rtol=0)
        assert (getattr(a, key) - getattr(b, key)).abs().max() > 0.1
