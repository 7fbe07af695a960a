"""Evaluation: the metrics are exactly scikit-learn's on the written scores, degraded copies are really degraded, and a
CLI run logs the table and plots to MLflow."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
from sklearn.metrics import accuracy_score, average_precision_score, roc_auc_score

from mpft_core.perturb import Perturbation
from pipelines.decode import decode_batch
from pipelines.evaluation import EvalOptions, build_eval_manifest, evaluate, evaluate_many, format_mix
from pipelines.scoring_spec import ResolvedModel, ScoringResources
from pipelines.sources import SourceConfig
from tests.helpers.images import (
    BAD_CORPUS_MAX_PIXELS,
    write_bad_corpus,
    write_genimage_tree,
    write_ufd_single_class,
    write_ufd_tree,
)
from tests.helpers.models import tiny_checkpoint

THRESHOLD = 0.5002
# Small batches and blocks and one actor: a few dozen images on a 2-CPU Ray.
SMALL_PASS = ScoringResources(batch_size=8, rows_per_block=8, num_actors=1, actor_cpus=0.5, decode_cpus=0.25)


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory) -> Path:
    return tiny_checkpoint(tmp_path_factory.mktemp("ckpt") / "model", threshold=THRESHOLD, seed=1)


@pytest.fixture(scope="module")
def genimage(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("genimage")
    write_genimage_tree(root, subsets=("adm", "sdv14"), n_per_class=5, size=48, splits=("val",), fmt="png")
    return root


def _sklearn_row(rows: list[dict], threshold: float) -> dict:
    y = np.array([r["label"] for r in rows])
    s = np.array([r["score"] for r in rows], dtype=np.float64)
    predicted = (s >= threshold).astype(int)
    return {"acc": accuracy_score(y, predicted), "acc_real": accuracy_score(y[y == 0], predicted[y == 0]),
            "acc_fake": accuracy_score(y[y == 1], predicted[y == 1]), "ap": average_precision_score(y, s),
            "auc": roc_auc_score(y, s), "n": len(y)}


def test_perturbed_decode_degrades_the_whole_image_before_the_crop(genimage):
    from mpft_core.imageio import decode_rgb
    from mpft_core.transforms import eval_view

    path = str(sorted(genimage.rglob("*.png"))[0])
    bad = genimage.parent / "bad"
    write_bad_corpus(bad)
    batch = {"path": np.array([path, str(bad / "truncated.jpg")], dtype=object),
             "label": np.array([1, 0]), "subset": np.array(["adm", "adm"], dtype=object)}
    jpeg30 = Perturbation("jpeg", 30)

    out = decode_batch(batch, image_size=32, train=False, max_pixels=BAD_CORPUS_MAX_PIXELS, storage={},
                       degrade=[jpeg30.apply] * 2)

    whole = decode_rgb(Path(path).read_bytes())
    np.testing.assert_array_equal(out["image"][0], eval_view(jpeg30.apply(whole), 32))
    assert not np.array_equal(out["image"][0], eval_view(whole, 32))
    assert (out["width"][0], out["height"][0]) == (48, 48) and out["error"][0] is None
    assert out["error"][1] and out["width"][1] == -1 and not out["image"][1].any()


def test_side_by_side_puts_each_condition_s_number_beside_the_as_is_one():
    import pyarrow as pa

    from mpft_core.metrics import per_subset_metrics
    from pipelines.evaluation import ConditionResult, EvalResult

    labels = np.array([0, 1, 0, 1, 0, 1, 0, 1])
    subsets = np.array(["adm"] * 4 + ["sdv14"] * 4)
    as_is = np.array([0.1, 0.9, 0.2, 0.8, 0.1, 0.9, 0.3, 0.7])
    aligned = np.array([0.6, 0.4, 0.2, 0.8, 0.1, 0.9, 0.6, 0.7])  # the shortcut gone: adm drops to chance

    def condition(name, scores):
        rows = pa.table({"path": [f"/{i}" for i in range(8)], "subset": subsets.tolist(),
                         "error": pa.nulls(8, pa.string())})
        return ConditionResult(name=name, scores=rows, results=per_subset_metrics(labels, scores, subsets),
                               n_errors=0)

    result = EvalResult(model=ResolvedModel(checkpoint_dir="/x", uri="/x"), threshold=0.5,
                        conditions=[condition("clean", as_is), condition("aligned-jpeg96", aligned)])
    side = result.side_by_side().set_index("subset")

    assert list(side.index) == ["adm", "sdv14", "mean"]
    assert list(side.columns)[:2] == ["acc [clean]", "acc [aligned-jpeg96]"]
    assert side.loc["adm", "acc [clean]"] == 1.0 and side.loc["adm", "acc [aligned-jpeg96]"] == 0.5
    assert side.loc["mean", "acc [aligned-jpeg96]"] == pytest.approx((0.5 + 0.75) / 2)
    long = result.table.set_index(["condition", "subset"])
    assert side.loc["sdv14", "auc [aligned-jpeg96]"] == long.loc[("aligned-jpeg96", "sdv14"), "auc"]


def test_a_holdout_whose_classes_differ_in_file_format_is_flagged_and_one_that_does_not_is_not(tmp_path):
    """GenImage's shortcut: real photos as JPEG, generated images as PNG. The evaluation must say so."""
    write_ufd_single_class(tmp_path / "confounded", "real", label=0, n=6, fmt="jpg")
    write_ufd_single_class(tmp_path / "confounded", "fake", label=1, n=6, fmt="png")
    write_ufd_single_class(tmp_path / "aligned", "real", label=0, n=6, fmt="png")
    write_ufd_single_class(tmp_path / "aligned", "fake", label=1, n=6, fmt="png")
    (tmp_path / "aligned" / "fake" / "1_fake" / "0000.png").write_bytes(b"<html>not found</html>")

    def mix_of(root):
        manifest = build_eval_manifest([SourceConfig(uri=str(root), layout="ufd", real_pairs={})])
        return format_mix(manifest)

    confounded, aligned = mix_of(tmp_path / "confounded"), mix_of(tmp_path / "aligned")

    assert confounded.counts == {"real": {"JPEG": 6}, "generated": {"PNG": 6}}
    assert confounded.distance == pytest.approx(1.0)
    assert "real: JPEG 100 %; generated: PNG 100 %" in confounded.warning()
    assert aligned.counts == {"real": {"PNG": 6}, "generated": {"PNG": 5, "unknown": 1}}
    assert aligned.distance == pytest.approx(1 / 6) and aligned.warning() is None


