"""Divergence recovery: in-memory snapshots, rollback with a lower LR, and a diagnosed stop.

At each check (every ``check_every`` optimizer steps, or at the end of each epoch by default, so
that steps need no host read), the caller reads the guard's interval log once and calls
:meth:`Recovery.after_check`:

* a clean interval (no bad step, finite weights) whose median loss is no worse than the
  reference refreshes the snapshot (model, optimizer, scheduler, scaler, clipper; copies kept on
  the device) and the reference;
* an interval that ends in ``rollback_after`` or more consecutive bad steps, where at least half
  the steps were bad, whose median good loss is above ``divergence_factor`` times the median
  at the last snapshot (or, before the first, the run's first loss), or that left non-finite
  weights, restores the snapshot and multiplies every learning rate by ``lr_factor``;
* after ``max_rollbacks`` rollbacks the next such interval raises :class:`TrainingDivergedError`
  carrying a diagnosis: the parameters whose gradients or weights went non-finite (by name), the
  LR and grad-norm history, and the offending (epoch, batch) positions.
"""

from __future__ import annotations

import copy
import logging
import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from ... import checkpoint as ck
from ..._validate import check_int, check_real
from ...stability import TrainingStability
from ..state import load_parts, save_parts

__all__ = ["Recovery", "RecoveryEvent", "TrainingDivergedError"]

log = logging.getLogger(__name__)


class TrainingDivergedError(RuntimeError):
    """Training kept diverging after every allowed rollback. ``diagnosis`` says where and how."""

    def __init__(self, message: str, diagnosis: dict[str, Any]) -> None:
        super().__init__(message)
        self.diagnosis = diagnosis


@dataclass
class RecoveryEvent:
    """One recovery action, as recorded in the history."""

    kind: str            # 'rollback'
    epoch: int
    batch: int
    detail: str
    lr: float = 0.0

    def as_dict(self) -> dict[str, Any]:
        return {"kind": self.kind, "epoch": self.epoch, "batch": self.batch,
                "detail": self.detail, "lr": self.lr}


