"""AdamW parameter groups and the cosine learning-rate schedule with warm-up.

Fine-tuning splits the model in two parts, each with its own learning rate and
warm-up: the pretrained backbone (every parameter under ``clip.``) and the new
parts (temporal head, region projection, region and hard-negative logit scales).
A pretrained CLIP is fine-tuned at about 1e-6 (FG-CLIP); layers that start from
scratch or from a copy learn at that rate hardly at all.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable

import torch
from torch import nn
from torch.optim import AdamW, Optimizer
from torch.optim.lr_scheduler import LambdaLR

from fgclip.config import TrainConfig

# Parameter names (substrings) that never get weight decay although they may be
# 2-D: decaying a position table or a logit scale pulls it towards zero, which
# for a logit scale means a temperature drifting towards 1.
NO_DECAY_NAMES = ("position_embedding", "pos_embed", "logit_scale")

# FGCLIPVideoModel's pretrained CLIP: the towers, both projections, the long-text
# tables and projection (stretched and copied from pretrained ones) and the global
# `clip.logit_scale`. The global scale stays with the backbone: it is the pretrained
# temperature the towers' embeddings were trained against, FG-CLIP moves it at its
# backbone rate (its one lr), and at a head's rate it would drift about 100x faster
# than the embeddings it sharpens. The region and hard-negative scales are new
# parameters of this model (set from model.logit_scale_init_value) and learn with the heads.
BACKBONE_PREFIX = "clip."
PARTS = ("new", "backbone")  # group order: the new parts' lr (train.lr) is group 0


def no_weight_decay(name: str, param: nn.Parameter) -> bool:
    """Biases, norm weights (all 1-D), logit scales and position tables."""
    return param.ndim < 2 or any(key in name for key in NO_DECAY_NAMES)


def _decay_split(named: Iterable[tuple[str, nn.Parameter]], weight_decay: float) -> list[dict]:
    decay, no_decay = [], []
    decay_names, no_decay_names = [], []
    for name, param in named:
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


def param_groups(model: nn.Module, weight_decay: float) -> list[dict]:
    """Two AdamW groups: ``decay`` and ``no_decay``; frozen parameters are left out."""
    return _decay_split(model.named_parameters(), weight_decay)


def use_fused_adamw(setting: bool | str, params: Iterable[torch.Tensor]) -> bool:
    """``train.fused_adamw``: True / False as given; ``"auto"`` = fused when every parameter is on CUDA.

    Fused AdamW is one kernel per parameter group instead of a loop of small ones; the
    unfused default (for-loop on CPU, foreach on CUDA) is what runs otherwise.
    """
    if setting == "auto":
        params = list(params)
        return bool(params) and all(p.is_cuda for p in params)
    return bool(setting)


def _adamw(groups: list[dict], lr: float, fused: bool) -> AdamW:
    # Not passing fused=False: AdamW's own default stays exactly what ran before the knob.
    return AdamW(groups, lr=lr, **({"fused": True} if fused else {}))


def build_optimizer(model: nn.Module, lr: float, weight_decay: float, *, fused: bool = False) -> AdamW:
    """One learning rate for every parameter: the stand-in's pretraining, plain CLIP baselines."""
    return _adamw(param_groups(model, weight_decay), lr, fused)


def part_rates(cfg: TrainConfig) -> dict[str, tuple[float, int]]:
    """``{part: (lr, warmup_steps)}``; the backbone's null knobs fall back to ``train.lr`` / ``train.warmup_steps``."""
    backbone_lr = cfg.lr if cfg.backbone_lr is None else cfg.backbone_lr
    backbone_warmup = cfg.warmup_steps if cfg.backbone_warmup_steps is None else cfg.backbone_warmup_steps
    return {"new": (cfg.lr, cfg.warmup_steps), "backbone": (backbone_lr, backbone_warmup)}


def finetune_param_groups(
    model: nn.Module, weight_decay: float, rates: dict[str, tuple[float, int]], prefix: str = BACKBONE_PREFIX
) -> list[dict]:
    """Four AdamW groups, ``new/decay``, ``new/no_decay``, ``backbone/decay``, ``backbone/no_decay``.

    The backbone is every parameter whose name starts with ``prefix``. Each group
    carries its ``name``, ``part``, ``lr`` and ``warmup_steps`` (read by
    :func:`cosine_with_warmup`); all four exist even when one is empty, so a
    checkpoint's optimizer state always has the same layout.
    """
    groups = []
    for part in PARTS:
        inside = part == "backbone"
        named = ((n, p) for n, p in model.named_parameters() if n.startswith(prefix) == inside)
        lr, warmup = rates[part]
        for group, kind in zip(_decay_split(named, weight_decay), ("decay", "no_decay")):
            groups.append({**group, "name": f"{part}/{kind}", "part": part, "lr": lr, "warmup_steps": warmup})
    return groups


def build_finetune_optimizer(model: nn.Module, cfg: TrainConfig) -> AdamW:
    """AdamW over :func:`finetune_param_groups` at the rates of ``train.*`` (fused: :func:`use_fused_adamw`)."""
    groups = finetune_param_groups(model, cfg.weight_decay, part_rates(cfg))
    return _adamw(groups, cfg.lr, use_fused_adamw(cfg.fused_adamw, (p for g in groups for p in g["params"])))


def part_lrs(optimizer: Optimizer) -> dict[str, float]:
    """The current learning rate of each part (``{"new": ..., "backbone": ...}``)."""
    return {g["part"]: g["lr"] for g in optimizer.param_groups if "part" in g}


def describe_groups(optimizer: Optimizer) -> str:
    """``[optim] backbone: 151,277,313 params (198 tensors) lr=2e-06 warmup=200; new parts: ...``.

    Learning rates are the groups' base rates (before the schedule's factor).
    """
    parts = []
    for part in ("backbone", "new"):
        groups = [g for g in optimizer.param_groups if g.get("part") == part]
        if not groups:
            continue
        tensors = sum(len(g["params"]) for g in groups)
        numel = sum(p.numel() for g in groups for p in g["params"])
        base = groups[0].get("initial_lr", groups[0]["lr"])
        label = "new parts" if part == "new" else part
        parts.append(
            f"{label}: {numel:,} params ({tensors} tensors) lr={base:g} warmup={groups[0]['warmup_steps']}"
        )
    return "[optim] " + "; ".join(parts)


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


def _factor(warmup_steps: int, total_steps: int) -> Callable[[int], float]:
    # A plain function, not a partial: LambdaLR saves a callable object's __dict__.
    return lambda step: warmup_cosine_factor(step, warmup_steps, total_steps)


def cosine_with_warmup(optimizer: Optimizer, warmup_steps: int, total_steps: int) -> LambdaLR:
    """``LambdaLR`` over :func:`warmup_cosine_factor`; its state dict holds only numbers.

    A group's own ``warmup_steps`` (see :func:`finetune_param_groups`) overrides
    ``warmup_steps``; every group decays to 0 at ``total_steps``.
    """
    warmups = [group.get("warmup_steps", warmup_steps) for group in optimizer.param_groups]
    return LambdaLR(optimizer, [_factor(w, total_steps) for w in warmups])
