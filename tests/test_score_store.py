"""The score store: content seen before (by the same model) is not scored again, duplicates in a crawl are scored
once, every input still gets exactly one row, and a reused row equals a fresh score of the same bytes."""

from __future__ import annotations

import dataclasses
import logging
import re
import shutil
from pathlib import Path

import fsspec.implementations.local
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image

from pipelines import scoring
from pipelines.score_store import ScoreStore, content_hash, model_fingerprint, plan_reuse
from pipelines.scoring import ScoreJob, read_scores, run_scoring
from pipelines.scoring_spec import ResolvedModel, ScoringResources
from tests.helpers.images import BAD_CORPUS_MAX_PIXELS, fake_images, real_photo_crops, write_bad_corpus
from tests.helpers.models import tiny_checkpoint


@pytest.fixture(scope="module")
def model(tmp_path_factory) -> ResolvedModel:
    checkpoint = tiny_checkpoint(tmp_path_factory.mktemp("ckpt") / "model", threshold=0.47, seed=0)
    return ResolvedModel(checkpoint_dir=str(checkpoint), uri=str(checkpoint), name="tiny", version="1")


def _write_images(folder: Path, images, prefix: str) -> list[Path]:
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for i, pixels in enumerate(images):
        path = folder / f"{prefix}{i:03d}.png"
        Image.fromarray(pixels).save(path)
        paths.append(path)
    return paths


def _job(input_uri, output_uri, store, **kw) -> ScoreJob:
    resources = ScoringResources(batch_size=8, rows_per_block=8, max_pixels=BAD_CORPUS_MAX_PIXELS, num_actors=1,
                                 actor_cpus=0.5, decode_cpus=0.25)
    return ScoreJob(model_ref="tiny", input_uri=str(input_uri), output_uri=str(output_uri), resources=resources,
                    score_store=None if store is None else str(store), **kw)


def _every_row(output, cfg=None) -> pa.Table:
    fs, _ = scoring._output_location(str(output), cfg)
    parts = scoring.list_part_files(str(output), cfg)
    return pa.concat_tables([pq.read_table(p, filesystem=fs) for p in parts], promote_options="permissive")


def _by_path(table: pa.Table) -> dict[str, dict]:
    return {row["path"]: row for row in table.to_pylist()}


# ------------------------------------------------------------------------------------------------ plan and store


def _hashed(pairs):
    return pa.table({"path": [p for p, _ in pairs], "content_hash": [h for _, h in pairs]},
                    schema=pa.schema([("path", pa.string()), ("content_hash", pa.string())]))


def test_the_plan_reuses_stored_content_scores_new_content_once_and_every_unreadable_input():
    todo = pa.table({"path": ["/c/a", "/c/b", "/c/c", "/c/d", "/c/e", "/c/f"]})
    hashed = _hashed([("/c/f", None), ("/c/e", "h2"), ("/c/d", "h1"), ("/c/c", "h2"), ("/c/b", "h1"),
                      ("/c/a", "h0")])  # out of manifest order, as Ray may return blocks
    stored = pa.table({"content_hash": ["h0"], "score": pa.array([0.25], pa.float32()),
                       "width": pa.array([7], pa.int32()), "height": pa.array([5], pa.int32())})

    plan = plan_reuse(todo, hashed, stored)

    assert _by_path(plan.reused)["/c/a"]["score"] == 0.25 and plan.reused.num_rows == 1
    # The first input (in manifest order) of each new content is scored, with every unreadable one.
    assert sorted(plan.to_score.column("path").to_pylist()) == ["/c/b", "/c/c", "/c/f"]
    assert dict(zip(*plan.duplicates.select(["path", "content_hash"]).to_pydict().values(), strict=True)) == {
        "/c/d": "h1", "/c/e": "h2"}


def _stored_rows(hashes, scores):
    n = len(hashes)
    return pa.table({"content_hash": hashes, "score": pa.array(scores, pa.float32()),
                     "width": pa.array([3] * n, pa.int32()), "height": pa.array([4] * n, pa.int32()),
                     "model_uri": ["m"] * n, "scored_at": pa.array([None] * n, pa.timestamp("us", tz="UTC"))})


