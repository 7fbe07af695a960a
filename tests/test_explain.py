"""`mpft explain`: occlusion maps over the patch grid, their overlays, the command's PNGs and index, and the gallery.

The detector is the tiny random-init tower with its head fitted as a linear probe on real photo crops vs the test
suite's synthetic "generated" images (a second or so), so it tells the two apart and a map has something to show.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
from PIL import Image

from mpft_core.config import InputError
from mpft_core.explain import attribute, group_masks, hide_mode_for, occlusion_map, overlay
from tests.helpers.images import fake_images, real_photo_crops
from tests.helpers.models import probe_checkpoint

SIZE = 32  # mpft-tiny-32: 8-px patches, a 4 x 4 grid


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory) -> Path:
    return probe_checkpoint(tmp_path_factory.mktemp("ckpt") / "model", threshold=0.5, seed=0)


@pytest.fixture(scope="module")
def detector(checkpoint):
    from mpft_core import load_checkpoint

    return load_checkpoint(checkpoint)


def _spliced(seed: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(real photo crop, generated image, the photo with its left half replaced by the generated image's)."""
    real, fake = real_photo_crops(1, SIZE, seed=seed)[0], fake_images(1, SIZE, seed=seed)[0]
    spliced = real.copy()
    spliced[:, : SIZE // 2] = fake[:, : SIZE // 2]
    return real, fake, spliced


# ----------------------------------------------------------------------------------------------- the method


@pytest.mark.parametrize("group", [1, 2, 3])
def test_the_map_covers_the_patch_grid_with_one_value_per_group(detector, group):
    view = real_photo_crops(1, SIZE, seed=5)[0]

    heat = occlusion_map(detector, view, group=group)

    assert heat.shape == (detector.grid_size, detector.grid_size) == (4, 4)
    assert heat.dtype == np.float32 and np.isfinite(heat).all()
    _, cell_of_patch = group_masks(4, 4, group)
    for cell in np.unique(cell_of_patch):
        assert len(np.unique(heat[cell_of_patch == cell])) == 1  # one re-score per group
    assert len(np.unique(cell_of_patch)) == {1: 16, 2: 4, 3: 4}[group]  # 3: a 3x3 group and smaller edge groups


def test_the_same_image_gives_the_same_map_and_overlay_bit_for_bit(detector):
    view = fake_images(1, SIZE, seed=6)[0]

    first, second = attribute(detector, view), attribute(detector, view.copy(), batch_size=64)

    assert first.score == second.score
    np.testing.assert_array_equal(first.heat, second.heat)
    np.testing.assert_array_equal(overlay(view, first.heat), overlay(view, second.heat))


def test_the_full_score_is_the_scorer_s_score(detector):
    from mpft_core.scoring import score_rows

    views = np.stack([real_photo_crops(1, SIZE, seed=7)[0], fake_images(1, SIZE, seed=7)[0]])

    scores = score_rows(detector, views, [None, None])

    assert [attribute(detector, v).score for v in views] == pytest.approx(scores.tolist(), abs=1e-6)
    assert scores[0] < 0.5 < scores[1]  # the probe tells them apart: the maps below have something to explain


@pytest.mark.parametrize("hide", ["drop", "fill"])
@pytest.mark.parametrize("seed", [10, 11, 12])
def test_the_map_points_at_the_generated_half_of_a_spliced_photo(detector, hide, seed):
    real, fake, spliced = _spliced(seed)

    result = attribute(detector, spliced, group=2, hide=hide)
    heat = result.heat
    left, right = heat[:, :2], heat[:, 2:]  # the generated half, the photo half

    assert result.hide == hide
    assert left.mean() > 0.1 and left.mean() > right.mean() + 0.1
    assert np.unravel_index(heat.argmax(), heat.shape)[1] < 2  # the strongest push toward "generated" is there
    # The overlay shows it: red added over the generated half, not over the photo half.
    tint = overlay(spliced, heat).astype(int) - spliced.astype(int)
    redness = tint[..., 0] - tint[..., 2]
    assert redness[:, : SIZE // 2].mean() > 20 > redness[:, SIZE // 2:].mean()
    # The maps of the untouched photo and generated image are not that map: it is about where the trace is.
    assert not np.allclose(occlusion_map(detector, real, hide=hide), heat, atol=0.05)
    assert not np.allclose(occlusion_map(detector, fake, hide=hide), heat, atol=0.05)


@pytest.mark.parametrize("seed", [10, 11, 12])
def test_in_logit_units_every_region_of_a_generated_image_points_to_generated_and_a_photo_s_do_not(detector, seed):
    real, fake, _ = _spliced(seed)

    photo, generated = (attribute(detector, view, units="logit", hide="fill") for view in (real, fake))

    # Both scores are confident (near 0 and 1), where a probability hardly moves; the logit still does.
    assert photo.score < 0.01 and generated.score > 0.98
    assert generated.heat.min() > 0.5  # hiding any group of the generated image takes away evidence of generation
    assert photo.heat.min() < -0.5  # the photo has regions that argue for "real"
    score_units = occlusion_map(detector, fake, hide="fill")
    assert np.abs(score_units).max() < np.abs(generated.heat).max() / 10
    assert (np.sign(score_units) == np.sign(generated.heat)).all()  # same direction, only compressed


def test_patches_are_hidden_as_training_hid_them_and_dropped_when_it_hid_none(detector):
    import copy

    unmasked = copy.deepcopy(detector)
    unmasked.config.mask.strategy = "none"

    assert detector.config.mask.mode == "fill" and hide_mode_for(detector) == "fill"
    assert hide_mode_for(unmasked) == "drop"
    assert hide_mode_for(detector, "drop") == "drop"
    with pytest.raises(InputError, match="unknown way"):
        hide_mode_for(detector, "blur")


def test_a_group_that_would_hide_the_whole_image_is_refused(detector):
    with pytest.raises(InputError, match="hides the whole 4x4 patch grid"):
        occlusion_map(detector, real_photo_crops(1, SIZE)[0], group=4)


def test_an_attribution_of_zero_leaves_the_image_untouched():
    image = real_photo_crops(1, SIZE, seed=3)[0]
    heat = np.zeros((4, 4), np.float32)
    heat[0, 0] = 0.3

    tinted = overlay(image, heat)

    np.testing.assert_array_equal(tinted[8:], image[8:])
    assert (tinted[:8, :8, 0].astype(int) - image[:8, :8, 0]).mean() > 0  # the one patch that matters is redder
    np.testing.assert_array_equal(overlay(image, np.zeros((4, 4))), image)


# ----------------------------------------------------------------------------------------------- the command


def explain_cli(argv: list[str]) -> int:
    from jobs import cli

    return cli.main(["explain", *argv])


@pytest.fixture(scope="module")
def folder(tmp_path_factory) -> Path:
    """A real photo, a generated image, a spliced one, and a file that is no image."""
    root = tmp_path_factory.mktemp("inputs")
    real, fake, spliced = _spliced(seed=20)
    for name, pixels in (("photo.png", real), ("generated.png", fake), ("spliced.png", spliced)):
        Image.fromarray(pixels).save(root / name)
    (root / "broken.jpg").write_bytes(b"<html>404</html>")
    return root


def test_the_command_writes_one_panel_per_image_an_index_and_an_error_row(checkpoint, folder, tmp_path):
    from jobs.score import score_in_process
    from pipelines.scoring_spec import ResolvedModel

    out = tmp_path / "why"

    assert explain_cli(["--model", str(checkpoint), "--input", str(folder), "--output", str(out)]) == 0

    index = pq.read_table(out / "index.parquet").to_pylist()
    by_name = {Path(row["path"]).name: row for row in index}
    assert set(by_name) == {"photo.png", "generated.png", "spliced.png", "broken.jpg"}
    assert by_name["broken.jpg"]["error"] and by_name["broken.jpg"]["png"] is None
    assert by_name["broken.jpg"]["score"] is None
    pngs = sorted(out.glob("0*.png"))
    assert len(pngs) == 3 and sorted(r["png"] for r in index if r["png"]) == [str(p) for p in pngs]
    scored = score_in_process(ResolvedModel(str(checkpoint), str(checkpoint)),
                              [str(folder / n) for n in ("photo.png", "generated.png")], max_pixels=10**8)
    for row in scored.to_pylist():
        mine = by_name[Path(row["path"]).name]
        assert mine["score"] == pytest.approx(row["score"], abs=1e-6) and mine["verdict"] == row["verdict"]
        assert f"score{mine['score']:.3f}" in Path(mine["png"]).name
    assert by_name["generated.png"]["verdict"] == "generated" and by_name["photo.png"]["verdict"] == "real"
    assert by_name["spliced.png"]["max_attribution"] > 0.1 > by_name["photo.png"]["max_attribution"]
    panel = np.asarray(Image.open(by_name["spliced.png"]["png"]))
    assert panel.shape[1] > 2 * 256 and panel.shape[0] > 256  # crop and overlay side by side, enlarged
    assert json.loads((out / "index.json").read_text()) == index
    assert (out / "contact_sheet.png").is_file()


def test_the_command_gives_the_same_files_twice(checkpoint, folder, tmp_path):
    outputs = [tmp_path / "a", tmp_path / "b"]
    for out in outputs:
        assert explain_cli(["--model", str(checkpoint), "--input", str(folder / "spliced.png"),
                            "--output", str(out), "--group", "1"]) == 0

    names = [sorted(p.name for p in out.iterdir()) for out in outputs]
    assert names[0] == names[1] and len(names[0]) == 4  # panel, contact sheet, two indexes
    for name in names[0]:
        if name.endswith(".png"):
            assert (outputs[0] / name).read_bytes() == (outputs[1] / name).read_bytes()


def test_explain_without_a_model_or_with_a_too_large_group_fails_in_one_line(checkpoint, folder, tmp_path, capsys):
    with pytest.raises(SystemExit):
        explain_cli(["--input", str(folder), "--output", str(tmp_path / "x")])
    with pytest.raises(SystemExit) as failed:
        explain_cli(["--model", str(checkpoint), "--input", str(folder), "--output", str(tmp_path / "y"),
                     "--group", "4"])

    assert failed.value.code == 2
    assert "hides the whole 4x4 patch grid" in capsys.readouterr().err
    assert not list((tmp_path / "y").glob("*.png"))


# ----------------------------------------------------------------------------------------------- the gallery


@pytest.fixture
def scoring_output(checkpoint, folder, tmp_path) -> Path:
    """A scoring output of ``folder`` as `mpft score --output` writes it (one part), without Ray."""
    from jobs.score import score_in_process
    from pipelines.scoring_spec import ResolvedModel

    out = tmp_path / "scores"
    out.mkdir()
    paths = sorted(str(p) for p in folder.iterdir())
    table = score_in_process(ResolvedModel(str(checkpoint), str(checkpoint)), paths, max_pixels=10**8)
    pq.write_table(table, out / "part-test-0.parquet")
    return out


def test_a_gallery_of_the_top_scores_is_logged_under_explain_of_the_scoring_run(scoring_output, tmp_path,
                                                                                  monkeypatch):
    from mlflow import MlflowClient

    from jobs import tracking
    from pipelines.scoring import read_scores

    monkeypatch.chdir(tmp_path)  # MLflow's default artefact root is relative to the working directory
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    tracking.set_tracking(uri)
    with tracking.start_run("mpft-scoring", "score-test") as run:
        scoring_run = run.info.run_id
    before = MlflowClient(uri).get_run(scoring_run).info
    out = tmp_path / "gallery"

    code = explain_cli(["--from-scores", str(scoring_output), "--top", "2", "--output", str(out),
                        "--log-to-run", scoring_run, "--tracking-uri", uri])

    assert code == 0
    scores = read_scores(str(scoring_output)).to_pylist()
    expected = [r["path"] for r in sorted((r for r in scores if r["score"] is not None),
                                          key=lambda r: -r["score"])[:2]]
    index = pq.read_table(out / "index.parquet").to_pylist()
    assert [row["path"] for row in index] == expected and all(row["png"] for row in index)
    logged = {Path(a.path).name for a in MlflowClient(uri).list_artifacts(scoring_run, "explain")}
    assert logged == {Path(row["png"]).name for row in index} | {"contact_sheet.png", "index.parquet", "index.json"}
    after = MlflowClient(uri).get_run(scoring_run)
    assert (after.info.status, after.info.end_time) == (before.status, before.end_time)
    assert after.data.tags["mpft.explain.source"] == str(scoring_output)

    assert explain_cli(["--from-scores", str(scoring_output), "--top", "1", "--output", str(tmp_path / "new"),
                        "--mlflow", "--tracking-uri", uri]) == 0
    experiment = MlflowClient(uri).get_experiment_by_name("mpft-scoring")
    runs = MlflowClient(uri).search_runs([experiment.experiment_id], order_by=["attributes.start_time DESC"])
    assert len(runs) == 2 and runs[0].info.run_id != scoring_run
    new_run = {Path(a.path).name for a in MlflowClient(uri).list_artifacts(runs[0].info.run_id, "explain")}
    assert "contact_sheet.png" in new_run and len([n for n in new_run if n.startswith("0000-")]) == 1
