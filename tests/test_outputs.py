"""fgclip.outputs: a stage writes only the directory it owns; every stage refuses any other.

On real directories and the real stages: the refusal comes before any work, and what was
in the directory is still there byte for byte.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from fgclip.cli import main
from fgclip.config import Params
from fgclip.outputs import (
    MARKER,
    OutputDirError,
    check_output_files,
    claim_output_dir,
    owner,
    replacing_output_dir,
)

REPO = Path(__file__).resolve().parents[1]


def _snapshot(directory: Path) -> dict[str, bytes]:
    return {
        str(p.relative_to(directory)): p.read_bytes() for p in sorted(directory.rglob("*")) if p.is_file()
    }


@pytest.fixture
def foreign(tmp_path: Path) -> Path:
    """Somebody's directory that a mistyped --out points at."""
    home = tmp_path / "home"
    (home / "thesis").mkdir(parents=True)
    (home / "thesis" / "draft.tex").write_text("years of work")
    (home / "notes.txt").write_text("keep me")
    return home


# --------------------------------------------------------------------------- the module


def test_claim_creates_and_marks_then_keeps_its_own(tmp_path: Path):
    out = claim_output_dir(tmp_path / "a" / "frames", "extract_frames")
    assert owner(out) == "extract_frames" and [p.name for p in out.iterdir()] == [MARKER]
    (out / "index.parquet").write_text("earlier output")
    claim_output_dir(out, "extract_frames")  # a resumed run
    assert (out / "index.parquet").read_text() == "earlier output"


def test_an_empty_directory_is_anyones(tmp_path: Path):
    (tmp_path / "out").mkdir()
    assert owner(claim_output_dir(tmp_path / "out", "train")) == "train"


def test_a_foreign_directory_is_refused(foreign: Path):
    before = _snapshot(foreign)
    with pytest.raises(OutputDirError, match=rf"{foreign} is not empty and was not written by the pretrain"):
        claim_output_dir(foreign, "pretrain")
    with (
        pytest.raises(OutputDirError, match="was not written by the validate_boxes"),
        replacing_output_dir(foreign, "validate_boxes") as tmp,
    ):
        (tmp / "manifest.json").write_text("{}")
    assert _snapshot(foreign) == before
    assert sorted(p.name for p in foreign.parent.iterdir()) == ["home"]  # no .tmp left


def test_another_stages_output_is_refused(tmp_path: Path):
    frames = claim_output_dir(tmp_path / "frames", "extract_frames")
    (frames / "index.parquet").write_text("frames")
    with pytest.raises(OutputDirError, match=r"holds the output of the extract_frames stage"):
        claim_output_dir(frames, "validate_boxes")
    assert (frames / "index.parquet").read_text() == "frames"


def test_a_file_is_refused(tmp_path: Path):
    (tmp_path / "boxes").write_text("not a directory")
    with pytest.raises(OutputDirError, match="is a file"):
        claim_output_dir(tmp_path / "boxes", "validate_boxes")


@pytest.mark.parametrize("where", ["same", "parent"])
def test_an_output_that_is_or_holds_an_input_is_refused(where: str, tmp_path: Path):
    frames = claim_output_dir(tmp_path / "data" / "frames", "extract_frames")
    out = frames if where == "same" else tmp_path / "data"
    with pytest.raises(OutputDirError, match=r"is, or holds, its own --frames"):
        claim_output_dir(out, "validate_boxes", {"--frames": frames})
    # Inside an input is fine: replacing it deletes nothing of the input's.
    claim_output_dir(frames / "boxes", "validate_boxes", {"--frames": frames})


def test_an_output_written_before_markers_is_adopted(tmp_path: Path):
    out = tmp_path / "boxes"
    out.mkdir()
    for name in ("manifest.json", "rejects.parquet", "part-00000.parquet"):
        (out / name).write_text(name)
    with replacing_output_dir(out, "validate_boxes") as tmp:
        (tmp / "manifest.json").write_text("new")
    assert owner(out) == "validate_boxes" and (out / "manifest.json").read_text() == "new"
    assert not (out / "part-00000.parquet").exists()


def test_replacing_swaps_whole_and_a_failure_keeps_the_old(tmp_path: Path):
    out = tmp_path / "boxes"
    with replacing_output_dir(out, "validate_boxes") as tmp:
        (tmp / "manifest.json").write_text("first")
    with pytest.raises(RuntimeError), replacing_output_dir(out, "validate_boxes") as tmp:
        (tmp / "manifest.json").write_text("half")
        raise RuntimeError("killed mid-write")
    assert (out / "manifest.json").read_text() == "first" and owner(out) == "validate_boxes"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["boxes"]