META = {"architecture": {"name": "mpft-tiny-32"}, "detector": {"last_k": 1}, "preprocess": {"image_size": 32},
        "format_version": 2, "threshold": 0.5, "real_threshold": 0.4}


def test_the_store_serves_a_hash_only_to_the_model_that_scored_it(tmp_path):
    first = ScoreStore(str(tmp_path / "store"), model_fingerprint("aa", META))
    retrained = ScoreStore(str(tmp_path / "store"), model_fingerprint("cc", META))
    hashes = [content_hash(b"one"), content_hash(b"two")]
    first.add(_stored_rows(hashes, [0.1, 0.9]), "run1")

    found = first.lookup(hashes + [content_hash(b"three")])
    scores = dict(zip(found.column("content_hash").to_pylist(), found.column("score").to_pylist(), strict=True))
    assert scores == {hashes[0]: pytest.approx(0.1), hashes[1]: pytest.approx(0.9)}
    assert retrained.lookup(hashes).num_rows == 0


def test_a_recalibrated_model_keeps_its_stored_scores_but_other_preprocessing_or_device_does_not():
    recalibrated = {**META, "threshold": 0.7, "real_threshold": 0.2}
    other_crop = {**META, "preprocess": {"image_size": 224}}
    assert model_fingerprint("aa", recalibrated) == model_fingerprint("aa", META)
    assert model_fingerprint("aa", other_crop) != model_fingerprint("aa", META)
    assert model_fingerprint("aa", META, "cuda") != model_fingerprint("aa", META, "cpu")


def test_a_row_without_a_score_is_not_stored_and_a_hash_stored_twice_is_read_once(tmp_path):
    store = ScoreStore(str(tmp_path / "store"), "m1")
    rows = _stored_rows([content_hash(b"a"), content_hash(b"b")], [0.5, None])
    assert store.add(rows, "run1") == 1
    store.add(_stored_rows([content_hash(b"a")], [0.5]), "run2")
    assert store.lookup([content_hash(b"a"), content_hash(b"b")]).column("content_hash").to_pylist() == [
        content_hash(b"a")]


def test_a_lookup_reads_only_the_buckets_of_its_hashes_and_skips_a_torn_part(tmp_path, caplog):
    store = ScoreStore(str(tmp_path / "store"), "m1")
    a, b = content_hash(b"a"), content_hash(b"b")
    assert a[:2] != b[:2]
    store.add(_stored_rows([a, b], [0.2, 0.8]), "run1")
    torn = Path(store.model_dir) / f"bucket={b[:2]}" / "part-run0.parquet"
    torn.write_bytes(b"PAR1 cut short")

    with caplog.at_level(logging.WARNING, logger="pipelines.score_store"):
        assert store.lookup([a]).column("content_hash").to_pylist() == [a]
    assert "unreadable" not in caplog.text  # bucket b was never opened
    with caplog.at_level(logging.WARNING, logger="pipelines.score_store"):
        assert store.lookup([b]).column("content_hash").to_pylist() == [b]
    assert "skipping unreadable part" in caplog.text


def _at(day: int):
    from datetime import datetime, timezone

    return datetime(2026, 1, day, tzinfo=timezone.utc)


def _day_rows(hashes, score: float, day: int) -> pa.Table:
    rows = _stored_rows(hashes, [score] * len(hashes))
    return rows.set_column(rows.schema.get_field_index("scored_at"), "scored_at",
                           pa.array([_at(day)] * len(hashes), pa.timestamp("us", tz="UTC")))


def _files(store: ScoreStore) -> dict[str, list[str]]:
    by_bucket: dict[str, list[str]] = {}
    for part in store._parts():
        by_bucket.setdefault(part.rsplit("/", 2)[-2], []).append(part.rsplit("/", 1)[-1])
    return by_bucket


def _same_bucket_hashes(n: int) -> list[str]:
    hashes, i = [], 0
    while len(hashes) < n:
        h = content_hash(f"image {i}".encode())
        if h.startswith("00"):
            hashes.append(h)
        i += 1
    return hashes


