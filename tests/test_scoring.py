"""Batch scoring: one row per input with a score or an error, exactly once, across crashes, retries and killed actors.

Everything runs on the real stack: files on disk or on the local S3 server, a private Ray instance, the MLflow server.
"""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import time
from datetime import datetime, timezone
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch

from pipelines import scoring
from pipelines.scoring import DetectorScorer, ScoreJob, read_scores, run_scoring
from pipelines.scoring_spec import ResolvedModel, ScoringResources
from tests.helpers.images import (
    BAD_CORPUS_FAILURES,
    BAD_CORPUS_MAX_PIXELS,
    fake_images,
    real_photo_crops,
    write_bad_corpus,
)
from tests.helpers.models import tiny_checkpoint

REPO = Path(__file__).resolve().parents[1]
THRESHOLD = 0.47


# ------------------------------------------------------------------------------------------------------ fixtures


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory) -> Path:
    """A tiny detector (32 px input) with a calibrated-looking threshold, saved like training saves it."""
    return tiny_checkpoint(tmp_path_factory.mktemp("ckpt") / "model", threshold=THRESHOLD, seed=0)


@pytest.fixture(scope="module")
def model(checkpoint) -> ResolvedModel:
    return ResolvedModel(checkpoint_dir=str(checkpoint), uri=str(checkpoint), name="tiny", version="3")


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> tuple[Path, dict[str, bool]]:
    """A mixed folder: the awkward-files corpus (5 undecodable) plus photo crops and synthetic fakes in a subfolder."""
    from PIL import Image

    root = tmp_path_factory.mktemp("corpus")
    expected = {str(root / name): ok for name, ok in write_bad_corpus(root).items()}
    (root / "more").mkdir()
    for i, pixels in enumerate(real_photo_crops(6, 40, seed=1) + fake_images(6, 40, seed=1)):
        path = root / "more" / f"{i:03d}.png"
        Image.fromarray(pixels).save(path)
        expected[str(path)] = True
    return root, expected


def _resources(**overrides) -> ScoringResources:
    """Small batches and blocks and one actor: the test corpus is a few dozen files on a 2-CPU Ray."""
    return ScoringResources(**{"batch_size": 8, "rows_per_block": 8, "max_pixels": BAD_CORPUS_MAX_PIXELS,
                               "num_actors": 1, "actor_cpus": 0.5, "decode_cpus": 0.25, **overrides})


def _job(input_uri, output_uri, **kw) -> ScoreJob:
    defaults = dict(model_ref="tiny", input_uri=str(input_uri), output_uri=str(output_uri), resources=_resources())
    defaults.update(kw)
    return ScoreJob(**defaults)


def _all_rows(output) -> pa.Table:
    """Every row of every part, without the de-duplication read_scores does: what a naive reader would see."""
    parts = scoring.list_part_files(str(output))
    return pa.concat_tables([pq.read_table(p) for p in parts]) if parts else scoring.OUTPUT_SCHEMA.empty_table()


def _assert_exactly_once(output, expected: dict[str, bool]) -> pa.Table:
    rows = _all_rows(output)
    paths = rows.column("path").to_pylist()
    assert len(paths) == len(set(paths)), "duplicated rows"
    assert set(paths) == set(expected), f"missing {set(expected) - set(paths)}, extra {set(paths) - set(expected)}"
    for row in rows.to_pylist():
        assert (row["score"] is None) == (row["error"] is not None), row
        assert (row["score"] is None) == (not expected[row["path"]]), row
    return rows


# --------------------------------------------------------------------------------------------- the scoring actor


def _decoded_batch(images: np.ndarray, errors: list) -> dict:
    n = len(errors)
    return {"path": np.array([f"/x/{i}.png" for i in range(n)], dtype=object),
            "label": np.array([None] * n, dtype=object), "subset": np.array([None] * n, dtype=object),
            "split": np.array([None] * n, dtype=object), "image": images,
            "error": np.array(errors, dtype=object), "width": np.full(n, 40), "height": np.full(n, 30)}


def test_scorer_scores_good_rows_and_keeps_errors_with_null_score(model, checkpoint):
    from mpft_core.checkpoint import load_checkpoint

    images = np.stack(real_photo_crops(2, 32) + fake_images(2, 32))
    errors = [None, "ImageDecodeError: truncated JPEG", None, None]
    images[1] = 0  # what decode puts in an error row
    out = DetectorScorer(scoring.make_model_bundle(model))(_decoded_batch(images, errors))

    expected = load_checkpoint(checkpoint).score_uint8(torch.from_numpy(images[[0, 2, 3]])).numpy()
    assert "image" not in out.column_names
    assert out.column("score").to_pylist()[1] is None and out.column("verdict").to_pylist()[1] is None
    assert out.column("error").to_pylist() == errors
    np.testing.assert_allclose([out.column("score").to_pylist()[i] for i in (0, 2, 3)], expected, rtol=1e-6)
    verdicts = [out.column("verdict").to_pylist()[i] for i in (0, 2, 3)]
    assert verdicts == ["generated" if s >= THRESHOLD else "real" for s in expected]
    assert set(out.column("threshold").to_pylist()) == {THRESHOLD}
    assert set(out.column("real_threshold").to_pylist()) == {THRESHOLD}  # only threshold was set: no band
    row = out.slice(0, 1).to_pylist()[0]
    assert (row["model_name"], row["model_version"], row["model_uri"]) == ("tiny", "3", model.uri)
    assert (row["width"], row["height"]) == (40, 30) and row["scored_at"] is not None


