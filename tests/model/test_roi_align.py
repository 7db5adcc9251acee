"""RoIAlign against hand computations and a loop reference (torchvision's aligned=True algorithm)."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

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
    # Cell (0, 0), 2x2 samples: at -0.25 (clamped to 0) and 0.25 -> weights 7/8 on cell 0,
    # 1/8 on cell 1. (The adaptive grid would take one sample, at the cell centre.)
    f = _map(1)
    out = roi_align(f, torch.tensor([[0.0, 0.0, 0.25, 0.25]]), sampling_ratio=2)
    torch.testing.assert_close(
        roi_align(f, torch.tensor([[0.0, 0.0, 0.25, 0.25]]))[0, :, 0, 0], f[0, :, 0, 0]
    )
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
    with pytest.raises(ValueError, match="output_size"):
        roi_align(_map(), torch.tensor([[0.0, 0.0, 1.0, 1.0]]), output_size=0)
    with pytest.raises(ValueError, match="features must be"):
        roi_align(_map()[0], torch.tensor([[0.0, 0.0, 1.0, 1.0]]))
    with pytest.raises(ValueError, match="boxes must be"):
        roi_align(_map(), torch.zeros(2, 4))


# ---------------------------------------------------------------- against a loop reference
#
# The reference is torchvision's RoIAlign (aligned=True, spatial_scale on boxes already in
# grid units) written as explicit loops: per box, per bin, per sample, with its edge rules.


def _bilinear(f: torch.Tensor, y: float, x: float) -> torch.Tensor:
    """torchvision's ``bilinear_interpolate`` on one ``[C, H, W]`` map."""
    _, h, w = f.shape
    if y < -1.0 or y > h or x < -1.0 or x > w:
        return torch.zeros(f.shape[0], dtype=f.dtype)
    y, x = max(y, 0.0), max(x, 0.0)
    y_low, x_low = int(y), int(x)
    if y_low >= h - 1:
        y_low = y_high = h - 1
        y = float(y_low)
    else:
        y_high = y_low + 1
    if x_low >= w - 1:
        x_low = x_high = w - 1
        x = float(x_low)
    else:
        x_high = x_low + 1
    ly, lx = y - y_low, x - x_low
    hy, hx = 1.0 - ly, 1.0 - lx
    return (
        hy * hx * f[:, y_low, x_low]
        + hy * lx * f[:, y_low, x_high]
        + ly * hx * f[:, y_high, x_low]
        + ly * lx * f[:, y_high, x_high]
    )


def _reference(features: torch.Tensor, boxes: torch.Tensor, out: int, sampling_ratio: int) -> torch.Tensor:
    """Loop RoIAlign: ``[N, C, H, W]`` maps, ``[N, R, 4]`` normalised boxes -> ``[N, R, C, out, out]``."""
    n, c, h, w = features.shape
    result = torch.zeros(n, boxes.shape[1], c, out, out, dtype=torch.float64)
    for i in range(n):
        f = features[i].double()
        for r in range(boxes.shape[1]):
            x1, y1, x2, y2 = (float(v) for v in boxes[i, r])
            if not all(math.isfinite(v) for v in (x1, y1, x2, y2)):
                result[i, r] = float("nan")
                continue
            start_x, start_y = x1 * w - 0.5, y1 * h - 0.5
            roi_w, roi_h = (x2 * w - 0.5) - start_x, (y2 * h - 0.5) - start_y
            bin_w, bin_h = roi_w / out, roi_h / out
            grid_w = sampling_ratio if sampling_ratio > 0 else math.ceil(roi_w / out)
            grid_h = sampling_ratio if sampling_ratio > 0 else math.ceil(roi_h / out)
            count = max(grid_h * grid_w, 1)
            for ph in range(out):
                for pw in range(out):
                    acc = torch.zeros(c, dtype=torch.float64)
                    for iy in range(grid_h):
                        y = start_y + ph * bin_h + (iy + 0.5) * bin_h / grid_h
                        for ix in range(grid_w):
                            x = start_x + pw * bin_w + (ix + 0.5) * bin_w / grid_w
                            acc += _bilinear(f, y, x)
                    result[i, r, :, ph, pw] = acc / count
    return result


