"""pipelines/sources.py: benchmark layouts, manifest files and unlabelled prefixes -> manifests, and their hash."""

from __future__ import annotations

import hashlib
import logging
import os
import uuid

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from pipelines.sources import (
    MANIFEST_SCHEMA,
    SourceConfig,
    build_manifest,
    manifest_hash,
    real_pairs_of,
)
from pipelines.subset_names import UFD_OBJECT_CLASSES
from tests.helpers.images import write_genimage_tree, write_ufd_single_class, write_ufd_tree
from tests.helpers.manifests import write_manifest


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
    # The real GenImage release nests e.g. Midjourney/imagenet_midjourney/train/ai/...: both folders name the same
    # generator, whichever of them (or the root above) the source points at.
    write_genimage_tree(tmp_path / "Midjourney", subsets=("imagenet_midjourney",), n_per_class=1, size=8,
                        splits=("train",))
    whole = build_manifest(SourceConfig(uri=str(tmp_path)))
    one = build_manifest(SourceConfig(uri=str(tmp_path / "Midjourney" / "imagenet_midjourney")))

    assert set(whole["subset"].to_pylist()) == set(one["subset"].to_pylist()) == {"midjourney"}
    assert sorted(whole["label"].to_pylist()) == [0, 1]


# ---------------------------------------------------------------------------------------------- canonical names


def _subset_by_file(uri: str, layout: str) -> dict[str, str]:
    return {row["path"]: row["subset"] for row in build_manifest(SourceConfig(uri=uri, layout=layout)).to_pylist()}


def _same_names_through_every_uri(uris: list[str], layout: str) -> dict[str, str]:
    """The subset of every file listed through each URI; asserts that no URI names a file differently."""
    names: dict[str, str] = {}
    for uri in uris:
        for path, subset in _subset_by_file(uri, layout).items():
            assert names.setdefault(path, subset) == subset, (uri, path, subset, names[path])
    return names


def test_genimage_subset_names_do_not_depend_on_where_the_uri_points(tmp_path):
    root = tmp_path / "genimage"
    write_genimage_tree(root / "stable_diffusion_v_1_4", subsets=("imagenet_ai_0419_sdv4",), n_per_class=1, size=8)
    write_genimage_tree(root / "BigGAN", subsets=("imagenet_ai_0419_biggan",), n_per_class=1, size=8)
    write_genimage_tree(root, subsets=("newgen",), n_per_class=1, size=8)  # not in the alias table
    sd = root / "stable_diffusion_v_1_4"

    names = _same_names_through_every_uri(
        [str(root), str(sd), str(sd / "imagenet_ai_0419_sdv4"), str(root / "BigGAN" / "imagenet_ai_0419_biggan"),
         str(root / "newgen")], "genimage")

    assert set(names.values()) == {"sdv14", "biggan", "newgen"}
    assert len(names) == 12


def test_ufd_subset_names_do_not_depend_on_where_the_uri_points(tmp_path):
    root = tmp_path / "ufd"
    write_ufd_tree(root, subsets={"stylegan": ("car", "cat"), "seeingdark": None, "newgan": ("horse",)},
                   n_per_class=1, size=8)

    names = _same_names_through_every_uri(
        [str(root), str(root / "stylegan"), str(root / "stylegan" / "car"), str(root / "seeingdark"),
         str(root / "newgan"), str(root / "newgan" / "horse")], "ufd")

    assert set(names.values()) == {"stylegan", "sitd", "newgan"}  # SITD's folder is called seeingdark
    assert len(names) == 8


def test_genimage_subset_is_the_folder_directly_above_the_split_folder(tmp_path):
    # An ablation set kept inside a generator's folder is a set of its own, not that generator's test set.
    write_genimage_tree(tmp_path / "ADM", subsets=("ablation", "imagenet_ai_0508_adm"), n_per_class=1, size=8)

    names = _same_names_through_every_uri(
        [str(tmp_path), str(tmp_path / "ADM"), str(tmp_path / "ADM" / "ablation")], "genimage")

    assert sorted(set(names.values())) == ["ablation", "adm"]


