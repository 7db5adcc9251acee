"""Losses of the video FG-CLIP: global (video-caption), region, and hard negatives.

Both are symmetric InfoNCE over L2-normalised features with logits
``exp(logit_scale) * cosine``. Two details matter on this data:

- Duplicates are not negatives. Several videos (and many regions of normal
  videos) share a caption; treating an identical caption as a negative teaches
  the model to separate identical texts. Rows carry stable caption ids and any
  other column with the anchor's id is masked out of the softmax.
- Known matches are not negatives either. A normal video's whole-frame box
  carries every walker's caption: those regions share one image, and each of
  their captions is a true match for it, wherever else that caption turns up.
  Region rows carry ``[caption id, image id]``; every row of the batch and the
  memory bank is a known (caption, image) match, and a column is masked when
  such a match pairs it with the anchor: for an image anchor, a text whose
  caption the anchor's image is known to carry; for a text anchor, an image
  known to carry the anchor's caption. (Masking only columns that share an id
  with the anchor misses half of it: the frame with a red and a blue walker was
  pushed away from "a person in blue walks" queued from another video.)
- The hard-negative loss (FG-CLIP v1) is a per-region classification, not a
  contrastive one: each region against its own positive caption and its hard
  negatives (captions with one attribute swapped), cross-entropy with the
  positive as class 0. It needs no other row, so no gather.
- Under DDP each rank scores its own rows against every rank's columns. The last
  batch of an epoch can be smaller on some ranks (FG-CLIP's gather crashes on
  that), so sizes are exchanged first and the padded gather is trimmed.
- Under DDP the ranks train the loss of the whole batch, as one process would:
  DDP averages the ranks' gradients, and a mean of per-rank means is not the
  batch mean when ranks hold different numbers of rows (regions, regions with
  hard negatives), so ``FGCLIPLoss`` scales each rank's means by its share of the
  rows (:func:`rank_shares`; exactly 1 in one process).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, NamedTuple

import torch
import torch.distributed as dist
import torch.distributed.nn.functional as dist_nn
import torch.nn.functional as F
from torch import nn

from fgclip.model.memory_bank import RegionFeatures

if TYPE_CHECKING:  # the losses only read its fields; no transformers import needed here
    from fgclip.model.fgclip import FGCLIPOutput


class ContrastiveResult(NamedTuple):
    loss: torch.Tensor
    # Scaled similarities BEFORE duplicate masking (finite, for diagnostics);
    # extra (memory bank) columns are appended after the batch columns.
    logits_i2t: torch.Tensor
    logits_t2i: torch.Tensor
    # [N] detached: each row's loss, the mean of its two directions (``loss`` is
    # their mean): which pairs carry the loss (``fgclip region-loss``).
    row_losses: torch.Tensor


class LossResult(NamedTuple):
    # Under DDP the four losses are this rank's share (see FGCLIPLoss): their mean over
    # ranks is the loss of the whole batch; in one process they are that loss.
    loss: torch.Tensor
    loss_global: torch.Tensor
    loss_region: torch.Tensor
    loss_hardneg: torch.Tensor
    logits_i2t: torch.Tensor  # region logits; the global ones when the batch has no region
    region_row_losses: torch.Tensor  # [M] detached, one per region (see ContrastiveResult)
    # Every rank's regions of this batch (detached, gathered under DDP): what the bank queues.
    regions: RegionFeatures


def _is_distributed() -> bool:
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def _gather_sizes(n: int, device: torch.device) -> list[int]:
    local = torch.tensor([n], device=device, dtype=torch.long)
    sizes = [torch.zeros_like(local) for _ in range(dist.get_world_size())]
    dist.all_gather(sizes, local)
    return [int(s) for s in sizes]


def _pad_rows(x: torch.Tensor, rows: int) -> torch.Tensor:
    if x.shape[0] == rows:
        return x
    pad = x.new_zeros((rows - x.shape[0], *x.shape[1:]))
    return torch.cat([x, pad])


def gather_with_grad(x: torch.Tensor) -> torch.Tensor:
    """Concatenate ``x`` from all ranks along dim 0, gradients flowing back to each rank.

    Identity outside DDP. Ranks may hold different numbers of rows (0 included):
    every rank pads to the largest size, gathers, and drops the padding.
    """
    if not _is_distributed():
        return x
    sizes = _gather_sizes(x.shape[0], x.device)
    parts = dist_nn.all_gather(_pad_rows(x, max(sizes)))
    return torch.cat([part[:n] for part, n in zip(parts, sizes)])


def _gather_no_grad(x: torch.Tensor) -> torch.Tensor:
    """``gather_with_grad`` for tensors without gradients (integer ids)."""
    if not _is_distributed():
        return x
    sizes = _gather_sizes(x.shape[0], x.device)
    padded = _pad_rows(x, max(sizes))
    parts = [torch.empty_like(padded) for _ in sizes]
    dist.all_gather(parts, padded.contiguous())
    return torch.cat([part[:n] for part, n in zip(parts, sizes)])


def _rank_offset(n: int, device: torch.device) -> int:
    """Index of this rank's first row in the gathered batch."""
    if not _is_distributed():
        return 0
    return sum(_gather_sizes(n, device)[: dist.get_rank()])


