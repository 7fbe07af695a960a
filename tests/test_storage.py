"""pipelines/storage.py and infra/local_stack/s3.py against a real S3 server process (SeaweedFS)."""

from __future__ import annotations

import json
import os
import shlex
import signal
import socket
import subprocess
import sys
import time
import uuid
from pathlib import Path

import pytest
import yaml

from infra.local_stack.s3 import LocalS3Server
from pipelines import storage
from pipelines.storage import StorageConfig

REPO = Path(__file__).resolve().parents[1]


def _fresh_bucket(server) -> str:
    name = f"t-{uuid.uuid4().hex[:12]}"
    server.create_bucket(name)
    return f"s3://{name}"


def _port_open(port: int) -> bool:
    with socket.socket() as sock:
        sock.settimeout(0.5)
        return sock.connect_ex(("127.0.0.1", port)) == 0


# --------------------------------------------------------------------------------------------------- StorageConfig


def test_secret_is_masked_everywhere_but_reveal():
    secret = "sk-" + uuid.uuid4().hex
    cfg = StorageConfig(endpoint_url="http://127.0.0.1:1", access_key="AKIAEXAMPLE", secret_key=secret)

    shown = [repr(cfg), str(cfg), json.dumps(cfg.to_dict()), yaml.safe_dump(cfg.to_dict()), cfg.model_dump_json()]
    for text in shown:
        assert secret not in text and "AKIAEXAMPLE" not in text
    assert cfg.to_dict()["secret_key"] == "**********"
    assert cfg.to_dict(reveal_secrets=True)["secret_key"] == secret
    assert StorageConfig.from_dict(cfg.to_dict(reveal_secrets=True)) == cfg


def test_saved_masked_config_falls_back_to_environment_instead_of_using_the_mask():
    saved = StorageConfig(access_key="a", secret_key="b").to_dict()
    reloaded = StorageConfig.from_dict(saved)
    assert reloaded.access_key is None and reloaded.secret_key is None


def test_resolved_fills_empty_fields_from_aws_variables(monkeypatch):
    monkeypatch.setenv("AWS_ENDPOINT_URL", "http://env-endpoint:9000")
    monkeypatch.delenv("AWS_ENDPOINT_URL_S3", raising=False)
    monkeypatch.setenv("AWS_DEFAULT_REGION", "eu-west-3")
    monkeypatch.delenv("AWS_REGION", raising=False)
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "env-access")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "env-secret")

    monkeypatch.setenv("AWS_SESSION_TOKEN", "env-token")

    own_keys = StorageConfig(access_key="cfg-access", secret_key="cfg-secret").resolved().to_dict(reveal_secrets=True)
    # The environment's session token belongs to the environment's keys, never to keys from the config.
    assert (own_keys["access_key"], own_keys["secret_key"], own_keys["session_token"]) == ("cfg-access",
                                                                                          "cfg-secret", None)

    monkeypatch.delenv("AWS_SESSION_TOKEN")
    resolved = StorageConfig(region="ap-south-1").resolved().to_dict(reveal_secrets=True)
    assert resolved == {"endpoint_url": "http://env-endpoint:9000", "region": "ap-south-1",
                        "access_key": "env-access", "secret_key": "env-secret", "session_token": None}


def test_temporary_credentials_are_not_frozen_into_what_workers_get(monkeypatch):
    # A session token expires (1 h by default for STS); keys copied at job start would fail every read after it.
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "ASIA-temporary")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "temporary-secret")
    monkeypatch.setenv("AWS_SESSION_TOKEN", "session-token")

    shipped = storage.for_workers(StorageConfig(endpoint_url="http://store:9000"))

    assert (shipped["access_key"], shipped["secret_key"], shipped["session_token"]) == (None, None, None)
    assert shipped["endpoint_url"] == "http://store:9000"


def test_half_a_key_pair_is_rejected():
    with pytest.raises(ValueError, match="both access_key and secret_key"):
        storage.resolve("s3://bucket/x", StorageConfig(access_key="only-this"))


def test_join_normalises_and_refuses_to_escape():
    assert storage.join("s3://b/root/", "a", "./b/c.jpg") == "s3://b/root/a/b/c.jpg"
    assert storage.join("s3://b/root", "a/../c.jpg") == "s3://b/root/c.jpg"
    with pytest.raises(ValueError):
        storage.join("s3://b/root", "../../etc")
    assert storage.join("/data", "x", "y.png") == "/data/x/y.png"


def test_unsupported_scheme_is_an_error():
    with pytest.raises(ValueError, match="unsupported"):
        storage.resolve("gs://bucket/key")


# --------------------------------------------------------------------------------------------------- file operations


