"""extract_frames on Dask's distributed scheduler (frames.executor: dask): the process pool's outputs.

Real clusters of 2 single-threaded worker processes on 127.0.0.1: one the stage starts itself
(no frames.dask_address), one started here and passed by its address, as a cluster's would be.
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import distributed
import psutil
import pyarrow.parquet as pq
import pytest
from test_frames import _break_videos

from fgclip.config import Params, ParamsError
from fgclip.data import extract_executors
from fgclip.data.extract_executors import MISSING_DASK, VideoTaskError, run_jobs
from fgclip.data.frames import VideoJob, extract_frames, extract_video
from fgclip.errors import FGClipError

OUTPUTS = ("index.parquet", "videos.parquet", "failures.parquet")


@pytest.fixture(scope="module")
def cluster() -> distributed.LocalCluster:
    """An "external" cluster: started here, reached by the stage through its address only."""
    with distributed.LocalCluster(
        n_workers=2,
        threads_per_worker=1,
        processes=True,
        host="127.0.0.1",
        dashboard_address=None,
        worker_dashboard_address=None,
        memory_limit=None,
        scheduler_kwargs={"dashboard_address": "127.0.0.1:0"},
    ) as local:
        yield local


def _extract(params: Params, root: Path, out: Path, **frames: object) -> dict:
    return extract_frames(params.with_overrides(frames=frames), root, root / "annotations.json", out)


def _files(out: Path) -> dict[Path, bytes]:
    return {p.relative_to(out): p.read_bytes() for p in sorted(out.rglob("*")) if p.is_file()}


def _assert_same_outputs(a: Path, b: Path) -> None:
    for name in OUTPUTS:
        assert pq.read_table(a / name).equals(pq.read_table(b / name)), name
    files_a, files_b = _files(a), _files(b)
    assert sorted(files_a) == sorted(files_b)
    assert any(p.suffix == ".jpg" for p in files_a)
    for path, data in files_a.items():  # every JPEG, done marker and Parquet file, byte for byte
        assert files_b[path] == data, path


def test_dask_writes_what_the_process_pool_writes_and_resumes(
    tiny_params: Params, tiny_sample: Path, cluster: distributed.LocalCluster, tmp_path: Path
):
    pool, dask = tmp_path / "pool", tmp_path / "dask"
    _extract(tiny_params, tiny_sample, pool, workers=2, executor="processes")
    # No address: the stage starts a LocalCluster of frames.workers workers and closes it.
    summary = _extract(tiny_params, tiny_sample, dask, workers=2, executor="dask")
    assert (summary["ok"], summary["resumed"]) == (summary["videos"], 0)
    _assert_same_outputs(pool, dask)
    # Again, on the cluster at an address: every video is resumed from its done marker.
    again = _extract(tiny_params, tiny_sample, dask, executor="dask", dask_address=cluster.scheduler_address)
    assert again["resumed"] == again["videos"] == summary["videos"]
    _assert_same_outputs(pool, dask)


def test_bad_videos_are_the_same_failures_on_dask(
    tiny_params: Params, tiny_sample: Path, cluster: distributed.LocalCluster, tmp_path: Path
):
    root = tmp_path / "sample"
    shutil.copytree(tiny_sample, root)
    broken = _break_videos(root)  # corrupt, truncated, missing, no video stream
    pool, dask = tmp_path / "pool", tmp_path / "dask"
    frames = {"max_failure_frac": 0.5, "workers": 2}
    _extract(tiny_params, root, pool, executor="processes", **frames)
    summary = _extract(
        tiny_params, root, dask, executor="dask", dask_address=cluster.scheduler_address, **frames
    )
    assert summary["failed"] == len(broken)
    reasons = {
        r["video"]: r["reason"].split(":")[0] for r in pq.read_table(dask / "failures.parquet").to_pylist()
    }
    assert {v: reasons[v] for v in broken} == broken
    _assert_same_outputs(pool, dask)


def _job(source: Path, out: Path, video: str) -> VideoJob:
    return VideoJob(
        video=video,
        split="test",
        label="A",
        source=str(source),
        out=str(out),
        train_frames=0,
        snippet_len=16,
        window=None,
        keyframes=(),
        jpeg_quality=95,
    )


def _raise_for_b(job: VideoJob) -> dict:
    """A worker crash on one video (a bug, a full disk): not a bad video, the stage must fail."""
    if job.video == "A/b.mp4":
        raise OSError("No space left on device\n(second line of the worker's message)")
    return extract_video(job)


def _die(job: VideoJob) -> dict:
    os._exit(1)  # the worker process dies under the task (a segfault, the OOM killer)


@pytest.fixture
def three_jobs(tiny_sample: Path, tmp_path: Path) -> list[VideoJob]:
    video = next((tiny_sample / "videos").rglob("*.mp4"))
    return [_job(video, tmp_path / "out", f"A/{name}.mp4") for name in "abc"]


@pytest.mark.parametrize("executor", ["processes", "dask"])
def test_a_task_that_raises_fails_the_stage_naming_the_video(
    executor: str, three_jobs: list[VideoJob], cluster: distributed.LocalCluster
):
    done: list[str] = []
    with pytest.raises(VideoTaskError) as raised:
        run_jobs(
            three_jobs,
            _raise_for_b,
            lambda result: done.append(result["video"]),
            executor=executor,
            workers=2,
            dask_address=cluster.scheduler_address,
        )
    message = str(raised.value)
    assert message.startswith("extract_frames: A/b.mp4: ") and "\n" not in message
    assert "OSError: No space left on device (second line" in message
    assert isinstance(raised.value.__cause__, OSError)  # the worker's own exception, chained
    assert "A/b.mp4" not in done


def test_an_unreachable_scheduler_is_one_line_and_quick(
    tiny_params: Params, tiny_sample: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
):
    with socket.socket() as s:  # a port nothing listens on any more
        s.bind(("127.0.0.1", 0))
        address = f"tcp://127.0.0.1:{s.getsockname()[1]}"
    monkeypatch.setattr(extract_executors, "CONNECT_TIMEOUT_S", 2.0)
    started = time.monotonic()
    with pytest.raises(FGClipError) as raised:
        _extract(tiny_params, tiny_sample, tmp_path / "frames", executor="dask", dask_address=address)
    assert time.monotonic() - started < 10
    message = str(raised.value)
    assert message.startswith(f"frames.dask_address: no Dask scheduler answered at {address} within 2 s (")
    assert "\n" not in message
    assert not (tmp_path / "frames" / "index.parquet").exists()


def test_without_distributed_the_error_names_the_extra(monkeypatch: pytest.MonkeyPatch):
    monkeypatch.setitem(sys.modules, "distributed", None)  # `import distributed` raises ImportError
    with pytest.raises(FGClipError, match="^" + MISSING_DASK.replace("[", r"\[").replace("]", r"\]") + "$"):
        run_jobs([], extract_video, print, executor="dask", workers=1)


def test_executor_is_one_of_two(tiny_params: Params):
    assert (tiny_params.frames.executor, tiny_params.frames.dask_address) == ("processes", None)
    with pytest.raises((ParamsError, ValueError)):
        tiny_params.with_overrides(frames={"executor": "threads"})


# A stage on its own LocalCluster whose two tasks each sleep for a minute.
_SLEEPING_STAGE = """
import time
from fgclip.data.extract_executors import run_jobs
from fgclip.data.frames import VideoJob

