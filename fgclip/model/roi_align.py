"""RoIAlign on normalised boxes, in plain torch (no torchvision dependency).

The numbers of ``torchvision.ops.roi_align(features, boxes * [W, H, W, H], output_size,
spatial_scale=1.0, sampling_ratio, aligned=True)``, which is how FG-CLIP pools its
region features (with ``sampling_ratio=-1``). For a box in feature-grid units
(normalised coordinate times ``W`` or ``H``):

- ``roi_start = x1 - 0.5``, ``roi_end = x2 - 0.5`` (the aligned half-cell offset),
  ``roi_w = roi_end - roi_start`` (not forced to at least one cell), ``bin_w = roi_w / out``;
  likewise along y;
- each bin averages a ``grid_h x grid_w`` sub-grid of bilinear samples, sample ``(iy, ix)``
  of bin ``(ph, pw)`` at ``y = roi_start_h + ph * bin_h + (iy + 0.5) * bin_h / grid_h``
  (same for x). The grid is ``sampling_ratio`` per side when ``sampling_ratio > 0``, and
  adaptive, per box, when ``sampling_ratio <= 0``: ``grid_w = ceil(roi_w / out)``,
  ``grid_h = ceil(roi_h / out)`` (about one sample per cell: a whole-frame box with one
  bin is the plain mean of the map's cells). ``count = max(grid_h * grid_w, 1)``, so an
  empty grid (a zero-size or inverted box, adaptive only) gives 0;
- edge rules of the bilinear sample: one with ``y < -1``, ``y > H``, ``x < -1`` or ``x > W``
  contributes 0 but still counts; otherwise ``y`` is clamped to ``[0, H - 1]`` (at
  ``H - 1`` only row ``H - 1`` is read), same for ``x``.

How it is batched. A bilinear sample is a tent-weighted sum of cells,
``v(y, x) = sum_hw relu(1 - |y' - h|) * relu(1 - |x' - w|) * f[h, w]`` with ``y', x'`` the
clamped coordinates, and the sub-grid, the edge rule and the count are all products of a
y part and an x part. So each bin is ``sum_hw Wy[h] * Wx[w] * f[h, w]`` with 1-D weights
``Wy[h] = sum_iy [iy < grid_h] * [-1 <= y_iy <= H] * relu(1 - |y'_iy - h|) / max(grid_h, 1)``
(and ``Wx`` alike): every box of the batch is laid out on the batch's largest grid, the
samples past its own grid masked out, and the pooling of all boxes is one ``bmm`` of
``[N, R*out*out, H*W]`` weights with the ``[N, C, H*W]`` maps. Exact (the same sums as
the loops, in another order), differentiable in the features (and in the boxes, where
torchvision is not), and its extra memory is the weights, not a tensor of samples:
``N * R * out * (G_h * H + G_w * W)`` elements for the tent terms with
``G = max over boxes of grid``, and ``N * R * out**2 * H * W`` for the 2-D weights. For a
box inside the map ``roi_h <= H``, so ``G_h <= ceil(H / out)`` (and ``G_w <= ceil(W / out)``):
with one bin a 7x7 map needs at most 7 samples per side for any box inside it. A box reaching far
outside the map makes ``G`` grow with its size (linearly, not quadratically). The
adaptive grid is data-dependent: finding ``G`` reads one scalar back from the device
(a sync); ``sampling_ratio > 0`` has none.

Non-finite boxes (NaN or inf in any coordinate) do not raise: their output is NaN.
They are pooled as the whole frame and then overwritten, so they never inflate ``G``
(an inf box would otherwise ask for an infinite grid). Zero-size and inverted boxes
give 0 with the adaptive grid; with a fixed grid an inverted box is sampled backwards,
as torchvision does. Very large finite boxes are not capped: ``G`` follows them.

Dtypes: the weights and the ``bmm`` are computed in ``float32``, or ``float64`` for
``float64`` features, with autocast off (``bf16``/``fp16`` features are upcast). The
result has the features' dtype, except under autocast where it is ``float32`` (as
``grid_sample``, an autocast fp32 op, gave before).
"""

from __future__ import annotations

import torch


