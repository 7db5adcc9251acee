"""The ``fgclip`` console script: one subcommand per pipeline stage.

Every subcommand takes ``--params`` and its inputs and outputs as options named
for what they are, defaulting to the paths in ``params.yaml``; so each stage runs
under DVC and outside it, on the embedded sample or on a real UCF-Crime root.
Heavy imports (torch, transformers, mlflow) happen inside the subcommand that
needs them, so ``fgclip --help`` stays instant.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from collections.abc import Callable
from pathlib import Path

from fgclip.config import Params, load_params
from fgclip.errors import FGClipError

log = logging.getLogger("fgclip")

# Errors a user can act on: printed as one clear line, exit status 1, no traceback.
# Anything else is a bug and keeps its traceback.
_USER_ERRORS: tuple[type[BaseException], ...] = (FGClipError, FileNotFoundError)


def _path(p: str | None) -> Path | None:
    return Path(p) if p else None


def _setup_logging(verbose: bool) -> None:
    logging.basicConfig(
        level=logging.DEBUG if verbose else logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        datefmt="%H:%M:%S",
        stream=sys.stderr,
    )
    # Third-party chatter (alembic migrations, httpx) drowns the lines users grep for.
    for noisy in ("alembic", "httpx", "urllib3", "mlflow.store", "PIL"):
        logging.getLogger(noisy).setLevel(logging.WARNING)


def _print_summary(summary: dict) -> None:
    print(json.dumps(summary, indent=2, sort_keys=True, default=str))


# --- subcommands ---------------------------------------------------------------


def cmd_sample(params: Params, args: argparse.Namespace) -> dict:
    from fgclip.data.sample import generate_sample

    root = _path(args.out) or params.data_root
    return generate_sample(params.sample, params.data, root)


def cmd_extract_frames(params: Params, args: argparse.Namespace) -> dict:
    from fgclip.data.frames import extract_frames

    data_root = _path(args.data_root) or params.data_root
    annotations = _path(args.annotations) or data_root / params.data.annotations
    out = _path(args.out) or params.path(params.frames.out)
    return extract_frames(params, data_root, annotations, out)


def cmd_validate_boxes(params: Params, args: argparse.Namespace) -> dict:
    from fgclip.data.boxes import validate_boxes

    annotations = _path(args.annotations) or params.data_file("annotations")
    frames = _path(args.frames) or params.path(params.frames.out)
    out = _path(args.out) or params.path(params.boxes.out)
    metrics = _path(args.metrics) or params.path("metrics/boxes.json")
    return validate_boxes(params, annotations, frames, out, metrics)


def cmd_pretrain(params: Params, args: argparse.Namespace) -> dict:
    from fgclip.train.pretrain import pretrain_clip

    out = _path(args.out) or params.path(params.pretrain.out)
    return pretrain_clip(
        params,
        _path(args.frames) or params.path(params.frames.out),
        _path(args.boxes) or params.path(params.boxes.out),
        _path(args.annotations) or params.data_file("annotations"),
        out,
    )


def cmd_train(params: Params, args: argparse.Namespace) -> dict:
    from fgclip.train.loop import train

    return train(
        params,
        _path(args.frames) or params.path(params.frames.out),
        _path(args.boxes) or params.path(params.boxes.out),
        params.pretrained_source(args.model),
        _path(args.out) or params.path(params.train.out),
        _path(args.checkpoints) or params.path(params.train.checkpoints),
        _path(args.health) or params.path("metrics/health.json"),
        resume=not args.no_resume,
        max_steps=args.max_steps,
    )


def cmd_evaluate(params: Params, args: argparse.Namespace) -> dict:
    from fgclip.eval.evaluate import evaluate

    pretrained = args.pretrained or params.pretrained_source()
    return evaluate(
        params,
        _path(args.frames) or params.path(params.frames.out),
        _path(args.model) or params.path(params.train.out),
        Path(pretrained) if Path(pretrained).exists() else pretrained,
        _path(args.data_root) or params.data_root,
        _path(args.out) or params.path(params.evaluate.out),
        _path(args.scores) or params.path(params.evaluate.scores),
        roc_path=_path(args.roc) or params.path("plots/roc.csv"),
        boxes_dir=_path(args.boxes) or params.path(params.boxes.out),
    )


def cmd_region_loss(params: Params, args: argparse.Namespace) -> None:
    from fgclip.atomic import write_text_atomic
    from fgclip.train.loss_breakdown import format_breakdown, region_loss_breakdown

    result = region_loss_breakdown(
        params,
        _path(args.model) or params.path(params.train.out),
        _path(args.frames) or params.path(params.frames.out),
        _path(args.boxes) or params.path(params.boxes.out),
        epochs=args.epochs,
    )
    sys.stdout.write(format_breakdown(result, top=args.top))
    if args.json:
        out = Path(args.json)
        out.parent.mkdir(parents=True, exist_ok=True)
        write_text_atomic(out, json.dumps(result, indent=2) + "\n")
        log.info("breakdown written to %s", out)


def cmd_checkpoints_clean(params: Params, args: argparse.Namespace) -> None:
    from fgclip.train.cleanup import clean_checkpoints, current_inputs, format_size

    inputs = None
    if args.check_inputs:
        inputs = current_inputs(
            params,
            model=params.pretrained_source(args.model),
            frames=_path(args.frames),
            boxes=_path(args.boxes),
        )
    removals = clean_checkpoints(params, root=_path(args.checkpoints), dry_run=args.dry_run, inputs=inputs)
    verb = "would remove" if args.dry_run else "removed"
    for removal in removals:
        print(f"{verb} {removal.path}: {removal.reason}")
    print(f"{verb} {len(removals)} checkpoint(s), {format_size(sum(r.size for r in removals))}")


def cmd_compare(params: Params, args: argparse.Namespace) -> None:
    from fgclip.atomic import write_text_atomic
    from fgclip.compare import compare

    text = compare(params, experiment=args.experiment, runs=args.runs or (), fmt=args.format, last=args.last)
    if args.out:
        out = Path(args.out)
        out.parent.mkdir(parents=True, exist_ok=True)
        write_text_atomic(out, text)
        log.info("comparison written to %s", out)
    else:
        sys.stdout.write(text)


def cmd_serve(params: Params, args: argparse.Namespace) -> None:
    # The one subcommand that reaches into the orchestration layer (pipeline/, Prefect).
    from pipeline.flow import serve

    serve(Path(args.params))


# --- parser --------------------------------------------------------------------


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="fgclip",
        description="Fine-tune video FG-CLIP for weakly supervised video anomaly detection.",
    )
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    def add(name: str, func: Callable, help_: str) -> argparse.ArgumentParser:
        p = sub.add_parser(name, help=help_, description=help_)
        p.add_argument("--params", default="params.yaml", help="params file (default: params.yaml)")
        p.set_defaults(func=func)
        return p

    p = add("sample", cmd_sample, "generate the embedded UCF-Crime-style sample (real H.264)")
    p.add_argument("--out", help="dataset root to write (default: data.root)")

    p = add("extract-frames", cmd_extract_frames, "decode videos, write selected frames + Parquet index")
    p.add_argument("--data-root", help="UCF-Crime root (default: data.root)")
    p.add_argument("--annotations", help="region annotation JSON (default: <data-root>/data.annotations)")
    p.add_argument("--out", help="frames directory (default: frames.out)")

    p = add("validate-boxes", cmd_validate_boxes, "validate boxes into Parquet shards + rejects")
    p.add_argument("--annotations", help="region annotation JSON (default: from params)")
    p.add_argument("--frames", help="frames directory (default: frames.out)")
    p.add_argument("--out", help="boxes directory (default: boxes.out)")
    p.add_argument("--metrics", help="counts JSON (default: metrics/boxes.json)")

    p = add("pretrain", cmd_pretrain, "train the tiny stand-in CLIP from scratch (skipped for real weights)")
    p.add_argument("--frames", help="frames directory (default: frames.out)")
    p.add_argument("--boxes", help="boxes directory (default: boxes.out)")
    p.add_argument("--annotations", help="region annotation JSON (tokenizer corpus)")
    p.add_argument("--out", help="model directory (default: pretrain.out)")

    p = add("train", cmd_train, "fine-tune video FG-CLIP (resumes from the latest matching checkpoint)")
    p.add_argument("--frames", help="frames directory (default: frames.out)")
    p.add_argument("--boxes", help="boxes directory (default: boxes.out)")
    p.add_argument(
        "--model", help="pretrained CLIP: directory or hub id (default: model.pretrained or pretrain.out)"
    )
    p.add_argument("--out", help="fine-tuned model directory (default: train.out)")
    p.add_argument("--checkpoints", help="checkpoint root (default: train.checkpoints)")
    p.add_argument("--health", help="health report JSON (default: metrics/health.json)")
    p.add_argument("--max-steps", type=int, help="stop after this many optimizer steps")
    p.add_argument("--no-resume", action="store_true", help="ignore existing checkpoints")

    p = add("evaluate", cmd_evaluate, "frame-level AUC by the UCF-Crime protocol, zero-shot from prompts")
    p.add_argument("--data-root", help="UCF-Crime root (default: data.root)")
    p.add_argument("--frames", help="frames directory (default: frames.out)")
    p.add_argument("--model", help="fine-tuned model directory (default: train.out)")
    p.add_argument(
        "--pretrained", help="pretrained CLIP baseline (default: model.pretrained or pretrain.out)"
    )
    p.add_argument("--out", help="metrics JSON (default: evaluate.out)")
    p.add_argument("--scores", help="per-frame scores Parquet (default: evaluate.scores)")
    p.add_argument("--roc", help="ROC curve CSV for `dvc plots` (default: plots/roc.csv)")
    p.add_argument("--boxes", help="boxes directory, for the held-out region metrics (default: boxes.out)")

    p = add(
        "region-loss",
        cmd_region_loss,
        "which region captions carry a trained model's region loss (training set, memory bank as in training)",
    )
    p.add_argument("--model", help="fine-tuned model directory (default: train.out)")
    p.add_argument("--frames", help="frames directory (default: frames.out)")
    p.add_argument("--boxes", help="boxes directory (default: boxes.out)")
    p.add_argument("--epochs", type=int, default=2, help="passes over the training set (default: 2)")
    p.add_argument("--top", type=int, default=15, help="captions to print (default: 15)")
    p.add_argument("--json", help="also write the whole breakdown to this JSON file")

    help_ = "manage training checkpoints"
    p = sub.add_parser("checkpoints", help=help_, description=help_)
    actions = p.add_subparsers(dest="action", required=True, metavar="ACTION")
    help_ = "remove the current run's stale, broken and surplus checkpoints (never a running job's)"
    p = actions.add_parser("clean", help=help_, description=help_)
    p.add_argument("--params", default="params.yaml", help="params file (default: params.yaml)")
    p.set_defaults(func=cmd_checkpoints_clean)
    p.add_argument("--dry-run", action="store_true", help="only list what would be removed, and why")
    p.add_argument("--checkpoints", help="checkpoint root (default: train.checkpoints)")
    p.add_argument(
        "--check-inputs",
        action="store_true",
        help="also compare the base model and data hashes, as `fgclip train` does (reads them all)",
    )
    p.add_argument("--model", help="with --check-inputs: the CLIP `fgclip train --model` was given")
    p.add_argument("--frames", help="with --check-inputs: frames directory (default: frames.out)")
    p.add_argument("--boxes", help="with --check-inputs: boxes directory (default: boxes.out)")

    p = add(
        "compare", cmd_compare, "the runs of an MLflow experiment side by side: differing params, losses, AUC"
    )
    p.add_argument("--experiment", help="MLflow experiment (default: tracking.experiment)")
    p.add_argument(
        "--runs", nargs="+", metavar="RUN", help="run ids, names (newest of that name) or id prefixes"
    )
    p.add_argument("--last", type=int, default=6, help="without --runs: the newest N runs (default: 6)")
    p.add_argument("--format", choices=["table", "markdown", "csv"], default="table", help="(default: table)")
    p.add_argument("--out", help="write to this file instead of stdout")

    add(
        "serve",
        cmd_serve,
        "serve the Prefect flow fgclip-pipeline on orchestration.cron (needs a Prefect server; Ctrl-C stops)",
    )
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    _setup_logging(args.verbose)
    try:
        params = load_params(args.params)
        summary = args.func(params, args)
    except _USER_ERRORS as exc:
        print(f"fgclip {args.command}: error: {exc}", file=sys.stderr)
        return 1
    if summary is not None:
        _print_summary(summary)
    return 0


if __name__ == "__main__":
    sys.exit(main())
