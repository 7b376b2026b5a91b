"""The run's stateful parts in one table, and the run's progress.

Every part of a run that changes while it trains sits in one mapping from its checkpoint key
(the constants of :mod:`advanced_training_utils.checkpoint`, where every key of the file is
named) to an object with ``state_dict()`` / ``load_state_dict()``. A checkpoint is
:func:`save_parts` of that table, a resume is :func:`load_parts` of it, and divergence
recovery's snapshot is :func:`save_parts` of a sub-table. Adding a stateful feature is one line
in the table (see ``engine/parts.py`` and ARCHITECTURE.md).

Rules:

* a part that is switched off is a no-op whose ``state_dict()`` is None (:class:`NoState`, or
  the no-op parts of ``engine/parts.py``); it is saved as None, as in every format-1 file;
* :func:`load_parts` loads the parts in table order and skips a part whose saved state is None
  or absent (saved with that part off, or older than the part);
* the run's progress (:class:`RunProgress`) sits in the table under :data:`PROGRESS`, but its
  keys are top-level keys of the file (format 1: :func:`~..checkpoint.find_resumable` reads the
  position there): :func:`save_parts` lifts them to the top and :func:`load_parts` hands it the
  whole file.

Per-rank state (the global RNGs, the guard, the loaders' generators, the open epoch's sums)
stays per rank: :class:`RankState` is each rank's entry of ``checkpoint.RANKS_KEY``.

Example:
    >>> import torch
    >>> model = torch.nn.Linear(2, 1)
    >>> table = {"model": model, "progress": RunProgress(epoch=3)}
    >>> state = save_parts(table)
    >>> sorted(state)[:4], state["epoch"]
    (['best', 'check_from', 'epoch', 'global_step'], 3)
    >>> fresh = {"model": torch.nn.Linear(2, 1), "progress": RunProgress()}
    >>> load_parts(fresh, state)
    >>> fresh["progress"].epoch, torch.equal(fresh["model"].weight, model.weight)
    (3, True)
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, Protocol, runtime_checkable

import torch

from .. import checkpoint as ck
from .dataorder import ResumableLoader
from .loop import EpochSums
from .record import HistoryRow

__all__ = ["Stateful", "PROGRESS", "save_parts", "load_parts", "NoState", "Fixed",
           "KeepSettings", "RunProgress", "EpochPosition", "RankState"]

#: The table key of the run's progress (its keys are top-level keys of the file).
PROGRESS = "progress"


@runtime_checkable
class Stateful(Protocol):
    """A part of the table: ``state_dict()`` of plain types and tensors (None: nothing to save),
    and ``load_state_dict(state)``."""

    def state_dict(self) -> Any: ...

    def load_state_dict(self, state: Any) -> None: ...


def save_parts(parts: Mapping[str, Stateful]) -> dict[str, Any]:
    """``{key: part.state_dict()}`` for the table, the progress's keys at the top level."""
    out: dict[str, Any] = {}
    for key, part in parts.items():
        state = part.state_dict()
        if key == PROGRESS:
            out.update(state)
        else:
            out[key] = state
    return out


def load_parts(parts: Mapping[str, Stateful], state: Mapping[str, Any]) -> None:
    """Load each part of the table from ``state`` (a :func:`save_parts` result or a checkpoint),
    in table order; a part whose state is None or absent is left as it is."""
    for key, part in parts.items():
        saved = state if key == PROGRESS else state.get(key)
        if saved is not None:
            part.load_state_dict(saved)


class NoState:
    """A part that is switched off: nothing to save (None), nothing to load."""

    def state_dict(self) -> None:
        return None

    def load_state_dict(self, state: Any) -> None:
        """Nothing to restore."""


@dataclass(frozen=True)
class Fixed:
    """A value saved with every checkpoint that a resume checks before loading anything (the
    options, the optimizer's spec: see :mod:`.resume`); loading it changes nothing."""

    value: Any

    def state_dict(self) -> Any:
        return self.value

    def load_state_dict(self, state: Any) -> None:
        """Checked by :mod:`.resume` before the parts load; nothing to restore."""


class KeepSettings:
    """``part`` whose settings are this run's: loading restores the saved state with the current
    values of the attributes ``names`` (the clipper's threshold may change on resume, and a
    rollback keeps the run's threshold).

    Example:
        >>> from advanced_training_utils.clipping import GradientClipper
        >>> old, new = GradientClipper(5.0), GradientClipper(1.0)
        >>> KeepSettings(new, "max_norm").load_state_dict(old.state_dict())
        >>> new.max_norm
        1.0
    """

    def __init__(self, part: Any, *names: str) -> None:
        self.part = part
        self.names = names

    def state_dict(self) -> Any:
        return self.part.state_dict()

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        self.part.load_state_dict({**state, **{n: getattr(self.part, n) for n in self.names}})


