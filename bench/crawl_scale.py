"""Benchmark: the scoring driver's own costs at crawl scale (issue 18, "At crawl scale").

    .venv/bin/python bench/crawl_scale.py           # 100k, 1M, 10M inputs (10M steps skipped past the RAM/time caps)
    .venv/bin/python bench/crawl_scale.py --quick   # 10k, 100k: a smoke test (results go to a *_quick file)

What is measured, per size N and per driver-side step of a scoring run, each in its own fresh subprocess (so one
step's peak never carries into the next):

  listing_manifest  ``sources.build_manifest`` on a Parquet manifest file of N rows (relative paths, no label)
  listing_folder    ``sources.build_manifest`` (layout ``unlabelled``) on a real local folder of N empty files
                    (only sizes up to --folder-max: creating millions of files costs minutes)
  manifest_hash     ``sources.manifest_hash`` of the N-row manifest
  resume            ``scoring.scan_parts`` on an output holding N/2 of the inputs' rows (Parquet parts of 4,096 rows
                    with the real ``OUTPUT_SCHEMA``), then ``scoring.remaining_inputs``
  reuse_lookup      ``ScoreStore.lookup`` of the N inputs' hashes on a store holding N/2 of them (written by
                    ``ScoreStore.add``, one run per million rows, like daily crawls), then ``plan_reuse``

The inputs a step starts from (the manifest table, the hashes) are loaded from Parquet before the clock and the
memory sampler start; the fixtures are written once per size by another subprocess. Memory is the driver's resident
set (VmRSS of the step's process, sampled every 20 ms in a thread): it is what the machine must hold and covers
Python objects (the lists and sets of path strings) and Arrow buffers alike, which tracemalloc (Python only, and
slowing Python code several-fold) and ``pyarrow.total_allocated_bytes`` (Arrow only) each miss half of. The Arrow
pool's peak (``max_memory``, process lifetime) is recorded next to it to tell the two apart.

End to end (``e2e``): one ``run_scoring`` of the N-row manifest (100k, and 1M unless --e2e-max says otherwise) with
the model replaced by ``ConstantScorer``, a labelled constant-time scorer: no read, no decode, no model, so only the
pipeline's own costs (listing, resume scan, Ray Data's scheduling of the blocks, the Parquet writes) are timed.
Memory there is the driver process only (Ray's workers are other processes).

10M runs a step only when the 1M figure, scaled linearly, stays under --max-gib of RSS and --max-step-s of time;
otherwise the step is recorded as skipped, with the estimate. Results: ``bench/results/crawl_scale.{json,md,png}``.
"""

from __future__ import annotations

import argparse
import gc
import json
import math
import os
import platform
import resource
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

import numpy as np  # noqa: E402
import pyarrow as pa  # noqa: E402
import pyarrow.compute as pc  # noqa: E402
import pyarrow.parquet as pq  # noqa: E402

from bench.memory import PeakRss  # noqa: E402
from pipelines.processes import resident_kib  # noqa: E402
from pipelines.scoring import DetectorScorer  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results"
STEPS = ("listing_manifest", "listing_folder", "manifest_hash", "resume", "reuse_lookup")
ROWS_PER_PART = 4096  # ScoreJob.rows_per_output_file: the parts a real run writes
STORE_ROWS_PER_RUN = 1_000_000  # the store is filled by several runs, as daily crawls would
FINGERPRINT = "f" * 24
CONSTANT_SCORE = 0.25


# ------------------------------------------------------------------------------------------------ the fake model


