"""`mpft train --config job.yaml`."""

from __future__ import annotations

import argparse
import json
import os

from jobs.config import load_train_config


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--config", required=True, help="training job YAML (see README: configuration reference)")
    parser.add_argument("--name", help="override the run name (re-using a name resumes that run)")


def main(args: argparse.Namespace) -> int:
    from jobs.train import RefusedToStart, run_train

    cfg = load_train_config(args.config)
    if args.name:
        cfg.name = args.name
    tracking_uri = cfg.tracking.uri or os.environ.get("MLFLOW_TRACKING_URI")
    if not tracking_uri:
        raise SystemExit("no MLflow tracking URI: set tracking.uri in the config or MLFLOW_TRACKING_URI")
    try:
        outcome = run_train(cfg, tracking_uri)
    except RefusedToStart as err:
        raise SystemExit(f"mpft train: refused: {err}") from None
    print(json.dumps({"run_id": outcome.run_id, "model_uri": outcome.model_uri, "version": outcome.model_version,
                      "checkpoint": outcome.checkpoint_dir}, indent=2))
    return 0
