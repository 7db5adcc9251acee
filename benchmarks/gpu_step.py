"""The training step's GPU measurements (issue 17) in one go, under a time budget.

Runs ``benchmarks/train_throughput.py`` once per configuration, each in its own
process (peak memory is per process) under its own timeout: ViT-B/16 and ViT-B/32
in bf16, eager vs SDPA attention, with and without ``torch.compile``,
``train.sync_every`` 1 vs 25; every process times the FG-CLIP step and plain CLIP
on the same images (the default row also FG-CLIP without hard negatives). Not the
full 2 x 2 x 2 x 2 grid: one knob at a time from today's default (SDPA, no compile,
sync every step), then everything on, then compile with eager attention, so the
whole set fits the budget. Rows that would overrun the budget are skipped, and say so.

Each result (or failure, timeout, skip) is one JSON line in ``OUT/gpu_step.jsonl``;
a table of the figures goes to stdout at the end. ``benchmarks/gpu_step.sh`` is the
entry point on a GPU machine (it finds the virtual environment first).

    python benchmarks/gpu_step.py --out bench_out --budget-s 450
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
BENCH = HERE / "train_throughput.py"

# (label, attn, compile, sync_every): the order is the order of importance.
ROWS = [
    ("default", "sdpa", False, 1),  # what train.* runs today
    ("eager", "eager", False, 1),  # transformers' eager attention, the step before 5.x's default
    ("sync25", "sdpa", False, 25),
    ("compile+sync25", "sdpa", True, 25),
    ("compile", "sdpa", True, 1),
    ("eager+compile+sync25", "eager", True, 25),
]
CONFIGS = ("vitb16", "vitb32")


def plan(steps: int, warmup: int, compile_warmup: int, configs=CONFIGS, device: str = "cuda") -> list[dict]:
    """Every run: its label, command-line options and timeout, most important first.

    The uncompiled rows of both configs, then the compiled ones row by row (both configs
    of a row before the next row): what the budget leaves out is the least telling.
    """
    runs = []
    order = [(row, config) for row in ROWS if not row[2] for config in configs]
    order += [(row, config) for row in ROWS if row[2] for config in configs]
    for (label, attn, comp, sync), config in order:
        timed = max(steps, sync)  # at least one host read inside the timed steps
        options = ["--config", config, "--device", device, "--attn", attn, "--sync-every", str(sync),
                   "--steps", str(timed), "--warmup", str(compile_warmup if comp else warmup)]  # fmt: skip
        if comp:
            options.append("--compile")
        options += ["--runs", "fgclip,fgclip_no_hardneg,clip" if label == "default" else "fgclip,clip"]
        runs.append({"run": f"{config}/{label}", "config": config, "label": label, "options": options,
                     "timeout_s": 200 if comp else 90})  # fmt: skip
    return runs


def run_one(python: str, spec: dict, timeout_s: float, extra: list[str]) -> dict:
    """One benchmark process; its JSON result, or why there is none."""
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "result.jsonl"
        cmd = [python, str(BENCH), *spec["options"], *extra, "--json", str(out)]
        started = time.perf_counter()
        # Its own process group: a timeout kills the benchmark and any compile workers it started.
        proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                                start_new_session=True)  # fmt: skip
        try:
            output, _ = proc.communicate(timeout=timeout_s)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            output, _ = proc.communicate()
            return {"status": "timeout", "timeout_s": round(timeout_s), "tail": output[-800:]}
        wall = round(time.perf_counter() - started, 1)
        if proc.returncode != 0 or not out.is_file():
            return {"status": "failed", "rc": proc.returncode, "wall_s": wall, "tail": output[-1500:]}
        return {"status": "ok", "wall_s": wall, **json.loads(out.read_text().splitlines()[-1])}


def _cell(entry: dict | None, key: str, fmt: str) -> str:
    if not entry or key not in entry:
        return "—"
    return format(entry[key], fmt)


def table(rows: list[dict]) -> str:
    head = ("| run | status | FG-CLIP videos/s | step ms | MFU | peak GiB | CLIP videos/s | CLIP MFU "
            "| FG-CLIP / CLIP | hard-neg cost |")  # fmt: skip
    lines = [head, "|" + "---|" * (head.count("|") - 1)]
    for row in rows:
        fg, clip = row.get("fgclip"), row.get("clip")
        lines.append(
            f"| {row['run']} | {row['status']} | {_cell(fg, 'videos_per_s', '.1f')} | {_cell(fg, 'step_ms', '.1f')}"
            f" | {_cell(fg, 'mfu', '.1%')} | {_cell(fg, 'peak_mem_gib', '.1f')} | {_cell(clip, 'videos_per_s', '.1f')}"
            f" | {_cell(clip, 'mfu', '.1%')} | {_cell(row, 'fgclip_vs_clip_images_per_s', '.2f')}"
            f" | {_cell(row, 'hardneg_step_cost', '.2f')} |"
        )
    return "\n".join(lines)


def main() -> int:
    ap = argparse.ArgumentParser(allow_abbrev=False, description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)  # fmt: skip
    ap.add_argument("--out", type=Path, default=Path(os.environ.get("OUT") or "bench_out"))
    ap.add_argument("--budget-s", type=float, default=450.0, help="all runs together (default 7.5 min)")
    ap.add_argument("--steps", type=int, default=20, help="timed steps per run (at least sync_every)")
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--compile-warmup", type=int, default=8, help="warm-up steps of compiled runs (recompiles)")
    ap.add_argument("--batch-size", type=int, default=8, help="videos per forward pass")
    ap.add_argument("--grad-accum", type=int, default=1)
    ap.add_argument("--only", default="", help="comma-separated run names or configs (vitb16, vitb16/default, ...)")
    ap.add_argument("--python", default=sys.executable)
    ap.add_argument("--configs", default=",".join(CONFIGS), help="model shapes (train_throughput's --config)")
    ap.add_argument("--device", default="cuda", help="cpu only to try the driver itself")
    args = ap.parse_args()

    args.out.mkdir(parents=True, exist_ok=True)
    results = args.out / "gpu_step.jsonl"
    extra = ["--batch-size", str(args.batch_size), "--grad-accum", str(args.grad_accum)]
    runs = plan(args.steps, args.warmup, args.compile_warmup, args.configs.split(","), args.device)
    if args.only:
        keep = set(args.only.split(","))
        runs = [r for r in runs if r["run"] in keep or r["config"] in keep or r["label"] in keep]
    deadline = time.monotonic() + args.budget_s
    rows = []
    print(f"gpu_step: {len(runs)} runs, budget {args.budget_s:.0f} s, results appended to {results}", flush=True)
    for spec in runs:
        left = deadline - time.monotonic()
        if left < 30:
            row = {"status": "skipped", "reason": f"budget: {max(left, 0):.0f} s left"}
        else:
            row = run_one(args.python, spec, min(spec["timeout_s"], left), extra)
        row = {"run": spec["run"], "options": " ".join(spec["options"] + extra), **row}
        rows.append(row)
        with results.open("a") as f:
            f.write(json.dumps(row) + "\n")
        fg = row.get("fgclip")
        print(f"  {spec['run']:<28} {row['status']:<8} {_cell(fg, 'videos_per_s', '.1f')} videos/s, "
              f"{_cell(fg, 'step_ms', '.1f')} ms, MFU {_cell(fg, 'mfu', '.1%')}", flush=True)  # fmt: skip
    print()
    print(table(rows))
    return 0 if any(r["status"] == "ok" for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
