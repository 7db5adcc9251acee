"""Stage ``evaluate``: frame-level AUC on the UCF-Crime test split, zero-shot from prompts.

Three models go through the same code path, so their numbers are comparable:

- ``finetuned``: the video FG-CLIP written by ``train`` (``models/fgclip``);
- ``pretrained``: the CLIP it was fine-tuned from, with the temporal head at its
  identity initialisation (what fine-tuning bought);
- ``untrained``: the fine-tuned architecture with random weights from a fixed
  seed (the floor: what the protocol gives with no learning at all).

Each model is also measured on the held-out region annotations of the test
videos (:mod:`fgclip.eval.region_metrics`): region-to-caption top-1 and
caption-to-video R@1 / R@5.

Outputs: ``metrics/eval.json``, every per-frame score of every model as Parquet
(so any metric can be recomputed), the fine-tuned ROC curve as CSV for ``dvc
plots``, and, when the model directory names its MLflow run, the metrics, the
scores file and the ROC curves as a PNG added to that run.
"""

from __future__ import annotations

import copy
import json
import logging
import os
import tempfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from safetensors import SafetensorError
from tqdm import tqdm
from transformers import CLIPModel, PreTrainedTokenizerBase

from fgclip import metric_keys
from fgclip.atomic import write_text_atomic
from fgclip.config import Params, model_source
from fgclip.data.layout import INDEX_FILE, VIDEOS_FILE, read_failures, read_frame_index, read_videos
from fgclip.data.ucf import NORMAL_LABEL, read_split, read_temporal_annotations
from fgclip.device import resolve_device
from fgclip.eval.frame_metrics import bootstrap_intervals, frame_level_metrics, rounded
from fgclip.eval.protocol import (
    AnnotatedVideo,
    EvalInputError,
    VideoScores,
    build_test_set,
    frame_score_table,
    num_snippets,
    write_frame_scores,
    write_roc_csv,
)
from fgclip.eval.protocols import SNIPPET, SnippetScores, protocol_videos, whole_snippets
from fgclip.eval.region_metrics import (
    HeldOutVideo,
    held_out_metrics,
    load_held_out,
    video_clip,
    video_embeddings,
)
from fgclip.eval.zeroshot import (
    class_embeddings,
    frame_features,
    grid_boxes,
    region_grid_log_odds,
    snippet_log_odds,
)
from fgclip.metric_keys import FINETUNED, PRETRAINED, UNTRAINED
from fgclip.model.fgclip import CONFIG_NAME, WEIGHTS_NAME, FGCLIPVideoModel
from fgclip.model.tokenizer import load_tokenizer
from fgclip.outputs import check_output_files

log = logging.getLogger(__name__)

# Set by DVC in the stage commands of an experiment (`dvc exp run`, its queue).
DVC_EXPERIMENT_ENV = "DVC_EXP_NAME"
ROC_PNG, MODELS_PNG = "roc.png", "models.png"  # their names among the MLflow run's artefacts

# Per-model metrics logged to MLflow as eval.<model>.<metric> (besides auc_<Class>).
HEADLINE_METRICS = (
    "frame_auc",
    "frame_ap",
    "frame_ap_step",
    "frame_ap_trapezoid",
    "false_alarm_rate",
    "anomalous_auc",
    "region_top1",
    "hardneg_accuracy",
    "retrieval_r1",
    "retrieval_r5",
)


@dataclass
class ScoringModel:
    """A model ready to score, with its class-prompt embeddings computed once."""

    name: str
    model: FGCLIPVideoModel
    tokenizer: PreTrainedTokenizerBase
    class_embeds: torch.Tensor  # [C, D]
    normal_index: int


