"""The files of one run: checkpoints (atomic, rotated, optionally on a writer thread), the
metrics log and TensorBoard. Only the main rank writes; every method is a no-op elsewhere or
when the run has no ``checkpoint_dir``.

On the main rank, opening the run's files (constructing :class:`RunFiles`) checks that the
folder is writable, takes the run's lock (:class:`.runlock.RunLock`: a second run with the same
``checkpoint_dir`` and ``model_name`` fails at once, naming the other process) and removes the
temporary files that interrupted writes of this model name left behind. Every write goes
through :mod:`.safeio` (no symlink is followed, no partial file is left). A failed write (a
full disk) is logged and training goes on; 3 failures in a row of checkpoint writes, or of
metrics log writes, raise :class:`.CheckpointError`. Metrics lines that could not be written
are kept and written with the next entry.

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
import re
import time
import warnings
from collections.abc import Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from typing import Any

import torch

from .. import checkpoint as ck
from .. import safeio
from .config import TrainConfig
from .runlock import RunLock

__all__ = ["RunFiles", "closing"]

log = logging.getLogger(__name__)

_MAX_WRITE_FAILURES = 3


class RunFiles:
    """Paths and writers of one run (no-ops when checkpoint_dir is None).

    Raises:
        CheckpointError: the folder is not writable, or (:class:`.runlock.RunLockedError`)
            another live run holds this folder and model name.
    """

    def __init__(self, cfg: TrainConfig, is_main: bool = True) -> None:
        self.is_main = is_main
        # absolute now: a relative folder must not follow a later os.chdir of the user's code
        self.dir = (Path(cfg.checkpoint_dir).absolute() if cfg.checkpoint_dir is not None
                    else None)
        self.keep_last = cfg.keep_last
        name = cfg.model_name
        self.name = name
        self.best = self.dir / f"{name}_best.pt" if self.dir else None
        self.last = self.dir / f"{name}_last.pt" if self.dir else None
        self.metrics = (Path(cfg.metrics_file).absolute() if cfg.metrics_file is not None
                        else self.dir / f"{name}_metrics.jsonl" if self.dir else None)
        self.tb = None
        self.failures = 0           # checkpoint writes failed in a row
        self.metric_failures = 0    # metrics log writes failed in a row
        self._unwritten: list[str] = []  # metrics lines not on disk yet
        self._rewrite = False       # the metrics file must become exactly ``_unwritten``
        self._pool: ThreadPoolExecutor | None = None
        self._pending: Future | None = None
        self._old_files: list[Path] = []  # an earlier run's files to move aside before our writes
        self.lock = RunLock(self.dir / f"{name}.lock") if self.dir and is_main else None
        if self.dir is not None and is_main:
            _make_dir(self.dir)
            _check_writable(self.dir / f"{name}.write-test")
            self.lock.acquire()
            safeio.remove_stale_temps(self.dir, self._is_ours)
        if cfg.tensorboard and is_main:
            try:
                from torch.utils.tensorboard import SummaryWriter

                # no checkpoint_dir: TensorBoard's own default folder (./runs/...)
                self.tb = SummaryWriter(str(self.dir / "tensorboard") if self.dir else None)
            except ImportError:
                warnings.warn("tensorboard=True but tensorboard is not installed (pip install "
                              "'advanced-training-utils[tensorboard]'); skipping it",
                              RuntimeWarning, stacklevel=3)

    def _is_ours(self, final: str) -> bool:
        """Whether ``final`` (a file name in the checkpoint folder) is one this run writes."""
        n = re.escape(self.name)
        pattern = rf"{n}_(?:best|last(?:\.\d+)?)\.pt|{n}\.write-test"
        metrics = (self.metrics is not None and self.dir is not None
                   and self.metrics.parent.resolve() == self.dir.resolve()
                   and final == self.metrics.name)
        return metrics or re.fullmatch(pattern, final) is not None

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
            # One serialisation for both files; _best.pt (an independent copy, not a hard link:
            # damage to one file must not reach the other) is in place before _last.pt, so a
            # crash in between never leaves a _last.pt newer than its _best.pt.
            ck.rotate_and_save(self.last, payload, self.keep_last,
                               copy_to=self.best if best else None)
            self.failures = 0
        except OSError as e:
            self.failures = _failed("checkpoint", "previous checkpoint kept", self.failures,
                                    self.last, e)

    def best_weights(self, best_epoch: int, resumed: dict[str, Any], map_location: Any = "cpu",
                     entry: str = ck.MODEL_KEY) -> dict[str, Any] | None:
        """The model weights of epoch ``best_epoch`` (for ``restore_best_weights`` after a
        resume): from the resumed checkpoint when it is that epoch's end, else from ``_best.pt``,
        else from any intact ``_last*.pt`` of that epoch's end. A damaged or mismatched file is
        skipped with a warning; None (with a warning) when no intact file holds them.
        ``entry``: the checkpoint key holding them (``ema``/``swa``: the average's
        ``'weights'``, when the best epoch was judged on it).
        """
        def weights(obj: dict[str, Any]) -> dict[str, Any]:
            return obj[entry] if entry == ck.MODEL_KEY else obj[entry]["weights"]

        def is_best(obj: dict[str, Any]) -> bool:
            return (int(obj.get(ck.EPOCH_KEY, -1)) == best_epoch
                    and int(obj.get(ck.STEP_KEY, -1)) == 0)

        if best_epoch <= 0:
            return None
        if is_best(resumed):
            return weights(resumed)
        candidates = [self.best] if self.best is not None else []
        if self.last is not None:
            candidates += ck.checkpoint_chain(self.last, max(self.keep_last, 8))
        for path in candidates:
            if not path.exists():
                continue
            try:
                obj = ck.load_checkpoint(path, map_location=map_location)
            except ck.CheckpointError as e:
                log.warning("restore_best_weights: skipping %s", e)
                continue
            if is_best(obj):
                return weights(obj)
        log.warning("restore_best_weights: no intact checkpoint holds the weights of the best "
                    "epoch %d; unless a later epoch improves, the run ends with its last weights",
                    best_epoch)
        return None

    def wait(self) -> None:
        """Block until the background write (if any) is on disk; re-raise its error."""
        pending, self._pending = self._pending, None
        if pending is not None:
            pending.result()

    def rewrite_metrics(self, history: list[dict[str, Any]]) -> None:
        """Make the metrics file hold exactly ``history`` (after a resume), atomically."""
        self._unwritten = [_line(entry) for entry in history]
        self._rewrite = True
        self._flush_metrics()

    def keep_previous_log(self) -> None:
        """This run is fresh: an existing metrics log and checkpoints under this model name are
        an earlier run's. Keep them until this run writes its first metrics line or checkpoint,
        then move them aside under a time stamp (module docstring), so that a later
        ``resume=True`` can never fall back to the earlier run's ``_last.1.pt`` or ``_best.pt``."""
        if not self.is_main:
            return
        chain = ck.checkpoint_chain(self.last, max(self.keep_last, 8)) if self.last else []
        candidates = [*([self.metrics] if self.metrics else []), *chain,
                      *([self.best] if self.best else [])]
        self._old_files = [f for f in candidates if os.path.lexists(f)]

    def _move_old_log(self) -> None:
        """Move the earlier run's files aside (once; see :meth:`keep_previous_log`)."""
        old, self._old_files = self._old_files, []
        if not old:
            return
        stamp = time.strftime("%Y%m%d-%H%M%S", time.localtime(
            max(f.lstat().st_mtime for f in old)))
        for f in old:
            try:
                target = _aside(f, stamp)
                os.rename(f, target)  # a symlink is moved, never followed
            except OSError as e:
                log.error("could not move the earlier run's %s aside (%s)", f, e)
                continue
            log.info("an earlier run's %s was moved to %s", f.name, target.name)

    def write_metrics(self, entry: dict[str, Any]) -> None:
        """Append one epoch's line to the metrics log (and TensorBoard); a failure is logged,
        the line kept for the next write, and 3 failures in a row raise CheckpointError."""
        self._move_old_log()
        if self.metrics is not None and self.is_main:
            self._unwritten.append(_line(entry))
            self._flush_metrics()
        if self.tb is not None:
            try:
                for k, v in entry.items():
                    if isinstance(v, (int, float)) and not isinstance(v, bool):
                        self.tb.add_scalar(k, v, entry["epoch"])
            except OSError as e:
                log.error("TensorBoard write failed: %s", e)

    def _flush_metrics(self) -> None:
        if self.metrics is None or not self.is_main:
            return
        data = "".join(self._unwritten).encode()
        try:
            self.metrics.parent.mkdir(parents=True, exist_ok=True)
            if self._rewrite:
                safeio.atomic_write(self.metrics, lambda f: f.write(data), mode=0o666)
            else:
                safeio.append_bytes(self.metrics, data)
        except OSError as e:
            self.metric_failures = _failed("metrics log", "its lines are kept for the next write",
                                           self.metric_failures, self.metrics, e)
            return
        self._unwritten.clear()
        self._rewrite = False
        self.metric_failures = 0

    def close(self, raise_errors: bool = True) -> None:
        """Wait for the background write, close the writers and release the run's lock
        (idempotent)."""
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
            if self.lock is not None:
                self.lock.release()


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


