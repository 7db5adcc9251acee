"""The evaluation plots: the models side by side, skipped models and absent figures left out."""

from __future__ import annotations

from pathlib import Path

from matplotlib.image import imread

from fgclip.eval import plots


def test_models_plot_has_one_bar_per_model_and_figure(tmp_path: Path, monkeypatch) -> None:
    heights = {}
    real = plots.Figure.savefig

    def keep(fig, *args, **kwargs):
        [ax] = fig.axes
        for container in ax.containers:
            heights[container.get_label()] = [round(bar.get_height(), 4) for bar in container]
        return real(fig, *args, **kwargs)

    monkeypatch.setattr(plots.Figure, "savefig", keep)
    metrics = {
        "finetuned": {"frame_auc": 0.82, "frame_ap": 0.75, "region_top1": 0.7, "hardneg_accuracy": 0.9,
                      "retrieval_r1": 0.2},
        "untrained": {"frame_auc": 0.51, "frame_ap": 0.38, "region_top1": 0.05, "hardneg_accuracy": None,
                      "retrieval_r1": 0.25},
        "pretrained": {"skipped": "no pretrained CLIP given"},
    }  # fmt: skip
    out = tmp_path / "models.png"
    plots.write_models_png(out, metrics)
    assert imread(out).shape[:2] == (450, 800)
    assert heights == {"finetuned": [0.82, 0.75, 0.7, 0.9, 0.2], "untrained": [0.51, 0.38, 0.05, 0.25]}
