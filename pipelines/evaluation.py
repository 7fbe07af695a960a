"""Evaluation on labelled sources: per-subset accuracy / AP / AUC, on clean and on degraded copies of the images.

    manifests (GenImage / UFD / manifest) ─▶ decode [+ degrade] + crop ─▶ DetectorScorer ─▶ scores on the driver
                                                                                         ─▶ mpft_core.metrics

Scores go through the same actor as ``mpft score`` (pipelines/scoring.py), so an evaluation measures exactly what
production scoring produces. Only the score rows (no pixels) are collected on the driver: metrics need every score
of a subset at once (docs/METHOD.md: no per-batch averaging).

Degraded copies (``--perturb``) and format-aligned copies (``--align``: both classes re-encoded the same way,
``mpft_core.perturb.Alignment``) are conditions beside the clean one: the degradation is applied to the whole
decoded image, before the usual tile + center crop, through the decode stage's per-row ``degrade`` hook
(pipelines/decode.py knows nothing about perturbations, only of an image-to-image function per row).
Files that cannot be decoded are reported (``n_errors``) and left out of the metrics. Before scoring, the first bytes
of a sample of each class tell their file formats (``format_mix``): when the classes differ (GenImage's JPEG photos
against PNG fakes) the result carries a warning that the as-is numbers may measure the format.

Fake-only subsets are scored together with the real-only subset they are paired with (``real_pairs`` of all the
sources together, ``pipelines.sources.real_pairs_of``: UFD's diffusion sets with LAION / ImageNet by default); every
image is still read and scored once, even when two sources list it (two UFD sets share their real set). A pair with
one side missing, a subset holding the other class than its side of a pair, or one subset name coming from two
benchmarks (GenImage's and UFD's ``biggan``) is refused before any image is read.
"""

from __future__ import annotations

import logging
import math
import shutil
import tempfile
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.compute as pc
import ray

from mpft_core.config import InputError
from mpft_core.metrics import MEAN_KEY, TABLE_COLUMNS, per_subset_metrics, table_from_results
from mpft_core.perturb import CLEAN, Condition
from pipelines import storage
from pipelines.scoring import DetectorScorer, bundle_image_size, bundle_threshold, make_model_bundle, scored_dataset
from pipelines.scoring_spec import ResolvedModel, ScoringResources
from pipelines.storage import StorageConfig

log = logging.getLogger(__name__)

EVAL_COLUMNS = ("condition",) + TABLE_COLUMNS + ("n_errors",)


@dataclass(kw_only=True)
class EvalOptions:
    """How an evaluation runs: its scoring pass (``resources``) and the feature-space plots."""

    resources: ScoringResources = field(default_factory=ScoringResources)
    feature_space: bool = True
    max_feature_points: int = 1000  # PCA of a few hundred points per subset is as readable as of all of them
    seed: int = 0
    format_check: bool = True  # sample each class's file formats and warn when they differ (``format_mix``)


@dataclass
class ConditionResult:
    """One evaluation condition (clean or one degradation): every row's score, and the metrics."""

    name: str
    scores: pa.Table                  # path, label, subset, score, verdict, error, ... (errors included)
    results: dict                     # mpft_core.metrics.per_subset_metrics on the rows without error
    n_errors: int


@dataclass
class FeatureSpace:
    title: str
    embeddings: np.ndarray
    subsets: np.ndarray
    labels: np.ndarray


