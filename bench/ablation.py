"""The ablation: MPFT (TAM) against random masking, plain fine-tuning and the frozen probe, each from a random-init
and from a pre-trained backbone, 3 seeds each, as one `mpft sweep` (24 trials) on the demo's corpus.

    .venv/bin/python bench/ablation.py                 # ~45 min on a 2-core CPU; results in bench/results/ablation.*
    .venv/bin/python bench/ablation.py --epochs 2 --seeds 0,1 --n-train 48   # a smoke run of the same flow

What it runs, all started here and stopped at the end (nothing is left running):
  stand-in  `mpft pretrain-standin` (cached in the workdir): the tiny ViT pre-trained contrastively on the
            corpus's training photos only (real images; never a generated one);
  corpus    the demo corpus: real photo crops and the toy autoencoder generators, trained on `ae_up` only; tested
            on `ae_up` (seen) and `ae_nn`, `ae_shuffle` (unseen), all PNG;
  stack     an MLflow server (sqlite) and a private Ray instance; the corpus and checkpoints stay in local folders;
  sweep     4 variants x 2 backbones x the seeds. Validation is carved out of the *training* split (20 %) and picks
            each trial's checkpoint (those crops come from the training photos); the corpus's `val` split (crops of
            held-out photos, never trained or validated on) is the test set, scored after training, clean and
            format-aligned (JPEG q96 for both classes).
Results: the sweep's summary (mean ± std over seeds) as ``bench/results/ablation.{md,json}``.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from infra.local_stack.mlflow_server import LocalMlflowServer  # noqa: E402
from jobs import sample_corpus  # noqa: E402
from jobs.config import TrainJobConfig  # noqa: E402
from jobs.sweep import SweepConfig, run_sweep, to_markdown  # noqa: E402
from pipelines.runtime import init_ray, shutdown_ray  # noqa: E402
from pipelines.sources import SourceConfig  # noqa: E402

RESULTS = REPO / "bench" / "results"
RAY_CPUS = 2  # the machine this was measured on; trials run one at a time (jobs/sweep.py: more stall on 2 cores)
TRAIN_GENERATORS = ("ae_up",)
TEST_GENERATORS = ("ae_up", "ae_nn", "ae_shuffle")
VARIANTS = {
    "mpft": {"method.detector.mask.strategy": "tam"},
    "random-mask": {"method.detector.mask.strategy": "random"},
    "plain": {"method.detector.mask.strategy": "none"},
    "probe": {"method.detector.trainable": "probe", "method.detector.mask.strategy": "none"},
}


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--workdir", type=Path, default=Path("/tmp/mpft-ablation"))
    parser.add_argument("--seeds", default="0,1,2")
    parser.add_argument("--epochs", type=int, default=12)
    parser.add_argument("--n-train", type=int, default=192, help="training images per class (before the carve)")
    parser.add_argument("--n-test", type=int, default=64, help="test images per class and generator")
    parser.add_argument("--results", type=Path, default=RESULTS / "ablation")
    return parser.parse_args(argv)


def commit() -> str:
    """The code's commit, with ``+changes`` when the working tree differs from it."""
    head = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=REPO, capture_output=True, text=True)
    dirty = subprocess.run(["git", "status", "--porcelain"], cwd=REPO, capture_output=True, text=True).stdout.strip()
    return (head.stdout.strip() or "unknown") + ("+changes" if dirty else "")


def standin(workdir: Path) -> Path:
    """The pre-trained stand-in, made once per workdir (the command leaves an up-to-date file alone)."""
    path = workdir / "standin.safetensors"
    subprocess.run([sys.executable, "-m", "jobs.cli", "pretrain-standin", "--out", str(path)], cwd=REPO, check=True)
    return path


