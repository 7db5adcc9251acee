"""Frame extraction throughput: our ``extract_frames`` against the ``ffmpeg`` CLI, same videos, same frames.

Datasets (``--dataset real|sample|both``, default both, real first):

- **real**: real camera footage in UCF-Crime's layout and encoding (320x240, 30 fps,
  x264's default preset: keyint 250, 3 B-frames, b-pyramid), 3,600 frames a video,
  made once by ``benchmarks/real_footage.py`` (its docstring has the recipe, the ffmpeg
  commands and the footage's source and licence). Two rows:

  - ``ucf_mix``: UCF-Crime's mix, 23 training + 2 test videos (92 % of the frames in
    training videos, as in UCF-Crime): a training video needs 16 uniform frames and its
    box keyframes (about 22 of 3,600), a test video one frame per 16-frame snippet (225);
  - ``test_only``: every video of the set as a test video (the dense selection: one frame
    in 16), the stage run with an empty train split and all 25 videos in the test split.

- **sample**: the project's generated sample at UCF-Crime's shape (22 videos, 300 to
  3,000 frames, flat synthetic content, x264 ``ultrafast``), written once under ``--out``:
  the row measured before real footage existed. Flat content decodes fast, so per-frame
  overheads weigh more on it than on real footage.

Each row compares, with the same parallelism (``--workers`` videos at a time) and the same
selection (the frames our run wrote, read back from its index):

- ours: the whole ``extract_frames`` stage (``frames.workers`` = ``--workers``, JPEG
  writing, Parquet index), timed from the call to its return; how many videos it read
  sparsely and how many by decoding every frame is recorded when the stage's summary says;
- ffmpeg: one ``ffmpeg`` process per video, each decoding the whole video and writing
  exactly our frames (``-vf select='eq(n,a)+eq(n,b)+...' -fps_mode passthrough``) as JPEGs
  with ``-qmin 1 -q:v 1``: files about as large as ours and at least as good (size and
  PSNR against the decoded frames are reported), so the JPEG settings do not favour us.
  Once with ffmpeg's default decoder threads (one per core), once with ``-threads 1``;
- ffmpeg seeking (real rows with training videos): ffmpeg's fastest way to a sparse
  selection, what a user would script: one ``ffmpeg -ss <t> -i <video> -frames:v 1`` per
  selected frame of a training video (input seeking: it seeks to the keyframe before ``t``
  and decodes from there), ``-threads 1``, the test videos as in the ``-threads 1`` run;
  every process ``--workers`` at a time. ``t`` is the frame's time less half a frame, and
  the check below confirms each JPEG is that frame and not a neighbour;
- ffmpeg decoding only (``-threads 1 -f null``, no selection, nothing written): the floor
  for any tool that decodes every frame.

**Paired runs.** Each repeat runs every tool of the row back to back, in an order that
rotates from repeat to repeat (the first repeat runs ours first: it picks the frames). Per
repeat, the ratio theirs / ours of wall and of CPU seconds (this process and its children;
> 1 = we are faster) is taken within that repeat, and the row reports every repeat's ratio
and the median of those paired ratios, besides each tool's best and median: on shared cores
a paired ratio cancels the load both tools of one repeat saw.

One JSON line per invocation (``--json FILE`` appends it): machine, versions and ``rows``,
each with its dataset, row name, videos, frames (of the videos, and written), our decoding
counts, every tool's times and the paired ratios. Needs ``/usr/bin/ffmpeg``.

    python benchmarks/extract_frames.py --workers 2 --repeats 5 --json bench_out/extract_frames.jsonl
    python benchmarks/extract_frames.py --dataset real --repeats 1 --real-train-videos 3   # a smoke run
"""

from __future__ import annotations

import argparse
import logging
import os
import shutil
import statistics
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import av
import numpy as np
import pyarrow.compute as pc
import pyarrow.parquet as pq
from PIL import Image

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "benchmarks"))

from bench_common import cpu_model, cpu_seconds, emit
from real_footage import NO_TRAIN_SPLIT, ensure_real_dataset

from fgclip.config import Params, load_params
from fgclip.data.frames import extract_frames
from fgclip.data.sample import generate_sample
from fgclip.data.ucf import read_split

# UCF-Crime's shape: 320x240 at 30 fps; lengths from 10 s to 100 s.
DATASET = {
    "width": 320,
    "height": 240,
    "fps": 30,
    "min_video_frames": 300,
    "max_video_frames": 3000,
    "anomaly_classes": ["Arson", "Explosion", "Fighting", "RoadAccidents"],
    "train_per_class": 2,
    "test_per_class": 2,
    "train_normal": 3,
    "test_normal": 3,
    "bad_boxes": False,
}

