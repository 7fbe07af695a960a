"""The `mpft` command line: every tool for training, judging and running detectors is one of its subcommands.

Convention: subcommand ``foo-bar`` lives in ``jobs/foo_bar_cmd.py``, which defines ``add_arguments(parser)`` and
``main(args) -> int`` and imports its driver (Ray, torch, MLflow, ...) inside ``main`` only, so that building the
parser stays fast (`mpft --help`; ``tests/test_cli.py``). ``main`` gets the whole namespace, the global ``verbose``
included. Not subcommands: the local stand-ins for S3, MLflow and a Ray cluster (``python -m
infra.local_stack.<name>``), which tests and the demo start, and the benchmarks (``bench/*.py`` scripts).

Failures a person can fix (a missing file, an unknown URI scheme, a server that does not answer, a bad config key, a
manifest with wrong labels) are one line on stderr and exit status 2, checked before anything starts where they can
be; the traceback only with ``-v``. Any other ValueError is an internal error: one line and status 1. The object
store failing mid-job is one line and status 1. SIGTERM unwinds like Ctrl-C, so every server and Ray instance a
command started is stopped (status 143; 130 for Ctrl-C).
"""

from __future__ import annotations

import argparse
import importlib
import logging
import os
import signal
import sys
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from typing import NoReturn, Optional

from jobs.common import (
    UsageError,
    check_input_location,
    check_location_scheme,
    check_model_reference,
    check_reachable,
    storage_from_args,
)

SUBCOMMANDS = {
    "train": "fine-tune a detector from a job YAML and register it as the `challenger`",
    "sweep": "train a grid of variants of a job as Ray Tune trials, compare them, register the best as `challenger`",
    "pretrain-standin": "pre-train a small vision tower on real photos only: a stand-in for CLIP weights offline",
    "evaluate": "accuracy, AP and AUC per generator on labelled images, optionally on degraded copies",
    "promote": "make the `challenger` the `champion` if it beats it on a frozen holdout",
    "score": "score images (S3 prefix, folder or file) into Parquet, or print a table for a few files",
    "explain": "show which patches drive each image's score (occlusion overlays; an MLflow gallery of top scores)",
    "drift": "compare two scoring runs' score distributions (PSI, KS, per group); exit 1 on drift",
    "retrain": "add a new generator's images, train, evaluate and promote, as one MLflow run",
    "demo": "the whole flow on a local S3 + MLflow + Ray stack with a tiny model, in a few minutes",
    "sample-corpus": "write the demo's small labelled corpus (real photo crops and toy generators' images)",
    "export-weights": "save open_clip weights as a file that states its activation, for clusters without the hub",
    "render": "fill the placeholders of a deployment template under infra/ (Kubernetes, AWS)",
}

OWN_PACKAGES = ("mpft_core", "pipelines", "jobs", "infra")

# Arguments naming a location, per command, checked before the command starts anything: (argument, kind).
LOCATION_ARGUMENTS = {
    "train": (("config", "input"),),
    "sweep": (("config", "input"),),
    "retrain": (("config", "input"),),
    "score": (("model", "model"), ("input", "input"), ("output", "output"), ("store", "output")),
    "explain": (("model", "model"), ("input", "input"), ("from_scores", "input"), ("output", "output")),
    "evaluate": (("model", "model"), ("source", "input"), ("output", "output")),
    "promote": (("holdout", "input"),),
    "export-weights": (("output", "output"),),
}
LOCATION_CHECKS = {"input": check_input_location, "model": check_model_reference, "output": check_location_scheme}
USAGE_ERROR_STATUS = 2
STORE_FAILURE_STATUS = 1
INTERNAL_ERROR_STATUS = 1
# The shell's convention: 128 + the signal's number.
INTERRUPTED_STATUS = {signal.SIGINT: 130, signal.SIGTERM: 143}

DESCRIPTION = "Detect AI-generated images: fine-tune CLIP with Texture-Aware Masking (MPFT), then score at scale."

