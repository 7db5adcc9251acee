"""Typed configuration, loaded once from ``params.yaml``.

Every section forbids unknown keys: a misspelt knob (``memory_bank_warmup_step``)
is an error at start-up rather than a silently ignored setting, which is exactly
the class of bug this project exists to prevent.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import re
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any, Literal, Self
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from fgclip.errors import FGClipError

# A name that stays one directory: no separator, not `.` or `..`, no leading dot or dash.
_PLAIN_NAME = re.compile(r"\w[\w.-]*")
LN_100 = math.log(100.0)  # 4.6052: the fine-tuning temperature cap (exp = 100)
CLIP_SCRATCH_LOGIT_SCALE = math.log(1 / 0.07)  # 2.6592: CLIP's from-scratch init


class _Section(BaseModel):
    # No knob means anything as NaN or infinity (`lr: .nan` would train to NaN minutes later).
    model_config = ConfigDict(extra="forbid", frozen=True, allow_inf_nan=False)


class DataConfig(_Section):
    root: str = "data/sample"
    videos_dir: str = "videos"
    train_split: str = "Anomaly_Train.txt"
    test_split: str = "Anomaly_Test.txt"
    temporal_annotations: str = "Temporal_Anomaly_Annotation_for_Testing_Videos.txt"
    annotations: str = "annotations.json"

    @model_validator(mode="after")
    def _inside_root(self) -> DataConfig:
        # The dataset's files live under data.root, and dvc.yaml joins them the same way
        # (${data.root}/${data.annotations}): an absolute one would be two different files.
        for name in ("videos_dir", "train_split", "test_split", "temporal_annotations", "annotations"):
            if Path(getattr(self, name)).is_absolute():
                raise ValueError(f"data.{name} must be relative to data.root, not {getattr(self, name)!r}")
        return self


class SampleConfig(_Section):
    # Where `fgclip sample` writes the generated dataset. Its own key, not data.root: DVC
    # removes a stage's outputs before running it, and data.root may be a real UCF-Crime root.
    out: str = "data/sample"
    seed: int = 0
    width: int = Field(160, ge=32)
    height: int = Field(120, ge=32)
    fps: int = Field(30, ge=1)
    # Each video's length in frames is drawn from [min_video_frames, max_video_frames].
    min_video_frames: int = Field(128, ge=16)
    max_video_frames: int = Field(200, ge=16)
    anomaly_classes: list[str] = ["Arson", "Explosion", "Fighting", "RoadAccidents"]
    train_per_class: int = Field(6, ge=1)
    test_per_class: int = Field(3, ge=1)
    train_normal: int = Field(12, ge=1)
    test_normal: int = Field(6, ge=1)
    bad_boxes: bool = True
    region_paraphrases: bool = False

    @model_validator(mode="before")
    @classmethod
    def _renamed(cls, data: object) -> object:
        # Renamed because model.max_frames is the temporal position table, not a video length.
        if isinstance(data, dict):
            for old, new in (("min_frames", "min_video_frames"), ("max_frames", "max_video_frames")):
                if old in data:
                    raise ValueError(f"sample.{old} is now sample.{new} (the length of a generated video)")
        return data

    @model_validator(mode="after")
    def _frames_range(self) -> SampleConfig:
        if self.max_video_frames < self.min_video_frames:
            raise ValueError("sample.max_video_frames must be >= sample.min_video_frames")
        return self


class FramesConfig(_Section):
    out: str = "data/frames"
    train_frames_per_video: int = Field(16, ge=1)
    snippet_len: int = Field(16, ge=1)
    jpeg_quality: int = Field(95, ge=1, le=100)
    workers: int = Field(0, ge=0)  # 0 = one process per core
    max_failure_frac: float = Field(0.1, ge=0.0, le=1.0)
    # Where videos are decoded (fgclip.data.extract_executors): a local process pool, or Dask's
    # distributed scheduler (the `cluster` extra). Outputs are the same either way.
    executor: Literal["processes", "dask"] = "processes"
    # executor dask: the scheduler's address (tcp://10.0.0.5:8786); None = a LocalCluster of
    # `workers` processes on 127.0.0.1, started for the stage and closed after it.
    dask_address: str | None = Field(None, min_length=1)
    # auto: decode only the packets the selection needs where the container's packet table
    # makes that exact (H.264 in MP4), else every frame; all: always every frame, which also
    # finds damage inside packets the selection does not need.
    decode: Literal["auto", "all"] = "auto"


class BoxesConfig(_Section):
    out: str = "data/boxes"
    metrics: str = "metrics/boxes.json"
    min_area_frac: float = Field(0.005, ge=0.0, lt=1.0)
    clip_tolerance: float = Field(0.02, ge=0.0)
    clip_overshoot: bool = True
    shard_rows: int = Field(100_000, ge=1)
    row_group_rows: int = Field(16_384, ge=1)
    # Hard-negative captions generated per region when annotations.json gives none
    # (FG-CLIP v1 carries 10 per box); 0 = generate none.
    hard_negatives: int = Field(10, ge=0)


class ModelConfig(_Section):
    pretrained: str | None = None
    # How a model.pretrained that is not a CLIPModel directory (an OpenAI .pt, an open_clip
    # checkpoint, an FG-CLIP directory) is converted by the pretrain stage: import-weights'
    # --format, --arch and --activation.
    pretrained_format: Literal["auto", "openai", "open_clip", "fgclip"] = "auto"
    pretrained_arch: str | None = None
    pretrained_activation: Literal["gelu", "quick_gelu"] | None = None
    image_size: int = Field(64, ge=1)
    patch_size: int = Field(8, ge=1)
    vision_hidden: int = Field(96, ge=1)
    vision_layers: int = Field(3, ge=1)
    vision_heads: int = Field(4, ge=1)
    text_hidden: int = Field(96, ge=1)
    text_layers: int = Field(3, ge=1)
    text_heads: int = Field(4, ge=1)
    projection_dim: int = Field(64, ge=1)
    # Tokens per short text: region captions, hard negatives, prompts (CLIP's 77 positions);
    # null = text_len's rule: 77 with a pretrained CLIP, 32 for the stand-in.
    max_text_len: int | None = Field(None, ge=4)
    long_text: bool = False
    # Tokens per global caption; null = 248 with long_text (FG-CLIP's long path), else text_len.
    max_caption_len: int | None = Field(None, ge=4)
    # Bilinear samples per side of the RoIAlign bin: -1 = adaptive, ceil(box size in
    # cells) per side (FG-CLIP's torchvision call); n >= 1 = n per side.
    roi_sampling_ratio: int = Field(-1, ge=-1)
    temporal_layers: int = Field(2, ge=0)
    temporal_heads: int = Field(4, ge=1)
    # Rows of the learnable temporal position table: the most frames one video embedding sees.
    max_frames: int = Field(32, ge=1)
    pooling: Literal["attention", "mean"] = "attention"
    logit_scale_init_value: float = LN_100
    logit_scale_max: float = LN_100
    loaded_logit_scale: Literal["error", "keep", "reinit"] = "error"

    @property
    def text_len(self) -> int:
        """Tokens per short text (``max_text_len`` resolved).

        Null means 77 when ``pretrained`` is set: CLIP's BPE cuts UCF-Crime captions
        well past 32 tokens, and FG-CLIP trains its short path at 77. The stand-in's
        word-level captions fit in 32, the length every figure of the sample was made at.
        """
        if self.max_text_len is not None:
            return self.max_text_len
        return 77 if self.pretrained is not None else 32

    @property
    def caption_len(self) -> int:
        """Tokens per global caption (``max_caption_len`` resolved)."""
        if self.max_caption_len is not None:
            return self.max_caption_len
        return 248 if self.long_text else self.text_len

    @model_validator(mode="after")
    def _text_len(self) -> ModelConfig:
        if self.text_len > 77:
            raise ValueError(
                f"model.max_text_len={self.text_len} exceeds the 77 positions of short texts "
                "(global captions: model.max_caption_len, up to 248 with model.long_text)"
            )
        limit = 248 if self.long_text else 77
        if self.caption_len > limit:
            raise ValueError(
                f"model.max_caption_len={self.caption_len} exceeds {limit} positions"
                + ("" if self.long_text else " (set model.long_text: true for up to 248)")
            )
        if self.roi_sampling_ratio == 0:
            raise ValueError("model.roi_sampling_ratio must be -1 (adaptive, FG-CLIP's) or >= 1, not 0")
        if self.image_size % self.patch_size:
            raise ValueError(
                f"model.image_size={self.image_size} must be a multiple of model.patch_size={self.patch_size}"
            )
        for tower in ("vision", "text"):
            hidden, heads = getattr(self, f"{tower}_hidden"), getattr(self, f"{tower}_heads")
            if hidden % heads:
                raise ValueError(f"model.{tower}_heads={heads} must divide model.{tower}_hidden={hidden}")
        return self


class PretrainConfig(_Section):
    out: str = "models/clip-pretrained"
    steps: int = Field(300, ge=1)
    batch_size: int = Field(64, ge=2)
    lr: float = Field(1e-3, gt=0.0)
    warmup_steps: int = Field(30, ge=0)
    weight_decay: float = Field(0.1, ge=0.0)
    logit_scale_init_value: float = CLIP_SCRATCH_LOGIT_SCALE
    augment: bool = True
    seed: int = 0


class HealthConfig(_Section):
    region_loss_max: float = 0.5
    region_loss_by_step: int = 500
    region_loss_action: Literal["warn", "fail"] = "warn"
    region_loss_window: int = Field(10, ge=1)  # steps averaged for the region-loss gate
    zero_norm_frac_max: float = 0.1
    logit_scale_tolerance: float = 1e-4


class TrainConfig(_Section):
    out: str = "models/fgclip"
    checkpoints: str = "checkpoints"
    health_report: str = "metrics/health.json"  # the checks of `health` below, as JSON
    metrics: str = "metrics/train.json"
    loss_curve: str = "plots/train_loss.csv"
    loss_plot: str = "plots/train_loss.png"
    run_name: str = "fgclip"
    device: Literal["auto", "cpu", "cuda"] = "auto"
    dist_timeout_s: float = Field(1800.0, gt=0)
    seed: int = 0
    num_frames: int = Field(8, ge=1)
    max_keyframes: int = Field(4, ge=1)
    max_regions: int = Field(4, ge=1)
    batch_size: int = Field(8, ge=1)
    grad_accum_steps: int = Field(1, ge=1)
    max_steps: int = Field(250, ge=1)
    lr: float = Field(3e-4, gt=0.0)  # the new parts: temporal head, region projection, region scales
    weight_decay: float = Field(0.05, ge=0.0)
    warmup_steps: int = Field(20, ge=0)
    # The pretrained CLIP (every `clip.` parameter, the global logit scale too);
    # null = train.lr / train.warmup_steps, one rate for all (the stand-in's setting).
    backbone_lr: float | None = Field(None, gt=0.0)
    backbone_warmup_steps: int | None = Field(None, ge=0)
    max_grad_norm: float = Field(1.0, gt=0.0)
    region_loss_weight: float = Field(0.5, ge=0.0)
    # FG-CLIP's hard-negative loss: each region against its positive and up to
    # max_hard_negatives negative captions; weight 0 = off (no negatives encoded).
    hardneg_loss_weight: float = Field(0.5, ge=0.0)
    max_hard_negatives: int = Field(10, ge=1)
    memory_bank_size: int = Field(128, ge=0)
    memory_bank_warmup_steps: int = Field(50, ge=0)
    num_workers: int = Field(1, ge=0)
    checkpoint_every: int = Field(100, ge=1)
    keep_checkpoints: int = Field(2, ge=1)
    log_every: int = Field(1, ge=1)
    diag_every: int = Field(25, ge=1)
    runtime_diag: bool = False
    # MLflow's system metrics (CPU, memory, GPU: system/* on the run) every N seconds.
    log_system_metrics: bool = False
    system_metrics_interval_s: float = Field(10.0, gt=0)
    # GPU throughput (issue 17; fgclip/train/step.py). On CPU the defaults are the step as it always
    # ran; on CUDA fused_adamw auto picks the fused kernel.
    # Optimizer steps between host reads of the losses and gradient norm; above 1 a NaN is caught
    # at the next read, after up to sync_every - 1 steps on it (checkpoints, [DIAG] steps and the
    # last step always read).
    sync_every: int = Field(1, ge=1)
    compile: bool = False  # torch.compile of the model forward and the loss (not the optimizer)
    # transformers' CLIP attention; 5.x already picks "sdpa" when nothing is said.
    attn_implementation: Literal["eager", "sdpa"] = "sdpa"
    fused_adamw: Literal["auto"] | bool = "auto"  # auto = fused when every parameter is on CUDA
    health: HealthConfig = HealthConfig()

    @model_validator(mode="after")
    def _plain_run_name(self) -> TrainConfig:
        # The run name is a directory under train.checkpoints: `../../x` would write elsewhere.
        if not _PLAIN_NAME.fullmatch(self.run_name):
            raise ValueError(
                f"train.run_name {self.run_name!r} must be a plain directory name "
                "(letters, digits, '_', '-', '.'; no path separators), e.g. 'fgclip-sample'"
            )
        return self


class EvaluateConfig(_Section):
    out: str = "metrics/eval.json"
    scores: str = "data/eval/frame_scores.parquet"
    roc: str = "plots/roc.csv"
    roc_plot: str = "plots/roc.png"
    models_plot: str = "plots/models.png"
    batch_size: int = Field(64, ge=1)
    # Snippets per scoring clip, centred on the scored snippet; null = train.num_frames.
    window_snippets: int | None = Field(None, ge=1)
    # frame: the temporal head over a clip of snippet frames (the video path);
    # region_grid: each snippet's frame scored through the dense RoI path as the
    # max over region_grid x region_grid cells plus the whole frame.
    scoring: Literal["frame", "region_grid"] = "frame"
    region_grid: int = Field(2, ge=1, le=16)
    templates: list[str] = ["{}"]
    prompts: dict[str, list[str]] = {}
    # Whose rules the frame-level figures follow (fgclip.eval.protocols): full (this
    # project's), sultani, vadclip or rtfm (the references' ground truth, tail, ranking, AP).
    protocol: Literal["full", "sultani", "vadclip", "rtfm"] = "full"
    # Percentile bootstrap over test videos for frame AUC and AP; 0 = no intervals.
    bootstrap_resamples: int = Field(1000, ge=0)
    bootstrap_seed: int = 0
    bootstrap_level: float = Field(0.95, gt=0.0, lt=1.0)
    # False-alarm rate: share of normal videos' frames scoring at least this.
    far_threshold: float = Field(0.5, ge=0.0, le=1.0)
    # A test video that failed to decode fails evaluation unless this is true (then it is listed).
    allow_missing_videos: bool = False

    @model_validator(mode="after")
    def _prompts(self) -> EvaluateConfig:
        if self.prompts and "Normal" not in self.prompts:
            raise ValueError("evaluate.prompts needs a 'Normal' entry (the score is 1 - p(Normal))")
        for t in self.templates:
            if "{}" not in t:
                raise ValueError(f"evaluate.templates entry {t!r} has no '{{}}' placeholder")
        return self


class TrackingConfig(_Section):
    uri: str | None = None
    experiment: str = "fgclip-vad"
    # `evaluate` logs the fine-tuned model to its run and registers it as a version of
    # this registered model, tagged with its evaluation and health; null: neither.
    registered_model: str | None = Field("fgclip-vad", pattern=r"^[A-Za-z0-9][A-Za-z0-9_.-]*$")


# A cell or grid name: it becomes part of a DVC experiment name, which git must accept as a ref.
ABLATION_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_-]*")


class AblationGridConfig(_Section):
    """One ablation: named cells, each a set of param overrides (``train.region_loss_weight: 0``)."""

    reference: str  # the cell every other is compared with
    cells: dict[str, dict[str, Any]]

    @model_validator(mode="after")
    def _names(self) -> Self:
        for name in self.cells:
            if not ABLATION_NAME.fullmatch(name):
                raise ValueError(f"ablation cell {name!r}: use letters, digits, '_' and '-' only")
        if self.reference not in self.cells:
            raise ValueError(f"ablation reference {self.reference!r} is not one of its cells ({', '.join(self.cells)})")
        return self


class AblationConfig(_Section):
    """``fgclip ablate``: grids of DVC experiments over seeds. No stage reads it."""

    out: str = "reports/ablation"
    grid: str = "default"
    seeds: int = Field(3, ge=1)
    jobs: int = Field(1, ge=1)
    poll_s: float = Field(5.0, gt=0)
    lost_task_s: float = Field(30.0, gt=0)
    grids: dict[str, AblationGridConfig] = {}

    @model_validator(mode="after")
    def _grid_names(self) -> Self:
        for name in self.grids:
            if not ABLATION_NAME.fullmatch(name):
                raise ValueError(f"ablation grid {name!r}: use letters, digits, '_' and '-' only")
        return self


# Cron fields in order, with the values each accepts (day-of-week 7 is Sunday, as 0).
_CRON_FIELDS = (("minute", 0, 59), ("hour", 0, 23), ("day-of-month", 1, 31), ("month", 1, 12),
                ("day-of-week", 0, 7))  # fmt: skip


def _cron_item_ok(item: str, lo: int, hi: int) -> bool:
    """One comma-separated cron item: ``*``, ``n``, ``a-b``, each optionally ``/step``.

    The scheduler (Prefect's croniter) rejects out-of-range values only when the flow
    is served; this is the same grammar, checked when the params are loaded.
    """
    base, _, step = item.partition("/")
    if step and not (step.isdigit() and int(step) >= 1):
        return False
    if base == "*":
        return True
    first, _, last = base.partition("-")
    if not first.isdigit() or (last and not last.isdigit()) or ("-" in base and not last):
        return False
    # a > b is accepted: croniter reads it as a range that wraps around.
    return all(lo <= int(n) <= hi for n in (first, last or first))


class OrchestrationConfig(_Section):
    """The Prefect flow (``pipeline/flow.py``), ``fgclip serve`` and ``prefect.yaml``.

    No DVC stage reads this section, so changing it never re-runs a stage.
    """

    retries: int = Field(2, ge=0)  # extra attempts of a failed stage
    retry_delay_s: float = Field(30.0, ge=0.0)
    stage_timeout_s: float | None = Field(None, gt=0.0)  # None = no limit
    deployment: str = Field("nightly", min_length=1)
    cron: str = "0 2 * * *"
    timezone: str = "UTC"

    @model_validator(mode="after")
    def _schedule(self) -> OrchestrationConfig:
        # Checked here so a typo fails at start-up, not when the scheduler first reads it.
        fields = self.cron.split()
        if len(fields) != 5 or not all(set(f) <= set("0123456789*/,-") for f in fields):
            raise ValueError(
                f"orchestration.cron {self.cron!r} is not a 5-field numeric cron "
                "(minute hour day-of-month month day-of-week, e.g. '0 2 * * *')"
            )
        for text, (name, lo, hi) in zip(fields, _CRON_FIELDS):
            if not all(_cron_item_ok(item, lo, hi) for item in text.split(",")):
                raise ValueError(
                    f"orchestration.cron {self.cron!r}: {name} field {text!r} is not valid "
                    f"(numbers {lo}-{hi}, '*', ranges a-b, steps /n with n >= 1)"
                )
        try:
            ZoneInfo(self.timezone)
        except (ZoneInfoNotFoundError, ValueError) as exc:
            raise ValueError(f"orchestration.timezone {self.timezone!r} is not an IANA time zone") from exc
        return self


@dataclass(frozen=True)
class Paths:
    """Every file and directory a stage reads or writes: the one place they are resolved.

    From :meth:`Params.resolve_paths` (``params.paths``): relative paths in the params
    are relative to the params file's directory, so these are absolute, except a
    dataset root given to ``resolve_paths``, kept as given. Each field's params key
    (:meth:`key`) is also what dvc.yaml names (``${frames.out}``) and what the CLI
    option of each stage defaults to; ``in_dataset`` fields name a file under the
    dataset root (the UCF-Crime layout), not a path of their own.
    """

    # Where the sample stage generates its dataset; the dataset the pipeline reads.
    sample: Path = field(metadata={"key": "sample.out"})
    data_root: Path = field(metadata={"key": "data.root"})
    videos: Path = field(metadata={"key": "data.videos_dir", "in_dataset": True})
    train_split: Path = field(metadata={"key": "data.train_split", "in_dataset": True})
    test_split: Path = field(metadata={"key": "data.test_split", "in_dataset": True})
    temporal_annotations: Path = field(metadata={"key": "data.temporal_annotations", "in_dataset": True})
    annotations: Path = field(metadata={"key": "data.annotations", "in_dataset": True})
    frames: Path = field(metadata={"key": "frames.out"})
    boxes: Path = field(metadata={"key": "boxes.out"})
    boxes_metrics: Path = field(metadata={"key": "boxes.metrics"})
    stand_in: Path = field(metadata={"key": "pretrain.out"})  # the CLIP the pretrain stage trains
    model: Path = field(metadata={"key": "train.out"})  # the fine-tuned video FG-CLIP
    checkpoints: Path = field(metadata={"key": "train.checkpoints"})
    health: Path = field(metadata={"key": "train.health_report"})
    train_metrics: Path = field(metadata={"key": "train.metrics"})
    loss_curve: Path = field(metadata={"key": "train.loss_curve"})
    loss_plot: Path = field(metadata={"key": "train.loss_plot"})
    eval_metrics: Path = field(metadata={"key": "evaluate.out"})
    scores: Path = field(metadata={"key": "evaluate.scores"})
    roc: Path = field(metadata={"key": "evaluate.roc"})
    roc_plot: Path = field(metadata={"key": "evaluate.roc_plot"})
    models_plot: Path = field(metadata={"key": "evaluate.models_plot"})

    @staticmethod
    def key(name: str) -> str:
        """The params key a field is read from: ``Paths.key("frames") == "frames.out"``."""
        return next(f.metadata["key"] for f in fields(Paths) if f.name == name)


# What the Hugging Face hub accepts as a model id: ``name`` or ``namespace/name``.
_HUB_ID = re.compile(r"\w[\w.-]*(/\w[\w.-]*)?")
HUB_PROBE_TIMEOUT_S = 3.0


def model_source(source: str | os.PathLike) -> Path | str:
    """Where a CLIP is loaded from, decided once: a local path (a ``Path``) or a hub id (a ``str``).

    A path object, or a string naming something on disk, is local: a model directory
    is expected there (loaders say so when it is not one). So is a string that cannot
    be a hub id (``/abs``, ``./x``, ``a/b/c``, ``..``) or that continues an existing
    directory (``models/clip-pretrainde``): a missing directory is then reported as
    one, not as a malformed or unknown hub id. Any other string is a hub id such as
    ``openai/clip-vit-base-patch32``, returned as given for transformers to fetch.
    """
    if isinstance(source, os.PathLike):
        return Path(source)
    path = Path(source)
    if path.exists() or not _HUB_ID.fullmatch(source) or ".." in source or "--" in source:
        return path
    return path if path.parent != Path(".") and path.parent.is_dir() else source


class ModelSourceError(FGClipError, ValueError):
    """A pretrained CLIP that cannot be loaded: no such directory, or a hub id out of reach."""


def check_model_source(source: str | os.PathLike, timeout: float = HUB_PROBE_TIMEOUT_S) -> Path | str:
    """:func:`model_source`, made sure to be loadable in seconds, before any model or data is loaded.

    A local source must be a model directory. A hub id must be in the Hugging Face
    cache when ``HF_HUB_OFFLINE`` is set; otherwise the hub must answer within
    ``timeout`` seconds: without a network the Hugging Face client retries for
    most of a minute per file and then prints a traceback.
    """
    found = model_source(source)
    if isinstance(found, Path):
        if not found.is_dir():
            raise ModelSourceError(
                f"{source}: pretrained CLIP directory not found"
                + (" (it is a file)" if found.exists() else "")
                + ": give a model directory or a hub id (model.pretrained / --model), "
                "or run the pretrain stage for the stand-in"
            )
        if not (found / "config.json").is_file():
            raise ModelSourceError(f"{source}: not a Hugging Face model directory (no config.json)")
        return found
    from huggingface_hub import constants, get_token, try_to_load_from_cache

    cached = isinstance(try_to_load_from_cache(found, "config.json"), str)
    if constants.HF_HUB_OFFLINE:
        if not cached:
            raise ModelSourceError(
                f"{found}: hub id not in the Hugging Face cache ({constants.HF_HUB_CACHE}) and "
                "HF_HUB_OFFLINE is set: download it once with network access, or give a local model directory"
            )
        return found
    status, why = http_status(f"{constants.ENDPOINT}/api/models/{found}", timeout)
    if why is not None and cached:
        # The Hugging Face client falls back to its cache when the hub is out of reach.
        return found
    if why is not None:
        raise ModelSourceError(
            f"{found}: the Hugging Face hub {constants.ENDPOINT} is not reachable ({why}): "
            "set HF_HUB_OFFLINE=1 to use a cached copy, or give a local model directory"
        )
    # The hub answers an unauthenticated request for a repository it does not have (or a
    # private one) with 401; with a token the probe cannot tell, and loading will.
    if not cached and (status == 404 or (status == 401 and get_token() is None)):
        raise ModelSourceError(
            f"{found}: neither a local directory nor a model on {constants.ENDPOINT} "
            "(a private model needs `huggingface-cli login` or HF_TOKEN)"
        )
    return found


def http_status(url: str, timeout: float) -> tuple[int | None, str | None]:
    """``(status, None)`` when an HTTP server answers ``url`` within ``timeout`` s, else ``(None, why)``.

    Any status is an answer (a 404 too). The request runs in a thread so that a
    hanging name lookup, which socket timeouts do not cover, is bounded as well.
    """
    import http.client
    import threading
    import urllib.error
    import urllib.request

    answer: list[tuple[int | None, str | None]] = []

    def ask() -> None:
        try:
            with urllib.request.urlopen(url, timeout=timeout) as response:
                answer.append((response.status, None))
        except urllib.error.HTTPError as exc:
            answer.append((exc.code, None))
        except urllib.error.URLError as exc:
            answer.append((None, str(exc.reason)))
        except (OSError, ValueError, http.client.HTTPException) as exc:
            answer.append((None, str(exc) or type(exc).__name__))

    thread = threading.Thread(target=ask, name="fgclip-http-probe", daemon=True)
    thread.start()
    thread.join(timeout + 1.0)
    return answer[0] if answer else (None, f"no answer within {timeout:g} s")


class Params(_Section):
    data: DataConfig = DataConfig()
    sample: SampleConfig = SampleConfig()
    frames: FramesConfig = FramesConfig()
    boxes: BoxesConfig = BoxesConfig()
    model: ModelConfig = ModelConfig()
    pretrain: PretrainConfig = PretrainConfig()
    train: TrainConfig = TrainConfig()
    evaluate: EvaluateConfig = EvaluateConfig()
    tracking: TrackingConfig = TrackingConfig()
    orchestration: OrchestrationConfig = OrchestrationConfig()
    ablation: AblationConfig = AblationConfig()
    # Directory of the params file: relative paths above are resolved against it.
    base_dir: Path = Field(default_factory=Path.cwd, exclude=True)

    @model_validator(mode="after")
    def _clip_lengths(self) -> Params:
        # The temporal position table has model.max_frames rows: a longer clip fails in the
        # first forward pass, after the model and the data have been loaded.
        top = self.model.max_frames
        clips = {"train.num_frames": self.train.num_frames}
        if self.evaluate.window_snippets is not None:
            clips["evaluate.window_snippets"] = self.evaluate.window_snippets
        for key, frames in clips.items():
            if frames > top:
                raise ValueError(
                    f"{key}={frames} exceeds model.max_frames={top} (the temporal position table): "
                    f"lower {key} or raise model.max_frames"
                )
        return self

    def path(self, p: str | os.PathLike) -> Path:
        """Resolve a path from the params against the params file's directory."""
        p = Path(p)
        return p if p.is_absolute() else (self.base_dir / p).resolve()

    def resolve_paths(self, data_root: str | os.PathLike | None = None) -> Paths:
        """Every stage's inputs and outputs; with ``data_root``, the dataset files under that root."""
        root = Path(data_root) if data_root is not None else self.path(self.data.root)
        resolved = {}
        for f in fields(Paths):
            section, name = f.metadata["key"].split(".")
            value = getattr(getattr(self, section), name)
            if f.name == "data_root":
                resolved[f.name] = root
            else:
                resolved[f.name] = root / value if f.metadata.get("in_dataset") else self.path(value)
        return Paths(**resolved)

    @property
    def paths(self) -> Paths:
        """Every stage's inputs and outputs, from these params (see :class:`Paths`)."""
        return self.resolve_paths()

    def pretrained_source(self, override: str | None = None) -> str:
        """The CLIP to fine-tune from: ``override``, else ``model.pretrained``, else the stand-in.

        A directory or a hub id: :func:`model_source` tells which. A ``model.pretrained``
        that must be converted first (an OpenAI ``.pt``, an open_clip checkpoint, an
        FG-CLIP directory: :func:`fgclip.model.sources.conversion_needed`) is read from
        its conversion, the pretrain stage's output.
        """
        if override:
            return override
        if self.model.pretrained is None:
            return str(self.paths.stand_in)
        from fgclip.model.sources import conversion_needed  # it imports this module

        return str(self.paths.stand_in) if conversion_needed(self.model.pretrained) else self.model.pretrained

    @property
    def tracking_uri(self) -> str:
        """One absolute tracking URI for every stage, wherever it is started from."""
        if self.tracking.uri:
            return self.tracking.uri
        if os.environ.get("MLFLOW_TRACKING_URI"):
            return os.environ["MLFLOW_TRACKING_URI"]
        return f"sqlite:///{(repository_dir(self.base_dir) / 'mlflow.db').resolve()}"

    def with_overrides(self, **sections: dict) -> Params:
        """A copy with some fields of some sections replaced (validated again)."""
        raw = self.model_dump(exclude={"base_dir"})
        for name, values in sections.items():
            raw[name] = {**raw[name], **values}
        return Params.model_validate({**raw, "base_dir": self.base_dir})


# Where DVC runs a queued or --temp experiment: a copy of the repository under its root.
DVC_EXECUTOR_DIR = (".dvc", "tmp", "exps")


def repository_dir(base_dir: Path) -> Path:
    """``base_dir``, or its place in the user's repository when it lies in a DVC experiment's copy.

    DVC runs a queued experiment in ``<repo>/.dvc/tmp/exps/<tmp>/`` and deletes that copy
    afterwards, naming the repository in ``DVC_ROOT``: what must outlive the experiment
    (the MLflow database) belongs in the repository itself.
    """
    root = os.environ.get("DVC_ROOT")
    if not root:
        return base_dir
    try:
        rel = base_dir.resolve().relative_to(Path(root).resolve())
    except ValueError:
        return base_dir
    n = len(DVC_EXECUTOR_DIR)
    if rel.parts[:n] != DVC_EXECUTOR_DIR or len(rel.parts) <= n:
        return base_dir
    # A queued experiment's copy is exps/<tmp>/, a `dvc exp run --temp` one exps/standalone/<tmp>/.
    skip = n + (2 if rel.parts[n] == "standalone" else 1)
    return Path(root).joinpath(*rel.parts[skip:])


def fingerprint(section: BaseModel | dict, keys: list[str] | None = None) -> str:
    """Stable short hash of a config section (or some of its keys)."""
    data = section.model_dump() if isinstance(section, BaseModel) else dict(section)
    if keys is not None:
        data = {k: data[k] for k in keys}
    blob = json.dumps(data, sort_keys=True, default=str).encode()
    return hashlib.sha256(blob).hexdigest()[:16]


class ParamsError(FGClipError, ValueError):
    """params.yaml is missing, unreadable or invalid; the message says where."""


def load_params(path: str | os.PathLike = "params.yaml") -> Params:
    path = Path(path)
    if not path.is_file():
        raise ParamsError(f"params file not found: {path.resolve()}")
    try:
        raw = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
    except yaml.YAMLError as exc:
        raise ParamsError(f"{path}: not valid YAML: {' '.join(str(exc).split())}") from exc
    if not isinstance(raw, dict):
        raise ParamsError(f"{path}: top level must be a mapping of sections")
    try:
        return Params.model_validate({**raw, "base_dir": path.resolve().parent})
    except ValidationError as exc:
        lines = describe_errors(exc, Params).splitlines()
        if len(lines) == 1:
            raise ParamsError(f"{path}: invalid params: {lines[0]}") from exc
        raise ParamsError(f"{path}: {len(lines)} invalid params:\n  " + "\n  ".join(lines)) from exc


# pydantic error types whose own wording ("Input should be a valid integer, unable to parse
# string as an integer") says less than what was expected.
_EXPECTED = {
    "int_parsing": "an integer", "int_type": "an integer", "int_from_float": "an integer",
    "float_parsing": "a number", "float_type": "a number", "bool_parsing": "true or false",
    "bool_type": "true or false", "string_type": "a string", "list_type": "a list",
    "dict_type": "a mapping of keys", "model_type": "a mapping of keys", "model_attributes_type": "a mapping of keys",
    "literal_error": None,
}  # fmt: skip


def _shown_input(value: object) -> str | None:
    """A scalar input as the error shows it; a section or list is never echoed back."""
    if isinstance(value, (dict, list, tuple)):
        return None
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


def _known_keys(model: type[BaseModel], loc: tuple) -> list[str]:
    """The keys the section at ``loc`` accepts, for a 'did you mean' hint."""
    for part in loc:
        field = model.model_fields.get(str(part))
        sub = field.annotation if field is not None else None
        if not (isinstance(sub, type) and issubclass(sub, BaseModel)):
            return []
        model = sub
    return [k for k in model.model_fields if k != "base_dir"]


def describe_errors(exc: ValidationError, model: type[BaseModel] | None = None) -> str:
    """One line per error, each naming its key: ``train.batch_size: expected an integer, got 'eight'``.

    pydantic's own text spreads one error over three lines and a URL, and echoes a whole
    section for a misspelt key in it. With ``model`` (the validated class), an unknown key
    gets the closest known one as a hint.
    """
    import difflib

    lines = []
    for err in exc.errors():
        message = err["msg"].removeprefix("Value error, ")
        if err["type"] == "value_error":  # raised by a validator here: its message names the key
            lines.append(message)
            continue
        loc = tuple(err["loc"])
        key = ".".join(str(part) for part in loc)
        got = _shown_input(err.get("input"))
        if err["type"] == "extra_forbidden":
            known = _known_keys(model, loc[:-1]) if model is not None else []
            close = difflib.get_close_matches(str(loc[-1]), known, n=1)
            lines.append(f"{key}: unknown key" + (f" (did you mean {'.'.join(map(str, loc[:-1] + (close[0],)))}?)" if close else ""))
        elif err["type"] == "missing":
            lines.append(f"{key}: missing")
        elif _EXPECTED.get(err["type"]):
            lines.append(f"{key}: expected {_EXPECTED[err['type']]}" + (f", got {got}" if got else ""))
        else:
            lines.append(f"{key}: {message}" + (f" (got {got})" if got else ""))
    return "\n".join(lines)
