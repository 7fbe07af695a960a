"""What only a real object store makes meaningful: a SeaweedFS server that listens on loopback only and leaves
nothing behind, checks keys, keeps its data across a restart, and goes away in the middle of a scoring job.

A mock accepts any key and never goes down; these tests run against ``infra.local_stack.s3.LocalS3Server`` (a
``weed mini`` process) so that refused credentials and an outage reach PyArrow's S3 client, Ray's decode tasks and
the ``mpft`` command line as they would in production.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
import uuid
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from infra.local_stack.s3 import LocalS3Server
from pipelines import scoring, storage
from pipelines.scoring import ScoreJob, run_scoring
from pipelines.scoring_spec import ResolvedModel, ScoringResources
from pipelines.storage import StorageConfig
from pipelines.store_errors import StoreUnavailable, store_failure
from tests.helpers.images import fake_images, real_photo_crops
from tests.helpers.models import tiny_checkpoint

REPO = Path(__file__).resolve().parents[1]
N_IMAGES = 200  # enough that reading is still under way when the store goes down
IMAGE_PX = 36
REFUSALS = ("ACCESS_DENIED", "SIGNATURE_DOES_NOT_MATCH", "INVALID_ACCESS_KEY_ID")  # the store saying "no"
# Small batches and blocks and one actor: a 2-CPU Ray scoring a few hundred 36 px images.
SMALL = ScoringResources(batch_size=8, rows_per_block=8, num_actors=1, actor_cpus=0.5, decode_cpus=0.25)
SMALL_FLAGS = ["--batch-size", "8", "--rows-per-block", "8", "--num-actors", "1", "--actor-cpus", "0.5",
               "--decode-cpus", "0.25"]


# ------------------------------------------------------------------------------------------------------ fixtures


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory) -> Path:
    return tiny_checkpoint(tmp_path_factory.mktemp("ckpt") / "model", threshold=0.5, seed=0)


@pytest.fixture(scope="module")
def model(checkpoint) -> ResolvedModel:
    return ResolvedModel(checkpoint_dir=str(checkpoint), uri=str(checkpoint), name="tiny", version="1")


@pytest.fixture(scope="module")
def images(tmp_path_factory) -> Path:
    """A flat folder of ``N_IMAGES`` small PNGs, half photo crops, half synthetic fakes."""
    from PIL import Image

    root = tmp_path_factory.mktemp("images")
    pixels = real_photo_crops(N_IMAGES // 2, IMAGE_PX, seed=3) + fake_images(N_IMAGES - N_IMAGES // 2, IMAGE_PX,
                                                                             seed=3)
    for i, arr in enumerate(pixels):
        Image.fromarray(arr).save(root / f"{i:04d}.png")
    return root


def _fresh_bucket(server: LocalS3Server) -> str:
    name = f"t-{uuid.uuid4().hex[:12]}"
    server.create_bucket(name)
    return name


def _wrong(server: LocalS3Server, *, access_key: str | None = None, secret_key: str | None = None) -> StorageConfig:
    return StorageConfig(endpoint_url=server.endpoint_url, region=server.region,
                         access_key=access_key or server.access_key, secret_key=secret_key or server.secret_key)


def _port_open(port: int) -> bool:
    with socket.socket() as sock:
        sock.settimeout(0.5)
        return sock.connect_ex((LocalS3Server.HOST, port)) == 0


def _assert_scored_exactly_once(output: str, expected_paths: set[str], cfg: StorageConfig | None = None) -> None:
    """Every row of every part (no de-duplication): each expected path once, each with a score and no error."""
    parts = scoring.list_part_files(output, cfg)
    rows = pa.concat_tables([pq.read_table(p) for p in parts]) if parts else scoring.OUTPUT_SCHEMA.empty_table()
    paths = rows.column("path").to_pylist()
    assert len(paths) == len(set(paths)), "duplicated rows"
    assert set(paths) == expected_paths, (f"missing {len(expected_paths - set(paths))}, "
                                          f"extra {sorted(set(paths) - expected_paths)[:3]}")
    errors = [row for row in rows.select(["path", "score", "error"]).to_pylist()
              if row["error"] is not None or row["score"] is None]
    assert not errors, f"{len(errors)} rows with an error, e.g. {errors[0]}"


# ------------------------------------------------------------------------------------------------- /proc readers


def _process_group(pgid: int) -> list[int]:
    """Pids of the live (not zombie) processes whose process group is ``pgid``."""
    members = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
        except OSError:
            continue
        fields = stat[stat.rindex(")") + 2 :].split()  # state, ppid, pgrp, ...
        if fields[0] not in ("Z", "X") and int(fields[2]) == pgid:
            members.append(int(entry.name))
    return members


def _socket_inodes(pid: int) -> set[int]:
    inodes = set()
    try:
        fds = list(Path(f"/proc/{pid}/fd").iterdir())
    except OSError:
        return inodes
    for fd in fds:
        try:
            target = os.readlink(fd)
        except OSError:
            continue
        if target.startswith("socket:["):
            inodes.add(int(target[len("socket:[") : -1]))
    return inodes


def _decode_address(hex_address: str) -> str:
    """/proc/net/tcp{,6} addresses are the kernel's 32-bit words in host (little-endian) order."""
    raw = bytes.fromhex(hex_address)
    words = b"".join(raw[i : i + 4][::-1] for i in range(0, len(raw), 4))
    return socket.inet_ntop(socket.AF_INET if len(raw) == 4 else socket.AF_INET6, words)


