"""Watching the stream: the scoring run's summary, `mpft drift` and its labelling manifest, the CronJob chain.

Scoring outputs are written here as Parquet parts with the scoring job's own schema (no Ray, no model): the drift
logic only ever reads outputs, so a hand-made output is what it sees in production.
"""

from __future__ import annotations

import json
from datetime import datetime, timezone
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.csv as pacsv
import pyarrow.parquet as pq
import pytest
import yaml

from jobs import cli, drift, score_report
from mpft_core.config import InputError
from mpft_core.scoring import verdicts
from pipelines.scoring import (
    OUTPUT_SCHEMA,
    PART_PREFIX,
    ScoreJob,
    ScoreSummary,
    read_scores,
    with_every_output_column,
)
from pipelines.scoring_spec import ResolvedModel

MODEL_URI = "models:/mpft-detector/3"
THRESHOLD, REAL_THRESHOLD = 0.5, 0.3
GROUPS = {"a.example": 0.45, "b.example": 0.45, "c.example": 0.10}
CRONJOB = Path(__file__).resolve().parents[1] / "infra" / "k8s" / "score-drift-cronjob.yaml"


@pytest.fixture(autouse=True)
def no_tracking_from_the_environment(monkeypatch):
    """A test that wants MLflow passes --tracking-uri; another test's server must not leak in through the variable
    ``mlflow.set_tracking_uri`` sets."""
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)


# ------------------------------------------------------------------------------------------------- outputs


def crawl_paths(root: Path, n: int, rng: np.random.Generator, prefix: str = "img") -> list[str]:
    """``n`` file paths spread over ``GROUPS`` (one folder per site) below ``root``."""
    names = rng.choice(list(GROUPS), size=n, p=list(GROUPS.values()))
    return [str(root / site / f"{prefix}-{i:05d}.jpg") for i, site in enumerate(names)]


def everyday_scores(n: int, rng: np.random.Generator) -> np.ndarray:
    """The usual stream: mostly real photos, scored low."""
    return rng.beta(2.0, 6.0, size=n)


def new_generator_scores(n: int, rng: np.random.Generator) -> np.ndarray:
    """A generator the model never saw: scores spread around the threshold, neither clearly real nor caught."""
    return rng.beta(6.0, 4.0, size=n)


def output_table(paths: list[str], scores: np.ndarray, errors: list | None = None, model_uri: str = MODEL_URI,
                 content_hash: list | None = None) -> pa.Table:
    """Rows as the scoring job writes them (``OUTPUT_SCHEMA``); an error row has no score and no verdict."""
    n = len(paths)
    errors = errors or [None] * n
    scores = np.asarray(scores, dtype=np.float32)
    ok = np.array([e is None for e in errors])
    columns = {
        "path": pa.array(paths, pa.string()),
        "score": pa.array(scores, pa.float32(), mask=~ok),
        "verdict": pa.array(verdicts(scores, errors, THRESHOLD, REAL_THRESHOLD), pa.string()),
        "threshold": pa.array(np.full(n, THRESHOLD)), "real_threshold": pa.array(np.full(n, REAL_THRESHOLD)),
        "model_name": pa.array(["mpft-detector"] * n, pa.string()), "model_version": pa.array(["3"] * n, pa.string()),
        "model_uri": pa.array([model_uri] * n, pa.string()), "error": pa.array(errors, pa.string()),
        "width": pa.array(np.where(ok, 512, -1), pa.int32()), "height": pa.array(np.where(ok, 512, -1), pa.int32()),
        "scored_at": pa.array([datetime.now(timezone.utc)] * n, pa.timestamp("us", tz="UTC")),
    }
    if content_hash is not None:
        columns["content_hash"] = pa.array(content_hash, pa.string())
    # Columns the job writes besides these (the score store's, when present) are null, as in an older output.
    return with_every_output_column(pa.table(columns)).select(OUTPUT_SCHEMA.names).cast(OUTPUT_SCHEMA)


