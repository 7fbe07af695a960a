"""Flags every `mpft` subcommand shares: where MLflow, Ray and the object store are.

Environment variables are read here, at the edge, and nowhere deeper (configs are passed down as objects).
"""

from __future__ import annotations

import argparse
import logging
import os
from typing import Optional

from pipelines.storage import StorageConfig

log = logging.getLogger(__name__)


def add_stack_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--tracking-uri", default=os.environ.get("MLFLOW_TRACKING_URI"),
                        help="MLflow tracking server (default: $MLFLOW_TRACKING_URI)")
    parser.add_argument("--ray-address", default=None,
                        help="Ray cluster to join (default: $RAY_ADDRESS, else a private local instance)")
    parser.add_argument("--s3-endpoint", default=None,
                        help="S3-compatible endpoint URL (default: $AWS_ENDPOINT_URL, else AWS)")
    parser.add_argument("--s3-region", default=None, help="default: $AWS_REGION / $AWS_DEFAULT_REGION")


def storage_from_args(args: argparse.Namespace) -> StorageConfig:
    """Endpoint/region from flags; credentials stay in the standard AWS variables (never on a command line)."""
    return StorageConfig(endpoint_url=args.s3_endpoint, region=args.s3_region)


def connect_tracking(args: argparse.Namespace, required: bool) -> Optional[str]:
    from jobs import tracking

    if not args.tracking_uri:
        if required:
            raise SystemExit("no MLflow tracking URI: pass --tracking-uri or set MLFLOW_TRACKING_URI")
        log.warning("no MLflow tracking URI: this run is not logged")
        return None
    tracking.set_tracking(args.tracking_uri)
    return args.tracking_uri