# Tool -> (how, decoder threads); threads 0 is ffmpeg's default (one per core).
SELECT, SEEK, DECODE_ONLY = "select", "seek", "decode_only"
TOOLS = {
    "ffmpeg": (SELECT, 0),
    "ffmpeg_threads1": (SELECT, 1),
    "ffmpeg_seek": (SEEK, 1),
    "ffmpeg_decode_only": (DECODE_ONLY, 1),
}


def bench_params(out: Path, workers: int, videos: int) -> Params:
    sample = {**DATASET, **({"train_per_class": videos, "test_per_class": videos} if videos else {})}
    params = load_params(REPO / "params.yaml").with_overrides(sample=sample, frames={"workers": workers})
    return Params.model_validate(
        {
            **params.model_dump(exclude={"base_dir"}),
            "base_dir": out,
            "data": {**params.data.model_dump(), "root": "data"},
        }
    )


def ensure_dataset(params: Params) -> Path:
    """Generate the sample unless the one on disk was made from the same sample config."""
    root = params.paths.data_root
    stamp = root / "bench_config.json"
    wanted = params.sample.model_dump_json()
    if not (stamp.is_file() and stamp.read_text() == wanted):
        print(f"generating the dataset under {root} (not timed) ...", file=sys.stderr)
        generate_sample(params.sample, params.data, root)
        stamp.write_text(wanted)
    return root


def timed(fn, *args) -> dict:
    """Wall seconds and CPU seconds (this process and its finished children) of ``fn(*args)``."""

    c0, t0 = cpu_seconds(), time.perf_counter()
    out = fn(*args)
    return {"seconds": time.perf_counter() - t0, "cpu_seconds": cpu_seconds() - c0, "out": out}


def run_ours(params: Params, root: Path, out: Path) -> dict:
    shutil.rmtree(out, ignore_errors=True)
    run = timed(extract_frames, params, root, root / params.data.annotations, out)
    summary = run.pop("out")
    videos = pq.read_table(out / "videos.parquet")
    return {
        **run,
        "video_frames": pc.sum(videos["num_frames"]).as_py(),
        "written": summary["images"],
        "summary": summary,
    }


def selection(frames_dir: Path) -> dict[str, dict]:
    """Per video, the distinct frames our run wrote (what ffmpeg is asked for), their times, its split."""
    index = pq.read_table(frames_dir / "index.parquet", columns=["video", "split", "frame", "timestamp"])
    frames = (
        index.group_by(["video", "split", "frame"])
        .aggregate([("timestamp", "min")])
        .sort_by([("video", "ascending"), ("frame", "ascending")])
    )
    out: dict[str, dict] = {}
    for video, split, frame, ts in zip(
        *(frames[c].to_pylist() for c in ("video", "split", "frame", "timestamp_min"))
    ):
        entry = out.setdefault(video, {"split": split, "frames": [], "times": []})
        entry["frames"].append(frame)
        entry["times"].append(ts)
    videos = pq.read_table(frames_dir / "videos.parquet", columns=["video", "fps"])
    fps = dict(zip(videos["video"].to_pylist(), videos["fps"].to_pylist()))
    for video, entry in out.items():
        entry["fps"] = fps[video] or 30.0
    return out


def select_expr(frames: list[int]) -> str:
    """``eq(n,a)+eq(n,b)+...`` as a balanced tree: ffmpeg's parser refuses a chain ~100 terms deep."""
    if len(frames) == 1:
        return f"eq(n\\,{frames[0]})"  # the comma is escaped for the filtergraph parser
    mid = len(frames) // 2
    return f"({select_expr(frames[:mid])}+{select_expr(frames[mid:])})"


def _ffmpeg(threads: int) -> list[str]:
    return ["ffmpeg", "-nostdin", "-hide_banner", "-loglevel", "error", "-threads", str(threads)]


def ffmpeg_cmd(source: Path, frames: list[int] | None, out_dir: Path, qscale: int, threads: int) -> list[str]:
    """Decode ``source`` and write ``frames`` as JPEGs; ``frames=None``: decode only, write nothing."""
    cmd = [*_ffmpeg(threads), "-i", str(source), "-an", "-sn"]
    if frames is None:
        return [*cmd, "-f", "null", "-"]
    return [
        *cmd,
        "-vf",
        f"select='{select_expr(frames)}'",
        "-fps_mode",
        "passthrough",
        "-qmin",
        "1",
        "-q:v",
        str(qscale),
        "-start_number",
        "0",
        str(out_dir / "%06d.jpg"),
    ]