def write_output(folder: Path, table: pa.Table, run: str = "20261201T000000-abcdef01") -> str:
    """``table`` as one part of a scoring output in ``folder``; the output's URI."""
    folder.mkdir(parents=True, exist_ok=True)
    pq.write_table(table, folder / f"{PART_PREFIX}{run}-0000-000000-0.parquet")
    return str(folder)


def day(tmp_path: Path, name: str, scores: np.ndarray, rng: np.random.Generator) -> tuple[str, str]:
    """(output, crawl root) of a day's crawl scored with ``scores``."""
    root = tmp_path / "crawl" / name
    paths = crawl_paths(root, len(scores), rng, prefix=name)
    return write_output(tmp_path / "scores" / name, output_table(paths, scores)), str(root)


def run_drift(*args: str) -> int:
    return cli.main(["drift", "--model", MODEL_URI, *args])


# ------------------------------------------------------------------------------------------------ statistics


def test_psi_is_zero_for_the_same_histogram_and_matches_the_formula_otherwise():
    assert drift.psi([10, 20, 30], [20, 40, 60]) == pytest.approx(0.0)  # shares matter, not counts
    expected = (0.9 - 0.5) * np.log(0.9 / 0.5) + (0.1 - 0.5) * np.log(0.1 / 0.5)
    assert drift.psi([50, 50], [90, 10]) == pytest.approx(expected)
    assert drift.psi([50, 50], [90, 10]) == pytest.approx(drift.psi([90, 10], [50, 50]))  # symmetric


def test_psi_stays_finite_when_a_bin_is_empty_on_one_side():
    eps = drift.PSI_EPSILON
    value = drift.psi([100, 0], [50, 50])
    assert np.isfinite(value)
    assert value == pytest.approx((0.5 - 1.0) * np.log(0.5) + (0.5 - eps) * np.log(0.5 / eps))
    assert np.isnan(drift.psi([0, 0], [1, 1]))  # nothing to compare against is not "no drift"


def test_ks_statistic_is_the_largest_gap_between_the_distribution_functions():
    assert drift.ks_statistic([0.1, 0.2, 0.3, 0.4], [0.3, 0.4, 0.5, 0.6]) == pytest.approx(0.5)
    assert drift.ks_statistic([0.1, 0.2], [0.8, 0.9]) == pytest.approx(1.0)
    rng = np.random.default_rng(0)
    a, b = rng.normal(0, 1, 500), rng.normal(0.5, 1, 700)
    from scipy.stats import ks_2samp

    assert drift.ks_statistic(a, b) == pytest.approx(ks_2samp(a, b).statistic)


def test_psi_tells_a_second_sample_from_a_shifted_population():
    rng = np.random.default_rng(1)
    base = score_report.histogram(everyday_scores(3000, rng))
    same = score_report.histogram(everyday_scores(3000, rng))
    mixed = score_report.histogram(np.concatenate([everyday_scores(2100, rng), new_generator_scores(900, rng)]))
    assert drift.psi(base, same) < 0.05
    assert drift.psi(base, mixed) > 0.5


# ---------------------------------------------------------------------------------------------- the summary


def test_summary_counts_bands_error_kinds_and_groups(tmp_path):
    root = tmp_path / "crawl"
    paths = [str(root / "a.example" / f"{i}.jpg") for i in range(6)] + [str(root / "b.example" / "x.jpg"),
                                                                        str(root / "top.jpg")]
    scores = np.array([0.92, 0.93, 0.4, 0.1, 0.0, 1.0, 0.0, 0.0])
    errors = [None] * 6 + ["cannot read file: FileNotFoundError: gone", "truncated or corrupt JPEG data (OSError)"]
    summary = score_report.summarise(output_table(paths, scores, errors), str(root))

    assert summary["verdicts"] == {"generated": 3, "uncertain": 1, "real": 2, "error": 2}
    assert summary["verdict_shares"]["error"] == pytest.approx(2 / 8)
    assert summary["errors"] == {"unreadable": 1, "corrupt": 1}
    assert sum(summary["histogram"]) == 6
    assert summary["histogram"][0] == 1 and summary["histogram"][-1] == 1  # 0.0 and 1.0 land in the end bins
    assert summary["histogram"][18] == 2
    assert list(summary["groups"]) == ["a.example", score_report.ROOT_GROUP, "b.example"]  # largest, then by name
    assert summary["groups"]["b.example"]["verdicts"]["error"] == 1


