"""Contrastive losses against a reference written out row by row."""

from __future__ import annotations

import itertools
import math

import pytest
import torch
import torch.nn.functional as F
from ddp_spawn import run_ranks
from model_ddp_worker import (
    GLOBAL_IDS,
    GLOBAL_SIZES,
    HARDNEG_PRESENT,
    JOINED_IDS,
    JOINED_SIZES,
    REGION_SIZES,
    ddp_worker,
    flat_grads,
    hardneg_texts,
    project,
    region_inputs,
    region_projection,
    unit,
)

from fgclip.model.fgclip import FGCLIPOutput
from fgclip.model.losses import FGCLIPLoss, contrastive_loss, hard_negative_loss
from fgclip.model.memory_bank import RegionMemoryBank

LN_100 = math.log(100.0)


def _reference_direction(rows, cols, scale, ids=None, extra=None, extra_ids=None) -> float:
    """Mean over rows of -log softmax(logits)[i, i], with masked columns left out of the sum."""
    s = math.exp(float(scale))
    total = 0.0
    for i in range(rows.shape[0]):
        logits = []
        for j in range(cols.shape[0]):
            if ids is not None and j != i and ids[j] == ids[i]:
                continue
            logits.append(s * float(rows[i] @ cols[j]))
        for j in range(0 if extra is None else extra.shape[0]):
            if ids is not None and extra_ids[j] == ids[i]:
                continue
            logits.append(s * float(rows[i] @ extra[j]))
        top = max(logits)
        log_sum_exp = top + math.log(sum(math.exp(v - top) for v in logits))
        total += -(s * float(rows[i] @ cols[i]) - log_sum_exp)
    return total / rows.shape[0]


def _reference(image, text, scale, ids=None, extra_text=None, extra_image=None, extra_ids=None) -> float:
    i2t = _reference_direction(image, text, scale, ids, extra_text, extra_ids)
    t2i = _reference_direction(text, image, scale, ids, extra_image, extra_ids)
    return (i2t + t2i) / 2


def test_plain_infonce_matches_reference() -> None:
    image, text = unit(5, seed=0), unit(5, seed=1)
    scale = torch.tensor(LN_100)
    result = contrastive_loss(image, text, scale)
    assert result.loss.item() == pytest.approx(_reference(image, text, scale), rel=1e-5)
    torch.testing.assert_close(result.logits_i2t, 100 * image @ text.T)
    torch.testing.assert_close(result.logits_t2i, 100 * text @ image.T)


def test_duplicate_ids_are_not_negatives() -> None:
    image, text = unit(6, seed=2), unit(6, seed=3)
    ids = torch.tensor([7, 1, 7, 2, 1, 7])
    scale = torch.tensor(2.0)
    result = contrastive_loss(image, text, scale, ids=ids)
    assert result.loss.item() == pytest.approx(_reference(image, text, scale, ids), rel=1e-5)
    assert result.loss.item() != pytest.approx(contrastive_loss(image, text, scale).loss.item(), rel=1e-3)
    # The returned logits stay finite (diagnostics); masking lives inside the loss only.
    assert torch.isfinite(result.logits_i2t).all()


def test_extra_negatives_with_duplicate_ids() -> None:
    image, text = unit(4, seed=4), unit(4, seed=5)
    extra_image, extra_text = unit(6, seed=6), unit(6, seed=7)
    ids = torch.tensor([0, 1, 2, 3])
    extra_ids = torch.tensor([9, 1, 8, 1, 3, 7])
    scale = torch.tensor(LN_100)
    result = contrastive_loss(
        image, text, scale, ids=ids, extra_text=extra_text, extra_image=extra_image, extra_ids=extra_ids
    )
    expected = _reference(image, text, scale, ids, extra_text, extra_image, extra_ids)
    assert result.loss.item() == pytest.approx(expected, rel=1e-5)
    assert result.logits_i2t.shape == result.logits_t2i.shape == (4, 10)
    torch.testing.assert_close(result.logits_t2i[:, 4:], 100 * text @ extra_image.T)
    # Without ids nothing is masked, extra columns included.
    unmasked = contrastive_loss(image, text, scale, extra_text=extra_text, extra_image=extra_image)
    assert unmasked.loss.item() == pytest.approx(
        _reference(image, text, scale, None, extra_text, extra_image), rel=1e-5
    )