def sleep(job):  # defined in __main__: Dask ships it by value
    time.sleep(60)

jobs = [VideoJob(video=f"A/{i}.mp4", split="test", label="A", source="/none", out="/none", train_frames=0,
                 snippet_len=16, window=None, keyframes=(), jpeg_quality=95) for i in range(2)]
run_jobs(jobs, sleep, print, executor="dask", workers=2)
"""


def test_local_cluster_workers_end_with_a_killed_stage():
    """SIGKILL the stage process (as the OOM killer does) while its LocalCluster's workers run tasks."""
    proc = subprocess.Popen([sys.executable, "-c", _SLEEPING_STAGE], stderr=subprocess.DEVNULL)
    workers: list[psutil.Process] = []
    try:
        deadline = time.monotonic() + 60
        while len(workers) < 2:
            assert proc.poll() is None and time.monotonic() < deadline, "the cluster did not start"
            time.sleep(0.1)
            workers = [
                p for p in psutil.Process(proc.pid).children() if "spawn_main" in " ".join(p.cmdline())
            ]
        time.sleep(1)  # the tasks reach the workers
        children = psutil.Process(proc.pid).children(recursive=True)
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait()
        _, alive = psutil.wait_procs(children, timeout=5)
        assert not alive, f"orphaned workers: {[p.cmdline()[-2:] for p in alive]}"
    finally:
        proc.kill()
        proc.wait()
        for p in workers:  # a failed run's orphans, ended by their pid
            if p.is_running():
                p.kill()


@pytest.mark.parametrize("executor", ["processes", "dask"])
def test_a_dead_worker_fails_the_stage(
    executor: str, three_jobs: list[VideoJob], cluster: distributed.LocalCluster
):
    """BrokenProcessPool, or Dask's KilledWorker (the scheduler told to retry on no other worker)."""
    allowed, cluster.scheduler.allowed_failures = cluster.scheduler.allowed_failures, 0
    try:
        with pytest.raises(
            VideoTaskError, match=r"^extract_frames: A/[abc]\.mp4: .*(BrokenProcessPool|KilledWorker)"
        ):
            run_jobs(
                three_jobs[:1],
                _die,
                print,
                executor=executor,
                workers=2,
                dask_address=cluster.scheduler_address,
            )
    finally:
        cluster.scheduler.allowed_failures = allowed
