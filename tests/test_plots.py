"""app/report/plots.py: the report's figure (its panels, markers, layout) and PNG."""

import math

import matplotlib
import numpy as np
import pytest

from advanced_training_utils.app.report.plots import (
    BEST_LABEL,
    RunDetails,
    build_report_figure,
    plot_history,
)

matplotlib.use("Agg")

CURVES = ["loss", "validation metrics", "learning rate (end of epoch)",
          "gradient norm (before clipping)", "fraction of steps clipped"]


def _history(n=4, val=True, skipped=0, improved=(1, 2)):
    return [{"epoch": i + 1, "train_loss": 1.0 / (i + 1), "val_loss": 1.2 / (i + 1) if val
             else None, "val_accuracy": 0.5 + 0.1 * i, "lr": 1e-3, "grad_norm_mean": 1.0,
             "grad_norm_max": 2.0, "clip_fraction": 0.25, "skipped_steps": skipped,
             "improved": i + 1 in improved}
            for i in range(n)]


def _classification():
    cm = [[8, 2, 0], [1, 5, 4], [0, 0, 0]]
    return {"accuracy": 13 / 20, "uar": (0.8 + 0.5) / 2, "macro_f1": 0.5,
            "per_class_recall": {"happy": 0.8, "sad": 0.5, "calm": None},
            "confusion_matrix": cm, "class_names": ["happy", "sad", "calm"]}


def _predictions(n=50):
    g = np.random.default_rng(0)
    true = g.normal(size=(n, 2))
    return {"predicted": true + 0.3 * g.normal(size=(n, 2)), "true": true,
            "target_names": ["valence", "arousal"]}


def _inputs(n=3):
    return np.random.default_rng(1).normal(size=(n, 1, 16, 40)).astype(np.float32)


def _titles(fig):
    return [ax.get_title() for ax in fig.axes]


def _has_data(ax):
    return bool(ax.lines or ax.images or ax.patches or ax.collections or ax.texts)


def _assert_grid_filled(fig):
    """Every cell of the top-level grid holds an axes: no blank area."""
    covered, grid = set(), None
    for ax in fig.axes:
        spec = ax.get_subplotspec().get_topmost_subplotspec()
        grid = spec.get_gridspec()
        covered |= {(r, c) for r in spec.rowspan for c in spec.colspan}
    rows, cols = grid.get_geometry()
    assert covered == {(r, c) for r in range(rows) for c in range(cols)}


def _assert_legends_cover_no_point(fig):
    fig.canvas.draw()
    for ax in fig.axes:
        legend = ax.get_legend()
        if legend is None:
            continue
        box = legend.get_window_extent()
        for line in ax.lines:
            xy = np.column_stack([line.get_xdata(), line.get_ydata()]).astype(float)
            if len(xy) < 2 or line.get_label().startswith(BEST_LABEL) or \
                    line.get_linestyle() == "--":  # reference lines span the axes
                continue
            ends = ax.transData.transform(xy[np.isfinite(xy).all(1)])
            t = np.linspace(0, 1, 25)[:, None]  # the segments, not only the markers
            points = np.concatenate([ends, *(a + t * (b - a) for a, b in zip(ends[:-1], ends[1:]))])
            inside = [box.contains(*p) for p in points]
            assert not any(inside), (ax.get_title(), line.get_label())


def _assert_clean(fig):
    assert all(_has_data(ax) for ax in fig.axes), [t for t, ax in zip(_titles(fig), fig.axes)
                                                    if not _has_data(ax)]
    _assert_grid_filled(fig)
    _assert_legends_cover_no_point(fig)


def test_classification_run_has_confusion_recall_and_spectrogram_panels():
    details = RunDetails(best_epoch=2, gradient_clip=1.0, test=_classification(),
                         inputs=_inputs(), augmented=_inputs() + 1, augmentation="SpecAugment")
    fig = build_report_figure(_history(), "t", "line one\nline two", details)
    titles = _titles(fig)
    assert titles[:5] == CURVES
    assert titles[5] == "test confusion matrix (rows normalised; counts)"
    assert titles[6] == "test recall per class (dashed: UAR 0.650)"
    assert titles[7:13] == [f"training input {i}: as loaded" for i in (1, 2, 3)] + [
        f"training input {i}: SpecAugment" for i in (1, 2, 3)]
    assert len(titles) == 14 and fig.axes[13].texts[0].get_text().startswith("Diagnosis\nline")
    # the confusion matrix: rows normalised, counts written in the cells; an empty row is 0
    image = fig.axes[5].images[0].get_array()
    np.testing.assert_allclose(image, [[0.8, 0.2, 0], [0.1, 0.5, 0.4], [0, 0, 0]])
    assert [t.get_text() for t in fig.axes[5].texts] == ["8", "2", "0", "1", "5", "4", "0", "0",
                                                         "0"]
    heights = [p.get_height() for p in fig.axes[6].patches]
    assert heights[:2] == [0.8, 0.5] and math.isnan(heights[2])  # absent class: no bar
    np.testing.assert_array_equal(fig.axes[12].images[0].get_array(), _inputs()[2, 0] + 1)
    _assert_clean(fig)