def test_empty_batch_gives_a_connected_zero() -> None:
    image = torch.zeros(0, 8, requires_grad=True)
    scale = torch.tensor(LN_100, requires_grad=True)
    result = contrastive_loss(image, image * 1, scale)
    assert result.loss.item() == 0.0 and result.loss.requires_grad
    result.loss.backward()
    assert scale.grad is not None and scale.grad.item() == 0.0


def _output(n_regions: int, seed: int, scale: float = LN_100, region_ids=None) -> FGCLIPOutput:
    video, text = unit(3, seed=seed), unit(3, seed=seed + 1)
    region_image, region_text = unit(n_regions, seed=seed + 2), unit(n_regions, seed=seed + 3)
    s_global = torch.tensor(scale, requires_grad=True)
    s_region = torch.tensor(scale, requires_grad=True)
    for t in (video, text, region_image, region_text):
        t.requires_grad_(True)
    caption_ids = torch.arange(n_regions) if region_ids is None else region_ids
    return FGCLIPOutput(
        video_embeds=video,
        text_embeds=text,
        caption_ids=torch.tensor([0, 1, 0]),
        region_image_embeds=region_image,
        region_text_embeds=region_text,
        region_caption_ids=caption_ids,
        region_image_ids=caption_ids.clone(),  # each region its own pixels
        zero_norm_frac=0.0,
        logit_scale_global=s_global,
        logit_scale_region=s_region,
        logit_scale_hardneg=torch.tensor(scale, requires_grad=True),
    )


def _reference_pairs(rows, cols, scale, ids, extra, extra_ids, rows_are_images: bool) -> float:
    """Like _reference_direction, ids ``[N, 2]`` = (caption, image), every row of batch and bank a known pair.

    A column other than the anchor's own is left out when a known pair joins it to
    the anchor: for image rows, the anchor's image with the column's caption; for
    text rows, the anchor's caption with the column's image.
    """
    pairs = [tuple(p) for p in ids.tolist()] + [tuple(p) for p in extra_ids.tolist()]
    known = set(pairs)
    s = math.exp(float(scale))
    total = 0.0
    for i in range(rows.shape[0]):
        caption, image = pairs[i]
        logits = [s * float(rows[i] @ cols[i])]
        columns = [(cols[j], pairs[j]) for j in range(cols.shape[0]) if j != i]
        columns += [(extra[j], pairs[cols.shape[0] + j]) for j in range(extra.shape[0])]
        for feature, (c, m) in columns:
            match = (c, image) if rows_are_images else (caption, m)
            if match not in known:
                logits.append(s * float(rows[i] @ feature))
        top = max(logits)
        total += -(logits[0] - top - math.log(sum(math.exp(v - top) for v in logits)))
    return total / rows.shape[0]