@dataclass
class RunProgress:
    """How far the run is: its history, epochs done, batches into the next epoch, optimizer
    steps, where the open recovery interval began, and the best epoch so far.

    ``best_weights`` (a copy of the best epoch's weights, for ``restore_best_weights``) is not
    saved: ``_best.pt`` holds them (see :meth:`.runfiles.RunFiles.best_weights`).
    ``best_kind`` says which weights the best epoch was judged on and ``_best.pt`` holds them
    under: ``'model'`` (the live weights, ``checkpoint.MODEL_KEY``), ``'ema'`` or ``'swa'``
    (``eval_ema``: the average's entry, ``checkpoint.EMA_KEY`` / ``SWA_KEY``); it is saved
    as ``best['weights']``.
    """

    history: list[HistoryRow] = field(default_factory=list)
    epoch: int = 0           # epochs done
    step: int = 0            # batches done in the open epoch (0 at an epoch's end)
    global_step: int = 0     # optimizer steps so far
    check_from: int = 0      # the batch where the open recovery interval began
    best_loss: float = math.inf
    best_epoch: int = 0      # 1-based; 0: no epoch improved yet
    best_kind: str = "model"  # the weights the best epoch was judged on: model, ema, swa
    best_weights: dict[str, torch.Tensor] | None = field(default=None, repr=False)

    def end_epoch(self, epoch: int, row: HistoryRow) -> None:
        """Record epoch ``epoch`` as done with its history ``row``."""
        self.history.append(row)
        self.epoch, self.step, self.check_from = epoch, 0, 0

    def state_dict(self) -> dict[str, Any]:
        """The progress under its top-level checkpoint keys."""
        return {ck.HISTORY_KEY: list(self.history), ck.EPOCH_KEY: self.epoch,
                ck.STEP_KEY: self.step,
                ck.BEST_KEY: {"val_loss": self.best_loss, "epoch": self.best_epoch,
                              "weights": self.best_kind},
                ck.GLOBAL_STEP_KEY: self.global_step, ck.CHECK_FROM_KEY: self.check_from}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Restore from :meth:`state_dict` or a whole checkpoint (format 1 before the global
        step and the check position were saved: 0, and the saved batch)."""
        self.history = list(state[ck.HISTORY_KEY])
        self.epoch, self.step = int(state[ck.EPOCH_KEY]), int(state[ck.STEP_KEY])
        self.global_step = int(state.get(ck.GLOBAL_STEP_KEY, 0))
        self.check_from = int(state.get(ck.CHECK_FROM_KEY, self.step)) if self.step else 0
        best = state[ck.BEST_KEY]
        self.best_loss, self.best_epoch = best["val_loss"], best["epoch"]
        self.best_kind = str(best.get("weights", "model"))  # absent before weight averaging


class EpochPosition:
    """The open epoch's place in the training data.

    As a part (``checkpoint.EPOCH_ORDER_KEY``) it saves the epoch's batch order in mid-epoch
    checkpoints (None at an epoch's end); loading keeps it for :meth:`start`, which begins the
    next epoch at the saved batch with the saved random state (restored per rank by
    :class:`RankState`). ``sums`` is the open epoch's sums (set by the run after each step).
    """

    def __init__(self, loader: ResumableLoader, progress: RunProgress) -> None:
        self.loader = loader
        self.progress = progress
        self.sums: EpochSums | None = None
        self.rng: dict[str, Any] | None = None   # a mid-epoch resume's random states
        self._order: dict[str, torch.Tensor] | None = None

    def state_dict(self) -> dict[str, torch.Tensor] | None:
        return self.loader.order_state() if self.progress.step else None

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        self._order = state

    def start(self, epoch: int) -> EpochSums | None:
        """Set the loader up for ``epoch``; the sums to continue (mid-epoch resume) or None."""
        self.loader.set_epoch(epoch)
        if not self.progress.step:
            self.sums = None
            return None
        self.loader.start_epoch_at(self._order, self.progress.step, self.rng)
        return self.sums


class RankState:
    """One rank's entry of ``checkpoint.RANKS_KEY``: the global RNG states, the open epoch's
    sums (mid-epoch), the guard, and the loaders' generators (with, mid-epoch, the random state
    when the epoch's iterator was created).

    Load it after the table (it reads the progress's position): the global RNGs and generators
    are restored at once, and for a mid-epoch resume also kept for :meth:`EpochPosition.start`.
    """

    def __init__(self, guard: Stateful, position: EpochPosition, device: torch.device) -> None:
        self.guard = guard
        self.position = position
        self.device = device

    def state_dict(self) -> dict[str, Any]:
        pos = self.position
        mid = bool(pos.progress.step)
        return {
            ck.RNG_KEY: ck.capture_rng(),
            ck.EPOCH_SUMS_KEY: pos.sums.state_dict() if (mid and pos.sums is not None) else None,
            ck.GUARD_KEY: self.guard.state_dict(),
            ck.LOADER_RNG_KEY: pos.loader.checkpoint_state(mid_epoch=mid),
        }

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        pos = self.position
        self.guard.load_state_dict(state[ck.GUARD_KEY])
        saved_loader = state.get(ck.LOADER_RNG_KEY) or {}  # absent before format 1 had it
        now = {"global": state[ck.RNG_KEY], "generators": saved_loader.get("generators")}
        if pos.progress.step:
            pos.sums = EpochSums.from_state(state[ck.EPOCH_SUMS_KEY], self.device)
            # Restored by the loader around the creation of the resumed epoch's iterator.
            pos.rng = {"epoch_start": saved_loader.get("epoch_start"), "now": now}
        pos.loader.load_rng_state(now)