def seek_cmd(source: Path, t: float, out: Path, qscale: int) -> list[str]:
    """One frame by input seeking: ffmpeg seeks to the keyframe before ``t`` and decodes up to it."""
    return [
        *_ffmpeg(1),
        "-ss", f"{t:.6f}", "-i", str(source), "-an", "-sn",
        "-frames:v", "1", "-qmin", "1", "-q:v", str(qscale), "-update", "1",
        str(out),
    ]  # fmt: skip


def start_times(videos_dir: Path, chosen: dict[str, dict]) -> dict[str, float]:
    """Each video's first presentation time: ``-ss`` counts from it, the index's timestamps do not."""
    out = {}
    for video in chosen:
        with av.open(str(videos_dir / video)) as c:  # ffmpeg adds the container's start time to -ss
            out[video] = c.start_time / av.time_base if c.start_time is not None else 0.0
    return out


def ffmpeg_jobs(
    tool: str, videos_dir: Path, chosen: dict[str, dict], starts: dict[str, float], out: Path, qscale: int
) -> list[list[str]]:
    how, threads = TOOLS[tool]
    jobs, seeks = [], []
    for video, entry in chosen.items():
        (out / video).mkdir(parents=True)
        source = videos_dir / video
        if how == SEEK and entry["split"] == "train":
            half = 0.5 / entry["fps"]  # half a frame early: a time printed a hair late is the next frame
            for k, ts in zip(entry["frames"], entry["times"]):
                t = max(ts - starts[video] - half, 0.0)
                seeks.append(seek_cmd(source, t, out / video / f"{k:06d}.jpg", qscale))
        else:
            frames = None if how == DECODE_ONLY else entry["frames"]
            jobs.append(ffmpeg_cmd(source, frames, out / video, qscale, threads))
    return jobs + seeks  # the long whole-video jobs first: the pool's tail is the short ones


def run_ffmpeg(jobs: list[list[str]], out: Path, workers: int) -> dict:
    """``jobs`` (ffmpeg command lines), ``workers`` at a time."""

    def run_all() -> None:
        with ThreadPoolExecutor(max_workers=workers) as pool:
            list(pool.map(lambda cmd: subprocess.run(cmd, check=True), jobs))

    run = timed(run_all)
    del run["out"]
    return {**run, "written": sum(1 for _ in out.rglob("*.jpg"))}


def _psnr(path: Path, frame: np.ndarray) -> float:
    err = np.mean((np.asarray(Image.open(path).convert("RGB"), np.float64) - frame) ** 2)
    return float(10 * np.log10(255**2 / max(err, 1e-9)))


def _decoded(source: Path, wanted: set[int]) -> dict[int, np.ndarray]:
    with av.open(str(source)) as c:
        out = {}
        for k, f in enumerate(c.decode(video=0)):
            if k in wanted:
                out[k] = f.to_ndarray(format="rgb24")
            if k >= max(wanted):
                break
    return out


def jpeg_quality_check(videos_dir: Path, dirs: dict[str, Path], chosen: dict[str, dict], n: int = 40) -> dict:
    """Mean file size and PSNR against the decoded frame, on the first ``n`` frames of the video with most.

    ``dirs``: ``ours`` (the stage's output) and ``ffmpeg`` (a select run's, numbered in order).
    """
    video = max(chosen, key=lambda v: (len(chosen[v]["frames"]), v))
    frames = chosen[video]["frames"][:n]
    decoded = _decoded(videos_dir / video, set(frames))
    paths = {
        "ours": [dirs["ours"] / "images" / video[:-4] / f"{k:06d}.jpg" for k in frames],
        "ffmpeg": [dirs["ffmpeg"] / video / f"{i:06d}.jpg" for i in range(len(frames))],
    }
    return {
        "video": video,
        "frames": len(frames),
        **{
            tool: {
                "mean_bytes": round(float(np.mean([p.stat().st_size for p in ps]))),
                "psnr_db": round(float(np.mean([_psnr(p, decoded[k]) for p, k in zip(ps, frames)])), 2),
            }
            for tool, ps in paths.items()
        },
    }


