"""Averaged weights: an exponential moving average (EMA) and stochastic weight averaging (SWA).

Each average lives in its own copy of the model (``copy.deepcopy`` once, at the start), never
in the live model: the live model trains, checkpoints save its weights under ``model``, and the
averages are parts of the checkpoint of their own (``ema``, ``swa``), each with its update
counter. Validation with ``eval_ema=True`` evaluates the averaged copy; nothing is ever swapped
into the live model (so no checkpoint can hold swapped weights as the model's).

EMA (``ema_decay=d``): after every optimizer step the guard took, one fused update over the
parameters, ``avg <- avg + w * (live - avg)`` with::

    d_n = min(d, (1 + n) / (10 + n))   # ema_warmup=True (the default); d_n = d without it
    w   = (1 - d_n) * taken            # taken: 0 on a step the guard skipped, else 1
    n  <- n + taken                    # n: the updates made so far (0 before the first)

All on the device (``n`` is a 0-dim int64 tensor, ``taken`` the guard's verdict): no host read,
and a skipped step leaves the average and ``n`` as they were. The update is three fused
``torch._foreach_*`` kernels per dtype (``sub``, ``mul`` by the 0-dim weight, ``add``):
``_foreach_lerp_`` takes its weight only as a host number or as one tensor per parameter of
the parameter's shape, neither of which fits a weight that lives on the device. The warm-up
is the one of TensorFlow's ``ExponentialMovingAverage(num_updates=...)`` and timm's
``ModelEmaV3``: early averages do not remember the random initial weights for long.
Buffers (BatchNorm running statistics, counters) are not averaged: the copy takes the live
model's buffers whenever it is read (evaluation, checkpoint).

SWA (``swa_start=k``): at the end of each epoch from epoch ``k`` (1-based) on, the live weights
are added to an equal average, ``avg <- avg + (live - avg) / (m + 1)`` (``m``: epochs averaged
so far; one fused ``_foreach_lerp_``). If the model has BatchNorm layers, their statistics are
then recomputed for the averaged weights by one pass over the training loader in train mode
with ``momentum=None`` (a cumulative average, as ``torch.optim.swa_utils.update_bn``), with no
gradient, no augmentation, and the loader's and the global random states restored afterwards:
the training run's data order and random draws are those of a run without SWA. The learning
rate schedule is the run's own (no SWA schedule), so resuming with any scheduler is the plain
resume (Lightning #11665 crashed there).

What ``train_model_advanced`` returns about them: ``best_weights``, the weights the best epoch
was judged on, which ``_best.pt`` holds under that entry (its ``best['weights']`` says which)
and, with ``restore_best_weights``, the model holds at the end: ``'model'`` (the live
weights; always without ``eval_ema``, and before SWA's first average), ``'ema'`` or ``'swa'``
(``eval_ema``: SWA's when it is on, else the EMA's); and ``averaged_weights``,
``{'ema': state dict, 'swa': state dict}`` of the averages at the end, for those that are on
(SWA's once it has averaged). With ``restore_best_weights=False`` the model ends with its live
weights. The checkpoint's ``model`` entry is always the live weights.

On resume the saved averages and counters are restored (bit-exact); ``ema_decay``,
``ema_warmup`` and ``swa_start`` may change (the new values apply from the next update), and an
average switched on at a resume starts from the resumed live weights with its counter at 0.

An average that is off is :class:`NoAverage`: the loop calls its ``step`` (an empty method: no
kernel, no allocation), the table saves None.

Under DDP every rank holds the same live weights, so every rank keeps its own identical
average; the main rank's is saved, like the model. SWA's batch-norm pass runs on each rank's
shard; the run broadcasts rank 0's statistics before evaluating.

Example:
    >>> import torch
    >>> model = torch.nn.Linear(2, 1)
    >>> ema = EMA(model, decay=0.9)
    >>> with torch.no_grad():
    ...     _ = model.weight.add_(1.0)
    >>> ema.step(torch.tensor(False))   # a step the guard took: d_0 = min(0.9, 1/10) = 0.1
    >>> int(ema.count), torch.allclose(ema.module().weight, model.weight - 0.1)
    (1, True)
    >>> ema.step(torch.tensor(True))    # a skipped step: nothing changes
    >>> int(ema.count)
    1
"""

from __future__ import annotations

import copy
import logging
from collections.abc import Callable, Iterable
from typing import Any