class ConstantScorer(DetectorScorer):
    """A constant-time stand-in for the model: every row gets score 0.25, nothing is read, decoded or run, so a
    scoring run measures the pipeline alone. Labelled as such wherever its figures appear."""

    def __init__(self, model_bundle, torch_threads: int = 1, use_gpu: bool = False,
                 carry_columns: tuple[str, ...] = (), embed: bool = False, decode=None):
        import ray

        from mpft_core.checkpoint_format import recorded_real_threshold
        from pipelines.scoring import bundle_threshold

        bundle = model_bundle if isinstance(model_bundle, dict) else ray.get(model_bundle)
        self.threshold = bundle_threshold(bundle)
        self.real_threshold = recorded_real_threshold(bundle["meta"])
        self.model_name = bundle.get("name")
        self.model_version = None if bundle.get("version") is None else str(bundle["version"])
        self.model_uri = bundle.get("uri")
        self.carry_columns = tuple(carry_columns)
        self.embed = False
        self.decode = decode  # kept for the signature; never used: this scorer reads nothing

    def __call__(self, batch):
        n = len(batch["path"])
        scores = np.full(n, CONSTANT_SCORE, dtype=np.float32)
        return self._rows(batch, n, [None] * n, np.ones(n, dtype=bool), scores, None)


# ------------------------------------------------------------------------------------------------ measuring


def measured(step, *args, imported_kib: int = 0) -> dict:
    """Run ``step(*args)`` (returns {part: seconds, ...} plus checks) under the clock and the RSS sampler;
    ``imported_kib``: the RSS once the modules were imported, before any input was loaded (the fixed part)."""
    gc.collect()
    baseline_kib = resident_kib(os.getpid())
    with PeakRss(interval=0.02, tree=False) as mem:
        started = time.perf_counter()
        detail = step(*args)
        seconds = time.perf_counter() - started
    return {"seconds": seconds, "peak_rss_mib": mem.peak_kib / 1024, "baseline_rss_mib": baseline_kib / 1024,
            "step_rss_mib": (mem.peak_kib - baseline_kib) / 1024, "imported_rss_mib": imported_kib / 1024,
            "data_rss_mib": (mem.peak_kib - imported_kib) / 1024,
            "ru_maxrss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
            "arrow_pool_peak_mib": pa.default_memory_pool().max_memory() / 2**20, **detail}


def _clock(fn, *args):
    started = time.perf_counter()
    out = fn(*args)
    return out, time.perf_counter() - started


# ------------------------------------------------------------------------------------------------ the steps


def step_listing_manifest(size_dir: Path) -> dict:
    from pipelines.sources import SourceConfig, build_manifest

    table = build_manifest(SourceConfig(uri=str(size_dir / "manifest.parquet"), layout="manifest"))
    return {"rows": table.num_rows}


def step_listing_folder(folder: Path) -> dict:
    from pipelines.sources import SourceConfig, build_manifest

    table = build_manifest(SourceConfig(uri=str(folder), layout="unlabelled"))
    return {"rows": table.num_rows}


def step_manifest_hash(manifest: pa.Table) -> dict:
    from pipelines.sources import manifest_hash

    return {"hash": manifest_hash(manifest)[:12]}


def step_resume(manifest: pa.Table, output: Path) -> dict:
    from pipelines.scoring import remaining_inputs, scan_parts

    (done, torn, _), scan_s = _clock(scan_parts, str(output))
    todo, diff_s = _clock(remaining_inputs, manifest, done)
    return {"scan_parts_s": scan_s, "remaining_inputs_s": diff_s, "done": len(done), "todo": todo.num_rows,
            "torn": len(torn)}


def step_reuse_lookup(manifest: pa.Table, hashed: pa.Table, store_dir: Path) -> dict:
    from pipelines.score_store import ScoreStore, plan_reuse

    store = ScoreStore(str(store_dir), FINGERPRINT)
    # As _score_through_store calls it: the hashes handed over as the Arrow column.
    stored, lookup_s = _clock(store.lookup, hashed.column("content_hash"))
    plan, plan_s = _clock(plan_reuse, manifest, hashed, stored)
    return {"lookup_s": lookup_s, "plan_reuse_s": plan_s, "stored": stored.num_rows, "reused": plan.reused.num_rows,
            "to_score": plan.to_score.num_rows}


