"""`mpft explain`: which patches drive an image's score, as PNG overlays, an index, and optionally an MLflow gallery.

Each image goes through the scorer's own steps: the same model loading (``make_model_bundle`` + ``DetectorScorer``,
as ``jobs.score.score_in_process``), the same read, decode and centre crop (``pipelines.decode.decode_batch`` with
``train=False``), then ``mpft_core.explain.attribute`` hides each group of patches in turn and re-scores. So the score
shown is the score ``mpft score`` gives the file (up to float rounding of another batch size), and the map is over
exactly the pixels the model saw.

Runs in this process, without Ray: a person explains a handful of images (``--max-images``, ``--top``), each costing
one forward pass per patch group, so a cluster's start-up would cost more than the work, and the PNGs are wanted on
this machine anyway.

Output folder::

    <output>/NNNN-<file name>-score0.873.png   the crop (left) and its overlay (right); on top the score, verdict and
                                               largest attribution (each overlay spans its own map's range)
    <output>/contact_sheet.png                 every panel in one grid
    <output>/index.parquet, index.json         one row per input: path, score, verdict, error, png, attributions

An input that cannot be read or decoded gets an index row with its error and no PNG; it never stops the others.
"""

from __future__ import annotations

import json
import logging
import math
import os
import re
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
from PIL import Image, ImageDraw, ImageFont

from mpft_core.config import InputError
from mpft_core.imageio import DEFAULT_MAX_PIXELS
from pipelines.scoring_spec import ResolvedModel
from pipelines.storage import StorageConfig

log = logging.getLogger(__name__)

INDEX_PARQUET = "index.parquet"
INDEX_JSON = "index.json"
CONTACT_SHEET = "contact_sheet.png"
GALLERY_ARTIFACT_DIR = "explain"
INDEX_SCHEMA = pa.schema([
    ("path", pa.string()),
    ("score", pa.float32()),            # probability of "generated" of the whole crop; null on error
    ("verdict", pa.string()),           # as `mpft score` would give it; null on error
    ("error", pa.string()),             # null when explained
    ("png", pa.string()),               # the panel's path; null on error
    ("max_attribution", pa.float32()),  # largest push toward "generated" of any patch group
    ("min_attribution", pa.float32()),  # largest push toward "real" (most negative)
    ("group", pa.int32()),
    ("hide", pa.string()),              # drop or fill: how patches were hidden
    ("units", pa.string()),             # score (probability) or logit: the attributions' unit
    ("model_uri", pa.string()),
])
PANEL_MIN_SIDE = 256  # small crops are enlarged (nearest neighbour, whole pixels) so a person can see the patches
TITLE_HEIGHT = 22
PANEL_GAP = 4
SHEET_COLUMNS = 4


@dataclass(frozen=True)
class ExplainSettings:
    """How ``explain_paths`` hides patches and reads files (``mpft explain``'s flags)."""

    group: int = 2                      # patches per group side
    hide: str = "trained"               # trained, drop or fill (mpft_core.explain.HIDE_CHOICES)
    units: str = "score"                # score or logit (mpft_core.explain.UNITS)
    max_pixels: int = DEFAULT_MAX_PIXELS  # decode_rgb's limit, as `mpft score`'s default
    batch_size: int = 64                # occluded copies per forward pass
    use_gpu: bool = False


# ------------------------------------------------------------------------------------------------------ inputs


def list_inputs(uri: str, storage_cfg: Optional[StorageConfig], max_images: int,
                extensions: Optional[Sequence[str]] = None) -> list[str]:
    """The first ``max_images`` files (sorted) of one image, a local folder or an ``s3://`` prefix, listed as
    ``mpft score`` lists them (hidden files excepted; every other file is an input, the decoder tells images)."""
    from pipelines import storage
    from pipelines.sources import SourceConfig

    if max_images < 1:
        raise InputError(f"--max-images must be at least 1, got {max_images}")
    source = SourceConfig(uri=uri, layout="unlabelled", extensions=list(extensions) if extensions else None)
    files = storage.list_files(source.uri, storage_cfg, extensions=source.extensions)
    if not files:
        raise InputError(f"no files under {uri}")
    if len(files) > max_images:
        log.warning("%s holds %d files: explaining the first %d (--max-images)", uri, len(files), max_images)
    return files[:max_images]