@pytest.mark.parametrize(("message", "kind"), [
    ("cannot read file: PermissionError: [Errno 13] denied", "unreadable"),
    ("file too large: more than max_bytes=268435456 bytes", "too_large"),
    ("exceeds pixel limit: 1x2 = 2 pixels > max_pixels=1 (possible decompression bomb)", "too_large"),
    ("empty file (0 bytes)", "empty"),
    ("unsupported format PDF (allowed: JPEG, PNG, WEBP)", "not_an_image"),
    ("not a recognised image format", "not_an_image"),
    ("unreadable image header (SyntaxError)", "corrupt"),
    ("decode time limit: gave up after max_seconds=10", "timeout"),
    ("RuntimeError: something new", "other"),
])
def test_error_texts_of_the_decoder_fall_into_kinds(message, kind):
    assert score_report.error_kind(message) == kind


def test_groups_are_hosts_for_urls_and_capped_with_the_rest_as_other():
    urls = [f"https://site{i % 25}.example/img/{i}.jpg" for i in range(100)] + ["https://site0.example/extra.jpg"]
    table = output_table(urls, np.full(len(urls), 0.2))
    summary = score_report.summarise(table, None, max_groups=20)
    assert len(summary["groups"]) == 21 and list(summary["groups"])[0] == "site0.example"  # largest first
    assert list(summary["groups"])[-1] == score_report.OTHER_GROUP
    assert summary["groups"][score_report.OTHER_GROUP]["n_rows"] == 5 * 4
    assert sum(group["n_rows"] for group in summary["groups"].values()) == len(urls)


def test_a_single_folder_has_no_grouping_and_a_manifest_input_finds_the_shared_folder(tmp_path):
    flat = output_table([f"s3://b/day/{i}.jpg" for i in range(5)], np.full(5, 0.2))
    assert score_report.summarise(flat, "s3://b/day/")["groups"] == {}
    nested = output_table(["s3://b/day/x/1.jpg", "s3://b/day/y/2.jpg"], np.full(2, 0.2))
    assert set(score_report.summarise(nested, "s3://b/manifest.csv")["groups"]) == {"x", "y"}


@pytest.mark.timeout(120)
def test_log_summary_puts_histogram_bands_errors_groups_and_reuse_counts_in_mlflow(tmp_path, mlflow_server):
    from mlflow.tracking import MlflowClient

    from jobs import tracking
    from jobs.score import log_summary

    tracking.set_tracking(mlflow_server.tracking_uri)
    root = tmp_path / "crawl"
    rng = np.random.default_rng(2)
    paths = crawl_paths(root, 200, rng)
    errors = [None] * 197 + ["cannot read file: OSError: x", "empty file (0 bytes)", "empty file (0 bytes)"]
    output = write_output(tmp_path / "out", output_table(paths, everyday_scores(200, rng), errors))
    job = ScoreJob(model_ref=MODEL_URI, input_uri=str(root), output_uri=output)
    # This run found every input scored by earlier runs (no Ray needed to size a pool): the summary still covers
    # the whole output.
    summary = ScoreSummary(run_id=job.run_id, output_uri=output, n_inputs=200, n_skipped_already_scored=200,
                           n_scored=0, n_errors=0, n_torn_parts_removed=0, seconds=2.0,
                           model=ResolvedModel(str(tmp_path), MODEL_URI, "mpft-detector", "3"),
                           n_reused=120, n_duplicates=7)

    run_id = log_summary(job, summary)

    client = MlflowClient(mlflow_server.tracking_uri)
    metrics = client.get_run(run_id).data.metrics
    assert metrics["n_reused"] == 120 and metrics["n_duplicates"] == 7
    assert metrics["count_error"] == 3 and metrics["errors_empty"] == 2 and metrics["errors_unreadable"] == 1
    assert sum(metrics[f"share_{band}"] for band in score_report.VERDICT_BANDS) == pytest.approx(1.0)
    assert {f"group/{site}/share_generated" for site in GROUPS} <= set(metrics)
    artefacts = {a.path for a in client.list_artifacts(run_id, "summary")}
    assert {"summary/score_histogram.png", "summary/score_summary.json", "summary/score_histogram.csv"} <= artefacts
    downloaded = client.download_artifacts(run_id, "summary/score_summary.json", str(tmp_path))
    logged = json.loads(Path(downloaded).read_text())
    assert sum(logged["histogram"]) == 197 and len(logged["histogram"]) == score_report.N_BINS
    assert set(logged["groups"]) == set(GROUPS)


