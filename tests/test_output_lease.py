"""One scoring job at a time per output: the lease that keeps a second job from deleting the first one's parts.

The lease functions run here directly on a local folder and on the local S3 server (SeaweedFS); the jobs that take
them (refused, released on success and failure) are in test_scoring.py.
"""

from __future__ import annotations

import json
import subprocess
import sys
import time
import uuid
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from pipelines import scoring, storage
from pipelines.scoring import LeaseSettings, OutputLeased, acquire_output_lease
from pipelines.store_errors import StoreUnavailable

REPO = Path(__file__).resolve().parents[1]
# Long enough that no test waits for a lease to run out unless it means to.
LONG = LeaseSettings(ttl_s=300.0, renew_every_s=100.0, settle_s=0.0)


@pytest.fixture(params=["local", "s3"])
def output(request, tmp_path) -> tuple[str, object]:
    """(output URI, storage config) on a local folder or an S3 prefix of its own."""
    if request.param == "local":
        return str(tmp_path / "scores"), None
    server = request.getfixturevalue("s3_server")
    bucket = f"lease-{uuid.uuid4().hex[:10]}"
    server.create_bucket(bucket)
    return f"s3://{bucket}/scores", server.storage_config()


def _lease_on(output_uri: str, cfg) -> dict | None:
    uri = storage.join(output_uri, scoring.OUTPUT_LEASE)
    return json.loads(storage.read_bytes(uri, cfg)) if storage.exists(uri, cfg) else None


@pytest.mark.timeout(120)
def test_a_second_job_is_refused_by_name_while_the_first_holds_the_lease(output):
    output_uri, cfg = output
    first = acquire_output_lease(output_uri, cfg, "run-first", LONG)

    with pytest.raises(OutputLeased) as refused:
        acquire_output_lease(output_uri, cfg, "run-second", LONG)

    message = str(refused.value)
    assert "\n" not in message
    assert "run-first" in message and f"pid {first.lease.pid}" in message and first.lease.host in message
    assert "expires at" in message and "use another --output" in message
    first.release()
    assert _lease_on(output_uri, cfg) is None
    acquire_output_lease(output_uri, cfg, "run-second", LONG).release()  # free again once released


@pytest.mark.timeout(120)
def test_an_expired_lease_is_taken_over_with_a_warning_and_its_old_holder_cannot_release_it(output, caplog):
    output_uri, cfg = output
    stalled = acquire_output_lease(output_uri, cfg, "run-stalled",
                                   LeaseSettings(ttl_s=0.5, renew_every_s=100.0, settle_s=0.0))
    time.sleep(0.8)  # the holder never renewed: as if it had hung

    with caplog.at_level("WARNING", logger="pipelines.scoring"):
        taker = acquire_output_lease(output_uri, cfg, "run-taker", LONG)

    assert "taking over" in caplog.text and "run-stalled" in caplog.text and "expired" in caplog.text
    assert _lease_on(output_uri, cfg)["run_id"] == "run-taker"
    assert not stalled.renew() and stalled.lost  # its next heartbeat finds the lease gone to another job
    stalled.release()
    assert _lease_on(output_uri, cfg)["run_id"] == "run-taker"
    taker.release()
    assert _lease_on(output_uri, cfg) is None


@pytest.mark.timeout(120)
def test_a_job_whose_lease_was_taken_over_is_stopped_in_one_line_and_leaves_the_new_holders_lease(output):
    output_uri, cfg = output
    stalled = acquire_output_lease(output_uri, cfg, "run-stalled",
                                   LeaseSettings(ttl_s=0.5, renew_every_s=100.0, settle_s=0.0))
    stalled.check()  # its own while the lease lasts
    time.sleep(0.8)  # the holder never renewed: as if it had hung
    taker = acquire_output_lease(output_uri, cfg, "run-taker", LONG)

    with pytest.raises(OutputLeased) as stopped:
        stalled.check()

    message = str(stopped.value)
    assert "\n" not in message and "run-stalled lost its lease" in message and "rerun" in message
    stalled.release()
    assert _lease_on(output_uri, cfg)["run_id"] == "run-taker"
    taker.check()
    taker.release()


@pytest.fixture
def own_s3_server(tmp_path):
    """A SeaweedFS server of this test alone, with a bucket ``scores``: the test stops or freezes it."""
    from infra.local_stack.s3 import LocalS3Server

    server = LocalS3Server(root=tmp_path / "s3").start()
    try:
        server.create_bucket("scores")
        yield server
    finally:
        server.stop()


@pytest.mark.timeout(180)
def test_renewals_failing_past_the_ttl_lose_the_lease(own_s3_server):
    server = own_s3_server
    holder = acquire_output_lease("s3://scores/out", server.storage_config(), "run-cut-off",
                                  LeaseSettings(ttl_s=2.0, renew_every_s=0.2, settle_s=0.0))
    server.stop(remove_root=False)  # every renewal fails from now on
    deadline = time.monotonic() + 90
    while not holder.lost:
        assert time.monotonic() < deadline, "renewals failed past the TTL but the lease was not marked lost"
        time.sleep(0.2)

    with pytest.raises(OutputLeased, match="run-cut-off lost its lease"):
        holder.check()
    holder.release()


