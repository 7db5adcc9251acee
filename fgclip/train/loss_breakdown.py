"""Which region captions carry a trained model's region loss (``fgclip region-loss``).

The region-loss health gate says *that* the loss is high, not where it comes
from. This scores the training set the way a one-process run trains on it: the
training batches (``EpochBatchSampler``: same order, incomplete last batch
dropped), the training loss itself (``FGCLIPLoss``, so the same negatives and
masking) and a memory bank of ``train.memory_bank_size`` as at the end of a run
(on from the first batch; full from the second pass on when an epoch holds that
many regions). Each region's loss, the mean of its two directions, is summed
per caption, with and without the bank. Under DDP a run scores each rank's
regions against all ranks' (``batch_size`` x world size); this does not.

The means here are over regions; the logged ``train/loss_region`` is a mean
of per-batch means, so the two differ a little when batches hold different
numbers of regions.

It is how the sample's region loss of 1.08 was traced: the whole-frame regions
of normal videos carried three quarters of it, which led to the masking bug in
``fgclip.model.losses``.
"""

from __future__ import annotations

from collections import defaultdict
from pathlib import Path

import torch
from tqdm import tqdm

from fgclip.config import Params
from fgclip.data.batch import collate
from fgclip.data.dataset import EpochBatchSampler, VideoClipDataset
from fgclip.model.fgclip import FGCLIPVideoModel
from fgclip.model.losses import FGCLIPLoss
from fgclip.model.memory_bank import RegionMemoryBank
from fgclip.model.tokenizer import load_tokenizer


@torch.no_grad()
def region_loss_breakdown(
    params: Params,
    model_dir: Path,
    frames_dir: Path,
    boxes_dir: Path,
    *,
    epochs: int = 2,
    device: torch.device | str = "cpu",
) -> dict:
    """Region loss of ``model_dir`` (a ``train`` output) on the training set, per caption.

    Returns ``{"regions", "region_loss", "region_loss_no_bank", "bank_size",
    "epochs", "captions": [{"caption", "regions", "loss", "loss_no_bank", "share"}]}``,
    captions sorted by their share of the summed loss (with the bank), largest first.
    The losses are means over all regions scored, in every epoch.
    """
    if epochs < 1:
        raise ValueError(f"epochs must be at least 1, got {epochs}")
    model = FGCLIPVideoModel.from_pretrained(model_dir).to(device).eval()
    tokenizer = load_tokenizer(model_dir)
    data = VideoClipDataset(
        params, frames_dir, boxes_dir, tokenizer, split="train", train=True, pixel_stats=model.pixel_stats
    )
    text_of = dict(zip(data.captions.hashes.tolist(), data.captions.texts))

    cfg = params.train
    bank = RegionMemoryBank(cfg.memory_bank_size, model.clip.config.projection_dim, warmup_steps=0).to(device)
    bank.begin_pass(1)  # on from the first batch
    loss_fn = FGCLIPLoss(cfg.region_loss_weight, cfg.hardneg_loss_weight)

    sums: dict[int, list[float]] = defaultdict(lambda: [0, 0.0, 0.0])  # regions, loss, loss without bank
    sampler = EpochBatchSampler(len(data), cfg.batch_size, cfg.seed)
    batches = []
    for epoch in range(epochs):
        sampler.set_position(epoch)
        batches.extend(sampler)
    for keys in tqdm(batches, desc="region-loss", unit="batch", disable=None):
        out = model(collate([data[key] for key in keys]).to(device))
        with_bank = loss_fn(out, bank.negatives())
        bank.enqueue(*with_bank.regions)
        losses = with_bank.region_row_losses.tolist()
        plain = loss_fn(out).region_row_losses.tolist()
        for caption, loss, loss_plain in zip(out.region_caption_ids.tolist(), losses, plain):
            entry = sums[caption]
            entry[0] += 1
            entry[1] += loss
            entry[2] += loss_plain

    regions = sum(int(e[0]) for e in sums.values())
    total = sum(e[1] for e in sums.values())
    captions = [
        {
            "caption": text_of[caption],
            "regions": int(n),
            "loss": loss / n,
            "loss_no_bank": plain / n,
            "share": loss / total if total > 0 else 0.0,
        }
        for caption, (n, loss, plain) in sums.items()
    ]
    captions.sort(key=lambda c: -c["share"])
    return {
        "regions": regions,
        "region_loss": total / max(regions, 1),
        "region_loss_no_bank": sum(e[2] for e in sums.values()) / max(regions, 1),
        "bank_size": cfg.memory_bank_size,
        "epochs": epochs,
        "captions": captions,
    }


def format_breakdown(result: dict, top: int = 15) -> str:
    """The breakdown as a plain-text table of the ``top`` captions."""
    lines = [
        (
            f"region loss over {result['regions']} regions ({result['epochs']} passes over the training "
            f"set): {result['region_loss']:.3f} with a {result['bank_size']}-entry memory bank, "
            f"{result['region_loss_no_bank']:.3f} without"
        ),
        f"{'share':>6}  {'regions':>7}  {'loss':>6}  {'no bank':>7}  caption",
    ]
    for c in result["captions"][:top]:
        lines.append(
            f"{c['share']:6.1%}  {c['regions']:7d}  {c['loss']:6.3f}  {c['loss_no_bank']:7.3f}  {c['caption']}"
        )
    hidden = len(result["captions"]) - top
    if hidden > 0:
        lines.append(f"... {hidden} more caption(s) (--top)")
    return "\n".join(lines) + "\n"