def test_regions_showing_the_same_pixels_are_not_negatives() -> None:
    """A whole-frame box with three captions: one image id, three caption ids, none a negative of another.

    The bank holds caption 11 queued from another image (99): a true caption of
    the frame (image 7 carries 11), so it is no negative for the frame's rows, but
    still one for the other images' rows. It holds image 7 under caption 20: the
    frame again, so no negative for any of the frame's captions. And it holds
    image 99 under caption 21: an image that carries caption 11, so no negative
    for the text "11", though it shares no id with it.
    """
    out = _output(5, seed=30, region_ids=torch.tensor([10, 11, 12, 13, 14]))
    image = out.region_image_embeds.detach().clone()
    image[1] = image[2] = image[0]  # one whole frame, pooled three times
    out.region_image_embeds = image.requires_grad_(True)
    out.region_image_ids = torch.tensor([7, 7, 7, 8, 9])
    bank = RegionMemoryBank(size=8, dim=image.shape[1], warmup_steps=0)
    bank.begin_pass(1)
    bank.enqueue(unit(3, seed=40), unit(3, seed=41), torch.tensor([[11, 99], [20, 7], [21, 99]]))
    negatives = bank.negatives()
    extra_image, extra_text, extra_ids = negatives
    result = FGCLIPLoss(region_weight=1.0, hardneg_weight=0.0)(out, negatives)

    ids = torch.stack([out.region_caption_ids, out.region_image_ids], 1)
    text, image = out.region_text_embeds.detach(), image.detach()
    i2t = _reference_pairs(image, text, LN_100, ids, extra_text, extra_ids, rows_are_images=True)
    t2i = _reference_pairs(text, image, LN_100, ids, extra_image, extra_ids, rows_are_images=False)
    assert result.loss_region.item() == pytest.approx((i2t + t2i) / 2, rel=1e-5)
    # The frame's rows see neither bank text 11 (a caption of theirs) nor 20 (queued from the frame) ...
    logits = result.logits_i2t.detach()
    masked_out = [(0, 5 + 0), (0, 5 + 1), (2, 5 + 0), (0, 1), (0, 2)]
    # ... so adding a huge similarity to those columns changes nothing; it would for a true negative.
    for row, col in masked_out:
        assert _row_loss(logits, row, col, ids, extra_ids, rows_are_images=True) == pytest.approx(
            _row_loss(logits, row, None, ids, extra_ids, rows_are_images=True), rel=1e-6
        )
    assert _row_loss(logits, 3, 5 + 0, ids, extra_ids, rows_are_images=True) > 100 + _row_loss(
        logits, 3, None, ids, extra_ids, rows_are_images=True
    )
    # Text -> image: text 11 (row 1) against image 99 (queued as caption 21) is a
    # known match through the pair (11, 99); text 13 (row 3) against it is not.
    logits_t2i = math.exp(LN_100) * text @ torch.cat([image, extra_image]).T
    assert _row_loss(logits_t2i, 1, 5 + 2, ids, extra_ids, rows_are_images=False) == pytest.approx(
        _row_loss(logits_t2i, 1, None, ids, extra_ids, rows_are_images=False), rel=1e-6
    )
    assert _row_loss(logits_t2i, 3, 5 + 2, ids, extra_ids, rows_are_images=False) > 100 + _row_loss(
        logits_t2i, 3, None, ids, extra_ids, rows_are_images=False
    )
    # The loss hands back both ids of the batch's regions for the bank to queue.
    assert result.regions.ids.tolist() == ids.tolist()
    bank.enqueue(*result.regions)
    assert bank.negatives().ids[-5:].tolist() == ids.tolist()
    # When each region claims pixels of its own, the three copies of the frame compete with each other.
    out.region_image_ids = out.region_caption_ids.clone()
    assert (
        FGCLIPLoss(region_weight=1.0, hardneg_weight=0.0)(out, negatives).loss_region.item()
        > (i2t + t2i) / 2 + 0.3
    )


def _row_loss(logits, row: int, boost: int | None, ids, extra_ids, rows_are_images: bool) -> float:
    """One row's cross-entropy through the library's mask, optionally with column ``boost`` made huge."""
    from fgclip.model.losses import known_matches

    logits = logits.clone()
    if boost is not None:
        logits[row, boost] += 500.0
    known = known_matches(ids, torch.cat([ids, extra_ids]), rows_are_images)
    known[torch.arange(ids.shape[0]), torch.arange(ids.shape[0])] = False
    return F.cross_entropy(
        logits.masked_fill(known, float("-inf"))[row : row + 1], torch.tensor([row])
    ).item()


def test_fgclip_loss_combines_global_and_region() -> None:
    out = _output(4, seed=10)
    result = FGCLIPLoss(region_weight=0.5, hardneg_weight=0.0)(out)
    ids = out.caption_ids
    expected_global = _reference(out.video_embeds.detach(), out.text_embeds.detach(), LN_100, ids)
    expected_region = _reference(
        out.region_image_embeds.detach(), out.region_text_embeds.detach(), LN_100, torch.arange(4)
    )
    assert result.loss_global.item() == pytest.approx(expected_global, rel=1e-5)
    assert result.loss_region.item() == pytest.approx(expected_region, rel=1e-5)
    assert result.loss.item() == pytest.approx(expected_global + 0.5 * expected_region, rel=1e-5)
    assert result.logits_i2t.shape == (4, 4)  # no negatives given: the batch's columns only
    assert torch.equal(result.regions.image, out.region_image_embeds.detach())
    assert not result.regions.image.requires_grad and result.regions.ids.shape == (4, 2)
    result.loss.backward()
    assert out.logit_scale_region.grad is not None and out.region_image_embeds.grad.abs().sum() > 0


