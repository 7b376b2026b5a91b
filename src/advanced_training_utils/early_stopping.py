"""Early stopping on a monitored value (validation loss by default)."""

from __future__ import annotations

import math
from typing import Any

from ._validate import check_choice, check_int, check_real

__all__ = ["EarlyStopping"]


class EarlyStopping:
    """Stop when the monitored value has not improved for ``patience`` consecutive epochs.

    An epoch improves when its value beats the best so far by more than ``min_delta``
    (``value < best - min_delta`` in ``'min'`` mode, ``value > best + min_delta`` in ``'max'``).

    Args:
        patience: epochs without improvement tolerated; >= 1.
        min_delta: the smallest change that counts as improvement; >= 0.
        mode: ``'min'`` or ``'max'``.

    Example:
        >>> es = EarlyStopping(patience=2)
        >>> [es.step(v) for v in (1.0, 0.9, 0.95, 0.91)]
        [False, False, False, True]
        >>> es.best, es.best_epoch
        (0.9, 1)
    """

    def __init__(self, patience: int = 10, min_delta: float = 0.0, mode: str = "min") -> None:
        self.patience = check_int("patience", patience, low=1)
        self.min_delta = check_real("min_delta", min_delta, low=0.0)
        self.mode = check_choice("mode", mode, ("min", "max"))
        self.best = math.inf if mode == "min" else -math.inf
        self.best_epoch = -1
        self.num_bad_epochs = 0
        self.epoch = -1
        self.should_stop = False

    def is_improvement(self, value: float) -> bool:
        """Whether ``value`` beats the best so far by more than ``min_delta``."""
        if self.mode == "min":
            return value < self.best - self.min_delta
        return value > self.best + self.min_delta

    def step(self, value: float) -> bool:
        """Record one epoch's value; return True when training should stop.

        A NaN value never counts as an improvement.
        """
        value = float(value)
        self.epoch += 1
        if not math.isnan(value) and self.is_improvement(value):
            self.best = value
            self.best_epoch = self.epoch
            self.num_bad_epochs = 0
        else:
            self.num_bad_epochs += 1
        self.should_stop = self.num_bad_epochs >= self.patience
        return self.should_stop

    def state_dict(self) -> dict[str, Any]:
        """Settings and progress as plain Python values."""
        return {"patience": self.patience, "min_delta": self.min_delta, "mode": self.mode,
                "best": self.best, "best_epoch": self.best_epoch,
                "num_bad_epochs": self.num_bad_epochs, "epoch": self.epoch,
                "should_stop": self.should_stop}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore from :meth:`state_dict`."""
        for key in ("patience", "min_delta", "mode", "best", "best_epoch", "num_bad_epochs",
                    "epoch", "should_stop"):
            setattr(self, key, state[key])

    def __repr__(self) -> str:
        return (f"EarlyStopping(patience={self.patience}, min_delta={self.min_delta}, "
                f"mode={self.mode!r}, best={self.best}, bad_epochs={self.num_bad_epochs})")
