"""The per-epoch progress bar shown when ``verbose``; reads the device at most every 0.5 s."""

from __future__ import annotations

import sys
import time
from collections.abc import Callable
from typing import Any

__all__ = ["Progress"]


class Progress:
    """A tqdm bar per epoch with the running loss and the LR; a no-op when disabled.

    The running loss is a device tensor; it is read on the host only when the bar refreshes
    (``min_interval`` seconds apart), so a fast GPU loop is not synchronised every step.
    """

    def __init__(self, enabled: bool, total_batches: int | None, min_interval: float = 0.5):
        self.enabled = enabled
        self.total = total_batches
        self.min_interval = min_interval
        self._bar: Any = None
        self._last = 0.0
        self._lr: Callable[[], float] = lambda: 0.0

    def start(self, epoch: int, epochs: int, lr: Callable[[], float]) -> None:
        if not self.enabled:
            return
        from tqdm.auto import tqdm

        self._lr = lr
        self._last = time.monotonic()
        self._bar = tqdm(total=self.total, desc=f"epoch {epoch}/{epochs}", leave=False,
                         dynamic_ncols=True, file=sys.stderr, mininterval=self.min_interval)

    def update(self, sums: Any, index: int) -> None:
        if self._bar is None:
            return
        self._bar.update(1)
        now = time.monotonic()
        if now - self._last >= self.min_interval:
            self._last = now
            total, count = sums.totals()
            n = float(count)
            loss = float(total) / n if n else float("nan")
            self._bar.set_postfix(loss=f"{loss:.4f}", lr=f"{self._lr():.3g}", refresh=False)

    def finish(self, line: str) -> None:
        if self._bar is None:
            return
        from tqdm.auto import tqdm

        self._bar.close()
        self._bar = None
        tqdm.write(line, file=sys.stderr)
