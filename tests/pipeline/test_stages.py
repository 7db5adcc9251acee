"""dvc.yaml is the one home of the stage order and takes every path from params.yaml; stages run.

dvc.yaml is read with DVC itself (its templating and its stage graph) in a scratch
copy of the two files. Running a stage is tested on one-stage scratch repositories:
how the stage's tools are found, and which failures a retry cannot cure.
"""

from __future__ import annotations

import dataclasses
import shutil
from pathlib import Path

import pytest
import yaml

from fgclip.config import load_params
from fgclip.errors import FGClipError
from pipeline import stages
from pipeline.stages import (
    PermanentStageError,
    StageFailed,
    is_permanent,
    is_permanent_output,
    run_stage,
    stage_order,
)

REPO = Path(__file__).resolve().parents[2]
CODE = "fgclip/"  # dependencies on the library's code, not on data: not params


def _entries(items: list) -> list[str]:
    """The paths of a deps / outs / metrics / plots list (an entry may carry flags: ``{path: {...}}``)."""
    return [p for item in items for p in ([item] if isinstance(item, str) else item)]


def _plot_paths(plot: str | dict) -> list[str]:
    """The files of a top-level plot: an image's path, or the ``y`` files of a ``{name: {...}}`` one."""
    if isinstance(plot, str):
        return [plot]
    return [path for definition in plot.values() for path in _entries(definition.get("y", []))]


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
        assert all(path.startswith("${") for path in _plot_paths(plot)), plot


def test_dvc_yaml_paths_are_the_paths_the_stage_commands_use(dvc_repo: Path):
    """DVC's resolved paths are params.paths, the CLI's defaults: DVC tracks what the commands write."""
    resolved = _resolved(dvc_repo)
    paths = load_params(dvc_repo / "params.yaml").paths
    known = {str(p.relative_to(dvc_repo)) for p in dataclasses.astuple(paths)}
    for name, stage in resolved["stages"].items():
        data = [p for p in _stage_paths(stage) if not p.startswith(CODE)]
        assert data and set(data) <= known, (name, set(data) - known)
    stages = resolved["stages"]
    fields = ("frames", "scores", "roc", "roc_plot", "models_plot", "loss_plot")
    rel = {field: str(getattr(paths, field).relative_to(dvc_repo)) for field in fields}
    assert stages["extract_frames"]["outs"] == [rel["frames"]]
    assert _entries(stages["evaluate"]["outs"]) == [
        rel[f] for f in ("scores", "roc", "roc_plot", "models_plot")
    ]
    plotted = [path for plot in resolved["plots"] for path in _plot_paths(plot)]
    assert plotted == [rel[f] for f in ("loss_plot", "roc_plot", "models_plot")]


