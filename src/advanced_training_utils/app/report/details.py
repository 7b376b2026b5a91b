"""What a run directory holds for the report beyond its history: :class:`~.plots.RunDetails`.

Read from ``summary.json`` (``best_epoch``, ``"test"``) and the run's options (``summary.json``
or, for a Python API run, its checkpoint: ``gradient_clip`` and the augmentation), plus the
files ``advtrain train`` leaves for the report (``test_predictions.npz``, ``train_samples.npz``).
Anything missing (an API run, an older run) just leaves its panel out.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from ..evaluation import load_predictions
from .plots import RunDetails, best_epoch_of
from .samples import augment_samples, load_samples

__all__ = ["load_run_details"]


def _clip(config: Mapping[str, Any] | None) -> float | None:
    value = (config or {}).get("gradient_clip")
    return float(value) if isinstance(value, (int, float)) and not isinstance(value, bool) \
        else None


def load_run_details(run_dir: Path, summary: Mapping[str, Any] | None,
                     config: Mapping[str, Any] | None,
                     history: Sequence[Mapping[str, Any]]) -> RunDetails:
    """The :class:`~.plots.RunDetails` of the run in ``run_dir``.

    Args:
        run_dir: the folder of the run's metrics log (and, for ``advtrain train``, its files).
        summary: ``summary.json``'s content, or None (a Python API run).
        config: the run's options (``summary["options"]`` or the checkpoint's), or None.
        history: the run's epochs (the kept epoch when the summary does not say it).
    """
    s = summary or {}
    best = s.get("best_epoch")
    best = best if isinstance(best, int) and best > 0 else best_epoch_of(history)
    test = s.get("test") if isinstance(s.get("test"), Mapping) else None
    inputs = load_samples(run_dir) if summary is not None else None
    augmented, how = augment_samples(inputs, config) if inputs is not None else (None, "")
    return RunDetails(best_epoch=best, gradient_clip=_clip(config), test=test,
                      predictions=load_predictions(run_dir) if summary is not None else None,
                      inputs=inputs, augmented=augmented, augmentation=how,
                      class_weights=s.get("class_weights"))