def decoded_test_videos(split: list[str], frames_dir: Path) -> tuple[dict[str, int], list[dict[str, str]]]:
    """Decoded frame counts of the split's videos, and the ones that failed to decode.

    ``videos.parquet`` holds the authoritative frame count. A split video that is
    absent from it means the frames directory was built from another dataset: an
    error. One that failed to decode is left out and recorded with its reason.
    """
    videos_path = frames_dir / VIDEOS_FILE
    videos = read_videos(frames_dir, ["video", "num_frames", "status"], error=EvalInputError).to_pydict()
    rows = {v: (n, s) for v, n, s in zip(videos["video"], videos["num_frames"], videos["status"])}
    absent = [v for v in split if v not in rows]
    if absent:
        raise EvalInputError(
            f"{videos_path}: test video(s) {', '.join(absent[:5])}"
            + (f" and {len(absent) - 5} more" if len(absent) > 5 else "")
            + " not extracted: re-run extract_frames for this dataset"
        )
    failures = read_failures(frames_dir, ["video", "reason"], missing_ok=True, error=EvalInputError)
    reasons = dict(zip(failures["video"].to_pylist(), failures["reason"].to_pylist()))
    decoded, skipped = {}, []
    for video in split:
        num_frames, status = rows[video]
        if status == "ok" and num_frames > 0:
            decoded[video] = int(num_frames)
        else:
            reason = reasons.get(video, f"status {status}, {num_frames} frames")
            log.warning("%s: test video %s skipped: %s", videos_path, video, reason)
            skipped.append({"video": video, "reason": reason})
    return decoded, skipped


def eval_frame_paths(
    frames_dir: Path, test_set: list[AnnotatedVideo], snippet_len: int
) -> dict[str, list[Path]]:
    """The ``eval`` frame of every snippet of every test video, checked against the protocol."""
    index_path = frames_dir / INDEX_FILE
    index = read_frame_index(frames_dir, ["video", "frame", "path"], purpose="eval", error=EvalInputError)
    index = index.sort_by([("video", "ascending"), ("frame", "ascending")])
    videos = index["video"].to_numpy(zero_copy_only=False)
    frames = index["frame"].to_numpy()
    paths = index["path"].to_numpy(zero_copy_only=False)
    names, starts, counts = np.unique(videos, return_index=True, return_counts=True)
    where = {name: (start, count) for name, start, count in zip(names, starts, counts)}
    out: dict[str, list[Path]] = {}
    for video in test_set:
        n = video.labels.shape[0]
        expected = num_snippets(n, snippet_len)
        start, count = where.get(video.video, (0, 0))
        snippet = frames[start : start + count] // snippet_len
        if count != expected or not np.array_equal(snippet, np.arange(expected)):
            raise EvalInputError(
                f"{index_path}: {video.video} has {count} eval frames (snippets {snippet.tolist()[:8]}...), "
                f"expected one in each of the {expected} snippets of {snippet_len} of its {n} decoded frames"
            )
        out[video.video] = [frames_dir / p for p in paths[start : start + count]]
    return out


def _shown(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.4f}"


def _mlflow_metrics(results: dict[str, dict]) -> dict[str, float]:
    metrics = {metric_keys.HEADLINE: results[FINETUNED]["frame_auc"]}
    for name, m in results.items():
        if "frame_auc" not in m:
            continue  # a skipped model
        for key in HEADLINE_METRICS:
            if m.get(key) is not None:
                metrics[metric_keys.evaluation(name, key)] = m[key]
        for cls, auc in m["per_class_auc"].items():
            if auc is not None:
                metrics[metric_keys.evaluation(name, f"auc_{cls}")] = auc
        for key in ("frame_auc", "frame_ap"):
            if "intervals" in m:  # eval.finetuned.frame_auc_lo, _hi: the bootstrap interval
                lo, hi = m["intervals"][key]
                metrics[metric_keys.evaluation(name, f"{key}_lo")] = lo
                metrics[metric_keys.evaluation(name, f"{key}_hi")] = hi
    return metrics


def _version_tags(finetuned: dict, protocol: str) -> dict[str, object]:
    """The registered version's own record of how the model scored (the run's health tags join them)."""
    tags: dict[str, object] = {"eval.protocol": protocol}
    for key in HEADLINE_METRICS:
        if finetuned.get(key) is not None:
            tags[f"eval.{key}"] = round(float(finetuned[key]), 4)
    return tags