@pytest.fixture(params=["s3", "local"])
def root_uri(request, tmp_path):
    if request.param == "local":
        return str(tmp_path / "store")
    return _fresh_bucket(request.getfixturevalue("s3_server")) + "/store"


@pytest.mark.timeout(60)
def test_write_read_exists_and_sorted_recursive_listing(root_uri, request):
    cfg = request.getfixturevalue("s3_server").storage_config() if storage.is_remote(root_uri) else None
    files = {"b/2.png": b"png", "a/1.JPG": b"jpg", "a/deep/er/3.webp": b"webp", "notes.txt": b"txt",
             "a/._1.jpg": b"resource fork"}
    for rel, data in files.items():
        storage.write_bytes(storage.join(root_uri, rel), data, cfg)

    listed = storage.list_files(root_uri, cfg, extensions=[".png", ".jpg", ".webp"])

    assert listed == sorted(storage.join(root_uri, r) for r in ("a/1.JPG", "a/deep/er/3.webp", "b/2.png"))
    assert storage.read_bytes(storage.join(root_uri, "a/deep/er/3.webp"), cfg) == b"webp"
    assert storage.exists(storage.join(root_uri, "notes.txt"), cfg)
    assert not storage.exists(storage.join(root_uri, "missing.png"), cfg)
    assert len(storage.list_files(root_uri, cfg)) == 4  # every name but the hidden one
    assert storage.list_files(storage.join(root_uri, "b/2.png"), cfg) == [storage.join(root_uri, "b/2.png")]
    with pytest.raises(FileNotFoundError):
        storage.list_files(storage.join(root_uri, "nothing-here"), cfg)


@pytest.mark.timeout(60)
def test_write_atomic_replaces_the_whole_file_and_leaves_nothing_beside_it(root_uri, request):
    import pyarrow.fs as pafs

    cfg = request.getfixturevalue("s3_server").storage_config() if storage.is_remote(root_uri) else None
    target = storage.join(root_uri, "sub/_record.json")

    storage.write_atomic(target, b"a longer first version", cfg)
    storage.write_atomic(target, b"second", cfg)

    assert storage.read_bytes(target, cfg) == b"second"
    fs, root = storage.resolve(root_uri, cfg)
    files = [i.path for i in fs.get_file_info(pafs.FileSelector(root, recursive=True)) if i.type == pafs.FileType.File]
    assert files == [storage.resolve(target, cfg)[1]]


def test_a_failed_local_write_atomic_keeps_the_old_file_and_no_temporary(tmp_path, monkeypatch):
    target = tmp_path / "_record.json"
    storage.write_atomic(str(target), b"old")

    def disk_full(*args):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(os, "replace", disk_full)
    with pytest.raises(OSError, match="No space left"):
        storage.write_atomic(str(target), b"new")

    assert target.read_bytes() == b"old" and [p.name for p in tmp_path.iterdir()] == ["_record.json"]


@pytest.mark.timeout(60)
def test_read_each_returns_every_file_in_order_with_its_own_error(root_uri, request):
    cfg = request.getfixturevalue("s3_server").storage_config() if storage.is_remote(root_uri) else None
    names = [f"{i:02d}.jpg" for i in range(7)]
    for name in names:
        storage.write_bytes(storage.join(root_uri, name), name.encode(), cfg)
    uris = [storage.join(root_uri, n) for n in names]
    uris.insert(3, storage.join(root_uri, "missing.jpg"))

    # A window of 3 over 8 files: reads overlap and finish out of order, results must not.
    results = list(storage.BytesReader(cfg, read_ahead=3).read_each(uris))

    assert [data for data, _ in results] == [n.encode() for n in names[:3]] + [None] + [n.encode() for n in names[3:]]
    assert [error is None for _, error in results] == [True] * 3 + [False] + [True] * 4
    assert isinstance(results[3][1], OSError)  # FileNotFoundError locally, an AWS error on S3


@pytest.mark.timeout(60)
def test_aws_variables_alone_reach_the_server(s3_server, monkeypatch):
    bucket = _fresh_bucket(s3_server)
    for name, value in s3_server.env().items():
        monkeypatch.setenv(name, value)

    storage.write_bytes(f"{bucket}/env.png", b"via env")  # no StorageConfig at all

    assert storage.read_bytes(f"{bucket}/env.png", StorageConfig()) == b"via env"


