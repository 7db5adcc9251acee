"""Bootstrap intervals at UCF-Crime's size: weighted runs of equal frames against every frame.

``fgclip.eval.frame_metrics.bootstrap_intervals`` collapses each run of consecutive
frames with one label and one score (a 16-frame snippet, mostly) into one weighted row
before scoring a resample. The alternative, run in the same process on the same
resamples: concatenate every frame of the drawn videos and call the same metric
functions without weights, as a reference script would. Both must give the same
intervals (checked); the report is seconds per resample and the ratio.

The test set mimics UCF-Crime's: 140 anomalous and 150 normal videos, lengths drawn
from 500 to 7,199 frames (about 1.1 million frames in all, as UCF-Crime's test set), one score per 16-frame
snippet. The content does not matter here, only the sizes.

    python benchmarks/bootstrap.py --resamples 20 --protocol full
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import time
from pathlib import Path

import numpy as np

from fgclip.eval.frame_metrics import bootstrap_intervals
from fgclip.eval.protocol import VideoScores
from fgclip.eval.protocols import protocol_ap, protocol_auc


def ucf_sized_videos(seed: int) -> list[VideoScores]:
    rng = np.random.default_rng(seed)
    videos = []
    for i in range(290):
        n = int(rng.integers(500, 7_200))
        snippets = -(-n // 16)
        scores = np.repeat(rng.random(snippets), 16)[:n]
        labels = np.zeros(n, dtype=np.int8)
        label = "Normal" if i >= 140 else "Arson"
        if label != "Normal":
            start = int(rng.integers(0, n // 2))
            labels[start : start + int(rng.integers(100, n // 2))] = 1
            scores = np.clip(scores + 0.3 * labels, 0, 1)
        videos.append(VideoScores(f"v{i}", label, labels, scores))
    return videos


def every_frame(videos: list[VideoScores], protocol: str, resamples: int, seed: int) -> dict:
    """The same draws as ``bootstrap_intervals``, each resample scored frame by frame."""
    rng = np.random.default_rng(seed)
    aucs, aps = [], []
    while len(aucs) < resamples:
        pick = rng.integers(0, len(videos), len(videos))
        y = np.concatenate([videos[i].labels for i in pick])
        if y.min() == y.max():
            continue
        s = np.concatenate([videos[i].ranking for i in pick])
        aucs.append(protocol_auc(protocol, y, s))
        aps.append(protocol_ap(protocol, y, s))
    return {"frame_auc": [np.percentile(aucs, 2.5), np.percentile(aucs, 97.5)],
            "frame_ap": [np.percentile(aps, 2.5), np.percentile(aps, 97.5)]}  # fmt: skip


def _cpu_name() -> str:
    try:
        lines = Path("/proc/cpuinfo").read_text(encoding="utf-8").splitlines()
    except OSError:
        lines = []
    names = [line.split(":", 1)[1].strip() for line in lines if line.startswith("model name")]
    return names[0] if names else platform.machine()


def main() -> None:
    parser = argparse.ArgumentParser(allow_abbrev=False, description=__doc__.splitlines()[0])
    parser.add_argument("--resamples", type=int, default=20)
    parser.add_argument("--protocol", default="full")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    videos = ucf_sized_videos(args.seed)
    frames = sum(v.labels.size for v in videos)
    runs = {}
    for name, fn in (
        ("weighted runs (ours)", lambda: bootstrap_intervals(videos, args.protocol, resamples=args.resamples)),
        ("every frame", lambda: every_frame(videos, args.protocol, args.resamples, 0)),
    ):
        start = time.perf_counter()
        result = fn()
        runs[name] = (time.perf_counter() - start, result)
    ours, theirs = runs["weighted runs (ours)"], runs["every frame"]
    for key in ("frame_auc", "frame_ap"):
        assert np.allclose(ours[1][key], theirs[1][key], atol=1e-9), (key, ours[1][key], theirs[1][key])
    report = {
        "machine": f"{_cpu_name()}, {os.cpu_count()} cores",
        "videos": len(videos),
        "frames": frames,
        "protocol": args.protocol,
        "resamples": args.resamples,
        "seconds_per_resample": {name: round(t / args.resamples, 4) for name, (t, _) in runs.items()},
        "speedup": round(theirs[0] / ours[0], 1),
        "same_intervals": True,
    }
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