def _aside(path: Path, stamp: str) -> Path:
    """A free name ``{stem}.{stamp}[-n]{suffix}`` beside ``path`` (``m_last.1.pt`` ->
    ``m_last.1.20261127-151500.pt``: no longer a checkpoint name this run reads or removes)."""
    for n in range(1000):
        target = path.with_name(f"{path.stem}.{stamp}{f'-{n}' if n else ''}{path.suffix}")
        if not os.path.lexists(target):
            return target
    raise FileExistsError(f"{target} and 999 others like it exist")


def _make_dir(folder: Path) -> None:
    """Create the checkpoint folder; a clear :class:`CheckpointError` when it cannot be one."""
    if folder.exists() and not folder.is_dir():
        raise ck.CheckpointError(folder, "checkpoint_dir is a file, not a folder")
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise ck.CheckpointError(folder, f"checkpoint_dir cannot be created ({e})") from e


def _check_writable(probe: Path) -> None:
    """Create (under a unique temporary name, never through a symlink) and remove a file."""
    try:
        fd, tmp = safeio.open_temp(probe)
        try:
            safeio.write_all(fd, b"ok")
        finally:
            os.close(fd)
            safeio.discard(tmp)
    except OSError as e:
        raise ck.CheckpointError(probe.parent, f"checkpoint_dir is not writable ({e})") from e


def _failed(what: str, kept: str, count: int, path: Path, error: OSError) -> int:
    """Log a failed write; the new count of failures in a row. Raises CheckpointError at
    :data:`_MAX_WRITE_FAILURES`."""
    count += 1
    log.error("%s write failed (%d in a row; %s): %s", what, count, kept, error)
    if count >= _MAX_WRITE_FAILURES:
        raise ck.CheckpointError(path, f"{count} {what} writes failed in a row; last error: "
                                 f"{error}") from error
    return count


def _line(entry: dict[str, Any]) -> str:
    return json.dumps(_nan_to_none(entry), default=str) + "\n"


def _nan_to_none(entry: dict[str, Any]) -> dict[str, Any]:
    return {k: (None if isinstance(v, float) and not math.isfinite(v) else v)
            for k, v in entry.items()}
