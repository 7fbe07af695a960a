"""Flags `mpft` subcommands share: where MLflow, Ray and the object store are, and what a scoring pass may use.

Environment variables are read here, at the edge, and nowhere deeper (configs are passed down as objects). Nothing
heavy is imported at module level: `mpft --help` builds every subcommand's parser from these functions.
"""

from __future__ import annotations

import argparse
import logging
import os
import re
import socket
from dataclasses import fields
from pathlib import Path
from typing import TYPE_CHECKING, Optional
from urllib.parse import urlparse

from pipelines.scoring_spec import ScoringResources

if TYPE_CHECKING:
    from pipelines.storage import StorageConfig

log = logging.getLogger(__name__)

TRACKING_URI_ENV = "MLFLOW_TRACKING_URI"
# Where data may live (pipelines.storage reads these), and the extra schemes a model reference may use.
LOCATION_SCHEMES = ("s3://", "file://")
MODEL_SCHEMES = ("models:/", "runs:/", "mlflow-artifacts:/")
_SCHEME = re.compile(r"^([A-Za-z][A-Za-z0-9+.-]*):/")
REACHABLE_TIMEOUT_S = 5.0


class UsageError(Exception):
    """A failure the person running the command can fix (a missing file, a URI scheme nothing here reads, a server
    that does not answer, a refused workdir): ``mpft`` prints it as one line and exits with status 2."""


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


def check_input_location(uri: str, flag: str) -> None:
    """UsageError unless ``uri`` is an ``s3://`` URI or a local file or folder that exists (an S3 object is checked
    when it is read)."""
    check_location_scheme(uri, flag)
    if not uri.startswith("s3://") and not Path(uri.removeprefix("file://")).expanduser().exists():
        raise UsageError(f"no such file or folder: {uri} ({flag})")


def check_model_reference(ref: str, flag: str) -> None:
    """UsageError unless ``ref`` is a registry/run URI, an ``s3://`` prefix or an existing local folder."""
    if not ref.startswith(MODEL_SCHEMES):
        check_input_location(ref, flag)


def check_location_scheme(uri: str, flag: str) -> None:
    """UsageError when ``uri`` has a scheme other than ``s3://`` (``gs://``, ``https://``): it would otherwise be
    taken for a local path that does not exist."""
    scheme = _SCHEME.match(uri)
    if scheme and not uri.startswith(LOCATION_SCHEMES):
        raise UsageError(f"unknown location scheme {scheme.group(1)}:// in {flag} {uri}: use s3://bucket/key or a "
                         "local path")


def check_reachable(url: str, what: str, timeout_s: float = REACHABLE_TIMEOUT_S) -> None:
    """UsageError unless the HTTP(S) server at ``url`` accepts a connection within ``timeout_s``; other schemes
    (``file:``, ``sqlite:``) have no server to ask. Seconds here spare minutes of a client's retries later."""
    parsed = urlparse(url)
    if parsed.scheme not in ("http", "https") or not parsed.hostname:
        return
    port = parsed.port or (443 if parsed.scheme == "https" else 80)
    try:
        with socket.create_connection((parsed.hostname, port), timeout=timeout_s):
            return
    except OSError as err:
        reason = err.strerror or str(err) or type(err).__name__
        raise UsageError(f"cannot reach {what} at {shown_url(url)}: {reason}") from None


def shown_url(url: str) -> str:
    """``url`` without its ``user:password@`` and query string, which may carry a credential."""
    parsed = urlparse(url)
    return parsed._replace(netloc=parsed.netloc.rpartition("@")[2], query="", fragment="").geturl()


def require_tracking_uri(uri: Optional[str], how_to_set: str) -> str:
    """``uri`` if it is set; otherwise SystemExit with one line: no tracking URI, ``how_to_set`` or the variable."""
    if not uri:
        raise SystemExit(f"no MLflow tracking URI: {how_to_set} or set {TRACKING_URI_ENV}")
    return uri


def configured_tracking_uri(configured: Optional[str], config_key: str) -> str:
    """A job config's tracking URI (``config_key``, e.g. ``tracking.uri``), else ``$MLFLOW_TRACKING_URI``; SystemExit
    when neither is set, UsageError when its server does not answer."""
    uri = require_tracking_uri(configured or os.environ.get(TRACKING_URI_ENV), f"set {config_key} in the config")
    check_reachable(uri, "the MLflow tracking server")
    return uri


def connect_tracking(args: argparse.Namespace, required: bool) -> Optional[str]:
    """Point MLflow at ``--tracking-uri`` and return it. Without one: SystemExit if the command needs MLflow
    (``required``), else a warning that this run is not logged, and None. UsageError when its server does not
    answer."""
    from jobs import tracking

    if not args.tracking_uri and not required:
        log.warning("no MLflow tracking URI: this run is not logged")
        return None
    uri = require_tracking_uri(args.tracking_uri, "pass --tracking-uri")
    check_reachable(uri, "the MLflow tracking server")
    tracking.set_tracking(uri)
    return uri
