"""Target columns -> training targets: a label mapping (classification) or floats (regression).

Rule (``task="auto"``): one target column whose values are not all numbers gives
classification, with classes sorted (numerically when every label is a number, else as text)
and coded 0 .. C-1; one or more columns of numbers give regression, float32 ``[N, K]``. Several
columns with a non-numeric value are an error, as are empty or non-finite cells.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence

import numpy as np

from ..._validate import check_choice

__all__ = ["TASKS", "encode_targets", "parse_target_names"]

TASKS = ("auto", "classification", "regression")


def parse_target_names(target: str | Sequence[str]) -> list[str]:
    """``"valence,arousal"`` or ``["valence", "arousal"]`` -> ``["valence", "arousal"]``."""
    names = target.split(",") if isinstance(target, str) else list(target)
    names = [str(n).strip() for n in names]
    if not names or any(not n for n in names) or len(set(names)) != len(names):
        raise ValueError(f"target must name one or more distinct columns (e.g. 'emotion' or "
                         f"'valence,arousal'), got {target!r}")
    return names


def _as_float(v: str) -> float | None:
    try:
        x = float(v)
    except ValueError:
        return None
    return x if math.isfinite(x) else None


def encode_targets(columns: Mapping[str, Sequence[str]], task: str = "auto"
                   ) -> tuple[np.ndarray, str, list[str] | None]:
    """``(targets, task, class_names)``.

    Args:
        columns: target name -> ``[N]`` raw cell strings, in target order.
        task: ``"auto"`` (the rule above), ``"classification"`` (one column) or ``"regression"``.

    Returns:
        classification: int64 ``[N]`` codes, ``"classification"``, the sorted class names;
        regression: float32 ``[N, K]``, ``"regression"``, None.
    """
    check_choice("task", task, TASKS)
    names = list(columns)
    for name in names:
        for i, v in enumerate(columns[name]):
            if str(v).strip() == "":
                raise ValueError(f"target column {name!r}, data row {i + 1}: empty value")
    numeric = {n: all(_as_float(v) is not None for v in columns[n]) for n in names}
    if task == "auto":
        task = "regression" if all(numeric.values()) else "classification"
    if task == "classification":
        if len(names) != 1:
            raise ValueError(f"classification needs exactly one target column, got {names}; "
                             "several targets must all be numbers (regression)")
        return _classes(columns[names[0]], numeric[names[0]])
    for n in names:
        for i, v in enumerate(columns[n]):
            if _as_float(v) is None:
                raise ValueError(f"target column {n!r}, data row {i + 1}: {v!r} is not a finite "
                                 "number; regression targets must all be numbers")
    values = np.array([[float(v) for v in columns[n]] for n in names], dtype=np.float32)
    return np.ascontiguousarray(values.T), "regression", None     # [N, K]


def _classes(values: Sequence[str], numeric: bool) -> tuple[np.ndarray, str, list[str]]:
    labels = [str(v).strip() for v in values]
    key = (lambda s: (float(s), s)) if numeric else None
    names = sorted(set(labels), key=key)
    index = {n: i for i, n in enumerate(names)}
    return np.array([index[v] for v in labels], dtype=np.int64), "classification", names
