"""pipelines/ingest.py end to end: s3:// prefixes on the real local S3 server -> Ray Datasets -> torch batches."""

from __future__ import annotations

import json
import logging
import uuid
from collections import Counter

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch
import yaml

from mpft_core.config import StrictModel
from pipelines import storage
from pipelines.decode import DECODED_COLUMNS
from pipelines.ingest import drop_errors, for_training, read_images
from pipelines.sources import SourceConfig, build_manifest
from pipelines.storage import StorageConfig
from tests.helpers.images import BAD_CORPUS_MAX_PIXELS, BAD_CORPUS_SIZES, write_bad_corpus, write_genimage_tree

SIZE = 32


@pytest.fixture(scope="module")
def corpora(tmp_path_factory, s3_server):
    root = tmp_path_factory.mktemp("ingest")
    genimage = write_genimage_tree(root / "genimage", subsets=("sdv14", "midjourney"), n_per_class=3, size=40)
    bad = write_bad_corpus(root / "bad")
    bucket = f"s3://ingest-{uuid.uuid4().hex[:10]}"
    s3_server.create_bucket(bucket[len("s3://"):])
    s3_server.upload_dir(root, bucket)
    return {"bucket": bucket, "genimage": genimage, "bad": bad, "cfg": s3_server.storage_config()}


@pytest.mark.timeout(180)
def test_genimage_prefix_on_s3_iterates_as_fixed_shape_torch_batches(ray_local, corpora):
    """The issue's "done when": point the ingest at an S3 prefix holding a GenImage tree, iterate torch batches."""
    cfg = corpora["cfg"]
    manifest = build_manifest(SourceConfig(uri=f"{corpora['bucket']}/genimage", split="train"), cfg)
    ds = read_images(manifest, cfg, image_size=SIZE, train=True, window=SIZE + 4, rows_per_block=5, seed=0)

    batches = list(for_training(ds).iter_torch_batches(batch_size=4))

    assert [b["image"].shape[0] for b in batches] == [4, 4, 4]  # 12 train images
    for batch in batches:
        assert set(batch) == {"image", "label", "view_height", "view_width"}
        assert batch["image"].dtype == torch.uint8 and batch["image"].shape[1:] == (SIZE + 4, SIZE + 4, 3)
        assert batch["label"].dtype == torch.int8
        assert bool(((batch["view_height"] >= SIZE) & (batch["view_height"] <= SIZE + 4)).all())
    assert int(sum(b["label"].sum() for b in batches)) == 6  # half are generated
    assert all(b["image"].float().std() > 10 for b in batches)  # real pixels, not zero-filled error rows


@pytest.mark.timeout(180)
def test_no_row_is_lost_or_duplicated_between_listing_and_batches(ray_local, corpora):
    cfg = corpora["cfg"]
    listed = storage.list_files(f"{corpora['bucket']}/genimage", cfg)
    manifest = build_manifest(SourceConfig(uri=f"{corpora['bucket']}/genimage"), cfg)
    ds = read_images(manifest, cfg, image_size=SIZE, train=False, rows_per_block=7)  # uneven last block

    seen: Counter = Counter()
    for batch in ds.iter_batches(batch_size=5, batch_format="numpy"):
        assert list(batch) == list(DECODED_COLUMNS)
        assert batch["image"].dtype == np.uint8 and batch["image"].shape[1:] == (SIZE, SIZE, 3)
        seen.update(str(p) for p in batch["path"])

    assert len(listed) == 24
    assert seen == Counter(listed)