def seek_check(videos_dir: Path, seek_dir: Path, chosen: dict[str, dict], videos: int = 3) -> dict:
    """Are the seeking run's JPEGs the frames asked for? PSNR against that frame and its neighbours."""
    train = sorted(v for v, e in chosen.items() if e["split"] == "train")[:videos]
    exact, total, psnr = 0, 0, []
    for video in train:
        frames = chosen[video]["frames"]
        decoded = _decoded(videos_dir / video, {f + d for f in frames for d in (-1, 0, 1) if f + d >= 0})
        for k in frames:
            path = seek_dir / video / f"{k:06d}.jpg"
            scores = {d: _psnr(path, decoded[k + d]) for d in (-1, 0, 1) if k + d in decoded}
            exact += max(scores, key=scores.get) == 0
            total += 1
            psnr.append(scores[0])
    return {"videos": len(train), "frames": total, "exact": exact, "psnr_db": round(float(np.mean(psnr)), 2)}


def _stats(values: list[float]) -> dict:
    return {"best": round(min(values), 3), "median": round(statistics.median(values), 3)}


def run_row(
    name: str, dataset: str, params: Params, root: Path, out: Path, tools: list[str], args: argparse.Namespace
) -> dict:
    """One row: every repeat runs ours and each ffmpeg tool back to back, in a rotating order."""
    videos_dir = params.resolve_paths(data_root=root).videos
    ours_dir = out / "frames_ours"
    order_base = ["ours", *tools]
    runs: dict[str, list[dict]] = {tool: [] for tool in order_base}
    chosen: dict[str, dict] = {}
    starts: dict[str, float] = {}
    for r in range(args.repeats):
        k = r % len(order_base)  # the first run is ours: it picks the frames
        order = order_base[k:] + order_base[:k]
        for tool in order:
            if tool == "ours":
                runs[tool].append(run_ours(params, root, ours_dir))
                if not chosen:
                    chosen = selection(ours_dir)
                    starts = start_times(videos_dir, chosen)
            else:
                tool_dir = out / f"frames_{tool}"
                shutil.rmtree(tool_dir, ignore_errors=True)
                jobs = ffmpeg_jobs(tool, videos_dir, chosen, starts, tool_dir, args.qscale)  # not timed
                runs[tool].append(run_ffmpeg(jobs, tool_dir, args.workers))
            print(
                f"{name} repeat {r}: {tool} {runs[tool][-1]['seconds']:.2f}s wall, "
                f"{runs[tool][-1]['cpu_seconds']:.2f}s cpu",
                file=sys.stderr,
            )

    first = runs["ours"][0]
    video_frames, written, summary = first["video_frames"], first["written"], first["summary"]
    for tool in tools:
        if TOOLS[tool][0] != DECODE_ONLY:
            assert all(run["written"] == written for run in runs[tool]), (
                f"{tool} wrote a different number of frames"
            )
    decoding = summary.get("decoding")  # {"sparse": n, "skipping": n, "all": n} once the stage says
    sparse = summary.get("sparse_videos", decoding.get("sparse") if isinstance(decoding, dict) else None)
    splits = [e["split"] for e in chosen.values()]
    row = {
        "dataset": dataset,
        "row": name,
        "videos": len(chosen),
        "train_videos": splits.count("train"),
        "test_videos": splits.count("test"),
        "video_frames": video_frames,
        "written_frames": written,
        "ours_decoding": decoding,
        "sparse_videos": sparse,
        "sequential_videos": None if sparse is None else len(chosen) - sparse,
        "ours_decoded_frames": summary.get("decoded_frames"),
        "frames_decode": getattr(params.frames, "decode", None),
        "jpeg": jpeg_quality_check(videos_dir, {"ours": ours_dir, "ffmpeg": out / "frames_ffmpeg"}, chosen),
    }
    if "ffmpeg_seek" in tools:
        row["seek_check"] = seek_check(videos_dir, out / "frames_ffmpeg_seek", chosen)
    for tool, tool_runs in runs.items():
        wall = [run["seconds"] for run in tool_runs]
        cpu = [run["cpu_seconds"] for run in tool_runs]
        row[tool] = {
            "wall_s": [round(w, 3) for w in wall],
            "cpu_s": [round(c, 3) for c in cpu],
            "wall": _stats(wall),
            "cpu": _stats(cpu),
            "video_frames_per_s_median": round(video_frames / statistics.median(wall)),
            "written_per_s_median": round(written / statistics.median(wall), 1),
            "video_frames_per_cpu_s_median": round(video_frames / statistics.median(cpu)),
        }
    for tool in tools:  # theirs / ours within each repeat: > 1 = we are faster
        wall = [t["seconds"] / o["seconds"] for t, o in zip(runs[tool], runs["ours"])]
        cpu = [t["cpu_seconds"] / o["cpu_seconds"] for t, o in zip(runs[tool], runs["ours"])]
        row[f"ours_over_{tool}"] = {
            "wall_ratios": [round(x, 3) for x in wall],
            "cpu_ratios": [round(x, 3) for x in cpu],
            "wall_median": round(statistics.median(wall), 3),
            "cpu_median": round(statistics.median(cpu), 3),
        }
    return row


