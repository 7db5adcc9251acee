"""Frame extraction throughput: our ``extract_frames`` against the ``ffmpeg`` CLI, same videos, same frames.

The dataset is the project's generated sample at UCF-Crime's shape (320x240, 30 fps,
300 to 3,000 frames a video), written once under ``--out`` and reused. Each repeat runs,
in a rotating order:

- ours: the whole ``extract_frames`` stage (process pool of ``--workers``, JPEG writing,
  Parquet index), timed from the call to its return;
- ffmpeg: one ``ffmpeg`` process per video, ``--workers`` of them at a time, each
  decoding the whole video and writing exactly the frames our run selected for it
  (``-vf select='eq(n,a)+eq(n,b)+...' -fps_mode passthrough``) as JPEGs with
  ``-qmin 1 -q:v 1``: files about as large as ours and at least as good (the PSNR
  against the decoded frames is reported), so the JPEG settings do not favour us.
  Once with ffmpeg's default decoder threads (one per core), once with ``-threads 1``;
- ffmpeg decoding only (``-f null``, one thread): the floor for any tool that must
  decode every frame, as both do (a stage counts them; ``select`` sees them all).

Wall and CPU seconds (this process and its children) are reported, best and median.
Needs ``/usr/bin/ffmpeg`` (not a project dependency).

    python benchmarks/extract_frames.py --workers 2 --repeats 3
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import platform
import resource
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

from fgclip.config import Params, load_params
from fgclip.data.frames import extract_frames
from fgclip.data.sample import generate_sample

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
    """Generate the dataset unless the one on disk was made from the same sample config."""
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

    def cpu() -> float:
        return sum(
            r.ru_utime + r.ru_stime
            for r in (resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN))
        )

    c0, t0 = cpu(), time.perf_counter()
    out = fn(*args)
    return {"seconds": time.perf_counter() - t0, "cpu_seconds": cpu() - c0, "out": out}


def run_ours(params: Params, root: Path, out: Path) -> dict:
    shutil.rmtree(out, ignore_errors=True)
    run = timed(extract_frames, params, root, root / params.data.annotations, out)
    videos = pq.read_table(out / "videos.parquet")
    return {**run, "decoded": pc.sum(videos["num_frames"]).as_py(), "written": run.pop("out")["images"]}


def selection(frames_dir: Path) -> dict[str, list[int]]:
    """The distinct frames our run wrote, per video: what ffmpeg is asked to write."""
    index = pq.read_table(frames_dir / "index.parquet", columns=["video", "frame"])
    frames = (
        index.group_by(["video", "frame"])
        .aggregate([])
        .sort_by([("video", "ascending"), ("frame", "ascending")])
    )
    out: dict[str, list[int]] = {}
    for video, frame in zip(frames["video"].to_pylist(), frames["frame"].to_pylist()):
        out.setdefault(video, []).append(frame)
    return out


def select_expr(frames: list[int]) -> str:
    """``eq(n,a)+eq(n,b)+...`` as a balanced tree: ffmpeg's parser refuses a chain ~100 terms deep."""
    if len(frames) == 1:
        return f"eq(n\\,{frames[0]})"  # the comma is escaped for the filtergraph parser
    mid = len(frames) // 2
    return f"({select_expr(frames[:mid])}+{select_expr(frames[mid:])})"


def ffmpeg_cmd(source: Path, frames: list[int] | None, out_dir: Path, qscale: int, threads: int) -> list[str]:
    """Decode ``source`` and write ``frames`` as JPEGs; ``frames=None``: decode only, write nothing."""
    cmd = [
        "ffmpeg",
        "-nostdin",
        "-hide_banner",
        "-loglevel",
        "error",
        "-threads",
        str(threads),
        "-i",
        str(source),
        "-an",
        "-sn",
    ]
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


def run_ffmpeg(
    root: Path,
    chosen: dict[str, list[int]],
    out: Path,
    workers: int,
    qscale: int,
    threads: int,
    decode_only: bool = False,
) -> dict:
    """One ffmpeg per video, ``workers`` at a time; ``threads`` 0 is ffmpeg's default (one per core)."""
    shutil.rmtree(out, ignore_errors=True)
    jobs = []
    for video, frames in chosen.items():
        (out / video).mkdir(parents=True)
        jobs.append(
            ffmpeg_cmd(root / "videos" / video, None if decode_only else frames, out / video, qscale, threads)
        )

    def run_all() -> None:
        with ThreadPoolExecutor(max_workers=workers) as pool:
            list(pool.map(lambda cmd: subprocess.run(cmd, check=True), jobs))

    run = timed(run_all)
    del run["out"]
    return {**run, "written": sum(1 for _ in out.rglob("*.jpg"))}


