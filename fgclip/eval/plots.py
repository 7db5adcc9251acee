"""The frame-level ROC curves of the evaluated models as a PNG (for the MLflow run's artefacts).

Matplotlib's object API with the Agg canvas: no pyplot, so no global figure
state and no GUI backend is ever selected, whatever ``MPLBACKEND`` says.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path

from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

from fgclip.atomic import atomic_path
from fgclip.eval.protocol import VideoScores, roc_points


def write_roc_png(
    path: Path, scored: Mapping[str, Sequence[VideoScores]], metrics: Mapping[str, Mapping] | None = None
) -> None:
    """One ROC curve per model (legend with its frame AUC when ``metrics`` has it) and the chance line."""
    fig = Figure(figsize=(5, 5), dpi=100)
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    ax.plot([0, 1], [0, 1], linestyle="--", color="grey", linewidth=1, label="chance")
    for name, videos in scored.items():
        points = roc_points(videos)
        auc = (metrics or {}).get(name, {}).get("frame_auc")
        ax.plot(points["fpr"], points["tpr"], label=name if auc is None else f"{name} (AUC {auc:.4f})")
    ax.set(xlim=(0, 1), ylim=(0, 1.01), xlabel="false positive rate", ylabel="true positive rate")
    ax.set_title("Frame-level ROC (UCF-Crime protocol)")
    ax.legend(loc="lower right")
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png")
