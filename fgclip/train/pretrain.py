"""Stage ``pretrain``: the embedded stand-in for OpenAI's CLIP weights.

No weights are ever downloaded, so when ``model.pretrained`` is null the
pipeline pretrains a tiny CLIP from scratch on the sample's own (image, caption)
pairs: every train frame with its video's caption and every accepted box crop
with its region caption. Fine-tuning then starts from a model that already
aligns images and words, as it would from OpenAI's weights.

The tokenizer's vocabulary is every caption of ``annotations.json`` plus every
zero-shot prompt of ``evaluate``, so evaluation prompts are in-vocabulary.
"""

from __future__ import annotations

import json
import logging
import math
import time
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from tqdm import tqdm
from transformers import CLIPModel

from fgclip.atomic import write_text_atomic
from fgclip.config import Params
from fgclip.data.annotations import load_annotations
from fgclip.data.dataset import FramePairDataset
from fgclip.model.fgclip import capped_logit_scale, tiny_clip_config
from fgclip.model.losses import contrastive_loss
from fgclip.model.sources import conversion_needed
from fgclip.model.tokenizer import build_tokenizer
from fgclip.outputs import check_output_dir, replacing_output_dir
from fgclip.train.checkpoints import PRETRAIN_SUMMARY_FILE as SUMMARY_FILE
from fgclip.train.optim import build_optimizer, cosine_with_warmup

logger = logging.getLogger(__name__)

STAGE = "pretrain"


def vocabulary_texts(params: Params, annotations: Path) -> list[str]:
    """Every caption (global and region, all splits) and every filled evaluation prompt."""
    records, _ = load_annotations(annotations)
    texts = [r.global_caption for r in records]
    texts += [caption for r in records for caption in r.region_captions]
    # Given hard negatives may use words no caption does: without them those would be <|unk|>.
    texts += [n for r in records for row in (r.region_negatives or ()) for n in row]
    texts += [
        template.format(prompt)
        for template in params.evaluate.templates
        for prompts in params.evaluate.prompts.values()
        for prompt in prompts
    ]
    return texts