def training_run(model_dir: Path) -> tuple[str, str] | None:
    """``(tracking_uri, run_id)`` of the MLflow run that trained the model, from ``run.json``."""
    run_file = model_dir / "run.json"
    if not run_file.is_file():
        log.info("%s not found: evaluation metrics not logged to MLflow", run_file)
        return None
    try:
        run = json.loads(run_file.read_text(encoding="utf-8"))
        return str(run["tracking_uri"]), str(run["run_id"])
    except (json.JSONDecodeError, KeyError, TypeError) as exc:
        raise EvalInputError(
            f"{run_file}: expected a JSON object with run_id and tracking_uri ({exc!r})"
        ) from exc


def _tokenizer(source: str | os.PathLike, what: str) -> PreTrainedTokenizerBase:
    try:
        return load_tokenizer(source)
    except (OSError, ValueError) as exc:
        raise EvalInputError(f"{source}: cannot load the {what} tokenizer: {exc}") from exc


def load_finetuned(model_dir: Path) -> tuple[FGCLIPVideoModel, PreTrainedTokenizerBase]:
    """The fine-tuned model and its tokenizer from the ``train`` stage's output directory."""
    missing = [name for name in (WEIGHTS_NAME, CONFIG_NAME) if not (model_dir / name).is_file()]
    if missing:
        raise EvalInputError(
            f"{model_dir}: no fine-tuned model (missing {', '.join(missing)}): run the train stage first"
        )
    try:
        model = FGCLIPVideoModel.from_pretrained(model_dir)
    except (json.JSONDecodeError, KeyError, TypeError, ValueError) as exc:
        # ValueError covers pydantic's ValidationError and an invalid config dict.
        raise EvalInputError(f"{model_dir / CONFIG_NAME}: not an FG-CLIP model config: {exc}") from exc
    except (SafetensorError, RuntimeError, OSError) as exc:
        # A truncated or foreign weights file (safetensors header, missing or extra keys, shapes).
        raise EvalInputError(
            f"{model_dir / WEIGHTS_NAME}: weights do not fit the model in {CONFIG_NAME}: "
            + str(exc).splitlines()[0]
        ) from exc
    return model, _tokenizer(model_dir, "fine-tuned model's")


def load_pretrained(
    source: str | os.PathLike, like: FGCLIPVideoModel, tolerance: float
) -> tuple[FGCLIPVideoModel, PreTrainedTokenizerBase]:
    """The CLIP that fine-tuning started from, wrapped exactly as training wrapped it.

    ``from_clip`` with the fine-tuned model's config: same temporal head at its
    identity initialisation and the same loaded-logit-scale policy, so this is
    the model at fine-tuning step 0. ``source`` is a directory or a hub id, as
    :func:`fgclip.config.model_source` tells; a local one must be a directory.
    """
    local = model_source(source)
    if isinstance(local, Path) and not local.is_dir():
        raise EvalInputError(f"{source}: pretrained CLIP directory not found (run the pretrain stage)")
    model = FGCLIPVideoModel.from_clip(source, like.cfg, source=str(source), tolerance=tolerance)
    return model, _tokenizer(source, "pretrained")


def build_untrained(like: FGCLIPVideoModel, seed: int) -> FGCLIPVideoModel:
    """The fine-tuned architecture with fresh random weights from ``seed`` (nothing is loaded).

    The global RNG is left as it was, so building the baseline never changes
    what any later random draw gives.
    """
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return FGCLIPVideoModel(CLIPModel(copy.deepcopy(like.clip.config)), like.cfg)


def _scoring_model(
    name: str,
    model: FGCLIPVideoModel,
    tokenizer: PreTrainedTokenizerBase,
    params: Params,
    device: torch.device,
) -> ScoringModel:
    model = model.to(device).eval()
    cfg = params.evaluate
    try:
        classes, embeds = class_embeddings(
            model, tokenizer, cfg.prompts, cfg.templates, model.cfg.text_len, cfg.batch_size
        )
    except ValueError as exc:
        raise EvalInputError(f"evaluate.prompts / evaluate.templates in params: {exc}") from exc
    return ScoringModel(name, model, tokenizer, embeds, classes.index(NORMAL_LABEL))