# ------------------------------------------------------------------------------------------------- mpft drift


def test_drift_exits_0_on_a_second_crawl_of_the_same_stream_and_1_on_one_mixed_with_a_new_generator(tmp_path,
                                                                                                      capsys):
    rng = np.random.default_rng(3)
    yesterday, _ = day(tmp_path, "d1", everyday_scores(3000, rng), rng)
    today, _ = day(tmp_path, "d2", everyday_scores(3000, rng), rng)
    mixed, _ = day(tmp_path, "d3", np.concatenate([everyday_scores(2100, rng), new_generator_scores(900, rng)]), rng)

    # The smallest site has about 300 images a day: below the default --min-group-size, compared when asked.
    assert run_drift("--baseline", yesterday, "--current", today, "--min-group-size", "200") == 0
    stable = json.loads(capsys.readouterr().out)
    assert stable["drift"] is False and stable["overall"]["psi"] < 0.2 and stable["warnings"] == []
    assert abs(stable["overall"]["flagged_share_shift"]) < 0.02

    plot = tmp_path / "drift.png"
    assert run_drift("--baseline", yesterday, "--current", mixed, "--output-plot", str(plot),
                     "--min-group-size", "200") == 1
    shifted = json.loads(capsys.readouterr().out)
    assert shifted["drift"] is True and shifted["overall"]["psi"] > 0.2
    assert shifted["overall"]["flagged_share_shift"] > 0.1 and shifted["overall"]["ks"] > 0.2
    assert set(shifted["groups"]) == set(GROUPS)  # each site is compared with the same site of yesterday
    assert plot.read_bytes()[:4] == b"\x89PNG"


def test_a_group_threshold_catches_a_shift_in_one_small_site_the_overall_psi_misses(tmp_path, capsys):
    rng = np.random.default_rng(4)
    yesterday, _ = day(tmp_path, "d1", everyday_scores(4000, rng), rng)
    root = tmp_path / "crawl" / "d2"
    paths = crawl_paths(root, 4000, rng, prefix="d2")
    in_c = np.array(["/c.example/" in p for p in paths])
    scores = np.where(in_c, new_generator_scores(4000, rng), everyday_scores(4000, rng))
    today = write_output(tmp_path / "scores" / "d2", output_table(paths, scores))

    assert run_drift("--baseline", yesterday, "--current", today) == 0
    assert json.loads(capsys.readouterr().out)["overall"]["psi"] < 0.2
    assert run_drift("--baseline", yesterday, "--current", today, "--group-threshold", "0.2",
                     "--min-group-size", "300") == 1
    reasons = json.loads(capsys.readouterr().out)["reasons"]
    assert len(reasons) == 1 and reasons[0].startswith("group c.example PSI")


