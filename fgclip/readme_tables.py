"""The README's tables of figures, generated from the committed results, never typed by hand.

Each table sits between markers, ``<!-- results:sample -->`` ... ``<!-- /results -->``
(from ``metrics/eval.json``) or ``<!-- ablation:<grid> -->`` ... ``<!-- /ablation -->``
(from ``reports/ablation/<grid>/table.csv``). ``python -m fgclip.readme_tables``
checks that every block equals what the files give (a test runs the same check);
``--write`` rewrites the blocks after a re-run changed the results.
"""

from __future__ import annotations

import argparse
import json
import re
import sys
from collections.abc import Callable, Mapping
from decimal import ROUND_HALF_UP, Decimal
from pathlib import Path
from typing import Any

from fgclip.atomic import write_text_atomic
from fgclip.metric_keys import FINETUNED, PRETRAINED, UNTRAINED

BLOCK = re.compile(r"(<!-- (results|ablation):([\w-]+) -->\n)(.*?)(<!-- /\2 -->)", re.DOTALL)

# The results table's rows: (model key in eval.json, what the row says it is).
RESULT_ROWS = (
    (UNTRAINED, "untrained (same architecture, seeded random weights)"),
    (PRETRAINED, "pretrained stand-in CLIP, before fine-tuning"),
    (FINETUNED, "fine-tuned video FG-CLIP ({steps} steps)"),
)
CLASSES = ("Arson", "Explosion", "Fighting", "RoadAccidents")


def results_table(evaluation: Mapping[str, Any], steps: int) -> str:
    """The README's results table from ``metrics/eval.json`` (and the training's step count)."""
    header = ["model", "frame AUC [95% interval]", "AP [95% interval]", "AUC, anomalous videos only", *CLASSES,
              "region top-1", "hard-negative acc.", "caption→video R@1", "R@5"]  # fmt: skip
    lines = [_row(header), "|" + "---|" * len(header)]
    for key, label in RESULT_ROWS:
        m = evaluation[key]
        lo_auc, hi_auc = m["intervals"]["frame_auc"]
        lo_ap, hi_ap = m["intervals"]["frame_ap"]
        cells = [
            label.format(steps=steps),
            f"**{_num(m['frame_auc'], 4)}** [{_num(lo_auc)}, {_num(hi_auc)}]",
            f"{_num(m['frame_ap'], 4)} [{_num(lo_ap)}, {_num(hi_ap)}]",
            _num(m["anomalous_auc"], 4),
            *(_num(m["per_class_auc"].get(c)) for c in CLASSES),
            *(_num(m.get(k)) for k in ("region_top1", "hardneg_accuracy", "retrieval_r1", "retrieval_r5")),
        ]
        lines.append(_row(cells))
    return "\n".join(lines) + "\n"


def _row(cells: list[str]) -> str:
    return f"| {' | '.join(cells)} |"


def _num(value: float | None, digits: int = 3) -> str:
    """``value`` to ``digits`` places, halves rounded up as written (0.3125 -> 0.313), not to even."""
    if value is None:
        return "–"
    return str(Decimal(str(value)).quantize(Decimal(1).scaleb(-digits), rounding=ROUND_HALF_UP))


def _results(repo: Path, name: str) -> str:
    if name != "sample":
        raise ValueError(f"no results table {name!r}: the committed metrics are the sample's")
    evaluation = json.loads((repo / "metrics" / "eval.json").read_text(encoding="utf-8"))
    steps = json.loads((repo / "metrics" / "train.json").read_text(encoding="utf-8"))["steps"]
    return results_table(evaluation, steps)


def _ablation(repo: Path, name: str) -> str:
    from fgclip.ablation.report import readme_table  # its table module: loaded only when used

    return readme_table((repo / "reports" / "ablation" / name / "table.csv").read_text(encoding="utf-8"))


SOURCES: dict[str, Callable[[Path, str], str]] = {"results": _results, "ablation": _ablation}


def generated(readme: str, repo: Path) -> tuple[str, list[str]]:
    """``readme`` with every block regenerated, and the names of the blocks that changed."""
    changed: list[str] = []

    def replace(match: re.Match) -> str:
        start, kind, name, body, end = match.groups()
        fresh = SOURCES[kind](repo, name)
        if fresh != body:
            changed.append(f"{kind}:{name}")
        return start + fresh + end

    return BLOCK.sub(replace, readme), changed


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m fgclip.readme_tables", description=__doc__.splitlines()[0],
                                     allow_abbrev=False)  # fmt: skip
    parser.add_argument("--readme", type=Path, default=Path("README.md"))
    parser.add_argument("--write", action="store_true", help="rewrite the blocks that differ")
    args = parser.parse_args(argv)
    text = args.readme.read_text(encoding="utf-8")
    fresh, changed = generated(text, args.readme.resolve().parent)
    if not changed:
        print(f"{args.readme}: every table matches the committed results")
        return 0
    if args.write:
        write_text_atomic(args.readme, fresh)
        print(f"{args.readme}: regenerated {', '.join(changed)}")
        return 0
    print(f"{args.readme}: {', '.join(changed)} differ from the committed results: run with --write",
          file=sys.stderr)  # fmt: skip
    return 1


if __name__ == "__main__":
    sys.exit(main())