def run_step(step: str, size_dir: Path, folder: str | None) -> dict:
    """One step in this (fresh) process: the modules imported and its inputs loaded first, then measured."""
    import pipelines.score_store  # noqa: F401  (imports are not the step's cost)
    import pipelines.scoring  # noqa: F401
    import pipelines.sources  # noqa: F401

    gc.collect()
    imported = resident_kib(os.getpid())
    if step == "listing_manifest":
        return measured(step_listing_manifest, size_dir, imported_kib=imported)
    if step == "listing_folder":
        return measured(step_listing_folder, Path(folder), imported_kib=imported)
    manifest = pq.read_table(size_dir / "resolved.parquet")
    if step == "manifest_hash":
        return measured(step_manifest_hash, manifest, imported_kib=imported)
    if step == "resume":
        return measured(step_resume, manifest, size_dir / "output", imported_kib=imported)
    if step == "reuse_lookup":
        hashed = pq.read_table(size_dir / "hashed.parquet")
        return measured(step_reuse_lookup, manifest, hashed, size_dir / "store", imported_kib=imported)
    raise SystemExit(f"unknown step {step}")


def run_e2e(size_dir: Path, checkpoint: Path) -> dict:
    """One ``run_scoring`` of the manifest with ``ConstantScorer`` (no decode: ``decode_in_actor``)."""
    import ray

    from pipelines.runtime import init_ray
    from pipelines.scoring import ScoreJob, run_scoring
    from pipelines.scoring_spec import ResolvedModel, ScoringResources

    init_ray(num_cpus=os.cpu_count())
    resources = ScoringResources(batch_size=1024, rows_per_block=1024, actor_cpus=0.5, decode_cpus=0.5)
    job = ScoreJob(model_ref=str(checkpoint), input_uri=str(size_dir / "manifest.parquet"), layout="manifest",
                   output_uri=str(size_dir / "e2e-output"), resources=resources, decode_in_actor=True)
    model = ResolvedModel(checkpoint_dir=str(checkpoint), uri=str(checkpoint))

    def score() -> dict:
        summary = run_scoring(job, model, scorer_cls=ConstantScorer)
        return {"n_inputs": summary.n_inputs, "n_written": summary.n_written, "rows_per_block": 1024,
                "batch_size": 1024, "scorer": "ConstantScorer (constant score, no read/decode/model)"}

    try:
        return measured(score)
    finally:
        ray.shutdown()


# ------------------------------------------------------------------------------------------------ fixtures


def hex_hashes(n: int, rng: np.random.Generator) -> pa.Array:
    """``n`` random 64-hex-digit strings (stand-ins for SHA-256 digests), built without a Python loop."""
    digits = np.frombuffer(b"0123456789abcdef", dtype=np.uint8)
    nibbles = rng.integers(0, 16, size=(n, 64), dtype=np.uint8)
    fixed = np.ascontiguousarray(digits[nibbles]).view("S64").ravel()
    return pa.array(fixed, pa.binary(64)).cast(pa.string())


def relative_paths(n: int) -> pa.Array:
    """Crawl-like relative paths ``crawl/2026-12-01/<2 digits>/<10 digits>.jpg``, shuffled (a crawl's order)."""
    idx = np.random.default_rng(1).permutation(n)
    number = pc.utf8_lpad(pa.array(idx).cast(pa.string()), 10, "0")
    folder = pc.utf8_lpad(pa.array(idx % 100).cast(pa.string()), 2, "0")
    return pc.binary_join_element_wise("crawl/2026-12-01/", folder, "/", number, ".jpg", "")


def make_fixtures(size_dir: Path, n: int, with_store: bool = True) -> None:
    """manifest.parquet (as a person writes it), resolved.parquet (what build_manifest returns), hashed.parquet
    (path, content_hash), output/ (N/2 rows in OUTPUT_SCHEMA parts) and store/ (the other N/2 hashes)."""
    from pipelines.score_store import ScoreStore
    from pipelines.sources import MANIFEST_SCHEMA
    from pipelines.subset_names import canonical_subset

    size_dir.mkdir(parents=True, exist_ok=True)
    rel = relative_paths(n)
    pq.write_table(pa.table({"path": rel, "label": pa.nulls(n, pa.int8())}), size_dir / "manifest.parquet")
    absolute = pc.binary_join_element_wise(str(size_dir) + "/", rel, "")
    resolved = pa.table([absolute, pa.nulls(n, pa.int8()), pa.array([canonical_subset("manifest")] * n, pa.string()),
                         pa.nulls(n, pa.string())], schema=MANIFEST_SCHEMA).sort_by("path")
    pq.write_table(resolved, size_dir / "resolved.parquet")
    rng = np.random.default_rng(2)
    hashed = pa.table({"path": resolved.column("path"), "content_hash": hex_hashes(n, rng)})
    pq.write_table(hashed, size_dir / "hashed.parquet")
    rows = output_rows(hashed, rng)
    even = pa.array(np.arange(n) % 2 == 0)
    write_output_parts(size_dir / "output", rows.filter(even))
    if with_store:
        fill_store(ScoreStore(str(size_dir / "store"), FINGERPRINT), rows.filter(pc.invert(even)))