def _group_listeners(pgid: int) -> set[tuple[str, int]]:
    """(address, port) of every TCP socket in LISTEN state held by a process of group ``pgid``."""
    inodes = set().union(*(_socket_inodes(pid) for pid in _process_group(pgid)))
    found = set()
    for table in ("tcp", "tcp6"):
        for line in Path(f"/proc/net/{table}").read_text().splitlines()[1:]:
            cols = line.split()
            if cols[3] == "0A" and int(cols[9]) in inodes:  # 0A: TCP_LISTEN
                address, port = cols[1].rsplit(":", 1)
                found.add((_decode_address(address), int(port, 16)))
    return found


def _grpc_sockets(ports) -> list[Path]:
    return [path for port in ports for path in Path("/tmp").glob(f"seaweedfs-*-grpc-{port}.sock")]


# ------------------------------------------------------------------------------------------ the server itself


@pytest.mark.timeout(120)
def test_every_listener_is_on_loopback_and_stop_leaves_nothing_behind():
    server = LocalS3Server().start()
    try:
        pgid, ports, root = server.pid, list(server.ports), server.root
        # `weed mini` starts its admin server a moment after S3 answers: wait for the listeners to settle.
        deadline = time.monotonic() + 30
        while (listeners := _group_listeners(pgid)) and {p for _, p in listeners} != set(ports):
            if time.monotonic() > deadline:
                break
            time.sleep(0.2)
        sockets_before = _grpc_sockets(ports)
    finally:
        server.stop()

    assert listeners, "found no listening socket of the server's process group"
    assert {address for address, _ in listeners} == {"127.0.0.1"}, sorted(listeners)
    assert {port for _, port in listeners} == set(ports), sorted(listeners)
    assert sockets_before, "weed created no gRPC socket in /tmp: the check after stop() would prove nothing"

    assert _process_group(pgid) == []
    with pytest.raises(ProcessLookupError):
        os.killpg(pgid, 0)
    assert [port for port in ports if _port_open(port)] == []
    assert _grpc_sockets(ports) == []
    assert root is not None and not root.exists()


@pytest.mark.timeout(120)
def test_an_object_written_before_a_restart_reads_back_identically_after_it(tmp_path):
    payload = os.urandom(300_000) + b"end"
    server = LocalS3Server(root=tmp_path / "s3").start()
    try:
        bucket = _fresh_bucket(server)
        storage.write_bytes(f"s3://{bucket}/kept/blob.bin", payload, server.storage_config())
        port = server.port

        server.stop(remove_root=False)
        assert not _port_open(port)
        server.start()

        assert server.port == port
        cfg = server.storage_config()
        assert storage.read_bytes(f"s3://{bucket}/kept/blob.bin", cfg) == payload
        assert storage.list_files(f"s3://{bucket}", cfg, extensions=None) == [f"s3://{bucket}/kept/blob.bin"]
    finally:
        server.stop()
    assert (tmp_path / "s3").is_dir()  # a root that was given is kept


