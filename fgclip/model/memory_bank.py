"""MoCo-style memory bank of region features: extra negatives for the region loss.

A batch of 8 videos holds only a few dozen regions, so the region InfoNCE has few
negatives. The bank keeps the region image and region text features (and caption
ids, so duplicates of the anchor's caption are not used as negatives) of past
batches in a ring buffer. It stays off for a warm-up of ``warmup_steps`` forward
passes, while the features still move fast, then switches itself on: the users'
original bank never did, because the switch was missing altogether.

The bank does not count forward passes: the training step does
(``fgclip.train.step.TrainStep``) and tells it each pass's number with
:meth:`RegionMemoryBank.begin_pass`, so the switch and the data position of a
resumed run read one counter. The loss never touches the bank: the step hands it
:meth:`~RegionMemoryBank.negatives` and then queues the batch's features with
:meth:`~RegionMemoryBank.enqueue`.

Every piece of state is a buffer, so the bank has a ``state_dict()`` of its own
(saved in a checkpoint's ``state.pt``, beside the optimizer) and moves with
``.to(device)``.
"""

from __future__ import annotations

import logging
from typing import NamedTuple

import torch
from torch import nn

logger = logging.getLogger(__name__)


# Ids kept per queued region: its caption id and its image id (see losses.py).
ID_COLUMNS = 2


class RegionFeatures(NamedTuple):
    """Region features with their ``[caption id, image id]`` rows: the bank's negatives, or what it queues."""

    image: torch.Tensor  # [F, D]
    text: torch.Tensor  # [F, D]
    ids: torch.Tensor  # [F, 2]


class RegionMemoryBank(nn.Module):
    """Ring buffer of ``size`` region (image, text, ids) triples; ids = [caption id, image id].

    Args:
        size: number of queued regions (0 disables the bank for good).
        dim: feature dimension.
        warmup_steps: forward passes before the bank switches on.
        grad_accum_steps: forward passes per optimizer step (only to report the
            optimizer step at which the bank switched on).
    """

    image_queue: torch.Tensor
    text_queue: torch.Tensor
    id_queue: torch.Tensor
    ptr: torch.Tensor
    filled: torch.Tensor
    forward_passes: torch.Tensor
    enabled: torch.Tensor
    enabled_at: torch.Tensor

    def __init__(self, size: int, dim: int, warmup_steps: int, grad_accum_steps: int = 1) -> None:
        super().__init__()
        if size < 0 or dim < 1 or warmup_steps < 0 or grad_accum_steps < 1:
            raise ValueError(
                f"invalid memory bank: size={size}, dim={dim}, warmup_steps={warmup_steps}, "
                f"grad_accum_steps={grad_accum_steps}"
            )
        self.size = size
        self.dim = dim
        self.warmup_steps = warmup_steps
        self.grad_accum_steps = grad_accum_steps
        self.register_buffer("image_queue", torch.zeros(size, dim))
        self.register_buffer("text_queue", torch.zeros(size, dim))
        self.register_buffer("id_queue", torch.full((size, ID_COLUMNS), -1, dtype=torch.long))
        self.register_buffer("ptr", torch.zeros((), dtype=torch.long))
        self.register_buffer("filled", torch.zeros((), dtype=torch.long))
        self.register_buffer("forward_passes", torch.zeros((), dtype=torch.long))
        self.register_buffer("enabled", torch.zeros((), dtype=torch.bool))
        self.register_buffer("enabled_at", torch.full((), -1, dtype=torch.long))

    @property
    def is_enabled(self) -> bool:
        return bool(self.enabled)

    def begin_pass(self, passes: int) -> bool:
        """Forward pass number ``passes`` (from 1) is starting: switch on once the warm-up is over.

        Returns ``is_enabled``. ``forward_passes`` records the number for
        :meth:`state`; the training step owns the count.
        """
        self.forward_passes.fill_(passes)
        if not self.is_enabled and self.size > 0 and passes >= self.warmup_steps:
            self.enabled.fill_(True)
            self.enabled_at.fill_(passes)
            # The (1-based) optimizer step this pass belongs to: with accumulation 8,
            # passes 49..56 make step 7, so pass 50 is step 7 and pass 48 is still step 6.
            optimizer_step = (passes - 1) // self.grad_accum_steps + 1
            logger.info(
                "[Memory Bank] enabled @ training_step %d (optimizer step %d)", passes, optimizer_step
            )
        return self.is_enabled

    def negatives(self) -> RegionFeatures:
        """The queued ``(image [F, D], text [F, D], ids [F, 2])``: only filled slots, empty while off."""
        n = int(self.filled) if self.is_enabled else 0
        # The ring is written from slot 0 on, so the filled slots are always [0, filled).
        # Copies, not views: the loss saves these for backward, and enqueue() overwrites
        # the queue in place before backward runs.
        return RegionFeatures(
            self.image_queue[:n].clone(), self.text_queue[:n].clone(), self.id_queue[:n].clone()
        )

    @torch.no_grad()
    def enqueue(self, image: torch.Tensor, text: torch.Tensor, ids: torch.Tensor) -> None:
        """Queue a batch of region features (detached); a no-op while the bank is off.

        Under DDP, pass the features gathered from all ranks (every rank then holds
        the same bank), not the local ones.
        """
        if not self.is_enabled:
            return
        if not (image.shape[0] == text.shape[0] == ids.shape[0]):
            raise ValueError(
                f"enqueue needs as many image ({image.shape[0]}), text ({text.shape[0]}) and id ({ids.shape[0]}) rows"
            )
        if ids.dim() == 1:  # caption ids only: each row its own image
            ids = ids[:, None].expand(-1, ID_COLUMNS)
        n = image.shape[0]
        if n == 0:
            return
        if n > self.size:  # only the newest `size` rows would survive anyway
            image, text, ids = image[-self.size :], text[-self.size :], ids[-self.size :]
            n = self.size
        slots = (self.ptr + torch.arange(n, device=self.ptr.device)) % self.size
        self.image_queue[slots] = image.detach().to(self.image_queue.dtype)
        self.text_queue[slots] = text.detach().to(self.text_queue.dtype)
        self.id_queue[slots] = ids.detach().to(self.id_queue.dtype)
        self.ptr.copy_((self.ptr + n) % self.size)
        self.filled.copy_(torch.clamp(self.filled + n, max=self.size))

    def state(self) -> dict[str, int | bool]:
        """Plain values for diagnostics and logs."""
        return {
            "ptr": int(self.ptr),
            "filled": int(self.filled),
            "enabled": self.is_enabled,
            "enabled_at": int(self.enabled_at),
            "forward_passes": int(self.forward_passes),
            "size": self.size,
        }
