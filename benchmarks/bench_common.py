"""What every benchmark here shares: the machine's name, CPU seconds, the result line, UCF-Crime's classes."""

from __future__ import annotations

import json
import platform
import resource
from pathlib import Path

# UCF-Crime's 13 anomaly classes, in its order.
UCF_CRIME_CLASSES = (
    "Abuse",
    "Arrest",
    "Arson",
    "Assault",
    "Burglary",
    "Explosion",
    "Fighting",
    "RoadAccidents",
    "Robbery",
    "Shooting",
    "Shoplifting",
    "Stealing",
    "Vandalism",
)


def cpu_model() -> str:
    """The CPU as /proc/cpuinfo names it: every figure names its machine."""
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        if line.startswith("model name"):
            return line.split(":", 1)[1].strip()
    return platform.processor()


def cpu_seconds() -> float:
    """User + system seconds of this process and its finished children."""
    return sum(
        r.ru_utime + r.ru_stime
        for r in (resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN))
    )


def emit(result: dict, path: Path | None) -> None:
    """Print the result as one JSON line, and append it to ``path`` when given."""
    line = json.dumps(result)
    print(line)
    if path:
        with path.open("a") as f:
            f.write(line + "\n")