@dataclass
class EvalResult:
    model: ResolvedModel
    threshold: float
    conditions: list[ConditionResult]
    feature_spaces: list[FeatureSpace] = field(default_factory=list)
    real_pairs: dict[str, str] = field(default_factory=dict)  # {fake-only subset: real subset scored with it}
    format_mix: Optional[FormatMix] = None  # the classes' file formats (``EvalOptions.format_check``)

    @property
    def table(self) -> pd.DataFrame:
        """One row per (condition, subset) plus each condition's ``mean`` row; columns ``EVAL_COLUMNS``."""
        frames = []
        for cond in self.conditions:
            frame = table_from_results(cond.results)
            frame.insert(0, "condition", cond.name)
            errors = _errors_per_subset(cond.scores)
            frame["n_errors"] = [sum(errors.values()) if s == "mean" else self._errors_behind(s, errors)
                                 for s in frame["subset"]]
            frames.append(frame)
        return pd.concat(frames, ignore_index=True)[list(EVAL_COLUMNS)]

    def side_by_side(self, metrics: Sequence[str] = ("acc", "ap", "auc")) -> pd.DataFrame:
        """One row per subset (then ``mean``), and for each metric one column per condition, ``acc [clean]`` beside
        ``acc [aligned-jpeg96]``: how far each number moves when the images are degraded or format-aligned."""
        table = self.table
        wide = table.pivot(index="subset", columns="condition", values=list(metrics))
        order = [name for name in table["subset"].drop_duplicates() if name != MEAN_KEY] + [MEAN_KEY]
        wide = wide.reindex(order)
        names = [cond.name for cond in self.conditions]
        columns = {f"{metric} [{name}]": wide[(metric, name)].to_numpy() for metric in metrics for name in names}
        return pd.DataFrame({"subset": order, **columns})

    def condition(self, name: str) -> ConditionResult:
        return next(c for c in self.conditions if c.name == name)

    def _errors_behind(self, subset: str, errors: dict[str, int]) -> int:
        """Undecodable files of the subset and of the real subset it is paired with."""
        paired = self.real_pairs.get(subset)
        return errors.get(subset, 0) + (errors.get(paired, 0) if paired else 0)


def _errors_per_subset(scores: pa.Table) -> dict[str, int]:
    failed = scores.filter(pc.is_valid(scores.column("error")))
    return pd.Series(failed.column("subset").to_pylist(), dtype=object).value_counts().to_dict()


# ------------------------------------------------------------------------------------------------------ sources


def build_eval_manifest(sources: Sequence, storage_cfg: Optional[StorageConfig] = None) -> pa.Table:
    """The labelled rows of the manifests of ``sources`` (``pipelines.sources.SourceConfig``), each image once.

    ValueError if two benchmarks give one subset name, an image is listed twice with different labels, subsets or
    splits, or the sources' ``real_pairs`` cannot be scored on these rows (``pipelines.sources.check_real_pairs``).
    """
    from pipelines.sources import build_manifest, check_real_pairs, real_pairs_of

    tables = [build_manifest(src, storage_cfg) for src in sources]
    if not tables:
        raise InputError("the evaluation sources list no images")
    _check_one_benchmark_per_subset(sources, tables)
    manifest = pa.concat_tables(tables)
    labelled = manifest.filter(pc.is_valid(manifest.column("label")))
    if labelled.num_rows < manifest.num_rows:
        log.warning("%d unlabelled rows left out of the evaluation", manifest.num_rows - labelled.num_rows)
    if labelled.num_rows == 0:
        raise InputError("no labelled images in the evaluation sources (layouts genimage/ufd/manifest carry labels)")
    # Subset names must not collide with the summary rows, and a missing subset still needs a name.
    subsets = pc.fill_null(labelled.column("subset"), "default")
    labelled = _each_image_once(labelled.set_column(labelled.schema.get_field_index("subset"), "subset", subsets))
    check_real_pairs(labelled, real_pairs_of(sources))
    return labelled


def _check_one_benchmark_per_subset(sources: Sequence, tables: Sequence[pa.Table]) -> None:
    """The same generator in two benchmarks (GenImage's BigGAN and UFD's biggan are both ``biggan``) means two test
    sets: pooled into one row, the numbers would describe neither."""
    layout_of: dict[str, str] = {}
    for source, table in zip(sources, tables, strict=True):
        for subset in pc.unique(table.column("subset")).to_pylist():
            first = layout_of.setdefault(subset, source.layout)
            if first != source.layout:
                raise InputError(f"subset {subset!r} comes from both a {first} source and a {source.layout} source: "
                                 "evaluate the two benchmarks separately")


def _each_image_once(manifest: pa.Table) -> pa.Table:
    """``manifest`` without repeated rows (sources may overlap), sorted by path; ValueError if a path is listed with
    different values."""
    names = manifest.column_names
    unique = manifest.group_by(names, use_threads=False).aggregate([]).select(names).sort_by("path")
    paths = unique.column("path")
    if pc.count_distinct(paths).as_py() != len(paths):
        repeated = next(c["values"] for c in pc.value_counts(paths).to_pylist() if c["counts"] > 1)
        raise InputError(f"{repeated} is listed by two sources with different labels, subsets or splits")
    return unique


