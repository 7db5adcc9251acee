"""fgclip.atomic: readers see the old file or the whole new one."""

from __future__ import annotations

import pytest

from fgclip.atomic import atomic_path, write_text_atomic


def test_success_replaces_and_leaves_no_temporary(tmp_path):
    target = tmp_path / "metrics.json"
    target.write_text("old")
    write_text_atomic(target, "new")
    assert target.read_text() == "new"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["metrics.json"]


def test_failure_keeps_the_old_file_and_removes_the_partial_one(tmp_path):
    target = tmp_path / "index.parquet"
    target.write_text("old")
    with pytest.raises(RuntimeError), atomic_path(target) as tmp:
        tmp.write_text("half")
        raise RuntimeError("killed mid-write")
    assert target.read_text() == "old"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["index.parquet"]


def test_suffix_keeps_the_extension_for_format_sniffing_writers(tmp_path):
    with atomic_path(tmp_path / "a.mp4", suffix=".mp4") as tmp:
        assert tmp.name.endswith(".mp4") and tmp.name.startswith(".")
        tmp.write_bytes(b"x")
    assert (tmp_path / "a.mp4").read_bytes() == b"x"