def test_drift_refuses_runs_of_another_model_in_one_line(tmp_path, capsys):
    rng = np.random.default_rng(5)
    yesterday, _ = day(tmp_path, "d1", everyday_scores(300, rng), rng)
    paths = crawl_paths(tmp_path / "crawl" / "d2", 300, rng)
    other = write_output(tmp_path / "scores" / "d2",
                         output_table(paths, everyday_scores(300, rng), model_uri="models:/mpft-detector/4"))

    with pytest.raises(SystemExit) as exit_info:
        run_drift("--baseline", yesterday, "--current", other)
    assert exit_info.value.code == 2
    [line] = capsys.readouterr().err.strip().splitlines()
    assert "models:/mpft-detector/4" in line and "same model version" in line

    with pytest.raises(SystemExit) as exit_info:  # --model names neither run's model
        cli.main(["drift", "--model", "models:/mpft-detector/9", "--baseline", yesterday, "--current", yesterday])
    assert exit_info.value.code == 2


def test_psi_noise_is_reported_next_to_each_psi_and_groups_are_compared_from_the_minimum_size(tmp_path, capsys):
    rng = np.random.default_rng(9)
    outputs = []
    for name in ("d1", "d2"):
        root = tmp_path / "crawl" / name
        paths = [str(root / "a.example" / f"{i}.jpg") for i in range(1000)]
        paths += [str(root / "b.example" / f"{i}.jpg") for i in range(999)]
        errors = [None] * len(paths) + ["empty file (0 bytes)"] * 5  # error rows do not count towards the size
        paths += [str(root / "a.example" / f"broken-{i}.jpg") for i in range(5)]
        table = output_table(paths, everyday_scores(len(paths), rng), errors)
        outputs.append(write_output(tmp_path / "scores" / name, table))

    assert run_drift("--baseline", outputs[0], "--current", outputs[1]) == 0
    report = json.loads(capsys.readouterr().out)
    assert list(report["groups"]) == ["a.example"]  # 1000 scored a side: compared; 999: not
    group = report["groups"]["a.example"]
    assert group["psi_expected_noise"] == pytest.approx(19 * (1 / 1000 + 1 / 1000))
    assert group["psi"] < 0.2
    assert report["overall"]["psi_expected_noise"] == pytest.approx(19 * (2 / 1999))
    assert report["warnings"] == []


def test_a_comparison_of_a_hundred_images_a_side_warns_that_its_psi_is_mostly_noise(tmp_path, capsys):
    rng = np.random.default_rng(10)
    yesterday, _ = day(tmp_path, "d1", everyday_scores(100, rng), rng)
    today, _ = day(tmp_path, "d2", everyday_scores(100, rng), rng)

    run_drift("--baseline", yesterday, "--current", today)
    report = json.loads(capsys.readouterr().out)
    assert report["overall"]["psi_expected_noise"] == pytest.approx(0.38)
    [warning] = report["warnings"]
    assert "too few images for a reliable PSI" in warning


def test_drift_refuses_an_output_without_scored_rows_instead_of_calling_it_stable(tmp_path, capsys):
    rng = np.random.default_rng(11)
    yesterday, _ = day(tmp_path, "d1", everyday_scores(300, rng), rng)
    paths = crawl_paths(tmp_path / "crawl" / "d2", 50, rng)
    broken = write_output(tmp_path / "scores" / "d2",
                          output_table(paths, np.zeros(50), ["cannot read file: OSError: gone"] * 50))

    with pytest.raises(SystemExit) as exit_info:
        run_drift("--baseline", yesterday, "--current", broken)
    assert exit_info.value.code == 2
    [line] = capsys.readouterr().err.strip().splitlines()
    assert "current output has no scored rows" in line