def _axis_weights(
    start: torch.Tensor,
    size: torch.Tensor,
    grid: torch.Tensor,
    g_max: int,
    output_size: int,
    length: int,
) -> torch.Tensor:
    """1-D RoIAlign weights along one axis.

    Args:
        start: ``[N, R]`` roi start in cell-centre coordinates (``x1 * W - 0.5``).
        size: ``[N, R]`` roi size in cells.
        grid: ``[N, R]`` samples per bin along this axis (integer-valued, ``>= 0``).
        g_max: the largest value of ``grid`` (the sub-grid every box is laid out on).
        output_size: bins along this axis.
        length: cells along this axis (``H`` or ``W``).

    Returns:
        ``[N, R, output_size, length]``: bin ``p``'s weight on cell ``h``, already
        divided by that box's ``max(grid, 1)``.
    """
    dtype = start.dtype
    bin_size = (size / output_size)[..., None, None]  # [N, R, 1, 1]
    grid_safe = grid.clamp(min=1)[..., None, None]
    p = torch.arange(output_size, device=start.device, dtype=dtype)[:, None]  # [P, 1]
    i = torch.arange(g_max, device=start.device, dtype=dtype)  # [G]
    # Sample i of bin p, in torchvision's order of operations.
    pos = start[..., None, None] + p * bin_size + (i + 0.5) * bin_size / grid_safe  # [N, R, P, G]
    used = (i < grid[..., None, None]) & (pos >= -1) & (pos <= length)
    clamped = pos.clamp(0, length - 1)
    cells = torch.arange(length, device=start.device, dtype=dtype)
    tent = (1 - (clamped[..., None] - cells).abs()).clamp(min=0)  # [N, R, P, G, L]
    tent = torch.where(used[..., None], tent, torch.zeros((), device=tent.device, dtype=dtype))
    return tent.sum(dim=-2) / grid_safe  # [N, R, P, L]


def roi_align(
    features: torch.Tensor,
    boxes: torch.Tensor,
    output_size: int = 1,
    sampling_ratio: int = -1,
) -> torch.Tensor:
    """Pool ``features`` inside ``boxes`` (torchvision's RoIAlign, ``aligned=True``).

    Args:
        features: ``[N, C, H, W]`` feature maps.
        boxes: normalised ``x1, y1, x2, y2`` (``[0, 1]`` is the whole map), either ``[N, 4]``
            (one box per map) or ``[N, R, 4]`` (R boxes per map, pooled without copying
            the map).
        output_size: bins per side of the output.
        sampling_ratio: bilinear samples per bin side; ``<= 0`` (the default, as FG-CLIP)
            is torchvision's adaptive grid, ``ceil(box size in cells / output_size)`` per
            box and axis.

    Returns:
        ``[N, C, out, out]`` for ``[N, 4]`` boxes, ``[N, R, C, out, out]`` for ``[N, R, 4]``.
    """
    if features.dim() != 4:
        raise ValueError(f"features must be [N, C, H, W], got shape {tuple(features.shape)}")
    if output_size < 1:
        raise ValueError(f"output_size must be >= 1, got {output_size}")
    single = boxes.dim() == 2
    if single:
        boxes = boxes.unsqueeze(1)
    if boxes.dim() != 3 or boxes.shape[-1] != 4 or boxes.shape[0] != features.shape[0]:
        raise ValueError(
            f"boxes must be [N, 4] or [N, R, 4] with N={features.shape[0]}, got shape {tuple(boxes.shape)}"
        )
    n, c, h, w = features.shape
    r = boxes.shape[1]
    out = output_size
    device_type = features.device.type
    work = torch.promote_types(features.dtype, torch.float32)
    with torch.autocast(device_type=device_type, enabled=False):
        boxes = boxes.to(device=features.device, dtype=work)
        finite = torch.isfinite(boxes).all(dim=-1)  # [N, R]
        whole = boxes.new_tensor([0.0, 0.0, 1.0, 1.0])
        boxes = torch.where(finite[..., None], boxes, whole)
        x1, y1, x2, y2 = boxes.unbind(-1)
        # Grid units, then torchvision's aligned offset: start/end = coordinate - 0.5.
        start_x, end_x = x1 * w - 0.5, x2 * w - 0.5
        start_y, end_y = y1 * h - 0.5, y2 * h - 0.5
        size_x, size_y = end_x - start_x, end_y - start_y
        if sampling_ratio > 0:
            grid_x = torch.full_like(size_x, float(sampling_ratio))
            grid_y = grid_x
            gx_max = gy_max = sampling_ratio
        else:
            grid_x = torch.ceil(size_x / out).clamp(min=0)
            grid_y = torch.ceil(size_y / out).clamp(min=0)
            if n * r == 0:
                gx_max = gy_max = 0
            else:
                # One read-back for both maxima.
                gx_max, gy_max = (int(v) for v in torch.stack((grid_x.max(), grid_y.max())).tolist())
        wy = _axis_weights(start_y, size_y, grid_y, gy_max, out, h)  # [N, R, P, H]
        wx = _axis_weights(start_x, size_x, grid_x, gx_max, out, w)  # [N, R, P, W]
        weights = (wy[:, :, :, None, :, None] * wx[:, :, None, :, None, :]).reshape(n, r * out * out, h * w)
        maps = features.to(work).reshape(n, c, h * w)
        pooled = torch.bmm(weights, maps.transpose(1, 2))  # [N, R*P*P, C]
        pooled = pooled.reshape(n, r, out, out, c).permute(0, 1, 4, 2, 3)  # [N, R, C, P, P]
        nan = torch.full((), float("nan"), device=pooled.device, dtype=pooled.dtype)
        pooled = torch.where(finite[:, :, None, None, None], pooled, nan)
    if not torch.is_autocast_enabled(device_type):
        pooled = pooled.to(features.dtype)
    return pooled[:, 0] if single else pooled
