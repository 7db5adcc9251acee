"""AdamW parameter groups and the warm-up + cosine schedule."""

from __future__ import annotations

import itertools
import math

import pytest
import torch
from torch import nn

from fgclip.train.optim import build_optimizer, cosine_with_warmup, param_groups, warmup_cosine_factor


class _Tiny(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.position_embedding = nn.Embedding(4, 8)
        self.proj = nn.Linear(8, 8)
        self.norm = nn.LayerNorm(8)
        self.logit_scale = nn.Parameter(torch.tensor(4.6052))
        self.frozen = nn.Linear(8, 8)
        self.frozen.requires_grad_(False)


def test_no_decay_on_bias_norm_scales_and_position_tables() -> None:
    decay, no_decay = param_groups(_Tiny(), weight_decay=0.05)
    assert decay["names"] == ["proj.weight"]
    assert decay["weight_decay"] == 0.05
    assert sorted(no_decay["names"]) == [
        "logit_scale",
        "norm.bias",
        "norm.weight",
        "position_embedding.weight",
        "proj.bias",
    ]
    assert no_decay["weight_decay"] == 0.0
    assert all("frozen" not in n for n in decay["names"] + no_decay["names"])


def test_weight_decay_leaves_logit_scale_alone() -> None:
    model = _Tiny()
    opt = build_optimizer(model, lr=0.1, weight_decay=0.5)
    before = model.proj.weight.detach().clone()
    # Zero gradients: only decoupled weight decay moves parameters.
    for p in model.parameters():
        if p.requires_grad:
            p.grad = torch.zeros_like(p)
    opt.step()
    assert model.logit_scale.item() == pytest.approx(4.6052)
    assert torch.allclose(model.proj.weight, before * (1 - 0.1 * 0.5))


def test_schedule_values() -> None:
    warm, total = 4, 14
    factors = [warmup_cosine_factor(s, warm, total) for s in range(total)]
    assert factors[:4] == [0.25, 0.5, 0.75, 1.0]
    assert factors[4] == 1.0  # cosine starts at its top
    assert factors[9] == pytest.approx(0.5 * (1 + math.cos(math.pi * 0.5)))
    assert all(a > b for a, b in itertools.pairwise(factors[4:]))
    assert warmup_cosine_factor(total, warm, total) == pytest.approx(0.0)
    assert warmup_cosine_factor(0, 0, 10) == 1.0  # no warm-up


def test_scheduler_drives_the_optimizer_and_round_trips() -> None:
    model = _Tiny()
    opt = build_optimizer(model, lr=1e-3, weight_decay=0.0)
    sched = cosine_with_warmup(opt, warmup_steps=2, total_steps=6)
    lrs = []
    for _ in range(3):
        lrs.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
    assert lrs == pytest.approx([5e-4, 1e-3, 1e-3])
    fresh_opt = build_optimizer(_Tiny(), lr=1e-3, weight_decay=0.0)
    fresh = cosine_with_warmup(fresh_opt, warmup_steps=2, total_steps=6)
    fresh.load_state_dict(sched.state_dict())
    fresh_opt.load_state_dict(opt.state_dict())
    assert fresh.get_last_lr() == sched.get_last_lr()
    assert fresh_opt.param_groups[0]["lr"] == opt.param_groups[0]["lr"]
