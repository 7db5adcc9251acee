"""The ``fgclip`` console script: one subcommand per pipeline stage.

Every subcommand takes ``--params`` and its inputs and outputs as options named
for what they are, defaulting to the paths in ``params.yaml`` (``params.paths``, the
same ones dvc.yaml names); so each stage runs under DVC and outside it, on the
embedded sample or on a real UCF-Crime root.
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

from fgclip.config import Params, Paths, load_params
from fgclip.errors import FGClipError, user_error_line
from fgclip.model.sources import check_pretrained

log = logging.getLogger("fgclip")

# Errors a user can act on: printed as one clear line, exit status 1, no traceback.
# Anything else is a bug and keeps its traceback.
_USER_ERRORS: tuple[type[BaseException], ...] = (FGClipError, FileNotFoundError)


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

    return generate_sample(params.sample, params.data, args.out)


def cmd_extract_frames(params: Params, args: argparse.Namespace) -> dict:
    from fgclip.data.frames import extract_frames

    return extract_frames(params, args.data_root, args.annotations, args.out)


def cmd_validate_boxes(params: Params, args: argparse.Namespace) -> dict:
    from fgclip.data.boxes import validate_boxes

    return validate_boxes(params, args.annotations, args.frames, args.out, args.metrics)


def cmd_pretrain(params: Params, args: argparse.Namespace) -> dict:
    from fgclip.train.pretrain import pretrain_clip

    return pretrain_clip(params, args.frames, args.boxes, args.annotations, args.out)


def _check_tracking(tracking_uri: str, origin: str) -> None:
    # Imported here: MLflow takes a second or two to import, --help must stay instant.
    from fgclip.train.tracking import check_tracking

    check_tracking(tracking_uri, origin)


def cmd_train(params: Params, args: argparse.Namespace) -> dict:
    # Checked before torch, the model or the data load: either fails in seconds, not minutes in.
    source = str(check_pretrained(params, args.model))
    _check_tracking(params.tracking_uri, "tracking.uri (or MLFLOW_TRACKING_URI)")
    from fgclip.train.loop import train

    return train(
        params,
        args.frames,
        args.boxes,
        source,
        args.out,
        args.checkpoints,
        args.health,
        resume=not args.no_resume,
        max_steps=args.max_steps,
        metrics_path=args.metrics,
        loss_csv=args.loss_curve,
        loss_png=args.loss_plot,
    )


def cmd_evaluate(params: Params, args: argparse.Namespace) -> dict:
    pretrained = check_pretrained(params, args.pretrained)
    from fgclip.eval.evaluate import evaluate, training_run

    if (args.model / "run.json").is_file():  # the metrics go to the run that trained the model
        _check_tracking(training_run(args.model)[0], f"the tracking_uri of {args.model / 'run.json'}")
    return evaluate(
        params,
        args.frames,
        args.model,
        pretrained,
        args.data_root,
        args.out,
        args.scores,
        roc_path=args.roc,
        boxes_dir=args.boxes,
        roc_png=args.roc_plot,
        models_png=args.models_plot,
    )


def cmd_region_loss(params: Params, args: argparse.Namespace) -> None:
    from fgclip.atomic import write_text_atomic
    from fgclip.device import resolve_device
    from fgclip.train.loss_breakdown import format_breakdown, region_loss_breakdown

    device = resolve_device(params.train.device)
    result = region_loss_breakdown(
        params, args.model, args.frames, args.boxes, epochs=args.epochs, device=device
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
            params, model=params.pretrained_source(args.model), frames=args.frames, boxes=args.boxes
        )
    removals = clean_checkpoints(params, root=args.checkpoints, dry_run=args.dry_run, inputs=inputs)
    verb = "would remove" if args.dry_run else "removed"
    for removal in removals:
        print(f"{verb} {removal.path}: {removal.reason}")
    print(f"{verb} {len(removals)} checkpoint(s), {format_size(sum(r.size for r in removals))}")


def cmd_compare(params: Params, args: argparse.Namespace) -> None:
    from fgclip.atomic import write_text_atomic
    from fgclip.compare import compare

    if args.ablation:
        if args.runs:
            raise FGClipError("--ablation and --runs exclude each other: an ablation's runs are its children")
        from fgclip.compare import compare_ablation

        text = compare_ablation(params, args.ablation, experiment=args.experiment, fmt=args.format)
    else:
        text = compare(params, experiment=args.experiment, runs=args.runs or (), fmt=args.format, last=args.last)
    if args.out:
        out = Path(args.out)
        out.parent.mkdir(parents=True, exist_ok=True)
        write_text_atomic(out, text)
        log.info("comparison written to %s", out)
    else:
        sys.stdout.write(text)


def cmd_ablate(params: Params, args: argparse.Namespace) -> None:
    from fgclip.ablation.run import AblationFailed, ablate

    if Path(args.params).resolve() != params.base_dir / "params.yaml":
        raise FGClipError(f"--params {args.params}: the experiments run the repository's params.yaml "
                          f"({params.base_dir / 'params.yaml'}): give that one")  # fmt: skip
    result = ablate(params, grid=args.grid, seeds=args.seeds, jobs=args.jobs, name=args.name)
    sys.stdout.write(result.table_md)
    print(f"report: {result.files[0].parent} ({', '.join(f.name for f in result.files)}); "
          f"MLflow parent run {result.parent_run_id}")  # fmt: skip
    if result.failed:
        raise AblationFailed(f"{len(result.failed)} experiment(s) failed: {', '.join(sorted(result.failed))} "
                             "(their logs: dvc queue logs NAME); rerun `fgclip ablate` to run them again")  # fmt: skip


def cmd_import_weights(params: Params, args: argparse.Namespace) -> dict:
    from fgclip.model.import_weights import import_weights

    return import_weights(args.src, args.out, fmt=args.format, arch=args.arch, activation=args.activation)


def cmd_evaluate_scores(params: Params, args: argparse.Namespace) -> dict:
    from fgclip.eval.score_eval import evaluate_scores

    cfg = params.evaluate
    return evaluate_scores(
        args.scores,
        args.annotations,
        args.split,
        args.out,
        dataset=args.dataset,
        protocol=args.protocol or ("vadclip" if args.dataset == "xd" else cfg.protocol),
        videos=args.videos,
        num_frames=args.num_frames,
        name=args.name,
        far_threshold=cfg.far_threshold,
        bootstrap_resamples=cfg.bootstrap_resamples,
        bootstrap_seed=cfg.bootstrap_seed,
        bootstrap_level=cfg.bootstrap_level,
    )


def cmd_export_gt(params: Params, args: argparse.Namespace) -> dict:
    from fgclip.eval.score_eval import export_ground_truth

    return export_ground_truth(
        args.annotations,
        args.videos,
        args.out,
        dataset=args.dataset,
        protocol=args.protocol,
        num_frames=args.num_frames,
    )


def cmd_serve(params: Params, args: argparse.Namespace) -> None:
    # The one subcommand that reaches into the orchestration layer (pipeline/, Prefect).
    from pipeline.flow import serve

    serve(Path(args.params))


# --- parser --------------------------------------------------------------------


def _path_option(p: argparse.ArgumentParser, flag: str, field: str, help_: str, default: str = "") -> None:
    """``flag`` names a file or directory; left out, it is ``params.paths.<field>`` (resolved in main)."""
    dest = flag.lstrip("-").replace("-", "_")
    p.add_argument(
        flag, dest=dest, type=_path_or_default, help=f"{help_} (default: {default or Paths.key(field)})"
    )
    p.get_default("path_fields")[dest] = field


def _path_or_default(value: str) -> Path | None:
    # An empty value (`--out "$UNSET"`) means the default, never the working directory.
    return Path(value) if value else None


def _resolve_path_options(params: Params, args: argparse.Namespace) -> None:
    """Fill each path option left out from ``params.paths``; dataset files follow ``--data-root``."""
    fields = getattr(args, "path_fields", {})
    if not fields:
        return
    paths = params.resolve_paths(data_root=getattr(args, "data_root", None))
    for dest, field in fields.items():
        if getattr(args, dest) is None:
            setattr(args, dest, getattr(paths, field))


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="fgclip",
        description="Fine-tune video FG-CLIP for weakly supervised video anomaly detection.",
        allow_abbrev=False,  # `--max-step` must not quietly mean --max-steps
    )
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    def add(name: str, func: Callable, help_: str) -> argparse.ArgumentParser:
        p = sub.add_parser(name, help=help_, description=help_, allow_abbrev=False)
        p.add_argument("--params", default="params.yaml", help="params file (default: params.yaml)")
        p.set_defaults(func=func, path_fields={})
        return p

    p = add("sample", cmd_sample, "generate the embedded UCF-Crime-style sample (real H.264)")
    _path_option(p, "--out", "sample", "dataset root to write")

    p = add("extract-frames", cmd_extract_frames, "decode videos, write selected frames + Parquet index")
    _path_option(p, "--data-root", "data_root", "UCF-Crime root: videos and split files")
    _path_option(p, "--annotations", "annotations", "region annotation JSON", "<data-root>/data.annotations")
    _path_option(p, "--out", "frames", "frames directory")

    p = add("validate-boxes", cmd_validate_boxes, "validate boxes into Parquet shards + rejects")
    _path_option(p, "--annotations", "annotations", "region annotation JSON", "<data.root>/data.annotations")
    _path_option(p, "--frames", "frames", "frames directory")
    _path_option(p, "--out", "boxes", "boxes directory")
    _path_option(p, "--metrics", "boxes_metrics", "counts JSON")

    p = add("pretrain", cmd_pretrain, "train the tiny stand-in CLIP from scratch (skipped for real weights)")
    _path_option(p, "--frames", "frames", "frames directory")
    _path_option(p, "--boxes", "boxes", "boxes directory")
    _path_option(
        p,
        "--annotations",
        "annotations",
        "region annotation JSON, the tokenizer corpus",
        "<data.root>/data.annotations",
    )
    _path_option(p, "--out", "stand_in", "model directory")

    p = add("train", cmd_train, "fine-tune video FG-CLIP (resumes from the latest matching checkpoint)")
    _path_option(p, "--frames", "frames", "frames directory")
    _path_option(p, "--boxes", "boxes", "boxes directory")
    p.add_argument(
        "--model", help="pretrained CLIP: directory or hub id (default: model.pretrained or pretrain.out)"
    )
    _path_option(p, "--out", "model", "fine-tuned model directory")
    _path_option(p, "--checkpoints", "checkpoints", "checkpoint root")
    _path_option(p, "--health", "health", "health report JSON")
    _path_option(p, "--metrics", "train_metrics", "training summary JSON")
    _path_option(p, "--loss-curve", "loss_curve", "per-step losses CSV")
    _path_option(p, "--loss-plot", "loss_plot", "the losses drawn as a PNG (`dvc plots show`)")
    p.add_argument("--max-steps", type=int, help="stop after this many optimizer steps")
    p.add_argument("--no-resume", action="store_true", help="ignore existing checkpoints")

    p = add("evaluate", cmd_evaluate, "frame-level AUC by the UCF-Crime protocol, zero-shot from prompts")
    _path_option(p, "--data-root", "data_root", "UCF-Crime root: test split and temporal annotations")
    _path_option(p, "--frames", "frames", "frames directory")
    _path_option(p, "--model", "model", "fine-tuned model directory")
    p.add_argument(
        "--pretrained",
        help="pretrained CLIP baseline: directory or hub id (default: model.pretrained or pretrain.out)",
    )
    _path_option(p, "--out", "eval_metrics", "metrics JSON")
    _path_option(p, "--scores", "scores", "per-frame scores Parquet")
    _path_option(p, "--roc", "roc", "fine-tuned ROC curve CSV")
    _path_option(p, "--roc-plot", "roc_plot", "every model's ROC curve as a PNG (`dvc plots show`)")
    _path_option(p, "--models-plot", "models_plot", "the models side by side as a PNG (`dvc plots show`)")
    _path_option(p, "--boxes", "boxes", "boxes directory, for the held-out region metrics")

    p = add(
        "region-loss",
        cmd_region_loss,
        "which region captions carry a trained model's region loss (training set, memory bank as in training)",
    )
    _path_option(p, "--model", "model", "fine-tuned model directory")
    _path_option(p, "--frames", "frames", "frames directory")
    _path_option(p, "--boxes", "boxes", "boxes directory")
    p.add_argument("--epochs", type=int, default=2, help="passes over the training set (default: 2)")
    p.add_argument("--top", type=int, default=15, help="captions to print (default: 15)")
    p.add_argument("--json", help="also write the whole breakdown to this JSON file")

    help_ = "manage training checkpoints"
    p = sub.add_parser("checkpoints", help=help_, description=help_, allow_abbrev=False)
    actions = p.add_subparsers(dest="action", required=True, metavar="ACTION")
    help_ = "remove the current run's stale, broken and surplus checkpoints (never a running job's)"
    p = actions.add_parser("clean", help=help_, description=help_, allow_abbrev=False)
    p.add_argument("--params", default="params.yaml", help="params file (default: params.yaml)")
    p.set_defaults(func=cmd_checkpoints_clean, path_fields={})
    p.add_argument("--dry-run", action="store_true", help="only list what would be removed, and why")
    _path_option(p, "--checkpoints", "checkpoints", "checkpoint root")
    p.add_argument(
        "--check-inputs",
        action="store_true",
        help="also compare the base model and data hashes, as `fgclip train` does (reads them all)",
    )
    p.add_argument("--model", help="with --check-inputs: the CLIP `fgclip train --model` was given")
    _path_option(p, "--frames", "frames", "with --check-inputs: frames directory")
    _path_option(p, "--boxes", "boxes", "with --check-inputs: boxes directory")

    p = add(
        "compare", cmd_compare, "the runs of an MLflow experiment side by side: differing params, losses, AUC"
    )
    p.add_argument("--experiment", help="MLflow experiment (default: tracking.experiment)")
    p.add_argument(
        "--runs", nargs="+", metavar="RUN", help="run ids, names (newest of that name) or id prefixes"
    )
    p.add_argument("--last", type=int, default=6, help="without --runs: the newest N runs (default: 6)")
    p.add_argument("--ablation", metavar="NAME", help="an ablation's table (mean ± std over seeds) from its child runs")
    p.add_argument("--format", choices=["table", "markdown", "csv"], default="table", help="(default: table)")
    p.add_argument("--out", help="write to this file instead of stdout")

    p = add("ablate", cmd_ablate, "a grid of experiments over seeds, run by DVC's queue, tabled from MLflow")
    p.add_argument("--grid", help="a grid of ablation.grids, or a YAML file of one (default: ablation.grid)")
    p.add_argument("--seeds", type=int, help="seeds per cell: train.seed, +1, ... (default: ablation.seeds)")
    p.add_argument("--jobs", type=int, help="experiments at a time (default: ablation.jobs)")
    p.add_argument("--name", help="the ablation's name: experiment names, MLflow parent run (default: the grid's)")

    p = add(
        "import-weights",
        cmd_import_weights,
        "convert OpenAI, open_clip or FG-CLIP weights into a model directory model.pretrained accepts",
    )
    p.add_argument(
        "src", type=Path, help="OpenAI .pt (TorchScript or state dict), open_clip file or dir, FG-CLIP dir"
    )
    p.add_argument("--out", type=Path, required=True, help="model directory to write (replaced whole)")
    p.add_argument(
        "--format",
        choices=["auto", "openai", "open_clip", "fgclip"],
        default="auto",
        help="what SRC is (default: auto, from the file or directory)",
    )
    p.add_argument(
        "--arch", help="open_clip model name (ViT-B-32, ViT-B-32-quickgelu, ViT-H-14): activation, head width"
    )
    p.add_argument(
        "--activation",
        choices=["gelu", "quick_gelu"],
        help="open_clip's MLP activation, when neither --arch nor open_clip_config.json says it",
    )

    protocols = ["full", "sultani", "vadclip", "rtfm", "xdviodet"]
    datasets_help = "ucf (UCF-Crime) or xd (XD-Violence: annotations.txt, labels in the file names)"
    p = add(
        "evaluate-scores",
        cmd_evaluate_scores,
        "frame AUC/AP of any method's per-snippet scores under a reference protocol (no model needed)",
    )
    p.add_argument(
        "scores",
        type=Path,
        help="a directory of per-video .npy (one score per 16-frame snippet), a CSV/Parquet table "
        "(video, snippet, score), or one concatenated .npy with --videos",
    )
    p.add_argument("--dataset", choices=["ucf", "xd"], default="ucf", help=datasets_help)
    p.add_argument(
        "--protocol",
        choices=protocols,
        help="ucf: full|sultani|vadclip|rtfm (default: evaluate.protocol); xd: vadclip|xdviodet (default vadclip)",
    )
    p.add_argument("--videos", type=Path, help="with one concatenated .npy: 'NAME NUM_SNIPPETS' lines in its order")
    p.add_argument(
        "--num-frames", type=Path, help="'NAME NUM_FRAMES' lines: needed by the full, sultani and xdviodet protocols"
    )
    p.add_argument("--name", default="method", help="the method's key in the JSON (default: method)")
    p.add_argument("--data-root", type=Path, help="dataset root for the default --annotations and --split")
    _path_option(p, "--annotations", "temporal_annotations", "temporal annotation file")
    _path_option(p, "--split", "test_split", "test split file: the test set and its order")
    p.add_argument("--out", type=Path, required=True, help="metrics JSON to write")

    p = add(
        "export-gt",
        cmd_export_gt,
        "a reference's frame-level ground-truth array (.npy) for videos in a given order",
    )
    p.add_argument("--dataset", choices=["ucf", "xd"], default="ucf", help=datasets_help)
    p.add_argument("--protocol", choices=protocols, default="vadclip", help="(default: vadclip)")
    p.add_argument("--videos", type=Path, required=True, help="'NAME NUM_SNIPPETS' lines: the order and lengths")
    p.add_argument(
        "--num-frames", type=Path, help="'NAME NUM_FRAMES' lines: for the full, sultani and xdviodet protocols"
    )
    p.add_argument("--data-root", type=Path, help="dataset root for the default --annotations")
    _path_option(p, "--annotations", "temporal_annotations", "temporal annotation file")
    p.add_argument("--out", type=Path, required=True, help=".npy file to write")

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
        _resolve_path_options(params, args)
        summary = args.func(params, args)
    except _USER_ERRORS as exc:
        print(user_error_line(args.command, exc), file=sys.stderr)
        return 1
    if summary is not None:
        _print_summary(summary)
    return 0


if __name__ == "__main__":
    sys.exit(main())
