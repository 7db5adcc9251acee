"""The loss plot `dvc plots show` renders: a real PNG of what the history holds."""

from __future__ import annotations

from pathlib import Path

from matplotlib.image import imread

from fgclip.config import HealthConfig
from fgclip.train import loss_plot


def _history(steps: int, hardneg: float) -> list[dict[str, float]]:
    return [{"step": s, "loss": 30.0 / s, "loss_global": 3.0 / s, "loss_region": 20.0 / s, "loss_hardneg": hardneg}
            for s in range(1, steps + 1)]  # fmt: skip


def test_each_loss_its_colour_on_a_log_axis_with_the_gate(tmp_path: Path, monkeypatch) -> None:
    drawn = {}
    real = loss_plot.Figure.savefig

    def keep(fig, *args, **kwargs):
        [ax] = fig.axes
        drawn.update(scale=ax.get_yscale(), lines={line.get_label(): line.get_color() for line in ax.get_lines()})
        return real(fig, *args, **kwargs)

    monkeypatch.setattr(loss_plot.Figure, "savefig", keep)
    out = tmp_path / "plots" / "loss.png"
    # The hard-negative loss is off (all zeros): nothing of it to draw on a log axis.
    loss_plot.write_loss_png(out, _history(40, 0.0), HealthConfig(region_loss_max=0.5, region_loss_by_step=500))
    assert imread(out).shape[:2] == (450, 700)
    assert drawn["scale"] == "log"
    lines = drawn["lines"]
    curves = {k: v for k, v in lines.items() if k.startswith("loss")}
    assert curves == {k: loss_plot.SERIES[k] for k in ("loss", "loss_global", "loss_region")}
    assert len(set(curves.values())) == 3
    # The gate's label names the step it is checked by: the run's last, when shorter than by_step.
    [gate] = [k for k in lines if k.startswith("region-loss gate")]
    assert "0.5" in gate and "by step 40" in gate


def test_an_empty_history_still_writes_a_plot(tmp_path: Path) -> None:
    out = tmp_path / "loss.png"
    loss_plot.write_loss_png(out, [], HealthConfig())
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