# ---------------------------------------------------------------------------------------------- format mix

# Files per class whose first bytes are read to tell their formats: enough to see a container shortcut, cheap on S3.
FORMAT_SAMPLE_PER_CLASS = 200
# Above this total-variation distance between the classes' format shares, the file format alone separates much of
# the set (GenImage: 1.0, JPEG photos against PNG fakes).
FORMAT_SHORTCUT_DISTANCE = 0.5
_CLASS_NAMES = {0: "real", 1: "generated"}


@dataclass
class FormatMix:
    """The file formats of a sample of each class (``{"real": {"JPEG": 180, "PNG": 20}, "generated": {...}}``)."""

    counts: dict[str, dict[str, int]]

    @property
    def distance(self) -> float:
        """Total-variation distance between the classes' format shares: 0 = same mix, 1 = no format in common."""
        shares = [self._shares(name) for name in _CLASS_NAMES.values()]
        if not all(shares):
            return math.nan
        formats = set(shares[0]) | set(shares[1])
        return 0.5 * sum(abs(shares[0].get(f, 0.0) - shares[1].get(f, 0.0)) for f in formats)

    def _shares(self, name: str) -> dict[str, float]:
        counts = self.counts.get(name, {})
        total = sum(counts.values())
        return {fmt: n / total for fmt, n in counts.items()} if total else {}

    def describe(self) -> str:
        """``real: JPEG 100 %; generated: PNG 100 %`` (largest share first)."""
        return "; ".join(f"{name}: " + ", ".join(f"{fmt} {share:.0%}".replace("%", " %") for fmt, share in
                                                 sorted(self._shares(name).items(), key=lambda kv: -kv[1]))
                         for name in _CLASS_NAMES.values() if self.counts.get(name))

    def warning(self) -> Optional[str]:
        """A line for the person reading the table when the format could stand in for the class, else None."""
        if not self.distance >= FORMAT_SHORTCUT_DISTANCE:
            return None
        return (f"the classes differ in file format ({self.describe()}): as-is numbers may measure the format, not "
                "the generator; compare a format-aligned condition (--align jpeg=96)")

    def table(self) -> pd.DataFrame:
        rows = [{"class": name, "format": fmt, "files": n}
                for name, counts in self.counts.items() for fmt, n in sorted(counts.items())]
        return pd.DataFrame(rows, columns=["class", "format", "files"])


def format_mix(manifest: pa.Table, storage_cfg: Optional[StorageConfig] = None,
               per_class: int = FORMAT_SAMPLE_PER_CLASS, seed: int = 0) -> FormatMix:
    """The formats of up to ``per_class`` files of each class of a labelled ``manifest``, told from their first bytes
    (``mpft_core.imageio.sniff_format``: signature checks only, nothing parsed), read as the scoring pass reads
    (``storage.BytesReader``: one client, a few at a time): a file that cannot be read counts as ``unreadable`` (the
    scoring pass makes it an error row), the store failing raises ``StoreUnavailable``. Files no format claims count
    as ``unknown``."""
    from mpft_core.imageio import sniff_format

    labels = manifest.column("label").to_numpy(zero_copy_only=False)
    paths = manifest.column("path").to_pylist()
    rng = np.random.default_rng(seed)
    reader = storage.BytesReader(storage_cfg, head_bytes=16)
    counts: dict[str, dict[str, int]] = {}
    for label, name in _CLASS_NAMES.items():
        rows = np.flatnonzero(labels == label)
        chosen = rows if rows.size <= per_class else np.sort(rng.choice(rows, size=per_class, replace=False))
        tally: dict[str, int] = {}
        for head, error in reader.read_each([paths[row] for row in chosen]):
            fmt = "unreadable" if error is not None else sniff_format(head) or "unknown"
            tally[fmt] = tally.get(fmt, 0) + 1
        if tally:
            counts[name] = tally
    return FormatMix(counts)


# ------------------------------------------------------------------------------------------ degraded decode stage


