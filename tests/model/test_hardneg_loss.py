"""FG-CLIP's hard-negative loss, against a reference written from its definition, and in the model."""

from __future__ import annotations

import math
from collections.abc import Callable

import pytest
import torch
import torch.nn.functional as F

from fgclip.model.losses import FGCLIPLoss, hard_negative_loss

LN_100 = math.log(100.0)


def _unit(*shape: int, seed: int) -> torch.Tensor:
    return F.normalize(torch.randn(*shape, generator=torch.Generator().manual_seed(seed)), dim=-1)


def _reference(image, positive, negatives, present, scale) -> float:
    """Per region with negatives: -log softmax of the positive among itself and its negatives (float64)."""
    losses = []
    for m in range(image.shape[0]):
        kept = [negatives[m, j] for j in range(negatives.shape[1]) if present[m, j]]
        if not kept:
            continue
        sims = [float(image[m].double() @ positive[m].double())] + [
            float(image[m].double() @ t.double()) for t in kept
        ]
        logits = [math.exp(scale) * s for s in sims]
        top = max(logits)
        log_z = top + math.log(sum(math.exp(v - top) for v in logits))
        losses.append(log_z - logits[0])
    return sum(losses) / len(losses)


def test_hard_negative_loss_matches_its_definition() -> None:
    image, positive = _unit(5, 8, seed=0), _unit(5, 8, seed=1)
    negatives = _unit(5, 10, 8, seed=2)
    present = torch.ones(5, 10, dtype=torch.bool)
    present[1, 4:] = False  # fewer negatives than the widest region
    present[3] = False  # a region without negatives is not scored
    scale = torch.tensor(2.0)
    loss, wins = hard_negative_loss(image, positive, negatives, present, scale)
    assert loss.item() == pytest.approx(_reference(image, positive, negatives, present, 2.0), rel=1e-5)
    assert wins.shape == (5,) and not wins[3]
    # An absent negative never counts, however similar it is.
    negatives[1, 5] = image[1]
    again, _ = hard_negative_loss(image, positive, negatives, present, scale)
    assert again.item() == pytest.approx(loss.item(), rel=1e-6)


def test_wins_say_whether_the_positive_outranks_every_negative() -> None:
    image = torch.eye(3)
    positive = torch.eye(3)
    negatives = torch.zeros(3, 2, 3)
    negatives[1, 1] = torch.eye(3)[1]  # a tie is not a win
    negatives[2, 0] = -torch.eye(3)[2]
    present = torch.tensor([[True, True], [True, True], [True, False]])
    _, wins = hard_negative_loss(image, positive, negatives, present, torch.tensor(LN_100))
    assert wins.tolist() == [True, False, True]


def test_no_negatives_gives_a_zero_that_reaches_the_scale() -> None:
    image = _unit(3, 8, seed=0).requires_grad_(True)
    scale = torch.tensor(LN_100, requires_grad=True)
    loss, wins = hard_negative_loss(
        image, _unit(3, 8, seed=1), torch.zeros(3, 0, 8), torch.zeros(3, 0, dtype=torch.bool), scale
    )
    assert loss.item() == 0.0 and not wins.any()
    loss.backward()
    # A zero gradient, but a gradient: DDP all-reduces every parameter it saw in the forward.
    assert scale.grad is not None and scale.grad.item() == 0.0
    assert image.grad is not None


def test_the_loss_falls_when_the_scale_sharpens_a_correct_ranking() -> None:
    image, positive = _unit(4, 8, seed=5), _unit(4, 8, seed=5)  # the positive is the region itself
    negatives, present = _unit(4, 3, 8, seed=6), torch.ones(4, 3, dtype=torch.bool)
    low, _ = hard_negative_loss(image, positive, negatives, present, torch.tensor(1.0))
    high, _ = hard_negative_loss(image, positive, negatives, present, torch.tensor(LN_100))
    assert high.item() < low.item()


def test_fgclip_loss_adds_the_weighted_hard_negative_term(make_model: Callable, make_batch: Callable) -> None:
    model = make_model().train()
    out = model(make_batch(n=3))
    plain = FGCLIPLoss(region_weight=0.5, hardneg_weight=0.0)(out)
    weighted = FGCLIPLoss(region_weight=0.5, hardneg_weight=0.5)(out)
    assert plain.loss_hardneg.item() == pytest.approx(weighted.loss_hardneg.item())
    assert weighted.loss_hardneg.item() > 0
    expected = weighted.loss_global + 0.5 * weighted.loss_region + 0.5 * weighted.loss_hardneg
    assert weighted.loss.item() == pytest.approx(expected.item(), rel=1e-6)
    weighted.loss.backward()
    assert model.logit_scale_hardneg.grad is not None and model.logit_scale_hardneg.grad.abs().item() > 0


def test_forward_encodes_each_present_negative(make_model: Callable, make_batch: Callable) -> None:
    model = make_model()
    batch = make_batch(n=2)
    with torch.no_grad():
        out = model(batch)
    keep = batch.region_mask & batch.box_mask.any(dim=2)
    present = batch.region_negative_mask[keep]
    assert torch.equal(out.hardneg_mask, present)
    assert out.hardneg_text_embeds.shape == (int(keep.sum()), 2, 16)
    with torch.no_grad():
        expected = model.encode_text(
            batch.region_negative_token_ids[keep][present], batch.region_negative_text_mask[keep][present]
        )
    torch.testing.assert_close(out.hardneg_text_embeds[present], expected)
    assert torch.equal(out.hardneg_text_embeds[~present], torch.zeros_like(out.hardneg_text_embeds[~present]))
    # Without negatives nothing extra is encoded and the term is a zero.
    none = make_batch(n=0)
    with torch.no_grad():
        empty = model(none)
    assert empty.hardneg_text_embeds.shape[1] == 0
    assert FGCLIPLoss(0.5, 0.5)(empty).loss_hardneg.item() == 0.0
