"""Adaptive RoIAlign: the batched ``fgclip.model.roi_align`` against per-box loops, same run.

Times, on the same maps and boxes, interleaved repeat by repeat:

- batched: ``roi_align(..., sampling_ratio=-1)``, the project's (tent weights, one ``bmm``);
- loop: the same algorithm one box at a time, as a direct port of torchvision would run
  it without its C++ kernel: for each map and box, that box's own ``ceil(size / out)``
  sample grid, one ``grid_sample`` call (border padding gives torchvision's clamp), the
  samples past ``[-1, H]`` / ``[-1, W]`` masked, the mean over the grid;
- padded grid_sample: all boxes batched in one ``grid_sample`` call at the batch's
  largest grid, samples past each box's own grid masked (the other batched design);
- fixed 2x2: ``roi_align(..., sampling_ratio=2)``, the grid the project used before.

All three adaptive versions are checked to agree before timing. Forward alone, and
forward plus backward to the features (training needs both). Boxes are random inside the
frame, with one whole-frame box per map (what a caller pools for a missing box), so the
batch's grid is the largest one.

    python benchmarks/roi_align.py --repeats 20
"""

from __future__ import annotations

import argparse
import math
import platform
import statistics
import sys
import time
from functools import partial
from pathlib import Path

import torch
import torch.nn.functional as F

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from fgclip.model.roi_align import roi_align

# (name, maps N, channels C, H, W, boxes per map R)
SHAPES = [
    ("training (stand-in, 64px / 8)", 32, 96, 8, 8, 4),
    ("ViT-B/32 at 224", 128, 768, 7, 7, 4),
]


def _box_samples(features: torch.Tensor, box: torch.Tensor, out: int) -> torch.Tensor:
    """One box on one ``[1, C, H, W]`` map, torchvision's adaptive grid -> ``[C, out, out]``."""
    _, c, h, w = features.shape
    x1, y1, x2, y2 = box.tolist()
    sx, sy = x1 * w - 0.5, y1 * h - 0.5
    rw, rh = (x2 * w - 0.5) - sx, (y2 * h - 0.5) - sy
    gw, gh = max(math.ceil(rw / out), 0), max(math.ceil(rh / out), 0)
    if gw == 0 or gh == 0:
        return features.new_zeros(c, out, out)
    p = torch.arange(out, dtype=features.dtype)
    xs = (
        sx + p[:, None] * (rw / out) + (torch.arange(gw, dtype=features.dtype) + 0.5) * (rw / out) / gw
    ).flatten()
    ys = (
        sy + p[:, None] * (rh / out) + (torch.arange(gh, dtype=features.dtype) + 0.5) * (rh / out) / gh
    ).flatten()
    grid = torch.stack(torch.broadcast_tensors(xs[None, :], ys[:, None]), dim=-1)  # [out*gh, out*gw, 2]
    norm = torch.tensor([w, h], dtype=features.dtype)
    samples = F.grid_sample(
        features, ((grid + 0.5) / norm * 2 - 1)[None], padding_mode="border", align_corners=False
    )[0]  # [C, out*gh, out*gw]
    keep = ((ys >= -1) & (ys <= h))[:, None] & ((xs >= -1) & (xs <= w))[None, :]
    samples = samples * keep.to(samples.dtype)
    return samples.reshape(c, out, gh, out, gw).sum(dim=(2, 4)) / (gh * gw)


def loop_roi_align(features: torch.Tensor, boxes: torch.Tensor, out: int = 1) -> torch.Tensor:
    """Per-box Python loop: ``[N, C, H, W]``, ``[N, R, 4]`` -> ``[N, R, C, out, out]``."""
    maps = features.unbind(0)  # one view per map: slicing in the loop would backward N full-size grads
    return torch.stack(
        [
            torch.stack([_box_samples(m[None], boxes[i, r], out) for r in range(boxes.shape[1])])
            for i, m in enumerate(maps)
        ]
    )


