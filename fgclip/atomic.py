"""Write a file so that readers see the old version or the whole new one, never a part.

Stages are killed (Ctrl-C, OOM, a Prefect retry), and a half-written JPEG, Parquet
file or metrics JSON would otherwise be read as complete by the next run.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path


@contextmanager
def atomic_path(path: Path, suffix: str = "") -> Iterator[Path]:
    """Yield a hidden temporary path beside ``path``; on success it replaces ``path``.

    ``suffix`` ends the temporary name, for writers that pick the format from the
    extension (PyAV's muxer). On an exception the temporary file is removed.
    """
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp{suffix}")
    try:
        yield tmp
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def write_text_atomic(path: Path, text: str) -> None:
    with atomic_path(path) as tmp:
        tmp.write_text(text, encoding="utf-8")
