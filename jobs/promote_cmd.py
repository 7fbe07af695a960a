"""`mpft promote --model NAME --holdout URI [--dry-run]`: gate the challenger against the champion."""

from __future__ import annotations

import argparse
import sys
from functools import partial
from typing import TYPE_CHECKING

from jobs.common import add_stack_arguments, connect_tracking, storage_from_args

if TYPE_CHECKING:
    from jobs.gate import GateConfig
    from pipelines.sources import SourceConfig


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", required=True, help="registered model name")
    parser.add_argument("--holdout", required=True, action="append",
                        help="frozen holdout: a manifest file (.parquet/.csv) or a GenImage/UFD prefix; repeatable")
    parser.add_argument("--layout", default=None, choices=["genimage", "ufd", "manifest"],
                        help="layout of --holdout (default: manifest for .parquet/.csv files, else genimage)")
    parser.add_argument("--split", default=None, help="split to use (GenImage: val)")
    # Unset gate rules keep the gate's defaults (jobs/gate.py GateConfig; README: retrain).
    rules = {"--max-subset-drop": ("max_subset_acc_drop", "largest allowed accuracy drop on any subset"),
             "--mean-acc-tolerance": ("mean_acc_tolerance", "how far mean accuracy may fall below the champion's"),
             "--mean-ap-tolerance": ("mean_ap_tolerance", "how far mean AP may fall below the champion's"),
             "--min-mean-acc": ("min_mean_acc", "mean accuracy the first champion needs")}
    for flag, (rule, help_line) in rules.items():
        parser.add_argument(flag, dest=rule, type=float, metavar="FRACTION",
                            help=f"{help_line}, as a fraction (0.01 = 1 point; default: the gate's)")
    parser.add_argument("--condition", dest="conditions", action="append", default=[], metavar="NAME[:RULE=V,...]",
                        help="also gate on a degraded or format-aligned condition, named as in `mpft evaluate` tables "
                             "(aligned-jpeg96, jpeg65, blur3); its rules default to the clean ones given above, "
                             "or e.g. aligned-jpeg96:max_subset_acc_drop=0.05,mean_acc_tolerance=0.01; repeatable")
    parser.add_argument("--leakage", choices=["error", "warn"], default="error",
                        help="holdout images in the challenger's training data (same path or same bytes): refuse "
                             "(error, the default) or only warn")
    parser.add_argument("--dry-run", action="store_true", help="print the decision, change nothing")
    add_stack_arguments(parser)


def gate_from_args(args: argparse.Namespace) -> GateConfig:
    """The GateConfig with the rules given as flags; the others keep GateConfig's defaults. A ``--condition``'s own
    ``RULE=V`` apply to it; its other regression rules are the clean ones (``GateConfig``)."""
    from pydantic import ValidationError

    from jobs.gate import ConditionRules, GateConfig

    given = {rule: getattr(args, rule) for rule in GateConfig.model_fields
             if rule != "conditions" and getattr(args, rule) is not None}
    conditions = {}
    for spec in args.conditions:
        name, _, rules_text = spec.partition(":")
        if name in conditions:
            raise SystemExit(f"--condition {name} is given twice: give its rules once, e.g. {name}:RULE=V,RULE=V")
        own = {}
        for item in filter(None, rules_text.split(",")):
            rule, sep, value = item.partition("=")
            if not sep or rule not in ConditionRules.model_fields:
                raise SystemExit(f"--condition {spec}: expected NAME[:RULE=V,...] with rules among "
                                 f"{', '.join(ConditionRules.model_fields)}")
            own[rule] = value
        conditions[name] = own
    try:
        return GateConfig(**given, conditions=conditions)
    except ValidationError as err:
        raise SystemExit("gate rules: " + "; ".join(f"{'.'.join(map(str, e['loc']))}: {e['msg']}"
                                                    for e in err.errors())) from None


def holdout_sources(uris: list[str], layout: str | None, split: str | None) -> list[SourceConfig]:
    from pipelines.sources import SourceConfig

    def layout_of(uri: str) -> str:
        return layout or ("manifest" if uri.endswith((".parquet", ".csv")) else "genimage")

    return [SourceConfig(uri=uri, layout=layout_of(uri), split=split) for uri in uris]


def main(args: argparse.Namespace) -> int:
    from jobs.promote import ChampionMoved, default_evaluator, promote, render_decision
    from pipelines.leakage import HoldoutLeakError
    from pipelines.runtime import init_ray

    connect_tracking(args, required=True)
    # Ray starts only once the leakage check has passed and the holdout manifest is built: their refusals come first.
    evaluator = partial(default_evaluator, start_ray=partial(init_ray, args.ray_address, verbose=args.verbose))
    try:
        outcome = promote(args.model, holdout_sources(args.holdout, args.layout, args.split), gate_from_args(args),
                          storage_cfg=storage_from_args(args), dry_run=args.dry_run, leakage=args.leakage,
                          evaluator=evaluator)
    except (HoldoutLeakError, ChampionMoved) as err:
        raise SystemExit(f"mpft promote: refused: {err}") from None
    print(render_decision(outcome, args.model, args.dry_run))
    if not outcome.decision.passed:
        print(f"promotion refused: {'; '.join(outcome.decision.reasons)}", file=sys.stderr)
        return 1
    return 0
