"""AdamW parameter groups and the warm-up + cosine schedule."""

from __future__ import annotations

import itertools
import math

import pytest
import torch
from torch import nn
from transformers import CLIPModel

from fgclip.config import ModelConfig, Params, TrainConfig
from fgclip.model.fgclip import FGCLIPVideoModel, clip_config
from fgclip.train.checkpoints import FINGERPRINT_TRAIN_KEYS, run_fingerprint
from fgclip.train.optim import (
    build_finetune_optimizer,
    build_optimizer,
    cosine_with_warmup,
    describe_groups,
    no_weight_decay,
    param_groups,
    part_lrs,
    use_fused_adamw,
    warmup_cosine_factor,
)
from fgclip.train.step import TrainStep


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


class _Video(nn.Module):
    """A pretrained part under ``clip.`` and new parts beside it, as in FGCLIPVideoModel."""

    def __init__(self) -> None:
        super().__init__()
        self.clip = _Tiny()
        self.head = nn.Linear(8, 4)
        self.logit_scale_region = nn.Parameter(torch.tensor(4.6052))

    def loss(self, step: int) -> torch.Tensor:
        x = torch.linspace(-1.0, 1.0, 32).view(4, 8) * (step + 1)
        h = self.clip.norm(self.clip.proj(x) + self.clip.position_embedding.weight)
        return (self.head(h) ** 2).mean() * self.clip.logit_scale + self.logit_scale_region**2


def _tiny_video_model(**overrides) -> FGCLIPVideoModel:
    torch.manual_seed(0)
    cfg = ModelConfig(image_size=32, patch_size=8, vision_hidden=32, vision_layers=1, vision_heads=2,
                      text_hidden=32, text_layers=1, text_heads=2, projection_dim=32, temporal_layers=1,
                      temporal_heads=2, **overrides)  # fmt: skip
    clip = clip_config(cfg, vocab_size=64, pad_token_id=0, bos_token_id=1, eos_token_id=3)
    return FGCLIPVideoModel(CLIPModel(clip), cfg)


def _run(model: _Video, optimizer, scheduler, steps: int) -> list[list[float]]:
    lrs = []
    for step in range(steps):
        lrs.append([g["lr"] for g in optimizer.param_groups])
        model.loss(step).backward()
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)
    return lrs


def test_backbone_and_new_parts_split_with_the_decay_split_kept_in_each() -> None:
    model = _tiny_video_model(long_text=True)
    opt = build_finetune_optimizer(model, TrainConfig(backbone_lr=2e-6, backbone_warmup_steps=200))
    groups = {g["name"]: g for g in opt.param_groups}
    assert list(groups) == ["new/decay", "new/no_decay", "backbone/decay", "backbone/no_decay"]
    where = {n: name for name, g in groups.items() for n in g["names"]}
    named = dict(model.named_parameters())
    assert sorted(where) == sorted(named)  # every parameter, once
    for n, group in where.items():
        part, kind = group.split("/")
        assert part == ("backbone" if n.startswith("clip.") else "new"), n
        assert kind == ("no_decay" if no_weight_decay(n, named[n]) else "decay"), n
    # The global scale is pretrained (FG-CLIP moves it at its backbone rate); the others are new.
    assert where["clip.logit_scale"] == "backbone/no_decay"
    assert where["logit_scale_region"] == where["logit_scale_hardneg"] == "new/no_decay"
    assert where["roi_projection.weight"] == "new/decay" and where["temporal.position"] == "new/decay"
    assert where["clip.text_model.embeddings.position_embedding_ori.weight"] == "backbone/no_decay"
    assert where["clip.text_filip_projection.weight"] == "backbone/decay"
    assert {g["name"]: (g["initial_lr"] if "initial_lr" in g else g["lr"], g["weight_decay"], g["warmup_steps"])
            for g in opt.param_groups} == {
        "new/decay": (3e-4, 0.05, 20), "new/no_decay": (3e-4, 0.0, 20),
        "backbone/decay": (2e-6, 0.05, 200), "backbone/no_decay": (2e-6, 0.0, 200),
    }  # fmt: skip


def test_each_part_follows_its_own_rate_and_warmup_through_the_schedule() -> None:
    model = _Video()
    cfg = TrainConfig(lr=1e-3, warmup_steps=2, backbone_lr=1e-5, backbone_warmup_steps=4, max_steps=10)
    opt = build_finetune_optimizer(model, cfg)
    sched = cosine_with_warmup(opt, cfg.warmup_steps, cfg.max_steps)
    lrs = _run(model, opt, sched, 10)
    for step, row in enumerate(lrs):
        new, backbone = 1e-3 * warmup_cosine_factor(step, 2, 10), 1e-5 * warmup_cosine_factor(step, 4, 10)
        assert row == pytest.approx([new, new, backbone, backbone], rel=1e-12)
    assert [row[2] for row in lrs[:4]] == pytest.approx([2.5e-6, 5e-6, 7.5e-6, 1e-5])
    assert [row[0] for row in lrs[:2]] == pytest.approx([5e-4, 1e-3])
    assert part_lrs(opt) == {"new": opt.param_groups[0]["lr"], "backbone": opt.param_groups[2]["lr"]}


def test_a_resumed_schedule_keeps_both_warmups() -> None:
    # LambdaLR saves no lambdas: each group's warm-up must come back from the group itself.
    cfg = TrainConfig(lr=1e-3, warmup_steps=2, backbone_lr=1e-5, backbone_warmup_steps=5, max_steps=10)
    model, fresh_model = _Video(), _Video()
    opt, fresh_opt = build_finetune_optimizer(model, cfg), build_finetune_optimizer(fresh_model, cfg)
    sched = cosine_with_warmup(opt, cfg.warmup_steps, cfg.max_steps)
    fresh = cosine_with_warmup(fresh_opt, cfg.warmup_steps, cfg.max_steps)
    _run(model, opt, sched, 3)
    fresh_opt.load_state_dict(opt.state_dict())
    fresh.load_state_dict(sched.state_dict())
    resumed, continued = _run(fresh_model, fresh_opt, fresh, 3), _run(model, opt, sched, 3)
    assert resumed == continued
    assert continued[0][2] == pytest.approx(1e-5 * 4 / 5)  # step 3: still warming up


