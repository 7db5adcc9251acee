"""Box validation throughput: the columnar rule engine streamed over millions of raw boxes, on one core.

Everything runs on generated data under ``--out`` (made once, not timed):

- a frames directory at UCF-Crime's scale: 1,900 videos (1,610 train, 290 test) of 300 to
  14,000 frames, 1% failed; its ``index.parquet`` holds the train, eval and keyframe
  frames ``extract_frames`` would write (no images: validation never opens them);
- ``raw_boxes.parquet``: 10 million raw boxes (``RAW_BOX_SCHEMA``) in row groups of
  ``--row-group`` rows, with video names spelt three ways, 100,000 distinct region
  captions, 15% virtual boxes, 1% clipped overshoots, and 0.1-1% bad boxes of every
  reject reason (see ``BAD``) but ``duplicate_record`` (no row is marked ``duplicate_of``);
- ``annotations.json``: 25,000 records with 100,000 regions, the users' format.

Each measurement is a fresh subprocess that computes on one core (Arrow's CPU and I/O
pools at 1 thread, BLAS/OpenMP at 1; ``--pin N`` also pins it with ``taskset``), and
reports CPU seconds next to wall seconds, so a busy machine shows as wall > CPU:

- ``stream``: ``validate_box_batches`` over the first N rows of the Parquet file, read
  row group by row group, writing shards and rejects as it goes; timed from the first
  read to the last file closed. The CPU time spent reading the batches and inside the
  rule engine (``validate_batch``) is clocked apart; the rest is writing. Peak RSS
  (``VmHWM``) is reported with the peak before the first batch, to show memory does
  not grow with N.
- ``naive``: the same boxes through a straightforward per-row Python validator (a loop
  with ``if`` rules, dict/set lookups, ``Table.from_pylist`` and the same Parquet
  writes), against ours on the same rows in the same process. Its counts per reason
  are checked equal to ours.
- ``json``: the whole ``validate_boxes`` stage on ``annotations.json``, with its parts.

    python benchmarks/validate_boxes.py --repeats 3
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
ONE_THREAD = {
    "OMP_NUM_THREADS": "1",
    "OPENBLAS_NUM_THREADS": "1",
    "MKL_NUM_THREADS": "1",
    "ARROW_NUM_THREADS": "1",
    "ARROW_IO_THREADS": "1",
}
if "--child" in sys.argv:  # before numpy and pyarrow start their thread pools
    os.environ.update(ONE_THREAD)

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "benchmarks"))

from bench_common import UCF_CRIME_CLASSES, cpu_model

import fgclip.data.boxes as boxes_module
from fgclip.config import BoxesConfig, load_params
from fgclip.data.annotations import load_annotations
from fgclip.data.boxes import (
    RAW_BOX_SCHEMA,
    REASONS,
    FrameLookup,
    raw_boxes,
    validate_box_batches,
)
from fgclip.data.frames import snippet_middles, uniform_frames
from fgclip.data.layout import ACCEPTED_SCHEMA, INDEX_SCHEMA, REJECTS_SCHEMA, VIDEOS_SCHEMA
from fgclip.data.ucf import NORMAL_LABEL, VideoResolver, video_id

CLASSES = list(UCF_CRIME_CLASSES)
SPLITS = {"train": (810, 800), "test": (140, 150)}  # (anomalous, normal) videos, as in UCF-Crime
KEYFRAMES_PER_VIDEO = 64
REGION_CAPTIONS, GLOBAL_CAPTIONS = 100_000, 25_000
# Fraction of the raw boxes of each kind; the rest are good boxes on extracted keyframes.
BAD = {
    "malformed": 0.001,
    "path_escapes_root": 0.001,
    "unknown_video": 0.003,
    "missing_boxes": 0.002,
    "empty_caption": 0.005,
    "non_finite": 0.003,
    "out_of_range": 0.01,
    "inverted": 0.005,
    "too_small": 0.01,
    "keyframe_out_of_range": 0.003,
    "keyframe_not_extracted": 0.005,
}
VIRTUAL, CLIPPED = 0.15, 0.01
JSON_RECORDS, JSON_REGIONS = 25_000, 4


# --------------------------------------------------------------------------- data (not timed)


def make_frames_dir(out: Path, rng: np.random.Generator) -> None:
    """``videos.parquet`` and ``index.parquet`` as ``extract_frames`` writes them for UCF-Crime."""
    rows, index = [], {k: [] for k in INDEX_SCHEMA.names}
    numbers: dict[str, int] = {}
    for split, (n_anomalous, n_normal) in SPLITS.items():
        labels = [CLASSES[i % len(CLASSES)] for i in range(n_anomalous)] + [NORMAL_LABEL] * n_normal
        for label in labels:
            key = label if label != NORMAL_LABEL else f"{label}/{split}"
            numbers[key] = numbers.get(key, 0) + 1
            vid, n = video_id(label, numbers[key], split), int(rng.integers(300, 14_000))
            failed = rng.random() < 0.01
            rows.append(
                {
                    "video": vid,
                    "split": split,
                    "label": label,
                    "num_frames": None if failed else n,
                    "fps": 30.0,
                    "width": 320,
                    "height": 240,
                    "status": "failed" if failed else "ok",
                }
            )
            if failed:
                continue
            chosen = (
                {"train": uniform_frames(0, n - 1, 16)}
                if split == "train"
                else {"eval": snippet_middles(n, 16)}
            )
            if label != NORMAL_LABEL:  # frames 0 and 1 stay unextracted: keyframe_not_extracted uses 1
                chosen["keyframe"] = np.sort(rng.choice(np.arange(2, n), KEYFRAMES_PER_VIDEO, replace=False))
            for purpose, frames in chosen.items():
                index["video"] += [vid] * len(frames)
                index["split"] += [split] * len(frames)
                index["label"] += [label] * len(frames)
                index["frame"] += frames.tolist()
                index["timestamp"] += (frames / 30.0).tolist()
                index["path"] += [f"images/{vid[:-4]}/{k:06d}.jpg" for k in frames]
                index["purpose"] += [purpose] * len(frames)
    out.mkdir(parents=True, exist_ok=True)
    pq.write_table(pa.Table.from_pylist(rows, schema=VIDEOS_SCHEMA), out / "videos.parquet")
    pq.write_table(pa.table(index, schema=INDEX_SCHEMA), out / "index.parquet")


def _spellings(vid: str) -> list[str]:
    """The id, the file name, and the users' short name (``Abuse001.mp4``)."""
    name = vid.rsplit("/", 1)[1]
    return [vid, name, name.replace("_x264", "")]