def top_scored(output_uri: str, n: int, storage_cfg: Optional[StorageConfig] = None) -> tuple[list[str], str]:
    """(paths of the ``n`` highest-scoring images of a scoring output, one path per content, highest first, ties by
    path; the model URI those rows were scored with).

    Raises:
        InputError: ``n`` < 1, or no scored row in the output.
    """
    from jobs.drift import one_row_per_content
    from pipelines.scoring import read_scores

    if n < 1:
        raise InputError(f"--top must be at least 1, got {n}")
    table = read_scores(output_uri, storage_cfg)
    table = table.filter(pc.is_valid(table.column("score")))
    if table.num_rows == 0:
        raise InputError(f"no scored rows in {output_uri}: nothing to explain")
    table = one_row_per_content(table)  # copies of one image (the store's duplicates) would fill the gallery
    order = pc.sort_indices(table, sort_keys=[("score", "descending"), ("path", "ascending")])
    top = table.take(order).slice(0, n)
    return top.column("path").to_pylist(), top.column("model_uri")[0].as_py()


# ---------------------------------------------------------------------------------------------------- explaining


def explain_paths(model: ResolvedModel, paths: Sequence[str], output_dir: str | Path,
                  settings: ExplainSettings = ExplainSettings(),
                  storage_cfg: Optional[StorageConfig] = None, decode_chunk: int = 16) -> pa.Table:
    """Explain each of ``paths`` into ``output_dir`` (a local folder, created): a panel PNG per decodable image,
    ``index.parquet`` + ``index.json`` (``INDEX_SCHEMA``, one row per path in the given order) and a contact sheet;
    returns the index."""
    from mpft_core.explain import UNITS, group_masks, hide_mode_for
    from pipelines.decode import decode_batch
    from pipelines.scoring import DetectorScorer, bundle_image_size, decode_settings, make_model_bundle

    out = Path(output_dir)
    out.mkdir(parents=True, exist_ok=True)
    bundle = make_model_bundle(model)
    scorer = DetectorScorer(bundle, torch_threads=os.cpu_count() or 1, use_gpu=settings.use_gpu,
                            decode=decode_settings(bundle_image_size(bundle), settings.max_pixels, storage_cfg))
    # A bad --hide, --units or --group fails before any file is read.
    hide_mode_for(scorer.detector, settings.hide)
    if settings.units not in UNITS:
        raise InputError(f"unknown attribution units {settings.units!r}; choose one of {', '.join(UNITS)}")
    group_masks(scorer.detector.grid_size, scorer.detector.grid_size, settings.group)
    rows, panels = [], []
    for start in range(0, len(paths), decode_chunk):
        chunk = [str(p) for p in paths[start:start + decode_chunk]]
        decoded = decode_batch({"path": np.array(chunk, dtype=object)}, train=False, **scorer.decode)
        for offset, path in enumerate(chunk):
            row, panel = _explain_one(scorer, start + offset, path, decoded["image"][offset],
                                      decoded["error"][offset], out, settings)
            rows.append(row)
            if panel is not None:
                panels.append(panel)
    index = pa.Table.from_pylist(rows, schema=INDEX_SCHEMA)
    write_index(index, out)
    if panels:
        Image.fromarray(contact_sheet(panels)).save(out / CONTACT_SHEET)
    return index


def _explain_one(scorer, number: int, path: str, view: np.ndarray, error: Optional[str], out: Path,
                 settings: ExplainSettings) -> tuple[dict, Optional[np.ndarray]]:
    """(index row, panel or None) of one decoded input; an error of its own becomes the row's error."""
    from mpft_core.explain import attribute
    from mpft_core.scoring import verdicts

    row = {"path": path, "score": None, "verdict": None, "error": error, "png": None, "max_attribution": None,
           "min_attribution": None, "group": settings.group, "hide": None, "units": settings.units,
           "model_uri": scorer.model_uri}
    if error is not None:
        return row, None
    result = attribute(scorer.detector, view, settings.group, hide=settings.hide, units=settings.units,
                       batch_size=settings.batch_size)
    verdict = verdicts(np.array([result.score]), [None], scorer.threshold, scorer.real_threshold)[0]
    # Each overlay uses its map's full colour range, so the title says how large the largest change was.
    strongest = float(np.abs(result.heat).max())
    title = f"score {result.score:.3f}  {verdict}  max |change| {strongest:.3g} ({result.units})  {Path(path).name}"
    panel = render_panel(view, result.heat, title)
    png = out / f"{number:04d}-{_file_slug(path)}-score{result.score:.3f}.png"
    Image.fromarray(panel).save(png)
    row.update(score=result.score, verdict=verdict, png=str(png), hide=result.hide,
               max_attribution=float(result.heat.max()), min_attribution=float(result.heat.min()))
    return row, panel


