"""Benchmark: what the score store saves on a crawl whose content was half scored before (`mpft score --store`).

    .venv/bin/python bench/score_reuse.py             # a 20,000-file crawl, 10,000 of them seen (~25 min, 2 cores)
    .venv/bin/python bench/score_reuse.py --quick     # 2,000 files

Setup: ``mpft-small-224`` with random weights (the model of bench/score_throughput.py, big enough to dominate the
per-image cost), 256 px JPEGs. Yesterday's crawl: N/2 files, scored into a store (not timed). Today's crawl: N
files, N/2 with yesterday's bytes under new names and N/2 new. Measured in one run, one after the other:

  cold   today's crawl with an empty store (the store on, nothing in it: hash pass, scoring, store writes);
  warm   today's crawl with yesterday's store: half the inputs reused;
  plain  today's crawl without a store (no hash pass): the job as it runs without ``--store`` (--skip-plain omits it).

For each: wall time of ``run_scoring`` (listing, hash pass, actor start-up, scoring, writes), model time (the
scoring actors' time inside ``DetectorScorer.__call__``, summed over actors: decode-in-task rows reach it decoded,
so this is the model and the row building), rows by kind, and the driver's peak RSS (the store's lookup and plan
live on the driver). Target: warm <= 0.6 x cold for both model time and wall time, memory flat; the same against
plain is reported too (the stricter reference: it pays no hash pass).
Results go to ``bench/results/score_reuse.{json,md}``.
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

from bench.score_throughput import (  # noqa: E402
    MODEL_NAME,
    PeakRss,
    _wait_for_scoring_actors_to_exit,
    make_checkpoint,
    write_files,
)
from pipelines.runtime import init_ray  # noqa: E402
from pipelines.scoring import DetectorScorer, ScoreJob, run_scoring  # noqa: E402
from pipelines.scoring_spec import ResolvedModel, ScoringResources  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results"


class TimedScorer(DetectorScorer):
    """``DetectorScorer`` that appends (rows, seconds) of each batch to the file named by ``MPFT_BENCH_TIMES``."""

    def __call__(self, batch):
        started = time.perf_counter()
        out = super().__call__(batch)
        with open(os.environ["MPFT_BENCH_TIMES"], "a", encoding="utf-8") as log:
            log.write(f"{len(out)} {time.perf_counter() - started:.6f}\n")
        return out


def make_crawls(work: Path, n: int, side: int) -> tuple[Path, Path]:
    """Yesterday's crawl (n/2 files) and today's (the same bytes under new names + n/2 new files)."""
    yesterday, today = work / "yesterday", work / "today"
    seen = write_files(yesterday, n // 2, side, seed=10)
    (today / "seen").mkdir(parents=True, exist_ok=True)
    for path in seen:
        shutil.copyfile(path, today / "seen" / f"again-{Path(path).name}")
    write_files(today / "new", n - n // 2, side, seed=11)
    return yesterday, today


def score(checkpoint: Path, input_dir: Path, output: Path, store: Path | None, args, times: Path) -> dict:
    resources = ScoringResources(batch_size=args.batch_size, actor_cpus=0.5, decode_cpus=0.5, rows_per_block=128)
    job = ScoreJob(model_ref=str(checkpoint), input_uri=str(input_dir), output_uri=str(output), resources=resources,
                   score_store=None if store is None else str(store))
    _wait_for_scoring_actors_to_exit()  # the previous run's actors would still hold CPUs
    times.write_text("")
    with PeakRss(interval=0.1, tree=False) as mem:
        started = time.perf_counter()
        summary = run_scoring(job, ResolvedModel(checkpoint_dir=str(checkpoint), uri=str(checkpoint)),
                              scorer_cls=TimedScorer)
        seconds = time.perf_counter() - started
    if summary.n_written != summary.n_inputs or summary.n_errors:
        raise RuntimeError(f"wrote {summary.n_written} rows ({summary.n_errors} errors) for {summary.n_inputs}")
    batches = [line.split() for line in times.read_text().splitlines() if line.strip()]
    return {"wall_s": seconds, "model_s": sum(float(s) for _, s in batches),
            "model_rows": sum(int(r) for r, _ in batches), "n_inputs": summary.n_inputs,
            "n_scored": summary.n_scored, "n_reused": summary.n_reused, "n_duplicates": summary.n_duplicates,
            "driver_peak_rss_mib": mem.peak_kib / 1024}


def run(args) -> dict:
    import ray

    work = Path(args.workdir or tempfile.mkdtemp(prefix="mpft-bench-reuse-"))
    print(f"writing {args.files} + {args.files // 2} files under {work} ...", flush=True)
    yesterday, today = make_crawls(work, args.files, args.image_side)
    checkpoint = make_checkpoint(work)
    times = work / "times.txt"
    os.environ["MPFT_BENCH_TIMES"] = str(times)
    init_ray(num_cpus=os.cpu_count())  # workers inherit MPFT_BENCH_TIMES from this process's environment
    try:
        print("yesterday's crawl into the store (not timed) ...", flush=True)
        score(checkpoint, yesterday, work / "out-yesterday", work / "store", args, times)
        results = {"files": args.files, "seen": args.files // 2, "cores": os.cpu_count()}
        print("cold ...", flush=True)
        results["cold"] = score(checkpoint, today, work / "out-cold", work / "empty-store", args, times)
        print("warm ...", flush=True)
        results["warm"] = score(checkpoint, today, work / "out-warm", work / "store", args, times)
        if not args.skip_plain:
            print("plain ...", flush=True)
            results["plain"] = score(checkpoint, today, work / "out-plain", None, args, times)
    finally:
        ray.shutdown()
        if not args.keep:
            shutil.rmtree(work, ignore_errors=True)
    cold, warm = results["cold"], results["warm"]
    results["warm_over_cold"] = {"wall": warm["wall_s"] / cold["wall_s"], "model": warm["model_s"] / cold["model_s"],
                                 "driver_peak_rss": warm["driver_peak_rss_mib"] / cold["driver_peak_rss_mib"]}
    if "plain" in results:
        plain = results["plain"]
        results["cold_over_plain_wall"] = cold["wall_s"] / plain["wall_s"]
        results["warm_over_plain"] = {"wall": warm["wall_s"] / plain["wall_s"],
                                      "model": warm["model_s"] / plain["model_s"]}
    return results


def _commit() -> str:
    done = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                          cwd=Path(__file__).resolve().parents[1])
    return done.stdout.strip() or "unknown"


def write_results(results: dict, args) -> None:
    RESULTS.mkdir(parents=True, exist_ok=True)
    meta = {"date": datetime.now(timezone.utc).isoformat(timespec="seconds"), "host": platform.node(),
            "commit": _commit(), "model": MODEL_NAME, "image_side": args.image_side, "batch_size": args.batch_size}
    (RESULTS / "score_reuse.json").write_text(json.dumps({**meta, "results": results}, indent=2) + "\n")
    ratio = results["warm_over_cold"]
    lines = [f"# Score store: a crawl half seen before ({meta['date']}, commit {meta['commit']})", "",
             f"{MODEL_NAME}, {args.image_side}px JPEGs, {results['cores']} cores; today's crawl {results['files']} "
             f"files, {results['seen']} of them with bytes scored yesterday (under other names).", "",
             "| run | wall s | model s | rows through the model | fresh | reused | driver peak RSS MiB |",
             "|---|---:|---:|---:|---:|---:|---:|"]
    for name in ("cold", "warm", "plain"):
        if name in results:
            r = results[name]
            lines.append(f"| {name} | {r['wall_s']:.1f} | {r['model_s']:.1f} | {r['model_rows']} | {r['n_scored']} | "
                         f"{r['n_reused']} | {r['driver_peak_rss_mib']:.0f} |")
    lines += ["", "| ratio | value | target | met |", "|---|---:|---|---|",
              f"| wall time, warm / cold | {ratio['wall']:.3f} | <= 0.6 | {'yes' if ratio['wall'] <= 0.6 else 'no'} |",
              f"| model time, warm / cold | {ratio['model']:.3f} | <= 0.6 | "
              f"{'yes' if ratio['model'] <= 0.6 else 'no'} |",
              f"| driver peak RSS, warm / cold | {ratio['driver_peak_rss']:.3f} | flat (within 1 ± 0.10) | "
              f"{'yes' if abs(ratio['driver_peak_rss'] - 1) <= 0.10 else 'no'} |"]
    if "plain" in results:
        plain = results["warm_over_plain"]
        lines += [f"| wall time, warm / plain | {plain['wall']:.3f} | <= 0.6 | "
                  f"{'yes' if plain['wall'] <= 0.6 else 'no'} |",
                  f"| model time, warm / plain | {plain['model']:.3f} | <= 0.6 | "
                  f"{'yes' if plain['model'] <= 0.6 else 'no'} |",
                  "", f"The store's cost on a crawl it has never seen (cold / plain wall time): "
                  f"{results['cold_over_plain_wall']:.3f}."]
    (RESULTS / "score_reuse.md").write_text("\n".join(lines) + "\n")


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--files", type=int, default=None, help="today's crawl (default 20000; --quick 2000)")
    p.add_argument("--quick", action="store_true")
    p.add_argument("--image-side", type=int, default=256)
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--skip-plain", action="store_true", help="do not score today's crawl without a store")
    p.add_argument("--workdir", default=None)
    p.add_argument("--keep", action="store_true", help="keep the generated files")
    args = p.parse_args(argv)
    args.files = args.files or (2000 if args.quick else 20000)
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    results = run(args)
    write_results(results, args)
    print(json.dumps(results, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
