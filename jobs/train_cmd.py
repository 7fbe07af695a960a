"""`mpft train --config job.yaml [--set KEY=VALUE ...]`."""

from __future__ import annotations

import argparse
import json

from jobs.common import configured_tracking_uri


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--config", required=True, help="training job YAML (see README: configuration reference)")
    parser.add_argument("--name", help="override the run name (re-using a name resumes that run)")
    parser.add_argument("--set", dest="overrides", nargs="+", action="extend", default=[], metavar="KEY=VALUE",
                        help="override one setting of the YAML, e.g. --set method.detector.mask.strategy=random "
                             "(value read as YAML: 0.25, null, [a, b]); several at once or repeated")
    parser.add_argument("--resume", choices=("auto", "force"), default="auto",
                        help="auto: resume a same-name run only if its settings and data are unchanged (refused "
                             "otherwise); force: resume it under the new settings and data")


def main(args: argparse.Namespace) -> int:
    from jobs.config import load_train_config

    cfg = load_train_config(args.config, args.overrides)
    if args.name:
        cfg.name = args.name
    tracking_uri = configured_tracking_uri(cfg.tracking.uri, "tracking.uri")
    # Only now: the training stack costs ~6 s to import, and a mistake in the config is reported in ~1 s without it.
    from jobs.train import RefusedToStart, run_train
    try:
        outcome = run_train(cfg, tracking_uri, verbose=args.verbose, resume=args.resume)
    except RefusedToStart as err:
        raise SystemExit(f"mpft train: refused: {err}") from None
    print(json.dumps({"run_id": outcome.run_id, "model_uri": outcome.model_uri, "version": outcome.model_version,
                      "checkpoint": outcome.checkpoint_dir}, indent=2))
    return 0
