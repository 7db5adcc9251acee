"""The real model under DDP with a rank that has no regions (2 gloo processes on CPU)."""

from __future__ import annotations

import pytest
from ddp_spawn import run_ranks
from model_ddp_model_worker import ddp_model_worker


@pytest.mark.timeout(180)
def test_a_rank_without_regions_trains_in_step_short_and_long_text() -> None:
    """Without regions a rank must still run every collective of the backward (the region
    gathers) and give DDP a gradient for every parameter (with long captions the short text
    path is used by region texts only): else "distributed collective mismatch", or DDP's
    "parameters that were not used in producing loss"."""
    reports = run_ranks(ddp_model_worker, deadline_s=150)
    for long_text in (False, True):
        assert reports[0][long_text]["replicas_equal"] and reports[1][long_text]["replicas_equal"]
        # Rank 0 trains on its regions and negatives; rank 1 contributes zeros only.
        assert all(region > 0 and hardneg > 0 for region, hardneg in reports[0][long_text]["losses"])
        assert all(region == 0 and hardneg == 0 for region, hardneg in reports[1][long_text]["losses"])
