"""Object storage and local files behind one interface: the only module that builds filesystems / S3 clients.

A location is either ``s3://bucket/key`` or a local path. ``resolve`` turns it into a ``pyarrow.fs`` filesystem plus a
scheme-less path, which is what Ray Data, Ray Train (``storage_filesystem``) and PyArrow readers take.

Where the S3 settings come from, in order: the ``StorageConfig`` fields, then the standard AWS variables
(``AWS_ENDPOINT_URL_S3`` / ``AWS_ENDPOINT_URL``, ``AWS_REGION`` / ``AWS_DEFAULT_REGION``, ``AWS_ACCESS_KEY_ID`` /
``AWS_SECRET_ACCESS_KEY``), then the AWS SDK's own chain (profiles, instance metadata). PyArrow ignores
``AWS_ENDPOINT_URL``, so it is read here and passed on as ``endpoint_override`` + ``scheme``.

Secrets: the keys (and an STS session token) are pydantic ``SecretStr``: ``repr``/``str``/``to_dict()`` show
``**********``. Only ``to_dict(reveal_secrets=True)`` (used to ship the config to Ray workers) contains them. A masked
config read back (``from_dict`` of a saved ``to_dict()``) has no keys and falls back to the environment, instead of
trying to log in with the literal mask.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import posixpath
import tempfile
import uuid
from collections import deque
from collections.abc import Iterable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Optional
from urllib.parse import urlparse

import pyarrow.fs as pafs
from pydantic import SecretStr, field_validator

from mpft_core.config import InputError, StrictModel
from pipelines.store_errors import StoreUnavailable, aws_error, describe, is_store_wide

log = logging.getLogger(__name__)

S3_PREFIX = "s3://"
SECRET_MASK = "**********"  # what pydantic prints for a SecretStr
DEFAULT_REGION = "us-east-1"
STAMP_DIR = ".mpft-stamps"
_SECRET_FIELDS = ("access_key", "secret_key", "session_token")


class StorageConfig(StrictModel):
    """Where S3 is and how to log in; every field may be left empty to use the standard AWS variables."""

    endpoint_url: Optional[str] = None  # e.g. "http://127.0.0.1:5123"; None -> AWS_ENDPOINT_URL(_S3), else AWS
    region: Optional[str] = None  # None -> AWS_REGION / AWS_DEFAULT_REGION, else us-east-1
    access_key: Optional[SecretStr] = None  # None -> AWS_ACCESS_KEY_ID / the SDK's default chain
    secret_key: Optional[SecretStr] = None  # None -> AWS_SECRET_ACCESS_KEY
    session_token: Optional[SecretStr] = None  # temporary (STS) credentials only; None -> AWS_SESSION_TOKEN

    @field_validator("access_key", "secret_key", "session_token", mode="before")
    @classmethod
    def _masked_means_unset(cls, value):
        # A saved (masked) config must not log in with the mask itself; it falls back to the environment.
        if isinstance(value, SecretStr):
            value = value.get_secret_value()
        return None if value in (None, "", SECRET_MASK) else value

    def to_dict(self, reveal_secrets: bool = False) -> dict:
        data = self.model_dump(mode="json")  # SecretStr dumps as the mask
        if reveal_secrets:
            for name in _SECRET_FIELDS:
                secret = getattr(self, name)
                data[name] = secret.get_secret_value() if secret is not None else None
        return data

    def resolved(self) -> StorageConfig:
        """A copy with empty fields filled from the AWS variables of *this* process.

        Ship ``resolved().to_dict(reveal_secrets=True)`` to Ray workers: on another node the driver's environment
        does not exist. Temporary credentials (``AWS_SESSION_TOKEN`` set) are not copied: frozen, they would expire
        mid-job, so each worker resolves its own through the AWS SDK's chain (a local worker inherits the same
        variables; a cluster node refreshes its instance role, IRSA web identity or profile).
        """
        if self.access_key is not None:  # keys from the config: the environment's token belongs to other keys
            access, secret, token = self.access_key, self.secret_key, self.session_token
        elif os.environ.get("AWS_SESSION_TOKEN"):
            access = secret = token = None
        else:
            access, secret, token = os.environ.get("AWS_ACCESS_KEY_ID"), os.environ.get("AWS_SECRET_ACCESS_KEY"), None
        return StorageConfig(endpoint_url=self.endpoint(), region=self.effective_region(), access_key=access,
                             secret_key=secret, session_token=token)

    def endpoint(self) -> Optional[str]:
        return self.endpoint_url or os.environ.get("AWS_ENDPOINT_URL_S3") or os.environ.get("AWS_ENDPOINT_URL")

    def effective_region(self) -> str:
        return self.region or os.environ.get("AWS_REGION") or os.environ.get("AWS_DEFAULT_REGION") or DEFAULT_REGION


def for_workers(cfg: StorageConfig | None) -> dict:
    """The settings as a plain dict for Ray tasks and actors: empty fields resolved from this process's environment
    (another node does not have it) and the keys revealed. Never log or write it."""
    return (cfg or StorageConfig()).resolved().to_dict(reveal_secrets=True)


def _as_config(cfg: StorageConfig | dict | None) -> StorageConfig:
    if cfg is None:
        return StorageConfig()
    if isinstance(cfg, dict):
        return StorageConfig.from_dict(cfg)
    return cfg


def _s3_filesystem(cfg: StorageConfig, allow_bucket_creation: bool = False) -> pafs.S3FileSystem:
    kwargs: dict = {"region": cfg.effective_region(), "allow_bucket_creation": allow_bucket_creation}
    endpoint = cfg.endpoint()
    if endpoint:
        parsed = urlparse(endpoint if "://" in endpoint else f"https://{endpoint}")
        kwargs["endpoint_override"] = parsed.netloc + parsed.path.rstrip("/")
        kwargs["scheme"] = parsed.scheme
    # Keys from the config win; otherwise PyArrow's AWS SDK chain reads the AWS_* variables, profiles, metadata.
    if cfg.access_key is not None or cfg.secret_key is not None:
        if cfg.access_key is None or cfg.secret_key is None:
            raise ValueError("StorageConfig needs both access_key and secret_key, or neither")
        kwargs["access_key"] = cfg.access_key.get_secret_value()
        kwargs["secret_key"] = cfg.secret_key.get_secret_value()
        if cfg.session_token is not None:
            kwargs["session_token"] = cfg.session_token.get_secret_value()
    return pafs.S3FileSystem(**kwargs)


def is_remote(uri: str) -> bool:
    return uri.startswith(S3_PREFIX)


def _local_path(uri: str) -> str:
    if "://" in uri and not uri.startswith("file://"):
        raise InputError(f"unsupported location {uri!r}: use s3://bucket/key or a local path")
    # abspath, not resolve(): symlinked data folders keep the paths their users know
    return os.path.abspath(os.path.expanduser(uri.removeprefix("file://")))


def resolve(uri: str, cfg: StorageConfig | dict | None = None) -> tuple[pafs.FileSystem, str]:
    """The filesystem for ``uri`` and the path inside it (``bucket/key`` for S3, an absolute path locally)."""
    if is_remote(uri):
        path = uri[len(S3_PREFIX):].strip("/")
        if not path:
            raise InputError(f"{uri!r} names no bucket")
        return _s3_filesystem(_as_config(cfg)), path
    return pafs.LocalFileSystem(), _local_path(uri)


def _to_uri(fs: pafs.FileSystem, path: str) -> str:
    return S3_PREFIX + path if fs.type_name == "s3" else path


def join(uri: str, *parts: str) -> str:
    """Append path parts; ``.``/``..`` in the parts are normalised (S3 keys would otherwise contain them literally)."""
    tail = posixpath.normpath("/".join(p.strip("/") for p in parts if p)) if any(parts) else ""
    if tail in ("", "."):
        return uri
    if tail.startswith(".."):
        raise InputError(f"{parts!r} leaves {uri!r}")
    if is_remote(uri):
        return uri.rstrip("/") + "/" + tail
    return os.path.join(uri, tail)


def create_bucket(uri: str, cfg: StorageConfig | dict | None = None) -> None:
    """Create the bucket of an ``s3://bucket[/...]`` URI (a no-op if it exists)."""
    if not is_remote(uri):
        raise InputError(f"{uri!r} is not an s3:// URI")
    bucket = uri[len(S3_PREFIX):].split("/", 1)[0]
    fs = _s3_filesystem(_as_config(cfg), allow_bucket_creation=True)
    if fs.get_file_info(bucket).type == pafs.FileType.NotFound:
        fs.create_dir(bucket)


