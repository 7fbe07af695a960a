"""`mpft sweep --config job.yaml --grid KEY=V1,V2 [--variant NAME:KEY=V,KEY=V] [--test URI] ...`."""

from __future__ import annotations

import argparse
import json

from jobs.common import UsageError, configured_tracking_uri


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--config", required=True, help="the training job YAML every trial starts from")
    parser.add_argument("--set", dest="overrides", nargs="+", action="extend", default=[], metavar="KEY=VALUE",
                        help="change the base job for every trial (as `mpft train --set`)")
    parser.add_argument("--grid", nargs="+", action="extend", default=[], metavar="KEY=V1,V2",
                        help="an axis of the grid: trials are the cross product of all axes (values read as YAML: "
                             "null, 0.25, tam)")
    parser.add_argument("--variant", nargs="+", action="extend", default=[], metavar="NAME:KEY=V[,KEY=V]",
                        help="a named set of settings that change together, crossed with the grid")
    parser.add_argument("--test", action="append", default=[], metavar="URI",
                        help="labelled images (GenImage layout) every trial's checkpoint is scored on after "
                             "training: accuracy and AUC on the generators seen in training and on the others")
    parser.add_argument("--test-split", default="val", help="the split of --test to score (default: val)")
    parser.add_argument("--align", nargs="+", default=[], metavar="KIND=V[+KIND=V]",
                        help="also score --test format-aligned this way (e.g. jpeg=96), as `mpft evaluate --align`")
    parser.add_argument("--select", default="val_mean_acc",
                        help="validation metric that picks the best trial (default: val_mean_acc)")
    parser.add_argument("--select-mode", choices=("max", "min"), default="max")
    parser.add_argument("--register-best", action="store_true",
                        help="register the best trial's model and point the `challenger` alias at it")
    parser.add_argument("--max-concurrent", type=int, default=None,
                        help="trials at a time (default: as many as the cluster's CPUs fit, at least 1)")
    parser.add_argument("--name", help="the sweep's name (default: <job name>-sweep-<time>)")


def main(args: argparse.Namespace) -> int:
    from jobs.config import load_train_config
    from jobs.sweep import SweepConfig, run_sweep, stamped_name, to_markdown
    from mpft_core.perturb import parse_align_specs
    from pipelines.sources import SourceConfig

    job = load_train_config(args.config, args.overrides)
    try:
        conditions = [a.name for a in parse_align_specs(args.align)]
    except ValueError as err:
        raise UsageError(str(err)) from None
    sweep = SweepConfig(
        name=args.name or stamped_name(f"{job.name}-sweep"), job=job,
        grid=unique("grid axis", [parse_axis(text) for text in args.grid]),
        variants=unique("variant", [parse_variant(text) for text in args.variant]),
        test=[SourceConfig(uri=uri, layout="genimage", split=args.test_split) for uri in args.test],
        conditions=conditions,
        select=args.select, select_mode=args.select_mode, register_best=args.register_best,
        max_concurrent=args.max_concurrent,
    )
    outcome = run_sweep(sweep, configured_tracking_uri(job.tracking.uri, "tracking.uri"), verbose=args.verbose)
    print(to_markdown(outcome.summary))
    print(json.dumps({"parent_run_id": outcome.parent_run_id,
                      "best_trial": outcome.best.trial.name if outcome.best else None,
                      "version": outcome.model_version,
                      "failed": [t.trial.name for t in outcome.failed]}, indent=2))
    return 1 if outcome.failed else 0


def unique(what: str, pairs: list[tuple[str, object]]) -> dict:
    """``dict(pairs)``, refusing a name given twice (the second would silently replace the first)."""
    names = [name for name, _ in pairs]
    twice = sorted({name for name in names if names.count(name) > 1})
    if twice:
        raise UsageError(f"{what} {', '.join(twice)} given twice")
    return dict(pairs)


def parse_axis(text: str) -> tuple[str, list]:
    """``method.detector.mask.ratio=0.25,0.5`` -> (key, [0.25, 0.5]); each value read as YAML."""
    from jobs.config import parse_override

    key, _ = parse_override(text)
    return key, [parse_override(f"{key}={value}")[1] for value in text.partition("=")[2].split(",")]


def parse_variant(text: str) -> tuple[str, dict]:
    """``probe:method.detector.trainable=probe,method.detector.mask.strategy=none`` -> (name, {key: value})."""
    from jobs.config import parse_override

    name, sep, body = text.partition(":")
    if not sep or not name.strip() or not body.strip():
        raise UsageError(f"a variant is NAME:KEY=VALUE[,KEY=VALUE], not {text!r}")
    return name.strip(), dict(parse_override(item) for item in body.split(","))
