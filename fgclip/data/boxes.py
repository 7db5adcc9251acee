"""Stage ``validate_boxes``: check every annotated box, write accepted rows as Parquet shards.

The annotation records are flattened into columns in one Python pass; every rule is
then a vectorized mask, applied in a fixed order so that each rejected row carries
the first rule it fails (``REASONS``). Candidate rows are:

- one per annotated keyframe of a region;
- for a normal training video with ``box_infos: []``: the virtual whole-frame box
  ``[0, 0, 1, 1]`` on each of its ``train`` frames inside the ``timestamps`` window,
  one row per (region, frame), ``virtual=True``. Normal test videos are evaluation
  data and yield no rows. A record with ``box_infos: []`` whose regions cannot be
  given frames (unknown or failed video, an anomalous video) yields one placeholder
  row per region (``frame`` null) so that it is counted and rejected, not lost;
- one per malformed part of the file (a whole record, or one keyframe entry).

Outputs under ``out``: ``part-NNNNN.parquet`` shards (zstd) listed in ``manifest.json``
(read shards through the manifest: ``rejects.parquet`` lives in the same directory),
and ``rejects.parquet``; the metrics JSON goes to ``metrics_path``.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import time
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from fgclip.config import BoxesConfig, Params
from fgclip.data.annotations import AnnotationRecord, Malformed, load_annotations
from fgclip.data.ucf import NORMAL_LABEL, VideoResolver

logger = logging.getLogger(__name__)

# Reject reasons in the order the rules are applied: a row gets the first one it fails.
REASONS = (
    "malformed",               # wrong shape in annotations.json (see annotations.py)
    "path_escapes_root",       # video field is absolute or has '..': never resolved, never opened
    "unknown_video",           # video field names no video of the split files / frame index
    "missing_boxes",           # an anomalous video's region has no box_infos at all
    "empty_caption",           # empty region or global caption
    "non_finite",              # NaN or infinite coordinate
    "out_of_range",            # a coordinate outside [0, 1] (beyond clip_tolerance when clipping)
    "inverted",                # x1 >= x2 or y1 >= y2, after clipping
    "too_small",               # area under boxes.min_area_frac of the frame
    "keyframe_out_of_range",   # frame < 0 or >= the decoded frame count
    "keyframe_not_extracted",  # no such frame in the index (or the video failed extraction)
)
_CODE = {reason: code for code, reason in enumerate(REASONS, start=1)}

ACCEPTED_SCHEMA = pa.schema([
    ("video", pa.string()), ("split", pa.string()), ("label", pa.string()), ("region", pa.int32()),
    ("region_caption", pa.string()), ("global_caption", pa.string()), ("frame", pa.int64()),
    ("x1", pa.float32()), ("y1", pa.float32()), ("x2", pa.float32()), ("y2", pa.float32()),
    ("frame_path", pa.string()), ("virtual", pa.bool_()),
])
REJECTS_SCHEMA = pa.schema([
    ("record", pa.int64()),  # position of the record in annotations.json
    ("video", pa.string()),  # the record's video field as written
    ("region", pa.int32()), ("frame", pa.int64()),
    ("x1", pa.float64()), ("y1", pa.float64()), ("x2", pa.float64()), ("y2", pa.float64()),
    ("virtual", pa.bool_()),
    ("raw", pa.string()),  # JSON text of a malformed entry
    ("reason", pa.string()), ("detail", pa.string()),
])
COORDS = ("x1", "y1", "x2", "y2")


class BoxAccountingError(RuntimeError):
    """Rows read != accepted + rejected: a row was lost or counted twice (a bug, never bad input)."""


def _records_table(records: list[AnnotationRecord], videos: pa.Table) -> pa.Table:
    """One row per record: its resolution to a video id, and that video's extraction facts."""
    resolver = VideoResolver(videos.column("video").to_pylist())
    resolved = [resolver.resolve(r.video) for r in records]
    table = pa.table({
        "rec": pa.array(np.arange(len(records), dtype=np.int64)),
        "video": pa.array([vid for vid, _ in resolved], pa.string()),
        "resolve_reason": pa.array([reason for _, reason in resolved], pa.string()),
        "n_regions": pa.array([len(r.region_captions) for r in records], pa.int64()),
        "has_boxes": pa.array([bool(r.box_infos) for r in records], pa.bool_()),
        "t0": pa.array([r.timestamps[0] if r.timestamps else None for r in records], pa.float64()),
        "t1": pa.array([r.timestamps[1] if r.timestamps else None for r in records], pa.float64()),
    })
    facts = videos.select(["video", "split", "label", "num_frames", "fps", "status"])
    return table.join(facts, "video", join_type="left outer").sort_by("rec")