@pytest.mark.timeout(180)
def test_one_server_holds_as_many_buckets_as_a_test_session_makes(tmp_path):
    photos = tmp_path / "in"
    photos.mkdir()
    (photos / "a.png").write_bytes(b"not really a png")
    (photos / "deeper").mkdir()
    (photos / "deeper" / "b.png").write_bytes(b"nor this")
    # SeaweedFS's own volume limit ran out after about 24 buckets on this machine's disk.
    with LocalS3Server() as server:
        buckets = [_fresh_bucket(server) for _ in range(40)]
        copied = [server.upload_dir(photos, f"s3://{bucket}/in") for bucket in buckets]
        listed = [storage.list_files(f"s3://{bucket}", server.storage_config(), extensions=None) for bucket in buckets]
    assert copied == [2] * len(buckets)
    assert listed == [[f"s3://{bucket}/in/a.png", f"s3://{bucket}/in/deeper/b.png"] for bucket in buckets]


@pytest.mark.timeout(120)
def test_an_upload_the_store_fails_raises_instead_of_leaving_a_hole(tmp_path):
    photos = tmp_path / "in"
    photos.mkdir()
    (photos / "a.png").write_bytes(b"bytes")
    # One volume: the first bucket takes it, so the store fails every upload into a second one.
    with LocalS3Server(max_volumes=1) as server:
        first, second = _fresh_bucket(server), _fresh_bucket(server)
        assert server.upload_dir(photos, f"s3://{first}/in") == 1
        with pytest.raises(OSError, match="INTERNAL_FAILURE"):
            server.upload_dir(photos, f"s3://{second}/in")


# ---------------------------------------------------------------------------------------------------- credentials


@pytest.mark.timeout(120)
def test_wrong_or_unknown_keys_are_refused_for_read_list_and_write(s3_server):
    bucket = _fresh_bucket(s3_server)
    key = f"s3://{bucket}/secret/x.bin"
    storage.write_bytes(key, b"private bytes", s3_server.storage_config())
    wrong_secret = _wrong(s3_server, secret_key="wrong-" + uuid.uuid4().hex)
    unknown_key = _wrong(s3_server, access_key="nobody-" + uuid.uuid4().hex[:8])

    for cfg, write_code in ((wrong_secret, "SIGNATURE_DOES_NOT_MATCH"), (unknown_key, "INVALID_ACCESS_KEY_ID")):
        attempts = {
            "read": lambda cfg=cfg: storage.read_bytes(key, cfg),
            "list": lambda cfg=cfg: storage.list_files(f"s3://{bucket}/secret", cfg, extensions=None),
            "write": lambda cfg=cfg: storage.write_bytes(f"s3://{bucket}/secret/new.bin", b"intruder", cfg),
        }
        for what, attempt in attempts.items():
            with pytest.raises(OSError) as refused:
                attempt()
            line = store_failure(refused.value)
            assert line is not None and "\n" not in line, (what, refused.value)
            # A HEAD (read, list) carries no body, so the store can only say 403 ACCESS_DENIED; a PUT names why.
            codes = (write_code,) if what == "write" else REFUSALS
            assert any(line.startswith(f"S3 error {code}:") for code in codes), (what, line)

    # An anonymous request is refused too, while the keys of the server read the object.
    with pytest.raises(urllib.error.HTTPError) as unsigned:
        urllib.request.urlopen(f"{s3_server.endpoint_url}/{bucket}/secret/x.bin", timeout=10)
    assert unsigned.value.code == 403
    cfg = s3_server.storage_config()
    assert storage.read_bytes(key, cfg) == b"private bytes"
    assert not storage.exists(f"s3://{bucket}/secret/new.bin", cfg)  # no refused write got through