def test_ufd_subset_is_the_nearest_folder_above_the_class_folder_that_is_no_object_category(tmp_path):
    # A custom set stored under a folder named like a UFD set keeps its own name.
    write_ufd_tree(tmp_path / "custom" / "imagenet", subsets={"my_sd_fakes": None, "stylegan": ("car",)},
                   n_per_class=1, size=8)

    names = _same_names_through_every_uri(
        [str(tmp_path), str(tmp_path / "custom" / "imagenet"), str(tmp_path / "custom" / "imagenet" / "my_sd_fakes"),
         str(tmp_path / "custom" / "imagenet" / "stylegan" / "car")], "ufd")

    assert sorted(set(names.values())) == ["my_sd_fakes", "stylegan"]


def test_ufd_object_categories_cover_the_class_folders_of_the_ufd_sets():
    progan = {"airplane", "bicycle", "bird", "boat", "bottle", "bus", "car", "cat", "chair", "cow", "diningtable",
              "dog", "horse", "motorbike", "person", "pottedplant", "sheep", "sofa", "train", "tvmonitor"}
    stylegan, stylegan2 = {"bedroom", "car", "cat"}, {"car", "cat", "church", "horse"}
    cyclegan = {"apple", "horse", "orange", "summer", "winter", "zebra"}

    assert progan | stylegan | stylegan2 | cyclegan <= UFD_OBJECT_CLASSES


def test_subset_filters_accept_canonical_names_and_aliases(tmp_path):
    write_genimage_tree(tmp_path / "stable_diffusion_v_1_4", subsets=("imagenet_ai_0419_sdv4",), n_per_class=1,
                        size=8)
    write_genimage_tree(tmp_path / "Midjourney", subsets=("imagenet_midjourney",), n_per_class=1, size=8)

    tables = [build_manifest(SourceConfig(uri=str(tmp_path), subsets=[name]))
              for name in ("sdv14", "stable_diffusion_v_1_4", "IMAGENET_AI_0419_SDV4")]

    assert all(t.equals(tables[0]) for t in tables)
    assert set(tables[0]["subset"].to_pylist()) == {"sdv14"} and tables[0].num_rows == 4


def test_manifest_file_subsets_get_the_canonical_names(tmp_path):
    (tmp_path / "m.csv").write_text("path,label,subset\na.png,1,Midjourney\nb.png,0,imagenet_midjourney\n"
                                    "c.png,1,my_own_set\n")

    table = build_manifest(SourceConfig(uri=str(tmp_path / "m.csv"), layout="manifest", subsets=["Midjourney"]))

    assert table["subset"].to_pylist() == ["midjourney", "midjourney"]


# ------------------------------------------------------------------------------------------- carving validation


def _carved_relative_paths(root, fraction: float, keep: str, cfg=None, uri=None) -> set[str]:
    uri = uri or str(root)
    table = build_manifest(SourceConfig(uri=uri, split="train", carve={"fraction": fraction, "keep": keep}), cfg)
    return {path[len(uri.rstrip("/")) + 1:] for path in table["path"].to_pylist()}


def test_carve_splits_a_source_into_disjoint_parts_that_together_are_the_split(tmp_path):
    write_genimage_tree(tmp_path, subsets=("sdv14",), n_per_class=40, size=8, splits=("train", "val"))
    whole = build_manifest(SourceConfig(uri=str(tmp_path), split="train"))
    whole_paths = {p[len(str(tmp_path)) + 1:] for p in whole["path"].to_pylist()}

    rest = _carved_relative_paths(tmp_path, 0.25, "rest")
    carved = _carved_relative_paths(tmp_path, 0.25, "carved")

    assert rest.isdisjoint(carved) and rest | carved == whole_paths
    assert 8 <= len(carved) <= 32  # about a quarter of 80
    # The documented rule: sha256 of "<subset>/<path below the split folder>", first 8 bytes as a fraction of 2**64.
    assert carved == {p for p in whole_paths if _hash_fraction("sdv14/" + p.split("/", 2)[2]) < 0.25}


