"""Stage ``train``: fine-tune the video FG-CLIP, with checkpoints, tracking and health gates.

One optimizer step = ``train.grad_accum_steps`` forward passes. Every
``train.log_every`` steps log a ``[LOSS]`` line (logger ``fgclip.train``) and MLflow
metrics; with runtime diagnostics on, ``[DIAG]`` lines every ``train.diag_every``
steps. With ``train.sync_every`` > 1 the step reads its values on the host only
every that many steps (:func:`_syncs_at`): the steps in between are recorded and
logged there, in order, and a non-finite one stops the run there, naming its own
step. Checkpoints are written every ``train.checkpoint_every`` steps and at the
last one, and a run resumes from the newest checkpoint of the same
configuration (see ``checkpoints.py``) exactly where it stopped: same data
order, same random draws, same memory bank, so on CPU a resumed run equals an
uninterrupted one.

A non-finite loss or gradient, or a NaN/Inf weight at a checkpoint step or at
the end, stops the run with :class:`NonFiniteLossError` before anything is
written for that step. ``FGCLIP_FAULT_NAN_AT_STEP=N`` injects
a NaN into the loss of optimizer step N, to exercise that path in tests and
fault drills.

Distributed: under ``torchrun`` (``WORLD_SIZE`` > 1) each process trains on its
own share of every batch (gloo on CPU, NCCL on CUDA), the losses gather features
from all ranks, and only rank 0 logs, tracks and writes files. W processes at
``train.batch_size`` B train what one process trains at W x B, up to float rounding
(the losses are world-size invariant: ``fgclip.model.losses.rank_shares``), and log
the same losses. Every rank resumes from the checkpoints it sees, so
``train.checkpoints`` must be on a filesystem every node shares; ranks that would
start from different steps stop at once (:class:`ResumeMismatchError`).
"""

from __future__ import annotations

import csv
import json
import logging
import math
import os
import random
import time
from collections.abc import Iterator
from contextlib import nullcontext
from dataclasses import dataclass, field
from datetime import timedelta
from pathlib import Path
from typing import Any, NoReturn

import numpy as np
import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import DataLoader
from tqdm import tqdm
from transformers import PreTrainedTokenizerBase

from fgclip import metric_keys
from fgclip.atomic import write_text_atomic
from fgclip.config import HealthConfig, Params, TrainConfig, model_source
from fgclip.data.batch import Batch, collate
from fgclip.data.dataset import EpochBatchSampler, VideoClipDataset
from fgclip.data.layout import INDEX_FILE
from fgclip.device import on_cuda, resolve_device
from fgclip.errors import FGClipError
from fgclip.model.fgclip import FGCLIPVideoModel
from fgclip.model.memory_bank import RegionMemoryBank
from fgclip.model.tokenizer import load_tokenizer
from fgclip.outputs import check_output_dir, replacing_output_dir
from fgclip.train.checkpoints import (
    RUN_FILE,
    capture_rng_state,
    input_fingerprint,
    restore_rng_state,
    resume_latest,
    run_fingerprint,
    save_checkpoint,
    verify_export,
)
from fgclip.train.diagnostics import HealthMonitor, diag_figures, log_diag, runtime_diag_enabled
from fgclip.train.loss_plot import write_loss_png
from fgclip.train.mlflow_links import run_url
from fgclip.train.optim import describe_groups
from fgclip.train.runlock import RunLock
from fgclip.train.step import LOSS_COLUMNS, NonFiniteValue, StepResult, TrainStep
from fgclip.train.tracking import DatasetRef, Tracker, flatten_params, source_tags

logger = logging.getLogger(__name__)
train_log = logging.getLogger("fgclip.train")  # the user-facing [LOSS] / [DIAG] lines

