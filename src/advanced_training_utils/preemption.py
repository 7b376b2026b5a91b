"""Graceful preemption: on SIGTERM or SIGINT, finish the step, checkpoint, exit.

``PreemptionHandler`` installs handlers (main thread only) that only set a flag; the training loop
checks the flag after each optimizer step, writes a checkpoint and raises
:class:`TrainingPreempted`, a ``SystemExit`` whose code is ``128 + signal number`` (143 for
SIGTERM, 130 for SIGINT), so an uncaught preemption ends the process with the conventional code.
A second signal while the checkpoint is being written is left to the default behaviour.
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
        self._previous: dict[int, Any] = {}

    def _handle(self, signum: int, frame: FrameType | None) -> None:
        if self.signum is None:
            log.warning("received %s: finishing the current step, then checkpointing",
                        signal.Signals(signum).name)
        self.signum = signum
        # A second signal gets the previous handler (e.g. KeyboardInterrupt for Ctrl-C twice).
        signal.signal(signum, self._previous.get(signum, signal.SIG_DFL))

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
