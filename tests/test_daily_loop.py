"""The daily loop end to end on the local stack: `mpft score --store` three days of crawls, `mpft drift` against
yesterday (0 on a day from the same stream, 1 on a day mixed with a generator the model never saw), the labelling
manifest of that day, and the scoring summary in MLflow.

The model tells photo crops from the suite's synthetic fakes (a probe-fitted tiny tower); the unseen generator makes
blocky 8x nearest-neighbour upsamplings, which it mostly calls real: the case drift is there to catch.
"""

from __future__ import annotations

import csv
import json
import shutil
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from jobs import cli
from tests.helpers.images import real_photo_crops
from tests.helpers.models import probe_checkpoint

SITES = ("site-a", "site-b")


def unseen_generator_images(n: int, seed: int, side: int = 32) -> list[np.ndarray]:
    """A 'generator' unlike anything the probe saw: 4x4 colour grids upsampled 8x by nearest neighbour, plus noise."""
    rng = np.random.default_rng(seed)
    images = []
    for _ in range(n):
        grid = rng.uniform(0, 255, (side // 8, side // 8, 3)).astype(np.float32)
        blocky = np.kron(grid, np.ones((8, 8, 1), np.float32))
        images.append(np.clip(blocky + rng.normal(0, 3, blocky.shape), 0, 255).astype(np.uint8))
    return images


def write_day(root: Path, images: list[np.ndarray], prefix: str) -> Path:
    """The images as PNGs spread over two site folders (the summary's and drift's groups)."""
    for i, pixels in enumerate(images):
        folder = root / SITES[i % len(SITES)]
        folder.mkdir(parents=True, exist_ok=True)
        Image.fromarray(pixels).save(folder / f"{prefix}{i:04d}.png")
    return root


def score(day: Path, output: Path, store: Path, model: Path, tracking_uri: str, capsys) -> dict:
    code = cli.main(["score", "--model", str(model), "--input", str(day), "--output", str(output), "--store",
                     str(store), "--tracking-uri", tracking_uri, "--num-actors", "1", "--actor-cpus", "0.5",
                     "--decode-cpus", "0.25", "--batch-size", "32", "--rows-per-block", "64"])
    assert code == 0
    out = capsys.readouterr().out
    return json.JSONDecoder().raw_decode(out[out.index("{"):])[0]  # MLflow prints its run link on stdout too


def drift(model: Path, baseline: Path, current: Path, tracking_uri: str, capsys, *extra: str) -> tuple[int, dict]:
    code = cli.main(["drift", "--model", str(model), "--baseline", str(baseline), "--current", str(current),
                     "--tracking-uri", tracking_uri, "--min-group-size", "20", *extra])
    return code, json.loads(capsys.readouterr().out)


@pytest.mark.slow
@pytest.mark.timeout(420)
def test_score_drift_and_label_over_three_days(ray_local, mlflow_server, tmp_path, capsys):
    import mlflow

    model = probe_checkpoint(tmp_path / "model")
    day1 = write_day(tmp_path / "day1", real_photo_crops(160, 32, seed=5), "p")
    day2 = write_day(tmp_path / "day2", real_photo_crops(130, 32, seed=6), "p")
    for path in sorted((day1 / SITES[0]).iterdir())[:30]:  # 30 images crawled again under new names
        shutil.copy(path, day2 / SITES[0] / f"again-{path.name}")
    day3 = write_day(tmp_path / "day3", real_photo_crops(110, 32, seed=8) + unseen_generator_images(50, 8), "x")
    store, outputs = tmp_path / "store", {d: tmp_path / f"scores-{d}" for d in ("day1", "day2", "day3")}

    first = score(day1, outputs["day1"], store, model, mlflow_server.tracking_uri, capsys)
    second = score(day2, outputs["day2"], store, model, mlflow_server.tracking_uri, capsys)
    third = score(day3, outputs["day3"], store, model, mlflow_server.tracking_uri, capsys)
    assert (first["n_scored"], first["n_reused"]) == (160, 0)
    assert (second["n_scored"], second["n_reused"]) == (130, 30)
    assert third["n_scored"] + third["n_reused"] + third["n_duplicates"] == 160 and third["n_errors"] == 0

    code, stable = drift(model, outputs["day1"], outputs["day2"], mlflow_server.tracking_uri, capsys)
    assert code == 0, stable
    assert stable["overall"]["psi"] < 0.2

    manifest = tmp_path / "label-day3.csv"
    code, shifted = drift(model, outputs["day2"], outputs["day3"], mlflow_server.tracking_uri, capsys,
                          "--label-manifest", str(manifest), "--label-sample", "10")
    assert code == 1, shifted
    assert shifted["overall"]["psi"] > 0.2 and set(shifted["groups"]) == set(SITES)
    with manifest.open(newline="") as handle:
        rows = list(csv.DictReader(handle))
    assert rows and all(row["label"] == "" for row in rows)
    # The most uncertain new images, those nearest the threshold, are the unseen generator's.
    uncertain = [row for row in rows if row["reason"] == "uncertain"]
    from_unseen = [row for row in uncertain if int(Path(row["path"]).stem[1:]) >= 110]
    assert len(uncertain) == 10 and len(from_unseen) >= 8

    runs = mlflow.search_runs(experiment_names=["mpft-scoring"], output_format="list")
    day3_run = next(r for r in runs if r.data.params.get("output") == str(outputs["day3"]))
    metrics = day3_run.data.metrics
    assert metrics["count_generated"] + metrics["count_real"] + metrics.get("count_uncertain", 0) == 160
    assert {f"group/{site}/count_real" for site in SITES} <= set(metrics)
