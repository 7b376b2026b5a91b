"""Learning-rate scheduling: torch's own schedulers behind one constructor, plus linear warmup.

``LearningRateScheduler(optimizer, scheduler_type, **options)`` builds one of torch's schedulers
and adds an optional linear warmup that composes with every type (``plateau`` included).

Types, their torch class, the interval at which ``step()`` is meant to be called, and the options
each one reads (defaults in brackets):

============  =========================  ========  ============================================
type          torch class                interval  options
============  =========================  ========  ============================================
``plateau``   ``ReduceLROnPlateau``      epoch     patience [5], factor [0.5], min_lr [0],
                                                   threshold [1e-4], mode ['min'], cooldown [0]
``cosine``    ``CosineAnnealingLR``      epoch     T_max [50], min_lr [0]
``step``      ``StepLR``                 epoch     step_size [10], gamma or factor (see below)
``exp``       ``ExponentialLR``          epoch     gamma [0.95]
``onecycle``  ``OneCycleLR``             batch     max_lr [the optimizer's lr], total_steps, or
                                                   epochs and steps_per_epoch; pct_start [0.3]
============  =========================  ========  ============================================

The ``step`` type's decay: the guide lists ``factor`` for plateau/step and ``gamma`` for step/exp.
The rule here is: ``step`` multiplies the LR by ``gamma`` when ``gamma`` is given, else by
``factor`` when ``factor`` is given, else by 0.5.

Warmup: with ``warmup_steps=W > 0`` the first ``W`` calls to ``step()`` ramp every group's LR
linearly from ``lr * warmup_start_factor`` (default ``1 / (W + 1)``) up to the LR the main schedule
starts from, which is reached at call ``W``; from then on the main schedule runs exactly as it
would have without warmup. Warmup counts in the scheduler's own interval (epochs for the epoch
types, batches for ``onecycle``). During warmup, ``plateau`` ignores the metric.

``onecycle`` past its ``total_steps`` holds its final LR instead of raising (torch raises);
a resumed onecycle schedule keeps the horizon it was saved with (a warning says so when the
new run asked for another).

Counts are explicit: ``step_count`` is the number of ``step()`` calls so far and is saved by
``state_dict()``.
"""

from __future__ import annotations

import logging
import math
from typing import Any

import torch
from torch.optim import Optimizer
from torch.optim import lr_scheduler as tls

from ._validate import check_choice, check_int, check_real

__all__ = ["LearningRateScheduler", "SCHEDULER_TYPES"]

log = logging.getLogger(__name__)

SCHEDULER_TYPES = ("plateau", "cosine", "step", "exp", "onecycle")
_INTERVALS = ("epoch", "batch")
_DEFAULT_INTERVAL = {"plateau": "epoch", "cosine": "epoch", "step": "epoch", "exp": "epoch",
                     "onecycle": "batch"}