@pytest.mark.timeout(120)
def test_the_decode_reader_stops_on_refused_keys_but_gives_a_missing_object_its_own_error(s3_server):
    bucket = _fresh_bucket(s3_server)
    present, missing = f"s3://{bucket}/a.png", f"s3://{bucket}/gone.png"
    storage.write_bytes(present, b"bytes", s3_server.storage_config())

    results = list(storage.BytesReader(s3_server.storage_config()).read_each([present, missing]))
    assert results[0] == (b"bytes", None)
    assert isinstance(results[1][1], FileNotFoundError)  # that file's error row; the job goes on

    # Refused keys: the object is refused and so is the bucket, so it is the keys, not the file.
    refused = storage.BytesReader(_wrong(s3_server, secret_key="wrong-" + uuid.uuid4().hex))
    with pytest.raises(StoreUnavailable, match="^S3 error ACCESS_DENIED"):
        list(refused.read_each([present, missing]))


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_mpft_score_with_a_wrong_secret_fails_in_one_line_and_writes_nothing(ray_local, s3_server, checkpoint,
                                                                            images, tmp_path):
    import ray

    bucket = _fresh_bucket(s3_server)
    few = tmp_path / "few"
    few.mkdir()
    for png in sorted(images.iterdir())[:24]:
        (few / png.name).write_bytes(png.read_bytes())
    s3_server.upload_dir(few, f"s3://{bucket}/in")
    out = tmp_path / "scores"
    command = [sys.executable, "-m", "jobs.cli", "score", "--model", str(checkpoint), "--input", f"s3://{bucket}/in",
               "--output", str(out), "--s3-endpoint", s3_server.endpoint_url, *SMALL_FLAGS,
               # The session's Ray, as a cluster user's job joins theirs: a private one costs ~15 s per run here.
               "--ray-address", ray.get_runtime_context().gcs_address]
    # The keys given here only; the session's Ray auth settings (RAY_AUTH_MODE) stay.
    base_env = {name: value for name, value in os.environ.items()
                if not name.startswith(("AWS_", "MLFLOW_")) and name != "RAY_ADDRESS"}
    base_env.update(HF_HUB_OFFLINE="1", RAY_USAGE_STATS_ENABLED="0", AWS_ACCESS_KEY_ID=s3_server.access_key)

    def mpft_score(secret: str) -> subprocess.CompletedProcess:
        return subprocess.run(command, env={**base_env, "AWS_SECRET_ACCESS_KEY": secret}, cwd=REPO,
                              capture_output=True, text=True, timeout=240)

    refused = mpft_score("wrong-" + uuid.uuid4().hex)

    assert refused.returncode != 0
    said = [line for line in refused.stderr.splitlines() if line.startswith("mpft score: S3 error")]
    assert len(said) == 1, refused.stderr[-3000:]
    assert any(code in said[0] for code in REFUSALS), said[0]
    assert "Traceback" not in refused.stderr, refused.stderr[-3000:]
    assert scoring.list_part_files(str(out)) == []

    scored = mpft_score(s3_server.secret_key)

    assert scored.returncode == 0, scored.stderr[-3000:]
    assert json.loads(scored.stdout)["n_inputs"] == 24
    _assert_scored_exactly_once(str(out), {f"s3://{bucket}/in/{png.name}" for png in few.iterdir()})


# ---------------------------------------------------------------------------------------- an outage mid-scoring


