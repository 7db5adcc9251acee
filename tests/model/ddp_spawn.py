"""Spawn a gloo worker on each rank and collect one report per rank, failing clearly, never hanging.

Shared by the DDP tests. A worker is ``target(rank, world, port, queue)`` and puts
``(rank, report)`` on the queue: a dict, with ``"error": traceback`` when it raised.
A rank still silent at the deadline fails the test with every thread's stack of that
rank (``faulthandler``) and the other ranks' reports: where it hung, not just that it did.
"""

from __future__ import annotations

import faulthandler
import queue as queue_module
import shutil
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import pytest
import torch.multiprocessing as mp
from model_ddp_worker import free_port


def run_ranks(target: Callable, deadline_s: float, world: int = 2) -> dict[int, dict]:
    """``{rank: report}`` of ``target`` on ``world`` spawned ranks.

    A worker that raised reports its traceback, one that died is named with its exit
    code, and one still running at the deadline is killed.
    """
    # spawn, not fork: forking a process whose torch thread pools already ran deadlocks.
    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    port = free_port()
    stacks = Path(tempfile.mkdtemp(prefix="ddp-stacks-"))
    # Each rank dumps its stacks a little before the deadline, while it is still alive: a wall
    # clock time, since a spawned rank starts counting only after its imports (seconds, loaded).
    dump_at = time.time() + max(1.0, deadline_s - 5)
    workers = [
        ctx.Process(target=_traced, args=(target, stacks / f"rank{rank}.txt", dump_at, rank, world, port, queue))
        for rank in range(world)
    ]
    for w in workers:
        w.start()
    deadline = time.monotonic() + deadline_s
    results: dict[int, dict] = {}
    try:
        while len(results) < len(workers):
            try:
                rank, report = queue.get(timeout=0.5)
                results[rank] = report
                continue
            except queue_module.Empty:
                pass
            died = [r for r, w in enumerate(workers) if r not in results and w.exitcode not in (None, 0)]
            if died:
                pytest.fail(f"DDP rank(s) {died} died: exit codes {[w.exitcode for w in workers]}")
            if time.monotonic() > deadline:
                silent = sorted(set(range(len(workers))) - set(results))
                pytest.fail(f"DDP ranks hung: no report from rank(s) {silent} in {deadline_s} s\n"
                            + _hang_details(silent, results, stacks))  # fmt: skip
        for w in workers:
            w.join(timeout=max(1.0, deadline - time.monotonic()))
        assert [w.exitcode for w in workers] == [0] * world, "a DDP worker did not exit cleanly"
    finally:
        for w in workers:
            if w.is_alive():
                w.kill()
                w.join(timeout=5)
        shutil.rmtree(stacks, ignore_errors=True)
    errors = {r: report["error"] for r, report in results.items() if "error" in report}
    assert not errors, "\n".join(f"rank {r}:\n{e}" for r, e in errors.items())
    return results


def _traced(target: Callable, stack_file: Path, dump_at: float, *args) -> None:
    """``target(*args)``, with every thread's stack written to ``stack_file`` if still running at ``dump_at`` (epoch s)."""
    with stack_file.open("w") as out:
        faulthandler.dump_traceback_later(max(0.1, dump_at - time.time()), file=out)
        try:
            target(*args)
        finally:
            faulthandler.cancel_dump_traceback_later()


def _hang_details(silent: list[int], results: dict[int, dict], stacks: Path) -> str:
    parts = [f"rank {r} reported: {report}" for r, report in sorted(results.items())]
    for rank in silent:
        path = stacks / f"rank{rank}.txt"
        if path.is_file():
            dumped = path.read_text() or "(none: no dump yet)"
        else:
            dumped = "(none: it never started the worker function; it hung spawning or importing)"
        parts.append(f"rank {rank}'s stacks before the deadline:\n{dumped}")
    return "\n".join(parts)