class LearningRateScheduler:
    """One of torch's LR schedulers chosen by name, with optional linear warmup.

    Args:
        optimizer: the optimizer whose param groups' ``lr`` is scheduled.
        scheduler_type: one of ``'plateau'``, ``'cosine'``, ``'step'``, ``'exp'``, ``'onecycle'``.
        patience, factor, min_lr, threshold, mode, cooldown: ``plateau`` options (``factor`` is
            also the ``step`` decay when ``gamma`` is not given).
        T_max: ``cosine`` period in steps of its interval.
        gamma: ``step``/``exp`` multiplicative decay.
        step_size: ``step`` period.
        max_lr, total_steps, epochs, steps_per_epoch, pct_start, anneal_strategy, div_factor,
            final_div_factor: ``onecycle`` options; give ``total_steps`` or both ``epochs`` and
            ``steps_per_epoch``.
        warmup_steps: number of ``step()`` calls of linear warmup (0: none).
        warmup_start_factor: LR multiplier at the first warmup step, in (0, 1].
        interval: ``'epoch'`` or ``'batch'``: when the training loop should call ``step()``.
            Defaults per type (``'batch'`` for onecycle, ``'epoch'`` otherwise).

    Raises:
        ValueError / TypeError: for an unknown type or an option out of range.

    Example:
        >>> model = torch.nn.Linear(2, 1)
        >>> opt = torch.optim.SGD(model.parameters(), lr=0.1)
        >>> sched = LearningRateScheduler(opt, 'step', step_size=2, gamma=0.5)
        >>> for _ in range(3):
        ...     opt.step(); sched.step()
        >>> sched.get_lr()
        0.05
    """

    def __init__(
        self,
        optimizer: Optimizer,
        scheduler_type: str = "plateau",
        *,
        patience: int = 5,
        factor: float | None = None,
        T_max: int = 50,
        gamma: float | None = None,
        step_size: int = 10,
        min_lr: float = 0.0,
        threshold: float = 1e-4,
        mode: str = "min",
        cooldown: int = 0,
        max_lr: float | list[float] | None = None,
        total_steps: int | None = None,
        epochs: int | None = None,
        steps_per_epoch: int | None = None,
        pct_start: float = 0.3,
        anneal_strategy: str = "cos",
        div_factor: float = 25.0,
        final_div_factor: float = 1e4,
        warmup_steps: int = 0,
        warmup_start_factor: float | None = None,
        interval: str | None = None,
    ) -> None:
        if not isinstance(optimizer, Optimizer):
            raise TypeError(
                f"optimizer must be a torch.optim.Optimizer, got {type(optimizer).__name__}"
            )
        if not isinstance(scheduler_type, str):
            raise TypeError(f"scheduler_type must be a str, got {scheduler_type!r}")
        self.scheduler_type = check_choice("scheduler_type", scheduler_type.lower(), SCHEDULER_TYPES)
        self.optimizer = optimizer
        self.warmup_steps = check_int("warmup_steps", warmup_steps, low=0)
        if warmup_start_factor is None:
            warmup_start_factor = 1.0 / (self.warmup_steps + 1)
        self.warmup_start_factor = check_real(
            "warmup_start_factor", warmup_start_factor, low=0.0, high=1.0, low_inclusive=False
        )
        self.interval = check_choice(
            "interval", interval or _DEFAULT_INTERVAL[self.scheduler_type], _INTERVALS
        )
        self.step_count = 0
        self.scheduler = self._build(
            patience=patience, factor=factor, T_max=T_max, gamma=gamma, step_size=step_size,
            min_lr=min_lr, threshold=threshold, mode=mode, cooldown=cooldown, max_lr=max_lr,
            total_steps=total_steps, epochs=epochs, steps_per_epoch=steps_per_epoch,
            pct_start=pct_start, anneal_strategy=anneal_strategy, div_factor=div_factor,
            final_div_factor=final_div_factor,
        )
        # The LR each group starts the main schedule from (after the torch scheduler's own setup).
        self._start_lrs = [float(g["lr"]) for g in optimizer.param_groups]
        if self.warmup_steps:
            self._set_lrs(self._warmup_lrs(0))

    # ------------------------------------------------------------------ construction
    def _build(self, **o: Any) -> Any:
        t = self.scheduler_type
        opt = self.optimizer
        if t == "plateau":
            factor = 0.5 if o["factor"] is None else o["factor"]
            check_real("factor", factor, low=0.0, high=1.0, low_inclusive=False,
                       high_inclusive=False)
            check_int("patience", o["patience"], low=0)
            check_real("min_lr", o["min_lr"], low=0.0)
            check_real("threshold", o["threshold"], low=0.0)
            check_choice("mode", o["mode"], ("min", "max"))
            check_int("cooldown", o["cooldown"], low=0)
            return tls.ReduceLROnPlateau(
                opt, mode=o["mode"], factor=factor, patience=o["patience"],
                threshold=o["threshold"], cooldown=o["cooldown"], min_lr=o["min_lr"],
            )
        if t == "cosine":
            check_int("T_max", o["T_max"], low=1)
            check_real("min_lr", o["min_lr"], low=0.0)
            return tls.CosineAnnealingLR(opt, T_max=o["T_max"], eta_min=o["min_lr"])
        if t == "step":
            gamma = o["gamma"] if o["gamma"] is not None else o["factor"]
            gamma = 0.5 if gamma is None else gamma
            check_real("gamma", gamma, low=0.0, high=1.0, low_inclusive=False)
            check_int("step_size", o["step_size"], low=1)
            return tls.StepLR(opt, step_size=o["step_size"], gamma=gamma)
        if t == "exp":
            gamma = 0.95 if o["gamma"] is None else o["gamma"]
            check_real("gamma", gamma, low=0.0, high=1.0, low_inclusive=False)
            return tls.ExponentialLR(opt, gamma=gamma)
        # onecycle
        max_lr = o["max_lr"]
        if max_lr is None:
            max_lr = [float(g["lr"]) for g in opt.param_groups]
        for i, m in enumerate(max_lr if isinstance(max_lr, (list, tuple)) else [max_lr]):
            check_real(f"max_lr[{i}]" if isinstance(max_lr, (list, tuple)) else "max_lr", m,
                       low=0.0, low_inclusive=False)
        total = o["total_steps"]
        if total is None:
            if o["epochs"] is None or o["steps_per_epoch"] is None:
                raise ValueError(
                    "onecycle needs total_steps, or both epochs and steps_per_epoch; got "
                    f"total_steps=None, epochs={o['epochs']!r}, "
                    f"steps_per_epoch={o['steps_per_epoch']!r}"
                )
            total = check_int("epochs", o["epochs"], low=1) * check_int(
                "steps_per_epoch", o["steps_per_epoch"], low=1
            )
        check_int("total_steps", total, low=1)
        check_real("pct_start", o["pct_start"], low=0.0, high=1.0, low_inclusive=False,
                   high_inclusive=False)
        check_choice("anneal_strategy", o["anneal_strategy"], ("cos", "linear"))
        check_real("div_factor", o["div_factor"], low=0.0, low_inclusive=False)
        check_real("final_div_factor", o["final_div_factor"], low=0.0, low_inclusive=False)
        self.total_steps = total
        return tls.OneCycleLR(
            opt, max_lr=max_lr, total_steps=total, pct_start=o["pct_start"],
            anneal_strategy=o["anneal_strategy"], div_factor=o["div_factor"],
            final_div_factor=o["final_div_factor"],
        )

    # ------------------------------------------------------------------ stepping
    def _warmup_lrs(self, k: int) -> list[float]:
        s = self.warmup_start_factor
        frac = s + (1.0 - s) * k / self.warmup_steps
        return [lr * frac for lr in self._start_lrs]

    def _set_lrs(self, lrs: list[float]) -> None:
        for group, lr in zip(self.optimizer.param_groups, lrs):
            group["lr"] = lr

    @property
    def in_warmup(self) -> bool:
        """True while the next ``step()`` call is still part of the warmup ramp."""
        return self.step_count < self.warmup_steps

    @property
    def is_plateau(self) -> bool:
        """True when ``step()`` needs the monitored metric."""
        return self.scheduler_type == "plateau"

    def step(self, metric: float | torch.Tensor | None = None) -> None:
        """Advance the schedule by one interval.

        Args:
            metric: the monitored value (e.g. validation loss); required by ``plateau`` after
                warmup, ignored by the other types. A 0-dim tensor is read on the host here.

        Raises:
            ValueError: ``plateau`` called without a metric, or with a non-finite one.
        """
        if self.is_plateau and not self.in_warmup or self.is_plateau and metric is not None:
            if metric is None:
                raise ValueError(
                    "metric is required for scheduler_type='plateau': call step(val_loss)"
                )
            value = float(metric)
            if not math.isfinite(value):
                raise ValueError(f"metric must be finite for scheduler_type='plateau', got {value}")
            metric = value
        self.step_count += 1
        if self.step_count < self.warmup_steps:
            self._set_lrs(self._warmup_lrs(self.step_count))
        elif self.step_count == self.warmup_steps:
            self._set_lrs(self._start_lrs)
        elif self.is_plateau:
            self.scheduler.step(metric)
        elif self.scheduler_type == "onecycle" and self.scheduler.last_epoch >= self.total_steps - 1:
            pass  # past the horizon: hold the final LR (torch would raise)
        else:
            self.scheduler.step()

    def scale_lr(self, factor: float) -> None:
        """Multiply every LR this schedule uses (current, base, warmup target, onecycle bounds)
        by ``factor``; the schedule's shape is kept. Used by divergence recovery."""
        check_real("factor", factor, low=0.0, low_inclusive=False)
        for g in self.optimizer.param_groups:
            g["lr"] *= factor
            for key in ("initial_lr", "max_lr", "min_lr"):
                if key in g:
                    g[key] *= factor
        sch = self.scheduler
        if hasattr(sch, "base_lrs"):
            sch.base_lrs = [b * factor for b in sch.base_lrs]
        if getattr(sch, "_last_lr", None) is not None:
            sch._last_lr = [float(g["lr"]) for g in self.optimizer.param_groups]
        self._start_lrs = [x * factor for x in self._start_lrs]

    def get_lr(self) -> float:
        """The current learning rate of the first param group."""
        return float(self.optimizer.param_groups[0]["lr"])

    def get_last_lr(self) -> list[float]:
        """The current learning rate of every param group, in order."""
        return [float(g["lr"]) for g in self.optimizer.param_groups]

    # ------------------------------------------------------------------ state
    def state_dict(self) -> dict[str, Any]:
        """Plain-type state: the step count, warmup setup and the torch scheduler's state."""
        return {
            "scheduler_type": self.scheduler_type,
            "step_count": self.step_count,
            "warmup_steps": self.warmup_steps,
            "start_lrs": list(self._start_lrs),
            "scheduler": self.scheduler.state_dict(),
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore from :meth:`state_dict`. Restore the optimizer's own state as well, since the
        current LRs live in its param groups."""
        if state.get("scheduler_type") != self.scheduler_type:
            raise ValueError(
                f"state_dict is for scheduler_type={state.get('scheduler_type')!r}, "
                f"this scheduler is {self.scheduler_type!r}"
            )
        self.step_count = int(state["step_count"])
        self.warmup_steps = int(state["warmup_steps"])
        self._start_lrs = [float(x) for x in state["start_lrs"]]
        if self.scheduler_type == "onecycle":
            saved = int(state["scheduler"]["total_steps"])
            if saved != self.total_steps:
                log.warning("onecycle: the restored schedule keeps its horizon of %d steps (this "
                            "run asked for %d); after it the LR stays at its final value",
                            saved, self.total_steps)
            self.total_steps = saved
        self.scheduler.load_state_dict(state["scheduler"])

    def __repr__(self) -> str:
        return (f"LearningRateScheduler(type={self.scheduler_type!r}, interval={self.interval!r}, "
                f"warmup_steps={self.warmup_steps}, step_count={self.step_count})")
