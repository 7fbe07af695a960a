"""Benchmark: the scoring driver's memory with the inputs scored in passes (`mpft score --inputs-per-pass N`).

    .venv/bin/python bench/score_passes.py              # 400,000 files, one pass vs four (~10 min here)
    .venv/bin/python bench/score_passes.py --quick      # 20,000 files

A crawl of N real small files (distinct random bytes, so every file is new content) is scored with the score store
on (`run_scoring` with a store: the hash pass reads every file, the lookup, the plan, the scoring, the store writes)
once in a single pass and once in passes of N/4, each in a fresh subprocess with its own Ray instance. The model is
``HashingConstantScorer``, bench/crawl_scale.py's ConstantScorer (a labelled constant-time stand-in: no decode, no
model) that also hashes each file's bytes as the real decode stage does, so the scores reach the store; the run
measures the pipeline's own costs. Reported per run: wall time, the driver's peak RSS above its RSS before the run,
and the Arrow memory pool's peak (the tables the driver holds: hashes, reuse plan, rows read back). The driver still
holds the manifest and the output's done paths whole, so its memory does not fall by the number of passes; what a
pass bounds is the rest. Results: ``bench/results/score_passes.{json,md}``.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time
from datetime import datetime, timezone
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

RESULTS = Path(__file__).resolve().parent / "results"


def write_crawl(folder: Path, n: int) -> None:
    """``n`` files of 64 random bytes (distinct content) in folders of 1,000."""
    for start in range(0, n, 1000):
        sub = folder / f"{start // 1000:05d}"
        sub.mkdir(parents=True, exist_ok=True)
        for i in range(start, min(start + 1000, n)):
            (sub / f"{i:08d}.jpg").write_bytes(os.urandom(64))


def hashing_constant_scorer():
    """ConstantScorer that puts each file's ``content_hash`` on its row, as decoding does, so rows can be stored."""
    import numpy as np

    from bench.crawl_scale import ConstantScorer
    from pipelines.score_store import content_hash

    class HashingConstantScorer(ConstantScorer):
        def __call__(self, batch):
            batch = dict(batch)
            batch["content_hash"] = np.array([content_hash(Path(p).read_bytes()) for p in batch["path"]],
                                             dtype=object)
            return super().__call__(batch)

    return HashingConstantScorer


def run_once(crawl: Path, work: Path, checkpoint: Path, per_pass: int) -> dict:
    """One scoring run with the store, in this (fresh) process."""
    import pyarrow as pa

    from bench.memory import PeakRss
    from pipelines.processes import resident_kib
    from pipelines.runtime import init_ray, shutdown_ray
    from pipelines.scoring import ScoreJob, run_scoring
    from pipelines.scoring_spec import ResolvedModel, ScoringResources

    init_ray(num_cpus=os.cpu_count())
    resources = ScoringResources(batch_size=1024, rows_per_block=1024, actor_cpus=0.5, decode_cpus=0.5)
    job = ScoreJob(model_ref=str(checkpoint), input_uri=str(crawl), output_uri=str(work / "output"),
                   resources=resources, decode_in_actor=True, score_store=str(work / "store"),
                   inputs_per_pass=per_pass)
    model = ResolvedModel(checkpoint_dir=str(checkpoint), uri=str(checkpoint))
    try:
        baseline = resident_kib(os.getpid())
        with PeakRss(interval=0.02, tree=False) as mem:
            started = time.perf_counter()
            summary = run_scoring(job, model, scorer_cls=hashing_constant_scorer())
            seconds = time.perf_counter() - started
    finally:
        shutdown_ray()
    if summary.n_written != summary.n_inputs or summary.n_scored != summary.n_inputs:
        raise RuntimeError(f"{summary.n_written} rows ({summary.n_scored} scored) for {summary.n_inputs} inputs")
    # The store must hold every score (one run's files: nothing to merge).
    stored = sum(pq_rows(p) for p in (work / "store").rglob("*.parquet"))
    if stored != summary.n_inputs:
        raise RuntimeError(f"the store holds {stored} scores for {summary.n_inputs} scored inputs")
    return {"per_pass": per_pass, "n_inputs": summary.n_inputs, "n_scored": summary.n_scored, "seconds": seconds,
            "driver_peak_above_start_mib": (mem.peak_kib - baseline) / 1024,
            "arrow_pool_peak_mib": pa.default_memory_pool().max_memory() / 2**20}


