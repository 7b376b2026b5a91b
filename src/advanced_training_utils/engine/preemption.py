"""Graceful preemption: on SIGTERM or SIGINT, finish the step, checkpoint, exit.

``PreemptionHandler`` installs handlers (main thread only) that only set a flag; the training loop
checks the flag after each optimizer step and after each epoch's validation and checkpoint,
writes a checkpoint and raises :class:`TrainingPreempted`, a ``SystemExit`` whose code is
``128 + signal number`` (143 for SIGTERM, 130 for SIGINT), so an uncaught preemption ends the
process with the conventional code.

A second signal (schedulers often send SIGTERM twice, Ctrl-C is pressed twice) is logged and
otherwise ignored: the checkpoint in progress finishes. The third signal forces the exit: the
previous handler is restored and the signal re-raised (the default action for SIGTERM ends the
process at once; SIGINT raises ``KeyboardInterrupt``), and no checkpoint is written. SIGKILL
always ends the process at once; ``resume=True`` then continues from the newest checkpoint.
"""

from __future__ import annotations

import logging
import signal
import threading
from types import FrameType
from typing import Any

__all__ = ["PreemptionHandler", "TrainingPreempted", "PREEMPTION_SIGNALS"]

log = logging.getLogger(__name__)

PREEMPTION_SIGNALS = (signal.SIGTERM, signal.SIGINT)
FORCE_AFTER = 3  # the signal that forces the exit without a checkpoint


class TrainingPreempted(SystemExit):
    """Raised after the preemption checkpoint is written; ``code`` is 128 + the signal number."""

    def __init__(self, signum: int, checkpoint: str | None) -> None:
        super().__init__(128 + signum)
        self.signum = signum
        self.checkpoint = checkpoint


class PreemptionHandler:
    """Context manager: record SIGTERM/SIGINT instead of dying mid-step."""

    def __init__(self, enabled: bool = True) -> None:
        self.enabled = enabled and threading.current_thread() is threading.main_thread()
        self.signum: int | None = None
        self.count = 0  # signals received
        self._previous: dict[int, Any] = {}

    def _handle(self, signum: int, frame: FrameType | None) -> None:
        self.count += 1
        name = signal.Signals(signum).name
        if self.signum is None:
            self.signum = signum
            log.warning("received %s: finishing the current step, then checkpointing", name)
        elif self.count < FORCE_AFTER:
            log.warning("received %s again: still finishing the step and checkpointing; %d more "
                        "signal(s) force the exit without a checkpoint", name, FORCE_AFTER - self.count)
        else:
            log.warning("received %s %d times: exiting without a checkpoint", name, self.count)
            previous = self._previous.get(signum)
            signal.signal(signum, signal.SIG_DFL if previous is None else previous)
            signal.raise_signal(signum)

    @property
    def requested(self) -> bool:
        return self.signum is not None

    def __enter__(self) -> PreemptionHandler:
        if self.enabled:
            for s in PREEMPTION_SIGNALS:
                self._previous[s] = signal.signal(s, self._handle)
        return self

    def __exit__(self, *exc: Any) -> None:
        if self.enabled:
            for s, h in self._previous.items():
                signal.signal(s, h)
        self._previous.clear()