@pytest.mark.timeout(120)
def test_listing_pages_past_one_thousand_objects(s3_server, tmp_path):
    # S3 returns at most 1,000 keys per ListObjectsV2 call; a listing that ignored continuation would stop there.
    local = tmp_path / "many"
    local.mkdir()
    for i in range(1001):
        (local / f"{i:05d}.png").write_bytes(b"")
    bucket = _fresh_bucket(s3_server)
    assert s3_server.upload_dir(local, f"{bucket}/many") == 1001

    listed = storage.list_files(f"{bucket}/many", s3_server.storage_config())

    assert listed == [f"{bucket}/many/{i:05d}.png" for i in range(1001)]


@pytest.mark.timeout(60)
def test_fetch_to_local_caches_and_refreshes_when_the_object_changes(s3_server, tmp_path):
    cfg = s3_server.storage_config()
    bucket = _fresh_bucket(s3_server)
    storage.write_bytes(f"{bucket}/w/model.bin", b"v1", cfg)
    storage.write_bytes(f"{bucket}/w/sub/meta.json", b"{}", cfg)

    first = storage.fetch_to_local(f"{bucket}/w/model.bin", cfg, cache_dir=tmp_path)
    first_stat = first.stat().st_mtime_ns
    again = storage.fetch_to_local(f"{bucket}/w/model.bin", cfg, cache_dir=tmp_path)
    assert again == first and again.read_bytes() == b"v1" and again.stat().st_mtime_ns == first_stat

    time.sleep(1.1)  # S3 modification times have one-second resolution
    storage.write_bytes(f"{bucket}/w/model.bin", b"version two", cfg)
    assert storage.fetch_to_local(f"{bucket}/w/model.bin", cfg, cache_dir=tmp_path).read_bytes() == b"version two"

    folder = storage.fetch_to_local(f"{bucket}/w", cfg, cache_dir=tmp_path / "dir")
    assert sorted(str(p.relative_to(folder)) for p in folder.rglob("*") if p.is_file()) == ["model.bin",
                                                                                             "sub/meta.json"]
    assert storage.fetch_to_local(str(first), cache_dir=tmp_path) == first  # local paths pass through


@pytest.mark.timeout(60)
def test_the_download_cache_is_per_user_with_mode_0700(s3_server, tmp_path, monkeypatch):
    cfg = s3_server.storage_config()
    bucket = _fresh_bucket(s3_server)
    storage.write_bytes(f"{bucket}/w/tower.safetensors", b"weights", cfg)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    shared = tmp_path / "shared"
    shared.mkdir()
    shared.chmod(0o777)

    local = storage.fetch_to_local(f"{bucket}/w/tower.safetensors", cfg)
    storage.fetch_to_local(f"{bucket}/w/tower.safetensors", cfg, cache_dir=shared)

    assert local.is_relative_to(tmp_path / "xdg" / "mpft" / "downloads")
    assert (storage.default_cache_dir().stat().st_mode & 0o777) == 0o700
    assert (shared.stat().st_mode & 0o777) == 0o700  # a folder others could write to is narrowed first


@pytest.mark.timeout(60)
def test_a_cached_file_swapped_under_the_same_size_and_mtime_is_fetched_again(s3_server, tmp_path):
    cfg = s3_server.storage_config()
    bucket = _fresh_bucket(s3_server)
    storage.write_bytes(f"{bucket}/w/tower.safetensors", b"the real weights", cfg)
    local = storage.fetch_to_local(f"{bucket}/w/tower.safetensors", cfg, cache_dir=tmp_path)
    stat = local.stat()

    local.write_bytes(b"planted weights!")  # same size; only a content hash tells
    os.utime(local, ns=(stat.st_atime_ns, stat.st_mtime_ns))

    assert storage.fetch_to_local(f"{bucket}/w/tower.safetensors", cfg, cache_dir=tmp_path).read_bytes() == (
        b"the real weights")


# --------------------------------------------------------------------------------------------------- LocalS3Server


@pytest.mark.timeout(60)
def test_server_stop_ends_its_process_group_and_frees_the_port():
    server = LocalS3Server().start()
    pgid, port = server.pid, server.port
    assert _port_open(port)

    server.stop()

    with pytest.raises(ProcessLookupError):
        os.killpg(pgid, 0)
    assert not _port_open(port)


def test_each_server_has_its_own_random_secret_and_consistent_settings():
    a, b = LocalS3Server(), LocalS3Server()  # not started: credentials are fixed at construction
    assert a.secret_key != b.secret_key and len(a.secret_key) > 20
    env = a.env()
    assert env["AWS_ENDPOINT_URL"] == a.endpoint_url == a.storage_config().endpoint_url
    assert env["AWS_SECRET_ACCESS_KEY"] == a.storage_config().secret_key.get_secret_value()