def _decode_rows(batch: dict, perturbations: list, image_size: int, max_pixels: int, storage_cfg: dict) -> dict:
    """Decode row ``i`` of ``batch`` degraded by ``perturbations[i]`` (``None``: clean), centre-cropped."""
    from pipelines.decode import decode_batch

    return decode_batch(batch, image_size=image_size, train=False, max_pixels=max_pixels, storage=storage_cfg,
                        degrade=[None if p is None else p.apply for p in perturbations])


def _decode_conditions_arrow(batch: dict, *, perturbations: dict, image_size: int, **kwargs) -> pa.Table:
    """Rows tagged with a ``condition`` decoded under it, with the exact Arrow types of the normal decode stage
    (nulls stay nulls) plus the ``condition`` column."""
    from pipelines.decode import decoded_table

    conditions = [str(c) for c in batch["condition"]]
    out = _decode_rows(batch, [perturbations[c] for c in conditions], image_size, **kwargs)
    return decoded_table(out).append_column("condition", pa.array(conditions, pa.string()))


def conditions_manifest(manifest: pa.Table, names: Sequence[str]) -> pa.Table:
    """One copy of the manifest per condition, tagged with a ``condition`` column."""
    return pa.concat_tables([manifest.append_column("condition", pa.array([name] * manifest.num_rows, pa.string()))
                             for name in names])


def _decoded_conditions(tagged: pa.Table, perturbations: dict, image_size: int, resources: ScoringResources,
                        storage_cfg: Optional[StorageConfig]):
    from pipelines.ingest import manifest_blocks

    blocks = manifest_blocks(tagged, resources.rows_per_block, extra_columns=("condition",))
    return ray.data.from_arrow(blocks).map_batches(
        _decode_conditions_arrow,
        fn_kwargs={"perturbations": perturbations, "image_size": image_size, "max_pixels": resources.max_pixels,
                   "storage_cfg": storage.for_workers(storage_cfg)},
        batch_size=resources.rows_per_block, batch_format="numpy", num_cpus=resources.decode_cpus,
    )


# ------------------------------------------------------------------------------------------------------ scoring


class ModelsScorer:
    """Ray Data callable class: every decoded batch scored by each of several models (``DetectorScorer`` each).

    Output rows carry ``model_index`` (position in ``model_bundles``). Comparing models this way (challenger vs
    champion, frozen vs fine-tuned) reads and decodes each image once, and starts one set of actors.
    """

    def __init__(self, model_bundle: list, **scorer_kwargs):
        self.scorers = [DetectorScorer(bundle, **scorer_kwargs) for bundle in model_bundle]

    def __call__(self, batch: dict) -> pa.Table:
        n = len(batch["path"])
        return pa.concat_tables([scorer(batch).append_column("model_index", pa.array([i] * n, pa.int16()))
                                 for i, scorer in enumerate(self.scorers)])


def score_conditions(manifest: pa.Table, perturbations: dict, bundle_refs: list, image_size: int,
                     resources: ScoringResources, storage_cfg: Optional[StorageConfig] = None,
                     embed: bool = False) -> list[dict[str, pa.Table]]:
    """Every manifest row scored under every condition (``{name: Perturbation, Alignment or None}``) by every model,
    in one pipeline run; returns, per model, ``{condition: rows sorted by path}``.

    One run instead of one per condition and model: the scoring actors start (and load the models) once, each
    image is read and decoded once per condition, and decode of the next blocks overlaps with scoring.
    """
    tagged = conditions_manifest(manifest, list(perturbations))
    decoded = _decoded_conditions(tagged, perturbations, image_size, resources, storage_cfg)
    ds = scored_dataset(decoded, list(bundle_refs), resources, n_inputs=tagged.num_rows,
                        carry_columns=("label", "subset", "condition"), embed=embed, scorer_cls=ModelsScorer)
    batches = list(ds.iter_batches(batch_size=None, batch_format="pyarrow"))
    table = pa.concat_tables(batches, promote_options="permissive") if batches else None
    expected = tagged.num_rows * len(bundle_refs)
    if table is None or table.num_rows != expected:
        got = 0 if table is None else table.num_rows
        raise RuntimeError(f"scored {got} rows for {tagged.num_rows} inputs x {len(bundle_refs)} models")
    out = []
    for index in range(len(bundle_refs)):
        mine = table.filter(pc.equal(table.column("model_index"), index))
        per_condition = {}
        for name in perturbations:
            rows = mine.filter(pc.equal(mine.column("condition"), name))
            if rows.num_rows != manifest.num_rows:
                raise RuntimeError(f"model {index}, condition {name}: {rows.num_rows} rows for "
                                   f"{manifest.num_rows} inputs")
            per_condition[name] = rows.drop_columns(["condition", "model_index"]).sort_by("path")
        out.append(per_condition)
    return out


