"""AdamW parameter groups and the cosine learning-rate schedule with warm-up."""

from __future__ import annotations

import math

from torch import nn
from torch.optim import AdamW, Optimizer
from torch.optim.lr_scheduler import LambdaLR

# Parameter names (substrings) that never get weight decay although they may be
# 2-D: decaying a position table or a logit scale pulls it towards zero, which
# for a logit scale means a temperature drifting towards 1.
NO_DECAY_NAMES = ("position_embedding", "pos_embed", "logit_scale")


def no_weight_decay(name: str, param: nn.Parameter) -> bool:
    """Biases, norm weights (all 1-D), logit scales and position tables."""
    return param.ndim < 2 or any(key in name for key in NO_DECAY_NAMES)


def param_groups(model: nn.Module, weight_decay: float) -> list[dict]:
    """Two AdamW groups: ``decay`` and ``no_decay``; frozen parameters are left out."""
    decay, no_decay = [], []
    decay_names, no_decay_names = [], []
    for name, param in model.named_parameters():
        if not param.requires_grad:
            continue
        if no_weight_decay(name, param):
            no_decay.append(param)
            no_decay_names.append(name)
        else:
            decay.append(param)
            decay_names.append(name)
    return [
        {"params": decay, "weight_decay": weight_decay, "names": decay_names},
        {"params": no_decay, "weight_decay": 0.0, "names": no_decay_names},
    ]


def build_optimizer(model: nn.Module, lr: float, weight_decay: float) -> AdamW:
    return AdamW(param_groups(model, weight_decay), lr=lr)


def warmup_cosine_factor(step: int, warmup_steps: int, total_steps: int) -> float:
    """LR multiplier for the optimizer step with 0-based index ``step``.

    Linear warm-up reaching 1 at step ``warmup_steps - 1`` (the first step
    already moves: a zero learning rate would waste it), then a half cosine
    decaying towards 0 at ``total_steps``.
    """
    if step < warmup_steps:
        return (step + 1) / warmup_steps
    progress = (step - warmup_steps) / max(1, total_steps - warmup_steps)
    return 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))


def cosine_with_warmup(optimizer: Optimizer, warmup_steps: int, total_steps: int) -> LambdaLR:
    """``LambdaLR`` over :func:`warmup_cosine_factor`; its state dict holds only numbers."""
    return LambdaLR(optimizer, lambda step: warmup_cosine_factor(step, warmup_steps, total_steps))
