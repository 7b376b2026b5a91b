"""Held-out evaluation for ``summary.json``: the test split, whole, through :mod:`..metrics`.

The metrics come from epoch-level sufficient statistics (a confusion matrix; CCC moments), never
from batch means, so they equal scikit-learn on the same predictions:

* :func:`classification_test`: ``{"uar", "macro_f1", "accuracy", "per_class_recall": {class:
  recall}, "confusion_matrix": [[count]] (rows = true class, columns = predicted),
  "class_names": [...]}``; a class absent from the test split has recall None.
* :func:`regression_test`: ``{"ccc", "mae"}`` plus ``ccc_<target>`` / ``mae_<target>``, and a
  sample of at most :data:`MAX_PREDICTIONS` (predicted, true) rows written to
  :data:`PREDICTIONS_FILE` in the run directory for the report's scatter plots.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ..metrics import ClassificationStats, RegressionStats, nest_per_class

__all__ = ["MAX_PREDICTIONS", "PREDICTIONS_FILE", "classification_test", "load_predictions",
           "regression_test"]

#: The file (in the run directory) holding the sample of test predictions: arrays
#: ``predicted`` and ``true`` ``[N, K]`` and ``target_names`` ``[K]``.
PREDICTIONS_FILE = "test_predictions.npz"

#: At most this many test rows are kept for the scatter plots (evenly spaced over the split).
MAX_PREDICTIONS = 2000


def _json_number(v: float) -> float | None:
    return None if math.isnan(v) else v


@torch.no_grad()
def classification_test(model: torch.nn.Module, batches: Iterable[tuple[Any, Any]],
                        device: torch.device, class_names: Sequence[str]) -> dict[str, Any]:
    """UAR, macro-F1, accuracy, per-class recall and the confusion matrix over ``batches``.

    Args:
        model: returns logits ``[B, C]``; put in eval mode here.
        batches: ``(inputs, class indices)`` pairs (the whole test split).
        device: where the model is.
        class_names: the C class names, in index order.
    """
    model.eval()
    stats = ClassificationStats(len(class_names), class_names=list(class_names), device=device)
    for x, y in batches:
        stats.update(model(x.to(device)).float(), y.to(device))
    values: dict[str, Any] = nest_per_class(
        {k: _json_number(v) for k, v in stats.compute().items()})
    cm = stats.confusion_matrix()
    counts = (torch.zeros(len(class_names), len(class_names)) if cm is None else cm.cpu())
    values["confusion_matrix"] = counts.round().long().tolist()
    values["class_names"] = list(class_names)
    return values


@torch.no_grad()
def regression_test(model: torch.nn.Module, batches: Iterable[tuple[Any, Any]],
                    device: torch.device, target_names: Sequence[str],
                    out_dir: Path | None = None) -> dict[str, Any]:
    """CCC and MAE (mean and per target) over ``batches``; a sample of the predictions is
    written to ``out_dir/``:data:`PREDICTIONS_FILE` when ``out_dir`` is given.

    Args:
        model: returns ``[B, K]`` predictions; put in eval mode here.
        batches: ``(inputs, targets [B, K])`` pairs (the whole test split).
        device: where the model is.
        target_names: the K target names.
        out_dir: the run directory, or None to write nothing.
    """
    model.eval()
    stats = RegressionStats(len(target_names), target_names=list(target_names), device=device)
    pred, true = [], []
    for x, y in batches:
        out = model(x.to(device)).float().reshape(len(y), -1)
        y = y.to(device).float().reshape(len(y), -1)
        stats.update(out, y)
        pred.append(out.cpu())
        true.append(y.cpu())
    values = {k: _json_number(v) for k, v in stats.compute().items()}
    if out_dir is not None and pred:
        p, t = torch.cat(pred).numpy(), torch.cat(true).numpy()
        keep = np.unique(np.linspace(0, len(p) - 1, min(len(p), MAX_PREDICTIONS)).astype(int))
        np.savez(Path(out_dir) / PREDICTIONS_FILE, predicted=p[keep], true=t[keep],
                 target_names=np.array(list(target_names)))
    return values


def load_predictions(run_dir: Path) -> dict[str, Any] | None:
    """The sample written by :func:`regression_test` (``predicted``, ``true`` ``[N, K]``,
    ``target_names``), or None when the run has none or it is unreadable."""
    path = Path(run_dir) / PREDICTIONS_FILE
    if not path.is_file():
        return None
    try:
        with np.load(path, allow_pickle=False) as z:
            return {"predicted": z["predicted"], "true": z["true"],
                    "target_names": [str(n) for n in z["target_names"]]}
    except (OSError, ValueError, KeyError):
        return None
