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

Warmup: ``warmup_steps=W`` counts calls to ``step()``, i.e. the scheduler's own interval: epochs
for the epoch types, optimizer steps for ``onecycle`` (``train_model_advanced`` steps the epoch
types once per epoch and ``onecycle`` once per optimizer step, never on a skipped step). How the
warmup composes with each type:

* ``cosine`` (a horizon of ``T_max`` steps): the first ``W`` calls ramp every group's LR linearly
  from ``lr * warmup_start_factor`` (default ``1 / (W + 1)``) to ``lr``, reached at call ``W``;
  the cosine then runs over the remaining ``T_max - W`` calls, so after call ``T_max`` the LR is
  exactly ``min_lr``, as without warmup (the cosine is compressed, not cut). Needs ``W < T_max``.
* ``onecycle`` (a horizon of ``total_steps``): it has its own warmup, the rise from
  ``max_lr / div_factor`` to ``max_lr``. ``warmup_steps=W`` sets the length of that rise instead
  of ``pct_start`` (so the LR warms up once): the LR peaks at ``max_lr`` after exactly ``W``
  calls, keeping onecycle's rise shape (``anneal_strategy``) and start LR (``div_factor``), then
  anneals over the remaining ``total_steps - 1 - W`` calls to ``max_lr / (div_factor *
  final_div_factor)``, as without warmup. Needs ``W <= total_steps - 2``; giving ``pct_start``
  or ``warmup_start_factor`` as well is an error (``pct_start`` defaults to 0.3 without warmup).
* ``step``, ``exp`` and ``plateau`` (no horizon): the linear ramp as for ``cosine``, then the
  schedule starts from ``lr`` and runs exactly as it would have without warmup, shifted by ``W``
  calls (as torch's ``SequentialLR`` does: ``step``'s milestones count from the end of warmup).
  During warmup, ``plateau`` ignores the metric.

Counts are explicit: ``step_count`` is the number of ``step()`` calls so far and is saved by
``state_dict()``.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Mapping
from numbers import Real
from typing import Any

import torch
from torch.optim import Optimizer
from torch.optim import lr_scheduler as tls

from ._validate import check_choice, check_int, check_real

__all__ = ["LearningRateScheduler", "SCHEDULER_TYPES"]

log = logging.getLogger(__name__)