def test_scores_between_the_checkpoint_s_two_thresholds_get_the_uncertain_verdict(checkpoint, tmp_path):
    from mpft_core.checkpoint import load_checkpoint, save_checkpoint

    images = np.stack(real_photo_crops(3, 32) + fake_images(3, 32))
    detector = load_checkpoint(checkpoint)
    scores = detector.score_uint8(torch.from_numpy(images)).numpy()
    ranked = np.sort(scores)
    # The band runs from the second-lowest score (itself uncertain) up to the highest (itself generated).
    detector.real_threshold, detector.threshold = float(ranked[1]), float(ranked[-1])
    banded = save_checkpoint(detector, tmp_path / "banded")

    bundle = scoring.make_model_bundle(ResolvedModel(checkpoint_dir=str(banded), uri=str(banded)))
    out = DetectorScorer(bundle)(_decoded_batch(images, [None] * len(images)))

    by_score = dict(zip(out.column("score").to_pylist(), out.column("verdict").to_pylist(), strict=True))
    assert [by_score[float(s)] for s in ranked] == ["real"] + ["uncertain"] * (len(ranked) - 2) + ["generated"]
    assert set(out.column("real_threshold").to_pylist()) == {float(ranked[1])}
    assert set(out.column("threshold").to_pylist()) == {float(ranked[-1])}


def test_scorer_writes_its_schema(model):
    out = DetectorScorer(scoring.make_model_bundle(model))(_decoded_batch(np.zeros((1, 32, 32, 3), np.uint8), [None]))
    assert out.select(list(scoring.OUTPUT_COLUMNS)).schema.equals(scoring.OUTPUT_SCHEMA)


# ------------------------------------------------------------------------------------------- resume bookkeeping


def _write_part(folder: Path, name: str, paths: list[str], minutes: int = 0) -> None:
    n = len(paths)
    when = datetime(2026, 1, 1, 0, minutes, tzinfo=timezone.utc)
    table = pa.table({"path": paths, "score": pa.array([0.5] * n, pa.float32()), "error": pa.nulls(n, pa.string()),
                      "scored_at": pa.array([when] * n, pa.timestamp("us", tz="UTC"))})
    pq.write_table(table, folder / name)


