"""pipelines/sources.py: benchmark layouts, manifest files and unlabelled prefixes -> manifests, and their hash."""

from __future__ import annotations

import logging
import uuid

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from pipelines.sources import MANIFEST_SCHEMA, SourceConfig, build_manifest, manifest_hash, write_manifest
from tests.helpers.images import write_genimage_tree, write_ufd_tree


@pytest.fixture(scope="module")
def corpora(tmp_path_factory, s3_server):
    """GenImage and UFD trees, locally and uploaded to s3://<bucket>/{genimage,ufd}; with the expected labels."""
    root = tmp_path_factory.mktemp("corpora")
    genimage = write_genimage_tree(root / "genimage", subsets=("sdv14", "midjourney"), n_per_class=2, size=16)
    ufd = write_ufd_tree(root / "ufd", n_per_class=2, size=16)
    bucket = f"s3://src-{uuid.uuid4().hex[:10]}"
    s3_server.create_bucket(bucket[len("s3://"):])
    s3_server.upload_dir(root, bucket)
    return {"root": root, "bucket": bucket, "genimage": genimage, "ufd": ufd, "cfg": s3_server.storage_config()}


def _rows(table: pa.Table) -> dict[str, tuple]:
    return {r["path"]: (r["label"], r["subset"], r["split"]) for r in table.to_pylist()}


# --------------------------------------------------------------------------------------------------- folder layouts


@pytest.mark.timeout(60)
def test_genimage_tree_on_s3_gives_labels_subsets_and_splits(corpora):
    base = f"{corpora['bucket']}/genimage"
    table = build_manifest(SourceConfig(uri=base, layout="genimage"), corpora["cfg"])

    assert table.schema == MANIFEST_SCHEMA
    expected = {f"{base}/{rel}": (label, rel.split("/")[0], rel.split("/")[1])
                for rel, label in corpora["genimage"].items()}
    assert _rows(table) == expected
    assert table["path"].to_pylist() == sorted(expected)
    assert table.num_rows == 16  # 2 subsets x 2 splits x 2 classes x 2 images


@pytest.mark.timeout(60)
def test_genimage_split_and_subset_filters(corpora):
    base = f"{corpora['bucket']}/genimage"
    table = build_manifest(SourceConfig(uri=base, split="val", subsets=["midjourney"]), corpora["cfg"])

    assert set(table["split"].to_pylist()) == {"val"}
    assert set(table["subset"].to_pylist()) == {"midjourney"}
    assert sorted(table["label"].to_pylist()) == [0, 0, 1, 1]
    with pytest.raises(ValueError, match="sdxl"):
        build_manifest(SourceConfig(uri=base, subsets=["sdxl"]), corpora["cfg"])


def test_genimage_intermediate_folders_and_single_subset_root(tmp_path):
    # The real GenImage release nests e.g. Midjourney/imagenet_midjourney/train/ai/...: the subset is the first
    # folder under the source root, or the root's own name when the root is one subset's folder.
    write_genimage_tree(tmp_path / "Midjourney", subsets=("imagenet_midjourney",), n_per_class=1, size=8,
                        splits=("train",))
    whole = build_manifest(SourceConfig(uri=str(tmp_path)))
    one = build_manifest(SourceConfig(uri=str(tmp_path / "Midjourney" / "imagenet_midjourney")))

    assert set(whole["subset"].to_pylist()) == {"Midjourney"}
    assert set(one["subset"].to_pylist()) == {"imagenet_midjourney"}
    assert sorted(whole["label"].to_pylist()) == [0, 1]


@pytest.mark.timeout(60)
def test_ufd_tree_on_s3_with_and_without_class_folders(corpora):
    base = f"{corpora['bucket']}/ufd"
    table = build_manifest(SourceConfig(uri=base, layout="ufd"), corpora["cfg"])

    expected = {f"{base}/{rel}": (label, rel.split("/")[0], None) for rel, label in corpora["ufd"].items()}
    assert _rows(table) == expected
    assert table.num_rows == 12  # progan: 2 classes x 2 labels x 2, biggan: 2 labels x 2

    recorded = build_manifest(SourceConfig(uri=base, layout="ufd", split="test", subsets=["biggan"]), corpora["cfg"])
    assert set(recorded["split"].to_pylist()) == {"test"} and recorded.num_rows == 4


def test_files_outside_the_layout_are_skipped_with_a_warning(tmp_path, caplog):
    write_genimage_tree(tmp_path, subsets=("sdv14",), n_per_class=1, size=8)
    (tmp_path / "sdv14" / "README.png").write_bytes(b"not in a class folder")

    with caplog.at_level(logging.WARNING, logger="pipelines.sources"):
        table = build_manifest(SourceConfig(uri=str(tmp_path)))

    assert table.num_rows == 4
    assert "1 files" in caplog.text and "README.png" in caplog.text


def test_empty_source_is_an_error(tmp_path):
    (tmp_path / "ai").mkdir()
    (tmp_path / "ai" / "x.png").write_bytes(b"")
    with pytest.raises(ValueError, match="no images found"):
        build_manifest(SourceConfig(uri=str(tmp_path), layout="genimage"))