FAULT_ENV = "FGCLIP_FAULT_NAN_AT_STEP"
# MLflow tag <- environment variable set by the orchestrator (pipeline/flow.py).
ORCHESTRATOR_TAG_ENV = {
    "prefect.flow_run_id": "FGCLIP_FLOW_RUN_ID",
    "prefect.flow_run_name": "FGCLIP_FLOW_RUN_NAME",
    # Set by DVC for a queued experiment (`fgclip ablate`): which experiment trained the run.
    "dvc.experiment": "DVC_EXP_NAME",
    "dvc.baseline_rev": "DVC_EXP_BASELINE_REV",
}


class NonFiniteLossError(FGClipError, FloatingPointError):
    """A loss or the gradient norm became NaN/Inf; nothing was saved for that step."""

    def __init__(self, step: int, what: str, value: float, last_checkpoint: Path | None) -> None:
        self.step, self.what, self.value = step, what, value
        where = f"the last good checkpoint is {last_checkpoint}" if last_checkpoint else "no checkpoint yet"
        super().__init__(f"non-finite {what} = {value} at optimizer step {step}: training stopped; {where}")


@dataclass(frozen=True)
class DistContext:
    """This process's place in a (possibly single-process) run."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def enabled(self) -> bool:
        return self.world_size > 1


@dataclass(frozen=True)
class TrainPaths:
    """Everything the stage reads and writes: the caller's paths, else ``params.paths``."""

    frames: Path
    boxes: Path
    model: str  # pretrained CLIP: a directory or a hub id
    out: Path
    checkpoints: Path
    health: Path
    metrics: Path
    loss_csv: Path
    loss_png: Path


@dataclass
class _Run:
    """The mutable training state a checkpoint captures."""

    trainer: TrainStep
    monitor: HealthMonitor
    step: int = 0
    history: list[dict[str, float]] = field(default_factory=list)

    @property
    def model(self) -> FGCLIPVideoModel:
        return self.trainer.model

    @property
    def bank(self) -> RegionMemoryBank:
        return self.trainer.bank

    def state(self) -> dict[str, Any]:
        return {
            "optimizer": self.trainer.optimizer.state_dict(),
            "scheduler": self.trainer.scheduler.state_dict(),
            "memory_bank": self.bank.state_dict(),
            "health": self.monitor.state_dict(),
            "history": self.history,
            "rng": capture_rng_state(),
        }

    def restore(self, state: dict[str, Any], meta: dict[str, Any]) -> None:
        built = [bool(g.get("fused")) for g in self.trainer.optimizer.param_groups]
        self.trainer.optimizer.load_state_dict(state["optimizer"])
        saved = [bool(g.get("fused")) for g in self.trainer.optimizer.param_groups]
        if saved != built:
            # torch's load_state_dict takes the saved groups' flags: the run goes on as it was saved.
            logger.warning(
                "resuming with the checkpoint's AdamW (fused=%s), not train.fused_adamw's (fused=%s)",
                saved[0], built[0],
            )
        self.trainer.scheduler.load_state_dict(state["scheduler"])
        self.bank.load_state_dict(state["memory_bank"])
        self.monitor.load_state_dict(state["health"])
        self.history = list(state["history"])
        restore_rng_state(state["rng"])
        self.step, self.trainer.forward_passes = meta["step"], meta["forward_passes"]


def _init_distributed(cfg: TrainConfig) -> DistContext:
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    if world_size <= 1:
        return DistContext()
    ctx = DistContext(int(os.environ["RANK"]), world_size, int(os.environ.get("LOCAL_RANK", "0")))
    if not dist.is_initialized():
        # A peer that dies closes its sockets and the others fail at once; one that stops
        # answering (a frozen or partitioned node) is only noticed when a collective has
        # waited train.dist_timeout_s.
        dist.init_process_group(
            "nccl" if on_cuda(cfg.device) else "gloo", timeout=timedelta(seconds=cfg.dist_timeout_s)
        )
    return ctx


