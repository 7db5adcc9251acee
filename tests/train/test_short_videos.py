"""A clip longer than a video's extracted frames repeats frames: said once, with the numbers."""

from __future__ import annotations

import logging
from pathlib import Path

import pyarrow.parquet as pq

from fgclip.config import Params
from fgclip.data.dataset import VideoClipDataset
from fgclip.model.tokenizer import build_tokenizer


def _dataset_warnings(caplog) -> list[logging.LogRecord]:
    # The one-word tokenizer makes every hard negative <|unk|>-identical to its caption,
    # which the dataset says too: only the clip-length warnings are this test's.
    return [
        r for r in caplog.records if r.name == "fgclip.data.dataset" and "train.num_frames" in r.getMessage()
    ]


def test_num_frames_above_the_extracted_frames_is_a_warning(
    tiny_params: Params, tiny_frames: Path, tiny_boxes: Path, caplog
) -> None:
    tokenizer = build_tokenizer(["a"])
    per_video = tiny_params.frames.train_frames_per_video  # what extract_frames wrote per train video
    index = pq.read_table(tiny_frames / "index.parquet").to_pandas()
    counts = index[index.purpose == "train"].groupby("video").size()
    assert counts.max() == per_video

    with caplog.at_level(logging.WARNING, logger="fgclip.data.dataset"):
        VideoClipDataset(tiny_params, tiny_frames, tiny_boxes, tokenizer)
    assert not _dataset_warnings(caplog)  # train.num_frames=8 <= 16 extracted frames

    longer = tiny_params.with_overrides(train={"num_frames": per_video + 4})
    with caplog.at_level(logging.WARNING, logger="fgclip.data.dataset"):
        data = VideoClipDataset(longer, tiny_frames, tiny_boxes, tokenizer)
    [record] = _dataset_warnings(caplog)
    assert record.getMessage().startswith(
        f"train.num_frames={per_video + 4} but {len(data)} of {len(data)} train videos have fewer extracted "
        f"frames (fewest {counts[data.videos].min()}; frames.train_frames_per_video={per_video}): their clips "
        "repeat frames. Raise frames.train_frames_per_video and re-run extract_frames, or lower train.num_frames"
    )
