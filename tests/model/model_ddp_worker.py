"""A two-rank gloo worker for the DDP loss test (runs in spawned processes).

Kept apart from the test module and free of transformers so that each spawned
process only imports torch and the loss code: spawning is the slow part of the test.
"""

from __future__ import annotations

import math
import os
import socket
from types import SimpleNamespace

import torch
import torch.distributed as dist
import torch.nn.functional as F

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


def unit(n: int, d: int = 8, seed: int = 0) -> torch.Tensor:
    """``n`` seeded random unit vectors."""
    return F.normalize(torch.randn(n, d, generator=torch.Generator().manual_seed(seed)), dim=-1)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _rows(sizes: tuple[int, ...], rank: int) -> slice:
    start = sum(sizes[:rank])
    return slice(start, start + sizes[rank])


def ddp_worker(rank: int, world: int, port: int, queue) -> None:
    """Compute this rank's share of the global and region losses; put plain results on ``queue``."""
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        rows = _rows(GLOBAL_SIZES, rank)
        video, text = unit(sum(GLOBAL_SIZES), seed=0)[rows], unit(sum(GLOBAL_SIZES), seed=1)[rows]
        ids = torch.tensor(GLOBAL_IDS)[rows]
        video.requires_grad_(True)
        result = global_loss(video, text, torch.tensor(LN_100), ids)
        result.loss.backward()

        r_rows = _rows(REGION_SIZES, rank)
        bank = RegionMemoryBank(size=8, dim=8, warmup_steps=0)
        # FGCLIPLoss only reads these fields of an FGCLIPOutput.
        out = SimpleNamespace(
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
        region = FGCLIPLoss(region_weight=1.0)(out, bank.negatives())
        bank.enqueue(*region.regions)  # every rank's regions: each rank holds the same bank
        j_rows = _rows(JOINED_SIZES, rank)
        joined_ids = torch.tensor(JOINED_IDS)[j_rows]
        out.region_image_embeds = unit(sum(JOINED_SIZES), seed=4)[j_rows]
        out.region_text_embeds = unit(sum(JOINED_SIZES), seed=5)[j_rows]
        out.region_caption_ids, out.region_image_ids = joined_ids[:, 0], joined_ids[:, 1]
        joined = FGCLIPLoss(region_weight=1.0)(out)
        queue.put(
            (
                rank,
                {
                    "loss": result.loss.item(),
                    "logits": tuple(result.logits_i2t.shape),
                    "grad": video.grad.tolist(),
                    "region": region.loss_region.item(),
                    "bank_ids": bank.negatives().ids.tolist(),
                    "joined": joined.loss_region.item(),
                },
            )
        )
    finally:
        dist.destroy_process_group()
