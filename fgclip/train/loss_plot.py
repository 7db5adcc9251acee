"""The training losses as a PNG: the plot `dvc plots show` renders (offline: no Vega) and MLflow keeps.

Matplotlib's object API with the Agg canvas (no pyplot, no GUI backend). The
first steps' losses are tens of times the later ones, so the axis is logarithmic:
on a linear one the step-1 spike flattens the rest, and the region-loss gate
(``train.health.region_loss_max``, drawn with the step it is checked by) vanishes.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path

from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

from fgclip.atomic import atomic_path
from fgclip.config import HealthConfig

# One fixed colour per series, so a curve keeps its colour from run to run.
SERIES = {"loss": "black", "loss_global": "tab:blue", "loss_region": "tab:orange", "loss_hardneg": "tab:green"}
GATE_COLOUR = "tab:red"


def write_loss_png(path: Path, history: Sequence[Mapping[str, float]], gate: HealthConfig) -> None:
    """Each loss of ``history`` (rows of ``step`` and the loss columns) against the step, and the gate."""
    fig = Figure(figsize=(7, 4.5), dpi=100)
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    steps = [row["step"] for row in history]
    for name, colour in SERIES.items():
        values = [row.get(name) for row in history]
        # A loss that is off (weight 0, no hard negatives) is all zeros: nothing to draw on a log axis.
        if any(v is not None and v > 0 for v in values):
            ax.plot(steps, values, label=name, color=colour, linewidth=1.2 if name == "loss" else 1.0)
    ax.set_yscale("log", nonpositive="mask")
    by_step = min(gate.region_loss_by_step, steps[-1]) if steps else gate.region_loss_by_step
    ax.axhline(gate.region_loss_max, color=GATE_COLOUR, linestyle="--", linewidth=1,
               label=f"region-loss gate {gate.region_loss_max:g} (mean of {gate.region_loss_window} steps "
                     f"by step {by_step})")  # fmt: skip
    ax.axvline(by_step, color=GATE_COLOUR, linestyle=":", linewidth=1)
    ax.set(xlabel="optimizer step", ylabel="loss (log scale)", title="Training losses")
    ax.grid(True, which="major", alpha=0.3)
    ax.legend(loc="best", fontsize="small")
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png")
