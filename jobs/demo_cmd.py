"""`mpft demo`: train → evaluate → promote → score on the embedded local stack (see jobs/demo.py)."""

from __future__ import annotations

import argparse
import json
from pathlib import Path


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--workdir", type=Path, default=Path("demo-output"),
                        help="where the corpus, MLflow data and scores are kept (emptied first; default %(default)s)")
    parser.add_argument("--report", type=Path, default=None, help="also write the summary as JSON here")


def main(args: argparse.Namespace) -> int:
    from jobs.demo import run_demo

    report = run_demo(args.workdir)
    if args.report:
        args.report.write_text(json.dumps(report, indent=2, default=str))
    return 0
