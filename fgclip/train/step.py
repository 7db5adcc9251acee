"""One optimizer step of video FG-CLIP: the unit that training runs and the benchmark times.

An optimizer step is ``grad_accum_steps`` forward passes. Each pass, in order:

1. the bank is told the pass number (:attr:`TrainStep.forward_passes` + 1; the
   counter itself, which a resumed run's data position reads, moves only once the
   pass has completed) and hands over its negatives (none during the warm-up);
2. model forward and :class:`~fgclip.model.losses.FGCLIPLoss`, a pure function of
   the output and those negatives;
3. the batch's regions (every rank's) are queued in the bank: after the loss, so
   the batch is never its own negative;
4. a non-finite loss raises :class:`NonFiniteValue` (on every rank when any rank
   sees one), before backward;
5. backward.

Then gradient clipping (a non-finite norm raises too), AdamW, the schedule, and
the logit-scale clamp. What to write when a value is non-finite (health report,
last checkpoint) is the training loop's business, not the step's.
"""

from __future__ import annotations

import math
import time
from collections.abc import Iterator
from contextlib import nullcontext
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import nn

from fgclip.config import TrainConfig
from fgclip.data.batch import Batch
from fgclip.model.fgclip import FGCLIPVideoModel
from fgclip.model.losses import FGCLIPLoss, LossResult
from fgclip.model.memory_bank import RegionMemoryBank
from fgclip.train.optim import build_finetune_optimizer, cosine_with_warmup, part_lrs

LOSS_COLUMNS = ("loss", "loss_global", "loss_region", "loss_hardneg")


class NonFiniteValue(FloatingPointError):
    """A loss or the gradient norm of this step is NaN/Inf.

    Raised before the weights, the optimizer, the schedule or the pass counter are
    updated; the bank has already queued the batch, and its state is what the
    health report records.
    """

    def __init__(self, what: str, value: float) -> None:
        self.what, self.value = what, value
        super().__init__(f"non-finite {what} = {value}")


@dataclass
class StepResult:
    losses: dict[str, float]  # LOSS_COLUMNS, means over the step's forward passes
    zero_norm_frac: float  # the largest of the step's passes
    last: LossResult  # the last pass's loss (its logits feed the diagnostics)
    data_wait_s: float  # time spent waiting for batches
    grad_norm: float  # before clipping
    lr: float  # the learning rate this step used: the new parts' (train.lr)
    backbone_lr: float  # the pretrained backbone's (train.backbone_lr)


@dataclass
class TrainStep:
    """The model, loss, bank and optimizer of a run, and the forward-pass counter.

    ``forward`` is the module called on a batch: the model itself, or its
    DistributedDataParallel wrapper (``distributed=True``).
    """

    model: FGCLIPVideoModel
    loss_fn: FGCLIPLoss
    bank: RegionMemoryBank
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LRScheduler
    grad_accum_steps: int
    max_grad_norm: float
    device: torch.device
    forward: nn.Module | None = None
    distributed: bool = False
    forward_passes: int = 0

    @classmethod
    def build(cls, model: FGCLIPVideoModel, cfg: TrainConfig, device: torch.device) -> TrainStep:
        """The step ``train.*`` describes, for a model already on ``device``."""
        dim = model.clip.config.projection_dim
        bank = RegionMemoryBank(cfg.memory_bank_size, dim, cfg.memory_bank_warmup_steps, cfg.grad_accum_steps)
        # Two rates: the pretrained backbone (train.backbone_lr) and the new parts (train.lr).
        optimizer = build_finetune_optimizer(model, cfg)
        return cls(
            model=model,
            loss_fn=FGCLIPLoss(cfg.region_loss_weight, cfg.hardneg_loss_weight).to(device),
            bank=bank.to(device),
            optimizer=optimizer,
            scheduler=cosine_with_warmup(optimizer, cfg.warmup_steps, cfg.max_steps),
            grad_accum_steps=cfg.grad_accum_steps,
            max_grad_norm=cfg.max_grad_norm,
            device=device,
        )

    def __call__(self, batches: Iterator[Batch], *, inject_nan: bool = False) -> StepResult:
        """Run one optimizer step on the next ``grad_accum_steps`` batches.

        ``inject_nan`` adds a NaN to the loss (fault drills). Raises
        :class:`NonFiniteValue` before any weight is updated with a bad value.
        """
        forward = self.forward if self.forward is not None else self.model
        accum = self.grad_accum_steps
        losses = dict.fromkeys(LOSS_COLUMNS, 0.0)
        zero_norm, waited = 0.0, 0.0
        autocast = (
            torch.autocast("cuda", dtype=torch.bfloat16) if self.device.type == "cuda" else nullcontext()
        )
        for micro in range(accum):
            fetch = time.perf_counter()
            batch = next(batches).to(self.device, non_blocking=True)
            waited += time.perf_counter() - fetch
            passes = self.forward_passes + 1
            self.bank.begin_pass(passes)
            negatives = self.bank.negatives()
            # Gradients are all-reduced once per optimizer step, on its last forward pass.
            last = micro == accum - 1 or not self.distributed
            with nullcontext() if last else forward.no_sync():
                with autocast:
                    output = forward(batch)
                    result = self.loss_fn(output, negatives)
                self.bank.enqueue(*result.regions)
                loss = (result.loss + float("nan")) if inject_nan else result.loss
                parts = (result.loss_global, result.loss_region, result.loss_hardneg)
                values = dict(zip(LOSS_COLUMNS, (loss.item(), *(p.item() for p in parts))))
                self._raise_if_nonfinite(values)
                (loss / accum).backward()
            self.forward_passes = passes
            for name, value in values.items():
                losses[name] += value / accum
            zero_norm = max(zero_norm, output.zero_norm_frac)

        grad_norm = torch.nn.utils.clip_grad_norm_(self.model.parameters(), self.max_grad_norm).item()
        if not math.isfinite(grad_norm):
            raise NonFiniteValue("gradient norm", grad_norm)
        lrs = part_lrs(self.optimizer)
        self.optimizer.step()
        self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        self.model.clamp_logit_scales_()
        return StepResult(losses, zero_norm, result, waited, grad_norm, lrs["new"], lrs["backbone"])

    def _raise_if_nonfinite(self, values: dict[str, float]) -> None:
        """Raise on the first non-finite value; under DDP every rank raises when any rank must.

        A rank raising alone would leave the others waiting forever in the next collective.
        """
        bad = next(((name, v) for name, v in values.items() if not math.isfinite(v)), None)
        if self.distributed:
            flag = torch.tensor([0.0 if bad is None else 1.0], device=self.device)
            dist.all_reduce(flag, op=dist.ReduceOp.MAX)
            if bad is None and flag.item() > 0:
                bad = ("loss (on another rank)", math.nan)
        if bad is not None:
            raise NonFiniteValue(*bad)