def pq_rows(path: Path) -> int:
    import pyarrow.parquet as pq

    return pq.ParquetFile(path).metadata.num_rows


def child(args: list[str]) -> dict:
    done = subprocess.run([sys.executable, __file__, *args], capture_output=True, text=True, check=False)
    if done.returncode:
        raise RuntimeError(done.stderr[-3000:])
    return json.loads(done.stdout.strip().splitlines()[-1])


def run(args) -> dict:
    from bench.score_throughput import make_checkpoint

    work = Path(args.workdir or tempfile.mkdtemp(prefix="mpft-bench-passes-"))
    crawl = work / "crawl"
    print(f"writing {args.n:,} files under {crawl} ...", flush=True)
    write_crawl(crawl, args.n)
    checkpoint = make_checkpoint(work)
    runs = []
    for per_pass in (args.n, -(-args.n // 4)):  # one pass, then exactly four
        out = work / f"run-{per_pass}"
        shutil.rmtree(out, ignore_errors=True)
        result = child(["--child", str(crawl), str(out), str(checkpoint), str(per_pass)])
        print(json.dumps(result), flush=True)
        runs.append(result)
    if not args.keep:
        shutil.rmtree(work, ignore_errors=True)
    one, four = runs
    return {"n": args.n, "runs": runs, "cores": os.cpu_count(),
            "ratios": {"driver_peak_four_passes_vs_one": four["driver_peak_above_start_mib"]
                       / one["driver_peak_above_start_mib"],
                       "arrow_peak_four_passes_vs_one": four["arrow_pool_peak_mib"] / one["arrow_pool_peak_mib"],
                       "seconds_four_passes_vs_one": four["seconds"] / one["seconds"]}}


def markdown(results: dict, meta: dict) -> str:
    lines = [f"# Scoring in passes ({meta['measured_at']}, commit {meta['commit']})", "",
             f"{results['n']:,} files of 64 random bytes, score store on (empty), HashingConstantScorer (hashes "
             f"the bytes; no decode, no model), {results['cores']} cores; each run in a fresh process.", "",
             "| inputs per pass | passes | wall s | driver peak above start, MiB | Arrow pool peak, MiB |",
             "|---:|---:|---:|---:|---:|"]
    for r in results["runs"]:
        lines.append(f"| {r['per_pass']:,} | {-(-r['n_inputs'] // r['per_pass'])} | {r['seconds']:.1f} | "
                     f"{r['driver_peak_above_start_mib']:.0f} | {r['arrow_pool_peak_mib']:.0f} |")
    ratios = results["ratios"]
    lines += ["", f"Four passes vs one: driver peak {ratios['driver_peak_four_passes_vs_one']:.2f}, Arrow pool peak "
              f"{ratios['arrow_peak_four_passes_vs_one']:.2f}, wall time {ratios['seconds_four_passes_vs_one']:.2f}."]
    return "\n".join(lines) + "\n"


def write_results(results: dict, quick: bool) -> None:
    meta = {"measured_at": datetime.now(timezone.utc).isoformat(timespec="seconds"), "machine": platform.node(),
            "commit": subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                                     cwd=Path(__file__).resolve().parents[1]).stdout.strip()}
    stem = RESULTS / ("score_passes_quick" if quick else "score_passes")
    stem.with_suffix(".json").write_text(json.dumps({**meta, **results}, indent=2))
    stem.with_suffix(".md").write_text(markdown(results, meta))
    print(markdown(results, meta))


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true", help="20,000 files")
    p.add_argument("--n", type=int, default=None, help="files in the crawl (default 400,000)")
    p.add_argument("--workdir", default=None)
    p.add_argument("--keep", action="store_true")
    p.add_argument("--child", nargs=4, metavar=("CRAWL", "WORK", "CHECKPOINT", "PER_PASS"), help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.child:
        crawl, work, checkpoint, per_pass = args.child
        print(json.dumps(run_once(Path(crawl), Path(work), Path(checkpoint), int(per_pass))))
        return 0
    args.n = args.n or (20_000 if args.quick else 400_000)
    if args.n < 4:
        p.error("--n must be at least 4 (the second run scores it in four passes)")
    write_results(run(args), args.quick)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
