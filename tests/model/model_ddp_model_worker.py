"""Two gloo ranks training the real tiny model under DistributedDataParallel, one rank without regions.

Kept apart from the test module: each spawned process imports only what it runs.
"""

from __future__ import annotations

import os
import traceback
from datetime import timedelta

import torch
import torch.distributed as dist
from model_tiny import CAPTIONS, TINY
from torch.nn.parallel import DistributedDataParallel
from transformers import CLIPModel

from fgclip.config import ModelConfig
from fgclip.data.batch import Batch
from fgclip.model.fgclip import FGCLIPVideoModel, tiny_clip_config
from fgclip.model.losses import FGCLIPLoss
from fgclip.model.tokenizer import build_tokenizer, tokenize


def _batch(tokenizer, rank: int, with_regions: bool) -> Batch:
    g = torch.Generator().manual_seed(rank)
    b, t, k, r, n, size, length = 2, 2, 2, 2, 2, TINY["image_size"], TINY["max_text_len"]
    ids, mask = tokenize(tokenizer, CAPTIONS[rank : rank + b], length)
    rids, rmask = tokenize(tokenizer, CAPTIONS[2 : 2 + b * r], length)
    nids, nmask = tokenize(tokenizer, [CAPTIONS[i % len(CAPTIONS)] for i in range(b * r * n)], length)
    return Batch(
        videos=[f"r{rank}v{i}" for i in range(b)],
        frames=torch.randn(b, t, 3, size, size, generator=g),
        text_token_ids=ids,
        text_mask=mask,
        caption_ids=torch.arange(b) + 10 * rank,
        keyframes=torch.randn(b, k, 3, size, size, generator=g),
        boxes=torch.tensor([0.1, 0.1, 0.7, 0.8]).repeat(b, r, k, 1),
        box_mask=torch.ones(b, r, k, dtype=torch.bool),
        region_token_ids=rids.view(b, r, length),
        region_text_mask=rmask.view(b, r, length),
        region_caption_ids=100 + torch.arange(b * r).view(b, r) + 10 * rank,
        region_image_ids=200 + torch.arange(b * r).view(b, r) + 10 * rank,
        region_mask=torch.full((b, r), with_regions),
        region_negative_token_ids=nids.view(b, r, n, length),
        region_negative_text_mask=nmask.view(b, r, n, length),
        region_negative_mask=torch.ones(b, r, n, dtype=torch.bool),
    )


def ddp_model_worker(rank: int, world: int, port: int, queue) -> None:
    """Two optimizer steps per configuration (long_text off, on); rank 1 has no region at all."""
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), TORCH_DISTRIBUTED_DEBUG="DETAIL")
    try:
        dist.init_process_group("gloo", rank=rank, world_size=world, timeout=timedelta(seconds=30))
        tokenizer = build_tokenizer(CAPTIONS)
        results = {}
        for long_text in (False, True):
            torch.manual_seed(0)  # the same initial weights on both ranks, as the loop seeds them
            cfg = ModelConfig(**{**TINY, "long_text": long_text})
            model = FGCLIPVideoModel(CLIPModel(tiny_clip_config(cfg, tokenizer)), cfg).train()
            ddp = DistributedDataParallel(model)
            loss_fn = FGCLIPLoss(region_weight=0.5, hardneg_weight=0.5)
            optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
            batch = _batch(tokenizer, rank, with_regions=rank == 0)
            losses = []
            for _ in range(2):
                result = loss_fn(ddp(batch))
                result.loss.backward()
                optimizer.step()
                optimizer.zero_grad()
                losses.append((result.loss_region.item(), result.loss_hardneg.item()))
            dist.barrier()
            # DDP keeps the replicas equal: the weights after the steps must agree across ranks.
            flat = torch.cat([p.detach().flatten() for p in model.parameters()])
            gathered = [torch.empty_like(flat) for _ in range(world)]
            dist.all_gather(gathered, flat)
            results[long_text] = {
                "losses": losses,
                "replicas_equal": bool(torch.equal(gathered[0], gathered[1])),
            }
        queue.put((rank, results))
    except Exception:  # noqa: BLE001 - the test reads the traceback instead of waiting for a hung peer
        queue.put((rank, {"error": traceback.format_exc()}))
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()