def train(
    params: Params,
    frames_dir: Path,
    boxes_dir: Path,
    model_path: str,
    out: Path,
    checkpoints_dir: Path,
    health_path: Path,
    *,
    resume: bool = True,
    max_steps: int | None = None,
    metrics_path: Path | None = None,
    loss_csv: Path | None = None,
    loss_png: Path | None = None,
) -> dict[str, Any]:
    """Fine-tune from the CLIP at ``model_path``; write the model to ``out``; return the summary.

    ``max_steps`` stops this invocation after that optimizer step (a checkpoint is
    written there) while the learning-rate schedule still spans ``train.max_steps``:
    an interrupted run, on purpose. ``resume=False`` ignores existing checkpoints.
    The summary also goes to ``metrics_path`` (default ``train.metrics``) and the
    per-step losses of the whole run to ``loss_csv`` (default ``train.loss_curve``), drawn
    in ``loss_png`` (default ``train.loss_plot``).
    """
    paths = TrainPaths(
        frames=Path(frames_dir),
        boxes=Path(boxes_dir),
        model=str(model_path),
        out=Path(out),
        checkpoints=Path(checkpoints_dir),
        health=Path(health_path),
        metrics=Path(metrics_path) if metrics_path else params.paths.train_metrics,
        loss_csv=Path(loss_csv) if loss_csv else params.paths.loss_curve,
        loss_png=Path(loss_png) if loss_png else params.paths.loss_plot,
    )
    check_output_dir(paths.out, _STAGE, _kept_paths(paths))  # before training, not after it
    ctx = _init_distributed(params.train)
    device = resolve_device(params.train.device, ctx.local_rank)
    deterministic_before = torch.are_deterministic_algorithms_enabled()
    if device.type == "cpu":
        torch.use_deterministic_algorithms(True, warn_only=True)
    # Rank 0 holds <run_dir>/train.lock for the whole run: a second job on the same
    # run directory fails here, and `fgclip checkpoints clean` leaves the run alone.
    lock = RunLock(paths.checkpoints / params.train.run_name) if ctx.is_main else None
    try:
        with lock or nullcontext():
            return _train(params, paths, ctx, device, resume=resume, max_steps=max_steps, lock=lock)
    finally:
        torch.use_deterministic_algorithms(deterministic_before)
        if ctx.enabled and dist.is_initialized():
            dist.destroy_process_group()


def _seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def _build(params: Params, paths: TrainPaths, device: torch.device) -> _Run:
    cfg = params.train
    model = FGCLIPVideoModel.from_clip(
        paths.model, params.model, source=paths.model, tolerance=cfg.health.logit_scale_tolerance
    ).to(device)
    trainer = TrainStep.build(model, cfg, device)
    monitor = HealthMonitor(cfg.health, params)
    monitor.record_init({name: p.item() for name, p in model.named_scales().items()}, _init_note(model))
    return _Run(trainer, monitor)


def _loader(
    dataset: VideoClipDataset, params: Params, ctx: DistContext, device: torch.device
) -> tuple[DataLoader, EpochBatchSampler]:
    cfg = params.train
    sampler = EpochBatchSampler(
        len(dataset), cfg.batch_size, cfg.seed, rank=ctx.rank, world_size=ctx.world_size
    )
    loader = DataLoader(
        dataset,
        batch_sampler=sampler,
        collate_fn=collate,
        num_workers=cfg.num_workers,
        persistent_workers=cfg.num_workers > 0,
        pin_memory=device.type == "cuda",
        generator=torch.Generator().manual_seed(cfg.seed),
    )
    return loader, sampler


def _batches(loader: DataLoader, sampler: EpochBatchSampler, forward_passes: int) -> Iterator[Batch]:
    """Endless batches, cycling epochs, starting after ``forward_passes`` batches already consumed."""
    epoch, start = divmod(forward_passes, len(sampler))
    while True:
        sampler.set_position(epoch, start)
        yield from loader
        epoch, start = epoch + 1, 0


