"""The README's ablation table is the committed report's, figure for figure."""

from __future__ import annotations

import re
from pathlib import Path

from fgclip.ablation.report import readme_table

REPO = Path(__file__).resolve().parents[2]
BLOCK = re.compile(r"<!-- ablation:(\w+) -->\n(.*?)<!-- /ablation -->", re.DOTALL)


def test_every_ablation_table_in_the_readme_is_generated_from_its_report():
    blocks = BLOCK.findall((REPO / "README.md").read_text(encoding="utf-8"))
    assert [name for name, _ in blocks] == ["default"]
    for name, text in blocks:
        report = REPO / "reports" / "ablation" / name
        assert text == readme_table((report / "table.csv").read_text(encoding="utf-8")), (
            f"README's ablation:{name} table differs from {report}/table.csv: paste "
            f"fgclip.ablation.report.readme_table's output"
        )
        assert (report / "runs.csv").is_file()  # each figure's MLflow run