CAPTION, IMAGE = 0, 1  # columns of region ids: [caption id, image id]
# Which columns are not negatives: part of a checkpoint's fingerprint, so a run
# trained under an older rule is never resumed under this one.
REGION_NEGATIVES = "known-pairs"


def known_matches(rows: torch.Tensor, cols: torch.Tensor, rows_are_images: bool) -> torch.Tensor:
    """``[N, M]``: column j is a known match of row i, by the (caption, image) pairs in ``cols``.

    ``[N]``/``[M]`` ids (one per row: videos) match when equal. ``[N, 2]``/``[M, 2]``
    ids are ``[caption id, image id]`` and the columns are every known pair, so
    an image row i matches text column j when some pair joins i's image to j's
    caption, and a text row i matches image column j when some pair joins i's
    caption to j's image. A column with the anchor's image id matches through the
    column's own pair, one with the anchor's caption id through the anchor's own
    pair (always among the columns).
    """
    if rows.dim() == 1:
        return rows[:, None] == cols[None, :]
    own, other = (IMAGE, CAPTION) if rows_are_images else (CAPTION, IMAGE)
    # pair k shows the anchor's image (image rows) / has the anchor's caption (text rows)
    anchor_in_pair = (rows[:, None, own] == cols[None, :, own]).to(torch.int32)  # [N, K]
    # Count, per distinct caption (image rows) / image (text rows), the pairs that join
    # it to the anchor, then read the count back for each column: memory O(N x K), not
    # the K x K of a pair-to-pair matrix (K = batch + bank can be thousands). Integer
    # counts: no autocast rounding.
    values, column_value = torch.unique(cols[:, other], return_inverse=True)
    joined = anchor_in_pair.new_zeros((rows.shape[0], values.shape[0]))
    joined.index_add_(1, column_value, anchor_in_pair)
    return joined[:, column_value] > 0