def _file_slug(path: str, limit: int = 60) -> str:
    """The file's name, safe in a file name on any system (a crawl's keys may hold anything)."""
    name = re.sub(r"[^A-Za-z0-9._-]+", "_", Path(path).stem).strip("._") or "image"
    return name[:limit]


def write_index(index: pa.Table, out: Path) -> None:
    """``index.parquet`` (exact types) and ``index.json`` (readable, NaN-free) in ``out``."""
    pq.write_table(index, out / INDEX_PARQUET)
    rows = [{k: (None if isinstance(v, float) and math.isnan(v) else v) for k, v in row.items()}
            for row in index.to_pylist()]
    (out / INDEX_JSON).write_text(json.dumps(rows, indent=2) + "\n", encoding="utf-8")


# ------------------------------------------------------------------------------------------------------- pictures


def render_panel(view: np.ndarray, heat: np.ndarray, title: str, min_side: int = PANEL_MIN_SIDE) -> np.ndarray:
    """uint8 RGB: ``title`` over the crop (left) and its overlay (right), enlarged by a whole factor to at least
    ``min_side`` pixels so each patch stays a sharp square."""
    from mpft_core.explain import overlay

    factor = max(1, math.ceil(min_side / max(view.shape[:2])))
    enlarge = lambda a: np.repeat(np.repeat(a, factor, axis=0), factor, axis=1)  # noqa: E731
    left, right = enlarge(view), enlarge(overlay(view, heat))
    height, width = left.shape[0], 2 * left.shape[1] + PANEL_GAP
    canvas = Image.new("RGB", (width, height + TITLE_HEIGHT), (255, 255, 255))
    canvas.paste(Image.fromarray(left), (0, TITLE_HEIGHT))
    canvas.paste(Image.fromarray(right), (left.shape[1] + PANEL_GAP, TITLE_HEIGHT))
    ImageDraw.Draw(canvas).text((4, 4), title, fill=(0, 0, 0), font=ImageFont.load_default())
    return np.asarray(canvas)


def contact_sheet(panels: Sequence[np.ndarray], columns: int = SHEET_COLUMNS) -> np.ndarray:
    """The panels in a grid, ``columns`` a row, in order (the gallery's overview, one PNG)."""
    height = max(p.shape[0] for p in panels)
    width = max(p.shape[1] for p in panels)
    columns = min(columns, len(panels))
    grid_rows = -(-len(panels) // columns)
    sheet = np.full((grid_rows * (height + PANEL_GAP), columns * (width + PANEL_GAP), 3), 255, dtype=np.uint8)
    for i, panel in enumerate(panels):
        top, left = (i // columns) * (height + PANEL_GAP), (i % columns) * (width + PANEL_GAP)
        sheet[top:top + panel.shape[0], left:left + panel.shape[1]] = panel
    return sheet


# ------------------------------------------------------------------------------------------------------- MLflow


def log_gallery(index: pa.Table, output_dir: str | Path, *, run_id: Optional[str] = None,
                run_name: str = "explain", tags: Optional[dict] = None) -> str:
    """The panels, contact sheet and index as artefacts under ``explain/`` of the run ``run_id`` (a scoring run
    continued: its status and end time stay as they were) or of a new run ``run_name`` in experiment
    ``mpft-scoring``; ``tags`` (e.g. the source and settings) on that run. Returns the run id."""
    from jobs import tracking
    from jobs.score import SCORING_EXPERIMENT

    out = Path(output_dir)
    files = [p for p in index.column("png").to_pylist() if p]
    files += [str(out / name) for name in (CONTACT_SHEET, INDEX_PARQUET, INDEX_JSON) if (out / name).is_file()]
    run = tracking.continue_run(run_id) if run_id else tracking.start_run(SCORING_EXPERIMENT, run_name)
    with run as active:
        for path in files:
            tracking.log_artifact_file(path, GALLERY_ARTIFACT_DIR)
        if tags:
            tracking.set_run_tags({f"mpft.explain.{key}": value for key, value in tags.items()})
        return active.info.run_id
