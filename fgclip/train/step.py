"""One optimizer step of video FG-CLIP: the unit that training runs and the benchmark times.

An optimizer step is ``grad_accum_steps`` forward passes. Each pass, in order:

1. the bank is told the pass number (:attr:`TrainStep.forward_passes` + 1; the
   counter itself, which a resumed run's data position reads, moves only once the
   pass has completed) and hands over its negatives (none during the warm-up);
2. model forward and :class:`~fgclip.model.losses.FGCLIPLoss`, a pure function of
   the output and those negatives;
3. the batch's regions (every rank's) are queued in the bank: after the loss, so
   the batch is never its own negative;
4. under DDP the pass's losses are averaged over ranks (each rank's are its share of
   the batch's: their mean is the whole batch's loss, what is logged); a non-finite
   loss raises :class:`NonFiniteValue` (on every rank when any rank sees one), before
   backward;
5. backward.

Then gradient clipping (a non-finite norm raises too), AdamW, the schedule, and
the logit-scale clamp. What to write when a value is non-finite (health report,
last checkpoint) is the training loop's business, not the step's.

Host synchronisation (``train.sync_every``, issue 17). A step called with
``sync=True`` (every step when ``train.sync_every`` is 1, the default) reads its
losses and gradient norm on the host and raises as above: a non-finite value
never updates the weights. A step called with ``sync=False`` reads nothing: its
losses, gradient norm and logit scales stay on the device (``StepResult.pending``),
the optimizer steps unconditionally, and the step joins :attr:`TrainStep.backlog`.
The next ``sync=True`` call first settles the backlog in one transfer
(:meth:`TrainStep.settle`): every unsynced step gets its float fields, and the
first one holding a non-finite value raises :class:`NonFiniteValue` there, on every
rank under DDP. What is guaranteed then is weaker, and only that: that step and the
ones after it, up to ``sync_every - 1`` steps, have already updated the weights
with bad values; nothing reaches a checkpoint, because the loop syncs at every
checkpoint step before it saves. On finite values both modes compute exactly the
same weights and the same float losses. (The model's forward still reads a few
values on the host: boolean region masks, ``zero_norm_frac``, RoIAlign's grid size,
the bank's fill.)

``train.compile`` compiles the model forward (the DDP wrapper when there is one:
DDP first, then compile) and the loss on the first call, never the optimizer
(tested on one CPU process; not yet under DDP or on a GPU).
``train.attn_implementation`` sets transformers' CLIP attention in :meth:`TrainStep.build`.
"""

from __future__ import annotations

import math
import time
from collections.abc import Iterator
from contextlib import nullcontext
from dataclasses import dataclass, field

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
    """A loss or the gradient norm of a step is NaN/Inf.

    For the step being run (``steps_back == 0``): raised before the weights, the
    optimizer, the schedule or the pass counter are updated; the bank has already
    queued the batch, and its state is what the health report records. For an
    unsynced step found bad when the backlog is settled, ``steps_back`` (>= 1) says
    how many steps before the current call it ran; it and the steps after it have
    updated the weights. ``earlier``: the settled, finite steps between the last
    sync and the bad step, oldest first, which the caller has not been given yet.
    """

    def __init__(
        self, what: str, value: float, *, steps_back: int = 0, earlier: list[StepResult] | None = None
    ) -> None:
        self.what, self.value = what, value
        self.steps_back, self.earlier = steps_back, list(earlier or ())
        super().__init__(f"non-finite {what} = {value}")


