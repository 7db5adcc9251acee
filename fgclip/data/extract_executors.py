"""Where ``extract_frames`` decodes its videos: a local process pool, or Dask's distributed scheduler.

One job: call ``extract`` (:func:`fgclip.data.frames.extract_video`) on every video job and
hand each result to ``done`` as it finishes, in no particular order (the stage puts them back
in job order). ``extract`` is a pure function of its job that writes only under ``job.out``,
so every executor writes the same images, done markers and Parquet files, and resumes the
same way. A cluster's workers must see the data root and ``frames.out`` at the same paths
(a shared filesystem) and run this repository's environment.

- ``processes`` (``frames.executor``): ``workers`` spawned processes, or this process for
  one worker. Each ends with the stage process however that dies (:func:`end_with_parent`).
- ``dask``: one task a video, keyed ``extract_frames-<video>-<token of this run>``
  (``pure=False``: never a result another run left on the scheduler), on the scheduler at
  ``frames.dask_address``, else on a ``LocalCluster`` of ``workers`` single-threaded worker
  processes bound to 127.0.0.1 (no dashboards, no memory limit, as the pool has none),
  closed with the stage. Its worker processes exit when the stage process dies (distributed's
  own parent-alive pipe). On an external cluster the tasks running when the stage dies finish
  (their images and markers are written whole); its queued ones are dropped with its client.

A crash is never dropped: a task that raises, or whose worker dies (``BrokenProcessPool``,
Dask's ``KilledWorker``), fails the stage with :class:`VideoTaskError` naming the video, the
worker's exception chained (on an external scheduler, after its own retries:
``distributed.scheduler.allowed-failures``, 3 by default). Bad videos are not crashes: ``extract`` returns them as failed
results, rows of ``failures.parquet``.
"""

from __future__ import annotations

import asyncio
import ctypes
import logging
import multiprocessing
import os
import signal
import sys
import threading
import time
import uuid
from collections.abc import Callable, Sequence
from concurrent.futures import ProcessPoolExecutor, as_completed
from contextlib import ExitStack
from typing import TYPE_CHECKING, Literal

from fgclip.errors import FGClipError

if TYPE_CHECKING:
    from fgclip.data.frames import VideoJob

logger = logging.getLogger(__name__)

Extract = Callable[["VideoJob"], dict]
Done = Callable[[dict], None]

MISSING_DASK = "frames.executor: dask needs the `cluster` extra: pip install 'fgclip-vad[cluster]'"
# How long a scheduler at frames.dask_address has to answer before the stage gives up.
CONNECT_TIMEOUT_S = 10.0


class VideoTaskError(RuntimeError):
    """A video's task raised, or its worker died: the stage fails, as any crash does (a retry may pass)."""


def run_jobs(
    jobs: Sequence[VideoJob],
    extract: Extract,
    done: Done,
    *,
    executor: Literal["processes", "dask"],
    workers: int,
    dask_address: str | None = None,
) -> None:
    """``done(extract(job))`` for every job on ``executor``; ``workers`` >= 1 (ignored with an address)."""
    if executor == "dask":
        run_dask(jobs, extract, done, workers=workers, address=dask_address)
    else:
        run_processes(jobs, extract, done, workers=workers)


def _crashed(video: str, where: str, exc: BaseException) -> VideoTaskError:
    text = " ".join(str(exc).split())  # one line, whatever the worker's message
    return VideoTaskError(
        f"extract_frames: {video}: {where}: {type(exc).__name__}" + (f": {text}" if text else "")
    )


PR_SET_PDEATHSIG = 1  # <linux/prctl.h>


