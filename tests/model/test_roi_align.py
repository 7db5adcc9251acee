"""RoIAlign against hand computations (aligned=True, bilinear, averaged sample points)."""

from __future__ import annotations

import pytest
import torch

from fgclip.model.roi_align import roi_align


def _map(seed: int = 0, c: int = 3, h: int = 4, w: int = 4) -> torch.Tensor:
    return torch.randn(1, c, h, w, generator=torch.Generator().manual_seed(seed))


def test_constant_map_gives_the_constant() -> None:
    features = torch.full((2, 5, 6, 6), 3.5)
    boxes = torch.tensor([[0.0, 0.0, 1.0, 1.0], [0.13, 0.4, 0.31, 0.97]])
    out = roi_align(features, boxes, output_size=2)
    assert out.shape == (2, 5, 2, 2)
    torch.testing.assert_close(out, torch.full_like(out, 3.5))


def test_box_on_one_inner_cell() -> None:
    # Cell (row 1, col 2) of a 4x4 map. With 2x2 samples the sample centres sit at
    # pixel coordinates 1.75 and 2.25 on each axis: bilinear weights over cells
    # (1, 2, 3) are (0.25, 0.75, 0) and (0, 0.75, 0.25), averaging to (1/8, 3/4, 1/8).
    f = _map()
    out = roi_align(f, torch.tensor([[2 / 4, 1 / 4, 3 / 4, 2 / 4]]), output_size=1, sampling_ratio=2)
    wy = {0: 0.125, 1: 0.75, 2: 0.125}
    wx = {1: 0.125, 2: 0.75, 3: 0.125}
    expected = sum(wy[y] * wx[x] * f[0, :, y, x] for y in wy for x in wx)
    torch.testing.assert_close(out[0, :, 0, 0], expected)


def test_corner_cell_clamps_at_the_border() -> None:
    # Cell (0, 0): samples at -0.25 (clamped to 0) and 0.25 -> weights 7/8 on cell 0, 1/8 on cell 1.
    f = _map(1)
    out = roi_align(f, torch.tensor([[0.0, 0.0, 0.25, 0.25]]))
    w = {0: 0.875, 1: 0.125}
    expected = sum(w[y] * w[x] * f[0, :, y, x] for y in w for x in w)
    torch.testing.assert_close(out[0, :, 0, 0], expected)


def test_linear_map_gives_the_bin_centres() -> None:
    # Bilinear interpolation is exact on a linear map, so each bin is the map at its centre.
    h, w = 8, 10
    ys, xs = torch.meshgrid(
        torch.arange(h, dtype=torch.float32), torch.arange(w, dtype=torch.float32), indexing="ij"
    )
    f = (2 * xs - 3 * ys + 1)[None, None]
    x1, y1, x2, y2 = 0.2, 0.25, 0.7, 0.75
    out = roi_align(f, torch.tensor([[x1, y1, x2, y2]]), output_size=2, sampling_ratio=3)[0, 0]
    for by in range(2):
        for bx in range(2):
            cx = (x1 + (x2 - x1) * (bx + 0.5) / 2) * w - 0.5
            cy = (y1 + (y2 - y1) * (by + 0.5) / 2) * h - 0.5
            assert out[by, bx].item() == pytest.approx(2 * cx - 3 * cy + 1, abs=1e-5)


def test_many_boxes_per_map_match_one_box_per_map() -> None:
    f = (
        _map(2, c=4, h=5, w=7).expand(3, -1, -1, -1).contiguous()
        * torch.tensor([1.0, -2.0, 0.5])[:, None, None, None]
    )
    g = torch.Generator().manual_seed(3)
    xy1 = torch.rand(3, 4, 2, generator=g) * 0.5
    boxes = torch.cat([xy1, xy1 + 0.1 + torch.rand(3, 4, 2, generator=g) * 0.4], dim=-1)
    batched = roi_align(f, boxes, output_size=2)
    assert batched.shape == (3, 4, 4, 2, 2)
    for r in range(4):
        torch.testing.assert_close(batched[:, r], roi_align(f, boxes[:, r], output_size=2))


def test_rejects_bad_arguments() -> None:
    with pytest.raises(ValueError, match="sampling_ratio"):
        roi_align(_map(), torch.tensor([[0.0, 0.0, 1.0, 1.0]]), sampling_ratio=0)
    with pytest.raises(ValueError, match="boxes must be"):
        roi_align(_map(), torch.zeros(2, 4))