def _init_note(model: FGCLIPVideoModel) -> str:
    """Why the scales start where they do, for the ``logit_scale_init`` gate: one clause per scale."""
    notes = []
    for name in model.named_scales():
        report = model.load_report.get(name, {})
        action, source = report.get("action"), report.get("source")
        if action == "reinit":
            notes.append(
                f"the loaded {name} scale from {source} was re-initialised (loaded_logit_scale=reinit)"
            )
        elif action == "kept":
            notes.append(f"the loaded {name} scale from {source} was kept (loaded_logit_scale=keep)")
    return "; ".join(notes)


def _train(
    params: Params,
    paths: TrainPaths,
    ctx: DistContext,
    device: torch.device,
    *,
    resume: bool,
    max_steps: int | None,
    lock: RunLock | None = None,
) -> dict[str, Any]:
    cfg = params.train
    stop_step = cfg.max_steps if max_steps is None else min(max_steps, cfg.max_steps)
    # The same seed on every rank: the model's new layers must start identical
    # everywhere (per-item data randomness is keyed on the item, not the rank).
    _seed_everything(cfg.seed)
    tokenizer = load_tokenizer(paths.model)
    run = _build(params, paths, device)
    if ctx.is_main:
        train_log.info(describe_groups(run.trainer.optimizer))
    dataset = VideoClipDataset(
        params, paths.frames, paths.boxes, tokenizer, split="train", pixel_stats=run.model.pixel_stats
    )
    loader, sampler = _loader(dataset, params, ctx, device)

    fingerprint, fp_params = run_fingerprint(
        params, input_fingerprint(paths.model, paths.frames, paths.boxes)
    )
    run_dir = paths.checkpoints / cfg.run_name
    run_id = None
    # Verified whole (digests, meta.json fields, finite weights) before the model is touched.
    resumed = resume_latest(run_dir, fingerprint, fp_params, run.model, device) if resume else None
    last_checkpoint = resumed[0] if resumed is not None else None
    if resumed is not None:
        _, state, meta = resumed
        run.restore(state, meta)
        run_id = meta.get("run_id")
        logger.info("Resuming from %s (optimizer step %d, %d forward passes)",
                    last_checkpoint, run.step, run.trainer.forward_passes)  # fmt: skip
        run.model.log_scales(last_checkpoint)
        if lock is not None:
            lock.update(last_checkpoint)
    elif not resume and any(run_dir.glob("checkpoint-*")):
        logger.warning("resume=False: ignoring the checkpoints in %s (equal steps are overwritten)", run_dir)

    if ctx.enabled:
        _check_same_start(run, run_dir, device)
        run.trainer.forward = DistributedDataParallel(
            run.model, device_ids=[device.index] if device.type == "cuda" else None
        )
        run.trainer.distributed = True
    diag = runtime_diag_enabled(params)
    fault_step = int(os.environ.get(FAULT_ENV, "0") or 0)
    samples_per_step = cfg.batch_size * cfg.grad_accum_steps * ctx.world_size
    start_step, started = run.step, time.perf_counter()
    saved_at = run.step  # the steps since the last checkpoint score the next one
    tags = {"run_name": cfg.run_name, "fingerprint": fingerprint, "model_path": paths.model,
            "device": str(device), "world_size": ctx.world_size}  # fmt: skip
    # The orchestrator's run (pipeline/flow.py passes it through `dvc repro`): which
    # flow run trained (or resumed) this MLflow run.
    tags.update({tag: os.environ[var] for tag, var in ORCHESTRATOR_TAG_ENV.items() if os.environ.get(var)})
    if ctx.is_main:
        tags.update(source_tags(params.base_dir, "fgclip train"))

    with (
        Tracker(params, cfg.run_name, run_id=run_id, enabled=ctx.is_main, tags=tags) as tracker,
        tracker.system_metrics(cfg.log_system_metrics, cfg.system_metrics_interval_s),
    ):
        tracker.log_params(flatten_params(params))
        tracker.log_datasets(_datasets(paths, fp_params, dataset))
        if tracker.enabled:
            logger.info("MLflow run: %s", run_url(tracker.tracking_uri, tracker.experiment_id, tracker.run_id))
        batches = _batches(loader, sampler, run.trainer.forward_passes)
        bar = tqdm(
            total=stop_step,
            initial=run.step,
            desc="train",
            unit="step",
            disable=None if ctx.is_main else True,
        )

        def record(step: int, done: StepResult, throughput: float) -> None:
            """Keep and log a settled step (with train.sync_every > 1, up to sync_every - 1 steps late)."""
            losses, zero_norm = done.losses, done.zero_norm_frac
            run.monitor.observe(step, losses["loss_region"], zero_norm)
            run.history.append({"step": step, **losses})
            bar.set_postfix(loss=f"{losses['loss']:.4f}", samples_s=f"{throughput:.1f}")
            scale_global, scale_region, scale_hardneg = done.scales
            if ctx.is_main and (step % cfg.log_every == 0 or step == stop_step):
                train_log.info("[LOSS] step=%d loss=%.4f loss_global=%.4f loss_region=%.4f loss_hardneg=%.4f",
                               step, losses["loss"], losses["loss_global"], losses["loss_region"],
                               losses["loss_hardneg"])  # fmt: skip
                metrics = {metric_keys.train(name): value for name, value in losses.items()}
                metrics.update({
                    metric_keys.train("logit_scale"): scale_global,
                    metric_keys.train("logit_scale_region"): scale_region,
                    metric_keys.train("logit_scale_hardneg"): scale_hardneg,
                    metric_keys.train("temperature"): math.exp(scale_global),
                    metric_keys.train("temperature_region"): math.exp(scale_region),
                    metric_keys.train("temperature_hardneg"): math.exp(scale_hardneg),
                    metric_keys.train("lr"): done.lr,
                    metric_keys.train("backbone_lr"): done.backbone_lr,
                    metric_keys.train("grad_norm"): done.grad_norm,
                    metric_keys.train("samples_per_s"): throughput,
                    metric_keys.train("loader_samples_per_s"): samples_per_step / max(done.data_wait_s, 1e-6),
                })  # fmt: skip
                tracker.log_metrics(metrics, step=step)

        run.model.train()
        window_start = None  # when the first step not yet recorded started
        while run.step < stop_step:
            step = run.step + 1
            if window_start is None:
                window_start = time.perf_counter()
            sync = _syncs_at(step, cfg, stop_step, diag)
            try:
                done = run.trainer(batches, inject_nan=step == fault_step, sync=sync)
            except NonFiniteValue as bad:
                bad_step = step - bad.steps_back  # the oldest bad step; the finite ones before it are kept
                ran = len(bad.earlier) + bad.steps_back  # the unsynced steps before this call
                throughput = samples_per_step * ran / (time.perf_counter() - window_start)
                for offset, earlier in enumerate(bad.earlier):
                    record(bad_step - len(bad.earlier) + offset, earlier, throughput)
                _stop(run, paths, ctx, bad_step, bad, last_checkpoint)
            run.step = step
            bar.update(1)
            if not sync:
                continue  # nothing below happens at an unsynced step (see _syncs_at)
            settled = [*done.earlier, done]
            throughput = samples_per_step * len(settled) / (time.perf_counter() - window_start)
            window_start = None
            for offset, result in enumerate(settled):
                record(step - len(settled) + 1 + offset, result, throughput)
            if ctx.is_main and diag and step % cfg.diag_every == 0:
                scale_global, scale_region, _ = done.scales
                figures = diag_figures(
                    scale_global, scale_region, done.last.logits_i2t, run.bank.state(), done.zero_norm_frac
                )
                log_diag(step, figures)
                tracker.log_metrics(figures, step=step)
            if step % cfg.checkpoint_every == 0 or step == stop_step:
                # Every rank checks (the weights are the same on all): a NaN weight the loss never
                # reads is stopped on here, before it reaches a checkpoint.
                bad_weight = run.monitor.check_weights(step, run.model)
                if bad_weight is not None:
                    _stop(run, paths, ctx, step, NonFiniteValue(*bad_weight), last_checkpoint)
                if ctx.is_main:
                    # Metrics up to this step go to MLflow before the checkpoint exists: a run
                    # killed after the save resumes past them and would never log them again.
                    tracker.flush()
                    meta = {"forward_passes": run.trainer.forward_passes, "fingerprint": fingerprint,
                            "fingerprint_params": fp_params, "run_id": tracker.run_id,
                            "loss": _mean_loss(run.history, saved_at)}  # fmt: skip
                    last_checkpoint = save_checkpoint(
                        run_dir,
                        step,
                        model=run.model,
                        state=run.state(),
                        meta=meta,
                        keep=cfg.keep_checkpoints,
                    )
                    if lock is not None:
                        lock.update(last_checkpoint)
                saved_at = step
                if ctx.enabled:
                    dist.barrier()
        bar.close()
        # Also when nothing was trained (a finished run resumed): nothing non-finite is published.
        bad_weight = run.monitor.check_weights(run.step, run.model)
        if bad_weight is not None:
            _stop(run, paths, ctx, run.step, NonFiniteValue(*bad_weight), last_checkpoint)

        steps_run, seconds = run.step - start_step, time.perf_counter() - started
        summary = _summary(
            params, run, tracker, start_step, steps_run * samples_per_step / seconds if steps_run else None
        )
        if ctx.is_main:
            _write_outputs(run, tokenizer, tracker, paths, summary, params.train.health)
    if ctx.is_main:
        run.monitor.raise_if_failed(summary["health"], paths.health)
    return summary