def test_output_files_stay_out_of_inputs(tmp_path: Path):
    frames = tmp_path / "frames"
    frames.mkdir()
    with pytest.raises(OutputDirError, match=r"--scores .*index.parquet: lies inside the input --frames"):
        check_output_files({"--scores": frames / "index.parquet"}, {"--frames": frames})
    with pytest.raises(OutputDirError, match=r"--out .*frames: is a directory"):
        check_output_files({"--out": frames}, {})
    check_output_files(
        {"--out": tmp_path / "eval.json", "--roc": None}, {"--frames": frames, "--model": "hub/id"}
    )


# --------------------------------------------------------------------------- the stages


def test_validate_boxes_cli_refuses_its_own_frames_as_out(
    tiny_sample: Path, tiny_frames: Path, tmp_path, capsys
):
    """The users' story: `validate-boxes --frames X --out X` exited 0 and X was gone."""
    frames = tmp_path / "frames"
    shutil.copytree(tiny_frames, frames)
    before = _snapshot(frames)
    argv = ["validate-boxes", "--params", str(REPO / "params.yaml"), "--annotations"]
    argv += [str(tiny_sample / "annotations.json"), "--frames", str(frames), "--out", str(frames)]
    assert main([*argv, "--metrics", str(tmp_path / "boxes.json")]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("fgclip validate-boxes: error: ") and str(frames) in err[0]
    assert _snapshot(frames) == before


def test_extract_frames_refuses_a_foreign_directory(tiny_params: Params, tiny_sample: Path, foreign: Path):
    from fgclip.data.frames import extract_frames

    before = _snapshot(foreign)
    with pytest.raises(OutputDirError, match="was not written by the extract_frames"):
        extract_frames(tiny_params, tiny_sample, tiny_sample / "annotations.json", foreign)
    assert _snapshot(foreign) == before


def test_extract_frames_refuses_the_dataset_root(tiny_params: Params, tiny_sample: Path, tmp_path: Path):
    from fgclip.data.frames import extract_frames

    root = tmp_path / "sample"
    shutil.copytree(tiny_sample, root)
    before = _snapshot(root)
    with pytest.raises(OutputDirError, match="is, or holds, its own --data-root"):
        extract_frames(tiny_params, root, root / "annotations.json", root)
    assert _snapshot(root) == before


def test_pretrain_refuses_the_boxes_dir(
    tiny_params: Params, tiny_sample: Path, tiny_frames: Path, tiny_boxes: Path, tmp_path: Path
):
    from fgclip.train.pretrain import pretrain_clip

    boxes = tmp_path / "boxes"
    shutil.copytree(tiny_boxes, boxes)
    before = _snapshot(boxes)
    with pytest.raises(OutputDirError, match="holds the output of the validate_boxes stage"):
        pretrain_clip(tiny_params, tiny_frames, tiny_boxes, tiny_sample / "annotations.json", boxes)
    assert _snapshot(boxes) == before


def test_train_refuses_a_foreign_directory_before_training(
    tiny_params: Params, tiny_frames: Path, tiny_boxes: Path, foreign: Path, tmp_path: Path
):
    from fgclip.train.loop import train

    before = _snapshot(foreign)
    with pytest.raises(OutputDirError, match="was not written by the train stage"):
        train(
            tiny_params,
            tiny_frames,
            tiny_boxes,
            "no/such-model",
            foreign,
            tmp_path / "ck",
            tmp_path / "h.json",
        )
    assert _snapshot(foreign) == before and not (tmp_path / "ck").exists()


def test_evaluate_refuses_scores_inside_the_frames_dir(
    tiny_params: Params, tiny_sample: Path, tiny_frames: Path, tmp_path: Path
):
    from fgclip.eval.evaluate import evaluate

    frames = tmp_path / "frames"
    shutil.copytree(tiny_frames, frames)
    before = _snapshot(frames)
    with pytest.raises(OutputDirError, match="lies inside the input --frames"):
        evaluate(
            tiny_params, frames, tmp_path / "model", None, tiny_sample,
            tmp_path / "eval.json", frames / "index.parquet",
        )  # fmt: skip
    assert _snapshot(frames) == before
