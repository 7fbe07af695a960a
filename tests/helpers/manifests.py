"""Writing manifests for the ``manifest`` layout, as a user's own tooling would."""

from __future__ import annotations

import io
import posixpath

import pyarrow as pa
import pyarrow.csv as pacsv
import pyarrow.parquet as pq

from pipelines import storage
from pipelines.sources import MANIFEST_SCHEMA


def write_manifest(table: pa.Table, uri: str, storage_cfg=None) -> None:
    """Write ``table`` (manifest columns) as ``.parquet`` or ``.csv``, by the extension of ``uri``."""
    table = table.select(MANIFEST_SCHEMA.names).cast(MANIFEST_SCHEMA)
    buf = io.BytesIO()
    if posixpath.splitext(uri)[1].lower() == ".parquet":
        pq.write_table(table, buf)
    else:
        pacsv.write_csv(table, buf)
    storage.write_bytes(uri, buf.getvalue(), storage_cfg)
