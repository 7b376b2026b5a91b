"""The report's PNG: the run's curves, its held-out results, training inputs and the diagnosis.

Panels, each present only when the run has what it shows (the layout is computed from the
panels present: two columns, a panel's height fixed in inches, no empty cell):

* loss (train, val) and the validation metrics, with a marker on the epoch whose weights were
  kept (``best_epoch``); learning rate; gradient norm before clipping, with the clip threshold
  (``gradient_clip``) as a horizontal line; fraction of steps clipped (and skipped steps);
* classification (``summary.json``'s ``test``): the confusion matrix (rows normalised, counts
  written in the cells) and the recall of each class with the UAR;
* regression: predicted against true per target (a sample of the test split), the identity line,
  the target's CCC in the title;
* a few training inputs (spectrograms) before and after the run's augmentation;
* the diagnosis text.

:func:`build_report_figure` returns the matplotlib Figure (tests read its axes);
:func:`plot_history` writes it as a PNG.
"""

from __future__ import annotations

import math
import textwrap
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from ...engine.record import HistoryRow

if TYPE_CHECKING:
    from matplotlib.axes import Axes
    from matplotlib.figure import Figure
    from matplotlib.gridspec import SubplotSpec

__all__ = ["RunDetails", "best_epoch_of", "build_report_figure", "plot_history"]

#: Figure width and the height of one row of curve panels, in inches; the PNG's dpi.
WIDTH, ROW_HEIGHT, DPI = 11.0, 3.0, 90
#: The marker label on the curves: ``f"{BEST_LABEL} {epoch}"``.
BEST_LABEL = "weights kept: epoch"


@dataclass(frozen=True)
class RunDetails:
    """What the report shows beyond the history (every field optional).

    Attributes:
        best_epoch: the epoch whose weights were kept (marked on the curves); None: the last
            epoch flagged ``improved`` in the history, if any.
        gradient_clip: the clip threshold (a line on the grad-norm plot); None: no clipping.
        test: ``summary.json``'s ``"test"`` dict (classification or regression metrics).
        predictions: ``{"predicted", "true": [N, K] arrays, "target_names": [K]}``.
        inputs: training inputs ``[N, ...]`` (spectrograms), as loaded.
        augmented: the same inputs after the run's augmentation, or None.
        augmentation: what was done to ``inputs`` (for the titles).
        class_weights: the loss's class weights (``class_weights='balanced'``), in class order,
            shown under the recall bars; None: unweighted.
    """

    best_epoch: int | None = None
    gradient_clip: float | None = None
    test: Mapping[str, Any] | None = None
    predictions: Mapping[str, Any] | None = None
    inputs: np.ndarray | None = None
    augmented: np.ndarray | None = None
    augmentation: str = ""
    class_weights: Sequence[float] | None = None


def _series(history: Sequence[HistoryRow], key: str) -> list[float]:
    return [float("nan") if h.get(key) is None else float(h[key]) for h in history]


def best_epoch_of(history: Sequence[Mapping[str, Any]]) -> int | None:
    """The last epoch flagged ``improved`` in ``history`` (the best so far), or None."""
    best = [int(h["epoch"]) for h in history if h.get("improved")]
    return best[-1] if best else None


def _mark_best(ax: Axes, best: int | None) -> None:
    if best is not None:
        ax.axvline(best, color="0.3", ls=":", lw=1.2, label=f"{BEST_LABEL} {best}")


def _metric_keys(history: Sequence[HistoryRow]) -> list[str]:
    keys = [k for k in (history[0] if history else {}) if k.startswith("val_") and k != "val_loss"]
    overall = [k for k in keys if not k.startswith("val_recall_")]
    return overall or keys


def _epoch_axis(ax: Axes) -> None:
    from matplotlib.ticker import MaxNLocator

    ax.set_xlabel("epoch")
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))


def _finite(values: Sequence[float]) -> bool:
    return any(math.isfinite(v) for v in values)


# ---------------------------------------------------------------- the curve panels
def _loss(ax: Axes, history: Sequence[HistoryRow], d: RunDetails, best: int | None) -> None:
    ep = [h["epoch"] for h in history]
    ax.plot(ep, _series(history, "train_loss"), "o-", ms=3, label="train")
    if _finite(_series(history, "val_loss")):
        ax.plot(ep, _series(history, "val_loss"), "o-", ms=3, label="val")
    _mark_best(ax, best)
    ax.set_title("loss")
    _epoch_axis(ax)
    ax.legend(loc="best", fontsize=8)


def _metrics(ax: Axes, history: Sequence[HistoryRow], d: RunDetails, best: int | None) -> None:
    ep = [h["epoch"] for h in history]
    for k in _metric_keys(history):
        ax.plot(ep, _series(history, k), "s-", ms=3, label=k)
    _mark_best(ax, best)
    ax.set_title("validation metrics")
    _epoch_axis(ax)
    ax.legend(loc="best", fontsize=8)