class ResumeMismatchError(FGClipError, RuntimeError):
    """Under DDP the ranks would go on from different checkpoints (each reads its own checkpoint directory)."""


def _check_same_start(run: _Run, run_dir: Path, device: torch.device) -> None:
    """Every rank must start from the same optimizer step and data position, or all stop here.

    Each rank resumes from the checkpoints it sees in ``run_dir``. DDP broadcasts rank
    0's weights, but not the optimizer, the bank, the data position or the step count:
    ranks that found different checkpoints (``train.checkpoints`` not on a filesystem
    every node shares) would pair their collectives up step by step and train wrong
    without a word, then hang or fail when the first rank finishes.
    """
    mine = torch.tensor([run.step, run.trainer.forward_passes], dtype=torch.long, device=device)
    every = [torch.zeros_like(mine) for _ in range(dist.get_world_size())]
    dist.all_gather(every, mine)
    if any(not torch.equal(t, every[0]) for t in every):
        steps = ", ".join(f"rank {r}: {int(t[0])}" for r, t in enumerate(every))
        raise ResumeMismatchError(
            f"the ranks would start from different optimizer steps ({steps}): each rank resumes from "
            f"its own view of {run_dir}; put train.checkpoints (--checkpoints) on a filesystem every "
            "node shares, or start every node with --no-resume"
        )