def output_rows(hashed: pa.Table, rng: np.random.Generator) -> pa.Table:
    """Score rows in the real OUTPUT_SCHEMA for every hashed input."""
    from pipelines.scoring import OUTPUT_SCHEMA

    n = hashed.num_rows
    scores = rng.random(n, dtype=np.float32)
    columns = {
        "path": hashed.column("path"), "score": pa.array(scores),
        "verdict": pa.array(np.where(scores >= 0.5, "generated", "real")).cast(pa.string()),
        "threshold": pa.array(np.full(n, 0.5)), "real_threshold": pa.array(np.full(n, 0.5)),
        "model_name": pa.array(["bench"] * n, pa.string()), "model_version": pa.array(["1"] * n, pa.string()),
        "model_uri": pa.array(["models:/bench/1"] * n, pa.string()), "error": pa.nulls(n, pa.string()),
        "width": pa.array(np.full(n, 256, np.int32)), "height": pa.array(np.full(n, 256, np.int32)),
        "scored_at": pa.array([datetime.now(timezone.utc)] * n, pa.timestamp("us", tz="UTC")),
        "content_hash": hashed.column("content_hash"), "reuse": pa.array(["fresh"] * n, pa.string()),
    }
    return pa.table(columns, schema=OUTPUT_SCHEMA)


def write_output_parts(output: Path, rows: pa.Table) -> None:
    output.mkdir(parents=True, exist_ok=True)
    for i, start in enumerate(range(0, rows.num_rows, ROWS_PER_PART)):
        pq.write_table(rows.slice(start, ROWS_PER_PART), output / f"part-bench-{i:06d}.parquet")


def fill_store(store, rows: pa.Table) -> None:
    for i, start in enumerate(range(0, rows.num_rows, STORE_ROWS_PER_RUN)):
        store.add(rows.slice(start, STORE_ROWS_PER_RUN), f"bench-run-{i:03d}")


def make_folder(root: Path, start: int, stop: int) -> None:
    """Empty files ``root/<i // 1000>/<i>`` for i in [start, stop): a listing costs per object, not per byte."""
    for i in range(start, stop):
        sub = root / f"{i // 1000:05d}"
        if i % 1000 == 0 or i == start:
            sub.mkdir(parents=True, exist_ok=True)
        os.close(os.open(sub / f"{i:08d}", os.O_CREAT | os.O_WRONLY, 0o644))


# ------------------------------------------------------------------------------------------------ the driver