@pytest.mark.timeout(90)
def test_cli_serves_an_uploaded_folder_until_sigterm(tmp_path):
    (tmp_path / "data" / "sub").mkdir(parents=True)
    (tmp_path / "data" / "sub" / "x.png").write_bytes(b"pixels")
    proc = subprocess.Popen(
        [sys.executable, "-m", "infra.local_stack.s3", "--bucket", "cli-bucket", "--upload", str(tmp_path / "data"),
         "--prefix", "corpus"],
        cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True,
    )
    try:
        printed = []
        for line in proc.stdout:
            printed.append(line)
            if line.startswith("source "):
                break
        assert printed and printed[-1].startswith("source "), "".join(printed)
        env_file = Path(shlex.split(printed[-1])[1])
        assert env_file.stat().st_mode & 0o777 == 0o600
        exports = dict(shlex.split(line)[1].split("=", 1) for line in env_file.read_text().splitlines())
        cfg = StorageConfig(endpoint_url=exports["AWS_ENDPOINT_URL"], access_key=exports["AWS_ACCESS_KEY_ID"],
                            secret_key=exports["AWS_SECRET_ACCESS_KEY"])
        assert storage.read_bytes("s3://cli-bucket/corpus/sub/x.png", cfg) == b"pixels"

        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=30) == 0
        printed.append(proc.stdout.read())
        assert exports["AWS_SECRET_ACCESS_KEY"] not in "".join(printed)  # the secret is only in the owner-only file
        port = int(exports["AWS_ENDPOINT_URL"].rsplit(":", 1)[1])
        assert not _port_open(port)  # the server went down with the CLI
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()


@pytest.mark.timeout(120)
def test_a_read_after_the_credentials_expired_gets_fresh_ones_from_the_chain(s3_server, tmp_path, monkeypatch):
    # A worker config without keys (what temporary credentials ship as) leaves credentials to the AWS SDK's chain;
    # here a profile's credential_process hands out keys valid for 2 s, and reads keep working past their expiry.
    bucket = _fresh_bucket(s3_server)
    cfg = s3_server.storage_config()
    storage.write_bytes(f"{bucket}/blob.bin", b"payload", cfg)
    calls = tmp_path / "calls"
    issuer = tmp_path / "issue-credentials.sh"
    issuer.write_text(
        "#!/bin/sh\n"
        f"echo call >> {calls}\n"
        "expires=$(date -u -d '+2 seconds' +%Y-%m-%dT%H:%M:%SZ)\n"
        f"printf '{{\"Version\": 1, \"AccessKeyId\": \"{cfg.access_key.get_secret_value()}\", "
        f"\"SecretAccessKey\": \"{cfg.secret_key.get_secret_value()}\", \"Expiration\": \"%s\"}}' \"$expires\"\n"
    )
    issuer.chmod(0o700)
    (tmp_path / "aws-config").write_text(f"[default]\ncredential_process = {issuer}\n")
    env = {k: v for k, v in os.environ.items() if not k.startswith("AWS_")}
    env.update(AWS_CONFIG_FILE=str(tmp_path / "aws-config"), AWS_SHARED_CREDENTIALS_FILE=str(tmp_path / "none"),
               AWS_EC2_METADATA_DISABLED="true")
    monkeypatch.setenv("AWS_SESSION_TOKEN", "the driver's own temporary token")
    worker_cfg = json.dumps(storage.for_workers(StorageConfig(endpoint_url=cfg.endpoint_url)))
    reader = (
        "import json, sys, time\n"
        "from pipelines import storage\n"
        "cfg = json.loads(sys.argv[1])\n"
        "assert cfg['access_key'] is None, cfg\n"
        "for _ in range(3):\n"
        f"    print(storage.read_bytes('{bucket}/blob.bin', cfg).decode(), flush=True)\n"
        "    time.sleep(2.5)\n"
    )

    done = subprocess.run([sys.executable, "-c", reader, worker_cfg], env=env, cwd=REPO, capture_output=True,
                          text=True, timeout=90)

    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.split() == ["payload"] * 3
    assert len(calls.read_text().split()) >= 3  # fetched again after each expiry, not frozen at the first read


def test_a_read_stops_one_byte_past_the_limit_even_on_an_endless_file(tmp_path):
    small, big = tmp_path / "small.bin", tmp_path / "big.bin"
    small.write_bytes(b"x" * 1000)
    big.write_bytes(b"x" * 1001)
    reader = storage.BytesReader(max_bytes=1000)

    (data, error), (no_data, too_large), (endless, endless_error) = reader.read_each(
        [str(small), str(big), "/dev/zero"])

    assert (data, error) == (b"x" * 1000, None)
    assert no_data is None and isinstance(too_large, storage.TooLarge)
    assert "more than max_bytes=1000" in str(too_large)
    assert endless is None and isinstance(endless_error, storage.TooLarge)