def _lr(ax: Axes, history: Sequence[HistoryRow], d: RunDetails, best: int | None) -> None:
    ax.plot([h["epoch"] for h in history], _series(history, "lr"), "o-", ms=3,
            color="tab:purple")
    ax.set_yscale("log")
    ax.set_title("learning rate (end of epoch)")
    _epoch_axis(ax)


def _grad_norm(ax: Axes, history: Sequence[HistoryRow], d: RunDetails, best: int | None) -> None:
    ep = [h["epoch"] for h in history]
    ax.plot(ep, _series(history, "grad_norm_mean"), "o-", ms=3, label="mean")
    ax.plot(ep, _series(history, "grad_norm_max"), "^-", ms=3, label="max")
    clip = d.gradient_clip
    if clip is not None and math.isfinite(clip):
        ax.axhline(clip, color="tab:red", ls="--", lw=1.2, label=f"clip threshold {clip:g}")
    ax.set_yscale("log")
    ax.set_title("gradient norm (before clipping)" if clip is not None
                 else "gradient norm (no clipping)")
    _epoch_axis(ax)
    ax.legend(loc="best", fontsize=8)


def _clipped(ax: Axes, history: Sequence[HistoryRow], d: RunDetails, best: int | None) -> None:
    ep = [h["epoch"] for h in history]
    ax.bar(ep, _series(history, "clip_fraction"), color="tab:orange", label="clipped")
    skipped = _series(history, "skipped_steps")
    if any(s > 0 for s in skipped if math.isfinite(s)):
        ax.plot(ep, skipped, "rx", label="skipped steps")
        ax.legend(loc="best", fontsize=8)
    ax.set_title("fraction of steps clipped")
    _epoch_axis(ax)


Panel = Callable[["Axes"], None]


def _curve_panels(history: Sequence[HistoryRow], d: RunDetails) -> list[Panel]:
    best = d.best_epoch if d.best_epoch is not None else best_epoch_of(history)
    drawers = [_loss, *([_metrics] if _metric_keys(history) else []), _lr, _grad_norm, _clipped]
    return [lambda ax, f=f: f(ax, history, d, best) for f in drawers]  # type: ignore[misc]


# ---------------------------------------------------------------- the held-out panels
def _confusion(ax: Axes, counts: np.ndarray, names: Sequence[str]) -> None:
    support = counts.sum(axis=1, keepdims=True)
    rate = np.divide(counts, support, out=np.zeros(counts.shape), where=support > 0)
    ax.imshow(rate, cmap="Blues", vmin=0.0, vmax=1.0, aspect="auto")
    for (i, j), n in np.ndenumerate(counts):
        ax.text(j, i, f"{int(n)}", ha="center", va="center", fontsize=8,
                color="white" if rate[i, j] > 0.5 else "black")
    ticks = range(len(names))
    ax.set_xticks(ticks, names, rotation=30 if max(map(len, names)) > 5 else 0, fontsize=8)
    ax.set_yticks(ticks, names, fontsize=8)
    ax.set_xlabel("predicted")
    ax.set_ylabel("true")
    ax.set_title("test confusion matrix (rows normalised; counts)")


def _recall(ax: Axes, test: Mapping[str, Any], weights: Sequence[float] | None = None
            ) -> None:
    recall = test["per_class_recall"]
    names = list(recall)
    values = [math.nan if recall[n] is None else float(recall[n]) for n in names]
    if weights is not None and len(weights) == len(names):  # the loss's class weights
        names = [f"{n}\nw={w:.2f}" for n, w in zip(names, weights)]
    bars = ax.bar(names, values, color="tab:blue")
    ax.bar_label(bars, [("" if math.isnan(v) else f"{v:.2f}") for v in values], fontsize=8,
                 label_type="center", color="white")  # inside: clear of the UAR line
    uar = test.get("uar")
    if uar is not None:
        ax.axhline(uar, color="tab:red", ls="--", lw=1.2, label=f"UAR {uar:.3f}")
    ax.set_ylim(0, 1.12)
    ax.tick_params(axis="x", labelsize=8, labelrotation=30 if max(map(len, names)) > 5 else 0)
    ax.set_title("test recall per class" + ("" if uar is None else f" (dashed: UAR {uar:.3f})"))


def _scatter(ax: Axes, true: np.ndarray, pred: np.ndarray, name: str, ccc: Any) -> None:
    ax.scatter(true, pred, s=8, alpha=0.5)
    both = np.concatenate([true, pred])
    lo, hi = (float(both.min()), float(both.max())) if both.size else (0.0, 1.0)
    ax.plot([lo, hi], [lo, hi], color="0.3", ls="--", lw=1, label="predicted = true")
    ax.set_xlabel(f"true {name}")
    ax.set_ylabel(f"predicted {name}")
    ax.set_title(f"test {name}: CCC {'n/a' if ccc is None else format(ccc, '.3f')}")
    ax.legend(loc="best", fontsize=8)