def condition_metrics(scores: pa.Table, threshold: float,
                      real_pairs: Optional[dict[str, str]] = None) -> tuple[dict, int]:
    """(per_subset_metrics on the rows that were scored, fake-only subsets with their paired real subset; number of
    rows with an error)."""
    ok = scores.filter(pc.is_null(scores.column("error")))
    if ok.num_rows == 0:
        raise ValueError("no image of the evaluation set could be scored")
    results = per_subset_metrics(ok.column("label").to_numpy(zero_copy_only=False).astype(np.int64),
                                 ok.column("score").to_numpy(zero_copy_only=False).astype(np.float64),
                                 ok.column("subset").to_pylist(), threshold, pairs=real_pairs)
    return results, scores.num_rows - ok.num_rows


def evaluate(model: ResolvedModel, sources: Sequence, storage_cfg: Optional[StorageConfig] = None,
             perturbations: Sequence[Condition] = (), options: Optional[EvalOptions] = None,
             manifest: Optional[pa.Table] = None) -> EvalResult:
    """Score the labelled ``sources`` (or a ready ``manifest``) clean and under each perturbation or alignment
    (``perturbations``); Ray must be up."""
    return evaluate_many([model], sources, storage_cfg, perturbations, options, manifest)[0]


def evaluate_many(models: Sequence[ResolvedModel], sources: Sequence, storage_cfg: Optional[StorageConfig] = None,
                  perturbations: Sequence[Condition] = (), options: Optional[EvalOptions] = None,
                  manifest: Optional[pa.Table] = None) -> list[EvalResult]:
    """``evaluate`` for several models of the same input size on the same images, in one pass over them.

    A ready ``manifest`` must come from ``sources``: their ``real_pairs`` decide which subsets are scored together
    (checked on it before any model is loaded).
    """
    from pipelines.sources import check_real_pairs, real_pairs_of

    options = options or EvalOptions()
    real_pairs = real_pairs_of(sources)
    if manifest is None:
        manifest = build_eval_manifest(sources, storage_cfg)
    else:
        check_real_pairs(manifest, real_pairs)
    bundles = [make_model_bundle(model) for model in models]
    image_size = bundle_image_size(bundles[0])
    if any(bundle_image_size(b) != image_size for b in bundles):
        raise ValueError("models compared in one pass must share their input size")
    mix = format_mix(manifest, storage_cfg, seed=options.seed) if options.format_check else None
    if mix is not None and mix.warning():
        log.warning("%s", mix.warning())
    named = {CLEAN: None, **{p.name: p for p in perturbations}}
    log.info("evaluating %s on %d images under %d conditions (%s)", ", ".join(m.uri for m in models),
             manifest.num_rows, len(named), ", ".join(named))
    refs = [ray.put(b) for b in bundles]
    scored = score_conditions(manifest, named, refs, image_size, options.resources, storage_cfg)

    results = []
    for model, bundle, ref, per_condition in zip(models, bundles, refs, scored, strict=True):
        threshold = bundle_threshold(bundle)
        conditions = []
        for name, scores in per_condition.items():
            metrics, n_errors = condition_metrics(scores, threshold, real_pairs)
            conditions.append(ConditionResult(name=name, scores=scores, results=metrics, n_errors=n_errors))
        result = EvalResult(model=model, threshold=threshold, conditions=conditions, real_pairs=real_pairs,
                            format_mix=mix)
        if options.feature_space:
            result.feature_spaces = feature_spaces(bundle, ref, manifest, image_size, options, storage_cfg)
        results.append(result)
    return results


