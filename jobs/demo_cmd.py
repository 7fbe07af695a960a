"""`mpft demo`: train → evaluate → promote → score on the embedded local stack (see jobs/demo.py)."""

from __future__ import annotations

import argparse
import json
from pathlib import Path


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--workdir", type=Path, default=Path("demo-output"),
                        help="where the corpus, MLflow data and scores are kept: a new or empty folder, or an earlier "
                             "demo's, which is emptied first (default %(default)s)")
    parser.add_argument("--report", type=Path, default=None, help="also write the summary as JSON here")
    parser.add_argument("--quick", action="store_true",
                        help="a much smaller corpus and 2 epochs: checks the flow, the model will not learn much")


def main(args: argparse.Namespace) -> int:
    from jobs.demo import QUICK_SIZES, DemoSizes, run_demo

    report = run_demo(args.workdir, QUICK_SIZES if args.quick else DemoSizes(), verbose=args.verbose)
    if args.report:
        args.report.write_text(json.dumps(report, indent=2, default=str))
    return 0
