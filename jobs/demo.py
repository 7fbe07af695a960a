"""`mpft demo`: the whole flow on the embedded local stack, with a tiny model, in a few minutes on a laptop CPU.

    start   S3 server (SeaweedFS) · MLflow server (sqlite; artefacts on that S3) · private Ray
    corpus  real photo crops + images from toy generators the demo trains itself → s3://mpft-demo/genimage
    train   2 Ray Train workers, TAM on                  → MLflow run, registered version, alias `challenger`
    eval    challenger on a seen and an unseen generator, clean and degraded → table + plots in MLflow
    promote challenger vs champion on the frozen holdout → alias `champion`
    score   an unlabelled "crawl" (with broken files) with models:/…@champion → Parquet, one row per file
    stop    everything the demo started

Everything the demo keeps (the object store's data with the corpus and the MLflow artefacts, the MLflow database,
the score Parquet) lives under ``--workdir``. The demo empties only a workdir an earlier demo made (it holds
``.mpft-demo``); any other folder with something in it is refused.
"""

from __future__ import annotations

import shutil
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import pyarrow as pa
import pyarrow.compute as pc

from infra.local_stack.mlflow_server import LocalMlflowServer, s3_artifact_settings
from infra.local_stack.s3 import LocalS3Server
from jobs import sample_corpus
from jobs.common import UsageError
from jobs.config import TrainJobConfig
from jobs.evaluate import run_evaluate
from jobs.gate import GateConfig
from jobs.promote import ONE_REPLICA, PromotionOutcome, promote, render_decision
from jobs.score import run_score_job
from jobs.tracking import resolve_model
from jobs.train import TrainOutcome, run_train
from mpft_core.config import MethodConfig
from mpft_core.perturb import parse_align_specs, parse_perturb_specs
from pipelines.evaluation import EvalOptions, EvalResult
from pipelines.runtime import init_ray, shutdown_ray
from pipelines.scoring import ScoreJob, read_scores
from pipelines.sources import SourceConfig
from pipelines.storage import StorageConfig

BUCKET = "mpft-demo"
MODEL_NAME = "mpft-demo-detector"
EXPERIMENT = "mpft-demo"
TRAIN_GENERATORS = ("ae_up",)
TEST_GENERATORS = ("ae_up", "ae_nn")
GENIMAGE = f"s3://{BUCKET}/genimage"
CRAWL = f"s3://{BUCKET}/crawl"
# Both classes re-encoded as JPEG q96 (the format-aligned protocol): evaluated, and gated, beside the clean holdout.
[ALIGNMENT] = parse_align_specs(["jpeg=96"])
# Written into every workdir the demo makes: the only folders it will ever empty.
WORKDIR_MARKER = ".mpft-demo"


@dataclass
class DemoSizes:
    n_train_per_class: int = 256
    n_val_per_class: int = 48
    n_test_per_class: int = 48
    epochs: int = 40
    batch_size: int = 16  # per worker
    image_size: int = 32
    # Short generator training leaves visible upsampling traces: learnable by a tiny random-init ViT in minutes.
    generator_steps: int = 60


QUICK_SIZES = DemoSizes(n_train_per_class=48, n_val_per_class=16, n_test_per_class=16, epochs=2, generator_steps=20)


def demo_method(sizes: DemoSizes) -> MethodConfig:
    """MPFT on the tiny 32-px ViT: TAM on, full fine-tune; learning rates raised for a random-init backbone."""
    return MethodConfig.from_dict({
        "detector": {"backbone": {"name": "mpft-tiny-32", "pretrained": None},
                     "mask": {"strategy": "tam", "texture": "diversity", "ratio": 0.25, "mode": "fill"},
                     "trainable": "full", "dropout": 0.1},
        "optim": {"epochs": sizes.epochs, "batch_size": sizes.batch_size, "backbone_lr": 1e-3, "head_lr": 3e-3,
                  "schedule": "cosine", "seed": 0},
        "threshold": {"target_fpr": 0.05, "target_miss_rate": 0.05},
    })