def _syncs_at(step: int, cfg: TrainConfig, stop_step: int, diag: bool) -> bool:
    """Whether optimizer step ``step`` reads its values on the host (``TrainStep(sync=...)``).

    Every ``train.sync_every``-th step, and every step that needs the host to know: a
    checkpoint step (nothing bad is ever saved), a [DIAG] step (logits and bank of that
    step) and the last one. [LOSS] lines and MLflow points of the steps in between are
    written at the next sync, with their own step numbers. ``sync_every`` 1: every step.
    """
    return (
        step % cfg.sync_every == 0
        or step % cfg.checkpoint_every == 0
        or step == stop_step
        or (diag and step % cfg.diag_every == 0)
    )


def _datasets(paths: TrainPaths, fingerprint_params: dict[str, Any], dataset: VideoClipDataset) -> list[DatasetRef]:
    """The frame index and the box shards, under the digests the run's fingerprint holds."""
    return [
        DatasetRef("frames_index", fingerprint_params["input.frames_index"], (paths.frames / INDEX_FILE).resolve(),
                   {"training_videos": len(dataset)}),
        DatasetRef("box_shards", fingerprint_params["input.boxes"], Path(paths.boxes).resolve()),
    ]  # fmt: skip


def _mean_loss(history: list[dict[str, float]], after_step: int) -> float:
    """Mean training loss of the steps after ``after_step``: the checkpoint's score (lower is better)."""
    recent = [row["loss"] for row in history if row["step"] > after_step]
    return sum(recent) / len(recent)