def _test_panels(d: RunDetails) -> list[Panel]:
    test = d.test if isinstance(d.test, Mapping) else {}
    panels: list[Panel] = []
    if "confusion_matrix" in test and test.get("class_names"):
        counts = np.asarray(test["confusion_matrix"], dtype=float)
        panels.append(lambda ax: _confusion(ax, counts, list(test["class_names"])))
    if isinstance(test.get("per_class_recall"), Mapping) and test["per_class_recall"]:
        panels.append(lambda ax: _recall(ax, test, d.class_weights))
    p = d.predictions
    if p is not None:
        names = list(p["target_names"])
        for k, name in enumerate(names):
            ccc = test.get(f"ccc_{name}", test.get("ccc") if len(names) == 1 else None)
            panels.append(lambda ax, k=k, name=name, ccc=ccc: _scatter(
                ax, p["true"][:, k], p["predicted"][:, k], name, ccc))
    return panels


# ---------------------------------------------------------------- the wide rows
def _image(x: np.ndarray) -> np.ndarray:
    """A 2-D ``[F, T]`` view of one input (channels of ``[C, F, T]`` averaged)."""
    return x if x.ndim == 2 else x.reshape(-1, *x.shape[-2:]).mean(axis=0)


def _spectrograms(fig: Figure, cell: SubplotSpec, d: RunDetails) -> None:
    rows = [("as loaded", d.inputs)]
    if d.augmented is not None:
        rows.append((textwrap.shorten(d.augmentation, 60), d.augmented))
    else:
        rows[0] = (f"as loaded ({d.augmentation or 'no augmentation'})", d.inputs)
    n = len(d.inputs) if d.inputs is not None else 0
    grid = cell.subgridspec(len(rows), n)
    for r, (what, xs) in enumerate(rows):
        for i in range(n):
            ax = fig.add_subplot(grid[r, i])
            ax.imshow(_image(np.asarray(xs[i])), origin="lower", aspect="auto", cmap="magma")
            ax.set_title(f"training input {i + 1}: {what}", fontsize=8)
            ax.tick_params(labelsize=7)
            if i:
                ax.set_yticklabels([])
            else:
                ax.set_ylabel("mel bin", fontsize=8)


def _diagnosis_lines(diagnosis: str) -> list[str]:
    return ["Diagnosis", *(wrapped for line in diagnosis.splitlines() for wrapped in
                           textwrap.wrap(line, 140, subsequent_indent="    ") or [""])]


def _diagnosis(fig: Figure, cell: SubplotSpec, lines: Sequence[str]) -> None:
    ax = fig.add_subplot(cell)
    ax.axis("off")
    ax.text(0, 1, "\n".join(lines), va="top", ha="left", family="monospace", fontsize=8,
            transform=ax.transAxes)


# ---------------------------------------------------------------- the figure
def _layout(n_half: int, spectrogram_rows: int, diagnosis_lines: int
            ) -> tuple[list[list[int]], list[float]]:
    """Rows of the 2-column grid: ``[[panel index, ...]], [height in inches]``. With an odd
    number of panels the first (the loss) spans both columns, so no cell is left empty."""
    order = list(range(n_half))
    rows = [[order.pop(0)]] if n_half % 2 else []
    rows += [order[i:i + 2] for i in range(0, len(order), 2)]
    heights = [ROW_HEIGHT] * len(rows)
    if spectrogram_rows:
        rows.append([])
        heights.append(0.3 + 1.45 * spectrogram_rows)
    if diagnosis_lines:
        rows.append([])
        heights.append(0.15 + 0.135 * diagnosis_lines)
    return rows, heights


def build_report_figure(history: Sequence[HistoryRow], title: str = "", diagnosis: str = "",
                        details: RunDetails | None = None) -> Figure:
    """The report as a matplotlib Figure (constrained layout, sized to its panels)."""
    from matplotlib.figure import Figure

    d = details or RunDetails()
    half = _curve_panels(history, d) + _test_panels(d)
    has_inputs = d.inputs is not None and len(d.inputs) > 0
    n_spec = (2 if d.augmented is not None else 1) if has_inputs else 0
    lines = _diagnosis_lines(diagnosis) if diagnosis.strip() else []
    rows, heights = _layout(len(half), n_spec, len(lines))
    fig = Figure(figsize=(WIDTH, sum(heights) + (0.4 if title else 0.1)), layout="constrained")
    grid = fig.add_gridspec(len(rows), 2, height_ratios=heights)
    for r, row in enumerate(rows):
        for c, idx in enumerate(row):
            half[idx](fig.add_subplot(grid[r, :] if len(row) == 1 else grid[r, c]))
    r = sum(1 for row in rows if row)
    if n_spec:
        _spectrograms(fig, grid[r, :], d)
        r += 1
    if lines:
        _diagnosis(fig, grid[r, :], lines)
    if title:
        fig.suptitle(title)
    return fig


def plot_history(history: Sequence[HistoryRow], path: Path | str, title: str = "",
                 diagnosis: str = "", details: RunDetails | None = None) -> Path:
    """Write the report (see :func:`build_report_figure`) as a PNG at :data:`DPI` dpi.

    Returns:
        The path written.
    """
    fig = build_report_figure(history, title, diagnosis, details)
    path = Path(path)
    fig.savefig(path, dpi=DPI)
    return path
