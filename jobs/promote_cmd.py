"""`mpft promote --model NAME --holdout URI [--dry-run]`: gate the challenger against the champion."""

from __future__ import annotations

import argparse
import sys

from jobs.common import add_stack_arguments, connect_tracking, storage_from_args
from jobs.gate import GateConfig
from pipelines.sources import SourceConfig


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", required=True, help="registered model name")
    parser.add_argument("--holdout", required=True, action="append",
                        help="frozen holdout: a manifest file (.parquet/.csv) or a GenImage/UFD prefix; repeatable")
    parser.add_argument("--layout", default=None, choices=["genimage", "ufd", "manifest"],
                        help="layout of --holdout (default: manifest for .parquet/.csv files, else genimage)")
    parser.add_argument("--split", default=None, help="split to use (GenImage: val)")
    defaults = GateConfig()
    parser.add_argument("--max-subset-drop", type=float, default=defaults.max_subset_acc_drop,
                        help="largest allowed accuracy drop on any subset, as a fraction (default %(default)s)")
    parser.add_argument("--mean-acc-tolerance", type=float, default=defaults.mean_acc_tolerance)
    parser.add_argument("--mean-ap-tolerance", type=float, default=defaults.mean_ap_tolerance)
    parser.add_argument("--min-mean-acc", type=float, default=defaults.min_mean_acc,
                        help="needed by the first champion (default %(default)s)")
    parser.add_argument("--dry-run", action="store_true", help="print the decision, change nothing")
    add_stack_arguments(parser)


def holdout_sources(uris: list[str], layout: str | None, split: str | None) -> list[SourceConfig]:
    def layout_of(uri: str) -> str:
        return layout or ("manifest" if uri.endswith((".parquet", ".csv")) else "genimage")

    return [SourceConfig(uri=uri, layout=layout_of(uri), split=split) for uri in uris]


def main(args: argparse.Namespace) -> int:
    from jobs.promote import promote, render_decision
    from pipelines.runtime import init_ray

    connect_tracking(args, required=True)
    init_ray(args.ray_address)
    gate = GateConfig(max_subset_acc_drop=args.max_subset_drop, mean_acc_tolerance=args.mean_acc_tolerance,
                      mean_ap_tolerance=args.mean_ap_tolerance, min_mean_acc=args.min_mean_acc)
    outcome = promote(args.model, holdout_sources(args.holdout, args.layout, args.split), gate,
                      storage_cfg=storage_from_args(args), dry_run=args.dry_run)
    print(render_decision(outcome, args.model, args.dry_run))
    if not outcome.decision.passed:
        print(f"promotion refused: {'; '.join(outcome.decision.reasons)}", file=sys.stderr)
        return 1
    return 0