# ------------------------------------------------------------------------------------------------ feature space


def sample_for_plot(manifest: pa.Table, max_points: int, seed: int) -> pa.Table:
    """A fixed random sample of at most ``max_points`` rows (same rows for both models)."""
    if manifest.num_rows <= max_points:
        return manifest
    chosen = np.sort(np.random.default_rng(seed).choice(manifest.num_rows, size=max_points, replace=False))
    return manifest.take(pa.array(chosen))


def frozen_backbone_bundle(bundle: dict, storage_cfg: Optional[StorageConfig] = None) -> tuple[dict, str]:
    """A bundle of the same architecture with the backbone weights training started from, and a description.

    Falls back to random init when the checkpoint records no pretrained source or it cannot be loaded offline;
    the description says which, so the plot title never claims a pretrained backbone that was not used.
    """
    from mpft_core.checkpoint import recorded_architecture, save_checkpoint
    from mpft_core.config import DetectorConfig
    from mpft_core.detector import build_detector

    config = DetectorConfig.from_dict(bundle["meta"]["detector"])
    architecture = recorded_architecture(bundle["meta"])  # the tower that was fine-tuned, activation included
    source = config.backbone.pretrained
    name = config.backbone.name
    detector, description = None, f"frozen {name}, random init (the checkpoint records no pretrained weights)"
    if source:
        try:
            detector = build_detector(config, resolve_uri=lambda uri: str(storage.fetch_to_local(uri, storage_cfg)),
                                      architecture=architecture)
            description = f"frozen {name} ({source})"
        except Exception as err:  # noqa: BLE001 - offline hub, missing file: fall back, and say so
            log.warning("pretrained backbone %r unavailable (%s): using random init for the frozen plot", source, err)
            description = f"frozen {name}, random init ({source!r} not available here)"
    if detector is None:
        random_init = config.model_copy(deep=True)
        random_init.backbone.pretrained = None
        detector = build_detector(random_init, architecture=architecture)
    tmp = Path(tempfile.mkdtemp(prefix="mpft-frozen-"))
    try:
        save_checkpoint(detector, tmp)
        frozen = make_model_bundle(ResolvedModel(checkpoint_dir=str(tmp), uri=f"frozen:{name}"))
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return frozen, description


def feature_spaces(bundle: dict, bundle_ref, manifest: pa.Table, image_size: int, options: EvalOptions,
                   storage_cfg: Optional[StorageConfig] = None) -> list[FeatureSpace]:
    """Embeddings of a sample of the clean eval images by the frozen backbone and by the fine-tuned model
    (``bundle``, already in the object store as ``bundle_ref``)."""
    sample = sample_for_plot(manifest, options.max_feature_points, options.seed)
    frozen, frozen_title = frozen_backbone_bundle(bundle, storage_cfg)
    titles = (frozen_title, f"fine-tuned ({bundle['uri']})")
    scored = score_conditions(sample, {CLEAN: None}, [ray.put(frozen), bundle_ref], image_size, options.resources,
                              storage_cfg, embed=True)
    out = []
    for title, per_condition in zip(titles, scored, strict=True):
        rows = per_condition[CLEAN]
        rows = rows.filter(pc.is_null(rows.column("error")))
        if rows.num_rows < 3:
            log.warning("too few decodable images for a feature-space plot")
            return []
        out.append(FeatureSpace(
            title=title,
            embeddings=np.stack(rows.column("embedding").to_numpy(zero_copy_only=False)),
            subsets=np.asarray(rows.column("subset").to_pylist(), dtype=object),
            labels=rows.column("label").to_numpy(zero_copy_only=False),
        ))
    return out


def finite_metrics(result: EvalResult) -> dict[str, float]:
    """Flat ``{condition}/{subset}/{metric}`` numbers for MLflow (NaN, i.e. undefined, left out)."""
    metrics = {}
    for cond in result.conditions:
        for subset, values in cond.results.items():
            for key, value in values.items():
                if isinstance(value, float) and math.isnan(value):
                    continue
                metrics[f"{cond.name}/{subset}/{key}"] = float(value)
        metrics[f"{cond.name}/n_errors"] = float(cond.n_errors)
    return metrics