def test_null_backbone_knobs_are_the_old_single_rate_exactly() -> None:
    cfg = TrainConfig(lr=1e-2, warmup_steps=2, max_steps=6, weight_decay=0.1)
    old_model, new_model = _Video(), _Video()
    new_model.load_state_dict(old_model.state_dict())
    old_opt = build_optimizer(old_model, cfg.lr, cfg.weight_decay)
    new_opt = build_finetune_optimizer(new_model, cfg)
    old_lrs = _run(old_model, old_opt, cosine_with_warmup(old_opt, cfg.warmup_steps, cfg.max_steps), 4)
    new_lrs = _run(new_model, new_opt, cosine_with_warmup(new_opt, cfg.warmup_steps, cfg.max_steps), 4)
    assert [row[0] for row in new_lrs] == [row[0] for row in old_lrs]
    assert all(len(set(row)) == 1 for row in new_lrs)
    for name, p in old_model.named_parameters():
        q = new_model.get_parameter(name)
        assert torch.equal(p, q), name
        old_state, new_state = old_opt.state[p], new_opt.state[q]
        assert old_state.keys() == new_state.keys()
        assert all(torch.equal(old_state[k], new_state[k]) for k in old_state), name
    # Set, the backbone rate changes the backbone's first update and only it.
    start = _Video().state_dict()
    one, two = _Video(), _Video()
    one.load_state_dict(start)
    two.load_state_dict(start)
    single = build_finetune_optimizer(one, cfg)
    split = build_finetune_optimizer(two, cfg.model_copy(update={"backbone_lr": 1e-4}))
    _run(one, single, cosine_with_warmup(single, cfg.warmup_steps, cfg.max_steps), 1)
    _run(two, split, cosine_with_warmup(split, cfg.warmup_steps, cfg.max_steps), 1)
    assert torch.equal(one.head.weight, two.head.weight)
    assert not torch.equal(one.clip.proj.weight, two.clip.proj.weight)


def test_train_step_builds_the_two_rates_and_logs_them() -> None:
    model = _tiny_video_model()
    cfg = TrainConfig(lr=1e-4, warmup_steps=50, backbone_lr=2e-6, backbone_warmup_steps=200)
    trainer = TrainStep.build(model, cfg, torch.device("cpu"))
    assert part_lrs(trainer.optimizer) == pytest.approx({"new": 1e-4 / 50, "backbone": 2e-6 / 200})
    line = describe_groups(trainer.optimizer)
    backbone = sum(p.numel() for n, p in model.named_parameters() if n.startswith("clip."))
    new = sum(p.numel() for n, p in model.named_parameters() if not n.startswith("clip."))
    assert line.startswith(f"[optim] backbone: {backbone:,} params (")
    assert "lr=2e-06 warmup=200; new parts: " in line and line.endswith("lr=0.0001 warmup=50")
    assert f"new parts: {new:,} params" in line


def test_the_fingerprint_holds_the_backbone_knobs() -> None:
    assert {"backbone_lr", "backbone_warmup_steps"} <= set(FINGERPRINT_TRAIN_KEYS)
    base = Params()
    fp, flat = run_fingerprint(base)
    assert flat["train.backbone_lr"] is None and flat["train.backbone_warmup_steps"] is None
    for key, value in (("backbone_lr", 2e-6), ("backbone_warmup_steps", 200)):
        changed, _ = run_fingerprint(base.with_overrides(train={key: value}))
        assert changed != fp, key


def test_fused_adamw_auto_is_off_on_cpu_and_the_optimizer_unchanged() -> None:
    model = _Tiny()
    assert use_fused_adamw("auto", model.parameters()) is False
    assert use_fused_adamw("auto", []) is False
    assert use_fused_adamw(True, model.parameters()) is True and use_fused_adamw(False, []) is False
    auto = build_finetune_optimizer(model, TrainConfig())
    # Off = AdamW's own default, not fused=False passed in: the state dict is what it always was.
    assert auto.defaults["fused"] is None and auto.defaults["foreach"] is None
    fused = build_finetune_optimizer(model, TrainConfig(fused_adamw=True))
    assert fused.defaults["fused"] is True
    assert build_optimizer(model, 1e-3, 0.0, fused=True).defaults["fused"] is True
    assert build_optimizer(model, 1e-3, 0.0).defaults["fused"] is None


def test_fused_adamw_steps_like_the_unfused_one_on_cpu() -> None:
    """fused_adamw: true on CPU (torch has a CPU kernel): the same update up to rounding."""
    torch.manual_seed(0)
    ref = _Tiny()
    fused_model = _Tiny()
    fused_model.load_state_dict(ref.state_dict())
    opts = [build_finetune_optimizer(m, TrainConfig(fused_adamw=f)) for m, f in ((ref, False), (fused_model, True))]
    x = torch.randn(4, 8)
    for model, opt in zip((ref, fused_model), opts):
        for _ in range(3):
            (model.norm(model.proj(x)).pow(2).sum() * model.logit_scale).backward()
            opt.step()
            opt.zero_grad()
    for (name, a), b in zip(ref.named_parameters(), fused_model.parameters()):
        torch.testing.assert_close(b, a, atol=1e-6, rtol=1e-5, msg=name)