def real_rows(args: argparse.Namespace) -> list[dict]:
    base = load_params(REPO / "params.yaml")
    root = ensure_real_dataset(args.out.resolve().parent / "real_footage", base.data, jobs=args.workers)
    frames = {"workers": args.workers, **({"decode": args.decode} if args.decode else {})}
    train_split = base.data.train_split
    if args.real_train_videos:  # a smoke run: the first N training videos (a split file of the benchmark's)
        train_split = f"bench_train_first{args.real_train_videos}.txt"
        ids = read_split(root / base.data.train_split)[: args.real_train_videos]
        (root / train_split).write_text("".join(f"{v}\n" for v in ids))
    # test_only: every video of the set extracted as a test video (an empty train split): the
    # dense selection over as many videos as the mix, so the process pool's start-up weighs on
    # it as on the mix (UCF-Crime has 290 test videos, not 2).
    all_test = "bench_all_test.txt"
    ids = read_split(root / train_split) + read_split(root / base.data.test_split)
    (root / all_test).write_text("".join(f"{v}\n" for v in ids))
    rows = []
    for name, splits, tools in (
        (
            "ucf_mix",
            {"train_split": train_split},
            ["ffmpeg", "ffmpeg_threads1", "ffmpeg_seek", "ffmpeg_decode_only"],
        ),
        (
            "test_only",
            {"train_split": NO_TRAIN_SPLIT, "test_split": all_test},
            ["ffmpeg", "ffmpeg_threads1", "ffmpeg_decode_only"],
        ),
    ):
        params = base.with_overrides(frames=frames, data=splits)
        rows.append(run_row(name, "real", params, root, args.out / "real" / name, tools, args))
    return rows


def sample_row(args: argparse.Namespace) -> dict:
    params = bench_params(args.out.resolve(), args.workers, args.videos)
    if args.decode:
        params = params.with_overrides(frames={"decode": args.decode})
    root = ensure_dataset(params)
    tools = ["ffmpeg", "ffmpeg_threads1", "ffmpeg_decode_only"]
    return run_row("sample", "sample", params, root, args.out, tools, args)


def main() -> None:
    ap = argparse.ArgumentParser(
        allow_abbrev=False, description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--out", type=Path, default=REPO / "bench_out" / "extract_frames")
    ap.add_argument("--dataset", choices=["real", "sample", "both"], default="both")
    ap.add_argument("--workers", type=int, default=2, help="parallel processes, for every tool")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument(
        "--videos", type=int, default=0, help="sample: videos per anomaly class and split (default 2)"
    )
    ap.add_argument(
        "--real-train-videos", type=int, default=0, help="real: only the first N training videos (smoke runs)"
    )
    ap.add_argument("--decode", help="frames.decode for our stage (default: params.yaml's)")
    ap.add_argument(
        "--qscale", type=int, default=1, help="ffmpeg -q:v, 1 to 31 (lower = better, bigger files)"
    )
    ap.add_argument("--json", type=Path, help="append the result as one JSON line")
    args = ap.parse_args()
    if shutil.which("ffmpeg") is None:
        sys.exit("this benchmark compares against the ffmpeg command-line tool: install ffmpeg")
    logging.basicConfig(level=logging.WARNING)

    rows = []
    if args.dataset in ("real", "both"):
        rows += real_rows(args)
    if args.dataset in ("sample", "both"):
        rows.append(sample_row(args))
    version = subprocess.run(["ffmpeg", "-version"], check=True, capture_output=True, text=True).stdout
    result = {
        "cpu": cpu_model(),
        "cores": os.cpu_count(),
        "workers": args.workers,
        "repeats": args.repeats,
        "ffmpeg_version": version.split("\n")[0],
        "pyav": av.__version__,
        "qscale": args.qscale,
        "rows": rows,
        "load_avg_1min_at_end": os.getloadavg()[0],
    }
    for row in rows:  # one readable line per row and tool on stderr; the JSON line on stdout
        for tool in TOOLS:
            if f"ours_over_{tool}" in row:
                p = row[f"ours_over_{tool}"]
                print(
                    f"{row['row']}: ours/{tool}: paired wall x{p['wall_median']} cpu x{p['cpu_median']} "
                    f"(per repeat wall {p['wall_ratios']})",
                    file=sys.stderr,
                )
    emit(result, args.json)


if __name__ == "__main__":
    main()
