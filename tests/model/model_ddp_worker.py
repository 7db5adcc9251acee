"""A two-rank gloo worker for the DDP loss test (runs in spawned processes).

Kept apart from the test module and free of transformers so that each spawned
process only imports torch and the loss code: spawning is the slow part of the test,
so one spawn runs every DDP check and reports them all at once.

The process group runs at ``TORCH_DISTRIBUTED_DEBUG=DETAIL``: every collective is
first checked against the other rank's (op, shapes, sequence number), so ranks that
fall out of step fail at once with "Detected mismatch between collectives on ranks"
instead of hanging, aborting in gloo, or silently exchanging the wrong tensors.
"""

from __future__ import annotations

import math
import os
import socket
import traceback
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import timedelta
from types import SimpleNamespace

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from fgclip.model import losses
from fgclip.model.losses import FGCLIPLoss, global_loss
from fgclip.model.memory_bank import RegionMemoryBank

LN_100 = math.log(100.0)
# Rank 1 holds fewer global pairs than rank 0, and no region at all.
GLOBAL_SIZES = (3, 2)
REGION_SIZES = (3, 0)
GLOBAL_IDS = (0, 1, 0, 2, 3)
# Regions on both ranks whose known matches cross ranks: caption 11 is shown by
# image 7 (rank 0) and image 9 (rank 1), so rank 0's text 11 is no negative of
# rank 1's image 9 (nor rank 1's text 11 of image 7), and rank 0's image 7 sees
# rank 1's text 11 as a true caption.
JOINED_SIZES = (3, 2)
JOINED_IDS = ((10, 7), (11, 7), (12, 8), (11, 9), (13, 9))  # (caption id, image id)
# Which hard negatives the JOINED regions have (2 slots each): rank 0's 3 regions all have
# one, 1 of rank 1's 2 does. A mean of the two ranks' means (of 3 and of 1 regions) is not
# the mean over the 4.
HARDNEG_PRESENT = ((True, True), (True, False), (True, True), (False, False), (True, False))
# A collective that waits longer than this raises in the worker (gloo's default is 30 min).
COLLECTIVE_TIMEOUT = timedelta(seconds=30)


def unit(n: int, d: int = 8, seed: int = 0) -> torch.Tensor:
    """``n`` seeded random unit vectors."""
    return F.normalize(torch.randn(n, d, generator=torch.Generator().manual_seed(seed)), dim=-1)


def hardneg_texts() -> torch.Tensor:
    """``[5, 2, 8]`` unit hard-negative captions of the JOINED regions."""
    g = torch.Generator().manual_seed(6)
    return F.normalize(torch.randn(sum(JOINED_SIZES), 2, 8, generator=g), dim=-1)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _rows(sizes: tuple[int, ...], rank: int) -> slice:
    start = sum(sizes[:rank])
    return slice(start, start + sizes[rank])


def loss_input(**fields) -> SimpleNamespace:
    """The fields of an FGCLIPOutput that FGCLIPLoss reads; no hard negatives (a local loss, no collective)."""
    defaults = {
        "hardneg_text_embeds": None,
        "hardneg_mask": None,
        "logit_scale_hardneg": torch.tensor(LN_100),
    }
    return SimpleNamespace(**(defaults | fields))


def region_projection() -> nn.Linear:
    """A seeded projection, the same on every rank (as DDP's broadcast of the initial weights makes it)."""
    proj = nn.Linear(8, 8)
    g = torch.Generator().manual_seed(6)
    with torch.no_grad():
        proj.weight.copy_(torch.randn(8, 8, generator=g) / math.sqrt(8))
        proj.bias.copy_(torch.randn(8, generator=g) / math.sqrt(8))
    return proj


def region_inputs(rows: slice = slice(None)) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Leaf region inputs (image, text) that require grad, and their ``[caption id, image id]``."""
    m = sum(REGION_SIZES)
    image = unit(m, seed=7)[rows].requires_grad_(True)
    text = unit(m, seed=8)[rows].requires_grad_(True)
    ids = torch.arange(m)[rows]
    return image, text, torch.stack([ids, ids], dim=1)  # each region its own caption and pixels


def project(proj: nn.Linear, x: torch.Tensor) -> torch.Tensor:
    return F.normalize(proj(x), dim=-1)


def flat_grads(params: list[torch.Tensor]) -> torch.Tensor:
    return torch.cat([p.grad.reshape(-1) for p in params])


def _region_grad_step(rank: int) -> dict:
    """One training-like step whose region features require grad; rank 1 has no region.

    Forward + backward of FGCLIPLoss on every rank, then DDP's gradient all-reduce
    and a barrier: collectives that a rank skipping the all_gathers' backward
    (themselves collectives) would meet out of step.
    """
    proj = region_projection()
    scale = torch.tensor(LN_100, requires_grad=True)
    image, text, ids = region_inputs(_rows(REGION_SIZES, rank))
    rows = _rows(GLOBAL_SIZES, rank)
    # The global features require grad too: the backward interleaves the global and
    # region gathers' collectives, as in training.
    video = unit(sum(GLOBAL_SIZES), seed=0)[rows].requires_grad_(True)
    out = loss_input(
        video_embeds=video,
        text_embeds=unit(sum(GLOBAL_SIZES), seed=1)[rows],
        caption_ids=torch.tensor(GLOBAL_IDS)[rows],
        region_image_embeds=project(proj, image),
        region_text_embeds=project(proj, text),
        region_caption_ids=ids[:, 0],
        region_image_ids=ids[:, 1],
        logit_scale_global=torch.tensor(LN_100),
        logit_scale_region=scale,
    )
    result = FGCLIPLoss(region_weight=1.0, hardneg_weight=0.0)(out)
    result.loss.backward()
    params = [*proj.parameters(), scale]
    local = flat_grads(params)
    summed = local.clone()
    dist.all_reduce(summed)  # DDP's bucket all-reduce (a sum; DDP then divides by the world size)
    dist.barrier()
    return {
        "region": result.loss_region.item(),
        "image_grad": image.grad.tolist(),
        "text_grad": text.grad.tolist(),
        "local_param_grad": local.tolist(),
        "summed_param_grad": summed.tolist(),
    }


@contextmanager
def old_zero_rule() -> Iterator[None]:
    """The region loss's zero before the fix: connected to the local rows only, not the gathered columns."""
    fixed = losses._symmetric_info_nce

    def old(image, text, image_cols, text_cols, logit_scale, **kwargs):
        if image.shape[0] > 0:
            return fixed(image, text, image_cols, text_cols, logit_scale, **kwargs)
        zero = image.sum() * 0 + text.sum() * 0 + logit_scale * 0
        empty = image.new_zeros((0, image_cols.shape[0]))
        return losses.ContrastiveResult(zero, empty, empty, image.new_zeros(0))

    losses._symmetric_info_nce = old
    try:
        yield
    finally:
        losses._symmetric_info_nce = fixed