def test_daily_runs_keep_each_bucket_under_the_compaction_size_and_the_earliest_score_of_each_hash(tmp_path):
    store = ScoreStore(str(tmp_path / "store"), "m1")
    hashes = _same_bucket_hashes(8)  # all in bucket 00, so it fills up quickly
    seen_first = {}
    for day in range(1, 11):  # every day one image seen before (a later, different score) and a new one
        new, again = hashes[day % 8], hashes[(day + 3) % 8]
        # Run names that sort against time: a merge that kept the first file listed would keep the latest score.
        store.add(_day_rows([new, again], score=day / 20, day=day), f"r{99 - day:02d}")
        merged = store.compact(min_parts=4)  # as each scoring job does once its rows are written
        assert merged == (1 if day in (4, 7, 10) else 0)  # a file a day; the fourth makes one (then 1 + 3 more)
        for h in (new, again):
            seen_first.setdefault(h, day / 20)
        assert all(len(files) < 4 for files in _files(store).values()), _files(store)

    assert any(name.startswith("part-compacted-") for files in _files(store).values() for name in files)
    found = store.lookup(hashes)
    scores = dict(zip(found.column("content_hash").to_pylist(), found.column("score").to_pylist(), strict=True))
    assert scores == pytest.approx(seen_first)  # every hash once, with the score it got the first time


def test_a_torn_file_is_left_out_of_a_merge_and_left_in_place(tmp_path, caplog):
    store = ScoreStore(str(tmp_path / "store"), "m1")
    a, b = _same_bucket_hashes(2)
    store.add(_day_rows([a], 0.25, day=1), "day1")
    torn = Path(store.model_dir) / f"bucket={a[:2]}" / "part-day0.parquet"
    torn.write_bytes(b"PAR1 cut short")
    store.add(_day_rows([b], 0.75, day=2), "day2")
    with caplog.at_level(logging.WARNING, logger="pipelines.score_store"):
        assert store.compact(min_parts=3) == 1

    names = sorted(next(iter(_files(store).values())))
    assert names[0].startswith("part-compacted-") and names[1:] == ["part-day0.parquet"]
    assert torn.read_bytes() == b"PAR1 cut short"
    assert "skipping unreadable part" in caplog.text
    assert store.lookup([a, b]).num_rows == 2


def _stale_listing_then_compaction(reader: ScoreStore, writer: ScoreStore, monkeypatch) -> list:
    """Makes ``reader``'s next lookup list the store, then lets ``writer`` merge it before the reads."""
    listings = []
    real_parts = reader._parts

    def listing_then_another_run_compacts():
        listings.append(real_parts())
        if len(listings) == 1:
            assert writer.compact(min_parts=2) == 1
        return listings[-1]

    monkeypatch.setattr(reader, "_parts", listing_then_another_run_compacts)
    return listings


def test_a_file_merged_away_during_a_lookup_is_read_from_the_merged_file(tmp_path, monkeypatch):
    reader, writer = ScoreStore(str(tmp_path / "store"), "m1"), ScoreStore(str(tmp_path / "store"), "m1")
    hashes = _same_bucket_hashes(3)
    for day, h in enumerate(hashes, start=1):
        writer.add(_day_rows([h], day / 10, day=day), f"day{day}")
    listings = _stale_listing_then_compaction(reader, writer, monkeypatch)

    found = reader.lookup(hashes)

    assert len(listings) == 2 and all("compacted" in p for p in listings[1])
    assert sorted(found.column("score").to_pylist()) == pytest.approx([0.1, 0.2, 0.3])


class _NoDeletes(fsspec.implementations.local.LocalFileSystem):
    """A local folder where deleting is refused (``allow``: what names containing these may still be deleted), as
    in a bucket whose policy grants no delete."""

    allow = ()

    def rm(self, path, recursive=False, maxdepth=None):
        if not any(name in str(path) for name in self.allow):
            raise PermissionError(f"AccessDenied: {path}")
        super().rm(path, recursive=recursive, maxdepth=maxdepth)

    rm_file = rm


class _OnlyItsOwnFiles(_NoDeletes):
    """Deletes allowed only on what this job wrote itself (its check file, its merged file)."""

    allow = (".delete-check", "part-compacted-")