EPILOG = """example:
  mpft demo --quick                                   # try everything locally (about 2 minutes)
  mpft train --config examples/configs/genimage-vitl14-sdv14.yaml
  mpft score --model models:/mpft-detector@champion --input s3://crawl/ --output s3://scores/crawl/

`mpft COMMAND --help` lists a command's options."""


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="mpft", description=DESCRIPTION, epilog=EPILOG,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("-v", "--verbose", action="store_true",
                        help="debug logging, and Ray's own progress bars and per-dataset lines on the console")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name, help_line in SUBCOMMANDS.items():
        module = importlib.import_module(f"jobs.{name.replace('-', '_')}_cmd")
        command = sub.add_parser(name, help=help_line, description=help_line)
        module.add_arguments(command)
        command.set_defaults(_main=module.main)
    return parser


def main(argv: list[str] | None = None) -> int:
    """Run one subcommand; its exit status. A usage error raises ``CommandFailed`` (status 2) after printing it,
    as argparse does for a bad flag."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    args = build_parser().parse_args(argv)
    configure_console(args.verbose)
    with sigterm_unwinds():
        try:
            check_locations(args)
            return int(args._main(args) or 0)
        except Terminated:
            return report_interrupted(args.command, signal.SIGTERM)
        except KeyboardInterrupt:
            # Code between the handler and here (Ray's waits) may turn Terminated into a plain KeyboardInterrupt.
            return report_interrupted(args.command, signal.SIGTERM if sigterm_received() else signal.SIGINT)
        except SystemExit as err:
            if not isinstance(err.code, str):  # argparse's status, or a command's own
                raise
            fail(args.command, err.code, err)
        except Exception as err:
            from pipelines.store_errors import store_failure

            failure = store_failure(err)
            if failure is not None:
                logging.getLogger(__name__).debug("the store failed", exc_info=True)  # the traceback, with -v
                print(f"mpft {args.command}: {failure}", file=sys.stderr)  # credentials or network: one line
                return STORE_FAILURE_STATUS
            message = expected_failure(err, getattr(args, "config", None))
            if message is not None:
                fail(args.command, message, err)
            if not isinstance(err, ValueError) or raised_in_ray_task(err):
                raise  # a bug: its traceback is what a report needs
            return report_internal_error(args.command, err, args.verbose)


class CommandFailed(SystemExit):
    """Exit status 2 once the one-line reason is printed; ``str()`` is the reason."""

    def __init__(self, message: str):
        super().__init__(message)
        self.code = USAGE_ERROR_STATUS


class Terminated(KeyboardInterrupt):
    """SIGTERM, raised wherever the program is, so that every ``with`` and ``finally`` stops what it started."""


def fail(command: str, message: str, err: BaseException) -> NoReturn:
    """Print ``message`` as one line (the traceback only with -v) and raise ``CommandFailed``."""
    logging.getLogger(__name__).debug("mpft %s failed", command, exc_info=err)
    line = " ".join(message.split())
    print(line if line.startswith("mpft ") else f"mpft {command}: {line}", file=sys.stderr)
    raise CommandFailed(line) from None


def report_internal_error(command: str, err: ValueError, verbose: bool) -> int:
    """One line for a ValueError nobody expected (a shape mismatch, a bad parse): status 1, a bug rather than the
    user's input; its traceback with -v."""
    logging.getLogger(__name__).debug("mpft %s failed", command, exc_info=err)
    hint = "" if verbose else " (run with -v for the traceback)"
    print(f"mpft {command}: internal error: {type(err).__name__}: {' '.join(str(err).split())}{hint}",
          file=sys.stderr)
    return INTERNAL_ERROR_STATUS


def report_interrupted(command: str, signum: int) -> int:
    print(f"mpft {command}: stopped by {signal.Signals(signum).name}; everything it started is stopped",
          file=sys.stderr)
    return INTERRUPTED_STATUS[signum]


