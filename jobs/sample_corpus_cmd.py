"""`mpft sample-corpus --out DIR`: the small labelled GenImage-layout corpus of the demo (see jobs/sample_corpus.py).

Generator names and steps left unset take jobs/sample_corpus.py's defaults: they are stated once, there, in a module
that imports torch, which building the `mpft` parser must not.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--out", required=True, type=Path,
                        help="output folder (created): corpus/<generator>/{train,val}/{ai,nature}/*.png")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--image-size", type=int, default=32, help="model input side; crops vary around it")
    parser.add_argument("--train", type=int, default=64, help="train images per class per training generator")
    parser.add_argument("--val", type=int, default=32, help="val images per class per training generator")
    parser.add_argument("--test", type=int, default=32, help="val images per class per test-only generator")
    parser.add_argument("--train-generators", nargs="+", metavar="NAME",
                        help="toy generators with train/ and val/ folders (ae_up, ae_nn, ae_shuffle, ae_bilinear)")
    parser.add_argument("--test-generators", nargs="+", metavar="NAME",
                        help="toy generators with a val/ folder, to test on generators not trained on")
    parser.add_argument("--new-generator", metavar="NAME",
                        help="also write <out>/new_generator/<NAME>/... for the retrain flow")
    parser.add_argument("--no-new-generator", action="store_true", help="skip the new-generator folder")
    parser.add_argument("--generator-steps", type=int,
                        help="training steps per toy generator (fewer = faster, blurrier, less realistic)")


def main(args: argparse.Namespace) -> int:
    from jobs.sample_corpus import write_genimage_corpus, write_new_generator_drop

    generator_steps = given(generator_steps=args.generator_steps)
    try:
        summary = {"corpus": write_genimage_corpus(
            args.out / "corpus", n_train_per_class=args.train, n_val_per_class=args.val,
            n_test_per_class=args.test, image_size=args.image_size, seed=args.seed, **generator_steps,
            **given(train_generators=args.train_generators, test_generators=args.test_generators))}
        if not args.no_new_generator:
            summary["new_generator"] = write_new_generator_drop(
                args.out / "new_generator", n=args.train, image_size=args.image_size, seed=args.seed,
                **generator_steps, **given(generator=args.new_generator))
    except ValueError as err:  # an unknown generator name: the message lists the known ones
        raise SystemExit(str(err)) from None
    print(json.dumps(summary, indent=2))
    return 0


def given(**options) -> dict:
    """The options that were given on the command line (not None)."""
    return {name: value for name, value in options.items() if value is not None}