@pytest.mark.parametrize("fs_class, warned", [(_NoDeletes, "could not delete there"),
                                               (_OnlyItsOwnFiles, "taking the merged copy back out")],
                         ids=["no deletes", "only its own files"])
def test_a_store_that_refuses_deletes_keeps_its_files_and_gains_none(tmp_path, monkeypatch, caplog, fs_class,
                                                                     warned):
    import pyarrow.fs as pafs

    store = ScoreStore(str(tmp_path / "store"), "m1")
    monkeypatch.setattr(store, "fs", pafs.PyFileSystem(pafs.FSSpecHandler(fs_class())))
    a, b = _same_bucket_hashes(2)
    store.add(_day_rows([a], 0.25, day=1), "day1")
    store.add(_day_rows([b], 0.75, day=2), "day2")
    with caplog.at_level(logging.WARNING, logger="pipelines.score_store"):
        assert store.compact(min_parts=2) == 0

    assert sorted(next(iter(_files(store).values()))) == ["part-day1.parquet", "part-day2.parquet"]
    assert warned in caplog.text
    assert store.lookup([a, b]).num_rows == 2


class _DeletesThenFails(fsspec.implementations.local.LocalFileSystem):
    """Deletes a part and then reports an error anyway, as a store whose answer was lost on the way."""

    def rm(self, path, recursive=False, maxdepth=None):
        super().rm(path, recursive=recursive, maxdepth=maxdepth)
        if "part-day" in str(path):
            raise OSError(f"connection reset after deleting {path}")

    rm_file = rm


def test_a_delete_that_went_through_despite_an_error_still_completes_the_merge(tmp_path, monkeypatch):
    import pyarrow.fs as pafs

    store = ScoreStore(str(tmp_path / "store"), "m1")
    monkeypatch.setattr(store, "fs", pafs.PyFileSystem(pafs.FSSpecHandler(_DeletesThenFails())))
    a, b, c = _same_bucket_hashes(3)
    for day, h in enumerate((a, b, c), start=1):
        store.add(_day_rows([h], day / 10, day=day), f"day{day}")

    assert store.compact(min_parts=3) == 1
    [names] = _files(store).values()
    assert len(names) == 1 and names[0].startswith("part-compacted-")
    assert store.lookup([a, b, c]).num_rows == 3


@pytest.mark.timeout(120)
def test_compaction_and_a_lookup_racing_it_on_the_s3_server(s3_server, monkeypatch):
    s3_server.create_bucket("compacted-store")
    cfg = s3_server.storage_config()
    store = ScoreStore("s3://compacted-store/tiny", "m1", cfg)
    hashes = _same_bucket_hashes(4)
    for day, h in enumerate(hashes[:3], start=1):
        store.add(_day_rows([h, hashes[0]], day / 10, day=day), f"day{day}")
    reader = ScoreStore("s3://compacted-store/tiny", "m1", cfg)
    listings = _stale_listing_then_compaction(reader, store, monkeypatch)

    found = reader.lookup(hashes)

    assert len(listings) == 2
    scores = dict(zip(found.column("content_hash").to_pylist(), found.column("score").to_pylist(), strict=True))
    assert scores == pytest.approx({hashes[0]: 0.1, hashes[1]: 0.2, hashes[2]: 0.3})
    store.add(_day_rows([hashes[3]], 0.4, day=4), "day4")
    [names] = _files(store).values()
    assert len(names) == 2 and names[0].startswith("part-compacted-") and names[1] == "part-day4.parquet"


# ------------------------------------------------------------------------------------------------ the scoring job


@pytest.fixture(scope="module")
def crawls(tmp_path_factory) -> dict[str, Path]:
    """Day 1: photos, fakes, three copies of one photo under other names, and the awkward-files corpus (undecodable
    files included). Day 2: half of day 1's images again under new names, plus new images."""
    root = tmp_path_factory.mktemp("crawls")
    day1 = root / "day1"
    (day1 / "odd").mkdir(parents=True)
    write_bad_corpus(day1 / "odd")
    old = _write_images(day1 / "a", real_photo_crops(4, 40, seed=3) + fake_images(4, 40, seed=3), "img")
    for i in range(3):
        shutil.copy(old[0], day1 / "a" / f"copy{i}.png")
    day2 = root / "day2"
    (day2 / "seen").mkdir(parents=True)
    for path in old[::2]:
        shutil.copy(path, day2 / "seen" / f"again-{path.name}")
    _write_images(day2 / "new", real_photo_crops(3, 40, seed=9) + fake_images(3, 40, seed=9), "new")
    return {"day1": day1, "day2": day2, "root": root}


