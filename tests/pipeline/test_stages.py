"""dvc.yaml is the one home of the stage order and takes every path from params.yaml.

Read with DVC itself (its templating and its stage graph) in a scratch copy of the
two files; nothing runs a stage.
"""

from __future__ import annotations

import dataclasses
import shutil
from pathlib import Path

import pytest
import yaml

from fgclip.config import load_params
from pipeline.stages import run_stage, stage_order

REPO = Path(__file__).resolve().parents[2]
CODE = "fgclip/"  # dependencies on the library's code, not on data: not params


def _entries(items: list) -> list[str]:
    """The paths of a deps / outs / metrics / plots list (an entry may carry flags: ``{path: {...}}``)."""
    return [p for item in items for p in ([item] if isinstance(item, str) else item)]


def _stage_paths(stage: dict) -> list[str]:
    return [p for key in ("deps", "outs", "metrics", "plots") for p in _entries(stage.get(key, []))]


@pytest.fixture
def dvc_repo(tmp_path: Path) -> Path:
    """A DVC repository (no git) holding this project's dvc.yaml and params.yaml."""
    from dvc.repo import Repo

    for name in ("dvc.yaml", "params.yaml"):
        shutil.copy2(REPO / name, tmp_path / name)
    Repo.init(tmp_path, no_scm=True).close()
    return tmp_path


def _resolved(repo: Path) -> dict:
    """dvc.yaml as DVC reads it: every ``${...}`` replaced by its params.yaml value."""
    from dvc.dvcfile import load_file
    from dvc.repo import Repo

    with Repo(repo) as dvc:
        dvcfile = load_file(dvc, str(repo / "dvc.yaml"))
        return {"stages": dvcfile.resolver.resolve()["stages"], "plots": dvcfile.resolver.resolve_plots()}


def test_stage_order_is_the_order_of_dvc_yaml():
    assert stage_order(REPO) == tuple(yaml.safe_load((REPO / "dvc.yaml").read_text())["stages"])
    assert stage_order(REPO)[0] == "sample" and stage_order(REPO)[-1] == "evaluate"


def test_stage_order_runs_every_stage_after_its_upstream(dvc_repo: Path):
    """What `dvc repro -s` stage by stage (the flow) relies on, by DVC's own stage graph."""
    from dvc.repo import Repo

    order = stage_order(dvc_repo)
    with Repo(dvc_repo) as dvc:
        graph = dvc.index.graph  # an edge goes from a stage to a stage whose outputs it reads
        assert {stage.name for stage in graph.nodes} == set(order)
        for stage in graph.nodes:
            for upstream in graph.successors(stage):
                assert order.index(upstream.name) < order.index(stage.name), (stage, upstream)


@pytest.mark.parametrize(
    "text", ["- a list\n", "just text\n", "stages: [a, b]\n", "stages: {}\n", "stages:\n  a: [unclosed\n"]
)
def test_stage_order_refuses_a_dvc_yaml_without_stages(tmp_path: Path, text: str):
    (tmp_path / "dvc.yaml").write_text(text)
    with pytest.raises(ValueError, match="dvc.yaml"):
        stage_order(tmp_path)


def test_run_stage_names_the_stages_of_the_repository(tmp_path: Path):
    (tmp_path / "dvc.yaml").write_text(yaml.safe_dump({"stages": {"only": {"cmd": "true"}}}))
    with pytest.raises(ValueError, match=r"unknown stage 'sample'; stages: only$"):
        run_stage(tmp_path, "sample")  # refused before any dvc runs


def test_dvc_yaml_writes_no_path_of_its_own():
    """Every data path in dvc.yaml is a params.yaml value (``${frames.out}``), so it is written once."""
    raw = yaml.safe_load((REPO / "dvc.yaml").read_text())
    for name, stage in raw["stages"].items():
        for path in _stage_paths(stage):
            assert path.startswith((CODE, "${")), f"{name}: {path!r} restates a params path"
    for plot in raw["plots"]:
        for definition in plot.values():
            assert all(path.startswith("${") for path in definition["y"]), plot


def test_dvc_yaml_paths_are_the_paths_the_stage_commands_use(dvc_repo: Path):
    """DVC's resolved paths are params.paths, the CLI's defaults: DVC tracks what the commands write."""
    resolved = _resolved(dvc_repo)
    paths = load_params(dvc_repo / "params.yaml").paths
    known = {str(p.relative_to(dvc_repo)) for p in dataclasses.astuple(paths)}
    for name, stage in resolved["stages"].items():
        data = [p for p in _stage_paths(stage) if not p.startswith(CODE)]
        assert data and set(data) <= known, (name, set(data) - known)
    stages = resolved["stages"]
    rel = {field: str(getattr(paths, field).relative_to(dvc_repo)) for field in ("frames", "scores", "roc")}
    assert stages["extract_frames"]["outs"] == [rel["frames"]]
    assert stages["evaluate"]["outs"] == [rel["scores"]]
    assert [next(iter(p)) for p in stages["evaluate"]["plots"]] == [rel["roc"]]
    assert [next(iter(plot.values()))["y"] for plot in resolved["plots"]][1] == {rel["roc"]: "tpr"}


def test_a_path_changed_in_params_yaml_changes_in_every_stage(dvc_repo: Path):
    """The issue's example: a new frames.out used to leave dvc.yaml's outs and deps stale."""
    params = yaml.safe_load((dvc_repo / "params.yaml").read_text())
    params["frames"]["out"] = "data/frames_v2"
    (dvc_repo / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    stages = _resolved(dvc_repo)["stages"]
    assert stages["extract_frames"]["outs"] == ["data/frames_v2"]
    for name in ("validate_boxes", "pretrain", "train", "evaluate"):
        assert "data/frames_v2" in stages[name]["deps"] and "data/frames" not in stages[name]["deps"], name