def _hash_fraction(key: str) -> float:
    return int(hashlib.sha256(key.encode()).hexdigest()[:16], 16) / 2**64


def _paths(uri, **source) -> set[str]:
    return set(build_manifest(SourceConfig(uri=str(uri), **source))["path"].to_pylist())


def test_genimage_carve_does_not_depend_on_the_folder_the_uri_points_at(tmp_path):
    sd = tmp_path / "stable_diffusion_v_1_4"
    write_genimage_tree(sd, subsets=("imagenet_ai_0419_sdv4",), n_per_class=20, size=8, splits=("train",))
    write_genimage_tree(tmp_path / "Midjourney", subsets=("imagenet_midjourney",), n_per_class=2, size=8,
                        splits=("train",))
    carve = {"fraction": 0.3, "keep": "rest"}
    train = _paths(tmp_path, split="train", subsets=["sdv14"], carve=carve)
    split = _paths(sd, split="train")

    for val_uri in (sd, sd / "imagenet_ai_0419_sdv4"):
        val = _paths(val_uri, split="train", carve={**carve, "keep": "carved"})
        assert val and train.isdisjoint(val) and train | val == split, val_uri


def test_ufd_carve_does_not_depend_on_the_folder_the_uri_points_at(tmp_path):
    write_ufd_tree(tmp_path, subsets={"progan": ("car", "cat")}, n_per_class=10, size=8)
    carve = {"fraction": 0.3, "keep": "rest"}
    train = _paths(tmp_path, layout="ufd", carve=carve)
    val = _paths(tmp_path / "progan", layout="ufd", carve={**carve, "keep": "carved"})
    val_car = _paths(tmp_path / "progan" / "car", layout="ufd", carve={**carve, "keep": "carved"})

    assert val and train.isdisjoint(val) and train | val == _paths(tmp_path, layout="ufd")
    assert val_car == {path for path in val if "/car/" in path}


@pytest.mark.timeout(60)
def test_carve_is_the_same_wherever_the_dataset_is_mounted(corpora):
    local = corpora["root"] / "genimage"
    on_s3 = _carved_relative_paths(None, 0.5, "carved", corpora["cfg"], uri=f"{corpora['bucket']}/genimage")

    assert _carved_relative_paths(local, 0.5, "carved") == on_s3
    assert 0 < len(on_s3) < 8


def test_carve_fraction_must_be_a_proper_fraction():
    with pytest.raises(ValueError):
        SourceConfig(uri="s3://b/x", carve={"fraction": 1.0, "keep": "rest"})
    with pytest.raises(ValueError):
        SourceConfig(uri="s3://b/x", carve={"fraction": 0.1, "keep": "validation"})


# -------------------------------------------------------------------------------- UFD real/fake pairing


def _ufd_with_diffusion_sets(root) -> None:
    write_ufd_tree(root, subsets={"progan": ("car",)}, n_per_class=2, size=8)
    for subset in ("guided", "ldm_200", "dalle"):
        write_ufd_single_class(root, subset, label=1, n=2, size=8)
    for subset in ("imagenet", "laion"):
        write_ufd_single_class(root, subset, label=0, n=3, size=8)


def test_ufd_diffusion_sets_are_paired_with_their_real_sets_by_default(tmp_path):
    _ufd_with_diffusion_sets(tmp_path)
    source = SourceConfig(uri=str(tmp_path), layout="ufd")
    table = build_manifest(source)

    assert real_pairs_of([source]) == {
        "guided": "imagenet", "ldm_200": "laion", "ldm_200_cfg": "laion", "ldm_100": "laion",
        "glide_100_27": "laion", "glide_50_27": "laion", "glide_100_10": "laion", "dalle": "laion"}
    assert table.num_rows == 4 + 3 * 2 + 2 * 3  # every real image listed once
    assert real_pairs_of([SourceConfig(uri="x", layout="genimage")]) == {}


