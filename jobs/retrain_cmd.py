"""`mpft retrain --config retrain.yaml`: merge new data, train, evaluate, promote; non-zero exit when refused."""

from __future__ import annotations

import argparse
import json
import sys

from jobs.common import configured_tracking_uri


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--config", required=True, help="retrain YAML: train, new_data, holdout, gate, leakage")


def main(args: argparse.Namespace) -> int:
    from jobs.promote import ChampionMoved, render_decision
    from jobs.retrain import load_retrain_config, run_retrain
    from pipelines.leakage import HoldoutLeakError

    cfg = load_retrain_config(args.config)
    tracking_uri = configured_tracking_uri(cfg.train.tracking.uri, "train.tracking.uri")
    from jobs.train import RefusedToStart  # after the checks: the training stack costs ~6 s to import
    try:
        outcome = run_retrain(cfg, tracking_uri, verbose=args.verbose)
    except (RefusedToStart, HoldoutLeakError, ChampionMoved) as err:
        raise SystemExit(f"mpft retrain: refused: {err}") from None
    print(render_decision(outcome.promotion, cfg.train.tracking.registered_model, dry_run=False))
    print(json.dumps({"parent_run_id": outcome.parent_run_id, "model_version": outcome.model_version,
                      "promoted": outcome.promotion.promoted}))
    if not outcome.promotion.promoted:
        print(f"promotion refused: {'; '.join(outcome.promotion.decision.reasons)}", file=sys.stderr)
        return 1
    return 0
