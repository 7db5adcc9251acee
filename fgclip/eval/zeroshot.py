"""Zero-shot anomaly scores of test snippets from class prompts.

A test video contributes one frame per non-overlapping snippet (its ``eval``
frames). Each snippet is scored as a video clip of ``train.num_frames`` snippet
frames centred on it, the same clip length the temporal head was trained on,
so the head sees the kind of input it knows. The clip embedding is compared
with one embedding per class (prompts × templates, averaged) at the model's
global temperature; the anomaly score is ``1 - p(Normal)``.

With ``evaluate.scoring: region_grid`` a snippet is scored from its frame alone,
through the dense RoI path: each cell of a grid (and the whole frame) against
the class embeddings at the region temperature, and the frame takes its most
anomalous region's score.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path

import torch
from torch import Tensor
from transformers import PreTrainedTokenizerBase

from fgclip.data.images import load_image, normalize
from fgclip.data.ucf import NORMAL_LABEL
from fgclip.model.fgclip import FGCLIPVideoModel
from fgclip.model.tokenizer import tokenize


def model_pixels(decoded: dict[int, Tensor], paths: Sequence[Path], model: FGCLIPVideoModel) -> Tensor:
    """Frames as ``model``'s input ``[N, 3, S, S]``, preprocessed exactly as in training.

    ``decoded`` holds the ``uint8`` frames by input size: models of one size share one
    decode, and each normalises them with its own statistics (``model.pixel_stats``).
    """
    size = input_size(model)
    if size not in decoded:
        decoded[size] = torch.stack([load_image(p, size) for p in paths])
    return normalize(decoded[size], model.pixel_stats)


def snippet_windows(num_snippets: int, clip_len: int) -> Tensor:
    """Snippet indices ``[S, clip_len]`` of the clip centred on each snippet.

    Row ``s`` is ``s - clip_len // 2, ..., s - clip_len // 2 + clip_len - 1``,
    clamped to ``[0, S - 1]``: near the video's ends the edge snippet is
    repeated, so every clip has the trained length and stays inside its video.
    """
    offsets = torch.arange(clip_len) - clip_len // 2
    return (torch.arange(num_snippets)[:, None] + offsets[None, :]).clamp_(0, num_snippets - 1)


@torch.no_grad()
@torch.no_grad()
def text_embeddings(
    model: FGCLIPVideoModel,
    tokenizer: PreTrainedTokenizerBase,
    texts: Sequence[str],
    max_len: int,
    batch_size: int,
    *,
    long: bool = False,
) -> Tensor:
    """``[N, D]`` L2-normalised embeddings of ``texts``, ``batch_size`` at a time.

    ``long=True`` for global captions (FG-CLIP's long path under ``model.long_text``).
    """
    device = model_device(model)
    if not texts:
        return model.encode_text(torch.zeros((0, 1), dtype=torch.long, device=device),
                                 torch.zeros((0, 1), dtype=torch.long, device=device), long=long)  # fmt: skip
    ids, mask = tokenize(tokenizer, list(texts), max_len)
    return torch.cat(
        [
            model.encode_text(
                ids[i : i + batch_size].to(device), mask[i : i + batch_size].to(device), long=long
            )
            for i in range(0, len(texts), batch_size)
        ]
    )


def class_embeddings(
    model: FGCLIPVideoModel,
    tokenizer: PreTrainedTokenizerBase,
    prompts: Mapping[str, Sequence[str]],
    templates: Sequence[str],
    max_len: int,
    batch_size: int,
) -> tuple[list[str], Tensor]:
    """One unit-norm text embedding per class: the mean over its prompts × templates.

    Returns the class names (in ``prompts`` order) and the ``[C, D]`` matrix.
    """
    if NORMAL_LABEL not in prompts or len(prompts) < 2:
        raise ValueError(
            f"prompts need a {NORMAL_LABEL!r} class and at least one anomaly class "
            f"(the score is 1 - p(Normal)), got {list(prompts)}"
        )
    empty = [c for c, texts in prompts.items() if not texts]
    if empty or not templates:
        raise ValueError(
            f"every class needs prompt texts and at least one template (empty: {empty or 'templates'})"
        )
    classes = list(prompts)
    texts = [t.format(p) for c in classes for p in prompts[c] for t in templates]
    owner = torch.tensor([i for i, c in enumerate(classes) for _ in prompts[c] for _ in templates])
    device = model_device(model)
    embeds = text_embeddings(model, tokenizer, texts, max_len, batch_size)
    sums = torch.zeros(len(classes), embeds.shape[1], device=device).index_add_(0, owner.to(device), embeds)
    return classes, torch.nn.functional.normalize(sums, dim=-1)


def input_size(model: FGCLIPVideoModel) -> int:
    """The square image size the model's vision tower takes."""
    return model.clip.config.vision_config.image_size


def grid_boxes(cells: int) -> Tensor:
    """Normalised xyxy boxes ``[R, 4]``: the ``cells x cells`` grid row by row, then the whole frame.

    With one cell the grid is the whole frame, which is not repeated.
    """
    edges = torch.linspace(0.0, 1.0, cells + 1).tolist()
    boxes = [[edges[c], edges[r], edges[c + 1], edges[r + 1]] for r in range(cells) for c in range(cells)]
    if cells > 1:
        boxes.append([0.0, 0.0, 1.0, 1.0])
    return torch.tensor(boxes, dtype=torch.float32)


@torch.no_grad()
def frame_features(
    models: Sequence[FGCLIPVideoModel], paths: Sequence[Path], batch_size: int, boxes: Tensor | None = None
) -> list[tuple[Tensor, Tensor | None]]:
    """Per model: frame embeddings ``[N, D]`` (unnormalised) and, with ``boxes [R, 4]``,
    the dense RoI features ``[N, R, D]`` (L2-normalised) of those boxes on every frame.

    Frames are decoded batch by batch, once for all models that take the same
    input size, so a long video never sits in memory as pixels; the dense patch
    grid is reduced to the R boxes batch by batch for the same reason.
    """
    out: list[tuple[list[Tensor], list[Tensor]]] = [([], []) for _ in models]
    for i in range(0, len(paths), batch_size):
        decoded: dict[int, Tensor] = {}
        for (embeds, regions), model in zip(out, models):
            pixels = model_pixels(decoded, paths[i : i + batch_size], model)
            frame, patches = model.encode_images(pixels.to(model_device(model)), with_patches=boxes is not None)
            embeds.append(frame)
            if patches is not None:
                regions.append(_boxes_on_frames(model, patches, boxes))
    return [(torch.cat(e), torch.cat(r) if r else None) for e, r in out]


def _boxes_on_frames(model: FGCLIPVideoModel, patches: Tensor, boxes: Tensor) -> Tensor:
    """Dense RoI features ``[N, R, D]`` of the same ``boxes [R, 4]`` on each of N frames' patches."""
    n, r = patches.shape[0], boxes.shape[0]
    per_frame = boxes.to(patches.device)[None, :, None, :].expand(n, r, 1, 4)
    mask = torch.ones((n, r, 1), dtype=torch.bool, device=patches.device)
    features, _, _ = model.encode_regions(patches[:, None], per_frame, mask)
    return features


def _anomaly_log_odds(logits: Tensor, normal_index: int) -> Tensor:
    """``log((1 - p(Normal)) / p(Normal))`` along the last (class) dimension, in float64."""
    logits = logits.double()
    anomaly = torch.cat([logits[..., :normal_index], logits[..., normal_index + 1 :]], dim=-1)
    return anomaly.logsumexp(dim=-1) - logits[..., normal_index]


@torch.no_grad()
def region_grid_log_odds(
    model: FGCLIPVideoModel, region_feats: Tensor, class_embeds: Tensor, normal_index: int
) -> Tensor:
    """Anomaly log-odds ``[N]`` (float64, CPU) of frames scored region by region: the max over R.

    ``region_feats [N, R, D]`` are the dense RoI features of each frame's grid
    cells (:func:`frame_features` with :func:`grid_boxes`), compared with the
    class prompts at the region temperature, the scale the region path was
    trained at. The max of the log-odds is the max of ``1 - p(Normal)``: a frame
    is as anomalous as its most anomalous region.
    """
    region_scale = model.scales().region
    logits = region_scale.exp() * region_feats @ class_embeds.T  # [N, R, C]
    return _anomaly_log_odds(logits, normal_index).amax(dim=1).cpu()


@torch.no_grad()
def snippet_log_odds(
    model: FGCLIPVideoModel,
    frame_embeds: Tensor,
    class_embeds: Tensor,
    normal_index: int,
    clip_len: int,
    batch_size: int,
) -> Tensor:
    """Anomaly log-odds ``log((1 - p(Normal)) / p(Normal))`` of every snippet, ``[S]`` float64 on the CPU.

    ``frame_embeds`` are the model's embeddings of the video's eval frames, one
    per snippet in frame order. Snippet ``s`` is scored as the clip of the
    ``clip_len`` snippets centred on it (:func:`snippet_windows`).
    The log-odds order snippets exactly as ``1 - p(Normal)`` does, but never
    saturate: at temperature 100 logit gaps of tens are common, and ``1 - p``
    rounds to exactly 1.0 (a tie in the AUC) once p(Normal) < 1e-16.
    """
    windows = snippet_windows(len(frame_embeds), clip_len).to(frame_embeds.device)
    clips = frame_embeds[windows]  # [S, T, D]
    video_embeds = torch.cat(
        [model.encode_video(clips[i : i + batch_size]) for i in range(0, len(clips), batch_size)]
    )
    global_scale = model.scales().glob
    return _anomaly_log_odds(global_scale.exp() * video_embeds @ class_embeds.T, normal_index).cpu()


def model_device(model: FGCLIPVideoModel) -> torch.device:
    return next(model.parameters()).device
