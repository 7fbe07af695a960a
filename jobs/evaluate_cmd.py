"""`mpft evaluate --model REF --source URI [--source URI ...] [--perturb jpeg=65,30 blur=3,5 downscale=112,64]
[--align jpeg=96 resize=256+jpeg=96]`."""

from __future__ import annotations

import argparse

from jobs.common import (
    add_resource_arguments,
    add_stack_arguments,
    connect_tracking,
    resources_from_args,
    storage_from_args,
)
from jobs.score_cmd import extension_list


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", required=True,
                        help="models:/name@alias, models:/name/version, runs:/<id>/model, or a checkpoint directory")
    parser.add_argument("--source", action="append", required=True,
                        help="labelled images: folder/prefix (GenImage or UFD layout) or a manifest; repeatable")
    parser.add_argument("--layout", default="genimage", choices=["genimage", "ufd", "manifest"])
    parser.add_argument("--split", default=None,
                        help="genimage: train/val (test images live in val); manifest: its split column")
    parser.add_argument("--subsets", nargs="+", default=None,
                        help="only these subsets (canonical names such as sdv14, or folder names such as "
                             "stable_diffusion_v_1_4); ufd: their paired real sets come along")
    parser.add_argument("--extensions", type=extension_list, default=None, metavar="PNG,JPG",
                        help="list only files with these extensions, any case (default: every non-hidden file)")
    parser.add_argument("--allow-outside-corpus", action="store_true",
                        help="--layout manifest: let rows name files outside the manifest's folder")
    parser.add_argument("--perturb", nargs="+", default=[], metavar="KIND=V1,V2",
                        help="also evaluate degraded copies, e.g. jpeg=65,30 blur=3,5 downscale=112,64")
    parser.add_argument("--align", nargs="+", default=[], metavar="KIND=V[+KIND=V]",
                        help="also evaluate format-aligned copies: every image of both classes re-encoded the same "
                             "way, steps joined by + in order, e.g. jpeg=96 or resize=256+jpeg=96 (steps: jpeg = "
                             "re-encode at quality Q, resize = shorter side to N px)")
    parser.add_argument("--output", help="folder or s3:// prefix for eval_metrics.{parquet,md} and eval_scores")
    parser.add_argument("--no-log", dest="log", action="store_false", help="do not log to MLflow")
    parser.add_argument("--no-feature-space", dest="feature_space", action="store_false",
                        help="skip the PCA plots of the frozen and fine-tuned embeddings")
    parser.add_argument("--max-feature-points", type=int, default=1000)
    parser.add_argument("--no-format-check", dest="format_check", action="store_false",
                        help="skip reading the first bytes of up to 200 files per class to warn when the classes "
                             "differ in file format")
    parser.add_argument("--run-name", default=None, help="MLflow run name")
    add_resource_arguments(parser)
    add_stack_arguments(parser)


def main(args: argparse.Namespace) -> int:
    from jobs.evaluate import run_evaluate
    from mpft_core.perturb import parse_align_specs, parse_perturb_specs
    from pipelines.evaluation import EvalOptions
    from pipelines.sources import SourceConfig

    try:
        perturbations = [*parse_perturb_specs(args.perturb), *parse_align_specs(args.align)]
    except ValueError as err:
        raise SystemExit(str(err)) from None
    tracking_uri = connect_tracking(args, required=args.log)
    sources = [SourceConfig(uri=uri, layout=args.layout, split=args.split, subsets=args.subsets,
                            extensions=args.extensions, allow_outside_corpus=args.allow_outside_corpus)
               for uri in args.source]
    options = EvalOptions(resources=resources_from_args(args), feature_space=args.feature_space,
                          max_feature_points=args.max_feature_points, format_check=args.format_check)
    _, run_id = run_evaluate(args.model, sources, storage_cfg=storage_from_args(args), perturbations=perturbations,
                             options=options, output_uri=args.output,
                             tracking_uri=tracking_uri if args.log else None, ray_address=args.ray_address,
                             run_name=args.run_name, verbose=args.verbose)
    if run_id:
        print(f"MLflow run: {run_id}")
    return 0