def padded_grid_sample_roi_align(features: torch.Tensor, boxes: torch.Tensor, out: int = 1) -> torch.Tensor:
    """All boxes in one ``grid_sample`` call at the batch's largest grid, extra samples masked."""
    n, c, h, w = features.shape
    r = boxes.shape[1]
    x1, y1, x2, y2 = boxes.unbind(-1)
    sx, sy = x1 * w - 0.5, y1 * h - 0.5
    rw, rh = (x2 * w - 0.5) - sx, (y2 * h - 0.5) - sy
    gw, gh = torch.ceil(rw / out).clamp(min=0), torch.ceil(rh / out).clamp(min=0)
    gw_max, gh_max = int(gw.max()), int(gh.max())

    def axis(start, size, grid, g_max, length):
        p = torch.arange(out, dtype=features.dtype)[:, None]
        i = torch.arange(g_max, dtype=features.dtype)
        b = (size / out)[..., None, None]
        pos = start[..., None, None] + p * b + (i + 0.5) * b / grid.clamp(min=1)[..., None, None]
        keep = (i < grid[..., None, None]) & (pos >= -1) & (pos <= length)
        return pos.reshape(n, r, -1), keep.reshape(n, r, -1)

    xs, kx = axis(sx, rw, gw, gw_max, w)  # [N, R, out*Gw]
    ys, ky = axis(sy, rh, gh, gh_max, h)
    grid = torch.stack(torch.broadcast_tensors(xs[:, :, None, :], ys[:, :, :, None]), dim=-1)
    norm = torch.tensor([w, h], dtype=features.dtype)
    grid = ((grid + 0.5) / norm * 2 - 1).reshape(n, r * out * gh_max, out * gw_max, 2)
    samples = F.grid_sample(features, grid, padding_mode="border", align_corners=False)
    samples = samples.reshape(n, c, r, out, gh_max, out, gw_max)
    keep = (ky[:, :, :, None] & kx[:, :, None, :]).reshape(n, 1, r, out, gh_max, out, gw_max)
    total = (samples * keep.to(samples.dtype)).sum(dim=(4, 6))  # [N, C, R, out, out]
    count = (gh.clamp(min=1) * gw.clamp(min=1))[:, None, :, None, None]
    return (total / count).permute(0, 2, 1, 3, 4)


def _boxes(n: int, r: int, generator: torch.Generator) -> torch.Tensor:
    xy1 = torch.rand(n, r, 2, generator=generator) * 0.8
    wh = 0.05 + torch.rand(n, r, 2, generator=generator) * (1 - 0.05 - xy1).clamp(min=0)
    boxes = torch.cat([xy1, xy1 + wh], dim=-1).clamp(0, 1)
    boxes[:, 0] = torch.tensor([0.0, 0.0, 1.0, 1.0])
    return boxes


def _time(fn, backward: bool, features: torch.Tensor) -> float:
    if backward:
        features.grad = None
    t0 = time.perf_counter()
    y = fn()
    if backward:
        y.sum().backward()
    return time.perf_counter() - t0


def main() -> None:
    parser = argparse.ArgumentParser(allow_abbrev=False, description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=20)
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    print(
        f"torch {torch.__version__}, {platform.processor() or platform.machine()}, {args.threads} threads, "
        f"best and median of {args.repeats} interleaved repeats"
    )
    g = torch.Generator().manual_seed(0)
    for name, n, c, h, w, r in SHAPES:
        features = torch.randn(n, c, h, w, generator=g, requires_grad=True)
        boxes = _boxes(n, r, g)
        impls = {
            "batched": partial(roi_align, features, boxes),
            "loop": partial(loop_roi_align, features, boxes),
            "padded grid_sample": partial(padded_grid_sample_roi_align, features, boxes),
            "fixed 2x2 (before)": partial(roi_align, features, boxes, sampling_ratio=2),
        }
        with torch.no_grad():
            ref = impls["batched"]()
            for key in ("loop", "padded grid_sample"):
                err = (impls[key]() - ref).abs().max().item()
                assert err < 1e-4, f"{key} disagrees with batched by {err}"
        print(f"\n{name}: {n} maps x {c} ch x {h}x{w}, {r} boxes each")
        for backward in (False, True):
            times = {k: [] for k in impls}
            for _ in range(args.repeats + 2):  # two warm-up rounds, dropped
                for key, fn in impls.items():
                    with torch.set_grad_enabled(backward):
                        times[key].append(_time(fn, backward, features))
            times = {k: v[2:] for k, v in times.items()}
            base = statistics.median(times["batched"])
            print(f"  {'forward + backward' if backward else 'forward'}:")
            for key, v in times.items():
                med = statistics.median(v)
                print(
                    f"    {key:<20} best {min(v) * 1e3:8.2f} ms  median {med * 1e3:8.2f} ms  "
                    f"x{med / base:6.2f} of batched"
                )


if __name__ == "__main__":
    main()