def test_a_torn_part_or_mlflow_down_exits_3_never_1_the_status_of_drift(tmp_path, capsys):
    rng = np.random.default_rng(12)
    yesterday, _ = day(tmp_path, "d1", everyday_scores(1000, rng), rng)
    mixed = np.concatenate([everyday_scores(600, rng), new_generator_scores(400, rng)])
    today, _ = day(tmp_path, "d2", mixed, rng)
    assert run_drift("--baseline", yesterday, "--current", today) == 1  # whole, today's output is drift
    capsys.readouterr()
    # A part cut short by a writer that died: not a Parquet file any more.
    (Path(today) / f"{PART_PREFIX}20261201T010000-deadbeef-0000-000000-0.parquet").write_bytes(b"PAR1\x00torn")

    assert run_drift("--baseline", yesterday, "--current", today) == 3
    captured = capsys.readouterr()
    assert captured.out == ""  # no JSON: nothing a scheduler could read as a decision
    [line] = captured.err.strip().splitlines()
    assert line.startswith("mpft drift: could not compute the comparison")

    unanswered = "http://127.0.0.1:9"  # the discard port: nothing listens there
    assert run_drift("--baseline", "0" * 32, "--current", today, "--tracking-uri", unanswered) == 3
    assert "could not compute" in capsys.readouterr().err


def test_drift_help_lists_the_exit_statuses(capsys):
    with pytest.raises(SystemExit):
        cli.main(["drift", "--help"])
    text = capsys.readouterr().out
    assert "exit status:" in text and "could not compute" in text and '"drift": true' in text


def test_drift_groups_are_capped_at_the_largest_with_the_rest_as_other():
    urls = [f"https://site{i % 30}.example/{i}.jpg" for i in range(30 * 40)]
    rng = np.random.default_rng(13)
    baseline = output_table(urls, everyday_scores(len(urls), rng))
    current = output_table(urls, everyday_scores(len(urls), rng))
    groups = drift.compare_groups(baseline, current, baseline_root=None, current_root=None, min_group_size=40)
    assert len(groups) == score_report.MAX_GROUPS + 1 and list(groups)[-1] == score_report.OTHER_GROUP
    assert groups[score_report.OTHER_GROUP]["n_scored_current"] == 10 * 40  # the 10 smallest sites, pooled
    assert sum(group["n_scored_current"] for group in groups.values()) == len(urls)


def test_the_model_reference_is_compared_in_the_form_the_rows_name_their_model(tmp_path):
    assert drift.canonical_model_uri("models:/m@champion", alias_target=lambda ref: "models:/m/3") == "models:/m/3"
    with pytest.raises(InputError, match="alias is not set"):
        drift.canonical_model_uri("models:/m@champion", alias_target=lambda ref: None)
    assert drift.canonical_model_uri("models:/m/3") == "models:/m/3"
    assert drift.canonical_model_uri(f"file://{tmp_path}/ckpt/") == str(tmp_path / "ckpt")


def test_drift_refuses_outputs_whose_records_name_different_checkpoint_bytes(tmp_path, capsys):
    from pipelines.scoring import OutputRecord, write_output_record

    rng = np.random.default_rng(8)
    outputs = [day(tmp_path, name, everyday_scores(200, rng), rng)[0] for name in ("d1", "d2")]
    for output, digest in zip(outputs, ("aa", "bb"), strict=True):
        write_output_record(output, OutputRecord(model_ref=MODEL_URI, model_uri=MODEL_URI, model_name="mpft-detector",
                                                 model_version="3", checkpoint_sha256={"model.safetensors": digest},
                                                 run_id="r", started_at="2026-12-01T00:00:00Z"))

    with pytest.raises(SystemExit) as exit_info:
        run_drift("--baseline", outputs[0], "--current", outputs[1])
    assert exit_info.value.code == 2
    assert "different checkpoint hashes" in capsys.readouterr().err


# -------------------------------------------------------------------------------------- labelling manifest


