"""`mpft explain --model REF --input URI --output FOLDER`: which patches drive each image's score, as PNG overlays.

    mpft explain --model models:/mpft-detector@champion --input suspicious.jpg --output /tmp/why
    mpft explain --model ./ckpt --input s3://crawl/day-12/ --output /tmp/why --max-images 16 --group 1
    mpft explain --from-scores s3://scores/day-12/ --top 12 --output /tmp/why --mlflow   # gallery of the top flagged
    mpft explain --from-scores s3://scores/day-12/ --top 12 --output /tmp/why --log-to-run <scoring run id>

With --from-scores the model defaults to the one the output was scored with. The method and the files written are
described in jobs/explain.py and mpft_core/explain.py.
"""

from __future__ import annotations

import argparse
import os

from jobs.common import TRACKING_URI_ENV


def add_arguments(parser: argparse.ArgumentParser) -> None:
    what = parser.add_mutually_exclusive_group(required=True)
    what.add_argument("--input", help="one image, a local folder or an s3:// prefix")
    what.add_argument("--from-scores", metavar="OUTPUT_URI",
                      help="a scoring output (mpft score --output): explain its --top highest-scoring images")
    parser.add_argument("--model",
                        help="models:/name@alias, models:/name/version, runs:/<id>/model, or a checkpoint directory "
                             "(default with --from-scores: the model the output was scored with)")
    parser.add_argument("--output", required=True, help="local folder for the PNGs, the index and the contact sheet")
    parser.add_argument("--max-images", type=int, default=32,
                        help="--input: explain at most this many files, the first in sorted order "
                             "(default: %(default)s)")
    parser.add_argument("--top", type=int, default=12,
                        help="--from-scores: how many of the highest-scoring images (default: %(default)s)")
    parser.add_argument("--group", type=int, default=2,
                        help="hide groups of GROUP x GROUP ViT patches at a time (default: %(default)s)")
    parser.add_argument("--hide", choices=["trained", "drop", "fill"], default="trained",
                        help="drop patch tokens, or fill patches with the mean colour; trained: as the model's "
                             "fine-tuning hid them (drop if it used no masking) (default: %(default)s)")
    parser.add_argument("--units", choices=["score", "logit"], default="score",
                        help="attribution as the change in score (probability) or in the head's logit, which still "
                             "shows detail on confident scores near 0 or 1 (default: %(default)s)")
    parser.add_argument("--extensions", default=None, metavar="PNG,JPG",
                        help="--input: list only files with these extensions (default: every non-hidden file)")
    parser.add_argument("--max-pixels", type=int, default=None, help="refuse larger images (decompression bombs)")
    parser.add_argument("--gpu", action="store_true", help="run the model on the first CUDA device")
    gallery = parser.add_mutually_exclusive_group()
    gallery.add_argument("--log-to-run", metavar="RUN_ID",
                         help="log the overlays and a contact sheet under explain/ of this MLflow run (e.g. the "
                              "scoring run)")
    gallery.add_argument("--mlflow", action="store_true",
                         help="log them to a new run of experiment mpft-scoring")
    parser.add_argument("--tracking-uri", default=os.environ.get(TRACKING_URI_ENV),
                        help=f"MLflow tracking server (default: ${TRACKING_URI_ENV})")
    parser.add_argument("--s3-endpoint", default=None,
                        help="S3-compatible endpoint URL (default: $AWS_ENDPOINT_URL, else AWS)")
    parser.add_argument("--s3-region", default=None, help="default: $AWS_REGION / $AWS_DEFAULT_REGION")


def main(args: argparse.Namespace) -> int:
    from jobs import tracking
    from jobs.common import connect_tracking, storage_from_args
    from jobs.explain import ExplainSettings, explain_paths, list_inputs, log_gallery, top_scored
    from jobs.score_cmd import extension_list

    storage_cfg = storage_from_args(args)
    if args.output.startswith("s3://"):
        raise SystemExit("--output must be a local folder (the PNGs are for a person to open; --mlflow or "
                         "--log-to-run publishes them)")
    logging_gallery = bool(args.log_to_run or args.mlflow)
    tracking_uri = connect_tracking(args, required=logging_gallery) if logging_gallery else None
    if tracking_uri is None and args.tracking_uri:  # only to resolve a registry reference
        tracking.set_tracking(args.tracking_uri)
    if args.from_scores:
        paths, scored_with = top_scored(args.from_scores, args.top, storage_cfg)
        model_ref = args.model or scored_with
        if not model_ref:
            raise SystemExit(f"{args.from_scores} does not name the model it was scored with: pass --model")
    else:
        if not args.model:
            raise SystemExit("--model is required with --input (only --from-scores knows its model)")
        extensions = extension_list(args.extensions) if args.extensions else None
        paths = list_inputs(args.input, storage_cfg, args.max_images, extensions)
        model_ref = args.model
    model = tracking.resolve_model(model_ref, storage_cfg)
    settings = ExplainSettings(group=args.group, hide=args.hide, units=args.units, use_gpu=args.gpu,
                               **({"max_pixels": args.max_pixels} if args.max_pixels else {}))
    index = explain_paths(model, paths, args.output, settings, storage_cfg)
    explained = index.filter(index.column("error").is_null()).num_rows
    print(f"explained {explained} of {index.num_rows} images into {args.output} (index.parquet, index.json)")
    if logging_gallery:
        source = args.from_scores or args.input
        run_id = log_gallery(index, args.output, run_id=args.log_to_run, run_name=f"explain-{_short(source)}",
                             tags={"source": source, "model_uri": model.uri, "group": args.group,
                                   "hide": args.hide, "units": args.units, "images": index.num_rows})
        print(f"gallery logged under explain/ of MLflow run {run_id}")
    return 0


def _short(uri: str) -> str:
    """The last path element of ``uri`` (a run name, not an identity)."""
    return uri.rstrip("/").rsplit("/", 1)[-1] or uri