def _boxes_for(h: int, w: int, seed: int) -> torch.Tensor:
    """Boxes of many kinds on an ``h x w`` grid, normalised: ``[B, 4]``."""
    cell = [1 / w, 1 / h, 1 / w, 1 / h]
    in_cells = [
        [0, 0, w, h],  # whole frame
        [2.2, 1.1, 2.5, 1.4],  # sub-cell: 0.3 x 0.3 cells
        [0.1, 0.05, 0.4, 0.95],  # sub-cell across, most of a cell down
        [1, 2, 4, 5],  # on cell edges
        [2, 0, 3, 5],  # thin: 1 x 5 cells
        [0, 3, 5, 4],  # thin: 5 x 1 cells
        [0, 0.7, 1.5, h],  # touching the left, bottom borders
        [w - 2.3, 0, w, 1.9],  # touching the right, top borders
        [3, 3, 3, 3],  # point
        [1, 1, 1, 4],  # zero width
        [1.5, 2, 3.5, 2],  # zero height
        [3, 3, 2, 4],  # inverted
        [-1, -1, 0, 0],  # one cell outside the corner: samples at exactly -1
        [w, h, w + 1, h + 1],  # samples at exactly W, H
        [-0.5 * w, -0.3 * h, 1.4 * w, 1.2 * h],  # beyond every border: samples past -1 / H
        [-1.01, 0.5, 0.2, 1.5],  # reaching just past -1
    ]
    fixed = torch.tensor(in_cells, dtype=torch.float64) * torch.tensor(cell, dtype=torch.float64)
    g = torch.Generator().manual_seed(seed)
    xy1 = torch.rand(8, 2, generator=g, dtype=torch.float64) * 0.8
    wh = torch.rand(8, 2, generator=g, dtype=torch.float64) * (1 - xy1)
    random = torch.cat([xy1, xy1 + wh], dim=-1)
    return torch.cat([fixed, random])


@pytest.mark.parametrize("hw", [(7, 7), (8, 8), (14, 14), (5, 9)])
@pytest.mark.parametrize("out", [1, 2])
@pytest.mark.parametrize("sampling_ratio", [-1, 0, 2])
def test_matches_the_loop_reference(hw: tuple[int, int], out: int, sampling_ratio: int) -> None:
    h, w = hw
    boxes = _boxes_for(h, w, seed=h * 100 + w)
    n_boxes = boxes.shape[0]
    g = torch.Generator().manual_seed(7)
    # [N, R, 4]: 2 maps with every box on each, so R boxes of different grids share a batch.
    features = torch.randn(2, 3, h, w, generator=g, dtype=torch.float64)
    many = boxes.expand(2, -1, -1)
    got = roi_align(features, many, output_size=out, sampling_ratio=sampling_ratio)
    assert got.shape == (2, n_boxes, 3, out, out) and got.dtype == torch.float64
    torch.testing.assert_close(got, _reference(features, many, out, sampling_ratio), rtol=0, atol=1e-10)
    # [N, 4]: one box per map.
    per_box = torch.randn(n_boxes, 3, h, w, generator=g, dtype=torch.float64)
    got = roi_align(per_box, boxes, output_size=out, sampling_ratio=sampling_ratio)
    assert got.shape == (n_boxes, 3, out, out)
    expected = _reference(per_box, boxes[:, None], out, sampling_ratio)[:, 0]
    torch.testing.assert_close(got, expected, rtol=0, atol=1e-10)