@pytest.mark.timeout(240)
def test_a_second_crawl_reuses_scores_of_seen_content_and_every_input_gets_one_row(ray_local, model, crawls, tmp_path,
                                                                                   monkeypatch):
    from pipelines import score_store

    # A file in every bucket beforehand and a merge size of two: the first job merges each bucket it stores into.
    monkeypatch.setattr(score_store, "COMPACT_AT_PARTS", 2)
    store = tmp_path / "store"
    fillers = [f"{b:02x}" + "f" * 62 for b in range(256)]
    ScoreStore(str(store), _fingerprint(model)).add(_day_rows(fillers, 0.5, day=1), "earlier")
    first = run_scoring(_job(crawls["day1"], tmp_path / "out1", store), model)
    merged = sorted(store.rglob("part-compacted-*.parquet"))
    assert merged and len(list(store.rglob("part-earlier.parquet"))) == 256 - len(merged)

    rows1 = _every_row(tmp_path / "out1")
    listed1 = [str(p) for p in crawls["day1"].rglob("*") if p.is_file()]
    assert sorted(rows1.column("path").to_pylist()) == sorted(listed1)
    kinds1 = _by_path(rows1)
    copies = [str(crawls["day1"] / "a" / f"copy{i}.png") for i in range(3)]
    original = str(crawls["day1"] / "a" / "img000.png")
    # Four inputs with one content: one scored, the rest copies of its row.
    same = [kinds1[p] for p in [original, *copies]]
    assert sorted(r["reuse"] for r in same) == ["duplicate", "duplicate", "duplicate", "fresh"]
    assert len({(r["score"], r["verdict"], r["width"], r["content_hash"]) for r in same}) == 1
    assert first.n_duplicates == 3 and first.n_reused == 0
    assert first.n_written == len(listed1) == first.n_inputs
    undecodable = [r for r in rows1.to_pylist() if r["error"] is not None]
    assert undecodable and all(r["reuse"] == "fresh" and r["score"] is None for r in undecodable)

    second = run_scoring(_job(crawls["day2"], tmp_path / "out2", store), model)

    rows2 = _by_path(_every_row(tmp_path / "out2"))
    listed2 = sorted(str(p) for p in crawls["day2"].rglob("*") if p.is_file())
    assert sorted(rows2) == listed2
    seen = {p for p in listed2 if "/seen/" in p}
    assert {p for p, r in rows2.items() if r["reuse"] == "reused"} == seen
    assert {p for p, r in rows2.items() if r["reuse"] == "fresh"} == set(listed2) - seen
    assert (second.n_reused, second.n_scored, second.n_duplicates) == (len(seen), len(listed2) - len(seen), 0)

    # Reuse is exact: a reused row carries the very score day 1's model gave those bytes ...
    day1_by_hash = {r["content_hash"]: r for r in kinds1.values() if r["reuse"] == "fresh"}
    for path in seen:
        stored = day1_by_hash[rows2[path]["content_hash"]]
        assert (rows2[path]["score"], rows2[path]["verdict"], rows2[path]["width"], rows2[path]["height"]) == \
            (stored["score"], stored["verdict"], stored["width"], stored["height"])
    # ... and equals a fresh score of the same bytes now, up to the last float32 bit a CPU matmul may change with
    # the batch it runs in.
    run_scoring(_job(crawls["day2"], tmp_path / "plain", None), model)
    plain = _by_path(read_scores(str(tmp_path / "plain")))
    for path in seen:
        reused, fresh = rows2[path], plain[path]
        assert fresh["reuse"] == "fresh" and reused["content_hash"] == fresh["content_hash"]
        assert reused["score"] == pytest.approx(fresh["score"], abs=1e-6)
        assert (reused["verdict"], reused["width"], reused["height"]) == \
            (fresh["verdict"], fresh["width"], fresh["height"])