def _stop(
    run: _Run, paths: TrainPaths, ctx: DistContext, step: int, bad: NonFiniteValue, last: Path | None
) -> NoReturn:
    """Record the non-finite value in health.json and raise; the last checkpoint stays as it is."""
    run.monitor.record_nonfinite(step, bad.what, bad.value)
    if ctx.is_main:
        run.monitor.write(paths.health, run.bank.state())
    raise NonFiniteLossError(step, bad.what, bad.value, last) from bad


def _summary(
    params: Params, run: _Run, tracker: Tracker, start_step: int, samples_per_s: float | None
) -> dict[str, Any]:
    scale_global, scale_region, scale_hardneg = (s.item() for s in run.model.scales())
    checks = run.monitor.checks(run.bank.state())
    return {
        "steps": run.step,
        "start_step": start_step,
        "total_steps": params.train.max_steps,
        "final": run.history[-1] if run.history else None,
        "logit_scale_global": scale_global,
        "logit_scale_region": scale_region,
        "logit_scale_hardneg": scale_hardneg,
        "temperature_global": math.exp(scale_global),
        "temperature_region": math.exp(scale_region),
        "temperature_hardneg": math.exp(scale_hardneg),
        "memory_bank": run.bank.state(),
        "samples_per_s": samples_per_s,
        "run_id": tracker.run_id,
        "experiment_id": tracker.experiment_id,
        "tracking_uri": tracker.tracking_uri,
        "health_passed": all(c["passed"] for c in checks.values()),
        "health": checks,
    }


_STAGE = "train"


def _kept_paths(paths: TrainPaths) -> dict[str, Path | str]:
    """What replacing ``paths.out`` must never delete: the inputs, and the checkpoints."""
    return {
        "--model": model_source(paths.model),
        "--frames": paths.frames,
        "--boxes": paths.boxes,
        "--checkpoints": paths.checkpoints,
    }


def _write_outputs(
    run: _Run,
    tokenizer: PreTrainedTokenizerBase,
    tracker: Tracker,
    paths: TrainPaths,
    summary: dict[str, Any],
    gate: HealthConfig,
) -> None:
    """Model + tokenizer + run.json, health.json, train.json and the loss curve and plot (rank 0).

    The model directory is replaced as a whole (``fgclip.outputs``): never a mix of two
    runs' files, and never a directory this stage did not write.
    """
    run_info = {
        "run_id": tracker.run_id,
        "experiment_id": tracker.experiment_id,
        "tracking_uri": tracker.tracking_uri,
    }
    with replacing_output_dir(paths.out, _STAGE, _kept_paths(paths)) as tmp:
        run.model.save_pretrained(tmp)
        verify_export(tmp, run.model)
        tokenizer.save_pretrained(tmp)
        write_text_atomic(tmp / RUN_FILE, json.dumps(run_info, indent=2) + "\n")

    checks = run.monitor.write(paths.health, run.bank.state())
    tracker.log_health(checks, paths.health)

    paths.metrics.parent.mkdir(parents=True, exist_ok=True)
    write_text_atomic(paths.metrics, json.dumps(summary, indent=2, default=str) + "\n")
    paths.loss_csv.parent.mkdir(parents=True, exist_ok=True)
    with paths.loss_csv.open("w", newline="", encoding="utf-8") as f:
        writer = csv.DictWriter(f, fieldnames=["step", *LOSS_COLUMNS])
        writer.writeheader()
        writer.writerows(run.history)
    write_loss_png(paths.loss_png, run.history, gate)
    tracker.log_artifact(paths.loss_png)
    logger.info("model saved to %s (MLflow run %s)", paths.out, tracker.run_id)