def corpus(workdir: Path, args: argparse.Namespace) -> Path:
    """The corpus for these sizes, written once (a folder per size, so a smoke run's corpus is never reused)."""
    root = workdir / f"genimage-{args.n_train}-{args.n_test}"
    if not (root / TEST_GENERATORS[-1]).is_dir():
        sample_corpus.write_genimage_corpus(
            root, n_train_per_class=args.n_train, n_val_per_class=args.n_test, n_test_per_class=args.n_test,
            image_size=32, seed=0, train_generators=TRAIN_GENERATORS, test_generators=TEST_GENERATORS,
            generator_steps=60)
    return root


def base_job(root: Path, workdir: Path, tracking_uri: str, epochs: int) -> TrainJobConfig:
    """The demo's recipe (tiny 32-px ViT, TAM ratio 0.25, full fine-tune), one Ray Train worker per trial."""
    carve = {"fraction": 0.2}
    source = {"uri": str(root), "layout": "genimage", "split": "train", "subsets": list(TRAIN_GENERATORS)}
    return TrainJobConfig.from_dict({
        "name": "ablation",
        "method": {
            "detector": {"backbone": {"name": "mpft-tiny-32", "pretrained": None},
                         "mask": {"strategy": "tam", "texture": "diversity", "ratio": 0.25, "mode": "fill"},
                         "trainable": "full", "dropout": 0.1},
            "optim": {"epochs": epochs, "batch_size": 16, "backbone_lr": 1e-3, "head_lr": 3e-3, "seed": 0},
        },
        "train": {**source, "carve": {**carve, "keep": "rest"}},
        "val": {**source, "carve": {**carve, "keep": "carved"}},
        "checkpoint_root": str(workdir / "runs"),
        "scaling": {"num_workers": 1, "cpus_per_worker": 0.5},
        "tracking": {"uri": tracking_uri, "experiment": "ablation", "registered_model": None},
        "cache_decoded": True,
    })


def main(argv=None) -> int:
    args = parse_args(argv)
    workdir = args.workdir.resolve()
    workdir.mkdir(parents=True, exist_ok=True)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    started = time.perf_counter()
    weights = standin(workdir)
    root = corpus(workdir, args)
    seeds = [int(s) for s in args.seeds.split(",")]
    stamp = time.strftime("%Y%m%d-%H%M%S")
    with LocalMlflowServer(root=workdir / f"mlflow-{stamp}") as mlflow_server:
        job = base_job(root, workdir, mlflow_server.tracking_uri, args.epochs)
        sweep = SweepConfig(
            name=f"ablation-{stamp}", job=job, variants=VARIANTS,
            grid={"method.detector.backbone.pretrained": [None, str(weights)], "method.optim.seed": seeds},
            test=[SourceConfig(uri=str(root), layout="genimage", split="val", subsets=list(TEST_GENERATORS))],
            conditions=["aligned-jpeg96"], max_concurrent=1)
        try:
            init_ray(num_cpus=RAY_CPUS)
            outcome = run_sweep(sweep, mlflow_server.tracking_uri)
        finally:
            shutdown_ray()
    minutes = (time.perf_counter() - started) / 60
    table = to_markdown(outcome.summary).replace(str(weights), "standin")
    header = (f"Ablation ({len(outcome.trials)} trials, {len(outcome.failed)} failed; {args.epochs} epochs, "
              f"{args.n_train} training images per class before a 20 % validation carve, seeds {args.seeds}; "
              f"{minutes:.0f} min, Ray on {RAY_CPUS} CPUs, {time.strftime('%Y-%m-%d')}, commit {commit()})\n\n")
    args.results.parent.mkdir(parents=True, exist_ok=True)
    args.results.with_suffix(".md").write_text(header + table + "\n")
    records = json.loads(outcome.summary.to_json(orient="records"))
    args.results.with_suffix(".json").write_text(json.dumps({
        "commit": commit(), "trials": len(outcome.trials), "failed": [t.trial.name for t in outcome.failed],
        "epochs": args.epochs,
        "n_train_per_class": args.n_train, "seeds": seeds, "minutes": round(minutes, 1), "summary": records,
        "per_trial": json.loads(outcome.table.to_json(orient="records")),
    }, indent=2))
    print(header + table)
    return 1 if outcome.failed else 0


if __name__ == "__main__":
    sys.exit(main())