def _wanted(relative: str, extensions: Optional[set[str]]) -> bool:
    # Hidden names include macOS "._photo.jpg" resource forks, which crawled archives are full of and never decode;
    # hidden folders (.git/, .cache/) hold tool state, not a crawl's content.
    if any(part.startswith(".") for part in relative.split("/")):
        return False
    return extensions is None or posixpath.splitext(relative)[1].lower() in extensions


def list_files(uri: str, cfg: StorageConfig | dict | None = None,
               extensions: Optional[Iterable[str]] = None) -> list[str]:
    """Every file under ``uri`` (recursive; or ``uri`` itself if it is a file), sorted full URIs, except hidden
    ones and those inside hidden folders below ``uri`` (a hidden folder above it does not hide it).

    Files are listed whatever their names end with (a crawl's content-addressed keys have no extension; the decoder
    sniffs the content). ``extensions`` (with the dot) narrows the listing by suffix, case-insensitively. Raises
    FileNotFoundError if ``uri`` does not exist. S3 listings are paged by PyArrow (ListObjectsV2 continuation).
    """
    fs, path = resolve(uri, cfg)
    extensions = {e.lower() for e in extensions} if extensions is not None else None
    info = fs.get_file_info(path)
    if info.type == pafs.FileType.NotFound:
        raise FileNotFoundError(f"nothing at {uri}")
    if info.type == pafs.FileType.File:
        return [_to_uri(fs, info.path)]
    root = info.path.rstrip("/")
    infos = fs.get_file_info(pafs.FileSelector(path, recursive=True))
    return sorted(_to_uri(fs, i.path) for i in infos
                  if i.type == pafs.FileType.File and _wanted(i.path[len(root) + 1:], extensions))