def jpeg_quality_check(
    root: Path, ours: Path, theirs: Path, chosen: dict[str, list[int]], n: int = 40
) -> dict:
    """Mean file size and PSNR against the decoded frame, for the first ``n`` written frames of each tool."""
    sizes: dict[str, list[int]] = {"ours": [], "ffmpeg": []}
    psnr: dict[str, list[float]] = {"ours": [], "ffmpeg": []}
    video = next(v for v, f in chosen.items() if len(f) >= n)
    with av.open(str(root / "videos" / video)) as c:
        wanted = set(chosen[video][:n])
        decoded = {k: f.to_ndarray(format="rgb24") for k, f in enumerate(c.decode(video=0)) if k in wanted}
    for i, k in enumerate(chosen[video][:n]):
        for tool, path in (
            ("ours", ours / "images" / video[:-4] / f"{k:06d}.jpg"),
            ("ffmpeg", theirs / video / f"{i:06d}.jpg"),
        ):
            sizes[tool].append(path.stat().st_size)
            err = np.mean((np.asarray(Image.open(path).convert("RGB"), np.float64) - decoded[k]) ** 2)
            psnr[tool].append(10 * np.log10(255**2 / max(err, 1e-9)))
    return {
        tool: {
            "mean_bytes": round(float(np.mean(sizes[tool]))),
            "psnr_db": round(float(np.mean(psnr[tool])), 2),
        }
        for tool in sizes
    }


def cpu_model() -> str:
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        if line.startswith("model name"):
            return line.split(":", 1)[1].strip()
    return platform.processor()


def main() -> None:
    ap = argparse.ArgumentParser(allow_abbrev=False, description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", type=Path, default=REPO / "bench_out" / "extract_frames")
    ap.add_argument("--workers", type=int, default=2, help="parallel processes, for both tools")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--videos", type=int, default=0, help="videos per anomaly class and split (default 2)")
    ap.add_argument(
        "--qscale", type=int, default=1, help="ffmpeg -q:v, 1 to 31 (lower = better, bigger files)"
    )
    ap.add_argument("--json", type=Path, help="append the result as one JSON line")
    args = ap.parse_args()
    if shutil.which("ffmpeg") is None:
        sys.exit("this benchmark compares against the ffmpeg command-line tool: install ffmpeg")
    logging.basicConfig(level=logging.WARNING)

    params = bench_params(args.out.resolve(), args.workers, args.videos)
    root = ensure_dataset(params)
    ours_dir = args.out / "frames_ours"
    chosen: dict[str, list[int]] = {}
    # ffmpeg as users run it (decoder threads: one per core), single-threaded like our decoders,
    # and decoding only (no select, no JPEG): the floor any tool that decodes every frame pays.
    tools = {
        "ours": None,
        "ffmpeg": (0, False),
        "ffmpeg_threads1": (1, False),
        "ffmpeg_decode_only": (1, True),
    }
    runs: dict[str, list[dict]] = {tool: [] for tool in tools}
    for r in range(args.repeats):
        order = list(tools)[r % len(tools) :] + list(tools)[: r % len(tools)]  # rotate: no tool always first
        for tool in order if chosen else list(tools):  # the first run is ours: it picks ffmpeg's frames
            if tool == "ours":
                runs[tool].append(run_ours(params, root, ours_dir))
                chosen = chosen or selection(ours_dir)
            else:
                threads, decode_only = tools[tool]
                runs[tool].append(
                    run_ffmpeg(
                        root,
                        chosen,
                        args.out / f"frames_{tool}",
                        args.workers,
                        args.qscale,
                        threads,
                        decode_only,
                    )
                )
            print(
                f"repeat {r}: {tool} {runs[tool][-1]['seconds']:.2f}s wall, "
                f"{runs[tool][-1]['cpu_seconds']:.2f}s cpu",
                file=sys.stderr,
            )

    decoded, written = runs["ours"][0]["decoded"], runs["ours"][0]["written"]
    assert all(run["written"] == written for tool in ("ffmpeg", "ffmpeg_threads1") for run in runs[tool]), (
        "ffmpeg wrote a different number of frames"
    )
    version = subprocess.run(["ffmpeg", "-version"], check=True, capture_output=True, text=True).stdout
    result = {
        "cpu": cpu_model(),
        "cores": os.cpu_count(),
        "workers": args.workers,
        "repeats": args.repeats,
        "ffmpeg_version": version.split("\n")[0],
        "pyav": av.__version__,
        "videos": len(chosen),
        "decoded_frames": decoded,
        "written_frames": written,
        "qscale": args.qscale,
        "jpeg": jpeg_quality_check(root, ours_dir, args.out / "frames_ffmpeg", chosen),
        "load_avg_1min_at_end": os.getloadavg()[0],
    }
    for tool, tool_runs in runs.items():
        wall = sorted(run["seconds"] for run in tool_runs)
        cpu = sorted(run["cpu_seconds"] for run in tool_runs)
        result[tool] = {
            "best_s": round(wall[0], 3),
            "median_s": round(statistics.median(wall), 3),
            "decoded_fps": round(decoded / wall[0]),
            "written_fps": round(min(run["written"] for run in tool_runs) / wall[0], 1),
            "decoded_fps_median": round(decoded / statistics.median(wall)),
            "cpu_s_best": round(cpu[0], 3),
            "decoded_per_cpu_s": round(decoded / cpu[0]),
        }
    for tool in tools:
        if tool != "ours":
            result[f"ours_over_{tool}"] = {
                "best": round(result[tool]["best_s"] / result["ours"]["best_s"], 3),
                "median": round(result[tool]["median_s"] / result["ours"]["median_s"], 3),
                "cpu": round(result[tool]["cpu_s_best"] / result["ours"]["cpu_s_best"], 3),
            }
    line = json.dumps(result)
    print(line)
    if args.json:
        with args.json.open("a") as f:
            f.write(line + "\n")


if __name__ == "__main__":
    main()