@pytest.mark.timeout(300)
def test_a_crawl_scored_in_passes_gets_one_row_per_input_and_later_passes_reuse_earlier_ones(ray_local, model, crawls,
                                                                                            tmp_path):
    crawl = tmp_path / "crawl"
    crawl.mkdir()
    # Sorted: the three copies make the first pass of three, the original (same bytes) and one other the second.
    for name in ["copy0.png", "copy1.png", "copy2.png", "img000.png", "img001.png"]:
        shutil.copy(crawls["day1"] / "a" / name, crawl / name)
    job = _job(crawl, tmp_path / "out", tmp_path / "store", inputs_per_pass=3)

    summary = run_scoring(job, model)

    rows = _by_path(_every_row(tmp_path / "out"))
    assert {Path(p).name: r["reuse"] for p, r in rows.items()} == {
        "copy0.png": "fresh", "copy1.png": "duplicate", "copy2.png": "duplicate",
        "img000.png": "reused",  # its bytes were scored and stored by the first pass
        "img001.png": "fresh"}
    assert (summary.n_scored, summary.n_duplicates, summary.n_reused, summary.n_written) == (2, 2, 1, 5)
    assert _every_row(tmp_path / "out").num_rows == 5
    parts = [Path(p).name for p in scoring.list_part_files(str(tmp_path / "out"))]
    assert {re.search(r"-(p\d{5})-", name).group(1) for name in parts} == {"p00000", "p00001"}, parts
    assert run_scoring(dataclasses.replace(job, run_id="again"), model).n_written == 0

    # Without a store, rows stream from Ray to the output: nothing for passes to bound, so one pass.
    plain = run_scoring(_job(crawl, tmp_path / "plain", None, inputs_per_pass=3), model)
    assert (plain.n_scored, plain.n_written) == (5, 5)
    plain_parts = [Path(p).name for p in scoring.list_part_files(str(tmp_path / "plain"))]
    assert plain_parts and not any(re.search(r"-p\d{5}-", name) for name in plain_parts), plain_parts


@pytest.mark.timeout(240)
def test_a_store_on_s3_serves_a_rerun_of_the_same_crawl_without_the_model(ray_local, s3_server, model, crawls,
                                                                          tmp_path):
    s3_server.create_bucket("score-store")
    cfg = s3_server.storage_config()
    day2 = crawls["day2"]
    job = _job(day2, tmp_path / "first", "s3://score-store/tiny", storage=cfg)
    run_scoring(job, model)

    class NoModel(scoring.DetectorScorer):
        """Fails any batch: the rerun must not need the model."""

        def __call__(self, batch):
            raise AssertionError("the model was asked to score content the store holds")

    again = run_scoring(_job(day2, tmp_path / "again", "s3://score-store/tiny", storage=cfg), model,
                        scorer_cls=NoModel)

    n_files = sum(1 for p in day2.rglob("*") if p.is_file())
    assert (again.n_reused, again.n_scored, again.n_errors) == (n_files, 0, 0)
    first, second = _by_path(read_scores(str(tmp_path / "first"))), _by_path(read_scores(str(tmp_path / "again")))
    assert {p: r["score"] for p, r in first.items()} == {p: r["score"] for p, r in second.items()}


def test_inputs_per_pass_must_be_at_least_one():
    with pytest.raises(ValueError, match="at least 1"):
        _job("in", "out", "store", inputs_per_pass=0)


def test_reading_a_few_columns_of_parts_written_before_a_column_existed(tmp_path):
    old = pa.table({"path": ["/a", "/b"], "score": pa.array([0.1, 0.9], pa.float32()),
                    "scored_at": pa.array([None, None], pa.timestamp("us", tz="UTC"))})  # no reuse, no error
    pq.write_table(old, tmp_path / "part-old-000.parquet")
    table = read_scores(str(tmp_path), columns=["error", "reuse"])
    assert table.column_names == ["path", "scored_at", "error", "reuse"]
    assert sorted(table.column("path").to_pylist()) == ["/a", "/b"] and table.column("reuse").null_count == 2