def run_demo(workdir: Path, sizes: DemoSizes, *, verbose: bool = False) -> dict:
    """Every stage of the module docstring in order, one line each as it ends, then the summary; returns it as a
    dict (paths, run ids, version, accuracies, score counts, ``timings_s`` per stage, ``total_s``). ``verbose``:
    Ray's own progress output on the console too."""
    workdir = fresh_workdir(workdir)
    started, timings = time.perf_counter(), {}
    with (LocalS3Server(root=workdir / "s3") as s3,
          LocalMlflowServer(root=workdir / "mlflow", **s3_artifact_settings(s3)) as mlflow_server):
        storage, tracking_uri = s3.storage_config(), mlflow_server.tracking_uri
        print(f"[demo] S3 server {s3.endpoint_url} · MLflow {tracking_uri}", flush=True)
        try:
            init_ray(num_cpus=2, verbose=verbose)  # inside: an interrupted start is shut down too
            with stage("corpus", timings):
                corpus, n_crawl = write_corpus(workdir / "corpus", sizes, s3)
            with stage("train", timings):
                trained = train_challenger(sizes, storage, tracking_uri, verbose)
            with stage("evaluate", timings):
                evaluation, eval_run = evaluate_challenger(storage, tracking_uri)
            with stage("promote", timings):
                outcome = promote_challenger(storage)
            with stage("score", timings):
                scores = score_crawl(workdir / "scores", outcome.promoted, storage, tracking_uri)
        finally:
            shutdown_ray()
    report = {
        "workdir": str(workdir),
        "mlflow_root": str(workdir / "mlflow"),
        "s3_root": str(workdir / "s3"),
        "scores": str(workdir / "scores"),
        "train_run_id": trained.run_id,
        "model_version": trained.model_version,
        "promoted": outcome.promoted,
        "val_mean_acc": trained.metrics.get("val_mean_acc"),
        "holdout_mean_acc": evaluation.condition("clean").results["mean"]["acc"],
        "evaluation_run_id": eval_run,
        "crawl_files": n_crawl,
        "score_rows": scores.num_rows,
        "score_errors": int(pc.sum(pc.is_valid(scores["error"])).as_py() or 0),
        "corpus_files": corpus["total_files"],
        "timings_s": timings,
        "total_s": round(time.perf_counter() - started, 1),
    }
    print_report(report)
    return report


def fresh_workdir(workdir: Path) -> Path:
    """``workdir``, absolute, empty (old registry versions would change the promotion story) and marked as the
    demo's. UsageError, touching nothing, for a file or a folder with something in it that no demo made."""
    workdir = Path(workdir).resolve()
    if workdir.is_dir() and is_demo_workdir(workdir):
        shutil.rmtree(workdir)
    elif workdir.exists() and not (workdir.is_dir() and not any(workdir.iterdir())):
        raise UsageError(f"--workdir {workdir} exists and was not made by mpft demo (no {WORKDIR_MARKER} in it): "
                         "the demo empties its workdir, so name a new or empty folder")
    workdir.mkdir(parents=True, exist_ok=True)
    (workdir / WORKDIR_MARKER).write_text("made by mpft demo: emptied by the next demo run here\n")
    return workdir


def is_demo_workdir(path: Path) -> bool:
    return (path / WORKDIR_MARKER).is_file()


@contextmanager
def stage(name: str, timings: dict[str, float]) -> Iterator[None]:
    """Time one stage into ``timings[name]`` and print one line when it is done."""
    t0 = time.perf_counter()
    yield
    timings[name] = round(time.perf_counter() - t0, 1)
    print(f"[demo] {name} done in {timings[name]:.1f} s", flush=True)


def write_corpus(corpus_dir: Path, sizes: DemoSizes, s3: LocalS3Server) -> tuple[dict, int]:
    """The GenImage-layout corpus and the crawl, written under ``corpus_dir`` and uploaded to the demo bucket;
    returns the corpus summary and the number of crawled files."""
    corpus = sample_corpus.write_genimage_corpus(
        corpus_dir / "genimage", n_train_per_class=sizes.n_train_per_class, n_val_per_class=sizes.n_val_per_class,
        n_test_per_class=sizes.n_test_per_class, image_size=sizes.image_size, seed=0,
        train_generators=TRAIN_GENERATORS, test_generators=TEST_GENERATORS, generator_steps=sizes.generator_steps)
    n_crawl = write_crawl(corpus_dir / "genimage", corpus_dir / "crawl")
    s3.create_bucket(BUCKET)
    s3.upload_dir(corpus_dir / "genimage", GENIMAGE)
    s3.upload_dir(corpus_dir / "crawl", CRAWL)
    return corpus, n_crawl


def write_crawl(corpus_root: Path, crawl_dir: Path) -> int:
    """An unlabelled folder as a crawler would leave it: images of both classes plus a few broken files."""
    crawl_dir.mkdir(parents=True, exist_ok=True)
    images = sorted(corpus_root.glob("*/val/*/*.png"))
    for i, path in enumerate(images):
        shutil.copyfile(path, crawl_dir / f"img_{i:05d}.png")
    (crawl_dir / "truncated.jpg").write_bytes(b"\xff\xd8\xff\xe0" + b"\x00" * 64)
    (crawl_dir / "empty.png").write_bytes(b"")
    (crawl_dir / "notes.jpg").write_text("this is not an image")
    return len(images) + 3