def read_bytes(uri: str, cfg: StorageConfig | dict | None = None, max_bytes: Optional[int] = None) -> bytes:
    """The whole file; ``TooLarge`` past ``max_bytes`` (the read stops one byte past it)."""
    fs, path = resolve(uri, cfg)
    return _read(fs, path, max_bytes)


READ_CHUNK = 4 << 20


class TooLarge(ValueError):
    """A file over the reader's byte limit: refused after reading at most one byte past the limit."""


def _read(fs: pafs.FileSystem, path: str, max_bytes: Optional[int] = None) -> bytes:
    with fs.open_input_stream(path) as stream:
        if max_bytes is None:
            return stream.read()
        # Read in chunks up to one byte past the limit: no size the file may lie about is trusted (/dev/zero, a
        # FIFO, an object growing under us), and no limit-sized buffer is allocated up front.
        chunks, total = [], 0
        while total <= max_bytes:
            chunk = stream.read(min(READ_CHUNK, max_bytes + 1 - total))
            if not chunk:
                return b"".join(chunks)
            chunks.append(chunk)
            total += len(chunk)
    raise TooLarge(f"file too large: more than max_bytes={max_bytes} bytes")


# Remote reads a decode task keeps in flight. An S3 GET is mostly waiting (tens of ms to the first byte), so a task
# reading its files one after another is bound by latency, not by bandwidth or CPU.
READ_AHEAD = 16


