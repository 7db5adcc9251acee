"""An ablation grid: named cells of param overrides, expanded over seeds into experiments.

A grid comes from ``params.yaml`` (``ablation.grids.<name>``) or a YAML file of the
same shape (``reference:`` and ``cells:``; the file's stem names it). Each cell maps
dotted param keys to values (``train.region_loss_weight: 0``); an empty cell is the
params as they are. Seeds vary ``train.seed`` from its value in the params: the data
order, the new layers' initial weights and the augmentation, with the pretrained
stand-in shared by every cell.

Everything is checked before any experiment is queued: every key must name a param,
every value must pass that param's validation, and no two experiments may end up
with the same params (DVC would run one and hand its result to both).
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml
from pydantic import ValidationError

from fgclip.config import ABLATION_NAME, AblationGridConfig, Params, describe_errors
from fgclip.errors import FGClipError

SEED_KEY = "train.seed"
# Set by the ablation itself (the seed) or shared by every cell for the MLflow tree to hold.
FORBIDDEN_PREFIXES = (SEED_KEY, "tracking.", "ablation.", "orchestration.")
# Sections no stage reads as an experiment's input, left out when experiments are compared.
SHARED_SECTIONS = {"base_dir", "tracking", "ablation", "orchestration"}


class GridError(FGClipError, ValueError):
    """A grid that cannot run: unknown grid or key, an invalid value, two identical cells."""


@dataclass(frozen=True)
class Experiment:
    """One cell at one seed: one DVC experiment, one MLflow child run."""

    cell: str
    seed: int
    name: str  # the DVC experiment's name
    overrides: Mapping[str, Any]  # the cell's overrides plus train.seed
    resolved: Params  # the params it runs with

    def set_params(self) -> list[str]:
        """``dvc exp run`` arguments that set this experiment's params."""
        args: list[str] = []
        for key, value in self.overrides.items():
            args += ["--set-param", f"{key}={override_text(value)}"]
        return args


@dataclass(frozen=True)
class Grid:
    name: str
    reference: str
    cells: Mapping[str, Mapping[str, Any]]

    def experiments(self, params: Params, seeds: int, name: str | None = None) -> list[Experiment]:
        """Every cell × seed, checked against ``params``; ``name`` prefixes the experiment names."""
        prefix = name or self.name
        base_seed = params.train.seed
        out: list[Experiment] = []
        seen: dict[str, str] = {}
        for cell, overrides in self.cells.items():
            check_keys(cell, overrides)
            for seed in range(base_seed, base_seed + seeds):
                full = {**overrides, SEED_KEY: seed}
                resolved = apply_overrides(params, full, f"cell {cell!r}")
                key = comparable(resolved)
                exp = Experiment(cell, seed, f"{prefix}-{cell}-s{seed}", full, resolved)
                if key in seen:
                    raise GridError(f"cells {seen[key]} and {exp.name} have the same params: one would "
                                    "stand for both (change one, or drop it)")  # fmt: skip
                seen[key] = exp.name
                out.append(exp)
        return out


def comparable(params: Params) -> str:
    """What makes two experiments the same: every param the stages read, as canonical JSON."""
    return json.dumps(params.model_dump(mode="json", exclude=SHARED_SECTIONS), sort_keys=True)


def check_name(name: str) -> str:
    """An ablation's name becomes part of DVC experiment names and of MLflow filter strings."""
    if not ABLATION_NAME.fullmatch(name):
        raise GridError(f"ablation name {name!r}: use letters, digits, '_' and '-' only")
    return name


def load_grid(params: Params, grid: str) -> Grid:
    """The grid named ``grid`` in ``ablation.grids``, or read from the YAML file at that path."""
    if grid in params.ablation.grids:
        cfg = params.ablation.grids[grid]
        return Grid(grid, cfg.reference, dict(cfg.cells))
    path = Path(grid)
    looks_like_file = path.suffix in (".yaml", ".yml") or os.sep in grid
    if not looks_like_file:
        known = ", ".join(params.ablation.grids) or "none"
        raise GridError(f"no ablation grid {grid!r} in params (ablation.grids: {known}) and not a .yaml file")
    if not path.is_file():
        raise GridError(f"ablation grid file not found: {path}")
    try:
        raw = yaml.safe_load(path.read_text(encoding="utf-8"))
        cfg = AblationGridConfig.model_validate(raw)
    except yaml.YAMLError as exc:
        raise GridError(f"{path}: not valid YAML: {' '.join(str(exc).split())}") from exc
    except ValidationError as exc:
        raise GridError(f"{path}: {describe_errors(exc)}") from exc
    name = path.stem
    # A file's stem names the experiments, so it must pass the same rule as a grid in params.
    try:
        params.ablation.model_validate({"grids": {name: raw}})
    except ValidationError as exc:
        raise GridError(f"{path}: {describe_errors(exc)}") from exc
    return Grid(name, cfg.reference, dict(cfg.cells))


def check_keys(cell: str, overrides: Mapping[str, Any]) -> None:
    for key in overrides:
        if any(key == p.rstrip(".") or key.startswith(p) for p in FORBIDDEN_PREFIXES):
            raise GridError(f"cell {cell!r} sets {key}: the ablation sets {SEED_KEY} itself, and "
                            "tracking, ablation and orchestration are shared by every cell")  # fmt: skip


def apply_overrides(params: Params, overrides: Mapping[str, Any], what: str) -> Params:
    """``params`` with each dotted key set, validated as params.yaml would be."""
    raw = params.model_dump(exclude={"base_dir"})
    for key, value in overrides.items():
        node = raw
        parts = key.split(".")
        for part in parts[:-1]:
            if not isinstance(node.get(part), dict):
                raise GridError(f"{what}: {key} is not a param (no section {part!r})")
            node = node[part]
        if parts[-1] not in node:
            raise GridError(f"{what}: {key} is not a param")
        if isinstance(node[parts[-1]], dict):
            raise GridError(f"{what}: {key} is a section: set its keys one by one")
        node[parts[-1]] = value
    try:
        return Params.model_validate({**raw, "base_dir": params.base_dir})
    except ValidationError as exc:
        raise GridError(f"{what}: {describe_errors(exc)}") from exc


def override_text(value: Any) -> str:
    """A value as ``dvc exp run --set-param`` parses it (Hydra's override grammar)."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, float):
        if not math.isfinite(value):
            raise GridError(f"cannot set a param to {value}")
        return repr(value)
    if isinstance(value, int):
        return str(value)
    if isinstance(value, str):
        # Hydra's quoted strings know no escapes but \' and \", and resolve ${...}: refuse what
        # would not arrive as written rather than validate one value and run another.
        if any(c in value for c in '\\"\n\r\t') or "${" in value:
            raise GridError(f"cannot pass {value!r} through dvc exp run --set-param: no quotes, "
                            "backslashes, control characters or ${...} in a string value")  # fmt: skip
        return f'"{value}"'
    if isinstance(value, list):
        return "[" + ",".join(override_text(v) for v in value) + "]"
    raise GridError(f"cannot set a param to {value!r}: use a number, a string, true/false, null or a list")