@dataclass
class Recovery:
    """Snapshots and rollbacks for one run (a disabled run uses ``enabled=False``).

    Args:
        parts: the snapshot's table (see :mod:`..state`): model, optimizer, scheduler,
            precision and clipper under their checkpoint keys; a snapshot is
            ``save_parts(parts)``, a rollback ``load_parts(parts, snapshot)``.
        model: the caller's (unwrapped) model, whose weights and gradients are checked.
        optimizer: the run's optimizer (its LRs are lowered after a rollback).
        scheduler: the run's scheduler or its no-op (``scale_lr`` lowers the LRs).
        guard: the run's :class:`.guard.StepGuard` (its step count dates a snapshot).
    """

    parts: Mapping[str, Any]
    model: Any
    optimizer: Any
    scheduler: Any
    guard: Any
    rollback_after: int      # the run's options (TrainConfig holds their defaults)
    lr_factor: float
    max_rollbacks: int
    divergence_factor: float
    enabled: bool = True
    rollbacks: int = 0
    ref_loss: float | None = None
    lr_scale: float = 1.0
    _snapshot_scale: float = 1.0
    events: list[RecoveryEvent] = field(default_factory=list)
    _snapshot: dict[str, Any] | None = None
    _snapshot_steps: int = 0     # the guard's step count when the snapshot was taken
    _bad_positions: list[tuple[int, int]] = field(default_factory=list)
    _norm_history: list[float] = field(default_factory=list)
    _first_nonfinite: list[str] = field(default_factory=list)

    def __post_init__(self) -> None:
        check_int("rollback_after", self.rollback_after, low=1)
        check_real("rollback_lr_factor", self.lr_factor, low=0.0, high=1.0, low_inclusive=False,
                   high_inclusive=False)
        check_int("max_rollbacks", self.max_rollbacks, low=0)
        check_real("divergence_factor", self.divergence_factor, low=1.0, low_inclusive=False)

    # ------------------------------------------------------------------ snapshots
    @property
    def has_snapshot(self) -> bool:
        """Whether a snapshot is held (taken, or restored by :meth:`load_state_dict`)."""
        return self._snapshot is not None

    def snapshot(self) -> None:
        """Copy the current good state (on the device)."""
        if not self.enabled:
            return
        self._snapshot_scale = self.lr_scale
        self._snapshot_steps = self.guard.steps_seen
        self._snapshot = copy.deepcopy(save_parts(self.parts))

    def _restore(self) -> None:
        s = self._snapshot
        assert s is not None
        # Copies: a second rollback restores the same snapshot (the weights are copied into
        # the parameters by load_state_dict, so they need no copy here).
        load_parts(self.parts, {k: v if k == ck.MODEL_KEY else copy.deepcopy(v)
                                for k, v in s.items()})
        self.optimizer.zero_grad(set_to_none=True)

    def _scale_lr(self) -> float:
        """After a restore: the LR is the snapshot's; bring it to the lowered overall scale."""
        self.lr_scale *= self.lr_factor
        self.scheduler.scale_lr(self.lr_scale / self._snapshot_scale)
        return float(self.optimizer.param_groups[0]["lr"])

    # ------------------------------------------------------------------ checks
    def after_check(self, log_rows: list[list[float]] | None, n_steps: int, consecutive: float,
                    epoch: int, first_batch: int, lr_history: list[float],
                    median_loss: float = math.nan,
                    first_loss: float = math.nan) -> RecoveryEvent | None:
        """Decide after a check.

        Args:
            log_rows: the interval's (loss, norm, bad, spike) rows, or None when the caller
                knows no step was bad (then they need not be read from the device).
            n_steps: the interval's number of optimizer steps.
            consecutive: the current run of consecutive bad steps.
            median_loss: the median finite loss of the interval (skipped spikes included: they
                measure the current weights too).
            first_loss: the interval's first loss (the reference before the first snapshot).

        Returns:
            The rollback event, or None. Raises :class:`TrainingDivergedError` when the
            rollbacks are used up.
        """
        if not self.enabled:
            return None
        rows = log_rows or []
        bad_idx = [first_batch + i for i, r in enumerate(rows) if r[2] > 0]
        self._bad_positions.extend((epoch, b) for b in bad_idx)
        self._norm_history.extend(r[1] for r in rows)
        self._norm_history = self._norm_history[-200:]
        weights = TrainingStability.check_weights(self.model)
        if bad_idx and not self._first_nonfinite:
            grads = TrainingStability.check_gradients(self.model)
            self._first_nonfinite = (grads["nan_grad_params"] + grads["inf_grad_params"]
                                     + weights["nan_weight_params"] + weights["inf_weight_params"])
        frac_bad = len(bad_idx) / n_steps if n_steps else 0.0
        if self.ref_loss is None and math.isfinite(first_loss):
            self.ref_loss = first_loss  # the run's first loss: the reference until a snapshot
        ref = self.ref_loss if self.ref_loss is not None else math.nan
        rising = (math.isfinite(median_loss) and math.isfinite(ref) and ref > 0
                  and median_loss > self.divergence_factor * ref)
        diverged = (not weights["healthy"] or rising
                    or (consecutive >= self.rollback_after and frac_bad >= 0.5))
        if not diverged:
            # Refresh the snapshot only on a clean interval that is no worse than the reference,
            # so a slow drift upwards cannot ratchet the reference with it.
            if not bad_idx and math.isfinite(median_loss) and (
                    not math.isfinite(ref) or median_loss <= ref):
                self.snapshot()
                self.ref_loss = median_loss
            return None
        if self.rollbacks >= self.max_rollbacks or self._snapshot is None:
            diagnosis = {
                "rollbacks": self.rollbacks,
                "first_nonfinite_params": self._first_nonfinite
                or weights["nan_weight_params"] + weights["inf_weight_params"],
                "lr_history": lr_history,
                "grad_norm_history": self._norm_history[-50:],
                "bad_batches": self._bad_positions[-50:],
                "consecutive_bad_steps": int(consecutive),
            }
            raise TrainingDivergedError(
                f"training diverged at epoch {epoch} (median loss {median_loss:.4g}, "
                f"{int(consecutive)} consecutive bad steps) after {self.rollbacks} rollback(s); "
                f"non-finite parameters: "
                f"{diagnosis['first_nonfinite_params'] or 'none (loss spikes)'}", diagnosis)
        self._restore()
        lr = self._scale_lr()
        self.rollbacks += 1
        why = (f"median loss {median_loss:.4g} > {self.divergence_factor:g} x {ref:.4g}" if rising
               else "non-finite weights" if not weights["healthy"]
               else f"{int(consecutive)} consecutive bad steps ({frac_bad:.0%} of the interval)")
        ev = RecoveryEvent("rollback", epoch, first_batch + n_steps,
                           f"{why}; restored the last good snapshot, lr x{self.lr_factor}", lr)
        self.events.append(ev)
        log.warning("recovery: %s -> lr %.3g (rollback %d of %d)", ev.detail, lr,
                    self.rollbacks, self.max_rollbacks)
        return ev

    def state_dict(self) -> dict[str, Any]:
        """Counters, the reference loss and LR scales, the diagnosis history and the snapshot.

        The snapshot is what a rollback after a resume restores, so a resumed run rolls back to
        the same state as an uninterrupted one. When no optimizer step was taken since it was
        taken (an epoch-end checkpoint right after a clean check), its model weights and
        optimizer tensors are those of the checkpoint itself and are not stored again;
        otherwise (mid-epoch checkpoints, mostly) they are, and the checkpoint is up to twice
        as large.
        """
        snap = self._snapshot
        if snap is not None and self.guard.steps_seen == self._snapshot_steps:
            snap = {**snap, ck.MODEL_KEY: None,
                    ck.OPTIMIZER_KEY: {"state": None,
                                       "param_groups": snap[ck.OPTIMIZER_KEY]["param_groups"]}}
        return {"rollbacks": self.rollbacks, "events": [e.as_dict() for e in self.events],
                "ref_loss": self.ref_loss, "lr_scale": self.lr_scale,
                "snapshot_scale": self._snapshot_scale, "snapshot_steps": self._snapshot_steps,
                "snapshot": snap if self.enabled else None,
                "bad_positions": [list(b) for b in self._bad_positions[-50:]],
                "norm_history": list(self._norm_history),
                "first_nonfinite": list(self._first_nonfinite)}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore from :meth:`state_dict`. Call it after every part (model, optimizer,
        scheduler, precision, clipper) has loaded the same checkpoint: a snapshot stored
        without its weights takes them from the parts. A checkpoint without a snapshot (an
        older format) leaves none: take one with :meth:`snapshot`."""
        self.rollbacks = int(state["rollbacks"])
        self.ref_loss = state.get("ref_loss")
        self.lr_scale = float(state.get("lr_scale", 1.0))
        self._snapshot_scale = float(state.get("snapshot_scale", self.lr_scale))
        self._snapshot_steps = int(state.get("snapshot_steps", 0))
        self.events = [RecoveryEvent(**e) for e in state["events"]]
        self._bad_positions = [(int(e), int(b)) for e, b in state.get("bad_positions", [])]
        self._norm_history = [float(x) for x in state.get("norm_history", [])]
        self._first_nonfinite = list(state.get("first_nonfinite", []))
        snap = state.get("snapshot")
        self._snapshot = None
        if snap is None or not self.enabled:
            return
        if snap[ck.MODEL_KEY] is None:  # taken at the checkpoint's own weights
            snap = {**snap, ck.MODEL_KEY: self.model.state_dict(),
                    ck.OPTIMIZER_KEY: {**snap[ck.OPTIMIZER_KEY],
                                       "state": self.optimizer.state_dict()["state"]}}
        self._snapshot = copy.deepcopy(snap)