def child(args: list[str], timeout: float | None = None) -> dict:
    """Run this script with ``args`` in a fresh interpreter; its last stdout line is its JSON result. Past
    ``timeout`` the child is killed and subprocess.TimeoutExpired raised."""
    done = subprocess.run([sys.executable, __file__, *args], capture_output=True, text=True, timeout=timeout)
    if done.returncode != 0:
        raise RuntimeError(f"{args} failed:\n{done.stderr[-3000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def folders(work: Path, sizes: list[int], folder_max: int) -> dict[int, str]:
    """Real folders of empty files for the sizes up to ``folder_max``, nested so each holds exactly its size: the
    largest is ``folder``, the next ``folder/in``, then ``folder/in/in``; each level adds its own files beside."""
    wanted = sorted(n for n in sizes if n <= folder_max)
    paths = {n: work / "folder" / Path(*["in"] * (len(wanted) - 1 - k)) for k, n in enumerate(wanted)}
    written = 0
    for n in wanted:
        started = time.perf_counter()
        make_folder(paths[n] / "own", written, n)
        print(f"  folder of {n:,} files: {n - written:,} created in {time.perf_counter() - started:.0f} s",
              flush=True)
        written = n
    return {n: str(path) for n, path in paths.items()}


def skip_reason(results: dict, step: str, k: int, args) -> str | None:
    """Why ``step`` is not run at ``args.sizes[k]``: it did not run at the size below, or that size's figures,
    scaled linearly, exceed the caps."""
    if not k:
        return None
    below = f"{step}@{args.sizes[k - 1]}"
    if below in results["skipped"]:
        return f"not run at {_size(args.sizes[k - 1])} ({results['skipped'][below]})"
    if below not in results["steps"]:
        return None
    return too_big(results["steps"][below], args.sizes[k] / args.sizes[k - 1], args.max_gib, args.max_step_s)


def too_big(prev: dict, factor: float, max_gib: float, max_step_s: float) -> str | None:
    """Why a step at the next size would exceed the caps (its previous-size figures scaled by ``factor``)."""
    mib, seconds = prev["peak_rss_mib"] * factor, prev["seconds"] * factor
    if mib > max_gib * 1024:
        return f"estimated {mib / 1024:.1f} GiB RSS (> {max_gib} GiB cap): the previous size x{factor:g}"
    if seconds > max_step_s:
        return f"estimated {seconds:.0f} s (> {max_step_s:.0f} s cap): the previous size x{factor:g}"
    return None


def run(args) -> dict:
    work = Path(args.workdir or tempfile.mkdtemp(prefix="mpft-bench-crawl-"))
    results: dict = {"sizes": args.sizes, "cores": os.cpu_count(), "steps": {}, "skipped": {}, "e2e": {}}
    try:
        print(f"folders of empty files under {work} ...", flush=True)
        folder_paths = folders(work, args.sizes, args.folder_max)
        for k, n in enumerate(args.sizes):
            size_dir = work / f"n{n}"
            started = time.perf_counter()
            lookup_may_run = skip_reason(results, "reuse_lookup", k, args) is None
            child(["--fixtures", str(n), "--workdir", str(size_dir)] + ([] if lookup_may_run else ["--no-store"]))
            print(f"{n:,} inputs: fixtures in {time.perf_counter() - started:.0f} s", flush=True)
            for step in STEPS:
                key = f"{step}@{n}"
                if step == "listing_folder" and n not in folder_paths:
                    results["skipped"][key] = f"no folder of {n:,} files (--folder-max {args.folder_max:,})"
                    continue
                reason = skip_reason(results, step, k, args)
                if reason:
                    results["skipped"][key] = reason
                    print(f"  {step}: skipped ({reason})", flush=True)
                    continue
                try:
                    out = child(["--step", step, "--size-dir", str(size_dir), "--folder", folder_paths.get(n, "")],
                                timeout=args.max_step_s)
                except subprocess.TimeoutExpired:
                    results["skipped"][key] = f"timed out: over {args.max_step_s:.0f} s (killed)"
                    print(f"  {step}: timed out after {args.max_step_s:.0f} s", flush=True)
                    continue
                results["steps"][key] = {**out, "n": n, "us_per_input": out["seconds"] / n * 1e6}
                print(f"  {step}: {out['seconds']:.2f} s, peak {out['peak_rss_mib']:.0f} MiB", flush=True)
            e2e_reason = e2e_skip(results, n, args)
            if e2e_reason:
                results["skipped"][f"e2e@{n}"] = e2e_reason
                print(f"  e2e: skipped ({e2e_reason})", flush=True)
            else:
                checkpoint = ensure_checkpoint(work)
                out = child(["--e2e", "--size-dir", str(size_dir), "--checkpoint", str(checkpoint)])
                results["e2e"][str(n)] = {**out, "n": n, "us_per_input": out["seconds"] / n * 1e6}
                print(f"  e2e run_scoring (ConstantScorer): {out['seconds']:.1f} s, driver peak "
                      f"{out['peak_rss_mib']:.0f} MiB", flush=True)
            shutil.rmtree(size_dir, ignore_errors=True)
    finally:
        if not args.keep:
            shutil.rmtree(work, ignore_errors=True)
    results["growth"] = growth(results, args.sizes)
    return results


def e2e_skip(results: dict, n: int, args) -> str | None:
    """Why the end-to-end run at ``n`` is left out: above --e2e-max, or a linear estimate from the last one over
    --e2e-max-s."""
    if n > args.e2e_max:
        return f"above --e2e-max {args.e2e_max:,}"
    done = [r for r in results["e2e"].values() if r["n"] < n]
    if done and done[-1]["seconds"] * n / done[-1]["n"] > args.e2e_max_s:
        return (f"estimated {done[-1]['seconds'] * n / done[-1]['n']:.0f} s (> {args.e2e_max_s:.0f} s): "
                f"{_size(done[-1]['n'])} run scaled linearly")
    return None


def ensure_checkpoint(work: Path) -> Path:
    folder = work / "model"
    if not folder.exists():
        child(["--make-checkpoint", str(work)])
    return folder


def growth(results: dict, sizes: list[int]) -> dict:
    """Per step, the ratios between the two largest sizes it ran at: peak RSS, the step's own RSS (peak minus the
    loaded inputs) and time per input, against the targets."""
    out = {}
    for step in STEPS:
        ran = [n for n in sizes if f"{step}@{n}" in results["steps"]]
        if len(ran) < 2:
            continue
        small, big = results["steps"][f"{step}@{ran[-2]}"], results["steps"][f"{step}@{ran[-1]}"]
        factor = ran[-1] / ran[-2]
        peak = big["peak_rss_mib"] / small["peak_rss_mib"]
        mem = big["data_rss_mib"] / max(small["data_rss_mib"], 1.0)
        own = big["step_rss_mib"] / max(small["step_rss_mib"], 1.0)
        per_input = big["us_per_input"] / small["us_per_input"]
        out[step] = {"from": ran[-2], "to": ran[-1], "size_ratio": factor, "peak_rss_ratio": peak,
                     "data_rss_ratio": mem, "step_rss_ratio": own, "memory_exponent": math.log(mem) / math.log(factor),
                     "us_per_input_ratio": per_input,
                     "memory_sublinear": mem <= math.sqrt(factor), "time_flat": abs(per_input - 1) <= 0.20}
    return out


# ------------------------------------------------------------------------------------------------ results


def _commit() -> str:
    done = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                          cwd=Path(__file__).resolve().parents[1])
    return done.stdout.strip() or "unknown"


