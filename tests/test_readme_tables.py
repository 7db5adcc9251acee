"""The README's tables of figures are the committed results', figure for figure."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from fgclip import readme_tables

REPO = Path(__file__).resolve().parents[1]


def test_every_table_in_the_readme_is_generated_from_the_committed_results():
    readme = (REPO / "README.md").read_text(encoding="utf-8")
    blocks = [(kind, name) for _, kind, name, _, _ in readme_tables.BLOCK.findall(readme)]
    assert blocks == [("results", "sample"), ("ablation", "default")]
    _, changed = readme_tables.generated(readme, REPO)
    assert not changed, f"README tables {changed} differ from the committed results: python -m fgclip.readme_tables --write"
    assert readme_tables.main(["--readme", str(REPO / "README.md")]) == 0
    assert (REPO / "reports" / "ablation" / "default" / "runs.csv").is_file()  # each figure's MLflow run


def test_a_changed_figure_is_caught_and_rewritten(tmp_path: Path):
    (tmp_path / "metrics").mkdir()
    evaluation = json.loads((REPO / "metrics" / "eval.json").read_text(encoding="utf-8"))
    (tmp_path / "metrics" / "train.json").write_text(json.dumps({"steps": 500}))
    (tmp_path / "metrics" / "eval.json").write_text(json.dumps(evaluation))
    table = readme_tables.results_table(evaluation, 500)
    readme = tmp_path / "README.md"
    readme.write_text(f"intro\n<!-- results:sample -->\n{table}<!-- /results -->\nend\n")
    assert readme_tables.main(["--readme", str(readme)]) == 0

    evaluation["finetuned"]["frame_auc"] = 0.83125  # a re-run moved the headline
    (tmp_path / "metrics" / "eval.json").write_text(json.dumps(evaluation))
    assert readme_tables.main(["--readme", str(readme)]) == 1
    assert readme_tables.main(["--readme", str(readme), "--write"]) == 0
    text = readme.read_text()
    assert "**0.8313**" in text and text.startswith("intro\n") and text.endswith("<!-- /results -->\nend\n")


def test_half_way_figures_round_up_as_the_tables_were_written():
    assert readme_tables._num(0.3125) == "0.313" and readme_tables._num(0.4275) == "0.428"
    assert readme_tables._num(None) == "–"


def test_an_unknown_block_is_an_error():
    with pytest.raises(ValueError, match="no results table"):
        readme_tables.generated("<!-- results:xd -->\nold\n<!-- /results -->\n", REPO)
