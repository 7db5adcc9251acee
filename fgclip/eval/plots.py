"""The evaluation as PNGs: the plots `dvc plots show` renders (offline: no Vega) and MLflow keeps.

The ROC curves of the evaluated models, and the models side by side on the
headline metrics (the before/after of fine-tuning).

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


# The bars of the comparison, as (metrics key, label): each is a 0-1 score, higher is better.
COMPARED = (
    ("frame_auc", "frame AUC"),
    ("frame_ap", "frame AP"),
    ("region_top1", "region top-1"),
    ("hardneg_accuracy", "hard-neg. acc."),
    ("retrieval_r1", "caption→video R@1"),
)


def write_models_png(path: Path, metrics: Mapping[str, Mapping]) -> None:
    """Grouped bars: one group per headline metric, one bar per model that has it, value on top."""
    models = [name for name, m in metrics.items() if "frame_auc" in m]  # skipped models have no figures
    shown = [(key, label) for key, label in COMPARED if any(metrics[n].get(key) is not None for n in models)]
    fig = Figure(figsize=(8, 4.5), dpi=100)
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    width = 0.8 / max(len(models), 1)
    for i, name in enumerate(models):
        xs = [j + (i - (len(models) - 1) / 2) * width for j in range(len(shown))]
        values = [metrics[name].get(key) for key, _ in shown]
        bars = ax.bar([x for x, v in zip(xs, values) if v is not None], [v for v in values if v is not None],
                      width, label=name)  # fmt: skip
        ax.bar_label(bars, fmt="%.2f", fontsize="x-small", padding=1)
    ax.set_xticks(range(len(shown)), [label for _, label in shown])
    ax.set(ylim=(0, 1.08), ylabel="score (higher is better)", title="Models on the test split")
    ax.legend(loc="upper right", fontsize="small")
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png")