def test_real_pairs_can_be_overridden_and_a_subset_filter_keeps_the_paired_real_set(tmp_path):
    _ufd_with_diffusion_sets(tmp_path)
    own = SourceConfig(uri=str(tmp_path), layout="ufd", real_pairs={"dalle": "imagenet"}, subsets=["dalle"])

    table = build_manifest(own)

    assert real_pairs_of([own]) == {"dalle": "imagenet"}
    assert sorted(set(table["subset"].to_pylist())) == ["dalle", "imagenet"]
    with pytest.raises(ValueError, match="guided"):
        real_pairs_of([SourceConfig(uri="a", layout="ufd"),
                       SourceConfig(uri="b", layout="ufd", real_pairs={"guided": "laion"})])


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


# ------------------------------------------------------------------------------------- every object is an input


def _crawl_like(root) -> set[str]:
    """Files as a crawl leaves them; returns the relative paths that must be listed (every non-hidden file)."""
    files = {"a.png": b"png", "B.JPG": b"jpg", "3f9a0c7e": b"no extension", "notes.txt": b"text",
             "sub/deep/41d8cd98": b"no extension", ".hidden.png": b"hidden", "._a.png": b"macOS fork",
             ".cache/x.png": b"in a hidden folder", "sub/.git/objects/ab": b"in a hidden folder"}
    for rel, data in files.items():
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        (root / rel).write_bytes(data)
    return {rel for rel in files if not any(part.startswith(".") for part in rel.split("/"))}


def test_every_file_is_listed_whatever_its_extension_except_hidden_ones(tmp_path):
    visible = _crawl_like(tmp_path / "crawl")
    os.mkfifo(tmp_path / "crawl" / "pipe")  # not a file: reading it would never end

    table = build_manifest(SourceConfig(uri=str(tmp_path / "crawl"), layout="unlabelled"))

    assert table["path"].to_pylist() == sorted(str(tmp_path / "crawl" / rel) for rel in visible)


def test_a_hidden_folder_above_the_source_does_not_hide_it(tmp_path):
    visible = _crawl_like(tmp_path / ".cache" / "crawl")

    table = build_manifest(SourceConfig(uri=str(tmp_path / ".cache" / "crawl"), layout="unlabelled"))

    assert table.num_rows == len(visible)


@pytest.mark.timeout(60)
def test_an_s3_crawl_lists_extensionless_keys_and_skips_hidden_folders(tmp_path, s3_server):
    visible = _crawl_like(tmp_path / "crawl")
    bucket = f"crawl-{uuid.uuid4().hex[:10]}"
    s3_server.create_bucket(bucket)
    s3_server.upload_dir(tmp_path / "crawl", f"s3://{bucket}/in")

    table = build_manifest(SourceConfig(uri=f"s3://{bucket}/in", layout="unlabelled"), s3_server.storage_config())

    assert table["path"].to_pylist() == sorted(f"s3://{bucket}/in/{rel}" for rel in visible)


def test_extensions_narrow_the_listing_whatever_the_case(tmp_path):
    _crawl_like(tmp_path)

    table = build_manifest(SourceConfig(uri=str(tmp_path), layout="unlabelled", extensions=["PNG", ".jpg"]))

    assert table["path"].to_pylist() == [str(tmp_path / "B.JPG"), str(tmp_path / "a.png")]


def test_extensions_are_normalised_and_nonsense_is_refused():
    assert SourceConfig(uri="x", extensions=["png", " .JPG", ".png"]).extensions == [".jpg", ".png"]
    for bad in ([], [""], ["."], ["a/b"], [".tar.gz"]):
        with pytest.raises(ValueError, match="extension"):
            SourceConfig(uri="x", layout="unlabelled", extensions=bad)
    with pytest.raises(ValueError, match="a manifest names its files"):
        SourceConfig(uri="m.csv", layout="manifest", extensions=[".png"])


