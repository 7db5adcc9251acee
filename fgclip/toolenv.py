"""How subprocesses find this project's tools: the running interpreter's environment, not PATH.

`fgclip serve`, `fgclip ablate` and the tests are often started as ``.venv/bin/fgclip``
without the venv activated. DVC then runs each stage command (``fgclip ...`` in
dvc.yaml) through a shell that searches PATH, so the directory holding this
interpreter goes first on it; and ``dvc`` itself is run as ``python -m dvc`` of
this interpreter, which needs no PATH at all.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Mapping
from pathlib import Path


def tools_dir() -> Path:
    """The ``bin`` directory of the running interpreter's environment (a venv's, or the system's)."""
    return Path(sys.executable).parent


def tool_env(base: Mapping[str, str] | None = None) -> dict[str, str]:
    """``base`` (default: this process's environment) with :func:`tools_dir` first on PATH."""
    env = dict(os.environ if base is None else base)
    path = env.get("PATH", "")
    first = str(tools_dir())
    if path.split(os.pathsep)[0] != first:
        env["PATH"] = f"{first}{os.pathsep}{path}" if path else first
    env.setdefault("DVC_NO_ANALYTICS", "1")
    return env


def dvc_command() -> list[str]:
    """The argv prefix that runs this environment's DVC (``python -m dvc``)."""
    return [sys.executable, "-m", "dvc"]