class BytesReader:
    """Reads many URIs through one filesystem per kind (an S3 client is built once, not once per file)."""

    def __init__(self, cfg: StorageConfig | dict | None = None, read_ahead: int = READ_AHEAD,
                 max_bytes: Optional[int] = None, head_bytes: Optional[int] = None):
        self._cfg = _as_config(cfg)
        self._s3: Optional[pafs.S3FileSystem] = None
        self._local = pafs.LocalFileSystem()
        self.read_ahead = read_ahead
        self.max_bytes = max_bytes  # a bigger file is that file's error (``TooLarge``), read no further
        self.head_bytes = head_bytes  # read only each file's first bytes (a format's signature)

    def read_each(self, uris: Sequence[str]) -> Iterator[tuple[Optional[bytes], Optional[Exception]]]:
        """``(bytes, None)`` or ``(None, error)`` per URI, in order; never raises for one file, raises
        ``StoreUnavailable`` when the store itself fails (after the S3 client's own retries).

        Remote objects are fetched ``read_ahead`` at a time on threads (PyArrow's S3 client releases the GIL while
        it waits), a window that slides as the caller consumes: at most ``read_ahead`` + 1 files' bytes are held.
        Local files are read one by one, when asked for.
        """
        if not any(is_remote(u) for u in uris) or self.read_ahead <= 1:
            for uri in uris:
                yield self._read_or_error(uri)
            return
        self._s3_client()  # built here, once, before the reading threads start
        with ThreadPoolExecutor(max_workers=self.read_ahead, thread_name_prefix="mpft-read") as pool:
            pending: deque = deque()
            for uri in uris:
                pending.append(pool.submit(self._read_or_error, uri))
                if len(pending) >= self.read_ahead:
                    yield pending.popleft().result()
            while pending:
                yield pending.popleft().result()

    def _read_or_error(self, uri: str) -> tuple[Optional[bytes], Optional[Exception]]:
        """Errors of one file go to the caller (its error row); the store failing is raised (``StoreUnavailable``):
        every file after it would fail alike, and a rerun must read them, not skip them as scored."""
        try:
            return self.read(uri), None
        except Exception as err:
            found = aws_error(err)
            if found is not None and (is_store_wide(found) or not self._bucket_answers(uri)):
                raise StoreUnavailable(describe(found)) from err
            return None, err

    def _bucket_answers(self, uri: str) -> bool:
        """Whether the store answers these keys about ``uri``'s bucket: tells an error of one object (its policy,
        its encryption key) from one of the keys themselves (refused, expired)."""
        try:
            self._s3_client().get_file_info(uri[len(S3_PREFIX):].split("/", 1)[0])
        except OSError as err:
            return aws_error(err) is None
        return True

    def read(self, uri: str) -> bytes:
        fs, path = (self._s3_client(), uri[len(S3_PREFIX):]) if is_remote(uri) else (self._local, _local_path(uri))
        if self.head_bytes is not None:
            with fs.open_input_file(path) as handle:
                return handle.read(self.head_bytes)
        return _read(fs, path, self.max_bytes)

    def _s3_client(self) -> pafs.S3FileSystem:
        if self._s3 is None:
            self._s3 = _s3_filesystem(self._cfg)
        return self._s3


def write_bytes(uri: str, data: bytes, cfg: StorageConfig | dict | None = None) -> None:
    fs, path = resolve(uri, cfg)
    if fs.type_name == "local":
        Path(path).parent.mkdir(parents=True, exist_ok=True)
    with fs.open_output_stream(path) as stream:
        stream.write(data)


def write_atomic(uri: str, data: bytes, cfg: StorageConfig | dict | None = None) -> None:
    """Write ``uri`` so that a reader sees the old content or the new, never part of it.

    On S3 one upload: an object appears only once its upload completed (PyArrow sends small data as one PUT). A
    temporary object moved into place would be a copy plus a delete there: not atomic, and refused by buckets that
    grant no delete. Locally a temporary file in the same folder is renamed over the target.
    """
    fs, path = resolve(uri, cfg)
    if fs.type_name != "local":
        with fs.open_output_stream(path) as stream:
            stream.write(data)
        return
    target = Path(path)
    target.parent.mkdir(parents=True, exist_ok=True)
    # Hidden, so folder listings skip it if a crash leaves it behind; not mkstemp, whose 0600 would keep the file
    # from the other users of a shared folder.
    tmp = target.with_name(f".{target.name}.{uuid.uuid4().hex[:8]}.tmp")
    try:
        with open(tmp, "xb") as out:
            out.write(data)
            out.flush()
            os.fsync(out.fileno())  # on disk before the rename makes it the file, so a power cut cannot empty it
        os.replace(tmp, target)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def read_prefix(uri: str, n_bytes: int, cfg: StorageConfig | dict | None = None) -> bytes:
    """The first ``n_bytes`` of a file (fewer if it is shorter): a header without downloading the whole object."""
    fs, path = resolve(uri, cfg)
    with fs.open_input_file(path) as handle:
        return handle.read(n_bytes)