def test_torn_part_is_removed_and_its_rows_count_as_not_scored(tmp_path):
    _write_part(tmp_path, "part-a-1.parquet", ["/in/1.png", "/in/2.png"])
    good = (tmp_path / "part-a-1.parquet").read_bytes()
    (tmp_path / "part-b-1.parquet").write_bytes(good[: len(good) // 2])  # a crash mid-write
    (tmp_path / "notes.txt").write_text("not a part")

    done, torn, _ = scoring.scan_parts(str(tmp_path))
    scoring.delete_parts(str(tmp_path), None, torn)

    assert sorted(done.to_pylist()) == ["/in/1.png", "/in/2.png"]
    assert [Path(p).name for p in torn] == ["part-b-1.parquet"]
    assert not (tmp_path / "part-b-1.parquet").exists() and (tmp_path / "notes.txt").exists()
    manifest = pa.table({"path": ["/in/1.png", "/in/2.png", "/in/3.png"]})
    assert scoring.remaining_inputs(manifest, done).column("path").to_pylist() == ["/in/3.png"]


def test_a_part_that_cannot_be_read_stops_the_scan_and_only_a_torn_one_is_ever_removed(tmp_path):
    _write_part(tmp_path, "part-a-1.parquet", ["/in/1.png"])
    good = (tmp_path / "part-a-1.parquet").read_bytes()
    (tmp_path / "part-b-1.parquet").write_bytes(good[: len(good) // 2])  # a crash mid-write
    # Named like a part but not readable as a file: an OSError that is no Parquet error, as EIO or ESTALE would be.
    (tmp_path / "part-c-1.parquet").mkdir()

    with pytest.raises(OSError, match="part-c-1.parquet") as failed:
        scoring.scan_parts(str(tmp_path))

    assert "nothing was deleted" in str(failed.value)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["part-a-1.parquet", "part-b-1.parquet", "part-c-1.parquet"]
    (tmp_path / "part-c-1.parquet").rmdir()  # the storage answers again
    done, torn, _ = scoring.scan_parts(str(tmp_path))
    assert done.to_pylist() == ["/in/1.png"] and [Path(p).name for p in torn] == ["part-b-1.parquet"]


def test_resuming_an_output_of_another_model_is_refused(model, corpus, tmp_path):
    table = pa.table({"path": ["/in/1.png"], "model_uri": ["models:/other/1"]})
    pq.write_table(table, tmp_path / "part-old-1.parquet")
    with pytest.raises(ValueError, match="fresh --output"):
        run_scoring(_job(corpus[0], tmp_path), model)


def test_read_scores_reads_parts_written_before_real_threshold_with_null_there(tmp_path):
    _write_part(tmp_path, "part-old-1.parquet", ["/in/1.png"])  # no real_threshold column
    new = pa.table({"path": ["/in/2.png"], "score": pa.array([0.5], pa.float32()),
                    "real_threshold": pa.array([0.3], pa.float64())})
    pq.write_table(new, tmp_path / "part-new-1.parquet")

    done, torn, _ = scoring.scan_parts(str(tmp_path))
    rows = {r["path"]: r["real_threshold"] for r in read_scores(str(tmp_path)).to_pylist()}

    assert sorted(done.to_pylist()) == ["/in/1.png", "/in/2.png"] and not torn  # a resumed run skips both
    assert rows == {"/in/1.png": None, "/in/2.png": 0.3}
    (tmp_path / "part-new-1.parquet").unlink()  # only old parts: the column is there, null, all the same
    assert read_scores(str(tmp_path)).column("real_threshold").to_pylist() == [None]


def test_read_scores_keeps_one_row_per_path_the_latest(tmp_path):
    _write_part(tmp_path, "part-a-1.parquet", ["/in/1.png", "/in/2.png"], minutes=0)
    _write_part(tmp_path, "part-b-1.parquet", ["/in/2.png"], minutes=5)
    rows = read_scores(str(tmp_path)).sort_by("path").to_pylist()
    assert [r["path"] for r in rows] == ["/in/1.png", "/in/2.png"]
    assert rows[1]["scored_at"].minute == 5


# ----------------------------------------------------------------------------------------- CLI table, no Ray


def score_cli(argv: list[str]) -> int:
    """`mpft score ...` as a user runs it."""
    from jobs import cli

    return cli.main(["score", *argv])


def test_cli_prints_a_table_for_a_local_folder_without_ray(checkpoint, corpus, capsys, monkeypatch):
    import ray

    from pipelines import runtime

    def no_ray(*args, **kwargs):
        raise AssertionError("the table path must not start or join Ray")

    # Other tests may have a session Ray running, so check that this path never asks for one.
    monkeypatch.setattr(runtime, "init_ray", no_ray)
    monkeypatch.setattr(ray, "init", no_ray)
    root, expected = corpus
    code = score_cli(["--model", str(checkpoint), "--input", str(root), "--max-pixels", str(BAD_CORPUS_MAX_PIXELS)])
    printed = capsys.readouterr().out.splitlines()

    assert code == 0
    assert printed[0].split() == ["path", "score", "verdict", "error"]
    body = {line.split()[0]: line for line in printed[2:]}
    assert set(body) == {str(Path(p).relative_to(root)) for p in expected}
    for name in BAD_CORPUS_FAILURES:
        assert body[name].split()[1] == "error"
    assert body["more/000.png"].split()[2] in ("generated", "real")


def test_cli_refuses_a_large_folder_without_output(checkpoint, corpus):
    with pytest.raises(SystemExit, match="pass --output"):
        score_cli(["--model", str(checkpoint), "--input", str(corpus[0]), "--table-max", "3"])


def test_score_and_evaluate_take_the_same_resource_flags_with_the_dataclass_defaults():
    import argparse
    from dataclasses import fields

    from jobs import common, evaluate_cmd, score_cmd

    chosen = ScoringResources(batch_size=8, num_actors=3, actor_cpus=0.25, torch_threads=2, use_gpu=True,
                              decode_cpus=0.75, max_pixels=1000, rows_per_block=16, max_tasks_in_flight_per_actor=4,
                              buffer_mib=0)
    assert all(getattr(chosen, f.name) != getattr(ScoringResources(), f.name) for f in fields(ScoringResources))
    flags = ["--batch-size", "8", "--num-actors", "3", "--actor-cpus", "0.25", "--torch-threads", "2", "--gpu",
             "--decode-cpus", "0.75", "--max-pixels", "1000", "--rows-per-block", "16",
             "--max-tasks-in-flight-per-actor", "4", "--buffer-mib", "0"]
    for module, required in ((score_cmd, ["--model", "m", "--input", "i"]),
                             (evaluate_cmd, ["--model", "m", "--source", "s"])):
        parser = argparse.ArgumentParser()
        module.add_arguments(parser)
        assert common.resources_from_args(parser.parse_args(required)) == ScoringResources()
        assert common.resources_from_args(parser.parse_args(required + flags)) == chosen


def test_the_score_and_evaluate_commands_load_without_ray_mlflow_or_torch():
    """`mpft --help` imports every command module: these two must not pay for the heavy stack."""
    probe = subprocess.run([sys.executable, "-c", "import sys, jobs.score_cmd, jobs.evaluate_cmd; "
                            "print(sorted(m for m in ('ray', 'mlflow', 'torch') if m in sys.modules))"],
                           cwd=REPO, capture_output=True, text=True, timeout=120)
    assert probe.stdout.strip() == "[]", probe.stderr[-3000:]


# ---------------------------------------------------------------------------------------------- the Ray job


@pytest.mark.slow
@pytest.mark.timeout(180)
def test_every_input_appears_exactly_once_and_a_rerun_adds_nothing(ray_local, model, corpus, tmp_path):
    root, expected = corpus
    out = tmp_path / "scores"
    # A tight object-store cap (a few blocks of crops): the pipeline must still drain, not stall on backpressure.
    tight = _job(root, out, resources=_resources(buffer_mib=1))

    first = run_scoring(tight, model)
    rows = _assert_exactly_once(out, expected)
    assert set(rows.column("real_threshold").to_pylist()) == {THRESHOLD}
    second = run_scoring(_job(root, out), model)

    assert (first.n_inputs, first.n_errors, first.n_scored) == (len(expected), len(BAD_CORPUS_FAILURES),
                                                                 len(expected) - len(BAD_CORPUS_FAILURES))
    assert second.n_skipped_already_scored == len(expected) and second.n_written == 0
    assert _all_rows(out).num_rows == rows.num_rows
    assert all(Path(p).name.startswith(f"part-{first.run_id}-") for p in scoring.list_part_files(str(out)))


@pytest.mark.slow
@pytest.mark.timeout(180)
def test_decoding_inside_the_actors_gives_the_same_rows_and_errors(ray_local, model, corpus, tmp_path):
    root, expected = corpus
    two_stage, one_stage = tmp_path / "two-stage", tmp_path / "one-stage"

    run_scoring(_job(root, two_stage), model)
    summary = run_scoring(_job(root, one_stage, decode_in_actor=True), model)

    rows = _assert_exactly_once(one_stage, expected)
    reference = _all_rows(two_stage).sort_by("path")
    assert summary.n_errors == len(BAD_CORPUS_FAILURES)
    assert rows.sort_by("path").column("error").to_pylist() == reference.column("error").to_pylist()
    np.testing.assert_allclose(rows.sort_by("path").column("score").to_numpy(zero_copy_only=False),
                               reference.column("score").to_numpy(zero_copy_only=False), rtol=1e-5)


@pytest.mark.timeout(120)
def test_the_buffer_cap_applies_to_that_scoring_pass_only(ray_local, model, corpus):
    import ray.data

    manifest = scoring.input_manifest(scoring.ScoreJob(model_ref="unused", input_uri=str(corpus[0]), output_uri="-"))
    ds = scoring.scored_dataset(ray.data.from_arrow(manifest), {}, _resources(buffer_mib=3),
                                n_inputs=manifest.num_rows)

    assert ds.context.execution_options.resource_limits.object_store_memory == 3 * 1024 * 1024
    assert ray.data.DataContext.get_current().execution_options.resource_limits.object_store_memory == float("inf")


@pytest.mark.timeout(60)
def test_an_unset_actor_count_starts_one_replica_per_core_or_thread_group(ray_local):
    import ray

    cpus = int(ray.cluster_resources()["CPU"])
    assert scoring.actor_pool_size(ScoringResources(num_actors=0)) == cpus
    assert scoring.actor_pool_size(ScoringResources(num_actors=0, torch_threads=2)) == max(1, cpus // 2)
    assert scoring.actor_pool_size(ScoringResources(num_actors=3)) == 3
    assert scoring.actor_pool_size(ScoringResources(num_actors=0), n_rows=1) == 1  # a small input starts one actor
    assert scoring.actor_pool_size(ScoringResources(num_actors=3), n_rows=1) == 3  # an explicit count is kept


@pytest.mark.timeout(60)
def test_an_actor_pool_that_leaves_no_cpu_for_decoding_is_warned_about(ray_local, caplog):
    import ray

    cpus = ray.cluster_resources()["CPU"]
    starving = ScoringResources(actor_cpus=cpus / 2, decode_cpus=0.5)  # 2 actors take every CPU
    fitting = ScoringResources(actor_cpus=cpus / 4, decode_cpus=0.5)
    with caplog.at_level("WARNING", logger="pipelines.scoring"):
        scoring.warn_if_decode_starves(fitting, 2, decodes_in_tasks=True)
        scoring.warn_if_decode_starves(starving, 2, decodes_in_tasks=False)  # the actors decode: nothing starves
        assert not caplog.records
        scoring.warn_if_decode_starves(starving, 2, decodes_in_tasks=True)
    assert len(caplog.records) == 1 and "waits for CPUs forever" in caplog.text


SLOW_RUN = """
import sys, time
import ray
from pipelines.scoring import DetectorScorer, ScoreJob, run_scoring
from pipelines.scoring_spec import ResolvedModel, ScoringResources

class SlowScorer(DetectorScorer):
    def __call__(self, batch):
        time.sleep(0.4)  # slow enough that the test can kill this driver half-way
        return super().__call__(batch)

address, checkpoint, input_uri, output_uri, max_pixels = sys.argv[1:]
ray.init(address=address)
resources = ScoringResources(batch_size=2, rows_per_block=2, max_pixels=int(max_pixels), num_actors=1, actor_cpus=0.5,
                             decode_cpus=0.25)
job = ScoreJob(model_ref=checkpoint, input_uri=input_uri, output_uri=output_uri, resources=resources,
               rows_per_output_file=1)
run_scoring(job, ResolvedModel(checkpoint_dir=checkpoint, uri=checkpoint), scorer_cls=SlowScorer)
print("FINISHED", flush=True)
"""


def _wait_until_parts_stop_changing(out: Path, quiet_seconds: float = 2.0, timeout: float = 60.0) -> None:
    """Block until no part under ``out`` is created, removed or resized for ``quiet_seconds``."""
    def snapshot():
        return {p.name: p.stat().st_size for p in out.glob("*.parquet")}

    deadline = time.monotonic() + timeout
    last, quiet_since = snapshot(), time.monotonic()
    while time.monotonic() - quiet_since < quiet_seconds:
        assert time.monotonic() < deadline, "the killed run's workers kept writing"
        time.sleep(0.2)
        now = snapshot()
        if now != last:
            last, quiet_since = now, time.monotonic()


@pytest.mark.slow
@pytest.mark.timeout(240)
def test_rerun_after_a_killed_driver_completes_without_duplicates(ray_local, model, checkpoint, corpus, tmp_path):
    import ray

    root, expected = corpus
    out = tmp_path / "scores"
    out.mkdir()
    script = tmp_path / "slow_run.py"
    script.write_text(SLOW_RUN)
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    driver = subprocess.Popen([sys.executable, str(script), ray.get_runtime_context().gcs_address, str(checkpoint),
                               str(root), str(out), str(BAD_CORPUS_MAX_PIXELS)], env=env, cwd=REPO,
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        deadline = time.monotonic() + 150
        while len(scoring.list_part_files(str(out))) < 2:  # some rows committed, most not yet
            assert driver.poll() is None, driver.stdout.read().decode()[-3000:]
            assert time.monotonic() < deadline, "the first run never wrote a part"
            time.sleep(0.2)
        os.killpg(driver.pid, signal.SIGKILL)
    finally:
        driver.wait(timeout=30)
    _wait_until_parts_stop_changing(out)  # Ray kills the dead driver's write tasks a moment after the driver
    # The kill may have torn a part itself (on local disk pyarrow writes in place); make sure there is one.
    (out / "part-crashed-0-0.parquet").write_bytes(b"PAR1 half a file")
    done_before, torn_before, _ = scoring.scan_parts(str(out))
    assert 0 < len(done_before) < len(expected)

    summary = run_scoring(_job(root, out), model)

    assert summary.n_skipped_already_scored == len(done_before)
    assert summary.n_torn_parts_removed == len(torn_before) >= 1
    _assert_exactly_once(out, expected)


@pytest.mark.slow
@pytest.mark.timeout(240)
def test_killing_a_scoring_actor_mid_run_loses_no_rows(ray_local, model, corpus, tmp_path):
    import ray

    @ray.remote(num_cpus=0)
    class Registry:
        """Collects scoring-actor handles and batch counts, so the test can aim ray.kill at a busy actor."""

        def __init__(self):
            self.handles, self.started, self.done = [], 0, 0

        def register(self, handle):
            self.handles.append(handle)

        def batch_started(self):
            self.started += 1

        def batch_done(self):
            self.done += 1

        def state(self):
            return self.handles, self.started, self.done

    registry_name = f"registry-{os.getpid()}"
    registry = Registry.options(name=registry_name).remote()

    class ReportingScorer(DetectorScorer):
        def __init__(self, *args, **kwargs):
            super().__init__(*args, **kwargs)
            self.registry = ray.get_actor(registry_name)
            ray.get(self.registry.register.remote(ray.get_runtime_context().current_actor))

        def __call__(self, batch):
            ray.get(self.registry.batch_started.remote())
            time.sleep(0.3)
            out = super().__call__(batch)
            ray.get(self.registry.batch_done.remote())
            return out

    root, expected = corpus
    out = tmp_path / "scores"
    killed = {}

    def kill_after_first_batches():
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            handles, started, done = ray.get(registry.state.remote())
            if handles and done >= 1 and started > done:  # mid-batch
                ray.kill(handles[0], no_restart=False)  # Ray restarts it; its in-flight batches must be retried
                killed["at_batch"] = done
                return
            time.sleep(0.05)

    import threading

    killer = threading.Thread(target=kill_after_first_batches, daemon=True)
    killer.start()
    summary = run_scoring(_job(root, out, resources=_resources(batch_size=2, rows_per_block=2)), model,
                          scorer_cls=ReportingScorer)
    killer.join(timeout=5)

    handles, started, done = ray.get(registry.state.remote())
    assert killed, "the actor was never killed"
    assert len(handles) >= 2, "the killed actor was not replaced"
    assert started > done, "no batch was interrupted"
    assert summary.n_written == len(expected)
    _assert_exactly_once(out, expected)
    ray.kill(registry)


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_scoring_from_s3_to_s3_with_a_registered_model_logs_a_summary(ray_local, s3_server, mlflow_server, checkpoint,
                                                                      corpus, tmp_path):
    import mlflow

    from jobs import tracking
    from jobs.score import SCORING_EXPERIMENT, run_score_job

    root, expected = corpus
    s3_server.create_bucket("score-in")
    s3_server.create_bucket("score-out")
    s3_server.upload_dir(root, "s3://score-in/corpus")
    cfg = s3_server.storage_config()
    expected_s3 = {"s3://score-in/corpus/" + str(Path(p).relative_to(root)): ok for p, ok in expected.items()}

    tracking.set_tracking(mlflow_server.tracking_uri)
    with tracking.start_run("mpft-test-registry", "register-tiny"):
        version = tracking.register_model(tracking.log_detector_model(str(checkpoint)), "tiny-scorer")
    tracking.set_alias("tiny-scorer", "challenger", version)

    model = tracking.resolve_model("models:/tiny-scorer@challenger", cfg)
    job = _job("s3://score-in/corpus", "s3://score-out/run1", storage=cfg, model_ref="models:/tiny-scorer@challenger")
    summary = run_score_job(job, model, tracking_uri=mlflow_server.tracking_uri)

    rows = read_scores("s3://score-out/run1", cfg)
    assert sorted(rows.column("path").to_pylist()) == sorted(expected_s3)
    assert len(scoring.list_part_files("s3://score-out/run1", cfg)) >= 1
    assert {(r["model_name"], r["model_version"]) for r in rows.select(["model_name", "model_version"]).to_pylist()} \
        == {("tiny-scorer", str(version))}
    failed = {p for p, ok in expected_s3.items() if not ok}
    assert {r["path"] for r in rows.to_pylist() if r["error"] is not None} == failed
    assert summary.n_errors == len(failed)

    runs = mlflow.search_runs(experiment_names=[SCORING_EXPERIMENT], output_format="list")
    logged = next(r for r in runs if r.data.params.get("scoring_run_id") == job.run_id)
    assert logged.data.metrics["n_inputs"] == len(expected_s3)
    assert logged.data.metrics["n_errors"] == len(failed)
    assert logged.data.params["output"] == "s3://score-out/run1"
    assert (logged.data.params["model_uri"], logged.data.params["model_name"]) == (f"models:/tiny-scorer/{version}",
                                                                                   "tiny-scorer")


# ------------------------------------------------------------------------------- one model version per output


def _legacy_part(folder: Path, paths: list[str], model_uri: str, name: str | None, version: str | None) -> None:
    """A part naming its model, as written before outputs had a record: the reference as typed, and the version it
    pointed to (null for a checkpoint path)."""
    n = len(paths)
    pq.write_table(pa.table({"path": paths, "model_uri": pa.array([model_uri] * n, pa.string()),
                             "model_name": pa.array([name] * n, pa.string()),
                             "model_version": pa.array([version] * n, pa.string())}),
                   folder / "part-legacy-000000-0.parquet")


def _sha256_of(checkpoint_dir: Path) -> dict[str, str]:
    import hashlib

    return {name: hashlib.sha256((Path(checkpoint_dir) / name).read_bytes()).hexdigest()
            for name in ("model.safetensors", "mpft.json")}


def _record(folder: Path, model_ref: str, model_uri: str, name: str | None, version: str | None,
            sha256: dict[str, str]) -> None:
    """The record a first run on ``folder`` would have written."""
    folder.mkdir(parents=True, exist_ok=True)
    record = scoring.OutputRecord(model_ref=model_ref, model_uri=model_uri, model_name=name, model_version=version,
                                  checkpoint_sha256=sha256, run_id="first", started_at="2026-01-01T00:00:00+00:00")
    (folder / scoring.OUTPUT_RECORD).write_text(record.to_json())


def _snapshot(folder: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(folder.iterdir())}


def test_a_complete_output_reruns_as_a_no_op_without_writing_a_record(model, corpus, tmp_path):
    root, expected = corpus
    _legacy_part(tmp_path, sorted(expected), "models:/tiny@champion", "tiny", model.version)

    summary = run_scoring(_job(root, tmp_path, model_ref="models:/tiny@champion"), model)  # all done: no Ray needed

    assert summary.n_skipped_already_scored == len(expected) and summary.n_written == 0
    assert summary.model == model
    # Nothing is written, so an output on storage this job may only read still reruns.
    assert scoring.read_output_record(str(tmp_path)) is None


def test_an_output_from_before_records_refuses_the_same_alias_at_another_version(model, corpus, tmp_path):
    root, expected = corpus
    _legacy_part(tmp_path, sorted(expected), "models:/tiny@champion", "tiny", "2")
    before = _snapshot(tmp_path)

    with pytest.raises(scoring.OutputModelMismatch) as refused:
        run_scoring(_job(root, tmp_path, model_ref="models:/tiny@champion"), model)

    assert str(refused.value) == (f"{tmp_path} already holds scores from models:/tiny@champion (tiny version 2), not "
                                  f"{model.uri}: rerun with --model models:/tiny/2 to continue it, or use a fresh "
                                  "--output")
    assert _snapshot(tmp_path) == before


def test_a_malformed_checkpoint_is_refused_before_the_output_is_claimed(checkpoint, corpus, tmp_path):
    import shutil

    broken = tmp_path / "broken"
    shutil.copytree(checkpoint, broken)
    (broken / "mpft.json").write_text("{not json")
    out = tmp_path / "scores"

    with pytest.raises(ValueError, match="not valid JSON"):
        run_scoring(_job(corpus[0], out, model_ref=str(broken)),
                    ResolvedModel(checkpoint_dir=str(broken), uri=str(broken)))

    assert not out.exists() or not any(out.iterdir())


def test_an_output_that_cannot_take_the_record_is_refused_in_one_line(checkpoint, corpus, tmp_path, monkeypatch):
    from pipelines import runtime, storage

    def read_only(uri, data, cfg=None):
        raise PermissionError(13, "Permission denied", uri)

    monkeypatch.setattr(storage, "write_atomic", read_only)
    monkeypatch.setattr(runtime, "init_ray", lambda *args, **kwargs: None)  # refused before Ray is needed
    out = tmp_path / "scores"

    with pytest.raises(SystemExit) as refused:
        _score_cli_job(str(checkpoint), corpus[0], out)

    message = str(refused.value)
    assert message.startswith(f"cannot write {out / scoring.OUTPUT_RECORD} (") and "\n" not in message
    assert not scoring.list_part_files(str(out))


def test_a_rerun_with_a_relative_checkpoint_path_uses_the_checkpoint_where_it_runs(corpus, tmp_path, monkeypatch):
    from jobs.score import resolve_model_for_output

    root, expected = corpus
    first = tiny_checkpoint(tmp_path / "a" / "ckpt", threshold=THRESHOLD, seed=0)
    second = tiny_checkpoint(tmp_path / "b" / "ckpt", threshold=THRESHOLD, seed=1)
    out = tmp_path / "scores"
    _record(out, "ckpt", str(first), None, None, _sha256_of(first))  # started from a/ as `--model ckpt`
    _legacy_part(out, sorted(expected), str(first), None, None)
    before = _snapshot(out)

    monkeypatch.chdir(tmp_path / "b")
    model = resolve_model_for_output("ckpt", str(out))

    assert Path(model.checkpoint_dir).resolve() == second.resolve()
    with pytest.raises(scoring.OutputModelMismatch, match="but it now has weights sha256"):
        run_scoring(_job(root, out, model_ref="ckpt"), model)
    assert _snapshot(out) == before


@pytest.mark.timeout(120)
def test_a_resumed_output_is_summarised_and_logged_under_its_recorded_identity(mlflow_server, checkpoint, corpus,
                                                                               tmp_path):
    import mlflow

    from jobs import tracking
    from jobs.score import log_summary

    root, expected = corpus
    _record(tmp_path, "models:/tiny@champion", "models:/tiny/3", "tiny", "3", _sha256_of(checkpoint))
    _legacy_part(tmp_path, sorted(expected), "models:/tiny/3", "tiny", "3")
    job = _job(root, tmp_path, model_ref=str(checkpoint))  # the same weights, as a local folder

    summary = run_scoring(job, ResolvedModel(checkpoint_dir=str(checkpoint), uri=str(checkpoint)))  # all done: no Ray

    assert summary.model == ResolvedModel(checkpoint_dir=str(checkpoint), uri="models:/tiny/3", name="tiny",
                                          version="3")
    tracking.set_tracking(mlflow_server.tracking_uri)
    params = mlflow.get_run(log_summary(job, summary)).data.params
    assert (params["model_uri"], params["model_name"], params["model_version"]) == ("models:/tiny/3", "tiny", "3")


@pytest.fixture(scope="module")
def two_versions(mlflow_server, checkpoint, tmp_path_factory) -> str:
    """A registered model whose version 1 is ``checkpoint`` and version 2 other weights; returns its name."""
    from jobs import tracking

    tracking.set_tracking(mlflow_server.tracking_uri)
    name = f"tiny-resume-{os.getpid()}-{time.time_ns() % 10**8}"
    other = tiny_checkpoint(tmp_path_factory.mktemp("v2") / "model", threshold=THRESHOLD, seed=1)
    for version, folder in (("1", checkpoint), ("2", other)):
        with tracking.start_run("mpft-test-registry", f"register-{name}-{version}"):
            assert tracking.register_model(tracking.log_detector_model(str(folder)), name) == version
    return name


def _score_cli_job(model_ref: str, input_uri, output, tracking_uri: str | None = None) -> int:
    argv = ["--model", model_ref, "--input", str(input_uri), "--output", str(output), "--batch-size", "8",
            "--rows-per-block", "8", "--num-actors", "1", "--actor-cpus", "0.5", "--decode-cpus", "0.25",
            "--max-pixels", str(BAD_CORPUS_MAX_PIXELS)]
    return score_cli(argv + (["--tracking-uri", tracking_uri] if tracking_uri else []))


def _start_output_on_a_subfolder(model_ref: str, corpus, output, tracking_uri: str | None = None) -> None:
    """A first run that scored only some inputs: what a crash leaves behind, as far as the next run can tell."""
    root, expected = corpus
    assert _score_cli_job(model_ref, root / "more", output, tracking_uri) == 0
    assert 0 < _all_rows(output).num_rows < len(expected)


@pytest.mark.slow
@pytest.mark.timeout(240)
def test_a_rerun_after_the_alias_moved_continues_with_the_version_the_output_started_with(
        ray_local, mlflow_server, two_versions, corpus, tmp_path, caplog):
    from jobs import tracking

    root, expected = corpus
    out = tmp_path / "scores"
    ref = f"models:/{two_versions}@champion"
    tracking.set_alias(two_versions, "champion", "1")
    _start_output_on_a_subfolder(ref, corpus, out, mlflow_server.tracking_uri)

    tracking.set_alias(two_versions, "champion", "2")
    with caplog.at_level("WARNING", logger="jobs.score"):
        assert _score_cli_job(ref, root, out, mlflow_server.tracking_uri) == 0

    rows = _assert_exactly_once(out, expected)
    assert set(rows.column("model_version").to_pylist()) == {"1"}
    assert set(rows.column("model_uri").to_pylist()) == {f"models:/{two_versions}/1"}
    assert f"models:/{two_versions}/2" in caplog.text and "continuing with version 1" in caplog.text


@pytest.mark.slow
@pytest.mark.timeout(240)
def test_a_rerun_with_another_version_is_refused_and_leaves_the_output_untouched(
        ray_local, mlflow_server, two_versions, corpus, tmp_path):
    from jobs import tracking

    root, _ = corpus
    out = tmp_path / "scores"
    tracking.set_alias(two_versions, "champion", "1")
    _start_output_on_a_subfolder(f"models:/{two_versions}@champion", corpus, out, mlflow_server.tracking_uri)
    before = _snapshot(out)

    with pytest.raises(SystemExit) as refused:
        _score_cli_job(f"models:/{two_versions}/2", root, out, mlflow_server.tracking_uri)

    assert str(refused.value) == (f"{out} was started with models:/{two_versions}@champion = version 1; rerun with "
                                  "that reference (continues with version 1) or use a fresh --output")
    assert _snapshot(out) == before


@pytest.mark.slow
@pytest.mark.timeout(240)
def test_another_reference_to_the_same_weights_continues_under_the_recorded_identity(
        ray_local, mlflow_server, two_versions, checkpoint, corpus, tmp_path):
    root, expected = corpus
    out = tmp_path / "scores"
    _start_output_on_a_subfolder(f"models:/{two_versions}/1", corpus, out, mlflow_server.tracking_uri)

    assert _score_cli_job(str(checkpoint), root, out) == 0  # version 1's weights, as a local folder

    rows = _assert_exactly_once(out, expected)
    assert set(rows.column("model_uri").to_pylist()) == {f"models:/{two_versions}/1"}
    assert set(rows.column("model_version").to_pylist()) == {"1"}


@pytest.mark.slow
@pytest.mark.timeout(240)
def test_a_local_checkpoint_overwritten_between_runs_is_refused(ray_local, corpus, tmp_path):
    root, _ = corpus
    out = tmp_path / "scores"
    folder = tiny_checkpoint(tmp_path / "ckpt", threshold=THRESHOLD, seed=0)
    _start_output_on_a_subfolder(str(folder), corpus, out)
    before = _snapshot(out)

    tiny_checkpoint(folder, threshold=THRESHOLD, seed=1)  # retrained in place
    refusal = (f"^{re.escape(str(out))} was started with {re.escape(str(folder))} = weights sha256 [0-9a-f]{{12}}, "
               "but it now has weights sha256 [0-9a-f]{12}; "
               "score with the original checkpoint or use a fresh --output$")
    with pytest.raises(SystemExit, match=refusal):
        _score_cli_job(str(folder), root, out)

    assert _snapshot(out) == before


@pytest.mark.timeout(120)
def test_an_alias_rerun_is_pinned_to_the_recorded_version_only_once_the_output_holds_scores(
        mlflow_server, two_versions, tmp_path):
    from jobs import tracking
    from jobs.score import resolve_model_for_output

    ref = f"models:/{two_versions}@champion"
    tracking.set_alias(two_versions, "champion", "2")
    _record(tmp_path, ref, f"models:/{two_versions}/1", two_versions, "1", {"model.safetensors": "0" * 64})

    assert resolve_model_for_output(ref, str(tmp_path)).version == "2"  # nothing scored: the alias as it is now
    _legacy_part(tmp_path, ["/in/1.png"], f"models:/{two_versions}/1", two_versions, "1")
    assert resolve_model_for_output(ref, str(tmp_path)).version == "1"


@pytest.mark.slow
@pytest.mark.timeout(180)
def test_an_output_without_scores_is_taken_over_by_another_model(ray_local, model, checkpoint, corpus, tmp_path,
                                                                  caplog):
    """A record whose model never scored a row (refused when loaded, or a mistaken --model stopped at once) does
    not bind the output."""
    root, _ = corpus
    _record(tmp_path, "models:/mistake@champion", "models:/mistake/1", "mistake", "1",
            {"model.safetensors": "0" * 64, "mpft.json": "0" * 64})
    (tmp_path / "part-crashed-0-0.parquet").write_bytes(b"PAR1 half a file")  # torn: it holds no scores either

    with caplog.at_level("WARNING", logger="pipelines.scoring"):
        summary = run_scoring(_job(root / "more" / "000.png", tmp_path, model_ref="tiny"), model)

    assert summary.n_written == 1 and summary.model == model
    assert _all_rows(tmp_path).column("model_uri").to_pylist() == [model.uri]
    record = scoring.read_output_record(str(tmp_path))
    assert (record.model_ref, record.model_uri, record.checkpoint_sha256) == ("tiny", model.uri,
                                                                              _sha256_of(checkpoint))
    assert "models:/mistake@champion" in caplog.text and "holds no scores" in caplog.text


# ------------------------------------------------------------------------------------ one job at a time per output


def _lease_path(output: Path) -> Path:
    return output / scoring.OUTPUT_LEASE


@pytest.mark.slow
@pytest.mark.timeout(240)
def test_a_second_job_on_a_running_output_is_refused_and_the_first_finishes_intact(ray_local, model, corpus,
                                                                                 tmp_path):
    import threading

    class SlowScorer(DetectorScorer):
        def __call__(self, batch):
            time.sleep(0.3)  # keeps the first job running while the second one starts
            return super().__call__(batch)

    root, corpus_files = corpus
    expected = {path: ok for path, ok in corpus_files.items() if Path(path).parent == root / "more"}  # a dozen
    out = tmp_path / "scores"
    first_job = _job(root / "more", out, resources=_resources(batch_size=2, rows_per_block=2), rows_per_output_file=1)
    first: dict = {}
    runner = threading.Thread(target=lambda: first.update(summary=run_scoring(first_job, model,
                                                                              scorer_cls=SlowScorer)), daemon=True)
    runner.start()
    deadline = time.monotonic() + 150
    while not scoring.list_part_files(str(out)):  # the first job is writing
        assert runner.is_alive() and time.monotonic() < deadline, "the first job never wrote a part"
        time.sleep(0.1)
    parts_before = set(scoring.list_part_files(str(out)))

    with pytest.raises(scoring.OutputLeased) as refused:
        run_scoring(_job(root / "more", out), model)
    runner.join(timeout=180)

    assert first_job.run_id in str(refused.value) and "expires at" in str(refused.value)
    assert parts_before <= set(scoring.list_part_files(str(out))), "the refused job deleted parts"
    assert first["summary"].n_written == len(expected)
    _assert_exactly_once(out, expected)
    assert not _lease_path(out).exists(), "the lease outlived its job"


def test_the_lease_is_released_when_a_job_ends_and_when_it_fails(model, corpus, tmp_path):
    root, expected = corpus
    done, refused = tmp_path / "done", tmp_path / "refused"
    done.mkdir()
    refused.mkdir()
    _legacy_part(done, sorted(expected), "models:/tiny@champion", "tiny", model.version)
    _legacy_part(refused, ["/in/1.png"], "models:/other/1", "other", "1")

    run_scoring(_job(root, done, model_ref="models:/tiny@champion"), model)  # all scored: ends without Ray
    with pytest.raises(scoring.OutputModelMismatch):
        run_scoring(_job(root, refused), model)

    assert not _lease_path(done).exists() and not _lease_path(refused).exists()
    run_scoring(_job(root, done, model_ref="models:/tiny@champion"), model)  # so a rerun is not locked out