def test_label_manifest_holds_the_most_uncertain_and_top_scoring_new_images_and_reads_as_a_manifest(tmp_path):
    from pipelines.sources import SourceConfig, build_manifest

    rng = np.random.default_rng(6)
    yesterday, _ = day(tmp_path, "d1", everyday_scores(200, rng), rng)
    old = read_scores(yesterday).column("path").to_pylist()[:50]
    root = tmp_path / "crawl" / "d2"
    new = crawl_paths(root, 100, rng, prefix="d2")
    scores = np.concatenate([np.full(50, 0.99), new_generator_scores(100, rng)])  # old images score highest
    today = write_output(tmp_path / "scores" / "d2", output_table(old + new, scores))
    manifest = tmp_path / "labels" / "to-label.csv"

    assert run_drift("--baseline", yesterday, "--current", today, "--label-manifest", str(manifest),
                     "--label-sample", "5") == 1

    table = pacsv.read_csv(manifest)
    assert table.column_names == ["path", "score", "verdict", "reason", "label"]
    rows = table.to_pylist()
    assert len(rows) == 10 and not set(table.column("path").to_pylist()) & set(old)  # only images new today
    assert [r["reason"] for r in rows] == ["uncertain"] * 5 + ["top-score"] * 5
    new_scores = scores[50:]
    closest = np.sort(np.abs(new_scores - THRESHOLD))[:5]
    assert np.allclose(sorted(abs(r["score"] - THRESHOLD) for r in rows[:5]), closest, atol=1e-6)
    rest = sorted((s for s in new_scores if abs(s - THRESHOLD) > closest[-1] + 1e-6), reverse=True)[:5]
    assert np.allclose([r["score"] for r in rows[5:]], rest, atol=1e-6)
    assert all(r["label"] is None for r in rows)

    # What `--layout manifest` (mpft retrain's new_data, mpft evaluate) reads: unlabelled now, labelled once filled.
    source = SourceConfig(uri=str(manifest), layout="manifest", allow_outside_corpus=True)
    assert build_manifest(source).column("label").null_count == 10
    labelled = table.set_column(4, "label", pa.array([0 if r["reason"] == "uncertain" else 1 for r in rows], pa.int8()))
    pacsv.write_csv(labelled, manifest)  # as a labelling tool would save it
    labels = build_manifest(source).column("label").to_pylist()
    assert sorted(labels) == [0] * 5 + [1] * 5


def test_new_images_are_told_by_content_hash_when_both_outputs_have_one(tmp_path):
    base = output_table(["/c/d1/a.jpg", "/c/d1/b.jpg"], [0.2, 0.3], content_hash=["h1", "h2"])
    renamed = output_table(["/c/d2/a-copy.jpg", "/c/d2/new.jpg"], [0.2, 0.6], content_hash=["h1", "h3"])
    assert drift.new_rows(base, renamed).column("path").to_pylist() == ["/c/d2/new.jpg"]
    by_path = output_table(["/c/d2/a-copy.jpg", "/c/d2/new.jpg"], [0.2, 0.6])  # no hashes: every new path is new
    assert drift.new_rows(base, by_path).num_rows == 2


def test_copies_of_one_image_are_sent_for_labelling_once():
    base = output_table(["/c/d1/old.jpg"], [0.2], content_hash=["h1"])
    current = output_table(["/c/d2/z-copy.jpg", "/c/d2/a.jpg", "/c/d2/m-copy.jpg", "/c/d2/other.jpg",
                            "/c/d2/unhashed.jpg"],
                           [0.5, 0.5, 0.5, 0.9, 0.45], content_hash=["h2", "h2", "h2", "h3", None])
    paths = drift.label_candidates(base, current, 5).column("path").to_pylist()
    assert sorted(paths) == ["/c/d2/a.jpg", "/c/d2/other.jpg", "/c/d2/unhashed.jpg"]  # h2 once, by its first path