import torch
from torch.nn.modules.batchnorm import _BatchNorm

from .._validate import check_int, check_real

__all__ = ["EMA", "SWA", "NoAverage", "Average", "recompute_bn", "ema_decay_at"]

log = logging.getLogger(__name__)


def ema_decay_at(n: int, decay: float, warmup: bool = True) -> float:
    """The decay of the EMA's update number ``n + 1`` (``n`` updates made before it): the
    formula of the module docstring, on the host (for documentation and tests).

    Example:
        >>> ema_decay_at(0, 0.999), ema_decay_at(8, 0.999) == 9 / 18, ema_decay_at(10**6, 0.999)
        (0.1, True, 0.999)
    """
    return min(decay, (1 + n) / (10 + n)) if warmup else decay


class NoAverage:
    """An average that is off: no work per step or epoch, nothing to evaluate or save."""

    kind = "model"
    holds = "model"   # what evaluation and the best epoch see: the live model

    def step(self, bad: torch.Tensor) -> None:
        """Nothing to update (no kernel)."""

    def end_epoch(self, epoch: int) -> None:
        """Nothing to average."""

    def module(self) -> None:
        """No averaged copy: evaluation uses the live model."""
        return None

    def weights(self) -> None:
        return None

    def state_dict(self) -> None:
        return None

    def load_state_dict(self, state: Any) -> None:
        """Nothing to restore."""


