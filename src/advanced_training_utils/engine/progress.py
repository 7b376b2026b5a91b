"""The per-epoch progress shown when ``verbose``: a bar on a terminal, a line per epoch in a log.

The bar reads the device at most every 0.5 s. When the output is not a terminal (a log file, a
pipe, a CI log), no bar is drawn at all: its carriage-return refreshes would fill the log with
partial lines; each epoch writes its summary line only.
"""

from __future__ import annotations

import sys
import time
from collections.abc import Callable
from typing import Any, TextIO

__all__ = ["Progress", "is_interactive"]


def is_interactive(stream: Any) -> bool:
    """Whether a progress bar on ``stream`` is seen live: a terminal (``isatty()``), or a Jupyter
    kernel, where ``tqdm.auto`` draws a widget. False for files, pipes and closed streams."""
    try:
        if stream.isatty():
            return True
    except (AttributeError, ValueError, OSError):  # no isatty, or a closed stream
        return False
    from tqdm.auto import tqdm

    notebook = sys.modules.get("tqdm.notebook")  # imported by tqdm.auto only inside a kernel
    return notebook is not None and issubclass(tqdm, notebook.tqdm)


class Progress:
    """A tqdm bar per epoch with the running loss and the LR; a no-op when disabled.

    The running loss is a device tensor; it is read on the host only when the bar refreshes
    (``min_interval`` seconds apart), so a fast GPU loop is not synchronised every step. When
    ``stream`` (default: ``sys.stderr`` at the time of each epoch) is not interactive (see
    :func:`is_interactive`), there is no bar and no device read: :meth:`finish` writes the
    epoch's line, so the output holds exactly one line per epoch.
    """

    def __init__(self, enabled: bool, total_batches: int | None, min_interval: float = 0.5,
                 stream: TextIO | None = None):
        self.enabled = enabled
        self.total = total_batches
        self.min_interval = min_interval
        self._stream = stream
        self._bar: Any = None
        self._last = 0.0
        self._lr: Callable[[], float] = lambda: 0.0

    @property
    def stream(self) -> TextIO:
        """Where the bar and the lines go (``sys.stderr`` unless one was given)."""
        return self._stream if self._stream is not None else sys.stderr

    def start(self, epoch: int, epochs: int, lr: Callable[[], float]) -> None:
        if not self.enabled or not is_interactive(self.stream):
            return
        from tqdm.auto import tqdm

        self._lr = lr
        self._last = time.monotonic()
        self._bar = tqdm(total=self.total, desc=f"epoch {epoch}/{epochs}", leave=False,
                         dynamic_ncols=True, file=self.stream, mininterval=self.min_interval)

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
        """Close the epoch's bar (if any) and write the epoch's summary ``line``."""
        if not self.enabled:
            return
        if self._bar is None:
            print(line, file=self.stream, flush=True)
            return
        from tqdm.auto import tqdm

        self._bar.close()
        self._bar = None
        tqdm.write(line, file=self.stream)
