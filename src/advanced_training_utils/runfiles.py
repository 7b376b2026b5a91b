"""The files of one run: checkpoints (atomic, rotated, optionally on a writer thread), the
metrics log and TensorBoard. Only the main rank writes; every method is a no-op elsewhere or
when the run has no ``checkpoint_dir``.

A fresh run (nothing resumed) over a folder that holds an earlier run's metrics log keeps that
log untouched until it writes its own first metrics line or checkpoint; it then renames it to
``{name}_metrics.{YYYYmmdd-HHMMSS}.jsonl`` (the old log's last modification time), so a run
that dies before that leaves the earlier log as it was, and none is ever deleted.
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import os
import time
import warnings
from collections.abc import Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from typing import Any

import torch

from . import checkpoint as ck
from .config import TrainConfig

__all__ = ["RunFiles", "closing"]

log = logging.getLogger(__name__)

_MAX_WRITE_FAILURES = 3


class RunFiles:
    """Paths and writers of one run (no-ops when checkpoint_dir is None)."""

    def __init__(self, cfg: TrainConfig, is_main: bool = True) -> None:
        self.is_main = is_main
        self.dir = Path(cfg.checkpoint_dir) if cfg.checkpoint_dir is not None else None
        self.keep_last = cfg.keep_last
        name = cfg.model_name
        self.best = self.dir / f"{name}_best.pt" if self.dir else None
        self.last = self.dir / f"{name}_last.pt" if self.dir else None
        self.metrics = (Path(cfg.metrics_file) if cfg.metrics_file is not None
                        else self.dir / f"{name}_metrics.jsonl" if self.dir else None)
        self.tb = None
        self.failures = 0
        self._pool: ThreadPoolExecutor | None = None
        self._pending: Future | None = None
        self._old_log = False  # an earlier run's metrics log to move aside before our writes
        if self.dir is not None and is_main:
            self.dir.mkdir(parents=True, exist_ok=True)
            probe = self.dir / f".{name}.write-test"
            try:
                probe.write_bytes(b"ok")
                probe.unlink()
            except OSError as e:
                raise ck.CheckpointError(self.dir, f"checkpoint_dir is not writable ({e})") from e
        if cfg.tensorboard and is_main:
            try:
                from torch.utils.tensorboard import SummaryWriter

                self.tb = SummaryWriter(str(self.dir / "tensorboard" if self.dir else None))
            except ImportError:
                warnings.warn("tensorboard=True but tensorboard is not installed; skipping it",
                              RuntimeWarning, stacklevel=3)

    def save(self, payload: dict[str, Any] | None, best: bool, background: bool = False) -> None:
        """Write ``_last.pt`` (and ``_best.pt``) on the main rank.

        ``background=True`` (epoch-end checkpoints) snapshots the payload to CPU copies and
        writes it on a writer thread while training goes on; every save first waits for the
        previous one, so files are written in order and at most one is in flight. A failed write
        is logged and training goes on; 3 failures in a row raise :class:`CheckpointError`.
        """
        if self.last is None or payload is None or not self.is_main:
            return
        self._move_old_log()
        self.wait()
        if background:
            if self._pool is None:
                self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="checkpoint")
            self._pending = self._pool.submit(self._write, _cpu_copy(payload), best)
        else:
            self._write(payload, best)

    def _write(self, payload: dict[str, Any], best: bool) -> None:
        assert self.last is not None and self.best is not None
        try:
            if best:
                # One serialisation for both files: _best.pt first (so a crash in between never
                # leaves a _last.pt newer than its _best.pt), then _last.pt as a hard link to it.
                ck.save_checkpoint(self.best, payload)
                ck.rotate_and_save(self.last, payload, self.keep_last, same_as=self.best)
            else:
                ck.rotate_and_save(self.last, payload, self.keep_last)
            self.failures = 0
        except OSError as e:
            self.failures += 1
            log.error("checkpoint write failed (%d in a row; previous checkpoint kept): %s",
                      self.failures, e)
            if self.failures >= _MAX_WRITE_FAILURES:
                raise ck.CheckpointError(self.last, f"{self.failures} checkpoint writes failed "
                                         f"in a row; last error: {e}") from e

    def wait(self) -> None:
        """Block until the background write (if any) is on disk; re-raise its error."""
        pending, self._pending = self._pending, None
        if pending is not None:
            pending.result()

    def rewrite_metrics(self, history: list[dict[str, Any]]) -> None:
        """Make the metrics file hold exactly ``history`` (after a resume)."""
        if self.metrics is not None and self.is_main:
            self.metrics.parent.mkdir(parents=True, exist_ok=True)
            with open(self.metrics, "w") as f:
                for entry in history:
                    f.write(json.dumps(_nan_to_none(entry), default=str) + "\n")

    def keep_previous_log(self) -> None:
        """This run is fresh: an existing metrics log is an earlier run's. Keep it until this run
        writes its first metrics line or checkpoint, then move it aside (module docstring)."""
        self._old_log = bool(self.is_main and self.metrics is not None
                             and os.path.lexists(self.metrics))

    def _move_old_log(self) -> None:
        if not self._old_log:
            return
        self._old_log = False
        assert self.metrics is not None
        try:
            stamp = time.strftime("%Y%m%d-%H%M%S", time.localtime(self.metrics.lstat().st_mtime))
            for n in range(1000):
                target = self.metrics.with_name(
                    f"{self.metrics.stem}.{stamp}{f'-{n}' if n else ''}{self.metrics.suffix}")
                if not os.path.lexists(target):
                    break
            else:
                raise FileExistsError(f"{target} and 999 others like it exist")
            os.rename(self.metrics, target)  # a symlink is moved, never followed
        except OSError as e:
            log.error("could not move the earlier run's metrics log %s aside (%s); this run's "
                      "lines are appended to it", self.metrics, e)
            return
        log.info("an earlier run's metrics log was moved to %s", target)

    def write_metrics(self, entry: dict[str, Any]) -> None:
        self._move_old_log()
        if self.metrics is not None and self.is_main:
            self.metrics.parent.mkdir(parents=True, exist_ok=True)
            with open(self.metrics, "a") as f:
                f.write(json.dumps(_nan_to_none(entry), default=str) + "\n")
        if self.tb is not None:
            for k, v in entry.items():
                if isinstance(v, (int, float)) and not isinstance(v, bool):
                    self.tb.add_scalar(k, v, entry["epoch"])

    def close(self, raise_errors: bool = True) -> None:
        try:
            self.wait()
        except Exception:
            if raise_errors:
                raise
        finally:
            if self._pool is not None:
                self._pool.shutdown(wait=True)
                self._pool = None
            if self.tb is not None:
                self.tb.close()
                self.tb = None


@contextlib.contextmanager
def closing(run: RunFiles) -> Iterator[None]:
    """Close the run's writers: waits for a background checkpoint write; on an error already
    propagating, a write error is only logged."""
    try:
        yield
    except BaseException:
        run.close(raise_errors=False)
        raise
    run.close()


def _cpu_copy(obj: Any) -> Any:
    """A snapshot of a payload: tensors copied to the CPU, containers copied, rest shared."""
    if isinstance(obj, torch.Tensor):
        return obj.detach().to("cpu", copy=True)
    if isinstance(obj, dict):
        return type(obj)((k, _cpu_copy(v)) for k, v in obj.items())
    if isinstance(obj, (list, tuple)):
        return type(obj)(_cpu_copy(v) for v in obj)
    return obj


def _nan_to_none(entry: dict[str, Any]) -> dict[str, Any]:
    return {k: (None if isinstance(v, float) and not math.isfinite(v) else v)
            for k, v in entry.items()}