def test_reference_edge_rules_by_hand() -> None:
    # 8x8 map, one bin, one-cell boxes whose single adaptive sample lands on the edge rule.
    f = torch.randn(1, 2, 8, 8, generator=torch.Generator().manual_seed(4), dtype=torch.float64)
    b = torch.tensor(
        [
            [[-1 / 8, -1 / 8, 0.0, 0.0]],  # sample at (-1, -1): kept, clamped to cell (0, 0)
            [[1.0, 1.0, 9 / 8, 9 / 8]],  # sample at (8, 8) = (H, W): kept, cell (7, 7)
            [[0.5, -1.25 / 8, 0.625, -0.25 / 8]],  # sample at y = -1.25: contributes 0
        ],
        dtype=torch.float64,
    ).reshape(3, 4)
    f3 = f.expand(3, -1, -1, -1)
    for impl in (
        lambda: roi_align(f3, b)[:, :, 0, 0],
        lambda: _reference(f3, b[:, None], 1, -1)[:, 0, :, 0, 0],
    ):
        got = impl()
        torch.testing.assert_close(got[0], f[0, :, 0, 0], rtol=0, atol=1e-12)
        torch.testing.assert_close(got[1], f[0, :, 7, 7], rtol=0, atol=1e-12)
        torch.testing.assert_close(got[2], torch.zeros(2, dtype=torch.float64), rtol=0, atol=0)


def test_whole_frame_adaptive_is_the_mean_of_the_cells() -> None:
    # ViT-B/32 at 224: a 7x7 grid. Adaptive sampling puts one sample on each cell centre.
    f = torch.randn(3, 16, 7, 7, generator=torch.Generator().manual_seed(5))
    whole = torch.tensor([0.0, 0.0, 1.0, 1.0]).repeat(3, 1)
    adaptive = roi_align(f, whole)[:, :, 0, 0]
    torch.testing.assert_close(adaptive, f.mean(dim=(2, 3)), rtol=0, atol=1e-6)
    # A fixed 2x2 grid samples at 1.25 and 4.75 only: not the mean, by far more than rounding.
    fixed = roi_align(f, whole, sampling_ratio=2)[:, :, 0, 0]
    assert (fixed - adaptive).abs().max().item() > 0.05


def test_fixed_ratio_keeps_the_grid_sample_numbers() -> None:
    # The previous implementation: sample points on a regular sub-grid of each bin, one
    # grid_sample call with border padding. Its numbers must not move for boxes in the map.
    def previous(features: torch.Tensor, boxes: torch.Tensor, out: int, ratio: int) -> torch.Tensor:
        n, r, c = boxes.shape[0], boxes.shape[1], features.shape[1]
        s = out * ratio
        steps = (torch.arange(s, dtype=features.dtype) + 0.5) / s
        x1, y1, x2, y2 = boxes.to(features.dtype).unbind(-1)
        xs = x1[..., None] + (x2 - x1)[..., None] * steps
        ys = y1[..., None] + (y2 - y1)[..., None] * steps
        grid = torch.stack((xs[:, :, None, :].expand(n, r, s, s), ys[:, :, :, None].expand(n, r, s, s)), -1)
        samples = F.grid_sample(
            features, (grid * 2 - 1).reshape(n, r * s, s, 2), padding_mode="border", align_corners=False
        )
        samples = samples.reshape(n, c, r, out, ratio, out, ratio)
        return samples.mean(dim=(4, 6)).permute(0, 2, 1, 3, 4)

    g = torch.Generator().manual_seed(6)
    for dtype, atol in ((torch.float64, 1e-12), (torch.float32, 1e-5)):
        f = torch.randn(4, 5, 7, 9, generator=g, dtype=dtype)
        xy1 = torch.rand(4, 6, 2, generator=g, dtype=dtype) * 0.7
        boxes = torch.cat([xy1, xy1 + torch.rand(4, 6, 2, generator=g, dtype=dtype) * (1 - xy1)], -1)
        boxes[0, 0] = torch.tensor([0.0, 0.0, 1.0, 1.0])
        for out, ratio in ((1, 2), (2, 2), (2, 3)):
            got = roi_align(f, boxes, output_size=out, sampling_ratio=ratio)
            torch.testing.assert_close(got, previous(f, boxes, out, ratio), rtol=0, atol=atol)
    ref = _reference(f.double(), boxes.double(), 1, 2)
    torch.testing.assert_close(
        roi_align(f.double(), boxes.double(), sampling_ratio=2), ref, rtol=0, atol=1e-10
    )


