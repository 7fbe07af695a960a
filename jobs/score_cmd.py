"""`mpft score --model REF --input URI [--output URI]`.

With --output: the streaming Ray job (resumable; re-run the same command to finish an interrupted job, with the model
version it started with).
Without it, on one image or a local folder of at most --table-max files: score in-process and print a table.

Every file under --input is an input whatever its name (hidden files and folders excepted); --extensions narrows
that. A manifest naming files outside its own folder is refused before Ray starts, unless --allow-outside-corpus.
"""

from __future__ import annotations

import argparse
import json
from typing import TYPE_CHECKING

from jobs.common import (
    add_resource_arguments,
    add_stack_arguments,
    connect_tracking,
    resources_from_args,
    storage_from_args,
)

if TYPE_CHECKING:
    from pipelines.scoring import ScoreSummary
    from pipelines.sources import SourceConfig


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", required=True,
                        help="models:/name@alias, models:/name/version, runs:/<id>/model, or a checkpoint directory")
    parser.add_argument("--input", required=True, help="s3://bucket/prefix, a local folder, one image, or a manifest")
    parser.add_argument("--output", help="s3://bucket/prefix or folder for the Parquet parts (omit for a table)")
    parser.add_argument("--layout", default="unlabelled", choices=["unlabelled", "genimage", "ufd", "manifest"],
                        help="how to list --input (default: every file under it, images or not)")
    parser.add_argument("--extensions", type=extension_list, default=None, metavar="PNG,JPG",
                        help="list only files with these extensions, any case (default: every non-hidden file; "
                             "the decoder tells images from the rest)")
    parser.add_argument("--allow-outside-corpus", action="store_true",
                        help="--layout manifest: let rows name files outside the manifest's folder (refused by "
                             "default; special files such as /dev/* always are)")
    add_resource_arguments(parser)
    parser.add_argument("--decode-in-actor", action="store_true",
                        help="read and decode inside the scoring actors (one stage; for CPU-only nodes)")
    parser.add_argument("--store", metavar="URI",
                        help="score store (s3://bucket/prefix or folder): inputs whose bytes it holds for this model "
                             "reuse the stored score instead of being scored again, inputs with the same bytes are "
                             "scored once, and new scores are added (rows say fresh / reused / duplicate)")
    parser.add_argument("--inputs-per-pass", type=positive_int, default=1_000_000, metavar="N",
                        help="with --store, score the inputs in passes of at most N (default 1,000,000): the "
                             "driver's memory for hashes, reuse plan and rows grows with N, not with the crawl; "
                             "each pass starts its own actors")
    parser.add_argument("--table-max", type=int, default=50,
                        help="without --output, print a table for at most this many local files")
    add_stack_arguments(parser)


def positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, not {value}")
    return value


def extension_list(text: str) -> list[str]:
    """``"png,JPG"`` -> ``["png", "JPG"]`` (SourceConfig normalises them)."""
    return [part for part in (p.strip() for p in text.split(",")) if part]


def source_from_args(args: argparse.Namespace) -> SourceConfig:
    """The source --input, --layout, --extensions and --allow-outside-corpus describe; SystemExit in one line if
    they do not fit together."""
    from pydantic import ValidationError

    from pipelines.sources import SourceConfig

    try:
        return SourceConfig(uri=args.input, layout=args.layout, extensions=args.extensions,
                            allow_outside_corpus=args.allow_outside_corpus)
    except ValidationError as err:
        raise SystemExit(f"mpft score: {'; '.join(e['msg'] for e in err.errors())}") from None


def table_inputs(source: SourceConfig) -> list[str] | None:
    """The files of a local file or folder, listed as the Ray job lists them; None for a remote input or a
    manifest (those need --output)."""
    from pathlib import Path

    from pipelines import sources, storage

    if storage.is_remote(source.uri) or source.layout == "manifest":
        return None
    path = Path(source.uri)
    if path.is_file():
        return [str(path.resolve())]
    return sources.listed_files(source) if path.is_dir() else None


def check_input_before_ray(source: SourceConfig, storage_cfg) -> None:
    """A manifest is read, and refused if it reaches outside its corpus, before Ray starts (a folder is listed
    once, by the job)."""
    from pipelines.sources import build_manifest

    if source.layout == "manifest":
        try:
            build_manifest(source, storage_cfg)
        except ValueError as err:
            raise SystemExit(f"mpft score: {err}") from None


def main(args: argparse.Namespace) -> int:
    from jobs.score import format_table, score_in_process
    from pipelines.scoring import OutputRefused

    storage_cfg = storage_from_args(args)
    source = source_from_args(args)
    if args.output is None:
        paths = table_inputs(source)
        if paths is None or len(paths) > args.table_max:
            found = "a remote input" if paths is None else f"{len(paths)} files"
            raise SystemExit(f"{found}: pass --output for a scoring job (a table is printed only for a local file "
                             f"or folder of at most --table-max={args.table_max} files)")
        from jobs import tracking

        if args.store:
            raise SystemExit("--store needs --output (the table of a few files is scored in-process, afresh)")
        if args.tracking_uri:  # only needed to resolve a registry reference; nothing is logged for a table
            tracking.set_tracking(args.tracking_uri)
        model = tracking.resolve_model(args.model, storage_cfg)
        table = score_in_process(model, paths, max_pixels=args.max_pixels, storage_cfg=storage_cfg)
        print(format_table(table, base=args.input))
        return 0

    check_input_before_ray(source, storage_cfg)
    try:
        summary = score_to_output(args, storage_cfg)
    except OutputRefused as err:
        raise SystemExit(str(err)) from None  # one line: e.g. which model the output holds, and what to do instead
    print(json.dumps(summary.to_dict(), indent=2))
    return 0


def score_to_output(args: argparse.Namespace, storage_cfg) -> ScoreSummary:
    """The Ray job on ``--output``, continuing with the model version the output was started with."""
    from jobs.score import resolve_model_for_output, run_score_job
    from pipelines.scoring import ScoreJob

    tracking_uri = connect_tracking(args, required=False)
    model = resolve_model_for_output(args.model, args.output, storage_cfg)
    source = source_from_args(args)
    job = ScoreJob(model_ref=args.model, input_uri=args.input, output_uri=args.output, layout=args.layout,
                   extensions=tuple(source.extensions) if source.extensions else None,
                   allow_outside_corpus=source.allow_outside_corpus, storage=storage_cfg,
                   resources=resources_from_args(args), decode_in_actor=args.decode_in_actor,
                   score_store=args.store, inputs_per_pass=args.inputs_per_pass)
    return run_score_job(job, model, tracking_uri=tracking_uri, ray_address=args.ray_address,
                         verbose=args.verbose)