def _keyframe_rows(records: list[AnnotationRecord]) -> dict[str, np.ndarray]:
    flat = [(i, r, kf.frame, *kf.bbox) for i, rec in enumerate(records)
            for r, kfs in enumerate(rec.box_infos) for kf in kfs]
    cols = np.array(flat, dtype=np.float64).reshape(-1, 7)
    n = len(cols)
    return {"rec": cols[:, 0].astype(np.int64), "region": cols[:, 1].astype(np.int64),
            "frame": cols[:, 2].astype(np.int64), **{c: cols[:, 3 + k] for k, c in enumerate(COORDS)},
            "virtual": np.zeros(n, bool), "placeholder": np.zeros(n, bool)}


def _virtual_rows(recs: pa.Table, index: pa.Table) -> dict[str, np.ndarray]:
    """Whole-frame boxes of normal training videos without boxes, plus placeholders for the unusable."""
    no_boxes = pc.invert(recs["has_boxes"])
    normal = pc.fill_null(pc.equal(recs["label"], NORMAL_LABEL), False)
    usable = pc.and_(no_boxes, pc.and_(normal, pc.and_(
        pc.fill_null(pc.equal(recs["split"], "train"), False), pc.fill_null(pc.equal(recs["status"], "ok"), False))))
    test_normal = pc.and_(normal, pc.fill_null(pc.equal(recs["split"], "test"), False))

    train = index.filter(pc.equal(index["purpose"], "train")).select(["video", "frame", "timestamp"])
    cand = recs.filter(usable).select(["rec", "video", "n_regions", "t0", "t1", "fps"])
    pairs = cand.join(train, "video", join_type="inner")
    tol = pc.divide(0.5, pairs["fps"])  # half a frame: the window is in seconds, frames are instants
    inside = pc.and_(
        pc.fill_null(pc.greater_equal(pairs["timestamp"], pc.subtract(pairs["t0"], tol)), True),
        pc.fill_null(pc.less_equal(pairs["timestamp"], pc.add(pairs["t1"], tol)), True),
    )
    pairs = pairs.filter(inside).sort_by([("rec", "ascending"), ("frame", "ascending")])

    # A (record, frame) pair becomes one row per region of the record.
    counts = pairs["n_regions"].to_numpy()
    rec = np.repeat(pairs["rec"].to_numpy(), counts)
    frame = np.repeat(pairs["frame"].to_numpy(), counts)
    starts = np.repeat(np.cumsum(counts) - counts, counts)
    region = np.arange(len(rec)) - starts

    # Records without boxes that got no frame at all: one placeholder row per region.
    got = np.zeros(recs.num_rows, bool)
    got[pairs["rec"].to_numpy()] = True
    lost = no_boxes.to_numpy(zero_copy_only=False) & ~got & ~test_normal.to_numpy(zero_copy_only=False)
    lost_recs = np.flatnonzero(lost)
    lost_counts = recs["n_regions"].to_numpy()[lost_recs]
    p_rec = np.repeat(lost_recs, lost_counts)
    p_region = np.arange(len(p_rec)) - np.repeat(np.cumsum(lost_counts) - lost_counts, lost_counts)

    n_v, n_p = len(rec), len(p_rec)
    ones, zeros = np.ones(n_v + n_p), np.zeros(n_v + n_p)
    return {"rec": np.concatenate([rec, p_rec]), "region": np.concatenate([region, p_region]),
            "frame": np.concatenate([frame, np.full(n_p, -1, np.int64)]),
            "x1": zeros, "y1": zeros, "x2": ones, "y2": ones,
            "virtual": np.ones(n_v + n_p, bool), "placeholder": np.r_[np.zeros(n_v, bool), np.ones(n_p, bool)]}


def _candidates(records: list[AnnotationRecord], videos: pa.Table, index: pa.Table) -> pa.Table:
    """Every candidate row with its record's and video's facts and its frame's image path."""
    recs = _records_table(records, videos)
    parts = [_keyframe_rows(records), _virtual_rows(recs, index)]
    cols = {k: np.concatenate([p[k] for p in parts]) for k in parts[0]}
    order = np.lexsort((cols["frame"], cols["region"], cols["rec"]))
    rows = pa.table({k: v[order] for k, v in cols.items()})

    rec = rows["rec"].to_numpy()
    for name in ("video", "resolve_reason", "split", "label", "num_frames", "status"):
        rows = rows.append_column(name, recs[name].take(pa.array(rec)))
    captions = np.array([c for r in records for c in r.region_captions], dtype=object)
    offsets = np.concatenate([[0], np.cumsum(recs["n_regions"].to_numpy())])[:-1]
    rows = rows.append_column("region_caption", pa.array(
        captions[offsets[rec] + rows["region"].to_numpy()] if len(rec) else [], pa.string()))
    globals_ = np.array([r.global_caption for r in records], dtype=object)
    rows = rows.append_column("global_caption", pa.array(globals_[rec], pa.string()))
    rows = rows.append_column("ref", pa.array(np.array([r.video for r in records], dtype=object)[rec], pa.string()))
    rows = rows.append_column("record", pa.array(
        np.array([r.index for r in records], dtype=np.int64)[rec] if len(rec) else [], pa.int64()))

    frames = index.group_by(["video", "frame", "path"]).aggregate([])  # one path per extracted frame
    rows = rows.append_column("row", pa.array(np.arange(rows.num_rows, dtype=np.int64)))
    return rows.join(frames, ["video", "frame"], join_type="left outer").sort_by("row")


