"""Zero-shot anomaly scores of test snippets from class prompts.

A test video contributes one frame per non-overlapping snippet (its ``eval``
frames). Each snippet is scored as a video clip of ``train.num_frames`` snippet
frames centred on it, the same clip length the temporal head was trained on,
so the head sees the kind of input it knows. The clip embedding is compared
with one embedding per class (prompts × templates, averaged) at the model's
global temperature; the anomaly score is ``1 - p(Normal)``.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path

import torch
from torch import Tensor
from transformers import PreTrainedTokenizerBase

from fgclip.data.dataset import load_image, normalize
from fgclip.data.ucf import NORMAL_LABEL
from fgclip.model.fgclip import FGCLIPVideoModel
from fgclip.model.tokenizer import tokenize


def load_pixels(paths: Sequence[Path], image_size: int) -> Tensor:
    """Frames as CLIP input ``[N, 3, image_size, image_size]``, preprocessed exactly as in training."""
    return normalize(torch.stack([load_image(p, image_size) for p in paths]))


def snippet_windows(num_snippets: int, clip_len: int) -> Tensor:
    """Snippet indices ``[S, clip_len]`` of the clip centred on each snippet.

    Row ``s`` is ``s - clip_len // 2, ..., s - clip_len // 2 + clip_len - 1``,
    clamped to ``[0, S - 1]``: near the video's ends the edge snippet is
    repeated, so every clip has the trained length and stays inside its video.
    """
    offsets = torch.arange(clip_len) - clip_len // 2
    return (torch.arange(num_snippets)[:, None] + offsets[None, :]).clamp_(0, num_snippets - 1)


@torch.no_grad()
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
    device = _device(model)
    ids, mask = tokenize(tokenizer, texts, max_len)
    embeds = torch.cat(
        [
            model.encode_text(ids[i : i + batch_size].to(device), mask[i : i + batch_size].to(device))
            for i in range(0, len(texts), batch_size)
        ]
    )
    sums = torch.zeros(len(classes), embeds.shape[1], device=device).index_add_(0, owner.to(device), embeds)
    return classes, torch.nn.functional.normalize(sums, dim=-1)


def input_size(model: FGCLIPVideoModel) -> int:
    """The square image size the model's vision tower takes."""
    return model.clip.config.vision_config.image_size


@torch.no_grad()
def frame_embeddings(
    models: Sequence[FGCLIPVideoModel], paths: Sequence[Path], batch_size: int
) -> list[Tensor]:
    """Embeddings ``[N, D]`` of the frames at ``paths`` under each model (unnormalised).

    Frames are decoded batch by batch, once for all models that take the same
    input size, so a long video never sits in memory as pixels.
    """
    out: list[list[Tensor]] = [[] for _ in models]
    for i in range(0, len(paths), batch_size):
        pixels: dict[int, Tensor] = {}
        for embeds, model in zip(out, models):
            size = input_size(model)
            if size not in pixels:
                pixels[size] = load_pixels(paths[i : i + batch_size], size)
            embeds.append(model.encode_images(pixels[size].to(_device(model)))[0])
    return [torch.cat(embeds) for embeds in out]


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
    global_scale, _ = model.scales()
    logits = (global_scale.exp() * video_embeds @ class_embeds.T).double()
    anomaly = torch.cat([logits[:, :normal_index], logits[:, normal_index + 1 :]], dim=1)
    return (anomaly.logsumexp(dim=1) - logits[:, normal_index]).cpu()


def snippet_scores(*args, **kwargs) -> Tensor:
    """Anomaly score ``1 - p(Normal)`` of every snippet (the sigmoid of :func:`snippet_log_odds`)."""
    return torch.sigmoid(snippet_log_odds(*args, **kwargs))


def _device(model: FGCLIPVideoModel) -> torch.device:
    return next(model.parameters()).device