def pretrain_clip(
    params: Params, frames_dir: Path, boxes_dir: Path, annotations: Path, out: Path
) -> dict[str, Any]:
    """Pretrain the tiny CLIP and save it (with its tokenizer) to ``out``; returns the summary.

    When ``model.pretrained`` names a CLIP that loads as it is (a ``CLIPModel`` directory
    or hub id), skipped, writing only a note; when it names weights to convert (an
    OpenAI ``.pt``, an open_clip checkpoint, an FG-CLIP directory), ``fgclip
    import-weights`` converts them into ``out``, once, and training reads that.
    ``out`` is replaced as a whole, and only when it is absent, empty or this stage's
    (``fgclip.outputs``): checked first, before any work.
    """
    out = Path(out)
    inputs = {"--frames": Path(frames_dir), "--boxes": Path(boxes_dir), "--annotations": Path(annotations)}
    check_output_dir(out, STAGE, inputs)
    if params.model.pretrained is not None and conversion_needed(params.model.pretrained):
        from fgclip.model.import_weights import import_weights

        m = params.model
        logger.info(
            "model.pretrained = %s is %s: converting it into %s",
            m.pretrained,
            conversion_needed(m.pretrained),
            out,
        )
        report = import_weights(
            m.pretrained,
            out,
            fmt=m.pretrained_format,
            arch=m.pretrained_arch,
            activation=m.pretrained_activation,
            stage=STAGE,
        )
        return {"imported": True, "pretrained": m.pretrained, "format": report["format"], "out": str(out)}
    if params.model.pretrained is not None:
        logger.info(
            "model.pretrained = %s: skipping the embedded stand-in pretraining", params.model.pretrained
        )
        summary = {"skipped": True, "pretrained": params.model.pretrained}
        # DVC expects the stage's output either way: a note that says why it holds no model.
        with replacing_output_dir(out, STAGE, inputs) as tmp:
            write_text_atomic(tmp / SUMMARY_FILE, json.dumps(summary, indent=2) + "\n")
        return summary

    cfg = params.pretrain
    torch.manual_seed(cfg.seed)
    tokenizer = build_tokenizer(vocabulary_texts(params, annotations))
    model_cfg = params.model.model_copy(update={"logit_scale_init_value": cfg.logit_scale_init_value})
    clip = CLIPModel(tiny_clip_config(model_cfg, tokenizer))
    pairs = FramePairDataset(params, frames_dir, boxes_dir, tokenizer)
    if len(pairs) < 2:
        raise ValueError(
            f"{frames_dir}, {boxes_dir}: {len(pairs)} image-caption pair(s); pretraining needs 2+"
        )
    logger.info(
        "pretraining a tiny CLIP on %d pairs (%d frames, %d box crops), vocab %d, %d steps",
        len(pairs),
        pairs.num_frames,
        pairs.num_crops,
        len(tokenizer),
        cfg.steps,
    )

    optimizer = build_optimizer(clip, cfg.lr, cfg.weight_decay)
    scheduler = cosine_with_warmup(optimizer, cfg.warmup_steps, cfg.steps)
    generator = torch.Generator().manual_seed(cfg.seed)
    batch_size = min(cfg.batch_size, len(pairs))
    order, cursor = torch.randperm(len(pairs), generator=generator), 0
    losses: list[float] = []
    start = time.perf_counter()
    clip.train()
    bar = tqdm(range(1, cfg.steps + 1), desc="pretrain", unit="step", disable=None)
    for step in bar:
        if cursor + batch_size > len(order):  # a new epoch: every batch has the same size
            order, cursor = torch.randperm(len(pairs), generator=generator), 0
        batch = pairs.batch(order[cursor : cursor + batch_size], generator if cfg.augment else None)
        cursor += batch_size

        image = clip.get_image_features(pixel_values=batch["pixels"]).pooler_output
        text = clip.get_text_features(
            input_ids=batch["text_token_ids"], attention_mask=batch["text_mask"]
        ).pooler_output
        scale = capped_logit_scale(clip.logit_scale, params.model.logit_scale_max)
        result = contrastive_loss(
            F.normalize(image, dim=-1), F.normalize(text, dim=-1), scale, ids=batch["caption_ids"]
        )
        if not torch.isfinite(result.loss):
            raise FloatingPointError(f"pretrain: non-finite loss {result.loss.item()} at step {step}")
        optimizer.zero_grad(set_to_none=True)
        result.loss.backward()
        optimizer.step()
        scheduler.step()
        losses.append(result.loss.item())
        bar.set_postfix(loss=f"{losses[-1]:.3f}")
        if step == 1 or step % 50 == 0 or step == cfg.steps:
            logger.info(
                "pretrain step=%d loss=%.4f logit_scale=%.4f", step, losses[-1], clip.logit_scale.item()
            )

    seconds = time.perf_counter() - start
    # The average of the last few steps: a single batch's loss is noisy.
    tail = losses[-min(10, len(losses)) :]
    summary = {
        "skipped": False,
        "steps": cfg.steps,
        "pairs": len(pairs),
        "vocab_size": len(tokenizer),
        "first_loss": losses[0],
        "final_loss": sum(tail) / len(tail),
        "final_logit_scale": clip.logit_scale.item(),
        "final_temperature": math.exp(clip.logit_scale.item()),
        "seconds": round(seconds, 2),
    }
    with replacing_output_dir(out, STAGE, inputs) as tmp:
        clip.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        # Without the wall time: the file is part of the DVC output, whose hash must not
        # change between two runs that train the same weights.
        report = {k: v for k, v in summary.items() if k != "seconds"}
        write_text_atomic(tmp / SUMMARY_FILE, json.dumps(report, indent=2) + "\n")
    logger.info(
        "pretrained CLIP saved to %s: loss %.4f -> %.4f in %.1f s",
        out,
        summary["first_loss"],
        summary["final_loss"],
        seconds,
    )
    return summary
