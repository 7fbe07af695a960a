"""Flags `mpft` subcommands share: where MLflow, Ray and the object store are, and what a scoring pass may use.

Environment variables are read here, at the edge, and nowhere deeper (configs are passed down as objects). Nothing
heavy is imported at module level: `mpft --help` builds every subcommand's parser from these functions.
"""

from __future__ import annotations

import argparse
import logging
import os
from dataclasses import fields
from typing import TYPE_CHECKING, Optional

from pipelines.scoring_spec import ScoringResources

if TYPE_CHECKING:
    from pipelines.storage import StorageConfig

log = logging.getLogger(__name__)

TRACKING_URI_ENV = "MLFLOW_TRACKING_URI"


def add_stack_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--tracking-uri", default=os.environ.get(TRACKING_URI_ENV),
                        help=f"MLflow tracking server (default: ${TRACKING_URI_ENV})")
    parser.add_argument("--ray-address", default=None,
                        help="Ray cluster to join (default: $RAY_ADDRESS, else a private local instance)")
    parser.add_argument("--s3-endpoint", default=None,
                        help="S3-compatible endpoint URL (default: $AWS_ENDPOINT_URL, else AWS)")
    parser.add_argument("--s3-region", default=None, help="default: $AWS_REGION / $AWS_DEFAULT_REGION")


def add_resource_arguments(parser: argparse.ArgumentParser) -> None:
    """One flag per ``ScoringResources`` field (``mpft score`` and ``mpft evaluate``), its default and help taken
    from the dataclass; ``resources_from_args`` reads them back."""
    defaults = ScoringResources()
    for resource in fields(ScoringResources):
        flag = resource.metadata.get("flag", "--" + resource.name.replace("_", "-"))
        default = getattr(defaults, resource.name)
        if isinstance(default, bool):  # every boolean resource is off by default: the flag turns it on
            parser.add_argument(flag, dest=resource.name, action="store_true", help=resource.metadata["help"])
        else:
            parser.add_argument(flag, dest=resource.name, type=type(default), default=default,
                                help=f"{resource.metadata['help']} (default: %(default)s)")


def resources_from_args(args: argparse.Namespace) -> ScoringResources:
    """The ``ScoringResources`` the flags of ``add_resource_arguments`` ask for."""
    return ScoringResources(**{resource.name: getattr(args, resource.name) for resource in fields(ScoringResources)})


def storage_from_args(args: argparse.Namespace) -> StorageConfig:
    """Endpoint/region from flags; credentials stay in the standard AWS variables (never on a command line)."""
    from pipelines.storage import StorageConfig  # pyarrow.fs: only once a command runs, never for --help

    return StorageConfig(endpoint_url=args.s3_endpoint, region=args.s3_region)


def require_tracking_uri(uri: Optional[str], how_to_set: str) -> str:
    """``uri`` if it is set; otherwise SystemExit with one line: no tracking URI, ``how_to_set`` or the variable."""
    if not uri:
        raise SystemExit(f"no MLflow tracking URI: {how_to_set} or set {TRACKING_URI_ENV}")
    return uri


def configured_tracking_uri(configured: Optional[str], config_key: str) -> str:
    """A job config's tracking URI (``config_key``, e.g. ``tracking.uri``), else ``$MLFLOW_TRACKING_URI``; SystemExit
    when neither is set."""
    return require_tracking_uri(configured or os.environ.get(TRACKING_URI_ENV), f"set {config_key} in the config")


def connect_tracking(args: argparse.Namespace, required: bool) -> Optional[str]:
    """Point MLflow at ``--tracking-uri`` and return it. Without one: SystemExit if the command needs MLflow
    (``required``), else a warning that this run is not logged, and None."""
    from jobs import tracking

    if not args.tracking_uri and not required:
        log.warning("no MLflow tracking URI: this run is not logged")
        return None
    uri = require_tracking_uri(args.tracking_uri, "pass --tracking-uri")
    tracking.set_tracking(uri)
    return uri