def make_raw_boxes(path: Path, frames_dir: Path, n: int, row_group: int, rng: np.random.Generator) -> None:
    """``n`` raw boxes, record by record, with every kind of bad box mixed in (vectorized)."""
    videos = pq.read_table(frames_dir / "videos.parquet").to_pylist()
    index = pq.read_table(frames_dir / "index.parquet")
    anomalous = [k for k, v in enumerate(videos) if v["label"] != NORMAL_LABEL]
    normal_train = [
        k
        for k, v in enumerate(videos)
        if v["label"] == NORMAL_LABEL and v["split"] == "train" and v["status"] == "ok"
    ]
    ids = [v["video"] for v in videos]
    # Frames a box may sit on, per video: keyframes for anomalies, train frames for normals.
    usable = index.filter(pc.is_in(index["purpose"], pa.array(["keyframe", "train"])))
    usable = usable.filter(
        pc.or_(pc.equal(usable["purpose"], "keyframe"), pc.equal(usable["label"], NORMAL_LABEL))
    )
    number = pc.index_in(usable["video"], pa.array(ids)).to_numpy()
    order = np.argsort(number, kind="stable")
    usable_frames, number = usable["frame"].to_numpy()[order], number[order]
    start = np.searchsorted(number, np.arange(len(ids)))
    count = np.searchsorted(number, np.arange(len(ids)), side="right") - start
    num_frames = np.array([v["num_frames"] or 1000 for v in videos])

    kinds = ["good", "virtual", "clipped", *BAD]
    p = [VIRTUAL, CLIPPED, *BAD.values()]
    kind = rng.choice(len(kinds), n, p=[1 - sum(p), *p])
    is_ = {k: kind == i for i, k in enumerate(kinds)}

    # Records of 1-4 regions of 1-5 keyframes: about 8 boxes per record.
    record = np.sort(rng.integers(0, n // 8, n))
    region = rng.integers(0, 4, n).astype(np.int32)
    rec_video = np.array(anomalous)[rng.integers(0, len(anomalous), n // 8 + 1)]
    video = rec_video[record]
    video[is_["virtual"]] = np.array(normal_train)[
        rng.integers(0, len(normal_train), int(is_["virtual"].sum()))
    ]
    pick = start[video] + (rng.random(n) * np.maximum(count[video], 1)).astype(np.int64)
    frame = usable_frames[np.minimum(pick, len(usable_frames) - 1)]
    frame[is_["keyframe_out_of_range"]] = num_frames[video[is_["keyframe_out_of_range"]]] + 10
    frame[is_["keyframe_not_extracted"]] = 1

    x1, y1 = rng.uniform(0.0, 0.6, n), rng.uniform(0.0, 0.6, n)
    x2, y2 = x1 + rng.uniform(0.1, 0.4, n), y1 + rng.uniform(0.1, 0.4, n)
    for x in (x1, y1):
        x[is_["virtual"]] = 0.0
    for x in (x2, y2):
        x[is_["virtual"]] = 1.0
    x2[is_["clipped"]] = 1.01
    x1[is_["non_finite"]] = np.nan
    x2[is_["out_of_range"]] = 1.3
    x1[is_["inverted"]], x2[is_["inverted"]] = x2[is_["inverted"]], x1[is_["inverted"]]
    x2[is_["too_small"]], y2[is_["too_small"]] = x1[is_["too_small"]] + 0.03, y1[is_["too_small"]] + 0.03

    spelling = np.array(
        [s for vid in ids for s in _spellings(vid)] + ["../" + ids[0], "Nope001.mp4"], dtype=object
    )
    written = 3 * video + rng.integers(0, 3, n)
    written[is_["path_escapes_root"]] = len(spelling) - 2
    written[is_["unknown_video"]] = len(spelling) - 1
    region_captions = np.array(
        [f"a person in red does thing {k}" for k in range(REGION_CAPTIONS)] + [" "], dtype=object
    )
    caption = (record * 4 + region) % REGION_CAPTIONS
    caption[is_["empty_caption"]] = REGION_CAPTIONS
    global_captions = np.array(
        [f"an event happens on the street {k}" for k in range(GLOBAL_CAPTIONS)], dtype=object
    )

    no_frame = is_["malformed"] | is_["missing_boxes"]
    table = pa.table(
        {
            "record": pa.array(record),
            "video": pa.array(spelling[written], pa.string()),
            "region": pa.array(region),
            "region_caption": pa.array(region_captions[caption], pa.string()),
            "global_caption": pa.array(global_captions[record % GLOBAL_CAPTIONS], pa.string()),
            "frame": pa.array(frame, mask=no_frame),
            **{
                c: pa.array(x, mask=is_["malformed"] | is_["missing_boxes"])
                for c, x in zip(["x1", "y1", "x2", "y2"], (x1, y1, x2, y2))
            },
            "virtual": pa.array(is_["virtual"] | is_["missing_boxes"]),
            "raw": pa.array(np.where(is_["malformed"], '{"frame": 3}', None), pa.string()),
            "detail": pa.array(
                np.where(is_["malformed"], "keyframe must be an object with 'frame' and 'bbox'", None),
                pa.string(),
            ),
            "duplicate_of": pa.nulls(n, pa.int64()),  # raw boxes as given: no record is a later duplicate
        },
        schema=RAW_BOX_SCHEMA,
    )
    pq.write_table(table, path, row_group_size=row_group, compression="snappy")


def make_annotations(path: Path, frames_dir: Path, rng: np.random.Generator) -> None:
    """The users' JSON: anomalies with 4 regions of 3 keyframes, normals with a window (virtual boxes)."""
    videos = [v for v in pq.read_table(frames_dir / "videos.parquet").to_pylist() if v["split"] == "train"]
    index = pq.read_table(frames_dir / "index.parquet")
    keyframes = (
        index.filter(pc.equal(index["purpose"], "keyframe")).group_by("video").aggregate([("frame", "list")])
    )
    frames_of = dict(zip(keyframes["video"].to_pylist(), keyframes["frame_list"].to_pylist()))
    records = []
    for k in range(JSON_RECORDS):
        v = videos[int(rng.integers(0, len(videos)))]
        name = v["video"].rsplit("/", 1)[1].replace("_x264", "")
        captions = [f"a person in red does thing {k * JSON_REGIONS + r}" for r in range(JSON_REGIONS)]
        if v["label"] == NORMAL_LABEL:
            records.append(
                {
                    "video": name,
                    "global_caption": f"people walk {k}",
                    "region_captions": captions,
                    "box_infos": [],
                    "timestamps": [1.0, 200.0],
                }
            )
            continue
        frames = frames_of.get(v["video"], [2, 3, 4])
        box_infos = []
        for _ in range(JSON_REGIONS):
            box_infos.append([])
            for _ in range(3):
                x, y = rng.uniform(0, 0.6, 2)
                box_infos[-1].append(
                    {
                        "frame": int(frames[int(rng.integers(0, len(frames)))]),
                        "bbox": [round(x, 4), round(y, 4), round(x + 0.3, 4), round(y + 0.3, 4)],
                    }
                )
        records.append(
            {
                "video": name,
                "global_caption": f"an event happens {k}",
                "region_captions": captions,
                "box_infos": box_infos,
                "timestamps": None,
            }
        )
    path.write_text(json.dumps(records))


def ensure_data(out: Path, rows: int, row_group: int) -> dict[str, Path]:
    paths = {"frames": out / "frames", "raw": out / "raw_boxes.parquet", "json": out / "annotations.json"}
    stamp = out / "bench_config.json"
    wanted = json.dumps({"rows": rows, "row_group": row_group, "bad": BAD, "raw": RAW_BOX_SCHEMA.names})
    if not (stamp.is_file() and stamp.read_text() == wanted and all(p.exists() for p in paths.values())):
        print(f"generating {rows:,} raw boxes under {out} (not timed) ...", file=sys.stderr)
        shutil.rmtree(out, ignore_errors=True)
        rng = np.random.default_rng(0)
        make_frames_dir(paths["frames"], rng)
        make_raw_boxes(paths["raw"], paths["frames"], rows, row_group, rng)
        make_annotations(paths["json"], paths["frames"], rng)
        stamp.write_text(wanted)
    return paths


# --------------------------------------------------------------------------- the naive validator


def naive_validate(
    rows: list[dict], videos: list[dict], extracted: dict[tuple[str, int], str], cfg: BoxesConfig, out: Path
) -> dict:
    """What users write: one loop, one ``if`` per rule, one dict per output row."""
    facts = {v["video"]: v for v in videos}
    resolver = VideoResolver(list(facts))
    resolved: dict[str, tuple] = {}  # memoized like ours: the loop, not the name matching, is measured
    lo, hi = (-cfg.clip_tolerance, 1 + cfg.clip_tolerance) if cfg.clip_overshoot else (0.0, 1.0)
    accepted, rejects = [], []
    for r in rows:
        reason, box = None, (r["x1"], r["y1"], r["x2"], r["y2"])
        ref = r["video"]
        if ref not in resolved:
            resolved[ref] = resolver.resolve(ref) if ref is not None else (None, "unknown_video")
        vid, why = resolved[ref]
        v = facts.get(vid)
        ok = v is not None and v["status"] == "ok"
        placeholder = r["frame"] is None
        if r["raw"] is not None:
            reason = "malformed"
        elif why is not None:
            reason = why
        elif r["duplicate_of"] is not None:
            reason = "duplicate_record"
        elif placeholder and v["label"] != NORMAL_LABEL:
            reason = "missing_boxes"
        elif not (r["region_caption"] or "").strip() or not (r["global_caption"] or "").strip():
            reason = "empty_caption"
        elif not placeholder and not all(c is not None and math.isfinite(c) for c in box):
            reason = "non_finite"
        elif not placeholder and any(c < lo or c > hi for c in box):
            reason = "out_of_range"
        else:
            if not placeholder:
                box = tuple(min(max(c, 0.0), 1.0) for c in box)
            if not placeholder and (box[0] >= box[2] or box[1] >= box[3]):
                reason = "inverted"
            elif not placeholder and (box[2] - box[0]) * (box[3] - box[1]) < cfg.min_area_frac:
                reason = "too_small"
            elif not placeholder and (r["frame"] < 0 or (ok and r["frame"] >= v["num_frames"])):
                reason = "keyframe_out_of_range"
            elif not ok or placeholder or (vid, r["frame"]) not in extracted:
                reason = "keyframe_not_extracted"
        if reason is None:
            accepted.append(
                {
                    "video": vid,
                    "split": v["split"],
                    "label": v["label"],
                    "region": r["region"],
                    "region_caption": r["region_caption"],
                    "global_caption": r["global_caption"],
                    "frame": r["frame"],
                    "x1": box[0],
                    "y1": box[1],
                    "x2": box[2],
                    "y2": box[3],
                    "frame_path": extracted[(vid, r["frame"])],
                    "virtual": r["virtual"],
                }
            )
        else:
            rejects.append(
                {
                    **{
                        k: r[k]
                        for k in (
                            "record",
                            "video",
                            "region",
                            "frame",
                            "x1",
                            "y1",
                            "x2",
                            "y2",
                            "virtual",
                            "raw",
                            "detail",
                        )
                    },
                    "reason": reason,
                }
            )
    out.mkdir(parents=True, exist_ok=True)
    table = pa.Table.from_pylist(accepted, schema=ACCEPTED_SCHEMA)
    for k in range(0, max(table.num_rows, 1), cfg.shard_rows):
        pq.write_table(
            table.slice(k, cfg.shard_rows),
            out / f"part-{k // cfg.shard_rows:05d}.parquet",
            compression="zstd",
            row_group_size=cfg.row_group_rows,
        )
    pq.write_table(
        pa.Table.from_pylist(rejects, schema=REJECTS_SCHEMA), out / "rejects.parquet", compression="zstd"
    )
    by_reason = {reason: 0 for reason in REASONS}
    for r in rejects:
        by_reason[r["reason"]] += 1
    return {"accepted": table.num_rows, "by_reason": by_reason}


# --------------------------------------------------------------------------- children (one core)


def _cpu() -> float:
    return time.process_time()  # user + system, all threads of this process


def _rss_mib() -> float:
    """Peak RSS of this process so far. VmHWM, not ru_maxrss: a child's ru_maxrss starts at its
    parent's RSS (Linux keeps it across fork and exec), which would hide what the child used."""
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith("VmHWM:")) / 1024


def _batches(raw: Path, rows: int):
    """The first ``rows`` rows of the file, one row group at a time.

    Strings the file stores dictionary-encoded are read as dictionaries (the engine then
    resolves each distinct video spelling once). Region captions, one per region, overflow
    a row group's dictionary page and are stored plain: reading them as a dictionary
    would hash every value, which costs more than it saves.
    """
    f = pq.ParquetFile(raw, read_dictionary=["video", "global_caption", "raw", "detail"])
    left = rows
    for g in range(f.num_row_groups):
        if left <= 0:
            return
        batch = f.read_row_group(g).combine_chunks().to_batches()[0]
        yield batch.slice(0, left)
        left -= batch.num_rows


class Stopwatch:
    """Wall and CPU seconds spent inside some calls, summed."""

    def __init__(self):
        self.wall = self.cpu = 0.0

    def __enter__(self):
        self._t, self._c = time.perf_counter(), _cpu()

    def __exit__(self, *exc):
        self.wall += time.perf_counter() - self._t
        self.cpu += _cpu() - self._c


def child_stream(paths: dict[str, Path], rows: int, out: Path, cfg: BoxesConfig) -> dict:
    """One streaming run, with the time spent reading and in the rule engine clocked apart.

    The engine is clocked by wrapping the module's ``validate_batch``, which
    ``validate_box_batches`` calls once per batch; writing is what remains.
    """
    lookup = FrameLookup.from_frames_dir(paths["frames"])
    read, engine = Stopwatch(), Stopwatch()
    real = boxes_module.validate_batch

    def clocked_engine(*args):
        with engine:
            return real(*args)

    def clocked_batches():
        source = _batches(paths["raw"], rows)
        while True:
            with read:
                batch = next(source, None)
            if batch is None:
                return
            yield batch

    boxes_module.validate_batch = clocked_engine
    rss0 = _rss_mib()
    c0, t0 = _cpu(), time.perf_counter()
    counts = validate_box_batches(clocked_batches(), lookup, cfg, out)
    seconds, cpu = time.perf_counter() - t0, _cpu() - c0
    shutil.rmtree(out)
    n = counts["read"]
    return {
        "rows": n,
        "seconds": seconds,
        "cpu_seconds": cpu,
        "boxes_per_s": n / seconds,
        "boxes_per_cpu_s": n / cpu,
        "read_cpu_s": read.cpu,
        "engine_cpu_s": engine.cpu,
        "engine_s": engine.wall,
        "engine_boxes_per_s": n / engine.wall,
        "engine_boxes_per_cpu_s": n / engine.cpu,
        "write_and_rest_cpu_s": cpu - read.cpu - engine.cpu,
        "rss_before_mib": rss0,
        "peak_rss_mib": _rss_mib(),
        "accepted": counts["accepted"],
        "by_reason": counts["by_reason"],
    }


def child_naive(paths: dict[str, Path], rows: int, out: Path, cfg: BoxesConfig) -> dict:
    frames = paths["frames"]
    videos = pq.read_table(frames / "videos.parquet").to_pylist()
    index = pq.read_table(frames / "index.parquet", columns=["video", "frame", "path"])
    extracted = dict(
        zip(zip(index["video"].to_pylist(), index["frame"].to_pylist()), index["path"].to_pylist())
    )
    lookup = FrameLookup.from_frames_dir(frames)
    result = {}
    t0 = time.perf_counter()
    ours = validate_box_batches(_batches(paths["raw"], rows), lookup, cfg, out / "ours")
    result["ours"] = {"seconds": time.perf_counter() - t0}
    t0 = time.perf_counter()
    f = pq.ParquetFile(paths["raw"])  # reading is part of the naive run too
    groups = np.searchsorted(
        np.cumsum([f.metadata.row_group(g).num_rows for g in range(f.num_row_groups)]), rows
    )
    table = f.read_row_groups(range(groups + 1)).slice(0, rows)
    naive = naive_validate(table.to_pylist(), videos, extracted, cfg, out / "naive")
    result["naive"] = {"seconds": time.perf_counter() - t0}
    if (naive["accepted"], naive["by_reason"]) != (ours["accepted"], ours["by_reason"]):
        raise AssertionError(f"the naive validator disagrees with ours: {naive} != {ours}")
    shutil.rmtree(out)
    for who in ("ours", "naive"):
        result[who]["boxes_per_s"] = rows / result[who]["seconds"]
    return {"rows": rows, **result, "counts_equal": True}


def child_json(paths: dict[str, Path], out: Path, cfg: BoxesConfig) -> dict:
    t0 = time.perf_counter()
    records, malformed = load_annotations(paths["json"])
    t1 = time.perf_counter()
    videos = pq.read_table(paths["frames"] / "videos.parquet")
    index = pq.read_table(
        paths["frames"] / "index.parquet", columns=["video", "frame", "timestamp", "path", "purpose"]
    )
    lookup = FrameLookup(videos, index)
    raw = raw_boxes(records, malformed, videos, index)
    t2 = time.perf_counter()
    counts = validate_box_batches(raw.combine_chunks().to_batches(), lookup, cfg, out)
    t3 = time.perf_counter()
    shutil.rmtree(out)
    return {
        "records": len(records),
        "regions": sum(len(r.region_captions) for r in records),
        "boxes": counts["read"],
        "accepted": counts["accepted"],
        "virtual": counts["virtual"],
        "parse_s": t1 - t0,
        "flatten_s": t2 - t1,
        "validate_s": t3 - t2,
        "seconds": t3 - t0,
        "boxes_per_s": counts["read"] / (t3 - t0),
        "peak_rss_mib": _rss_mib(),
    }


def run_child(mode: str, args: argparse.Namespace, rows: int = 0) -> dict:
    cmd = [
        sys.executable,
        __file__,
        "--child",
        mode,
        "--rows",
        str(rows),
        "--out",
        str(args.out),
        "--raw-rows",
        str(args.raw_rows),
        "--row-group",
        str(args.row_group),
    ]
    if args.pin is not None:
        cmd = ["taskset", "-c", str(args.pin), *cmd]
    proc = subprocess.run(cmd, check=True, capture_output=True, text=True, env={**os.environ, **ONE_THREAD})
    return json.loads(proc.stdout.strip().splitlines()[-1])


def best_and_median(runs: list[dict], key: str = "seconds") -> dict:
    best = min(runs, key=lambda r: r[key])
    return {**best, "median_seconds": statistics.median(r[key] for r in runs), "repeats": len(runs)}


def main() -> None:
    ap = argparse.ArgumentParser(allow_abbrev=False, description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", type=Path, default=REPO / "bench_out" / "validate_boxes")
    ap.add_argument("--raw-rows", type=int, default=10_000_000, help="rows of the generated raw-box file")
    ap.add_argument("--row-group", type=int, default=250_000, help="rows per row group = per streamed batch")
    ap.add_argument("--sizes", type=int, nargs="+", default=[1_000_000, 3_000_000, 10_000_000])
    ap.add_argument("--naive-rows", type=int, default=200_000)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--pin", type=int, help="also pin each measurement to this core (taskset)")
    ap.add_argument("--json", type=Path, help="append the result as one JSON line")
    ap.add_argument("--child", choices=["stream", "naive", "json"], help=argparse.SUPPRESS)
    ap.add_argument("--rows", type=int, default=0, help=argparse.SUPPRESS)
    args = ap.parse_args()
    args.out = args.out.resolve()
    cfg = load_params(REPO / "params.yaml").boxes

    if args.child:
        pa.set_cpu_count(1)
        pa.set_io_thread_count(1)
        paths = ensure_data(args.out, args.raw_rows, args.row_group)
        work = args.out / f"work-{args.child}"
        result = {
            "stream": lambda: child_stream(paths, args.rows, work, cfg),
            "naive": lambda: child_naive(paths, args.rows, work, cfg),
            "json": lambda: child_json(paths, work, cfg),
        }[args.child]()
        print(json.dumps(result))
        return

    ensure_data(args.out, args.raw_rows, args.row_group)
    result = {
        "cpu": cpu_model(),
        "cores": os.cpu_count(),
        "pinned_core": args.pin,
        "pyarrow": pa.__version__,
        "numpy": np.__version__,
        "row_group": args.row_group,
        "shard_rows": cfg.shard_rows,
        "row_group_rows": cfg.row_group_rows,
        "stream": {},
    }
    for rows in args.sizes:
        runs = [run_child("stream", args, rows) for _ in range(args.repeats)]
        result["stream"][str(rows)] = best_and_median(runs)
        best = result["stream"][str(rows)]
        print(
            f"stream {rows:,}: {best['boxes_per_s']:,.0f} boxes/s, engine {best['engine_boxes_per_s']:,.0f}",
            file=sys.stderr,
        )
    naive = [run_child("naive", args, args.naive_rows) for _ in range(args.repeats)]
    result["naive"] = {who: best_and_median([r[who] for r in naive]) for who in ("ours", "naive")}
    result["naive"]["rows"] = args.naive_rows
    result["ours_over_naive"] = result["naive"]["naive"]["seconds"] / result["naive"]["ours"]["seconds"]
    result["json"] = best_and_median([run_child("json", args) for _ in range(args.repeats)])
    result["load_avg_1min_at_end"] = os.getloadavg()[0]
    line = json.dumps(result)
    print(line)
    if args.json:
        with args.json.open("a") as f:
            f.write(line + "\n")


if __name__ == "__main__":
    main()