def _apply_rules(rows: pa.Table, cfg: BoxesConfig) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Reason code per row (0 = accepted), the clipped coordinates, and which rows were clipped."""
    n = rows.num_rows
    code = np.zeros(n, np.int8)

    def reject(mask: np.ndarray, reason: str) -> None:
        code[(code == 0) & mask] = _CODE[reason]

    def arr(name: str) -> np.ndarray:
        return rows[name].to_numpy(zero_copy_only=False)

    def is_(name: str, value: str) -> np.ndarray:
        return pc.fill_null(pc.equal(rows[name], value), False).to_numpy(zero_copy_only=False)

    placeholder = arr("placeholder")
    xyxy = np.stack([arr(c) for c in COORDS], axis=1) if n else np.zeros((0, 4))
    frame, num_frames = arr("frame"), pc.fill_null(rows["num_frames"], 0).to_numpy()
    ok_video = is_("status", "ok")

    reject(is_("resolve_reason", "path_escapes_root"), "path_escapes_root")
    reject(is_("resolve_reason", "unknown_video"), "unknown_video")
    reject(placeholder & ~is_("label", NORMAL_LABEL), "missing_boxes")
    empty = pc.or_(pc.equal(pc.utf8_trim_whitespace(rows["region_caption"]), ""),
                   pc.equal(pc.utf8_trim_whitespace(rows["global_caption"]), ""))
    reject(empty.to_numpy(zero_copy_only=False), "empty_caption")
    reject(~np.isfinite(xyxy).all(axis=1), "non_finite")
    lo, hi = (-cfg.clip_tolerance, 1 + cfg.clip_tolerance) if cfg.clip_overshoot else (0.0, 1.0)
    with np.errstate(invalid="ignore"):  # NaN rows are already rejected
        reject(((xyxy < lo) | (xyxy > hi)).any(axis=1), "out_of_range")
        clipped_xyxy = np.clip(xyxy, 0.0, 1.0)
        clipped = (clipped_xyxy != xyxy).any(axis=1)
        x1, y1, x2, y2 = clipped_xyxy.T
        reject((x1 >= x2) | (y1 >= y2), "inverted")
        reject((x2 - x1) * (y2 - y1) < cfg.min_area_frac, "too_small")
    reject(~placeholder & ((frame < 0) | (ok_video & (frame >= num_frames))), "keyframe_out_of_range")
    reject(~ok_video | placeholder | ~pc.is_valid(rows["path"]).to_numpy(zero_copy_only=False),
           "keyframe_not_extracted")
    return code, clipped_xyxy, clipped & (code == 0)


def _accepted(rows: pa.Table, code: np.ndarray, xyxy: np.ndarray) -> pa.Table:
    keep = code == 0
    kept = rows.filter(pa.array(keep))
    return pa.table({
        "video": kept["video"], "split": kept["split"], "label": kept["label"],
        "region": pc.cast(kept["region"], pa.int32()), "region_caption": kept["region_caption"],
        "global_caption": kept["global_caption"], "frame": kept["frame"],
        **{c: pa.array(xyxy[keep, k].astype(np.float32)) for k, c in enumerate(COORDS)},
        "frame_path": kept["path"], "virtual": kept["virtual"],
    }, schema=ACCEPTED_SCHEMA)


def _rejects(rows: pa.Table, code: np.ndarray, malformed: list[Malformed]) -> pa.Table:
    bad = rows.filter(pa.array(code != 0))
    placeholder = bad["placeholder"]
    names = np.array(("",) + REASONS, dtype=object)
    rule_rejects = pa.table({
        "record": bad["record"], "video": bad["ref"], "region": pc.cast(bad["region"], pa.int32()),
        "frame": pc.if_else(placeholder, pa.scalar(None, pa.int64()), bad["frame"]),
        **{c: pc.if_else(placeholder, pa.scalar(None, pa.float64()), bad[c]) for c in COORDS},
        "virtual": bad["virtual"], "raw": pa.nulls(bad.num_rows, pa.string()),
        "reason": pa.array(names[code[code != 0]], pa.string()), "detail": pa.nulls(bad.num_rows, pa.string()),
    }, schema=REJECTS_SCHEMA)
    malformed_rejects = pa.Table.from_pylist([
        {"record": m.index, "video": m.video, "region": m.region, "frame": None, "virtual": False,
         "raw": m.raw, "reason": "malformed", "detail": m.detail}
        for m in malformed
    ], schema=REJECTS_SCHEMA)
    return pa.concat_tables([malformed_rejects, rule_rejects]).sort_by(
        [("record", "ascending"), ("region", "ascending"), ("frame", "ascending")])


def _write_outputs(accepted: pa.Table, rejects: pa.Table, cfg: BoxesConfig, out: Path) -> dict:
    """Shards, manifest and rejects into a fresh directory that then replaces ``out``."""
    tmp = out.with_name(f".{out.name}.tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    shards = []
    for n, start in enumerate(range(0, accepted.num_rows, cfg.shard_rows)):
        part = accepted.slice(start, cfg.shard_rows)
        name = f"part-{n:05d}.parquet"
        pq.write_table(part, tmp / name, compression="zstd", row_group_size=cfg.row_group_rows)
        shards.append({"path": name, "rows": part.num_rows})
    manifest = {"shards": shards, "rows": sum(s["rows"] for s in shards)}
    (tmp / "manifest.json").write_text(json.dumps(manifest, indent=1) + "\n", encoding="utf-8")
    pq.write_table(rejects, tmp / "rejects.parquet", compression="zstd")
    shutil.rmtree(out, ignore_errors=True)
    os.replace(tmp, out)
    return manifest


def validate_boxes(params: Params, annotations: Path, frames_dir: Path, out: Path, metrics_path: Path) -> dict:
    """Run the stage; return the metrics (also written to ``metrics_path``)."""
    started = time.perf_counter()
    cfg, frames_dir, out, metrics_path = params.boxes, Path(frames_dir), Path(out), Path(metrics_path)
    records, malformed = load_annotations(Path(annotations))
    videos = pq.read_table(frames_dir / "videos.parquet")
    index = pq.read_table(frames_dir / "index.parquet", columns=["video", "frame", "timestamp", "path", "purpose"])

    rows = _candidates(records, videos, index)
    code, xyxy, clipped = _apply_rules(rows, cfg)
    accepted = _accepted(rows, code, xyxy)
    rejects = _rejects(rows, code, malformed)
    manifest = _write_outputs(accepted, rejects, cfg, out)

    counts = np.bincount(code, minlength=len(REASONS) + 1)
    by_reason = {reason: int(counts[_CODE[reason]]) for reason in REASONS}
    by_reason["malformed"] += len(malformed)
    metrics = {
        "read": rows.num_rows + len(malformed),
        "accepted": manifest["rows"],
        "rejected": rejects.num_rows,
        "by_reason": by_reason,
        "virtual": int(pc.sum(accepted["virtual"].cast(pa.int64())).as_py() or 0),
        "clipped": int(clipped.sum()),
        "records": len(records) + len({m.index for m in malformed if m.region is None}),
        "videos": pc.count_distinct(accepted["video"]).as_py(),
        "shards": len(manifest["shards"]),
    }
    # Counted from what was written, not from the masks: catches a row lost on the way out.
    if metrics["accepted"] + metrics["rejected"] != metrics["read"] or sum(by_reason.values()) != metrics["rejected"]:
        raise BoxAccountingError(
            f"validate_boxes: read {metrics['read']} rows but accepted {metrics['accepted']} + "
            f"rejected {metrics['rejected']} (by reason {by_reason})"
        )
    metrics_path.parent.mkdir(parents=True, exist_ok=True)
    tmp = metrics_path.with_name(f".{metrics_path.name}.tmp")
    tmp.write_text(json.dumps(metrics, indent=1) + "\n", encoding="utf-8")
    os.replace(tmp, metrics_path)

    reasons = ", ".join(f"{r}={n}" for r, n in by_reason.items() if n)
    logger.info(
        "validate_boxes: read %d, accepted %d (%d virtual, %d clipped), rejected %d (%s) -> %s in %.1fs",
        metrics["read"], metrics["accepted"], metrics["virtual"], metrics["clipped"], metrics["rejected"],
        reasons or "none", out, time.perf_counter() - started,
    )
    return {**metrics, "out": str(out)}
