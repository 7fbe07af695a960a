"""The `mpft` command line. Each subcommand lives in its own module under jobs/ and registers itself here."""

from __future__ import annotations

import argparse
import importlib
import logging
import os
import sys

# module name -> help line; each module defines `add_arguments(parser)` and `main(args) -> int`.
SUBCOMMANDS = {
    "train": "fine-tune a detector with Ray Train and register it as `challenger`",
    "score": "score images (S3 prefix, folder or file) into Parquet, or print a table for a few files",
    "evaluate": "per-subset accuracy / AP / AUC on labelled sources, optionally on degraded copies",
    "promote": "gate the `challenger` against the `champion` on a frozen holdout and move the alias",
    "retrain": "merge new generator data, train, evaluate and promote, as one parent MLflow run",
    "demo": "run the whole flow on the embedded local stack with a tiny model",
    "export-weights": "write open_clip weights as a .safetensors file that states its activation (offline clusters)",
}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="mpft", description=__doc__)
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = parser.add_subparsers(dest="command", required=True)
    for name, help_line in SUBCOMMANDS.items():
        module = importlib.import_module(f"jobs.{name.replace('-', '_')}_cmd")
        command = sub.add_parser(name, help=help_line, description=help_line)
        module.add_arguments(command)
        command.set_defaults(_main=module.main)
    return parser


def main(argv: list[str] | None = None) -> int:
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    return int(args._main(args) or 0)


if __name__ == "__main__":
    sys.exit(main())