def _size(n: int) -> str:
    return f"{n // 1_000_000}M" if n >= 1_000_000 and n % 1_000_000 == 0 else f"{n // 1000}k"


def _detail(row: dict) -> str:
    parts = [f"{k.removesuffix('_s')} {v:.2f} s" for k, v in row.items()
             if k.endswith("_s") and k not in ("seconds",)]
    return ", ".join(parts)


# What holds the driver's memory and time in each step, read from the code this benchmark was written against
# (pipelines/sources.py, scoring.py, score_store.py): printed under the tables so the figures can be read.
WHERE_IT_GOES = """What grows with the input, step by step (read from the code; none of it is bounded by a chunk):

- listing_manifest: `sources._read_manifest_file` turns every column into Python lists (paths as written and
  resolved, subsets, carve keys: several Python str per row), and checks every row on disk: one `os.path.realpath`
  (it follows symlinks, a system call per path component) and one `os.stat` per row. Most of the memory.
- listing_folder: `storage.list_files` returns one sorted Python list of every path, then `_from_listing` builds
  per-column Python lists.
- manifest_hash: a sorted copy of the whole manifest and its whole CSV text in one `BytesIO` (+ `getvalue()` copy).
- resume: `scan_parts` keeps the done paths as one Arrow string array (unique), `remaining_inputs` filters the
  manifest with `is_in` on it; the manifest table itself is held whole.
- reuse_lookup: the manifest and the (path, content_hash) table are held whole; `lookup` builds the sorted unique
  hashes and a NumPy object array of every hash's bucket; `plan_reuse`'s hash joins on 10M-row tables dominate the
  Arrow pool. Lookup time grows with the store's parts: each part is read with its bucket's value set, so a store
  of R runs costs R x N set inserts (here 1 run per million stored rows: 256 parts at 1M, 1,280 at 10M).
"""


