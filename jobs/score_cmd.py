"""`mpft score --model REF --input URI [--output URI]`.

With --output: the streaming Ray job (resumable; re-run the same command to finish an interrupted job, with the model
version it started with).
Without it, on one image or a local folder of at most --table-max files: score in-process and print a table.
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


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", required=True,
                        help="models:/name@alias, models:/name/version, runs:/<id>/model, or a checkpoint directory")
    parser.add_argument("--input", required=True, help="s3://bucket/prefix, a local folder, one image, or a manifest")
    parser.add_argument("--output", help="s3://bucket/prefix or folder for the Parquet parts (omit for a table)")
    parser.add_argument("--layout", default="unlabelled", choices=["unlabelled", "genimage", "ufd", "manifest"],
                        help="how to list --input (default: every image file under it)")
    add_resource_arguments(parser)
    parser.add_argument("--decode-in-actor", action="store_true",
                        help="read and decode inside the scoring actors (one stage; for CPU-only nodes)")
    parser.add_argument("--table-max", type=int, default=50,
                        help="without --output, print a table for at most this many local files")
    add_stack_arguments(parser)


def main(args: argparse.Namespace) -> int:
    from jobs.score import format_table, local_inputs, score_in_process
    from pipelines.scoring import OutputRefused

    storage_cfg = storage_from_args(args)
    if args.output is None:
        paths = local_inputs(args.input)
        if paths is None or len(paths) > args.table_max:
            found = "a remote input" if paths is None else f"{len(paths)} files"
            raise SystemExit(f"{found}: pass --output for a scoring job (a table is printed only for a local file "
                             f"or folder of at most --table-max={args.table_max} files)")
        from jobs import tracking

        if args.tracking_uri:  # only needed to resolve a registry reference; nothing is logged for a table
            tracking.set_tracking(args.tracking_uri)
        model = tracking.resolve_model(args.model, storage_cfg)
        table = score_in_process(model, paths, max_pixels=args.max_pixels, storage_cfg=storage_cfg)
        print(format_table(table, base=args.input))
        return 0

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
    job = ScoreJob(model_ref=args.model, input_uri=args.input, output_uri=args.output, layout=args.layout,
                   storage=storage_cfg, resources=resources_from_args(args), decode_in_actor=args.decode_in_actor)
    return run_score_job(job, model, tracking_uri=tracking_uri, ray_address=args.ray_address,
                         verbose=args.verbose)