class Outage(threading.Thread):
    """Stops ``server`` ``delay`` seconds after the job claimed its output (its record appeared, so listing is done
    and reading is about to start), and starts it again after ``down_for`` seconds unless that is None."""

    def __init__(self, server: LocalS3Server, output: Path, delay: float, down_for: float | None):
        super().__init__(daemon=True)
        self.server, self.record, self.delay, self.down_for = server, output / scoring.OUTPUT_RECORD, delay, down_for
        self.job_ended = threading.Event()
        self.stopped_while_running = False
        self.error: BaseException | None = None

    def run(self) -> None:
        try:
            deadline = time.monotonic() + 120
            while not self.record.exists() and not self.job_ended.is_set():
                if time.monotonic() > deadline:
                    raise TimeoutError(f"{self.record} never appeared")
                time.sleep(0.02)
            time.sleep(self.delay)
            self.stopped_while_running = not self.job_ended.is_set()
            self.server.stop(remove_root=False)
            if self.down_for is not None:
                time.sleep(self.down_for)
                self.server.start()
        except BaseException as err:  # reported by the test, not lost in a thread
            self.error = err


def _outage_setup(tmp_path: Path, images: Path) -> tuple[LocalS3Server, str, set[str], Path]:
    server = LocalS3Server(root=tmp_path / "s3").start()
    bucket = _fresh_bucket(server)
    server.upload_dir(images, f"s3://{bucket}/in")
    expected = {f"s3://{bucket}/in/{png.name}" for png in images.iterdir()}
    return server, f"s3://{bucket}/in", expected, tmp_path / "scores"


def _score_through(outage: Outage, job: ScoreJob, model: ResolvedModel):
    """Run ``job`` with ``outage`` going on; (summary or None, the error it raised or None)."""
    outage.start()
    try:
        return run_scoring(job, model), None
    except Exception as err:
        return None, err
    finally:
        outage.job_ended.set()
        outage.join(timeout=60)
        assert not outage.is_alive() and outage.error is None, outage.error


def _job(server: LocalS3Server, input_uri: str, out: Path) -> ScoreJob:
    # Parts of 16 rows: a failed run leaves some rows committed, which the rerun must skip, not repeat.
    return ScoreJob(model_ref="tiny", input_uri=input_uri, output_uri=str(out), storage=server.storage_config(),
                    resources=SMALL, rows_per_output_file=16)


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_a_short_outage_is_retried_or_fails_the_job_but_never_becomes_error_rows(ray_local, model, images,
                                                                                 tmp_path):
    server, input_uri, expected, out = _outage_setup(tmp_path, images)
    try:
        outage = Outage(server, out, delay=0.5, down_for=4.0)
        summary, err = _score_through(outage, _job(server, input_uri, out), model)

        assert outage.stopped_while_running, f"the job ended before the store went down ({err!r}): nothing tested"
        if err is not None:  # retries ran out: the job must say the store failed, not that files are bad
            assert store_failure(err) is not None, err
        else:
            assert summary.n_errors == 0 and summary.n_written == len(expected)
        parts = scoring.list_part_files(str(out))
        rows = pa.concat_tables([pq.read_table(p, columns=["error"]) for p in parts]) if parts else None
        assert rows is None or rows.column("error").null_count == rows.num_rows, "the outage wrote error rows"

        rerun = run_scoring(_job(server, input_uri, out), model)

        assert rerun.n_errors == 0 and rerun.n_skipped_already_scored + rerun.n_scored == len(expected)
        _assert_scored_exactly_once(str(out), expected)
    finally:
        server.stop()


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_a_store_down_until_the_job_ends_fails_it_and_a_rerun_completes_the_set(ray_local, model, images,
                                                                                tmp_path):
    server, input_uri, expected, out = _outage_setup(tmp_path, images)
    try:
        outage = Outage(server, out, delay=0.0, down_for=None)
        summary, err = _score_through(outage, _job(server, input_uri, out), model)

        assert outage.stopped_while_running, f"the job ended before the store went down ({err!r}): nothing tested"
        assert err is not None, f"the job finished with the store down: {summary}"
        failure = store_failure(err)
        assert failure is not None and failure.startswith("S3 error NETWORK_CONNECTION"), err

        server.start()
        rerun = run_scoring(_job(server, input_uri, out), model)

        assert rerun.n_errors == 0
        assert rerun.n_skipped_already_scored + rerun.n_scored == rerun.n_inputs == len(expected)
        _assert_scored_exactly_once(str(out), expected)
    finally:
        server.stop()
