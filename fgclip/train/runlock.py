"""``<run_dir>/train.lock``: which process is using a run's checkpoint directory.

Training (rank 0) holds it for its whole life, and ``fgclip checkpoints clean``
holds it while it deletes, so cleanup never removes a checkpoint a running job
resumed from or is about to write, and a second training process on the same
run directory fails at once instead of interleaving its checkpoints.

The file is JSON ``{"pid", "host", "owner", "checkpoint", "since"}``. It is
created whole: written to a private temporary file, then hard-linked into place,
which fails when the lock exists (no reader ever sees a half-written lock).
A lock whose pid no longer runs on this host (gone, or a zombie) is stale (a
crash, a SIGKILL, an out-of-memory kill) and is taken over with a warning. A lock
written on another host cannot be checked from here and counts as held, and so
does one whose pid was reused by an unrelated process: both fail safe, with a
message naming the lock file to delete. Two processes taking over the same stale
lock at the same instant are not told apart.
"""

from __future__ import annotations

import json
import logging
import os
import socket
import time
from pathlib import Path
from typing import Any, Self

from fgclip.atomic import write_text_atomic
from fgclip.errors import FGClipError

logger = logging.getLogger(__name__)

LOCK_FILE = "train.lock"


class RunLockedError(FGClipError, RuntimeError):
    """Another live process holds the run directory's lock."""


def pid_alive(pid: int) -> bool:
    """Whether ``pid`` runs on this host (a process we may not signal still runs)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    # A killed process not yet reaped by its parent (a zombie) still answers signal 0.
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:  # no procfs (macOS), or it exited just now
        return True
    return stat[stat.rindex(")") + 2 :].split(" ", 1)[0] != "Z"


def read_lock(run_dir: Path) -> dict[str, Any] | None:
    """The lock's content, ``{}`` when it exists but cannot be parsed, None when there is none."""
    try:
        text = (Path(run_dir) / LOCK_FILE).read_text(encoding="utf-8")
    except FileNotFoundError:
        return None
    try:
        holder = json.loads(text)
    except ValueError:
        return {}
    return holder if isinstance(holder, dict) else {}


def holder_state(holder: dict[str, Any]) -> str:
    """``"live"``, ``"stale"`` (its pid is gone from this host) or ``"unknown"`` (another host, or garbled)."""
    pid, host = holder.get("pid"), holder.get("host")
    if not isinstance(pid, int) or host is None:
        return "unknown"
    if host != socket.gethostname():
        return "unknown"
    return "live" if pid_alive(pid) else "stale"


def describe_holder(holder: dict[str, Any]) -> str:
    if not holder:
        return "an unreadable lock"
    return (
        f"{holder.get('owner', 'a process')} (pid {holder.get('pid')} on {holder.get('host')}, "
        f"since {holder.get('since')}, checkpoint {holder.get('checkpoint')})"
    )


class RunLock:
    """``with RunLock(run_dir, owner="train"):`` -- raises :class:`RunLockedError` when held elsewhere."""

    def __init__(self, run_dir: Path, owner: str = "train") -> None:
        self.run_dir = Path(run_dir)
        self.path = self.run_dir / LOCK_FILE
        self.owner = owner
        self.held = False
        self._content: dict[str, Any] = {}

    def _write_new(self, content: dict[str, Any]) -> bool:
        """Create the lock holding ``content``; False when it already exists."""
        tmp = self.run_dir / f".{LOCK_FILE}.{os.getpid()}.tmp"
        tmp.write_text(json.dumps(content), encoding="utf-8")
        try:
            os.link(tmp, self.path)
        except FileExistsError:
            return False
        finally:
            tmp.unlink(missing_ok=True)
        return True

    def acquire(self, checkpoint: Path | None = None) -> Self:
        self.run_dir.mkdir(parents=True, exist_ok=True)
        self._content = {
            "pid": os.getpid(),
            "host": socket.gethostname(),
            "owner": self.owner,
            "checkpoint": str(checkpoint) if checkpoint else None,
            "since": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        }
        # Two tries: the second follows the removal of a stale lock.
        for _ in range(2):
            if self._write_new(self._content):
                self.held = True
                return self
            holder = read_lock(self.run_dir)
            if holder is None:  # released between our try and the read
                continue
            if holder_state(holder) != "stale":
                raise RunLockedError(
                    f"{self.run_dir} is in use by {describe_holder(holder)}: lock file {self.path}. "
                    "Wait for it to finish, or use another train.run_name; delete the lock file only "
                    "if that process is certainly gone."
                )
            logger.warning("Removing stale lock %s left by %s: that process is gone",
                           self.path, describe_holder(holder))  # fmt: skip
            self.path.unlink(missing_ok=True)
        raise RunLockedError(f"could not take the lock {self.path}: another process keeps taking it")

    def update(self, checkpoint: Path | None) -> None:
        """Record the checkpoint the holder now uses (resumed from, or last saved)."""
        if not self.held:
            return
        self._content["checkpoint"] = str(checkpoint) if checkpoint else None
        write_text_atomic(self.path, json.dumps(self._content))  # replaced, never absent while held

    def release(self) -> None:
        if not self.held:
            return
        self.held = False
        holder = read_lock(self.run_dir)
        # Never remove a lock someone else took over (after a stale-lock takeover race).
        if holder is not None and holder.get("pid") == os.getpid():
            self.path.unlink(missing_ok=True)

    def __enter__(self) -> Self:
        return self.acquire() if not self.held else self

    def __exit__(self, *exc: object) -> None:
        self.release()