def score_test_set(
    params: Params, scorers: list[ScoringModel], test_set: list[AnnotatedVideo], paths: dict[str, list[Path]]
) -> tuple[dict[str, list[SnippetScores]], dict[str, torch.Tensor]]:
    """Every model's per-snippet scores of every test video, and each video's embedding ``[V, D]``.

    Frames are decoded and encoded once per video for all models. The snippet
    score comes from the clip of ``window_snippets`` snippet frames through the
    temporal head (``evaluate.scoring: frame``) or from the snippet's own frame,
    region by region over a grid (``region_grid``). The video embeddings, for
    caption-to-video retrieval, reuse the same frame embeddings.
    """
    cfg = params.evaluate
    clip_len = cfg.window_snippets or params.train.num_frames
    boxes = grid_boxes(cfg.region_grid) if cfg.scoring == "region_grid" else None
    scored: dict[str, list[SnippetScores]] = {s.name: [] for s in scorers}
    clips: dict[str, list[torch.Tensor]] = {s.name: [] for s in scorers}
    for video in tqdm(test_set, desc="evaluate", unit="video", disable=None):
        features = frame_features([s.model for s in scorers], paths[video.video], cfg.batch_size, boxes)
        for scorer, (frame_embeds, region_feats) in zip(scorers, features):
            if region_feats is None:
                log_odds = snippet_log_odds(
                    scorer.model,
                    frame_embeds,
                    scorer.class_embeds,
                    scorer.normal_index,
                    clip_len,
                    cfg.batch_size,
                )
            else:
                log_odds = region_grid_log_odds(
                    scorer.model, region_feats, scorer.class_embeds, scorer.normal_index
                )
            scored[scorer.name].append(
                SnippetScores(
                    video.video,
                    video.label,
                    video.annotation,
                    torch.sigmoid(log_odds).numpy(),
                    log_odds.numpy(),
                    video.labels.shape[0],
                )
            )
            num_frames = min(params.train.num_frames, scorer.model.cfg.max_frames)
            clips[scorer.name].append(video_clip(frame_embeds, num_frames))
    return scored, {s.name: video_embeddings(s.model, clips[s.name], cfg.batch_size) for s in scorers}


def protocol_scores(
    protocol: str, snippets: dict[str, list[SnippetScores]], annotation_path: Path
) -> dict[str, list[VideoScores]]:
    """Each model's videos under a reference protocol (Sultani's takes whole snippets only)."""
    if protocol == "sultani":
        snippets = {name: [whole_snippets(v) for v in videos] for name, videos in snippets.items()}
    return {name: protocol_videos(protocol, videos, annotation_path) for name, videos in snippets.items()}


def scored_metrics(videos: list[VideoScores], cfg) -> dict:
    """:func:`frame_level_metrics` under ``cfg.protocol``, with its bootstrap intervals."""
    metrics = frame_level_metrics(videos, cfg.protocol, far_threshold=cfg.far_threshold)
    if cfg.bootstrap_resamples:
        metrics["intervals"] = bootstrap_intervals(
            videos, cfg.protocol, resamples=cfg.bootstrap_resamples, seed=cfg.bootstrap_seed,
            level=cfg.bootstrap_level,
        )  # fmt: skip
    return metrics


def _held_out(
    boxes_dir: Path | None, frames_dir: Path, test_set: list[AnnotatedVideo]
) -> list[HeldOutVideo] | str:
    """The held-out region annotations, or why the region metrics are skipped."""
    if boxes_dir is None:
        return "no boxes directory given"
    held_out = load_held_out(boxes_dir, frames_dir, [v.video for v in test_set])
    if not held_out:
        log.warning("%s: no accepted box rows of evaluated test videos: region metrics skipped", boxes_dir)
        return f"no accepted box rows of evaluated test videos in {boxes_dir}"
    return held_out


