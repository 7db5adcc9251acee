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


def _pretrained_source(params: Params, model: str | None) -> str:
    """The CLIP to fine-tune from: --model, else params' pretrained id/path, else the stand-in."""
    if model:
        return model
    if params.model.pretrained:
        return params.model.pretrained
    return str(params.path(params.pretrain.out))


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
        _pretrained_source(params, args.model),
        _path(args.out) or params.path(params.train.out),
        _path(args.checkpoints) or params.path(params.train.checkpoints),
        _path(args.health) or params.path("metrics/health.json"),
        resume=not args.no_resume,
        max_steps=args.max_steps,
    )


def cmd_evaluate(params: Params, args: argparse.Namespace) -> dict:
    from fgclip.eval.evaluate import evaluate

    pretrained = args.pretrained or _pretrained_source(params, None)
    return evaluate(
        params,
        _path(args.frames) or params.path(params.frames.out),
        _path(args.model) or params.path(params.train.out),
        Path(pretrained) if Path(pretrained).exists() else pretrained,
        _path(args.data_root) or params.data_root,
        _path(args.out) or params.path(params.evaluate.out),
        _path(args.scores) or params.path(params.evaluate.scores),
        roc_path=_path(args.roc) or params.path("plots/roc.csv"),
    )


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