def _direction(
    rows: torch.Tensor,
    cols: torch.Tensor,
    scale: torch.Tensor,
    targets: torch.Tensor,
    row_ids: torch.Tensor | None,
    col_ids: torch.Tensor | None,
    extra: torch.Tensor | None,
    extra_ids: torch.Tensor | None,
    rows_are_images: bool,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Cross-entropy of one direction (rows against cols + extra).

    Returns (loss, per-row losses, unmasked logits). The per-row losses are
    detached and computed apart: the mean of reduction="none" is not bitwise the
    mean reduction, and the training loss must not change with a diagnostic.
    """
    has_extra = extra is not None and extra.shape[0] > 0
    logits = scale * rows @ cols.T
    if has_extra:
        logits = torch.cat([logits, scale * rows @ extra.T.to(rows.dtype)], dim=1)
    masked = logits
    if row_ids is not None:
        if has_extra:
            if extra_ids is None:
                raise ValueError("extra negatives need extra_ids when ids are given")
            col_ids = torch.cat([col_ids, extra_ids.to(col_ids)])
        known = known_matches(row_ids, col_ids, rows_are_images)
        # The positive itself is never masked, even though it matches the anchor.
        known[torch.arange(rows.shape[0], device=rows.device), targets] = False
        masked = logits.masked_fill(known, float("-inf"))
    rows_loss = F.cross_entropy(masked.detach(), targets, reduction="none")
    return F.cross_entropy(masked, targets), rows_loss, logits


def _symmetric_info_nce(
    image: torch.Tensor,
    text: torch.Tensor,
    image_cols: torch.Tensor,
    text_cols: torch.Tensor,
    logit_scale: torch.Tensor,
    *,
    offset: int,
    ids: torch.Tensor | None,
    col_ids: torch.Tensor | None,
    extra_text: torch.Tensor | None,
    extra_image: torch.Tensor | None,
    extra_ids: torch.Tensor | None,
) -> ContrastiveResult:
    """Local rows ``image``/``text`` against columns ``*_cols``, whose rows ``offset…`` are the positives."""
    n = image.shape[0]
    if n == 0:
        # No pair on this rank: a zero that still reaches every input, the gathered
        # columns included. Their backward is a collective (the all_gather's
        # reduce-scatter): a rank that skipped it would leave the others waiting.
        zero = (image.sum() + text.sum() + image_cols.sum() + text_cols.sum() + logit_scale) * 0
        empty = image.new_zeros((0, image_cols.shape[0]))
        return ContrastiveResult(zero, empty, empty, image.new_zeros(0, dtype=torch.float32))
    scale = logit_scale.exp()
    targets = torch.arange(n, device=image.device) + offset
    loss_i2t, rows_i2t, logits_i2t = _direction(
        image, text_cols, scale, targets, ids, col_ids, extra_text, extra_ids, True
    )
    loss_t2i, rows_t2i, logits_t2i = _direction(
        text, image_cols, scale, targets, ids, col_ids, extra_image, extra_ids, False
    )
    return ContrastiveResult((loss_i2t + loss_t2i) / 2, logits_i2t, logits_t2i, (rows_i2t + rows_t2i) / 2)


def contrastive_loss(
    image: torch.Tensor,
    text: torch.Tensor,
    logit_scale: torch.Tensor,
    *,
    ids: torch.Tensor | None = None,
    extra_text: torch.Tensor | None = None,
    extra_image: torch.Tensor | None = None,
    extra_ids: torch.Tensor | None = None,
) -> ContrastiveResult:
    """Symmetric InfoNCE of matching rows ``image[i]`` ↔ ``text[i]`` (features L2-normalised).

    Args:
        image, text: ``[N, D]``.
        logit_scale: log temperature (already clamped); logits = ``exp(logit_scale) * sim``.
        ids: ``[N]`` caption ids (a column with the anchor's id is masked out of the
            softmax), or ``[N, 2]`` ``[caption id, image id]`` (a column that a known
            pair matches with the anchor is masked; see ``known_matches``). The
            anchor's own positive is never masked.
        extra_text, extra_image, extra_ids: ``[F, D]``, ``[F, D]``, ``[F]``/``[F, 2]`` extra negatives
            (memory bank), appended as columns: image→text uses ``extra_text``,
            text→image ``extra_image``; masked by id like the batch columns.
    """
    return _symmetric_info_nce(
        image,
        text,
        image,
        text,
        logit_scale,
        offset=0,
        ids=ids,
        col_ids=ids,
        extra_text=extra_text,
        extra_image=extra_image,
        extra_ids=extra_ids,
    )


def _gathered_loss(
    image: torch.Tensor,
    text: torch.Tensor,
    logit_scale: torch.Tensor,
    ids: torch.Tensor | None,
    *,
    extra_text: torch.Tensor | None = None,
    extra_image: torch.Tensor | None = None,
    extra_ids: torch.Tensor | None = None,
) -> tuple[ContrastiveResult, torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """InfoNCE of local rows against all ranks' columns; also returns the gathered columns."""
    image_all = gather_with_grad(image)
    text_all = gather_with_grad(text)
    ids_all = _gather_no_grad(ids) if ids is not None else None
    result = _symmetric_info_nce(
        image,
        text,
        image_all,
        text_all,
        logit_scale,
        offset=_rank_offset(image.shape[0], image.device),
        ids=ids,
        col_ids=ids_all,
        extra_text=extra_text,
        extra_image=extra_image,
        extra_ids=extra_ids,
    )
    return result, image_all, text_all, ids_all


def hard_negative_loss(
    image: torch.Tensor,
    positive: torch.Tensor,
    negatives: torch.Tensor,
    present: torch.Tensor,
    logit_scale: torch.Tensor,
) -> tuple[torch.Tensor, torch.Tensor]:
    """FG-CLIP's hard-negative loss: ``1 + N``-way cross-entropy per region, the positive at 0.

    Args:
        image: ``[M, D]`` region features; positive: ``[M, D]`` their captions.
        negatives: ``[M, N, D]`` hard-negative captions; present: ``[M, N]`` which exist
            (regions carry different numbers; absent ones are masked out of the softmax).
        logit_scale: log temperature (clamped); logits = ``exp(logit_scale) * cosine``.

    Returns the mean over regions with at least one negative (a zero that still
    reaches every input when there is none: DDP expects the scale's gradient on
    every rank), and ``[M]`` detached "the positive outranks every negative".
    """
    has = present.any(dim=1)
    # float32, autocast off: a one-word swap moves the cosine by about as much as bf16
    # rounds it (0.002), which would decide the ranking at random. M x N x D is tiny.
    with torch.autocast(device_type=image.device.type, enabled=False):
        image, positive, negatives = image.float(), positive.float(), negatives.float()
        scale = logit_scale.float().exp()
        pos = (image * positive).sum(dim=-1, keepdim=True)  # [M, 1]
        neg = torch.einsum("md,mnd->mn", image, negatives)
        logits = scale * torch.cat([pos, neg], dim=1)
    columns = torch.cat([torch.ones_like(has)[:, None], present], dim=1)  # the positive always counts
    masked = logits.masked_fill(~columns, float("-inf"))
    wins = (pos.detach() > neg.detach().masked_fill(~present, float("-inf"))).all(dim=1) & has
    if not has.any():
        zero = (image.sum() + positive.sum() + negatives.sum() + logit_scale) * 0
        return zero, wins
    targets = torch.zeros(int(has.sum()), dtype=torch.long, device=image.device)
    return F.cross_entropy(masked[has], targets), wins


def global_loss(
    video: torch.Tensor, text: torch.Tensor, scale: torch.Tensor, ids: torch.Tensor | None = None
) -> ContrastiveResult:
    """Video ↔ caption InfoNCE over the whole (multi-rank) batch; ``contrastive_loss`` outside DDP.

    Each rank returns the loss of its own rows; DDP's gradient averaging then
    yields the gradient of the batch loss.
    """
    return _gathered_loss(video, text, scale, ids)[0]


def rank_shares(counts: list[int | torch.Tensor], device: torch.device) -> list[float]:
    """Per loss, ``world_size * n_r / N``: this rank's ``n_r`` rows of all ranks' ``N``; 1.0 outside DDP.

    DDP averages the ranks' gradients, so it trains on the mean of the ranks' losses.
    Each of them is a mean over the rank's own rows: scaled by its share, the mean over
    ranks is ``sum_r n_r * mean_r / N``, the mean over the whole batch, whatever the
    ranks hold. Unscaled, a rank with one region would weigh as much as one with
    twenty, and two nodes would not train what one process does on the same batch.
    A loss no rank has a row of (N = 0) is a zero on every rank: 1.0.
    """
    if not _is_distributed():
        return [1.0] * len(counts)  # and no count is read: a tensor count costs no host sync
    local = torch.stack([torch.as_tensor(c, device=device, dtype=torch.long) for c in counts])
    every = [torch.zeros_like(local) for _ in range(dist.get_world_size())]
    dist.all_gather(every, local)
    totals = torch.stack(every).sum(dim=0).tolist()
    return [len(every) * n / total if total else 1.0 for n, total in zip(local.tolist(), totals)]


def _scaled(loss: torch.Tensor, share: float) -> torch.Tensor:
    # Not even a multiplication by 1.0 in one process: its losses stay bit for bit what they were.
    return loss if share == 1.0 else loss * share


class FGCLIPLoss(nn.Module):
    """Global + ``region_weight`` × region + ``hardneg_weight`` × hard-negative loss.

    The region loss takes the memory bank's negatives when given. Under DDP each
    part is this rank's mean scaled by its share of the rows (:func:`rank_shares`):
    the mean of a part over ranks is that part's loss of the whole batch.

    A pure function of the model output and the negatives: it neither reads nor
    advances the bank. The training step (``fgclip.train.step``) fetches the
    negatives before and enqueues ``LossResult.regions`` after, so the current
    batch is never its own negative.
    """

    def __init__(self, region_weight: float, hardneg_weight: float) -> None:
        super().__init__()
        self.region_weight = region_weight
        self.hardneg_weight = hardneg_weight

    def forward(self, out: FGCLIPOutput, negatives: RegionFeatures | None = None) -> LossResult:
        glob = global_loss(out.video_embeds, out.text_embeds, out.logit_scale_global, out.caption_ids)
        # [caption id, image id]: the bank keeps both.
        pair_ids = torch.stack(
            [out.region_caption_ids, out.region_image_ids.to(out.region_caption_ids)], dim=1
        )
        # Every rank runs the gather, even with no region of its own: it is a collective.
        region, image_all, text_all, ids_all = _gathered_loss(
            out.region_image_embeds,
            out.region_text_embeds,
            out.logit_scale_region,
            pair_ids,
            extra_text=None if negatives is None else negatives.text,
            extra_image=None if negatives is None else negatives.image,
            extra_ids=None if negatives is None else negatives.ids,
        )
        has_regions = out.region_image_embeds.shape[0] > 0
        m, dim = out.region_image_embeds.shape
        negatives, present = out.hardneg_text_embeds, out.hardneg_mask
        if negatives is None:
            negatives = out.region_image_embeds.new_zeros((m, 0, dim))
            present = torch.zeros((m, 0), dtype=torch.bool, device=out.region_image_embeds.device)
        hardneg, _ = hard_negative_loss(
            out.region_image_embeds, out.region_text_embeds, negatives, present, out.logit_scale_hardneg
        )
        # The rows each mean is over: videos, regions, regions with a hard negative.
        rows = [out.video_embeds.shape[0], m, present.any(dim=1).sum()]
        shares = rank_shares(rows, out.video_embeds.device)
        glob_loss, region_loss, hardneg = (
            _scaled(loss, share) for loss, share in zip((glob.loss, region.loss, hardneg), shares)
        )
        return LossResult(
            loss=glob_loss + self.region_weight * region_loss + self.hardneg_weight * hardneg,
            loss_global=glob_loss,
            loss_region=region_loss,
            loss_hardneg=hardneg,
            logits_i2t=region.logits_i2t if has_regions else glob.logits_i2t,
            region_row_losses=region.row_losses,
            regions=RegionFeatures(image_all.detach(), text_all.detach(), ids_all),
        )
