"""The figures `mpft evaluate` logs: one reliability diagram per condition, drawn from that condition's scored images,
and never more than one figure open at a time."""

from __future__ import annotations

import numpy as np
import pyarrow as pa
import pytest

from jobs import plots
from jobs.evaluate import _evaluation_figures
from mpft_core.metrics import per_subset_metrics, reliability_bins
from pipelines.evaluation import ConditionResult, EvalResult
from pipelines.scoring_spec import ResolvedModel


@pytest.fixture(autouse=True)
def close_figures():
    yield
    plots.plt.close("all")


def _condition(name: str, scores: list, errors: list) -> ConditionResult:
    labels = [0, 1, 0, 1, 1, 0]
    subsets = ["adm", "adm", "adm", "biggan", "biggan", "biggan"]
    rows = pa.table({"path": [f"/d/{i}.png" for i in range(6)], "label": pa.array(labels, pa.int8()),
                     "subset": subsets, "score": pa.array(scores, pa.float32()),
                     "error": pa.array(errors, pa.string())})
    ok = [i for i, error in enumerate(errors) if error is None]
    results = per_subset_metrics([labels[i] for i in ok], [scores[i] for i in ok], [subsets[i] for i in ok])
    return ConditionResult(name=name, scores=rows, results=results, n_errors=len(errors) - len(ok))


def test_each_condition_gets_a_reliability_diagram_of_its_scored_images_one_figure_open_at_a_time():
    # The failed row's score (0.0 placeholder) must not enter the diagram.
    clean = _condition("clean", [0.1, 0.9, 0.2, 0.8, 0.7, 0.3], [None] * 6)
    blurred = _condition("blur3", [0.4, 0.6, 0.5, 0.5, 0.0, 0.45], [None, None, None, None, "truncated", None])
    result = EvalResult(model=ResolvedModel(checkpoint_dir="/m", uri="/m"), threshold=0.5,
                        conditions=[clean, blurred])

    names, blurred_axes = [], None
    for name, fig in _evaluation_figures(result):
        assert len(plots.plt.get_fignums()) == 1, f"{name} drawn while an earlier figure was still open"
        names.append(name)
        if name == "reliability_blur3.png":
            blurred_axes = fig.axes[0]
        plots.plt.close(fig)

    assert names == ["roc_clean.png", "accuracy_clean.png", "accuracy_blur3.png", "reliability_clean.png",
                     "reliability_blur3.png"]
    expected = reliability_bins([0, 1, 0, 1, 0], np.float32([0.4, 0.6, 0.5, 0.5, 0.45]))
    title, points = blurred_axes.get_title(), blurred_axes.lines[1].get_xdata()
    assert title == f"Reliability, blur3 (ECE {expected.ece:.4f})"
    np.testing.assert_allclose(points, expected.mean_score[expected.count > 0])