def test_a_path_changed_in_params_yaml_changes_in_every_stage(dvc_repo: Path):
    """The issue's example: a new frames.out used to leave dvc.yaml's outs and deps stale."""
    params = yaml.safe_load((dvc_repo / "params.yaml").read_text())
    params["frames"]["out"] = "data/frames_v2"
    (dvc_repo / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    stages = _resolved(dvc_repo)["stages"]
    assert stages["extract_frames"]["outs"] == ["data/frames_v2"]
    for name in ("validate_boxes", "pretrain", "train", "evaluate"):
        assert "data/frames_v2" in stages[name]["deps"] and "data/frames" not in stages[name]["deps"], name


# --- running a stage: the interpreter's tools, and which failures a retry cannot cure -------------

# A PATH holding neither dvc nor fgclip: what `.venv/bin/fgclip serve` sees without the venv activated.
BARE_PATH = "/usr/bin:/bin"


def _one_stage_repo(repo: Path, cmd: str) -> Path:
    """A DVC repository (no git) whose only stage ``only`` runs ``cmd`` and writes ``out.txt``."""
    from dvc.repo import Repo

    (repo / "dvc.yaml").write_text(yaml.safe_dump({"stages": {"only": {"cmd": cmd, "outs": ["out.txt"]}}}))
    Repo.init(repo, no_scm=True).close()
    return repo


def test_a_stage_runs_with_neither_dvc_nor_fgclip_on_path(tmp_path: Path):
    """dvc is this interpreter's `python -m dvc`, and DVC's shell finds `fgclip` in its bin directory."""
    assert shutil.which("dvc", path=BARE_PATH) is None and shutil.which("fgclip", path=BARE_PATH) is None
    repo = _one_stage_repo(tmp_path, "fgclip --help > out.txt")
    output = run_stage(repo, "only", env={"PATH": BARE_PATH}, timeout=120)
    assert "Running stage 'only'" in output
    assert (repo / "out.txt").read_text().startswith("usage: fgclip")


@pytest.mark.parametrize(
    ("cmd", "permanent"),
    [
        # The CLI's one-line user error (a params file that is not there): the same on every try.
        ("fgclip sample --params missing.yaml --out out.txt", True),
        ("no-such-tool-for-fgclip > out.txt", True),  # the shell: command not found (127)
        ("exit 3", False),  # a crash without the CLI's error line: a retry may pass
    ],
)
def test_run_stage_tells_a_permanent_failure(tmp_path: Path, cmd: str, permanent: bool):
    repo = _one_stage_repo(tmp_path, cmd)
    with pytest.raises(StageFailed, match=r"^dvc repro -s only failed \(exit \d+\):") as failed:
        run_stage(repo, "only", timeout=120)
    assert isinstance(failed.value, PermanentStageError) is permanent, failed.value
    assert is_permanent(failed.value) is permanent


def test_a_missing_executable_is_permanent(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    (tmp_path / "dvc.yaml").write_text(yaml.safe_dump({"stages": {"only": {"cmd": "true"}}}))
    monkeypatch.setattr(stages, "dvc_argv", lambda: [str(tmp_path / "no-python"), "-m", "dvc"])
    with pytest.raises(PermanentStageError, match=r"^cannot run dvc repro -s only in .*no-python"):
        run_stage(tmp_path, "only")


def test_dvc_missing_from_this_environment_is_permanent(monkeypatch: pytest.MonkeyPatch):
    monkeypatch.setattr(stages.importlib.util, "find_spec", lambda name: None)
    with pytest.raises(PermanentStageError, match=r"^dvc is not installed in .*'s environment"):
        stages.dvc_argv()


DVC_LOCK_ERROR = (
    "ERROR: Unable to acquire lock. Most likely another DVC process is running or was terminated "
    "abruptly. Check the page <https://dvc.org/doc/user-guide/troubleshooting#lock-issue> for other "
    "possible reasons and to learn how to resolve this."
)


@pytest.mark.parametrize(
    ("output", "permanent"),
    [
        (("Running stage 'extract_frames':\n> fgclip extract-frames --params params.yaml\n"
          "fgclip extract-frames: error: data/real_ucf/Anomaly_Train.txt not found\n"
          "ERROR: failed to reproduce 'extract_frames': failed to run: fgclip extract-frames "
          "--params params.yaml, exited with 1"), True),
        ("fgclip train: error: params.yaml: train.max_steps must be positive", True),
        ("fgclip validate-boxes: error: boxes.min_area_frac 2.0 must be in (0, 1)", True),
        (("/bin/sh: 1: fgclip: not found\nERROR: failed to reproduce 'sample': failed to run: "
          "fgclip sample --params params.yaml, exited with 127"), True),
        # Transient: DVC's lock, kills, tracebacks; and the CLI's error lines that report a busy resource.
        (DVC_LOCK_ERROR, False),
        ("ERROR: '/repo/data/frames' is busy, it is being blocked by:\n  (PID 12): dvc repro", False),
        (("ERROR: failed to reproduce 'train': failed to run: fgclip train --params params.yaml, "
          "exited with -9"), False),
        (("Traceback (most recent call last):\n  ...\nRuntimeError: CUDA error: out of memory\n"
          "ERROR: failed to reproduce 'train': failed to run: fgclip train, exited with 1"), False),
        (("fgclip train: error: /repo/checkpoints/drill is in use by pid 12 on host (train): "
          "lock file /repo/checkpoints/drill/train.lock. Wait for it to finish"), False),
        (("fgclip train: error: MLflow tracking server http://127.0.0.1:5000 is not reachable "
          "(connection refused): start it"), False),
        # The error line must start a line: a log message quoting one is not the CLI's verdict.
        ("INFO see `fgclip train: error: ...` in the docs\nexited with 1", False),
    ],
)  # fmt: skip
def test_permanent_failures_are_told_from_the_output(output: str, permanent: bool):
    assert is_permanent_output(output) is permanent


@pytest.mark.parametrize(
    ("exc", "permanent"),
    [
        (PermanentStageError("x"), True),
        (FGClipError("bad params"), True),
        (ValueError("unknown stage 'x'"), True),
        (FileNotFoundError("dvc.yaml"), True),
        (StageFailed("killed"), False),
        (OSError("Resource temporarily unavailable"), False),
    ],
)
def test_is_permanent_by_exception(exc: BaseException, permanent: bool):
    assert is_permanent(exc) is permanent


def test_the_cli_error_line_is_the_one_orchestrators_recognise():
    from fgclip.errors import USER_ERROR_LINE, user_error_line

    line = user_error_line("extract-frames", FGClipError("Anomaly_Train.txt not found"))
    assert line == "fgclip extract-frames: error: Anomaly_Train.txt not found"
    assert USER_ERROR_LINE.search(f"Running stage 'extract_frames':\n{line}\n")
    assert is_permanent_output(f"ERROR: failed to reproduce 'extract_frames'\n{line}\n")