def _old_rule_error(rank: int) -> str | None:
    """The error the region-gradient step raises under the old zero rule (None: it missed the bug).

    Run last: the failed collectives leave the process group unusable.
    """
    with old_zero_rule():
        try:
            _region_grad_step(rank)
        except RuntimeError as e:
            return str(e)
    return None


def ddp_worker(rank: int, world: int, port: int, queue) -> None:
    """Compute this rank's share of the losses and gradients; put plain results on ``queue``.

    Puts ``(rank, {"error": traceback})`` instead when a check raises, so the test
    fails with the worker's own error rather than waiting for a result.
    """
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.set_debug_level(dist.DebugLevel.DETAIL)  # before init: the group is wrapped at creation
    dist.init_process_group("gloo", rank=rank, world_size=world, timeout=COLLECTIVE_TIMEOUT)
    try:
        rows = _rows(GLOBAL_SIZES, rank)
        video, text = unit(sum(GLOBAL_SIZES), seed=0)[rows], unit(sum(GLOBAL_SIZES), seed=1)[rows]
        ids = torch.tensor(GLOBAL_IDS)[rows]
        video.requires_grad_(True)
        result = global_loss(video, text, torch.tensor(LN_100), ids)
        result.loss.backward()

        r_rows = _rows(REGION_SIZES, rank)
        bank = RegionMemoryBank(size=8, dim=8, warmup_steps=0)
        out = loss_input(
            video_embeds=video.detach(),
            text_embeds=text,
            caption_ids=ids,
            region_image_embeds=unit(sum(REGION_SIZES), seed=2)[r_rows],
            region_text_embeds=unit(sum(REGION_SIZES), seed=3)[r_rows],
            region_caption_ids=torch.arange(sum(REGION_SIZES))[r_rows],
            region_image_ids=torch.arange(sum(REGION_SIZES))[r_rows],  # each region its own pixels
            logit_scale_global=torch.tensor(LN_100),
            logit_scale_region=torch.tensor(LN_100),
        )
        bank.begin_pass(1)
        region = FGCLIPLoss(region_weight=1.0, hardneg_weight=0.0)(out, bank.negatives())
        bank.enqueue(*region.regions)  # every rank's regions: each rank holds the same bank
        j_rows = _rows(JOINED_SIZES, rank)
        joined_ids = torch.tensor(JOINED_IDS)[j_rows]
        out.region_image_embeds = unit(sum(JOINED_SIZES), seed=4)[j_rows]
        out.region_text_embeds = unit(sum(JOINED_SIZES), seed=5)[j_rows]
        out.region_caption_ids, out.region_image_ids = joined_ids[:, 0], joined_ids[:, 1]
        joined = FGCLIPLoss(region_weight=1.0, hardneg_weight=0.0)(out)
        out.hardneg_text_embeds = hardneg_texts()[j_rows]
        out.hardneg_mask = torch.tensor(HARDNEG_PRESENT)[j_rows]
        hardneg = FGCLIPLoss(region_weight=1.0, hardneg_weight=1.0)(out)
        report = {
            "loss": result.loss.item(),
            "logits": tuple(result.logits_i2t.shape),
            "grad": video.grad.tolist(),
            "region": region.loss_region.item(),
            "bank_ids": bank.negatives().ids.tolist(),
            "joined": joined.loss_region.item(),
            "hardneg": hardneg.loss_hardneg.item(),
            "hardneg_total": hardneg.loss.item(),
            "region_grad": _region_grad_step(rank),
            "old_rule_error": _old_rule_error(rank),
        }
    except Exception:  # noqa: BLE001 - any failure goes back to the test, which shows it
        report = {"error": traceback.format_exc()}
    try:
        queue.put((rank, report))
    finally:
        dist.destroy_process_group()