@pytest.mark.parametrize("sampling_ratio", [-1, 2])
def test_gradcheck(sampling_ratio: int) -> None:
    g = torch.Generator().manual_seed(8)
    f = torch.randn(2, 3, 5, 6, generator=g, dtype=torch.float64, requires_grad=True)
    boxes = torch.tensor(
        [
            [[0.0, 0.0, 1.0, 1.0], [0.13, 0.21, 0.57, 0.93]],
            [[0.31, 0.05, 0.36, 0.44], [-0.1, 0.6, 0.8, 1.07]],
        ],
        dtype=torch.float64,
    )
    assert torch.autograd.gradcheck(
        lambda x: roi_align(x, boxes, output_size=2, sampling_ratio=sampling_ratio), (f,)
    )
    # Positions too (torchvision has no box gradient; ours is the tent weights' derivative),
    # on boxes whose samples avoid the kinks: cell centres and the clamps at the border.
    b = torch.tensor(
        [
            [[0.13, 0.23, 0.57, 0.91], [0.31, 0.07, 0.36, 0.44]],
            [[0.22, 0.34, 0.71, 0.62], [0.05, 0.12, 0.91, 0.83]],
        ],
        dtype=torch.float64,
        requires_grad=True,
    )
    assert torch.autograd.gradcheck(
        lambda bb: roi_align(f.detach(), bb, output_size=2, sampling_ratio=sampling_ratio), (b,)
    )


@pytest.mark.parametrize("sampling_ratio", [-1, 2])
def test_non_finite_boxes_give_nan_and_leave_the_others_alone(sampling_ratio: int) -> None:
    f = torch.randn(2, 4, 7, 7, generator=torch.Generator().manual_seed(9))
    boxes = torch.tensor(
        [
            [[0.1, 0.2, 0.6, 0.9], [float("nan"), 0.0, 1.0, 1.0]],
            [[0.0, 0.0, float("inf"), 1.0], [0.0, 0.0, 1.0, 1.0]],
        ]
    )
    out = roi_align(f, boxes, sampling_ratio=sampling_ratio)
    assert torch.isnan(out[0, 1]).all() and torch.isnan(out[1, 0]).all()
    torch.testing.assert_close(out[0, 0], roi_align(f[:1], boxes[:1, 0], sampling_ratio=sampling_ratio)[0])
    torch.testing.assert_close(out[1, 1], roi_align(f[1:], boxes[1:, 1], sampling_ratio=sampling_ratio)[0])
    # The NaN does not spread into the gradient of the maps through the other boxes.
    fr = f.clone().requires_grad_(True)
    roi_align(fr, boxes, sampling_ratio=sampling_ratio)[0, 0].sum().backward()
    assert torch.isfinite(fr.grad).all()


def test_dtypes_follow_the_features() -> None:
    boxes = torch.tensor([[0.1, 0.2, 0.6, 0.9], [0.0, 0.0, 1.0, 1.0]])
    f = torch.randn(2, 3, 7, 7, generator=torch.Generator().manual_seed(10))
    for dtype in (torch.float32, torch.float64, torch.bfloat16):
        assert roi_align(f.to(dtype), boxes).dtype == dtype
    # Under autocast the result is float32, as grid_sample (an autocast fp32 op) gave.
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = roi_align(f.bfloat16(), boxes)
    assert out.dtype == torch.float32
    torch.testing.assert_close(out, roi_align(f.bfloat16().float(), boxes), rtol=0, atol=0)


def test_empty_batches() -> None:
    f = torch.randn(2, 3, 7, 7)
    assert roi_align(f, torch.zeros(2, 0, 4)).shape == (2, 0, 3, 1, 1)
    assert roi_align(f[:0], torch.zeros(0, 4), output_size=2).shape == (0, 3, 2, 2)
