"""RoIAlign on normalised boxes, in plain torch (no torchvision dependency).

Same numbers as ``torchvision.ops.roi_align(..., aligned=True)`` for boxes inside
the image: each output bin averages ``sampling_ratio**2`` bilinear samples placed
at the centres of a regular sub-grid of the bin.

With ``aligned=True`` a normalised coordinate ``u`` maps to the pixel-centre
coordinate ``u * W - 0.5``, which is exactly ``grid_sample``'s convention for
``align_corners=False`` with grid value ``2u - 1``; ``padding_mode="border"``
reproduces RoIAlign's clamping of samples that fall within half a cell of the
border. So the whole operation is one ``grid_sample`` call over all boxes.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def roi_align(
    features: torch.Tensor,
    boxes: torch.Tensor,
    output_size: int = 1,
    sampling_ratio: int = 2,
) -> torch.Tensor:
    """Pool ``features`` inside ``boxes``.

    Args:
        features: ``[N, C, H, W]`` feature maps.
        boxes: normalised ``x1, y1, x2, y2`` in ``[0, 1]``, either ``[N, 4]`` (one box
            per map) or ``[N, R, 4]`` (R boxes per map, pooled without copying the map).
        output_size: bins per side of the output.
        sampling_ratio: bilinear samples per bin side (torchvision's adaptive ``0`` is
            per-box and cannot be batched, so it is not supported).

    Returns:
        ``[N, C, out, out]`` for ``[N, 4]`` boxes, ``[N, R, C, out, out]`` for ``[N, R, 4]``.
    """
    if sampling_ratio < 1:
        raise ValueError(f"sampling_ratio must be >= 1, got {sampling_ratio}")
    if features.dim() != 4:
        raise ValueError(f"features must be [N, C, H, W], got shape {tuple(features.shape)}")
    single = boxes.dim() == 2
    if single:
        boxes = boxes.unsqueeze(1)
    if boxes.dim() != 3 or boxes.shape[-1] != 4 or boxes.shape[0] != features.shape[0]:
        raise ValueError(
            f"boxes must be [N, 4] or [N, R, 4] with N={features.shape[0]}, got shape {tuple(boxes.shape)}"
        )
    n, r = boxes.shape[:2]
    c = features.shape[1]
    s = output_size * sampling_ratio
    # Fractional positions of the sample points inside a box: bin i, sample j sits
    # at (i + (j + 0.5) / sampling_ratio) / output_size.
    steps = (torch.arange(s, device=boxes.device, dtype=boxes.dtype) + 0.5) / s
    x1, y1, x2, y2 = boxes.to(features.dtype).unbind(-1)  # [N, R] each
    steps = steps.to(features.dtype)
    xs = x1[..., None] + (x2 - x1)[..., None] * steps  # [N, R, s]
    ys = y1[..., None] + (y2 - y1)[..., None] * steps
    grid = torch.stack(
        (xs[:, :, None, :].expand(n, r, s, s), ys[:, :, :, None].expand(n, r, s, s)), dim=-1
    )  # [N, R, s(y), s(x), 2] as (x, y)
    grid = (grid * 2 - 1).reshape(n, r * s, s, 2)
    samples = F.grid_sample(features, grid, mode="bilinear", padding_mode="border", align_corners=False)
    # [N, C, R*s, s] -> average the sampling_ratio x sampling_ratio points of each bin.
    samples = samples.reshape(n, c, r, output_size, sampling_ratio, output_size, sampling_ratio)
    pooled = samples.mean(dim=(4, 6)).permute(0, 2, 1, 3, 4)  # [N, R, C, out, out]
    return pooled[:, 0] if single else pooled
