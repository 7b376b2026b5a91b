"""The run's health in one owner: the bad-step guard and divergence recovery behind one door.

The run and the loop talk to a :class:`DivergenceMonitor`, never to the guard and recovery
separately:

* per optimizer step, :meth:`~DivergenceMonitor.is_bad` and :meth:`~DivergenceMonitor.step`
  are the guard's own methods (no extra call, no host read: see :mod:`.guard`);
* every ``check_every`` optimizer steps (when set), :meth:`~DivergenceMonitor.check` reads the
  interval's log once and lets recovery decide (roll back, or refresh its snapshot);
* at the end of an epoch, :meth:`~DivergenceMonitor.epoch_values` gives the device values that
  are read with the epoch's sums, and :meth:`~DivergenceMonitor.end_epoch` counts the skipped
  steps and lets recovery decide (always without ``check_every``; with it, when a step was bad);
* :meth:`~DivergenceMonitor.snapshot` takes recovery's snapshot; ``state_dict`` is recovery's
  (the run's checkpoint); the guard's state is per rank (``guard``).
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import torch

from .guard import StepGuard
from .recovery import Recovery, RecoveryEvent

__all__ = ["DivergenceMonitor", "EpochHealth"]


@dataclass(frozen=True)
class EpochHealth:
    """What the monitor saw in one epoch: skipped and spike steps, and a rollback (or None)."""

    skipped: int
    spikes: int
    event: RecoveryEvent | None


class DivergenceMonitor:
    """The guard (per step) and recovery (at the checks) of one run.

    Args:
        guard: decides per step whether the optimizer step is taken.
        recovery: snapshots and rollbacks (``enabled=False``: never acts).
        check_every: recovery checks every N optimizer steps; None: at each epoch's end only.
    """

    def __init__(self, guard: StepGuard, recovery: Recovery, check_every: int | None) -> None:
        self.guard = guard
        self.recovery = recovery
        self.check_every = check_every
        self.is_bad = guard.is_bad  # per step: the guard's own methods, no wrapper call
        self.step = guard.step
        self._log: torch.Tensor | None = None

    # ------------------------------------------------------------------ checks
    def start_interval(self) -> None:
        """Begin a reading interval (an epoch; the bad run carries over)."""
        self.guard.reset_interval()

    def check_due(self, global_step: int) -> bool:
        """Whether a recovery check falls on optimizer step ``global_step``."""
        return self.check_every is not None and global_step % self.check_every == 0

    def check(self, epoch: int, first_batch: int, lr_history: list[float]
              ) -> RecoveryEvent | None:
        """A mid-epoch check: one host read of the interval log (documented cost); recovery
        decides, and a new interval begins. None when no step was taken since the last one."""
        steps = self.guard.interval_log()
        if steps is None:
            return None
        rows = steps.tolist()
        levels = torch.stack([v.double() for v in _loss_levels(steps).values()]).tolist()
        consecutive = self.guard.consecutive()
        bad_run = float(consecutive) if consecutive is not None else 0.0
        event = self.recovery.after_check(rows, len(rows), bad_run, epoch, first_batch,
                                          lr_history, *levels)
        self.guard.reset_interval()
        return event

    def epoch_values(self) -> dict[str, torch.Tensor | None]:
        """The epoch's device values to read with its sums (:func:`..loop.read_sums`)."""
        steps = self._log = self.guard.interval_log()
        return {
            "skipped_steps": None if steps is None else steps[:, 2].sum(),
            "spike_steps": None if steps is None else steps[:, 3].sum(),
            "consecutive_bad": self.guard.consecutive(),
            **_loss_levels(steps),
        }

    def end_epoch(self, nums: dict[str, Any], epoch: int, first_batch: int,
                  lr_history: list[float]) -> EpochHealth:
        """Take :meth:`epoch_values`' keys out of ``nums`` (read), count the epoch's skipped
        steps, and let recovery decide; a new interval begins."""
        skipped, spikes = round(nums.pop("skipped_steps")), round(nums.pop("spike_steps"))
        consecutive = nums.pop("consecutive_bad")
        median, first = nums.pop("median_loss"), nums.pop("first_loss")
        self.guard.total_skipped += skipped
        self.guard.total_spikes += spikes
        event = None
        if self.check_every is None or skipped:
            steps = self._log
            n_steps = 0 if steps is None else len(steps)
            rows = steps.tolist() if skipped else None  # read only when a step was bad
            event = self.recovery.after_check(rows, n_steps, consecutive, epoch, first_batch,
                                              lr_history, median, first)
        self._log = None
        self.guard.reset_interval()
        return EpochHealth(skipped, spikes, event)

    # ------------------------------------------------------------------ totals
    @property
    def skipped_steps(self) -> int:
        return self.guard.total_skipped

    @property
    def rollbacks(self) -> int:
        return self.recovery.rollbacks

    @property
    def events(self) -> list[RecoveryEvent]:
        return self.recovery.events

    # ------------------------------------------------------------------ snapshot and state
    @property
    def has_snapshot(self) -> bool:
        return self.recovery.has_snapshot

    def snapshot(self) -> None:
        """Recovery's snapshot of the current state (see :class:`.recovery.Recovery`)."""
        self.recovery.snapshot()

    def state_dict(self) -> dict[str, Any]:
        """Recovery's state (the guard's is per rank: ``self.guard.state_dict()``)."""
        return self.recovery.state_dict()

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Load after every part of the snapshot (see :meth:`.recovery.Recovery.load_state_dict`)."""
        self.recovery.load_state_dict(dict(state))


def _loss_levels(steps: torch.Tensor | None) -> dict[str, torch.Tensor | None]:
    """Device scalars: the median finite loss of the interval and its first loss."""
    if steps is None:
        return {"median_loss": None, "first_loss": None}
    loss = steps[:, 0]
    finite = torch.where(torch.isfinite(loss), loss, torch.full_like(loss, math.nan))
    return {"median_loss": torch.nanmedian(finite), "first_loss": steps[0, 0]}