def test_the_format_sample_is_bounded_per_class(tmp_path):
    write_ufd_single_class(tmp_path, "real", label=0, n=9, fmt="jpg")
    write_ufd_single_class(tmp_path, "fake", label=1, n=3, fmt="webp")
    manifest = build_eval_manifest([SourceConfig(uri=str(tmp_path), layout="ufd", real_pairs={})])
    assert format_mix(manifest, per_class=4).counts == {"real": {"JPEG": 4}, "generated": {"WEBP": 3}}


@pytest.mark.slow
@pytest.mark.timeout(240)
def test_metrics_equal_sklearn_on_the_output_scores(ray_local, checkpoint, genimage, tmp_path):
    from jobs.evaluate import SCORES_FILE, write_outputs

    model = ResolvedModel(checkpoint_dir=str(checkpoint), uri=str(checkpoint))
    perturbations = [Perturbation("downscale", 16)]
    result = evaluate(model, [SourceConfig(uri=str(genimage), layout="genimage", split="val")],
                      perturbations=perturbations,
                      options=EvalOptions(resources=SMALL_PASS, feature_space=False))
    write_outputs(result, str(tmp_path))
    scores = pq.read_table(tmp_path / SCORES_FILE).to_pylist()
    table = result.table

    assert set(table["condition"]) == {"clean", "downscale16"}
    for condition in ("clean", "downscale16"):
        rows = [r for r in scores if r["condition"] == condition]
        assert len(rows) == 20 and all(r["error"] is None for r in rows)
        per_subset = {s: _sklearn_row([r for r in rows if r["subset"] == s], THRESHOLD) for s in ("adm", "sdv14")}
        for subset, expected in per_subset.items():
            got = table[(table.condition == condition) & (table.subset == subset)].iloc[0]
            for key, value in expected.items():
                assert got[key] == pytest.approx(value, abs=1e-12), (condition, subset, key)
        mean = table[(table.condition == condition) & (table.subset == "mean")].iloc[0]
        for key in ("acc", "acc_real", "acc_fake", "ap", "auc"):
            assert mean[key] == pytest.approx(np.mean([per_subset[s][key] for s in per_subset]), abs=1e-12)

    clean = {r["path"]: r["score"] for r in scores if r["condition"] == "clean"}
    degraded = {r["path"]: r["score"] for r in scores if r["condition"] == "downscale16"}
    assert any(not math.isclose(clean[p], degraded[p], rel_tol=1e-6) for p in clean)


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_cli_evaluate_logs_table_and_plots_to_mlflow(ray_local, mlflow_server, checkpoint, genimage, tmp_path):

    import matplotlib.pyplot as plt
    from mlflow.tracking import MlflowClient

    from jobs import cli
    from jobs.evaluate import EVALUATION_EXPERIMENT

    code = cli.main(["evaluate", "--model", str(checkpoint), "--source", str(genimage), "--split", "val",
                     "--perturb", "blur=3", "--align", "jpeg=96", "--tracking-uri", mlflow_server.tracking_uri,
                     "--output", str(tmp_path),
                     "--run-name", "eval-cli-test", "--actor-cpus", "0.5", "--batch-size", "8",
                     "--max-feature-points", "12"])
    assert code == 0
    assert not plt.get_fignums(), "a logged figure was left open"

    client = MlflowClient(mlflow_server.tracking_uri)
    experiment = client.get_experiment_by_name(EVALUATION_EXPERIMENT)
    run = client.search_runs([experiment.experiment_id], filter_string="attributes.run_name = 'eval-cli-test'")[0]
    artifacts = {a.path for a in client.list_artifacts(run.info.run_id)}
    assert {"eval_metrics.parquet", "eval_metrics.md", "roc_clean.png", "accuracy_clean.png", "accuracy_blur3.png",
            "feature_space_frozen.png", "feature_space_finetuned.png"} <= artifacts
    table = pq.read_table(tmp_path / "eval_metrics.parquet").to_pandas()
    logged = run.data.metrics
    for row in table[table.condition == "blur3"].itertuples():
        assert logged[f"blur3/{row.subset}/acc"] == pytest.approx(row.acc)
    assert "| condition | subset |" in (tmp_path / "eval_metrics.md").read_text()
    assert run.data.params["alignments"] == "aligned-jpeg96" and run.data.params["perturbations"] == "blur3"

    # The format-aligned condition: every image of both classes re-encoded as JPEG q96, beside the as-is numbers.
    aligned = table[table.condition == "aligned-jpeg96"].set_index("subset")
    assert list(aligned.index) == ["adm", "sdv14", "mean"] and (aligned["n"] > 0).all()
    for subset, row in aligned.iterrows():
        assert logged[f"aligned-jpeg96/{subset}/acc"] == pytest.approx(row.acc)
    side = pq.read_table(tmp_path / "eval_conditions.parquet").to_pandas().set_index("subset")
    assert {"acc [clean]", "acc [blur3]", "acc [aligned-jpeg96]", "auc [aligned-jpeg96]"} <= set(side.columns)
    assert side.loc["sdv14", "acc [aligned-jpeg96]"] == pytest.approx(aligned.loc["sdv14", "acc"])
    assert side.loc["mean", "acc [clean]"] == pytest.approx(table.set_index(["condition", "subset"]).loc[
        ("clean", "mean"), "acc"])
    assert {"eval_conditions.parquet", "eval_conditions.md", "accuracy_aligned-jpeg96.png",
            "reliability_clean.png", "reliability_aligned-jpeg96.png"} <= artifacts
    assert logged["clean/mean/ece"] == pytest.approx(table.set_index(["condition", "subset"]).loc[
        ("clean", "mean"), "ece"])