def end_with_parent(parent: int) -> None:
    """Pool initializer: the worker ends when the stage process does, however that dies.

    A SIGKILLed stage (the OOM killer, a scheduler's ``kill -9``) runs no cleanup,
    and its workers went on as orphans, writing images and done markers into the
    directory a rerun was rewriting. Linux sends SIGKILL to the worker when the thread
    that started it exits (the pool starts workers from the caller's thread, which
    outlives the pool); elsewhere a thread watches for the worker being reparented.
    """
    armed = False
    if sys.platform.startswith("linux"):
        libc = ctypes.CDLL(None, use_errno=True)
        armed = libc.prctl(PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0) == 0
    if not armed:

        def watch() -> None:
            while os.getppid() == parent:
                time.sleep(0.5)
            os._exit(1)

        threading.Thread(target=watch, name="end-with-parent", daemon=True).start()
    if os.getppid() != parent:  # the parent died before the signal was armed
        os._exit(1)


def run_processes(jobs: Sequence[VideoJob], extract: Extract, done: Done, *, workers: int) -> None:
    """In this process for one worker, else in a pool of ``workers`` spawned processes."""
    if workers == 1:
        for job in jobs:
            done(extract(job))
        return
    # spawn: forking a parent that holds pyarrow/torch threads can deadlock the child
    ctx = multiprocessing.get_context("spawn")
    with ProcessPoolExecutor(
        max_workers=workers, mp_context=ctx, initializer=end_with_parent, initargs=(os.getpid(),)
    ) as pool:
        futures = {pool.submit(extract, job): job.video for job in jobs}
        for future in as_completed(futures):
            try:
                result = future.result()
            except Exception as exc:
                pool.shutdown(wait=False, cancel_futures=True)  # the queued videos: not started
                raise _crashed(futures[future], "its worker process failed", exc) from exc
            done(result)


def run_dask(
    jobs: Sequence[VideoJob], extract: Extract, done: Done, *, workers: int, address: str | None
) -> None:
    """One task a video on the scheduler at ``address``, else on a LocalCluster of ``workers``."""
    try:
        import distributed
    except ImportError as exc:
        raise FGClipError(MISSING_DASK) from exc
    with ExitStack() as stack:
        if address is None:
            cluster = stack.enter_context(
                distributed.LocalCluster(
                    n_workers=workers,
                    threads_per_worker=1,
                    processes=True,
                    host="127.0.0.1",  # loopback only: the project's servers bind to 127.0.0.1
                    dashboard_address=None,
                    worker_dashboard_address=None,
                    memory_limit=None,
                    # The scheduler's HTTP server (health, metrics) always listens: on a free
                    # loopback port, not 8787 (another cluster or dashboard may hold that one).
                    # allowed_failures 0: a video that kills its worker fails the stage at once,
                    # as in the process pool, instead of killing up to 4 workers in turn.
                    scheduler_kwargs={"dashboard_address": "127.0.0.1:0", "allowed_failures": 0},
                )
            )
            client = stack.enter_context(distributed.Client(cluster, set_as_default=False))
        else:
            try:
                client = distributed.Client(address, timeout=CONNECT_TIMEOUT_S, set_as_default=False)
            except Exception as exc:  # refused, timed out, a malformed address: one line each
                detail = " ".join(str(exc).split())
                raise FGClipError(
                    f"frames.dask_address: no Dask scheduler answered at {address} within "
                    f"{CONNECT_TIMEOUT_S:g} s ({type(exc).__name__}: {detail})"
                ) from exc
            stack.enter_context(client)
        token = uuid.uuid4().hex
        logger.info(
            "extract_frames: %d videos on the Dask scheduler at %s", len(jobs), client.scheduler.address
        )
        futures = client.map(
            extract, list(jobs), key=[f"extract_frames-{job.video}-{token}" for job in jobs], pure=False
        )
        videos = {future.key: job.video for future, job in zip(futures, jobs)}
        for future in distributed.as_completed(futures, loop=client.loop):  # not the default client's
            try:
                result = future.result()
            # distributed's cancellations (a lost scheduler) are asyncio's, BaseExceptions
            except (Exception, asyncio.CancelledError) as exc:
                client.cancel(futures)
                raise _crashed(videos[future.key], "its Dask task failed", exc) from exc
            done(result)
