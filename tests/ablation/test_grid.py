"""Grids: loading, checking every override against the params, expansion over seeds."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import yaml

from fgclip.ablation.grid import Experiment, GridError, apply_overrides, comparable, load_grid, override_text
from fgclip.config import Params, ParamsError, load_params, repository_dir

REPO = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def params() -> Params:
    return load_params(REPO / "params.yaml")


def test_the_default_grid_is_the_issue_s_six_cells_times_seeds(params: Params):
    grid = load_grid(params, "default")
    assert grid.reference == "global_only"
    assert list(grid.cells) == ["global_only", "region_loss", "memory_bank", "hard_negatives", "users_old",
                                "long_captions"]  # fmt: skip
    exps = grid.experiments(params, 3)
    assert len(exps) == 18
    assert [e.seed for e in exps[:3]] == [params.train.seed, params.train.seed + 1, params.train.seed + 2]
    assert exps[0].name == "default-global_only-s0"
    users = next(e for e in exps if e.cell == "users_old")
    resolved = apply_overrides(params, users.overrides, "users_old")
    assert resolved.model.logit_scale_init_value == pytest.approx(2.6592)
    assert resolved.train.memory_bank_warmup_steps == 400  # the notes' bank warm-up, in forward passes
    off = apply_overrides(params, grid.cells["global_only"], "global_only").train
    assert (off.region_loss_weight, off.hardneg_loss_weight, off.memory_bank_size) == (0, 0, 0)


def test_set_param_arguments_arrive_through_dvc_as_the_grid_gave_them(params: Params, tmp_path: Path):
    """What DVC itself does with them: Hydra's override parser, then its YAML writer, then load_params."""
    from dvc.utils.hydra import apply_overrides as dvc_apply_overrides

    overrides = {"train.lr": 1e-06, "train.weight_decay": 0.0, "model.pretrained": "a dir/with spaces",
                 "model.long_text": True, "model.max_text_len": None, "evaluate.templates": ["a {}", "b {}"],
                 "train.max_steps": 7}  # fmt: skip
    exp = Experiment("c", 0, "abl-c-s0", overrides, apply_overrides(params, overrides, "c"))
    args = exp.set_params()
    assert args[0::2] == ["--set-param"] * len(overrides)
    path = tmp_path / "params.yaml"
    shutil.copy(REPO / "params.yaml", path)
    dvc_apply_overrides(str(path), args[1::2])
    written = load_params(path)
    assert comparable(written) == comparable(exp.resolved)
    assert written.train.lr == 1e-06 and written.evaluate.templates == ["a {}", "b {}"]


@pytest.mark.parametrize("value", ['say "hi"', "back\\slash", "line\nbreak", "${train.seed}"])
def test_strings_hydra_would_change_are_refused(value):
    with pytest.raises(GridError, match="cannot pass"):
        override_text(value)


def test_a_grid_file_is_read_and_named_by_its_stem(params: Params, tmp_path: Path):
    path = tmp_path / "temps.yaml"
    path.write_text(yaml.safe_dump({"reference": "ln100", "cells": {"ln100": {}, "clip": {"model.logit_scale_init_value": 2.6592}}}, sort_keys=False))
    grid = load_grid(params, str(path))
    assert (grid.name, grid.reference, list(grid.cells)) == ("temps", "ln100", ["ln100", "clip"])


@pytest.mark.parametrize(
    ("cells", "match"),
    [
        ({"a": {"train.lrr": 1}}, r"train\.lrr is not a param"),
        ({"a": {"trian.lr": 1}}, r"no section 'trian'"),
        ({"a": {"train.lr": -1}}, r"train\.lr"),
        ({"a": {"train.health": 1}}, r"is a section"),
        ({"a": {"train.seed": 3}}, r"sets train\.seed"),
        ({"a": {"tracking.uri": "x"}}, r"sets tracking\.uri"),
        ({"a": {}, "b": {"train.lr": 0.0003}}, r"same params"),
    ],
)
def test_bad_grids_fail_before_anything_is_queued(params: Params, tmp_path: Path, cells, match):
    path = tmp_path / "bad.yaml"
    path.write_text(yaml.safe_dump({"reference": "a", "cells": cells}))
    with pytest.raises(GridError, match=match):
        load_grid(params, str(path)).experiments(params, 2)


def test_unknown_grids_and_bad_names(params: Params, tmp_path: Path):
    with pytest.raises(GridError, match=r"no ablation grid 'nope'.*default, tiny"):
        load_grid(params, "nope")
    with pytest.raises(GridError, match="not found"):
        load_grid(params, str(tmp_path / "missing.yaml"))
    bad = tmp_path / "bad.yaml"
    bad.write_text(yaml.safe_dump({"reference": "x", "cells": {"a": {}}}))
    with pytest.raises(GridError, match="reference 'x' is not one of its cells"):
        load_grid(params, str(bad))
    bad.write_text(yaml.safe_dump({"reference": "a b", "cells": {"a b": {}}}))
    with pytest.raises(GridError, match="letters, digits"):
        load_grid(params, str(bad))
    spaced = tmp_path / "two words.yaml"
    spaced.write_text(yaml.safe_dump({"reference": "a", "cells": {"a": {}}}))
    with pytest.raises(GridError, match="two words"):
        load_grid(params, str(spaced))


def test_a_misspelt_grid_in_params_yaml_is_a_params_error(tmp_path: Path):
    raw = yaml.safe_load((REPO / "params.yaml").read_text())
    raw["ablation"]["grids"]["x"] = {"reference": "a", "cells": {"a": {}}, "refrence": "a"}
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(raw))
    with pytest.raises(ParamsError, match="refrence"):
        load_params(tmp_path / "params.yaml")


def test_a_dvc_experiment_copy_places_the_mlflow_db_in_the_repository(tmp_path: Path, monkeypatch):
    repo = tmp_path / "repo"
    copy = repo / ".dvc" / "tmp" / "exps" / "tmpab12"
    (copy / "sub").mkdir(parents=True)
    monkeypatch.delenv("DVC_ROOT", raising=False)
    assert repository_dir(copy) == copy
    monkeypatch.setenv("DVC_ROOT", str(repo))
    assert repository_dir(copy) == repo
    assert repository_dir(copy / "sub") == repo / "sub"
    temp = repo / ".dvc" / "tmp" / "exps" / "standalone" / "tmpcd34"  # `dvc exp run --temp`
    temp.mkdir(parents=True)
    assert repository_dir(temp) == repo
    assert repository_dir(repo) == repo  # a plain `dvc repro`: DVC_ROOT is the repository itself
    assert repository_dir(tmp_path / "elsewhere") == tmp_path / "elsewhere"
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    params = Params.model_validate({"base_dir": copy})
    assert params.tracking_uri == f"sqlite:///{(repo / 'mlflow.db').resolve()}"


@pytest.mark.parametrize("name", ["a'b", "two words", "-x", ""])
def test_ablation_names_that_would_break_an_experiment_name_or_a_filter_are_refused(name):
    from fgclip.ablation.grid import check_name

    with pytest.raises(GridError, match="letters, digits"):
        check_name(name)
