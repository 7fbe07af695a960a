"""The `mpft` command line: every tool for training, judging and running detectors is one of its subcommands.

Convention: subcommand ``foo-bar`` lives in ``jobs/foo_bar_cmd.py``, which defines ``add_arguments(parser)`` and
``main(args) -> int`` and imports its driver (Ray, torch, MLflow, ...) inside ``main`` only, so that building the
parser stays fast (`mpft --help`; ``tests/test_cli.py``). ``main`` gets the whole namespace, the global ``verbose``
included. Not subcommands: the local stand-ins for S3, MLflow and a Ray cluster (``python -m
infra.local_stack.<name>``), which tests and the demo start, and the benchmarks (``bench/*.py`` scripts).
"""

from __future__ import annotations

import argparse
import importlib
import logging
import os
import sys

SUBCOMMANDS = {
    "train": "fine-tune a detector from a job YAML and register it as the `challenger`",
    "evaluate": "accuracy, AP and AUC per generator on labelled images, optionally on degraded copies",
    "promote": "make the `challenger` the `champion` if it beats it on a frozen holdout",
    "score": "score images (S3 prefix, folder or file) into Parquet, or print a table for a few files",
    "retrain": "add a new generator's images, train, evaluate and promote, as one MLflow run",
    "demo": "the whole flow on a local S3 + MLflow + Ray stack with a tiny model, in a few minutes",
    "sample-corpus": "write the demo's small labelled corpus (real photo crops and toy generators' images)",
    "export-weights": "save open_clip weights as a file that states its activation, for clusters without the hub",
    "render": "fill the placeholders of a deployment template under infra/ (Kubernetes, AWS)",
}

OWN_PACKAGES = ("mpft_core", "pipelines", "jobs", "infra")

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
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    args = build_parser().parse_args(argv)
    configure_console(args.verbose)
    try:
        return int(args._main(args) or 0)
    except Exception as err:
        from pipelines.store_errors import store_failure

        failure = store_failure(err)
        if failure is None:
            raise
        logging.getLogger(__name__).debug("the store failed", exc_info=True)  # the traceback, with -v
        print(f"mpft {args.command}: {failure}", file=sys.stderr)  # credentials or network: one line
        return 1


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