def markdown(results: dict, meta: dict) -> str:
    lines = [f"# Scoring driver at crawl scale ({meta['date']}, commit {meta['commit']})", "",
             f"{results['cores']} cores shared with other work; each step in a fresh process; peak = VmRSS of that "
             "process sampled every 20 ms (interpreter + the step's loaded inputs + the step); data = peak minus "
             "the RSS once the modules were imported (the size-dependent part: inputs + step); own = peak minus "
             "the RSS just before the step (inputs already loaded); Arrow = the Arrow pool's peak (process "
             "lifetime).", "",
             "| size | step | seconds | µs / input | peak MiB | data MiB | own MiB | Arrow MiB | parts |",
             "|---|---|---:|---:|---:|---:|---:|---:|---|"]
    for n in results["sizes"]:
        for step in STEPS:
            key = f"{step}@{n}"
            if key in results["steps"]:
                r = results["steps"][key]
                lines.append(f"| {_size(n)} | {step} | {r['seconds']:.2f} | {r['us_per_input']:.2f} | "
                             f"{r['peak_rss_mib']:.0f} | {r['data_rss_mib']:.0f} | {r['step_rss_mib']:.0f} | "
                             f"{r['arrow_pool_peak_mib']:.0f} | "
                             f"{_detail(r)} |")
            elif key in results["skipped"]:
                lines.append(f"| {_size(n)} | {step} | skipped: {results['skipped'][key]} | | | | | | |")
    if results["e2e"]:
        lines += ["", "End to end, `run_scoring` with **ConstantScorer** (constant score, no read / decode / model: "
                  "the pipeline's own costs only; Ray local, rows_per_block = batch = 1024, `decode_in_actor`); "
                  "peak = the driver process only.", "",
                  "| size | seconds | µs / input | driver peak MiB |", "|---|---:|---:|---:|"]
        for r in results["e2e"].values():
            lines.append(f"| {_size(r['n'])} | {r['seconds']:.1f} | {r['us_per_input']:.1f} | "
                         f"{r['peak_rss_mib']:.0f} |")
        for n in results["sizes"]:
            if f"e2e@{n}" in results["skipped"] and n <= 1_000_000:
                lines.append(f"| {_size(n)} | skipped: {results['skipped'][f'e2e@{n}']} | | |")
    lines += ["", "Growth between the two largest sizes each step ran at. Targets (issue 18): memory sub-linear "
              "(taken here as data-RSS ratio <= sqrt(size ratio), i.e. exponent <= 0.5; linear is exponent 1) or "
              "bounded by a chunk; time per input flat within 20 %.", "",
              "| step | sizes | data RSS ratio | memory exponent | sub-linear | peak RSS ratio | own RSS ratio | "
              "µs/input ratio | flat ±20 % |", "|---|---|---:|---:|---|---:|---:|---:|---|"]
    for step, g in results["growth"].items():
        lines.append(f"| {step} | {_size(g['to'])} / {_size(g['from'])} | {g['data_rss_ratio']:.2f} | "
                     f"{g['memory_exponent']:.2f} | {'yes' if g['memory_sublinear'] else 'no'} | "
                     f"{g['peak_rss_ratio']:.2f} | {g['step_rss_ratio']:.2f} | {g['us_per_input_ratio']:.2f} | "
                     f"{'yes' if g['time_flat'] else 'no'} |")
    return "\n".join(lines) + "\n\n" + WHERE_IT_GOES