@pytest.mark.timeout(180)
def test_a_renewal_hanging_on_the_store_does_not_hold_up_release(own_s3_server, caplog):
    import os
    import signal

    server, cfg = own_s3_server, own_s3_server.storage_config()
    holder = acquire_output_lease("s3://scores/out", cfg, "run-hung", LeaseSettings(ttl_s=300.0, renew_every_s=0.2,
                                                                                  settle_s=0.0))
    os.kill(server.pid, signal.SIGSTOP)  # the store accepts connections but never answers: a renewal hangs
    try:
        time.sleep(1.0)  # a renewal is now in flight
        started = time.monotonic()
        with caplog.at_level("WARNING", logger="pipelines.scoring"):
            holder.release()
        took = time.monotonic() - started
    finally:
        os.kill(server.pid, signal.SIGCONT)
    assert took < 15, f"release waited {took:.0f} s on a hung renewal"
    assert "not releasing" in caplog.text and "still hanging" in caplog.text
    assert _lease_on("s3://scores/out", cfg)["run_id"] == "run-hung"  # left to lapse, not deleted mid-renewal


@pytest.mark.timeout(120)
def test_the_holder_renews_its_lease_so_it_never_lapses_while_the_job_runs(output):
    output_uri, cfg = output
    holder = acquire_output_lease(output_uri, cfg, "run-long", LeaseSettings(ttl_s=1.0, renew_every_s=0.2,
                                                                             settle_s=0.0))
    first_expiry = _lease_on(output_uri, cfg)["expires_at"]
    time.sleep(2.0)  # twice the TTL: only renewals keep it alive

    with pytest.raises(OutputLeased, match="run-long"):
        acquire_output_lease(output_uri, cfg, "run-next", LONG)
    assert _lease_on(output_uri, cfg)["expires_at"] > first_expiry
    holder.release()
    assert _lease_on(output_uri, cfg) is None


TAKE_LEASE_AND_DIE = """
import os, sys
from pipelines.scoring import LeaseSettings, acquire_output_lease
acquire_output_lease(sys.argv[1], None, "run-killed", LeaseSettings(ttl_s=3600, renew_every_s=3600, settle_s=0))
os._exit(0)  # dies holding it, as a killed driver would
"""


@pytest.mark.timeout(120)
def test_a_lease_whose_process_on_this_machine_has_exited_is_taken_over_at_once(tmp_path, caplog):
    output_uri = str(tmp_path / "scores")
    died = subprocess.run([sys.executable, "-c", TAKE_LEASE_AND_DIE, output_uri], cwd=REPO, capture_output=True,
                          text=True, timeout=90)
    assert died.returncode == 0, died.stderr[-3000:]
    assert _lease_on(output_uri, None)["run_id"] == "run-killed"  # an hour left on it

    with caplog.at_level("WARNING", logger="pipelines.scoring"):
        rerun = acquire_output_lease(output_uri, None, "run-rerun", LONG)

    assert "run-killed" in caplog.text and "has exited" in caplog.text
    rerun.release()


@pytest.mark.timeout(60)
def test_a_half_written_part_of_the_holder_is_left_alone_by_a_refused_job(tmp_path):
    """The race the lease exists for: the first job's part in progress looks torn to anyone scanning."""
    from pipelines.scoring import ScoreJob, run_scoring
    from pipelines.scoring_spec import ResolvedModel

    out = tmp_path / "scores"
    holder = acquire_output_lease(str(out), None, "run-first", LONG)
    in_progress = out / "part-run-first-0-000000-0.parquet"
    in_progress.write_bytes(b"PAR1 rows still being written")
    inputs = tmp_path / "in"
    inputs.mkdir()

    second = ScoreJob(model_ref="any", input_uri=str(inputs), output_uri=str(out), lease=LONG)
    with pytest.raises(OutputLeased, match="run-first"):
        run_scoring(second, ResolvedModel(checkpoint_dir=str(tmp_path / "none"), uri="any"))

    assert in_progress.read_bytes() == b"PAR1 rows still being written"
    holder.release()


@pytest.mark.timeout(60)
def test_an_output_this_job_may_not_write_is_read_without_a_lease(tmp_path, caplog):
    out = tmp_path / "scores"
    out.mkdir()
    out.chmod(0o555)
    try:
        with caplog.at_level("WARNING", logger="pipelines.scoring"):
            held = acquire_output_lease(str(out), None, "run-reader", LONG)
    finally:
        out.chmod(0o755)
    if held is not None:  # root writes anywhere: nothing to test
        held.release()
        pytest.skip("this user can write a read-only folder")
    assert "without a lease" in caplog.text and list(out.iterdir()) == []


@pytest.mark.timeout(180)
def test_a_store_failing_on_a_part_is_not_taken_for_a_torn_part(tmp_path):
    """A part on S3 is whole or absent, so a read that fails is the store's fault: the scan stops, deletes nothing."""
    from infra.local_stack.s3 import LocalS3Server

    server = LocalS3Server(root=tmp_path / "s3").start()
    try:
        server.create_bucket("scores")
        cfg = server.storage_config()
        fs, root = storage.resolve("s3://scores/out", cfg)
        for i in range(400):  # enough parts that reading them outlasts stopping the store
            pq.write_table(pa.table({"path": [f"/in/{i}.png"]}), f"{root}/part-a-{i:04d}-0.parquet", filesystem=fs)
        stopper = _stop_after(server, 0.3)
        with pytest.raises(StoreUnavailable):
            scoring.scan_parts("s3://scores/out", cfg)
        stopper.join()
        server.start()
        assert len(scoring.list_part_files("s3://scores/out", cfg)) == 400
    finally:
        server.stop()


def _stop_after(server, seconds: float):
    import threading

    def stop():
        time.sleep(seconds)
        server.stop(remove_root=False)

    thread = threading.Thread(target=stop, daemon=True)
    thread.start()
    return thread