@pytest.mark.slow
@pytest.mark.timeout(240)
def test_ufd_fake_only_generators_are_evaluated_with_their_paired_real_images(ray_local, checkpoint, tmp_path):
    write_ufd_tree(tmp_path, subsets={"progan": ("car",)}, n_per_class=3, size=32)
    for i, subset in enumerate(("guided", "ldm_200", "glide_100_10")):
        write_ufd_single_class(tmp_path, subset, label=1, n=3, size=32, seed=10 + i)
    write_ufd_single_class(tmp_path, "imagenet", label=0, n=3, size=32, seed=20)
    write_ufd_single_class(tmp_path, "laion", label=0, n=4, size=32, seed=21)
    sources = [SourceConfig(uri=str(tmp_path), layout="ufd")]
    model = ResolvedModel(checkpoint_dir=str(checkpoint), uri=str(checkpoint))

    # As the promotion gate calls it: the holdout manifest built once, the sources alongside.
    manifest = build_eval_manifest(sources)
    [result] = evaluate_many([model], sources, manifest=manifest,
                             options=EvalOptions(resources=SMALL_PASS, feature_space=False))
    table = result.table.set_index("subset")
    scores = result.condition("clean").scores

    generators = ["glide_100_10", "guided", "ldm_200", "progan"]
    assert manifest.num_rows == scores.num_rows == 6 + 9 + 7  # every real image listed and scored once
    assert table.index.tolist() == generators + ["mean"]
    assert (table.loc[generators, "n_real"] > 0).all() and (table.loc[generators, "n_fake"] > 0).all()
    assert table.loc["guided", "n_real"] == 3 and table.loc["ldm_200", "n_real"] == 4
    assert np.isfinite(table.loc[generators, ["ap", "auc"]].to_numpy()).all()
    for metric in ("acc", "ap", "auc"):
        assert table.loc["mean", metric] == pytest.approx(table.loc[generators, metric].mean(), abs=1e-12)