@contextmanager
def sigterm_unwinds() -> Iterator[None]:
    """SIGTERM (``kill``, a supervisor, Kubernetes) raises ``Terminated`` while the block runs; the handler before
    it comes back after. Only the main thread may install handlers."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = signal.signal(signal.SIGTERM, raise_terminated)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous if previous is not None else signal.SIG_DFL)


def raise_terminated(signum, frame) -> None:
    signal.signal(signal.SIGTERM, ignore_signal)  # a second SIGTERM must not cut the cleanup short
    raise Terminated


def ignore_signal(signum, frame) -> None:
    pass


def sigterm_received() -> bool:
    """Whether a SIGTERM arrived while ``sigterm_unwinds`` was in force (its handler then ignores further ones)."""
    return signal.getsignal(signal.SIGTERM) is ignore_signal


def check_locations(args: argparse.Namespace) -> None:
    """UsageError for a command's location argument that names nothing (a local path that does not exist, a scheme
    nothing reads), and for an S3 endpoint that does not answer when a location is on S3; before anything starts."""
    uris = []
    for dest, kind in LOCATION_ARGUMENTS.get(args.command, ()):
        given = getattr(args, dest, None)
        for uri in given if isinstance(given, list) else [given] if given is not None else []:
            LOCATION_CHECKS[kind](str(uri), "--" + dest.replace("_", "-"))
            uris.append(str(uri))
    if hasattr(args, "s3_endpoint") and any(uri.startswith("s3://") for uri in uris):
        endpoint = storage_from_args(args).endpoint()
        if endpoint:
            check_reachable(endpoint, "the S3 endpoint")


def expected_failure(err: Exception, config_file: Optional[str] = None) -> Optional[str]:
    """The one line for a failure a person can fix; None for anything else (a bug keeps its traceback)."""
    import yaml
    from pydantic import ValidationError

    if isinstance(err, UsageError):
        return str(err)
    if isinstance(err, ValidationError):
        return invalid_config(err, config_file)
    if isinstance(err, yaml.YAMLError):
        return f"not valid YAML: {err}"
    if isinstance(err, OSError) and err.filename is not None:
        return missing_path(err)
    if isinstance(err, FileNotFoundError):
        return str(err)
    if isinstance(err, ValueError) and not raised_in_ray_task(err) and is_input_refusal(err):
        return str(err)
    return mlflow_refusal(err)


def is_input_refusal(err: ValueError) -> bool:
    """Whether ``err`` is this project's refusal of a bad input (``InputError``; an output refused to this job), not a
    ValueError from deeper down (numpy, int(), a library)."""
    from mpft_core.config import InputError

    scoring = sys.modules.get("pipelines.scoring")  # loaded whenever one of its refusals can have been raised
    return isinstance(err, InputError) or (scoring is not None and isinstance(err, scoring.OutputRefused))


def invalid_config(err, config_file: Optional[str]) -> str:
    """Every problem as ``where: what`` (never the value, which may be a credential)."""
    problems = []
    for problem in err.errors(include_input=False, include_url=False):
        where = ".".join(str(part) for part in problem["loc"]) or "(top level)"
        unknown = problem["type"] == "extra_forbidden"
        problems.append(f"unknown key {where}" if unknown else f"{where}: {problem['msg']}")
    source = f" {config_file}" if config_file else ""
    return f"invalid config{source}: {'; '.join(problems)}"


def missing_path(err: OSError) -> str:
    if isinstance(err, (FileNotFoundError, NotADirectoryError)):
        return f"no such file or folder: {err.filename}"
    return f"{(err.strerror or type(err).__name__).lower()}: {err.filename}"


def raised_in_ray_task(err: Exception) -> bool:
    """A Ray task's error carries a worker's traceback: not a line for a person, and maybe a bug."""
    ray_exceptions = sys.modules.get("ray.exceptions")
    return ray_exceptions is not None and isinstance(err, ray_exceptions.RayError)


def mlflow_refusal(err: Exception) -> Optional[str]:
    """MLflow's message for a model, version or alias that does not exist, or a value it refuses; None otherwise."""
    mlflow_exceptions = sys.modules.get("mlflow.exceptions")
    if mlflow_exceptions is None or not isinstance(err, mlflow_exceptions.MlflowException):
        return None
    if err.error_code in ("RESOURCE_DOES_NOT_EXIST", "INVALID_PARAMETER_VALUE"):
        return err.message
    return None


def configure_console(verbose: bool) -> None:
    """This project's INFO lines and everyone's warnings; with ``verbose``, every library's DEBUG lines and progress
    bars too (open_clip narrates each model build at INFO; MLflow draws a bar per artefact download)."""
    logging.basicConfig(level=logging.DEBUG if verbose else logging.WARNING,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    if not verbose:
        for package in OWN_PACKAGES:
            logging.getLogger(package).setLevel(logging.INFO)
        os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")


if __name__ == "__main__":
    sys.exit(main())