@pytest.mark.timeout(60)
def test_unlabelled_prefix(corpora):
    base = f"{corpora['bucket']}/ufd/biggan"
    table = build_manifest(SourceConfig(uri=base, layout="unlabelled"), corpora["cfg"])

    assert table.num_rows == 4
    assert table["label"].null_count == 4
    assert set(table["subset"].to_pylist()) == {"unlabelled"}


# --------------------------------------------------------------------------------------------------- manifest files


@pytest.mark.timeout(60)
@pytest.mark.parametrize("ext", ["parquet", "csv"])
def test_manifest_file_on_s3_resolves_relative_paths(corpora, ext):
    bucket, cfg = corpora["bucket"], corpora["cfg"]
    listed = build_manifest(SourceConfig(uri=f"{bucket}/genimage"), cfg)
    # Relative to the manifest's folder (with ./ and ../), plus one absolute URI.
    rel_paths = ["../" + p[len(bucket) + 1:] for p in listed["path"].to_pylist()]
    rel_paths[0] = "./../" + rel_paths[0][3:]
    rel_paths[1] = listed["path"][1].as_py()
    table = listed.set_column(0, "path", pa.array(rel_paths, pa.string()))
    uri = f"{bucket}/manifests/gen.{ext}"
    write_manifest(table, uri, cfg)

    read = build_manifest(SourceConfig(uri=uri, layout="manifest"), cfg)
    val = build_manifest(SourceConfig(uri=uri, layout="manifest", split="val"), cfg)

    assert _rows(read) == _rows(listed)
    assert manifest_hash(read) == manifest_hash(listed)
    assert set(val["split"].to_pylist()) == {"val"} and val.num_rows == 8


def test_manifest_csv_with_only_path_and_label(tmp_path):
    (tmp_path / "m").mkdir()
    (tmp_path / "m" / "crawl.csv").write_text("path,label\nimgs/a.png,1\nimgs/b.png,\n/abs/c.png,0\n")

    table = build_manifest(SourceConfig(uri=str(tmp_path / "m" / "crawl.csv"), layout="manifest"))

    assert _rows(table) == {
        str(tmp_path / "m" / "imgs" / "a.png"): (1, "crawl", None),
        str(tmp_path / "m" / "imgs" / "b.png"): (None, "crawl", None),
        "/abs/c.png": (0, "crawl", None),
    }


@pytest.mark.parametrize("content, message", [
    ("path,label\na.png,2\n", "label must be 0"),
    ("path,label\na.png,1\na.png,0\n", "more than once"),
    ("file,label\na.png,1\n", "lacks column"),
])
def test_bad_manifest_files_are_rejected(tmp_path, content, message):
    (tmp_path / "m.csv").write_text(content)
    with pytest.raises(ValueError, match=message):
        build_manifest(SourceConfig(uri=str(tmp_path / "m.csv"), layout="manifest"))


# --------------------------------------------------------------------------------------------------- manifest_hash


def _toy_manifest() -> pa.Table:
    return pa.table({"path": [f"s3://b/{i}.png" for i in range(6)], "label": pa.array([0, 1, 0, 1, None, 1], pa.int8()),
                     "subset": ["a", "a", "b", "b", "b", "c"], "split": ["train", None, "val", "val", None, ""]},
                    schema=MANIFEST_SCHEMA)


def test_manifest_hash_ignores_row_order_and_chunking():
    table = _toy_manifest()
    shuffled = table.take(pa.array([4, 1, 5, 0, 3, 2]))
    rechunked = pa.concat_tables([table.slice(0, 2), table.slice(2)])

    assert manifest_hash(table) == manifest_hash(shuffled) == manifest_hash(rechunked)
    assert len(manifest_hash(table)) == 64


def test_manifest_hash_changes_with_any_value():
    table = _toy_manifest()
    base = manifest_hash(table)
    flipped = table.set_column(1, "label", pa.array([1, 1, 0, 1, None, 1], pa.int8()))
    unlabelled = table.set_column(1, "label", pa.array([0, 1, 0, 1, None, None], pa.int8()))
    renamed = table.set_column(0, "path", pa.array([f"s3://b/{i}.jpg" for i in range(6)]))
    empty_split_vs_null = table.set_column(3, "split", pa.array(["train", None, "val", "val", None, None]))

    hashes = {base, manifest_hash(flipped), manifest_hash(unlabelled), manifest_hash(renamed),
              manifest_hash(empty_split_vs_null), manifest_hash(table.slice(1))}
    assert len(hashes) == 6


def test_write_manifest_round_trip_keeps_the_hash(tmp_path):
    table = _toy_manifest()
    write_manifest(table, str(tmp_path / "m.parquet"))
    assert pq.read_table(tmp_path / "m.parquet").schema == MANIFEST_SCHEMA
    assert manifest_hash(pq.read_table(tmp_path / "m.parquet")) == manifest_hash(table)
    with pytest.raises(ValueError):
        write_manifest(table, str(tmp_path / "m.json"))