def evaluate(
    params: Params,
    frames_dir: Path,
    model_dir: Path,
    pretrained_dir: Path | str | None,
    data_root: Path,
    out: Path,
    scores_path: Path,
    roc_path: Path | None = None,
    boxes_dir: Path | None = None,
    *,
    roc_png: Path | None = None,
    models_png: Path | None = None,
) -> dict:
    """Score the test split with the fine-tuned, pretrained and untrained models; write the results.

    Args:
        frames_dir: ``extract_frames`` output (``index.parquet``, ``videos.parquet``).
        model_dir: ``train`` output (``model.safetensors``, ``fgclip_config.json``,
            tokenizer, optional ``run.json``).
        pretrained_dir: the CLIP fine-tuning started from (directory or hub id);
            ``None`` skips the pretrained baseline, with a note in the results.
        data_root: dataset root holding the test split and the temporal annotation.
        out: metrics JSON; scores_path: per-frame scores Parquet;
            roc_path: fine-tuned ROC curve CSV (not written when ``None``);
            roc_png, models_png: every model's ROC curve, and the models' headline
            metrics side by side, as PNGs (not written when ``None``).
        boxes_dir: ``validate_boxes`` output, for the region and retrieval metrics
            on the test videos' annotations (skipped, with a note, when ``None``).

    Returns the metrics written to ``out``.
    """
    frames_dir, model_dir = Path(frames_dir), Path(model_dir)
    # Checked before any work: an output inside an input would overwrite another stage's file.
    check_output_files(
        {
            "--out": Path(out),
            "--scores": Path(scores_path),
            "--roc": roc_path,
            "evaluate.roc_plot": roc_png,
            "evaluate.models_plot": models_png,
        },
        {
            "--frames": frames_dir,
            "--model": model_dir,
            "--pretrained": pretrained_dir,
            "--data-root": Path(data_root),
            "--boxes": Path(boxes_dir) if boxes_dir is not None else None,
        },
    )
    snippet_len, cfg = params.frames.snippet_len, params.evaluate
    if cfg.protocol != "full" and snippet_len != SNIPPET:
        raise EvalInputError(
            f"evaluate.protocol {cfg.protocol} is defined on {SNIPPET}-frame snippets; "
            f"frames.snippet_len is {snippet_len}"
        )
    dataset = params.resolve_paths(data_root=data_root)
    split_path, annotation_path = dataset.test_split, dataset.temporal_annotations
    split = read_split(split_path)
    annotations = read_temporal_annotations(annotation_path)
    decoded, skipped = decoded_test_videos(split, frames_dir)
    if skipped and not cfg.allow_missing_videos:
        raise EvalInputError(
            f"{len(skipped)} test video(s) failed to decode ({', '.join(s['video'] for s in skipped[:5])}"
            + (", ..." if len(skipped) > 5 else "")
            + "): the figures would be over another test set; fix them, or set "
            "evaluate.allow_missing_videos: true to evaluate without them (they are listed in the report)"
        )
    test_set = build_test_set(split, annotations, decoded, split_path, annotation_path)
    paths = eval_frame_paths(frames_dir, test_set, snippet_len)
    held_out = _held_out(boxes_dir, frames_dir, test_set)
    run = training_run(model_dir)

    device = resolve_device(params.train.device)
    finetuned, tokenizer = load_finetuned(model_dir)
    scorers = [_scoring_model(FINETUNED, finetuned, tokenizer, params, device)]
    if pretrained_dir is None:
        log.info("no pretrained CLIP given: pretrained baseline skipped")
    else:
        pretrained, pretrained_tokenizer = load_pretrained(
            pretrained_dir, finetuned, params.train.health.logit_scale_tolerance
        )
        scorers.append(_scoring_model(PRETRAINED, pretrained, pretrained_tokenizer, params, device))
    untrained = build_untrained(finetuned, params.train.seed)
    scorers.append(_scoring_model(UNTRAINED, untrained, tokenizer, params, device))

    snippets, video_embeds = score_test_set(params, scorers, test_set, paths)
    # The frame table keeps every frame (the project's own protocol: any other can be
    # recomputed from its snippet column); the figures follow evaluate.protocol.
    frames = {name: protocol_videos("full", videos, annotation_path) for name, videos in snippets.items()}
    scored = protocol_scores(cfg.protocol, snippets, annotation_path) if cfg.protocol != "full" else frames
    results = {name: scored_metrics(videos, cfg) for name, videos in scored.items()}
    for name, m in results.items():
        if m["saturated_frac"] > 0:
            log.info(
                "%s: %.1f%% of test frames score 1.0 in float64; the AUC ranks by log-odds, which do not tie",
                name,
                100 * m["saturated_frac"],
            )
    if isinstance(held_out, str):
        held_out_summary: dict = {"skipped": held_out}
        for m in results.values():
            m.update(region_top1=None, hardneg_accuracy=None, retrieval_r1=None, retrieval_r5=None)
    else:
        region, held_out_summary = held_out_metrics(
            {s.name: (s.model, s.tokenizer) for s in scorers},
            held_out,
            [v.video for v in test_set],
            video_embeds,
            params.evaluate.batch_size,
            params.train.max_hard_negatives,
        )
        for name, m in region.items():
            results[name].update(m)
    if PRETRAINED not in results:
        results[PRETRAINED] = {"skipped": "no pretrained CLIP given"}
    summary = rounded(
        {
            "frame_auc": results[FINETUNED]["frame_auc"],
            **{name: results[name] for name in (FINETUNED, PRETRAINED, UNTRAINED)},
            "scoring": params.evaluate.scoring,
            "protocol": cfg.protocol,
            "held_out": held_out_summary,
            "clipped_intervals": [v.video for v in test_set if v.clipped],
            "skipped_videos": skipped,
        },
        4,
    )
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    write_text_atomic(out, json.dumps(summary, indent=2) + "\n")
    rows = write_frame_scores(
        Path(scores_path), [frame_score_table(videos, name, snippet_len) for name, videos in frames.items()]
    )
    artifacts = [out, Path(scores_path)]
    if roc_path is not None:
        write_roc_csv(Path(roc_path), scored[FINETUNED])
        artifacts.append(Path(roc_path))
    log.info(
        "frame AUC on %d test videos (%d frames): %s; %d score rows in %s",
        len(test_set),
        results[FINETUNED]["num_frames"],
        ", ".join(f"{name} {results[name]['frame_auc']:.4f}" for name in scored),
        rows,
        scores_path,
    )
    if not isinstance(held_out, str):
        log.info(
            "held-out regions (%d, %d distinct captions; %d with hard negatives) top-1 / hard-negative "
            "accuracy / caption-to-video R@1, R@5 (%d queries): %s",
            held_out_summary["regions"],
            held_out_summary["region_captions"],
            held_out_summary["hardneg_regions"],
            held_out_summary["retrieval_queries"],
            "; ".join(
                f"{name} {results[name]['region_top1']:.4f} / {_shown(results[name]['hardneg_accuracy'])} / "
                f"{results[name]['retrieval_r1']:.4f}, {results[name]['retrieval_r5']:.4f}"
                for name in scored
            ),
        )
    with tempfile.TemporaryDirectory(prefix="fgclip-eval-") as tmp:
        # Plots not asked for are still drawn for the MLflow run, in a directory that
        # lives until the artefact store has copied them.
        pngs = [Path(roc_png or Path(tmp) / ROC_PNG), Path(models_png or Path(tmp) / MODELS_PNG)]
        if run is not None or roc_png or models_png:
            from fgclip.eval.plots import write_models_png, write_roc_png  # matplotlib: only when drawing

            write_roc_png(pngs[0], scored, results)
            write_models_png(pngs[1], {name: results[name] for name in scored})
        if run is not None:
            _log_to_training_run(params, run, results, [*artifacts, *pngs], model_dir, cfg.protocol)
    return summary


def _log_to_training_run(
    params: Params, run: tuple[str, str], results: dict, artifacts: list[Path], model_dir: Path, protocol: str
) -> None:
    from fgclip.train.tracking import log_to_run, register_model  # MLflow: only with a run to log to

    log_to_run(*run, _mlflow_metrics(results), artifacts)
    log.info("Logged evaluation metrics and artefacts to MLflow run %s", run[1])
    name = params.tracking.registered_model
    if name and os.environ.get(DVC_EXPERIMENT_ENV):
        # An experiment's model (an ablation cell, a `dvc exp run`) is a variant, not a release:
        # `dvc exp apply` it and `dvc repro` to register it.
        log.info("DVC experiment %s: its model is not registered as a %s version", os.environ[DVC_EXPERIMENT_ENV], name)
    elif name:
        version = register_model(*run, name, model_dir, _version_tags(results[FINETUNED], protocol))
        log.info("Registered the fine-tuned model as %s version %s", name, version)
