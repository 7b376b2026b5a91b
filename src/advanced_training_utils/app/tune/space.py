"""The search space of ``advtrain tune``: a YAML file, one distribution per option.

Each key is an option of ``advtrain train`` (a training option or the task's, as ``--set``
takes them); its value says how to draw it::

    learning_rate: {type: float, low: 1.0e-4, high: 1.0e-2, log: true}
    weight_decay:  {type: float, low: 0.0, high: 0.1}
    batch_size:    {type: int, low: 16, high: 64, step: 16}
    scheduler_type: {type: categorical, choices: [cosine, plateau]}

``float`` and ``int`` take ``low`` < ``high`` (both drawn values included), ``log: true``
(log-uniform; needs ``low`` > 0) or ``step`` (a grid from ``low``; not with ``log``);
``categorical`` takes a non-empty list of ``choices`` (numbers, strings, booleans, null).
:func:`read_space` refuses, with one line naming the option, a file that is not such a mapping,
an unknown key or type, bad bounds, and the options a tune fixes itself (``epochs``: the
trials' length is ``--epochs``; ``monitor``/``mode``: the objective; ``seed``: ``--seed``).
The values themselves (``low``, ``high`` and every choice) are then checked as options by
:func:`check_values` before any trial starts.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

__all__ = ["Dimension", "read_space", "check_values", "FIXED_BY_TUNE", "SpaceError"]

#: Options a tune sets itself; a space may not search them.
FIXED_BY_TUNE = {"epochs": "the trials' length is --epochs (the pruner counts epochs)",
                 "monitor": "the objective; set it with --set monitor=...",
                 "mode": "the objective's direction; set it with --set mode=...",
                 "seed": "the trials share --seed (a searched seed is noise, not a setting)"}

_KEYS = {"float": {"type", "low", "high", "log", "step"},
         "int": {"type", "low", "high", "log", "step"},
         "categorical": {"type", "choices"}}
_SCALARS = (bool, int, float, str, type(None))


class SpaceError(ValueError):
    """A search space that cannot be used (the message names the file and the option)."""


@dataclass(frozen=True)
class Dimension:
    """One searched option: ``kind`` ``float``/``int`` (``low``, ``high``, ``log``, ``step``) or
    ``categorical`` (``choices``)."""

    name: str
    kind: str
    low: float | int | None = None
    high: float | int | None = None
    log: bool = False
    step: float | int | None = None
    choices: tuple[Any, ...] = ()

    def extremes(self) -> list[Any]:
        """The values to check as options: the bounds, or every choice."""
        return list(self.choices) if self.kind == "categorical" else [self.low, self.high]

    def distribution(self) -> Any:
        """The optuna distribution (optuna is imported here)."""
        from optuna.distributions import (
            CategoricalDistribution,
            FloatDistribution,
            IntDistribution,
        )

        if self.kind == "categorical":
            return CategoricalDistribution(list(self.choices))
        cls = FloatDistribution if self.kind == "float" else IntDistribution
        step = self.step if self.step is not None else (None if self.kind == "float" else 1)
        return cls(self.low, self.high, log=self.log, step=step)  # type: ignore[arg-type]


def read_space(path: Path, load_yaml: Callable[[str, str], Any]) -> list[Dimension]:
    """The dimensions of the space file ``path`` (``load_yaml(text, where)`` parses it within
    the CLI's bounds).

    Raises:
        SpaceError: unreadable, not a non-empty mapping, or a bad entry (named).
    """
    where = f"--space {path}"
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as e:
        raise SpaceError(f"{where}: cannot read it ({e})") from None
    loaded = load_yaml(text, where)
    if not isinstance(loaded, dict) or not loaded:
        raise SpaceError(f"{where}: expected a non-empty mapping of option -> distribution, "
                         f"got {type(loaded).__name__ if loaded is not None else 'nothing'}")
    return [_dimension(where, str(name), spec) for name, spec in loaded.items()]


def _dimension(where: str, name: str, spec: Any) -> Dimension:
    if name in FIXED_BY_TUNE:
        raise SpaceError(f"{where}: {name} cannot be searched: {FIXED_BY_TUNE[name]}")
    at = f"{where}: {name}"
    if not isinstance(spec, Mapping):
        raise SpaceError(f"{at}: expected a mapping such as {{type: float, low: 1.0e-4, "
                         f"high: 1.0e-2, log: true}}, got {spec!r}")
    kind = spec.get("type")
    if kind not in _KEYS:
        raise SpaceError(f"{at}: type must be one of {', '.join(_KEYS)}, got {kind!r}")
    unknown = sorted(set(map(str, spec)) - _KEYS[kind])
    if unknown:
        raise SpaceError(f"{at}: unknown key(s) {', '.join(unknown)} for type {kind}; valid: "
                         + ", ".join(sorted(_KEYS[kind])))
    if kind == "categorical":
        return _categorical(at, name, spec.get("choices"))
    return _numeric(at, name, kind, spec)


def _categorical(at: str, name: str, choices: Any) -> Dimension:
    if not isinstance(choices, list) or not choices:
        raise SpaceError(f"{at}: choices must be a non-empty list, got {choices!r}")
    bad = [c for c in choices if not isinstance(c, _SCALARS)]
    if bad:
        raise SpaceError(f"{at}: choices must be numbers, strings, booleans or null, got "
                         f"{bad[0]!r}")
    return Dimension(name, "categorical", choices=tuple(choices))


def _numeric(at: str, name: str, kind: str, spec: Mapping[str, Any]) -> Dimension:
    want = (int,) if kind == "int" else (int, float)
    values = {}
    for key in ("low", "high", "step"):
        v = spec.get(key)
        if v is None and key == "step":
            continue
        if isinstance(v, bool) or not isinstance(v, want) or not math.isfinite(v):
            what = "an integer" if kind == "int" else "a finite number"
            raise SpaceError(f"{at}: {key} must be {what}, got {v!r}")
        values[key] = v
    low, high, step, log = values["low"], values["high"], values.get("step"), spec.get("log")
    log = False if log is None else log
    if not isinstance(log, bool):
        raise SpaceError(f"{at}: log must be true or false, got {log!r}")
    if not low < high:
        raise SpaceError(f"{at}: low must be below high, got low={low!r}, high={high!r}")
    if log and low <= 0:
        raise SpaceError(f"{at}: log: true needs low > 0, got low={low!r}")
    if step is not None and (log or step <= 0):
        raise SpaceError(f"{at}: step must be > 0 and cannot be used with log: true, got "
                         f"step={step!r}")
    return Dimension(name, kind, low=low, high=high, log=log, step=step)


def check_values(dims: list[Dimension], valid: list[str],
                 check: Callable[[dict[str, Any]], str | None]) -> None:
    """Check the searched options: each name is one of ``valid``, and ``check(options)``
    (what is wrong with them, or None) passes at each of its extremes.

    Raises:
        SpaceError: naming the option (and the value).
    """
    unknown = sorted(d.name for d in dims if d.name not in valid)
    if unknown:
        raise SpaceError(f"--space: unknown option(s) {', '.join(unknown)}; valid options: "
                         + ", ".join(valid))
    for d in dims:
        for value in d.extremes():
            problem = check({d.name: value})
            if problem is not None:
                raise SpaceError(f"--space: {d.name}={value!r} is refused: {problem}")