@pytest.mark.parametrize("layout, class_folder, label", [("genimage", "sdv14/train/ai", 1),
                                                         ("ufd", "progan/car/0_real", 0)])
def test_labelled_layouts_take_extensionless_files_and_skip_hidden_ones(tmp_path, layout, class_folder, label):
    (tmp_path / class_folder / ".thumbnails").mkdir(parents=True)
    for rel in ("0001.png", "e3b0c442", ".DS_Store", ".thumbnails/0001.png"):
        (tmp_path / class_folder / rel).write_bytes(b"bytes the decoder sniffs")

    table = build_manifest(SourceConfig(uri=str(tmp_path), layout=layout))
    only_png = build_manifest(SourceConfig(uri=str(tmp_path), layout=layout, extensions=[".png"]))

    assert table["path"].to_pylist() == [str(tmp_path / class_folder / n) for n in ("0001.png", "e3b0c442")]
    assert set(table["label"].to_pylist()) == {label}
    assert only_png["path"].to_pylist() == [str(tmp_path / class_folder / "0001.png")]


# --------------------------------------------------------------------------------------------------- manifest files


@pytest.mark.timeout(60)
@pytest.mark.parametrize("ext", ["parquet", "csv"])
def test_manifest_file_on_s3_resolves_relative_paths(corpora, ext):
    bucket, cfg = corpora["bucket"], corpora["cfg"]
    listed = build_manifest(SourceConfig(uri=f"{bucket}/genimage"), cfg)
    # Relative to the manifest's folder (with ./ and ../), plus one absolute URI; all outside manifests/, so opted in.
    rel_paths = ["../" + p[len(bucket) + 1:] for p in listed["path"].to_pylist()]
    rel_paths[0] = "./../" + rel_paths[0][3:]
    rel_paths[1] = listed["path"][1].as_py()
    table = listed.set_column(0, "path", pa.array(rel_paths, pa.string()))
    uri = f"{bucket}/manifests/gen.{ext}"
    write_manifest(table, uri, cfg)

    read = build_manifest(SourceConfig(uri=uri, layout="manifest", allow_outside_corpus=True), cfg)
    val = build_manifest(SourceConfig(uri=uri, layout="manifest", split="val", allow_outside_corpus=True), cfg)

    assert _rows(read) == _rows(listed)
    assert manifest_hash(read) == manifest_hash(listed)
    assert set(val["split"].to_pylist()) == {"val"} and val.num_rows == 8


def test_manifest_csv_with_only_path_and_label(tmp_path):
    (tmp_path / "m").mkdir()
    (tmp_path / "m" / "crawl.csv").write_text("path,label\nimgs/a.png,1\nimgs/b.png,\n/abs/c.png,0\n")

    table = build_manifest(SourceConfig(uri=str(tmp_path / "m" / "crawl.csv"), layout="manifest",
                                        allow_outside_corpus=True))

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


def _manifest_with(folder, *rows: str) -> str:
    """A CSV manifest in ``folder`` holding one good row (imgs/ok.png) and then ``rows``."""
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "imgs").mkdir(exist_ok=True)
    (folder / "imgs" / "ok.png").write_bytes(b"png")
    uri = folder / "crawl.csv"
    uri.write_text("path,label\nimgs/ok.png,1\n" + "".join(f"{row},0\n" for row in rows))
    return str(uri)


@pytest.mark.parametrize("row", ["/etc/passwd", "../secret.png", "imgs/../../secret.png", "s3://other/x.png"])
def test_a_manifest_row_outside_its_folder_is_refused_unless_allowed(tmp_path, row):
    (tmp_path / "secret.png").write_text("the-secret-content")
    uri = _manifest_with(tmp_path / "m", row)

    with pytest.raises(ValueError, match=r"1 of 2 rows point outside the manifest's folder.*row 2") as refused:
        build_manifest(SourceConfig(uri=uri, layout="manifest"))
    allowed = build_manifest(SourceConfig(uri=uri, layout="manifest", allow_outside_corpus=True))

    assert row in str(refused.value) and "the-secret-content" not in str(refused.value)
    assert "allow_outside_corpus" in str(refused.value)
    assert allowed.num_rows == 2