def _output_with_scores(output: Path, hashes: list[str]) -> None:
    """An output holding one part of scored rows, as a run that crashed before storing them leaves it."""
    rows = scoring.with_every_output_column(pa.table({
        "path": [f"/crawl/{i}.png" for i in range(len(hashes))], "content_hash": hashes,
        "score": pa.array([0.25] * len(hashes), pa.float32()), "width": pa.array([8] * len(hashes), pa.int32()),
        "height": pa.array([8] * len(hashes), pa.int32()), "model_uri": ["m"] * len(hashes),
        "scored_at": pa.array([_at(1)] * len(hashes), pa.timestamp("us", tz="UTC")),
        "reuse": ["fresh", "reused"][: len(hashes)]}))
    output.mkdir(parents=True)
    pq.write_table(rows.select(scoring.OUTPUT_SCHEMA.names).cast(scoring.OUTPUT_SCHEMA),
                   output / "part-crashed-000000.parquet")


def test_a_rerun_stores_a_crashed_run_s_scores_and_marks_them_only_for_that_store(tmp_path, monkeypatch):
    hashes = [content_hash(b"one"), content_hash(b"two")]
    _output_with_scores(tmp_path / "out", hashes)
    job = _job("unused", tmp_path / "out", tmp_path / "store")
    store = ScoreStore(str(tmp_path / "store"), "m1")

    with monkeypatch.context() as patch:  # the store fails while the rerun stores them: nothing is marked
        patch.setattr(ScoreStore, "add", lambda self, rows, run_id: (_ for _ in ()).throw(Crash("store down")))
        with pytest.raises(Crash):
            scoring._store_earlier_scores(job, store)
    assert len(scoring._unmarked_parts(job, store)) == 1

    scoring._store_earlier_scores(job, store)

    assert store.lookup(hashes).num_rows == 2  # the fresh row and the reused one: both now in this store
    assert scoring._unmarked_parts(job, store) == []
    assert scoring._unmarked_parts(job, ScoreStore(f"file://{tmp_path}/store/", "m1")) == []  # spelt otherwise
    assert len(scoring._unmarked_parts(job, ScoreStore(str(tmp_path / "elsewhere"), "m1"))) == 1
    assert len(scoring._unmarked_parts(job, ScoreStore(str(tmp_path / "store"), "m2"))) == 1


def test_store_needs_an_output(tmp_path):
    import subprocess
    import sys

    (tmp_path / "x.png").write_bytes(b"")
    done = subprocess.run([sys.executable, "-m", "jobs.cli", "score", "--model", str(tmp_path), "--input",
                           str(tmp_path / "x.png"), "--store", str(tmp_path / "store")],
                          capture_output=True, text=True, timeout=120, cwd=Path(__file__).resolve().parents[1])
    assert done.returncode != 0 and "--store needs --output" in done.stderr


# ------------------------------------------------------------------------------------------------ crashes


class Crash(RuntimeError):
    pass


def _crash_after(original, when=lambda *a, **k: True):
    def crashing(*args, **kwargs):
        result = original(*args, **kwargs)
        if when(*args, **kwargs):
            raise Crash("killed here")
        return result
    return crashing


# (what fails, when, which part of the crawl is scored: "new" alone leaves the rerun nothing to score, the job's
# inputs per pass)
CRASH_POINTS = {
    "after the reused rows": ("write_rows_part", lambda job, table, tag: tag == "reused", ".", 1_000_000),
    "after the fresh rows, before the store": ("_score_fresh", None, ".", 1_000_000),
    "while storing": ("store", None, ".", 1_000_000),
    "while storing the last scores": ("store", None, "new", 1_000_000),
    "after the duplicates": ("write_rows_part", lambda job, table, tag: tag == "duplicates", ".", 1_000_000),
    # Passes of four: the copies and the broken file first, the seen images in the second pass.
    "in the second pass, after its fresh rows": ("_score_fresh", lambda job, *a: job.run_id.endswith("-p00001"),
                                                 ".", 4),
}