def _bank_pass(bank: RegionMemoryBank, loss: FGCLIPLoss, passes: int, out: FGCLIPOutput):
    """One forward pass's bank protocol, as ``TrainStep`` runs it: count, negatives, loss, queue."""
    bank.begin_pass(passes)
    negatives = bank.negatives()
    result = loss(out, negatives)
    bank.enqueue(*result.regions)
    return result, negatives


def test_memory_bank_negatives_after_warmup() -> None:
    bank = RegionMemoryBank(size=6, dim=8, warmup_steps=2)
    loss = FGCLIPLoss(region_weight=1.0, hardneg_weight=0.0)
    _, negatives = _bank_pass(bank, loss, 1, _output(4, seed=20))
    assert negatives.image.shape[0] == 0 and int(bank.filled) == 0  # pass 1: still warming up
    second_out = _output(4, seed=30)
    # pass 2: switched on, nothing queued yet, then this batch is queued
    _, negatives = _bank_pass(bank, loss, 2, second_out)
    assert negatives.image.shape[0] == 0 and int(bank.filled) == 4
    third_out = _output(4, seed=40, region_ids=torch.tensor([0, 1, 2, 3]))
    third, negatives = _bank_pass(bank, loss, 3, third_out)
    assert negatives.image.shape[0] == 4 and third.logits_i2t.shape == (4, 8)
    # The queued batch (ids 0..3 again) shares each anchor's id once: masked out.
    expected = _reference(
        third_out.region_image_embeds.detach(),
        third_out.region_text_embeds.detach(),
        LN_100,
        torch.arange(4),
        second_out.region_text_embeds.detach(),
        second_out.region_image_embeds.detach(),
        torch.arange(4),
    )
    assert third.loss_region.item() == pytest.approx(expected, rel=1e-5)
    assert int(bank.filled) == 6 and int(bank.ptr) == 2 and int(bank.forward_passes) == 3


def test_backward_after_the_bank_enqueues_in_place() -> None:
    """The loss keeps the bank's negatives for backward; enqueueing must not invalidate them."""
    bank = RegionMemoryBank(size=16, dim=8, warmup_steps=0)
    loss = FGCLIPLoss(region_weight=1.0, hardneg_weight=0.0)
    for passes, seed in enumerate((60, 61, 62), start=1):
        out = _output(4, seed=seed)
        leaf = out.region_image_embeds.detach().requires_grad_(True)
        out.region_image_embeds = leaf
        result, negatives = _bank_pass(bank, loss, passes, out)
        result.loss.backward()  # raised "modified by an inplace operation" when negatives were views
        assert leaf.grad is not None and torch.isfinite(leaf.grad).all()
    assert negatives.image.shape[0] > 0


def test_batch_without_regions_gives_zero_region_loss() -> None:
    out = _output(0, seed=50)
    result = FGCLIPLoss(region_weight=0.5, hardneg_weight=0.0)(out)
    assert result.loss_region.item() == 0.0 and result.loss_region.requires_grad
    assert torch.isfinite(result.loss)
    assert result.logits_i2t.shape == (3, 3)  # the global logits stand in for diagnostics
    result.loss.backward()
    assert out.logit_scale_region.grad.item() == 0.0


# ------------------------------------------------------------------ DDP (gloo, 2 CPU processes)