SCHEDULER_TYPES = ("plateau", "cosine", "step", "exp", "onecycle")
_INTERVALS = ("epoch", "batch")
_STATE_KEYS = ("scheduler_type", "step_count", "warmup_steps", "start_lrs", "scheduler")
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
            ``steps_per_epoch``. ``pct_start`` (default 0.3) is the fraction of the steps spent
            rising; with ``warmup_steps`` the rise lasts exactly ``warmup_steps`` steps instead.
        warmup_steps: number of ``step()`` calls of warmup (0: none); see the module docstring
            for how it composes with each type (the schedule still ends where it would without
            warmup).
        warmup_start_factor: LR multiplier at the first warmup step, in (0, 1] (not for
            ``onecycle``, whose rise starts at ``max_lr / div_factor``).
        interval: ``'epoch'`` or ``'batch'``: when the training loop should call ``step()``.
            Defaults per type (``'batch'`` for onecycle, ``'epoch'`` otherwise).

    Raises:
        ValueError / TypeError: for an unknown type, an option out of range, or a warmup that
            leaves no step for the schedule (``cosine``: ``warmup_steps >= T_max``;
            ``onecycle``: ``warmup_steps > total_steps - 2``).

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
        pct_start: float | None = None,
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
        if self.scheduler_type == "onecycle" and self.warmup_steps and (
                warmup_start_factor is not None):
            raise ValueError(
                f"warmup_start_factor does not apply to scheduler_type='onecycle', got "
                f"{warmup_start_factor!r}: its warmup starts at max_lr / div_factor; "
                "set div_factor"
            )
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
        if self._ramp_steps:
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
            t_max = check_int("T_max", o["T_max"], low=1)
            check_real("min_lr", o["min_lr"], low=0.0)
            if self.warmup_steps >= t_max:
                raise ValueError(
                    f"warmup_steps must be < T_max for scheduler_type='cosine' (the cosine needs "
                    f"a step after warmup), got warmup_steps={self.warmup_steps}, T_max={t_max}; "
                    f"both count step() calls (interval {self.interval!r})"
                )
            # The warmup takes the first W steps of the horizon: the cosine fits in the rest.
            return tls.CosineAnnealingLR(opt, T_max=t_max - self.warmup_steps,
                                         eta_min=o["min_lr"])
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
        return self._build_onecycle(o)

    def _build_onecycle(self, o: dict[str, Any]) -> tls.OneCycleLR:
        opt = self.optimizer
        max_lr = o["max_lr"]
        if max_lr is None:
            max_lr = [float(g["lr"]) for g in opt.param_groups]
        for i, m in enumerate(max_lr if isinstance(max_lr, (list, tuple)) else [max_lr]):
            check_real(f"max_lr[{i}]" if isinstance(max_lr, (list, tuple)) else "max_lr", m,
                       low=0.0, low_inclusive=False)
        if isinstance(max_lr, (list, tuple)) and len(max_lr) != len(opt.param_groups):
            raise ValueError(f"max_lr must have one value per param group "
                             f"({len(opt.param_groups)}), got {len(max_lr)}: {list(max_lr)!r}")
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
        pct_start = self._onecycle_pct_start(o["pct_start"], total)
        check_choice("anneal_strategy", o["anneal_strategy"], ("cos", "linear"))
        check_real("div_factor", o["div_factor"], low=0.0, low_inclusive=False)
        check_real("final_div_factor", o["final_div_factor"], low=0.0, low_inclusive=False)
        self.total_steps = total
        return tls.OneCycleLR(
            opt, max_lr=max_lr, total_steps=total, pct_start=pct_start,
            anneal_strategy=o["anneal_strategy"], div_factor=o["div_factor"],
            final_div_factor=o["final_div_factor"],
        )

    def _onecycle_pct_start(self, pct_start: float | None, total: int) -> float:
        """``pct_start``, or the one that makes onecycle's rise last exactly ``warmup_steps``."""
        w = self.warmup_steps
        if not w:
            pct_start = 0.3 if pct_start is None else pct_start
            return check_real("pct_start", pct_start, low=0.0, high=1.0, low_inclusive=False,
                              high_inclusive=False)
        if pct_start is not None:
            raise ValueError(
                f"give pct_start or warmup_steps for scheduler_type='onecycle', not both (got "
                f"pct_start={pct_start!r}, warmup_steps={w}): warmup_steps is the length of "
                "onecycle's rise"
            )
        if w > total - 2:
            raise ValueError(
                f"warmup_steps must be <= total_steps - 2 = {total - 2} for "
                f"scheduler_type='onecycle' (the anneal needs a step after the rise), got {w}"
            )
        # torch ends the rise at step pct_start * total - 1: make that step W (the peak).
        return (w + 1) / total

    # ------------------------------------------------------------------ stepping
    @property
    def _ramp_steps(self) -> int:
        """Steps of the linear ramp done here (onecycle warms up inside its own schedule)."""
        return 0 if self.scheduler_type == "onecycle" else self.warmup_steps

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
            metric: the monitored value (e.g. validation loss): a real number or a one-element
                tensor; required by ``plateau`` after warmup, ignored by the other types. A
                tensor is read on the host only by ``plateau``.

        Raises:
            TypeError: ``metric`` is neither a real number nor a tensor.
            ValueError: ``metric`` is a tensor with other than one element; ``plateau`` called
                without a metric, or with a non-finite one.
        """
        if metric is not None:
            _check_metric(metric)
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
        if self.step_count < self._ramp_steps:
            self._set_lrs(self._warmup_lrs(self.step_count))
        elif self.step_count == self._ramp_steps:
            self._set_lrs(self._start_lrs)
        elif self.is_plateau:
            self.scheduler.step(metric)
        elif self.scheduler_type == "onecycle" and self.scheduler.last_epoch >= self.total_steps - 1:
            pass  # past the horizon: hold the final LR (torch would raise)
        else:
            self.scheduler.step()

    def scale_lr(self, factor: float) -> None:
        """Multiply every LR this schedule uses (current, base, warmup target, onecycle bounds,
        the cosine's and plateau's floors) by ``factor``; the schedule's shape is kept: the
        rest of the curve is ``factor`` times what it would have been. Used by divergence
        recovery."""
        check_real("factor", factor, low=0.0, low_inclusive=False)
        for g in self.optimizer.param_groups:
            g["lr"] *= factor
            for key in ("initial_lr", "max_lr", "min_lr"):
                if key in g:
                    g[key] *= factor
        sch = self.scheduler
        if hasattr(sch, "base_lrs"):
            sch.base_lrs = [b * factor for b in sch.base_lrs]
        if hasattr(sch, "eta_min"):  # cosine: else its floor would lift a lowered LR back up
            sch.eta_min *= factor
        if hasattr(sch, "min_lrs"):  # plateau
            sch.min_lrs = [m * factor for m in sch.min_lrs]
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
        if not isinstance(state, Mapping):
            raise TypeError(f"state must be a dict from LearningRateScheduler.state_dict(), got "
                            f"{type(state).__name__}")
        missing = [k for k in _STATE_KEYS if k not in state]
        if missing:
            raise ValueError(f"state is missing {', '.join(missing)}: pass the dict returned by "
                             "LearningRateScheduler.state_dict()")
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


def _check_metric(metric: Any) -> None:
    """Reject a metric that ``float()`` would fail on deep inside (no host read here)."""
    if isinstance(metric, torch.Tensor):
        if metric.numel() != 1:
            raise ValueError("metric must be a real number or a one-element tensor, got a "
                             f"tensor of shape {tuple(metric.shape)}")
    elif isinstance(metric, bool) or not isinstance(metric, Real):
        raise TypeError(f"metric must be a real number or a one-element tensor, got {metric!r} "
                        f"of type {type(metric).__name__}")