def exists(uri: str, cfg: StorageConfig | dict | None = None) -> bool:
    fs, path = resolve(uri, cfg)
    return fs.get_file_info(path).type != pafs.FileType.NotFound


def default_cache_dir() -> Path:
    """``$XDG_CACHE_HOME/mpft/downloads`` (``~/.cache/mpft/downloads`` when unset): per user, never a shared /tmp
    folder where another account could plant a file this process would then load as weights."""
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "mpft" / "downloads"


def private_dir(path: Path) -> Path:
    """``path`` created with mode 0700 (parents as needed); PermissionError if it belongs to another user, and a
    folder of ours that others could write to is narrowed to 0700 first."""
    path.mkdir(mode=0o700, parents=True, exist_ok=True)
    info = path.stat()
    if info.st_uid != os.getuid():
        raise PermissionError(f"the download cache {str(path)!r} belongs to another user; refusing to use it")
    if info.st_mode & 0o077:
        os.chmod(path, 0o700)
    return path


def fetch_to_local(uri: str, cfg: StorageConfig | dict | None = None, cache_dir: Optional[Path] = None) -> Path:
    """A local path holding ``uri``: local paths are returned as they are; ``s3://`` files (or whole prefixes) are
    downloaded into the per-user cache (``default_cache_dir()`` unless ``cache_dir``), ``<cache>/<bucket>/<key>``.

    A cached file is reused while the remote size and modification time are those it was downloaded at *and* its
    sha256 still matches the one recorded then (a file swapped under the same size and mtime is fetched again).
    """
    fs, path = resolve(uri, cfg)
    if fs.type_name == "local":
        if not Path(path).exists():
            raise FileNotFoundError(path)
        return Path(path)
    root = private_dir(Path(cache_dir or default_cache_dir()))
    info = fs.get_file_info(path)
    if info.type == pafs.FileType.NotFound:
        raise FileNotFoundError(f"nothing at {uri}")
    if info.type == pafs.FileType.File:
        return _fetch_file(fs, info, root)
    for child in fs.get_file_info(pafs.FileSelector(path, recursive=True)):
        if child.type == pafs.FileType.File:
            _fetch_file(fs, child, root)
    return root / path


def _fetch_file(fs: pafs.FileSystem, info: pafs.FileInfo, root: Path) -> Path:
    local = root / info.path
    # Stamps live in their own tree so a fetched folder (e.g. a checkpoint) holds exactly the remote files.
    stamp = root / STAMP_DIR / (info.path + ".stamp")
    version = f"{info.size} {info.mtime_ns}"
    if _cached_copy_is_valid(local, stamp, version):
        return local
    local.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
    # Download next to the target and rename: a crash or a parallel worker never sees a half-written file.
    fd, tmp = tempfile.mkstemp(dir=local.parent, prefix=local.name + ".part-")
    try:
        digest = hashlib.sha256()
        with os.fdopen(fd, "wb") as out, fs.open_input_stream(info.path) as stream:
            while chunk := stream.read(8 << 20):
                digest.update(chunk)
                out.write(chunk)
        os.replace(tmp, local)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    stamp.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
    stamp.write_text(json.dumps({"version": version, "sha256": digest.hexdigest()}))
    log.debug("fetched s3://%s to %s", info.path, local)
    return local


def _cached_copy_is_valid(local: Path, stamp: Path, version: str) -> bool:
    if not (local.is_file() and stamp.is_file()):
        return False
    try:
        record = json.loads(stamp.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return False
    if not isinstance(record, dict) or record.get("version") != version:
        return False  # the remote file changed since this copy was made
    if file_sha256(local) != record.get("sha256"):
        log.warning("cached %s does not match the sha256 recorded at download; fetching it again", local)
        return False
    return True


def file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(8 << 20):
            digest.update(chunk)
    return digest.hexdigest()