def plot(results: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (mem_ax, time_ax) = plt.subplots(1, 2, figsize=(11, 4.2))
    for step in STEPS:
        ran = [r for r in (results["steps"].get(f"{step}@{n}") for n in results["sizes"]) if r]
        if not ran:
            continue
        xs = [r["n"] for r in ran]
        mem_ax.plot(xs, [r["data_rss_mib"] for r in ran], marker="o", label=step)
        time_ax.plot(xs, [r["us_per_input"] for r in ran], marker="o", label=step)
    if results["e2e"]:
        e2e = sorted(results["e2e"].values(), key=lambda r: r["n"])
        time_ax.plot([r["n"] for r in e2e], [r["us_per_input"] for r in e2e], marker="s", ls="--",
                     label="e2e (ConstantScorer)")
    sizes = np.array(results["sizes"], dtype=float)
    first = min((r["data_rss_mib"] for r in results["steps"].values()), default=100.0)
    mem_ax.plot(sizes, first * sizes / sizes[0], color="grey", ls=":", label="linear")
    mem_ax.set(xscale="log", yscale="log", xlabel="inputs", ylabel="MiB",
               title="driver memory: peak RSS above the imports")
    time_ax.set(xscale="log", yscale="log", xlabel="inputs", ylabel="µs per input", title="time per input")
    mem_ax.legend(fontsize=7)
    time_ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def write_results(results: dict, quick: bool) -> None:
    RESULTS.mkdir(parents=True, exist_ok=True)
    stem = "crawl_scale_quick" if quick else "crawl_scale"
    meta = {"date": datetime.now(timezone.utc).isoformat(timespec="seconds"), "host": platform.node(),
            "commit": _commit(), "memory": "VmRSS of the step's process, sampled every 20 ms"}
    (RESULTS / f"{stem}.json").write_text(json.dumps({**meta, "results": results}, indent=2) + "\n")
    (RESULTS / f"{stem}.md").write_text(markdown(results, meta))
    plot(results, RESULTS / f"{stem}.png")


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true", help="10k and 100k only")
    p.add_argument("--sizes", type=int, nargs="+", default=None)
    p.add_argument("--folder-max", type=int, default=None, help="largest real folder listed (default 100k)")
    p.add_argument("--e2e-max", type=int, default=None, help="largest end-to-end run (default 1M; quick 100k)")
    p.add_argument("--max-gib", type=float, default=20.0, help="skip a step whose estimated RSS is above this")
    p.add_argument("--max-step-s", type=float, default=300.0,
                   help="skip a step whose estimated time is above this, and kill one that runs longer")
    p.add_argument("--e2e-max-s", type=float, default=300.0, help="skip an e2e run estimated to take longer")
    p.add_argument("--workdir", default=None)
    p.add_argument("--keep", action="store_true")
    # internal: one subprocess's work
    p.add_argument("--step", choices=STEPS)
    p.add_argument("--fixtures", type=int)
    p.add_argument("--no-store", action="store_true", help="fixtures without the score store")
    p.add_argument("--e2e", action="store_true")
    p.add_argument("--make-checkpoint")
    p.add_argument("--size-dir")
    p.add_argument("--folder")
    p.add_argument("--checkpoint")
    args = p.parse_args(argv)
    args.sizes = args.sizes or ([10_000, 100_000] if args.quick else [100_000, 1_000_000, 10_000_000])
    args.folder_max = args.folder_max if args.folder_max is not None else 100_000
    args.e2e_max = args.e2e_max if args.e2e_max is not None else (100_000 if args.quick else 1_000_000)
    return args


def child_main(args) -> int:
    """The subprocess side: fixtures, one step, the e2e run or the checkpoint; prints one JSON line."""
    if args.fixtures:
        make_fixtures(Path(args.workdir), args.fixtures, with_store=not args.no_store)
        out: dict = {}
    elif args.make_checkpoint:
        from bench.score_throughput import make_checkpoint

        out = {"checkpoint": str(make_checkpoint(Path(args.make_checkpoint)))}
    elif args.e2e:
        out = run_e2e(Path(args.size_dir), Path(args.checkpoint))
    else:
        out = run_step(args.step, Path(args.size_dir), args.folder or None)
    print(json.dumps(out))
    return 0


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.step or args.fixtures or args.e2e or args.make_checkpoint:
        return child_main(args)
    results = run(args)
    write_results(results, args.quick)
    print(json.dumps(results["growth"], indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