@pytest.mark.timeout(180)
def test_bad_corpus_on_s3_gives_one_row_per_file_with_pixels_or_a_reason(ray_local, corpora):
    cfg = corpora["cfg"]
    manifest = build_manifest(SourceConfig(uri=f"{corpora['bucket']}/bad", layout="unlabelled"), cfg)
    ds = read_images(manifest, cfg, image_size=SIZE, train=False, max_pixels=BAD_CORPUS_MAX_PIXELS, rows_per_block=4)

    rows = {r["path"].rsplit("/", 1)[1]: r for r in ds.take_all()}

    assert sorted(rows) == sorted(corpora["bad"])  # exactly one row per file, none lost or doubled
    for name, decodable in corpora["bad"].items():
        row = rows[name]
        assert row["image"].shape == (SIZE, SIZE, 3) and row["image"].dtype == np.uint8
        if decodable:
            assert row["error"] is None, (name, row["error"])
            assert (row["width"], row["height"]) == BAD_CORPUS_SIZES[name]
        else:
            assert row["error"], name
            assert not row["image"].any() and row["width"] == row["height"] == -1
    assert rows["exif_rotated.jpg"]["width"] == 10 and rows["exif_rotated.jpg"]["height"] == 20
    assert "pixel limit" in rows["over_limit.png"]["error"]
    assert drop_errors(ds).count() == sum(corpora["bad"].values())


@pytest.mark.timeout(180)
def test_eval_reads_are_deterministic_and_train_crops_follow_the_seed(ray_local, corpora):
    cfg = corpora["cfg"]
    manifest = build_manifest(SourceConfig(uri=f"{corpora['bucket']}/genimage", subsets=["sdv14"], split="val"), cfg)

    def images(**kwargs) -> dict[str, np.ndarray]:
        ds = read_images(manifest, cfg, image_size=SIZE, rows_per_block=4, **kwargs)
        return {r["path"]: r["image"] for r in ds.take_all()}

    eval_a, eval_b = images(train=False), images(train=False)
    train_0, train_1 = images(train=True, seed=0), images(train=True, seed=1)

    assert all(np.array_equal(eval_a[p], eval_b[p]) for p in eval_a)
    assert sum(not np.array_equal(train_0[p], train_1[p]) for p in train_0) >= len(train_0) // 2


class _JobLikeConfig(StrictModel):
    storage: StorageConfig
    source: SourceConfig


@pytest.mark.timeout(180)
def test_the_s3_secret_never_appears_in_logs_configs_or_outputs(ray_local, corpora, s3_server, caplog, capfd,
                                                                 tmp_path):
    secret = s3_server.secret_key
    cfg = corpora["cfg"]
    assert cfg.secret_key.get_secret_value() == secret
    caplog.set_level(logging.DEBUG)

    source = SourceConfig(uri=f"{corpora['bucket']}/bad", layout="unlabelled")
    manifest = build_manifest(source, cfg)
    ds = read_images(manifest, cfg, image_size=SIZE, train=False, max_pixels=BAD_CORPUS_MAX_PIXELS)
    rows = ds.take_all()  # includes error rows, whose messages come from failed reads/decodes
    ds.write_parquet(str(tmp_path / "out"))
    logging.getLogger("mpft.test").info("storage config in use: %s / %r", cfg, cfg)

    saved = _JobLikeConfig(storage=cfg, source=source).to_dict()
    texts = {
        "rows": repr(rows),
        "parquet": b"".join(p.read_bytes() for p in (tmp_path / "out").rglob("*") if p.is_file()).decode("latin-1"),
        "parquet values": repr(pq.read_table(tmp_path / "out").drop_columns(["image"]).to_pylist()),
        "json config": json.dumps(saved),
        "yaml config": yaml.safe_dump(saved),
        "storage to_dict": json.dumps(cfg.to_dict()),
        "logs": caplog.text,
    }
    captured = capfd.readouterr()
    texts["stdout"], texts["stderr"] = captured.out, captured.err

    assert "storage config in use" in caplog.text  # the capture works, so an absent secret means something
    assert len(rows) == len(corpora["bad"])
    for where, text in texts.items():
        assert secret not in text, f"secret leaked into {where}"
    assert saved["storage"]["secret_key"] == "**********"