# ------------------------------------------------------------------------- which images an evaluation scores together


def _ufd_sets(root: Path, fakes=("guided", "ldm_200", "dalle"), reals=("imagenet", "laion")) -> Path:
    write_ufd_tree(root, subsets={"progan": ("car",)}, n_per_class=1, size=8)
    for subset in fakes:
        write_ufd_single_class(root, subset, label=1, n=2, size=8)
    for subset in reals:
        write_ufd_single_class(root, subset, label=0, n=2, size=8)
    return root


def _fake_set_alone(root):
    return [SourceConfig(uri=str(_ufd_sets(root) / "guided"), layout="ufd")]


def _filter_on_a_tree_without_its_real_set(root):
    return [SourceConfig(uri=str(_ufd_sets(root, reals=("laion",))), layout="ufd", subsets=["guided"])]


def _real_pairs_typo(root):
    return [SourceConfig(uri=str(_ufd_sets(root)), layout="ufd",
                         real_pairs={"guided": "imagenet", "ldm_200": "laion", "dalle": "laoin"})]


def _real_set_without_its_fake_set(root):
    return [SourceConfig(uri=str(_ufd_sets(root, fakes=("ldm_200",))), layout="ufd")]


def _real_set_holding_fakes(root):
    write_ufd_single_class(_ufd_sets(root), "imagenet", label=1, n=1, size=8)
    return [SourceConfig(uri=str(root), layout="ufd")]


def _fake_set_holding_reals(root):
    write_ufd_single_class(_ufd_sets(root), "guided", label=0, n=1, size=8)
    return [SourceConfig(uri=str(root), layout="ufd")]


@pytest.mark.parametrize("sources, message", [
    (_fake_set_alone, "'guided' is paired with real subset 'imagenet', which has no images"),
    (_filter_on_a_tree_without_its_real_set, "'guided' is paired with real subset 'imagenet', which has no images"),
    (_real_pairs_typo, "'dalle' is paired with real subset 'laoin', which has no images"),
    (_real_set_without_its_fake_set, "real subset 'imagenet' .*'guided'.* has no images"),
    (_real_set_holding_fakes, "real subset 'imagenet' .*holds generated images"),
    (_fake_set_holding_reals, "subset 'guided' .*holds real images"),
])
def test_an_evaluation_refuses_pairs_it_cannot_score_before_any_work(tmp_path, sources, message):
    sources = sources(tmp_path)
    with pytest.raises(ValueError, match=f"{message}.*real_pairs: {{}}"):
        build_eval_manifest(sources)
    # A manifest built elsewhere is checked against the sources' pairs too, before any model is loaded.
    loose = build_eval_manifest([s.model_copy(update={"real_pairs": {}}) for s in sources])
    with pytest.raises(ValueError, match=message):
        evaluate_many([ResolvedModel(checkpoint_dir=str(tmp_path / "unused"), uri="unused")], sources, manifest=loose)


def test_sources_that_list_the_same_images_are_merged_and_a_conflict_is_refused(tmp_path):
    root = _ufd_sets(tmp_path / "ufd")
    ldm, dalle = (SourceConfig(uri=str(root), layout="ufd", subsets=[name]) for name in ("ldm_200", "dalle"))

    manifest = build_eval_manifest([ldm, dalle])

    assert sorted(manifest["subset"].to_pylist()) == ["dalle"] * 2 + ["laion"] * 2 + ["ldm_200"] * 2
    laion_image = next(p for p in manifest["path"].to_pylist() if "/laion/" in p)
    (tmp_path / "mine.csv").write_text(f"path,label,subset\n{laion_image},0,mine\n")
    with pytest.raises(ValueError, match=f"{laion_image}.*different"):
        build_eval_manifest([ldm, SourceConfig(uri=str(tmp_path / "mine.csv"), layout="manifest")])


def test_one_subset_name_from_two_benchmarks_is_refused(tmp_path):
    write_genimage_tree(tmp_path / "genimage", subsets=("BigGAN",), n_per_class=1, size=8, splits=("val",))
    write_ufd_tree(tmp_path / "ufd", subsets={"biggan": None}, n_per_class=1, size=8)

    with pytest.raises(ValueError, match="'biggan'.*genimage.*ufd.*separately"):
        build_eval_manifest([SourceConfig(uri=str(tmp_path / "genimage"), split="val"),
                             SourceConfig(uri=str(tmp_path / "ufd"), layout="ufd")])