def train_challenger(sizes: DemoSizes, storage: StorageConfig, tracking_uri: str, verbose: bool) -> TrainOutcome:
    """MPFT on the training generators, checkpoints in the bucket, registered as the `challenger`."""
    cfg = TrainJobConfig(
        name="demo-mpft-tam", method=demo_method(sizes),
        train=[SourceConfig(uri=GENIMAGE, layout="genimage", split="train", subsets=list(TRAIN_GENERATORS))],
        val=[SourceConfig(uri=GENIMAGE, layout="genimage", split="val", subsets=list(TRAIN_GENERATORS))],
        storage=storage, checkpoint_root=f"s3://{BUCKET}/checkpoints",
        tracking={"uri": tracking_uri, "experiment": EXPERIMENT, "registered_model": MODEL_NAME},
        log_every_steps=10, cache_decoded=True)
    return run_train(cfg, tracking_uri, verbose=verbose)


def holdout() -> list[SourceConfig]:
    """The frozen holdout: validation images of the seen and the unseen generator."""
    return [SourceConfig(uri=GENIMAGE, layout="genimage", split="val", subsets=list(TEST_GENERATORS))]


def evaluate_challenger(storage: StorageConfig, tracking_uri: str) -> tuple[EvalResult, str | None]:
    """The challenger on the holdout, clean, degraded and format-aligned, logged to MLflow; the result and its run
    id."""
    return run_evaluate(f"models:/{MODEL_NAME}@challenger", holdout(), storage_cfg=storage,
                        perturbations=[*parse_perturb_specs(["jpeg=65", "blur=1", "downscale=24"]),
                                       ALIGNMENT],
                        options=EvalOptions(resources=ONE_REPLICA), tracking_uri=tracking_uri, run_name="demo-evaluate")


def promote_challenger(storage: StorageConfig) -> PromotionOutcome:
    """The gate against the champion (none yet: the first challenger above 60 % mean accuracy passes), on the clean
    and the format-aligned holdout."""
    gate = GateConfig(min_mean_acc=0.6, conditions={ALIGNMENT.name: {}})
    outcome = promote(MODEL_NAME, holdout(), gate, storage_cfg=storage)
    print(render_decision(outcome, MODEL_NAME, dry_run=False), flush=True)
    return outcome


def score_crawl(scores_dir: Path, promoted: bool, storage: StorageConfig, tracking_uri: str) -> pa.Table:
    """The crawl scored into Parquet under ``scores_dir`` with the champion (the challenger if promotion was
    refused: the demo still shows scoring); the score rows."""
    model_ref = f"models:/{MODEL_NAME}@{'champion' if promoted else 'challenger'}"
    job = ScoreJob(model_ref=model_ref, input_uri=CRAWL, output_uri=str(scores_dir), storage=storage,
                   resources=ONE_REPLICA)
    run_score_job(job, resolve_model(model_ref, storage), tracking_uri=tracking_uri)
    return read_scores(str(scores_dir))


def print_report(report: dict) -> None:
    lines = [
        "",
        "MPFT demo finished in {total_s:.0f} s".format(**report),
        f"  trained version {report['model_version']} (val mean acc {report['val_mean_acc']:.3f}); "
        f"holdout mean acc {report['holdout_mean_acc']:.3f} on seen + unseen generators; "
        f"{'promoted to champion' if report['promoted'] else 'NOT promoted'}",
        f"  scores: {report['score_rows']} rows for {report['crawl_files']} crawled files "
        f"({report['score_errors']} error rows) in {report['scores']}",
        "  open them:  .venv/bin/python -c \"import pyarrow.parquet as pq; "
        f"print(pq.read_table('{report['scores']}').to_pandas())\"",
        "  MLflow runs, plots and the registered model (champion alias) are kept under "
        f"{report['mlflow_root']} (database) and {report['s3_root']} (the object store holding the artefacts); "
        "browse them with",
        f"      .venv/bin/python -m infra.local_stack.mlflow_server --root {report['mlflow_root']} "
        f"--s3-root {report['s3_root']} --port 5000",
        "  then open http://127.0.0.1:5000 (experiments mpft-demo, mpft-evaluation, mpft-scoring; model "
        f"{MODEL_NAME}).",
    ]
    print("\n".join(lines), flush=True)

