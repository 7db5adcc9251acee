"""The real model under DDP with a rank that has no regions (2 gloo processes on CPU)."""

from __future__ import annotations

import multiprocessing as mp
import queue as queue_mod

import pytest
from model_ddp_model_worker import ddp_model_worker
from model_ddp_worker import free_port


@pytest.mark.timeout(180)
def test_a_rank_without_regions_trains_in_step_short_and_long_text() -> None:
    """Without regions a rank must still run every collective of the backward (the region
    gathers) and give DDP a gradient for every parameter (with long captions the short text
    path is used by region texts only): else "distributed collective mismatch", or DDP's
    "parameters that were not used in producing loss"."""
    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    port = free_port()
    workers = [ctx.Process(target=ddp_model_worker, args=(rank, 2, port, queue)) for rank in range(2)]
    for w in workers:
        w.start()
    reports = {}
    try:
        for _ in workers:
            rank, report = queue.get(timeout=150)
            reports[rank] = report
    except queue_mod.Empty:
        pytest.fail(f"DDP ranks hung; reports so far: {reports}")
    finally:
        for w in workers:
            w.join(timeout=10)
            if w.is_alive():
                w.kill()
    for rank, report in reports.items():
        assert not isinstance(report, str), f"rank {rank} failed:\n{report}"
    for long_text in (False, True):
        assert reports[0][long_text]["replicas_equal"] and reports[1][long_text]["replicas_equal"]
        # Rank 0 trains on its regions and negatives; rank 1 contributes zeros only.
        assert all(region > 0 and hardneg > 0 for region, hardneg in reports[0][long_text]["losses"])
        assert all(region == 0 and hardneg == 0 for region, hardneg in reports[1][long_text]["losses"])