class _Averaged:
    """The averaged copy of ``model`` (parameters grouped by device and dtype) and its state."""

    kind = "model"

    def __init__(self, model: torch.nn.Module) -> None:
        self.live = model
        self.copy = copy.deepcopy(model).requires_grad_(False).eval()
        pairs = [(a, p) for a, p in zip(self.copy.parameters(), model.parameters())
                 if p.is_floating_point()]
        self._groups: dict[tuple[torch.device, torch.dtype],
                           tuple[list[torch.Tensor], list[torch.Tensor]]] = {}
        for a, p in pairs:
            avg, live = self._groups.setdefault((p.device, p.dtype), ([], []))
            avg.append(a.data)
            live.append(p.data)

    def _copy_buffers(self) -> None:
        """Buffers are not averaged: the copy holds the live model's."""
        with torch.no_grad():
            for a, b in zip(self.copy.buffers(), self.live.buffers()):
                a.copy_(b)

    def _counter(self) -> dict[str, Any]:
        raise NotImplementedError

    def weights(self) -> dict[str, torch.Tensor]:
        """The averaged model's full state dict (a plain dict of the copy's tensors)."""
        return dict(self.copy.state_dict())

    def state_dict(self) -> dict[str, Any]:
        """``{'weights': the averaged model's state dict, 'count': updates so far, ...}``."""
        return {"weights": self.weights(), **self._counter()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.copy.load_state_dict(state["weights"])


class EMA(_Averaged):
    """An exponential moving average of ``model``'s parameters (see the module docstring).

    Args:
        model: the live (unwrapped) model; the average starts at its current weights.
        decay: ``d`` in (0, 1): the weight of the old average at each update once warmed up.
        warmup: ``d_n = min(d, (1 + n) / (10 + n))`` (True) or ``d`` from the first update.
        skip_bad: whether a step the guard calls bad is skipped (the run's ``recovery``; with
            recovery off the optimizer steps anyway, and so does the average).

    Attributes:
        count: 0-dim int64 device tensor, the updates made (steps skipped not counted).
    """

    kind = "ema"
    holds = "ema"     # what :meth:`module` holds

    def __init__(self, model: torch.nn.Module, decay: float, warmup: bool = True,
                 skip_bad: bool = True) -> None:
        super().__init__(model)
        self.decay = check_real("ema_decay", decay, low=0.0, high=1.0, low_inclusive=False,
                                high_inclusive=False)
        self.warmup = warmup
        self.skip_bad = skip_bad
        device = next((p.device for p in model.parameters()), torch.device("cpu"))
        self.count = torch.zeros((), dtype=torch.int64, device=device)

    @torch.no_grad()
    def step(self, bad: torch.Tensor) -> None:
        """One update after an optimizer step; ``bad`` (0-dim bool device tensor, the guard's
        verdict) masks it out. Device ops only."""
        taken = bad.logical_not() if self.skip_bad else torch.ones_like(bad)
        taken = taken.to(self.count.device)
        if self.warmup:
            n = self.count.to(torch.float64)
            w = (1.0 - ((1.0 + n) / (10.0 + n)).clamp_(max=self.decay)) * taken
        else:
            w = taken.to(torch.float64) * (1.0 - self.decay)
        for (_, dtype), (avg, live) in self._groups.items():
            diff = torch._foreach_sub(live, avg)
            torch._foreach_mul_(diff, w.to(dtype))
            torch._foreach_add_(avg, diff)
        self.count.add_(taken)

    def end_epoch(self, epoch: int) -> None:
        """Nothing per epoch: the EMA updates per step."""

    def module(self) -> torch.nn.Module:
        """The averaged copy (eval mode), with the live model's buffers."""
        self._copy_buffers()
        return self.copy

    def weights(self) -> dict[str, torch.Tensor]:
        self._copy_buffers()
        return super().weights()

    def _counter(self) -> dict[str, Any]:
        return {"count": self.count, "decay": self.decay, "warmup": self.warmup}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore the average and its counter (this run's ``decay``/``warmup`` apply)."""
        super().load_state_dict(state)
        self.count.copy_(torch.as_tensor(state["count"]))


class SWA(_Averaged):
    """An equal average of ``model``'s weights at the end of each epoch from ``start`` on.

    Args:
        model: the live (unwrapped) model.
        start: the first epoch (1-based) whose end weights are averaged.
        bn_inputs: a fresh iterable of model inputs (on the device) for the batch-norm pass,
            restoring every random state it draws from when it is exhausted or closed (the
            run's: the training loader's inputs, see ``engine/parts.py``); None: no pass.

    Attributes:
        count: the epochs averaged so far (0: none yet; :meth:`module` is then None, and the
            saved weights are the live model's at the start).
    """

    kind = "swa"

    def __init__(self, model: torch.nn.Module, start: int,
                 bn_inputs: Callable[[], Iterable[Any]] | None = None) -> None:
        super().__init__(model)
        self.start = check_int("swa_start", start, low=1)
        self.count = 0
        self.bn_inputs = bn_inputs if any(
            isinstance(m, _BatchNorm) for m in model.modules()) else None

    def step(self, bad: torch.Tensor) -> None:
        """Nothing per step: SWA averages at epoch ends."""

    @torch.no_grad()
    def end_epoch(self, epoch: int) -> None:
        """Average the live weights in when ``epoch >= start``; then recompute the batch-norm
        statistics of the average (or take the live buffers when it has no BatchNorm)."""
        if epoch < self.start:
            return
        weight = 1.0 / (self.count + 1)
        for avg, live in self._groups.values():
            torch._foreach_lerp_(avg, live, weight)
        self.count += 1
        self._copy_buffers()
        if self.bn_inputs is not None:
            recompute_bn(self.copy, self.bn_inputs())
            self.copy.eval()

    def module(self) -> torch.nn.Module | None:
        """The averaged copy (eval mode, its own batch-norm statistics), or None before the
        first epoch averaged."""
        return self.copy if self.count else None

    @property
    def holds(self) -> str:
        """What :meth:`module` holds: ``'swa'``, or ``'model'`` before the first average."""
        return "swa" if self.count else "model"

    def _counter(self) -> dict[str, Any]:
        return {"count": self.count, "start": self.start}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        super().load_state_dict(state)
        self.count = int(state["count"])


#: What an average of the run is: :class:`EMA`, :class:`SWA` or :class:`NoAverage`.
Average = EMA | SWA | NoAverage


@torch.no_grad()
def recompute_bn(module: torch.nn.Module, inputs: Iterable[Any]) -> None:
    """Recompute ``module``'s BatchNorm running statistics over ``inputs`` (model inputs, on
    the module's device): reset, then one forward per input in train mode with
    ``momentum=None`` (a cumulative average over the batches), as
    ``torch.optim.swa_utils.update_bn``. The module is left in train mode (the caller sets
    the mode it needs); the momenta are restored. ``inputs`` is closed at the end (so a
    generator that restores random states does so at once, also after an error).
    """
    bns = [m for m in module.modules() if isinstance(m, _BatchNorm)]
    if not bns:
        return
    momenta = {}
    for m in bns:
        m.reset_running_stats()
        momenta[m], m.momentum = m.momentum, None
    module.train()
    it = iter(inputs)
    try:
        for x in it:
            module(x)
    finally:
        close = getattr(it, "close", None)
        if close is not None:
            close()
    for m in bns:
        m.momentum = momenta[m]