def test_an_absolute_row_climbing_out_or_a_symlink_leading_out_is_refused(tmp_path):
    (tmp_path / "secret.png").write_text("the-secret-content")
    climbing = _manifest_with(tmp_path / "m", f"{tmp_path / 'm'}/../secret.png")
    (tmp_path / "n" / "imgs").mkdir(parents=True)
    (tmp_path / "n" / "imgs" / "link.png").symlink_to(tmp_path / "secret.png")
    linked = _manifest_with(tmp_path / "n", "imgs/link.png")

    for uri in (climbing, linked):
        with pytest.raises(ValueError, match=r"1 of 2 rows point outside the manifest's folder.*row 2"):
            build_manifest(SourceConfig(uri=uri, layout="manifest"))
    assert build_manifest(SourceConfig(uri=linked, layout="manifest", allow_outside_corpus=True)).num_rows == 2


def test_a_manifest_may_name_its_own_files_by_absolute_path(tmp_path):
    uri = _manifest_with(tmp_path / "m", str(tmp_path / "m" / "imgs" / "ok2.png"), "imgs/./sub/../ok3.png")

    table = build_manifest(SourceConfig(uri=uri, layout="manifest"))

    assert table["path"].to_pylist() == [str(tmp_path / "m" / "imgs" / n) for n in ("ok.png", "ok2.png", "ok3.png")]


def test_special_files_in_a_manifest_are_refused_even_when_outside_rows_are_allowed(tmp_path):
    os.mkfifo(tmp_path / "pipe")
    (tmp_path / "environ").symlink_to("/proc/self/environ")
    for row in ("/dev/zero", "/proc/self/environ", "/sys/kernel/notes", "pipe", "environ"):
        uri = _manifest_with(tmp_path, row)
        for allow in (False, True):
            with pytest.raises(ValueError, match=r"1 of 2 rows name a special file.*row 2"):
                build_manifest(SourceConfig(uri=uri, layout="manifest", allow_outside_corpus=allow))


@pytest.mark.timeout(60)
def test_an_s3_manifest_cannot_reach_another_bucket_or_the_local_disk(corpora):
    bucket, cfg = corpora["bucket"], corpora["cfg"]
    inside = "genimage/sdv14/val/ai/0000.png"

    def manifest_at_bucket_root(row: str) -> SourceConfig:
        uri = f"{bucket}/mf-{uuid.uuid4().hex[:6]}.csv"
        write_manifest(pa.table({"path": [inside, row], "label": pa.array([1, 1], pa.int8()),
                                 "subset": ["a", "a"], "split": [None, None]}), uri, cfg)
        return SourceConfig(uri=uri, layout="manifest")

    for row in (f"s3://elsewhere-{uuid.uuid4().hex[:6]}/x.png", "/etc/passwd", "../x.png"):
        with pytest.raises(ValueError, match="1 of 2 rows point outside"):
            build_manifest(manifest_at_bucket_root(row), cfg)
    table = build_manifest(manifest_at_bucket_root(f"{bucket}/genimage/sdv14/val/ai/0001.png"), cfg)
    assert table["path"].to_pylist() == [f"{bucket}/{inside}", f"{bucket}/genimage/sdv14/val/ai/0001.png"]

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


def test_a_manifest_written_to_parquet_and_read_back_keeps_its_hash(tmp_path):
    table = _toy_manifest()
    write_manifest(table, str(tmp_path / "m.parquet"))
    assert pq.read_table(tmp_path / "m.parquet").schema == MANIFEST_SCHEMA
    assert manifest_hash(pq.read_table(tmp_path / "m.parquet")) == manifest_hash(table)