@pytest.mark.slow
@pytest.mark.timeout(180)
def test_drift_of_two_logged_scoring_runs_is_logged_to_mlflow(tmp_path, mlflow_server, capsys):
    """The CronJob's path: two `mpft score` runs' summaries in MLflow, `mpft drift` given their run ids."""
    from mlflow.tracking import MlflowClient

    from jobs import tracking
    from jobs.score import log_summary

    tracking.set_tracking(mlflow_server.tracking_uri)
    rng = np.random.default_rng(7)
    run_ids = []
    for name, scores in (("d1", everyday_scores(1500, rng)),
                         ("d2", np.concatenate([everyday_scores(1000, rng), new_generator_scores(500, rng)]))):
        output, root = day(tmp_path, name, scores, rng)
        job = ScoreJob(model_ref=MODEL_URI, input_uri=root, output_uri=output)
        summary = ScoreSummary(run_id=job.run_id, output_uri=output, n_inputs=1500, n_skipped_already_scored=1500,
                               n_scored=0, n_errors=0, n_torn_parts_removed=0, seconds=1.0,
                               model=ResolvedModel(str(tmp_path), MODEL_URI, "mpft-detector", "3"))
        run_ids.append(log_summary(job, summary))
    capsys.readouterr()  # MLflow's links to the scoring runs

    status = run_drift("--baseline", run_ids[0], "--current", run_ids[1], "--label-manifest",
                       str(tmp_path / "label.csv"), "--tracking-uri", mlflow_server.tracking_uri,
                       "--min-group-size", "100")

    assert status == 1
    printed = json.loads(capsys.readouterr().out)
    client = MlflowClient(mlflow_server.tracking_uri)
    runs = client.search_runs([client.get_experiment_by_name(drift.DRIFT_EXPERIMENT).experiment_id])
    [run] = [r for r in runs if r.data.params.get("current") == run_ids[1]]  # other tests share the server
    assert run.data.tags["drift.decision"] == "drift"
    assert run.data.metrics["psi"] == pytest.approx(printed["overall"]["psi"])
    assert {f"group/{site}/psi" for site in GROUPS} <= set(run.data.metrics)
    assert run.data.params["current_output"] == str(tmp_path / "scores" / "d2")
    assert {a.path for a in client.list_artifacts(run.info.run_id)} >= {"drift.png", "drift.json",
                                                                          "label_manifest.csv"}


# ---------------------------------------------------------------------------------------------- the CronJob


def test_cronjob_chains_score_drift_and_a_retrain_rayjob_on_drift_only():
    from infra.render import placeholders, render

    values = {name: f"value-{name.lower()}" for name in placeholders(CRONJOB.read_text())}
    values.update(NAMESPACE="mpft-prod", SCORE_SCHEDULE="0 4 * * *", BUCKET="acme")
    docs = [doc for doc in yaml.safe_load_all(render(CRONJOB, values)) if doc is not None]
    assert all(doc["metadata"]["namespace"] == "mpft-prod" for doc in docs)
    [cron] = [doc for doc in docs if doc["kind"] == "CronJob"]
    assert cron["spec"]["schedule"] == "0 4 * * *" and cron["spec"]["concurrencyPolicy"] == "Forbid"
    job = cron["spec"]["jobTemplate"]["spec"]
    assert job["backoffLimit"] == 0  # a retry would score and trigger twice
    pod = job["template"]["spec"]
    [scorer] = pod["initContainers"]
    scoring = " ".join(scorer["args"])
    assert "mpft score" in scoring and "mpft drift" in scoring and "--baseline" in scoring
    assert "--label-manifest" in scoring
    [trigger] = pod["containers"]
    assert "--store s3://acme/score-store/" in scoring.replace('"', "")  # images of earlier days are reused
    script = " ".join(trigger["args"])
    assert "create -f /rayjob/rayjob.yaml" in script  # the retrain RayJob, as retrain-cronjob.yaml creates it
    # Only the decision retrains: exit status 1 and the printed JSON's "drift": true, never a crash's status 1.
    assert '!= 1 ]' in script and """grep -q '^  "drift": true,$' /status/drift.json""" in script
    [role] = [doc for doc in docs if doc["kind"] == "Role"]
    verbs = {verb for rule in role["rules"] for verb in rule["verbs"]}
    assert "create" in verbs and "delete" not in verbs and "*" not in verbs
    env = {e["name"]: e for c in (scorer, trigger) for e in c.get("env", [])}
    assert all("secretKeyRef" in env[name]["valueFrom"] for name in env if "SECRET" in name or "KEY_ID" in name)