@dataclass
class StepResult:
    """One optimizer step. ``losses``, ``grad_norm`` and ``scales`` are None until the step is
    settled: at once for a ``sync=True`` step, at the next sync for an unsynced one."""

    losses: dict[str, float] | None  # LOSS_COLUMNS, means over the step's forward passes
    zero_norm_frac: float  # the largest of the step's passes
    last: LossResult  # the last pass's loss (its logits feed the diagnostics)
    data_wait_s: float  # time spent waiting for batches
    grad_norm: float | None  # before clipping
    lr: float  # the learning rate this step used: the new parts' (train.lr)
    backbone_lr: float  # the pretrained backbone's (train.backbone_lr)
    scales: tuple[float, float, float] | None = None  # global, region, hard-negative, after the clamp
    # Unsynced: [passes x LOSS_COLUMNS, grad norm, 3 scales] on the device, until settled.
    pending: torch.Tensor | None = None
    # A sync step's result: the unsynced steps settled before it ran, oldest first.
    earlier: list[StepResult] = field(default_factory=list)


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
    compile: bool = False  # train.compile: torch.compile the forward and the loss on first use
    backlog: list[StepResult] = field(default_factory=list)  # unsynced steps, oldest first
    _compiled: tuple | None = field(default=None, init=False, repr=False)

    @classmethod
    def build(cls, model: FGCLIPVideoModel, cfg: TrainConfig, device: torch.device) -> TrainStep:
        """The step ``train.*`` describes, for a model already on ``device``.

        Sets the model's CLIP attention to ``train.attn_implementation`` (transformers'
        ``set_attn_implementation``; "sdpa" is what transformers 5.x loads anyway).
        """
        model.clip.set_attn_implementation(cfg.attn_implementation)
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
            compile=cfg.compile,
        )

    def _modules(self) -> tuple[nn.Module, nn.Module, nn.Module]:
        """``(ddp_or_model, forward, loss)``: the last two compiled when ``compile`` is on.

        Compiled lazily, on the module ``forward`` names at the time: a DDP wrapper set
        after :meth:`build` is what gets compiled (DDP first, then compile).
        """
        module = self.forward if self.forward is not None else self.model
        if not self.compile:
            return module, module, self.loss_fn
        if self._compiled is None or self._compiled[0] is not module:
            self._compiled = (module, torch.compile(module), torch.compile(self.loss_fn))
        return module, self._compiled[1], self._compiled[2]

    def __call__(self, batches: Iterator[Batch], *, inject_nan: bool = False, sync: bool = True) -> StepResult:
        """Run one optimizer step on the next ``grad_accum_steps`` batches.

        ``inject_nan`` adds a NaN to the loss (fault drills). ``sync=True`` settles the
        backlog first (:meth:`settle`), then raises :class:`NonFiniteValue` before any
        weight is updated with a bad value of this step. ``sync=False`` reads nothing
        on the host: the result waits in :attr:`backlog` (see the module docstring).
        """
        earlier = self.settle() if sync else []
        ddp, forward, loss_fn = self._modules()
        accum = self.grad_accum_steps
        losses = dict.fromkeys(LOSS_COLUMNS, 0.0)
        per_pass: list[torch.Tensor] = []
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
            with nullcontext() if last else ddp.no_sync():
                with autocast:
                    output = forward(batch)
                    result = loss_fn(output, negatives)
                self.bank.enqueue(*result.regions)
                loss = (result.loss + float("nan")) if inject_nan else result.loss
                parts = (result.loss_global, result.loss_region, result.loss_hardneg)
                stacked = torch.stack([v.detach().float() for v in (loss, *parts)])
                if self.distributed:
                    # Each rank's losses are its share of the batch's (FGCLIPLoss): their mean is
                    # the whole batch's loss, what rank 0 logs and one process would. A NaN on any
                    # rank reaches every rank here.
                    dist.all_reduce(stacked)
                    stacked = stacked / dist.get_world_size()
                if sync:
                    values = dict(zip(LOSS_COLUMNS, stacked.tolist()))  # one host read a pass
                    self._raise_if_nonfinite(values, earlier)
                else:
                    per_pass.append(stacked)
                (loss / accum).backward()
            self.forward_passes = passes
            if sync:
                for name, value in values.items():
                    losses[name] += value / accum
            zero_norm = max(zero_norm, output.zero_norm_frac)

        norm = torch.nn.utils.clip_grad_norm_(self.model.parameters(), self.max_grad_norm)
        grad_norm = None
        if sync:
            grad_norm = norm.item()
            if not math.isfinite(grad_norm):
                raise NonFiniteValue("gradient norm", grad_norm, earlier=earlier)
        lrs = part_lrs(self.optimizer)
        self.optimizer.step()
        self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        self.model.clamp_logit_scales_()
        scales = torch.stack([s.detach().float() for s in self.model.scales()])
        if sync:
            global_, region, hardneg = scales.tolist()
            return StepResult(losses, zero_norm, result, waited, grad_norm, lrs["new"], lrs["backbone"],
                              scales=(global_, region, hardneg), earlier=earlier)  # fmt: skip
        pending = torch.cat([torch.cat(per_pass), norm.detach().float().view(1), scales])
        done = StepResult(None, zero_norm, result, waited, None, lrs["new"], lrs["backbone"], pending=pending)
        self.backlog.append(done)
        return done

    def settle(self) -> list[StepResult]:
        """The backlog's values in one host read: fill in each unsynced step's floats; return them.

        Raises :class:`NonFiniteValue` for the oldest step holding a NaN/Inf (its passes'
        losses in order, then its gradient norm), with ``steps_back`` and the finite steps
        before it; under DDP every rank raises when any rank must, at the oldest such step
        (every rank holds the same values: see :meth:`_raise_if_nonfinite`).
        The backlog is empty afterwards either way. Losses are accumulated exactly as a
        synced step accumulates them, so both modes give the same floats.
        """
        backlog, self.backlog = self.backlog, []
        if not backlog:
            return []
        values = torch.cat([r.pending for r in backlog]).tolist()
        width, accum = len(LOSS_COLUMNS), self.grad_accum_steps
        first_bad, bad, offset = len(backlog), None, 0
        for index, done in enumerate(backlog):
            row = values[offset : offset + done.pending.numel()]
            offset += done.pending.numel()
            passes = [dict(zip(LOSS_COLUMNS, row[p * width : (p + 1) * width])) for p in range(accum)]
            grad_norm, scales = row[accum * width], tuple(row[accum * width + 1 :])
            named = [*(item for p in passes for item in p.items()), ("gradient norm", grad_norm)]
            bad = next(((what, v) for what, v in named if not math.isfinite(v)), None)
            if bad is not None:
                first_bad = index
                break
            losses = dict.fromkeys(LOSS_COLUMNS, 0.0)
            for values_of_pass in passes:
                for name, value in values_of_pass.items():
                    losses[name] += value / accum
            done.losses, done.grad_norm, done.scales, done.pending = losses, grad_norm, scales, None
        if bad is not None:
            raise NonFiniteValue(*bad, steps_back=len(backlog) - first_bad, earlier=backlog[:first_bad])
        return backlog

    def _raise_if_nonfinite(self, values: dict[str, float], earlier: list[StepResult]) -> None:
        """Raise on the first non-finite value.

        Under DDP every rank raises when any rank must (one raising alone would leave the
        others waiting in the next collective) without a collective of its own: the losses
        are the ranks' mean and the gradient norm is of the all-reduced gradients, so a
        NaN/Inf on one rank is one on every rank.
        """
        bad = next(((name, v) for name, v in values.items() if not math.isfinite(v)), None)
        if bad is not None:
            raise NonFiniteValue(*bad, earlier=earlier)