@pytest.fixture(scope="module")
def seeded(ray_local, tmp_path_factory, model) -> dict:
    """A crawl of every kind of input (content the store holds, new content, two copies of one new image, an
    undecodable file) and a store that already holds the first kind (tests copy it: they add to it)."""
    root = tmp_path_factory.mktemp("crash")
    known = _write_images(root / "known", real_photo_crops(2, 40, seed=21), "k")
    crawl = root / "crawl"
    _write_images(crawl / "new", fake_images(3, 40, seed=22), "n")
    for path in known:
        shutil.copy(path, crawl / f"seen-{path.name}")
    for i in range(2):
        shutil.copy(crawl / "new" / "n000.png", crawl / f"dup{i}.png")
    (crawl / "broken.jpg").write_bytes(b"not an image")
    run_scoring(_job(root / "known", root / "seed-out", root / "store"), model)
    return {"root": root, "known": root / "known", "crawl": crawl, "store": root / "store"}


@pytest.mark.timeout(300)
@pytest.mark.parametrize("point", list(CRASH_POINTS))
def test_a_run_killed_at_any_step_is_completed_by_the_rerun_exactly_once_and_the_store_learns_everything(
        ray_local, model, seeded, tmp_path, monkeypatch, point):
    store = shutil.copytree(seeded["store"], tmp_path / "store")
    output = tmp_path / "out"
    name, when, part, per_pass = CRASH_POINTS[point]
    crawl = seeded["crawl"] / part
    with monkeypatch.context() as patch:
        if name == "store":
            patch.setattr(ScoreStore, "add", lambda self, rows, run_id: (_ for _ in ()).throw(Crash("killed here")))
        else:
            patch.setattr(scoring, name, _crash_after(getattr(scoring, name), when or (lambda *a, **k: True)))
        with pytest.raises(Crash):
            run_scoring(_job(crawl, output, store, inputs_per_pass=per_pass), model)

    rerun = run_scoring(_job(crawl, output, store, inputs_per_pass=per_pass), model)

    rows = _every_row(output)
    listed = sorted(str(p) for p in crawl.rglob("*") if p.is_file())
    assert sorted(rows.column("path").to_pylist()) == listed  # every input once: none lost, none twice
    by_path = _by_path(rows)
    if part == ".":
        broken = by_path[str(crawl / "broken.jpg")]
        assert broken["error"] and broken["score"] is None
        copies = [by_path[str(crawl / name)] for name in ("new/n000.png", "dup0.png", "dup1.png")]
        assert len({r["score"] for r in copies}) == 1
    assert rerun.n_written + rerun.n_skipped_already_scored == len(listed)
    # Whatever the crash interrupted, every new content's score reaches the store.
    new_hashes = {r["content_hash"] for r in rows.to_pylist() if r["score"] is not None}
    stored = ScoreStore(str(store), _fingerprint(model)).lookup(sorted(new_hashes))
    assert set(stored.column("content_hash").to_pylist()) == new_hashes
    # Every part is now marked stored in this store (the crashed run's by the rerun): a later rerun reads none.
    assert list((output / "_mpft_stored").iterdir())
    assert scoring._unmarked_parts(_job(crawl, output, store), ScoreStore(str(store), _fingerprint(model))) == []
    assert len(scoring._unmarked_parts(_job(crawl, output, store), ScoreStore(str(tmp_path / "other"), "x"))) == \
        len(scoring.list_part_files(str(output)))  # markers of this store say nothing about another


def _fingerprint(model: ResolvedModel) -> str:
    from mpft_core.checkpoint_format import read_checkpoint_meta

    weights = (Path(model.checkpoint_dir) / "model.safetensors").read_bytes()
    return model_fingerprint(content_hash(weights), read_checkpoint_meta(Path(model.checkpoint_dir)), "cpu")


@pytest.mark.timeout(240)
def test_a_stored_picture_over_this_run_s_pixel_limit_is_refused_not_reused(ray_local, model, seeded, tmp_path):
    store = shutil.copytree(seeded["store"], tmp_path / "store")
    strict = _job(seeded["crawl"], tmp_path / "out", store)
    strict.resources = dataclasses.replace(strict.resources, max_pixels=40 * 40 - 1)

    run_scoring(strict, model)

    rows = _by_path(_every_row(tmp_path / "out"))
    seen = [r for p, r in rows.items() if "/seen-" in p]
    assert seen and all(r["reuse"] == "fresh" and r["score"] is None and "pixels" in r["error"] for r in seen)