def _sum_of_rank_losses_grad(video: torch.Tensor, text: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
    """d/d(video) of sum over ranks of (mean over the rank's rows of the symmetric row loss)."""
    video = video.clone().requires_grad_(True)
    same = (ids[:, None] == ids[None, :]) & ~torch.eye(len(ids), dtype=torch.bool)
    logits = (100 * video @ text.T).masked_fill(same, float("-inf"))
    targets = torch.arange(len(ids))
    rows = (
        F.cross_entropy(logits, targets, reduction="none")
        + F.cross_entropy(logits.T, targets, reduction="none")
    ) / 2
    bounds = [0, GLOBAL_SIZES[0], sum(GLOBAL_SIZES)]
    sum(rows[a:b].mean() for a, b in itertools.pairwise(bounds)).backward()
    return video.grad


DDP_DEADLINE_S = 60.0  # both workers report and exit within this, or the run has hung


@pytest.fixture(scope="module")
def ddp_results() -> dict[int, dict]:
    """Run ``ddp_worker`` on 2 gloo ranks once (spawning is the slow part): ``{rank: report}``."""
    return run_ranks(ddp_worker, DDP_DEADLINE_S)


def test_global_loss_across_uneven_ranks_matches_single_process(ddp_results: dict[int, dict]) -> None:
    results = ddp_results
    n = sum(GLOBAL_SIZES)
    video, text, ids = unit(n, seed=0), unit(n, seed=1), torch.tensor(GLOBAL_IDS)
    full = contrastive_loss(video, text, torch.tensor(LN_100), ids=ids)
    # Each rank's loss is the mean over its own rows: weighted by rows, they give the full loss.
    weighted = sum(results[r]["loss"] * GLOBAL_SIZES[r] for r in range(2)) / n
    assert weighted == pytest.approx(full.loss.item(), rel=1e-5)
    assert results[0]["logits"] == (3, 5) and results[1]["logits"] == (2, 5)
    assert results[0]["loss"] != pytest.approx(results[1]["loss"], rel=1e-3)
    # Each rank's rows get the gradient of the SUM of all ranks' losses: their own
    # rows' terms plus, through the gathered columns, the other ranks' terms.
    per_rank = torch.tensor(results[0]["grad"] + results[1]["grad"])
    torch.testing.assert_close(per_rank, _sum_of_rank_losses_grad(video, text, ids), rtol=1e-4, atol=1e-6)

    m = sum(REGION_SIZES)
    region = contrastive_loss(unit(m, seed=2), unit(m, seed=3), torch.tensor(LN_100), ids=torch.arange(m))
    # FGCLIPLoss scales each rank's mean by its share of the rows (losses.rank_shares): the
    # mean over ranks, what DDP trains on, is the one-process loss; here rank 0 holds every
    # region, so its loss is twice their mean (unscaled, DDP would train on half the loss).
    assert (results[0]["region"] + results[1]["region"]) / 2 == pytest.approx(region.loss.item(), rel=1e-5)
    assert results[1]["region"] == 0.0
    # Both ranks queued the same gathered regions.
    assert results[0]["bank_ids"] == results[1]["bank_ids"] == [[0, 0], [1, 1], [2, 2]]
    # Known matches that join rows of different ranks are masked as in one process.
    k = sum(JOINED_SIZES)
    joined_ids = torch.tensor(JOINED_IDS)
    joined = contrastive_loss(unit(k, seed=4), unit(k, seed=5), torch.tensor(LN_100), ids=joined_ids)
    assert (results[0]["joined"] + results[1]["joined"]) / 2 == pytest.approx(joined.loss.item(), rel=1e-5)
    unjoined = contrastive_loss(unit(k, seed=4), unit(k, seed=5), torch.tensor(LN_100), ids=joined_ids[:, 0])
    assert joined.loss.item() != pytest.approx(unjoined.loss.item(), rel=1e-3)


def test_hard_negative_loss_across_uneven_ranks_matches_single_process(ddp_results: dict[int, dict]) -> None:
    k = sum(JOINED_SIZES)
    image, text, scale = unit(k, seed=4), unit(k, seed=5), torch.tensor(LN_100)
    negatives, present = hardneg_texts(), torch.tensor(HARDNEG_PRESENT)
    full, _ = hard_negative_loss(image, text, negatives, present, scale)
    # Rank 0's 3 regions with negatives against rank 1's 1: the mean over ranks (what DDP
    # trains on) is the mean over all 4 only because each rank's mean is scaled by its share.
    assert (ddp_results[0]["hardneg"] + ddp_results[1]["hardneg"]) / 2 == pytest.approx(full.item(), rel=1e-5)
    split = JOINED_SIZES[0]
    means = [hard_negative_loss(image[s], text[s], negatives[s], present[s], scale)[0].item()
             for s in (slice(None, split), slice(split, None))]  # fmt: skip
    # Unscaled, the ranks would train another loss.
    assert sum(means) / 2 != pytest.approx(full.item(), rel=1e-3)
    # The total is made of the scaled parts: its mean over ranks is the one-process total.
    joined = contrastive_loss(image, text, scale, ids=torch.tensor(JOINED_IDS)).loss.item()
    total = (ddp_results[0]["hardneg_total"] + ddp_results[1]["hardneg_total"]) / 2
    n = sum(GLOBAL_SIZES)  # 3 videos on rank 0, 2 on rank 1: the global part is scaled too
    glob = contrastive_loss(unit(n, seed=0), unit(n, seed=1), scale, ids=torch.tensor(GLOBAL_IDS)).loss.item()
    assert total == pytest.approx(glob + joined + full.item(), rel=1e-5)


def _region_reference() -> tuple[float, torch.Tensor, torch.Tensor, torch.Tensor]:
    """One process, every rank's regions concatenated (rank 1 adds none): loss and its gradients."""
    proj = region_projection()
    scale = torch.tensor(LN_100, requires_grad=True)
    image, text, ids = region_inputs()
    loss = contrastive_loss(project(proj, image), project(proj, text), scale, ids=ids).loss
    loss.backward()
    return loss.item(), image.grad, text.grad, flat_grads([*proj.parameters(), scale])


def test_rank_without_regions_joins_the_backward_collectives(ddp_results: dict[int, dict]) -> None:
    # Both ranks ran forward + backward with region features that require grad (rank 1
    # with none), then an all-reduce of the gradients and a barrier, in step: a rank
    # out of step fails the worker (see ``ddp_results``), it never gets here.
    rank0, rank1 = ddp_results[0]["region_grad"], ddp_results[1]["region_grad"]
    loss, image_grad, text_grad, param_grad = _region_reference()
    # Rank 0 holds all 3 regions: its share is 2 * 3 / 3 (losses.rank_shares), so its loss
    # L_0 is twice the one-process loss L and the mean over ranks, (L_0 + L_1) / 2, is L.
    assert rank0["region"] == pytest.approx(2 * loss, rel=1e-5)
    assert rank1["region"] == 0.0
    assert rank1["image_grad"] == rank1["text_grad"] == []  # [0, 8] gradients: connected, and empty
    # Scaling. Rank r's loss L_r is its share of the rows times the mean over its own rows,
    # against every rank's columns; the all_gather's backward hands each rank the gradient
    # of the SUM of all ranks' losses w.r.t. its rows (its own L_r plus the others', through
    # the gathered columns), and DDP divides the parameters' summed gradients by the world
    # size: what trains is (L_0 + L_1) / 2 = L, as in one process (unscaled it was L / 2).
    for name, reference in (("image_grad", image_grad), ("text_grad", text_grad)):
        grad = torch.tensor(rank0[name])
        assert torch.isfinite(grad).all() and grad.abs().sum() > 0
        torch.testing.assert_close(grad / 2, reference, rtol=1e-4, atol=1e-6)
    # The parameters (projection and region scale): rank 1's own gradient is zero, and the
    # all-reduced SUM divided by the world size, DDP's gradient, is L's on both ranks.
    torch.testing.assert_close(torch.tensor(rank1["local_param_grad"]), torch.zeros_like(param_grad))
    for rank in (rank0, rank1):
        summed = torch.tensor(rank["summed_param_grad"])
        torch.testing.assert_close(summed / 2, param_grad, rtol=1e-4, atol=1e-6)


def test_old_zero_rule_fails_as_a_collective_mismatch(ddp_results: dict[int, dict]) -> None:
    # The same step under the rule before the fix (a zero that ignores the gathered
    # columns): rank 1 skips the region all_gathers' backward and meets rank 0's next
    # backward collective with its own next one. The DETAIL check catches it on both
    # ranks at once (without it gloo aborts rank 1: "Is there a distributed collective
    # mismatch in your code?").
    for rank in (0, 1):
        error = ddp_results[rank]["old_rule_error"]
        assert error is not None, f"rank {rank}: the old zero rule went unnoticed"
        assert "Detected mismatch between collectives" in error