def test_regression_run_has_a_scatter_per_target_with_the_identity_line():
    p = _predictions()
    test = {"ccc": 0.5, "mae": 0.2, "ccc_valence": 0.61, "ccc_arousal": 0.39}
    fig = build_report_figure(_history(val=False), details=RunDetails(test=test, predictions=p))
    titles = _titles(fig)
    assert titles == ["loss", "validation metrics", "learning rate (end of epoch)",
                      "gradient norm (no clipping)", "fraction of steps clipped",
                      "test valence: CCC 0.610", "test arousal: CCC 0.390"]
    for k, ax in enumerate(fig.axes[5:]):
        np.testing.assert_array_equal(ax.collections[0].get_offsets(),
                                      np.column_stack([p["true"][:, k], p["predicted"][:, k]]))
        identity = [line for line in ax.lines if line.get_label() == "predicted = true"]
        x, y = identity[0].get_data()
        assert list(x) == list(y)  # y = x over the data's range
    _assert_clean(fig)


@pytest.mark.parametrize("metrics", [True, False], ids=["with-metrics", "loss-only"])
def test_an_api_run_shows_the_history_panels_only(metrics):
    history = [{k: v for k, v in h.items() if metrics or k != "val_accuracy"}
               for h in _history(3)]
    fig = build_report_figure(history, details=RunDetails(gradient_clip=0.5))
    assert _titles(fig) == [c for c in CURVES if metrics or c != "validation metrics"]
    _assert_clean(fig)  # no empty cell: with 5 panels, the loss spans its row
    assert fig.axes[0].get_subplotspec().colspan == range(0, 2 if metrics else 1)


@pytest.mark.parametrize("best, expected", [(3, 3), (None, 2)], ids=["given", "from-history"])
def test_the_kept_epoch_is_marked_on_the_loss_and_metric_curves(best, expected):
    fig = build_report_figure(_history(), details=RunDetails(best_epoch=best))
    for ax in fig.axes[:2]:
        (marker,) = [ln for ln in ax.lines if ln.get_label() == f"{BEST_LABEL} {expected}"]
        assert list(marker.get_xdata()) == [expected, expected]
    assert not any(ln.get_label().startswith(BEST_LABEL) for ax in fig.axes[2:] for ln in ax.lines)


@pytest.mark.parametrize("clip", [0.25, 5.0, None, math.inf])
def test_the_clip_threshold_is_a_line_on_the_grad_norm_plot(clip):
    fig = build_report_figure(_history(), details=RunDetails(gradient_clip=clip))
    ax = fig.axes[3]
    lines = [ln for ln in ax.lines if ln.get_label().startswith("clip threshold")]
    if clip is None or math.isinf(clip):
        assert lines == []
    else:
        assert list(lines[0].get_ydata()) == [clip, clip]
        lo, hi = ax.get_ylim()
        assert lo <= clip <= hi  # drawn inside the axes
    assert ax.get_title() == ("gradient norm (no clipping)" if clip is None
                              else "gradient norm (before clipping)")


def test_without_augmentation_the_spectrogram_titles_say_so():
    details = RunDetails(inputs=_inputs(), augmentation="no augmentation in this run")
    fig = build_report_figure(_history(), details=details)
    assert _titles(fig)[5:] == [f"training input {i}: as loaded (no augmentation in this run)"
                                for i in (1, 2, 3)]
    _assert_clean(fig)


@pytest.mark.parametrize("history", [_history(), _history(val=False), _history(1, skipped=2),
                                     [dict(h, train_loss=math.nan) for h in _history(3)]],
                         ids=["full", "no-val", "one-epoch-skipped", "nan-loss"])
def test_writes_a_png_sized_to_its_panels(tmp_path, history):
    """The height follows the rows present (it was a fixed 11 x 8.5 in with a blank band)."""
    import matplotlib.image

    out = plot_history(history, tmp_path / "r.png", title="t", diagnosis="line one\nline two")
    assert out == tmp_path / "r.png"
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    h, w = matplotlib.image.imread(out).shape[:2]
    fig = build_report_figure(history, "t", "line one\nline two")
    assert w == 11 * 90 and abs(h - fig.get_figheight() * 90) < 1
    _assert_clean(fig)


def test_closes_its_figure(tmp_path):
    import matplotlib.pyplot as plt

    before = len(plt.get_fignums())
    plot_history(_history(), tmp_path / "r.png")
    assert len(plt.get_fignums()) == before


def test_the_class_weights_show_under_the_recall_bars():
    details = RunDetails(test=_classification(), class_weights=[0.5, 1.25, 2.0])
    fig = build_report_figure(_history(), details=details)
    recall = next(ax for ax in fig.axes if ax.get_title().startswith("test recall per class"))
    labels = [t.get_text() for t in recall.get_xticklabels()]
    assert labels == ["happy\nw=0.50", "sad\nw=1.25", "calm\nw=2.00"]
    plain = build_report_figure(_history(), details=RunDetails(test=_classification()))
    recall = next(ax for ax in plain.axes if ax.get_title().startswith("test recall per class"))
    assert [t.get_text() for t in recall.get_xticklabels()] == ["happy", "sad", "calm"]
