"""Checkpoint files: named keys, atomic writes, a checksum, and safe verified loading.

A checkpoint is a plain dict of state dicts under the key constants below (every key of the
file is named here, the engine's too), plus
``FORMAT_KEY`` (the format version) and ``CHECKSUM_KEY`` (a CRC-32 over the payload's structure
and tensor bytes, computed on the tensors' own buffers without copies; CRC-32 is what zip
archives use to detect corruption, and it is 5x faster here than SHA-256). It is written to a
temporary file in the same folder, flushed, fsynced and moved
into place with ``os.replace``, so a crash mid-write leaves the previous file intact.

Loading always uses ``torch.load(weights_only=True)``: a file whose unpickling would construct
arbitrary objects or call code is refused before anything runs. A truncated, corrupted or
tampered file raises :class:`CheckpointError` naming the file and the problem.
"""

from __future__ import annotations

import errno
import logging
import os
import random
import zlib
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
import torch

from . import safeio

__all__ = [
    "AUGMENTATION_KEY", "CHECKSUM_KEY", "CLIPPER_KEY", "CONFIG_KEY", "EARLY_STOPPING_KEY",
    "EPOCH_KEY", "FORMAT_KEY", "FORMAT_VERSION", "GUARD_KEY", "HISTORY_KEY", "MODEL_KEY",
    "OPTIMIZER_KEY", "PRECISION_KEY", "RNG_KEY", "SCHEDULER_KEY", "STEP_KEY", "BEST_KEY",
    "RECOVERY_KEY", "RANKS_KEY", "EPOCH_ORDER_KEY", "OPTIMIZER_SPEC_KEY", "GLOBAL_STEP_KEY",
    "CHECK_FROM_KEY", "EPOCH_SUMS_KEY", "LOADER_RNG_KEY", "CLASS_WEIGHTS_KEY", "MIXING_KEY",
    "EMA_KEY", "SWA_KEY",
    "CheckpointError", "capture_rng", "restore_rng", "save_checkpoint", "load_checkpoint",
    "payload_digest", "rotate_and_save", "find_resumable", "checkpoint_chain",
]

FORMAT_VERSION = 1
FORMAT_KEY = "format_version"
CHECKSUM_KEY = "checksum"
MODEL_KEY = "model"
OPTIMIZER_KEY = "optimizer"
SCHEDULER_KEY = "scheduler"
PRECISION_KEY = "precision"
CLIPPER_KEY = "clipper"
EARLY_STOPPING_KEY = "early_stopping"
AUGMENTATION_KEY = "augmentation"
GUARD_KEY = "guard"
HISTORY_KEY = "history"
EPOCH_KEY = "epoch"
STEP_KEY = "step_in_epoch"
RNG_KEY = "rng"
CONFIG_KEY = "config"
BEST_KEY = "best"
RECOVERY_KEY = "recovery"              # divergence recovery: counters, events, last snapshot
EPOCH_ORDER_KEY = "epoch_order"        # mid-epoch: the epoch's batch order (None at epoch end)
OPTIMIZER_SPEC_KEY = "optimizer_spec"  # the optimizer's type and hyperparameters as built
GLOBAL_STEP_KEY = "global_step"        # optimizer steps so far (step checkpoints, checks)
CHECK_FROM_KEY = "check_from"          # mid-epoch: the batch where the recovery interval began
CLASS_WEIGHTS_KEY = "class_weights"    # class_weights='balanced': the criterion's weights
EMA_KEY = "ema"                        # ema_decay: the averaged weights and update count
SWA_KEY = "swa"                        # swa_start: the averaged weights and epochs averaged
MIXING_KEY = "mixing"                  # mixup / cutmix: the mixing generator (mixing.py)
RANKS_KEY = "ranks"                    # one dict per rank, under the keys below
# per rank (in ``RANKS_KEY``): RNG_KEY, GUARD_KEY and
EPOCH_SUMS_KEY = "epoch_sums"          # mid-epoch: the open epoch's sums (None at epoch end)
LOADER_RNG_KEY = "loader"              # the loaders' generators (and the epoch's start state)


log = logging.getLogger(__name__)


class CheckpointError(RuntimeError):
    """A checkpoint file that cannot be trusted: missing, truncated, corrupted or unsafe."""

    def __init__(self, path: Path | str, problem: str) -> None:
        self.path = Path(path)
        self.problem = problem
        super().__init__(f"checkpoint {self.path}: {problem}")


class _CRC:
    def __init__(self) -> None:
        self.value = 0

    def update(self, data: Any) -> None:
        self.value = zlib.crc32(data, self.value)


def _feed(h: _CRC, obj: Any) -> None:
    """Checksum ``obj``'s structure and contents in a canonical order."""
    if isinstance(obj, torch.Tensor):
        t = obj.detach().cpu().contiguous()
        h.update(f"T{t.dtype}{tuple(t.shape)}".encode())
        if t.numel():
            h.update(t.reshape(-1).view(torch.uint8).numpy())  # the buffer itself, no copy
    elif isinstance(obj, Mapping):
        h.update(f"D{len(obj)}".encode())
        for k in sorted(obj, key=repr):
            h.update(repr(k).encode())
            _feed(h, obj[k])
    elif isinstance(obj, (list, tuple)):
        h.update(f"L{len(obj)}".encode())
        for x in obj:
            _feed(h, x)
    else:
        h.update(f"V{obj!r}".encode())


def payload_digest(payload: Mapping[str, Any]) -> str:
    """``'crc32:<8 hex digits>'`` of a checkpoint payload (its keys other than format and
    checksum)."""
    h = _CRC()
    _feed(h, {k: v for k, v in payload.items() if k not in (FORMAT_KEY, CHECKSUM_KEY)})
    return f"crc32:{h.value:08x}"


def save_checkpoint(path: Path | str, payload: Mapping[str, Any]) -> Path:
    """Write ``payload`` atomically to ``path`` with a format version and checksum.

    The bytes go to a new file under a unique temporary name in the same folder (created with
    ``O_EXCL | O_NOFOLLOW``, so a planted symlink is never written through), which is fsynced
    before ``os.replace`` moves it over ``path`` (a symlink at ``path`` is replaced, not
    followed); on any error the temporary file is removed and the previous ``path`` (if any) is
    left as it was. See :mod:`.safeio`.

    Returns:
        The path written.

    Raises:
        OSError: the write failed (a full disk: ``ENOSPC``, even where ``torch.save`` reports it
            as a ``RuntimeError``).
    """
    obj = _sealed(payload)
    return safeio.atomic_write(Path(path), lambda f: torch.save(obj, f))


def _sealed(payload: Mapping[str, Any]) -> dict[str, Any]:
    """The payload with its format version and checksum."""
    obj = dict(payload)
    obj[FORMAT_KEY] = FORMAT_VERSION
    obj[CHECKSUM_KEY] = payload_digest(obj)
    return obj


def load_checkpoint(path: Path | str, map_location: Any = "cpu") -> dict[str, Any]:
    """Load and verify a checkpoint written by :func:`save_checkpoint`.

    Raises:
        CheckpointError: the file is missing, empty, truncated, not a checkpoint, fails the
            checksum, or holds objects that ``weights_only`` loading refuses.
    """
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(path, "no such file")
    if path.stat().st_size == 0:
        raise CheckpointError(path, "file is empty (zero bytes)")
    try:
        obj = torch.load(path, map_location=map_location, weights_only=True)
    except Exception as e:  # zip errors, unpickling errors, refused globals
        text = str(e).splitlines()[0] if str(e) else type(e).__name__
        if "weights_only" in str(e) or "Unsupported global" in str(e):
            raise CheckpointError(path, f"refused unsafe content ({text})") from None
        raise CheckpointError(path, f"unreadable, truncated or corrupted ({text})") from None
    if not isinstance(obj, dict) or FORMAT_KEY not in obj or CHECKSUM_KEY not in obj:
        raise CheckpointError(path, "not a checkpoint of this package (no format/checksum keys)")
    if obj[FORMAT_KEY] != FORMAT_VERSION:
        raise CheckpointError(path, f"format version {obj[FORMAT_KEY]!r}, expected {FORMAT_VERSION}")
    if payload_digest(obj) != obj[CHECKSUM_KEY]:
        raise CheckpointError(path, "checksum mismatch: the contents were altered or corrupted")
    return obj


def checkpoint_chain(last: Path, keep_last: int) -> list[Path]:
    """``[last, last.1, ..., last.(keep_last-1)]``: newest first."""
    return [last] + [last.with_name(f"{last.stem}.{i}{last.suffix}") for i in range(1, keep_last)]


# errno values of a filesystem without hard links (a copy is made instead)
_NO_HARD_LINKS = {getattr(errno, n) for n in ("EPERM", "EOPNOTSUPP", "ENOTSUP", "EXDEV", "EMLINK",
                                               "ENOSYS") if hasattr(errno, n)}


def _hold(src: Path) -> Path | None:
    """A second name for ``src``'s current file, under a temporary name (a hard link of the
    name itself, never of a symlink's target; a copy where the filesystem has no hard links).
    None when ``src`` does not exist."""
    if not os.path.lexists(src):
        return None
    tmp = safeio.temp_name(src)
    try:
        os.link(src, tmp, follow_symlinks=False)
    except OSError as e:
        if e.errno not in _NO_HARD_LINKS:
            raise
        tmp = safeio.write_temp(src, lambda f: safeio.copy_into(src, f))
    return tmp


def _move(src: Path, dst: Path) -> None:
    """``os.replace(src, dst)``; when both already name the same file (a rename then does
    nothing and would leave ``src``), ``src`` is removed."""
    try:
        if os.path.samestat(os.lstat(src), os.lstat(dst)):
            os.unlink(src)
            return
    except FileNotFoundError:
        pass
    os.replace(src, dst)


def rotate_and_save(last: Path, payload: Mapping[str, Any], keep_last: int = 2,
                    copy_to: Path | None = None) -> Path:
    """Save ``payload`` as ``last``, keeping the ``keep_last - 1`` previous ones as ``.1``, ``.2``...

    The order makes a kill at any point harmless: the newest complete checkpoint is always at a
    final name, ``last`` once written always exists and is complete, and no two final names
    ever share a file (damage to one never reaches another):

    1. the new checkpoint is written in full under a unique temporary name and fsynced (and
       copied to ``copy_to``, atomically, when given);
    2. the current ``last`` gets a second, temporary name (a hard link);
    3. the new file is renamed over ``last``;
    4. the older ones move down (``.1`` -> ``.2`` ...), oldest first, and the previous ``last``
       moves from its temporary name to ``.1``.

    A kill during step 4 leaves the previous ``last`` under its temporary name (removed at the
    next start, see :func:`.safeio.remove_stale_temps`): at least ``keep_last - 1`` checkpoints,
    the newest included, are at their final names at every instant. On an error the temporary
    files are removed.

    Args:
        copy_to: also make this file (the run's ``_best.pt``) an independent copy of the new
            checkpoint (one serialisation; a copy, not a hard link, so that damage to one file
            never reaches the other).

    Raises:
        OSError: a write or rename failed; the previous checkpoints are still in place.
    """
    last = Path(last)
    chain = checkpoint_chain(last, keep_last)
    obj = _sealed(payload)
    tmp: Path | None = safeio.write_temp(last, lambda f: torch.save(obj, f))
    held = None
    try:
        if copy_to is not None:
            safeio.atomic_write(Path(copy_to), lambda f: safeio.copy_into(tmp, f))
        held = _hold(last) if keep_last > 1 else None
        os.replace(tmp, last)
        tmp = None
        if held is not None:
            for i in range(len(chain) - 1, 1, -1):
                if os.path.lexists(chain[i - 1]):
                    _move(chain[i - 1], chain[i])
            _move(held, chain[1])
            held = None
    except BaseException:
        for t in (tmp, held):
            if t is not None:
                safeio.discard(t)
        raise
    safeio.fsync_dir(last.parent)
    return last


def _position(obj: Mapping[str, Any]) -> tuple[int, int]:
    """How far a checkpoint is into its run: (epochs done, batches into the next)."""
    return int(obj.get(EPOCH_KEY, -1)), int(obj.get(STEP_KEY, -1))


def _try_load(path: Path, map_location: Any, problems: list[str]) -> dict[str, Any] | None:
    try:
        return load_checkpoint(path, map_location=map_location)
    except CheckpointError as e:
        problems.append(str(e))
        log.warning("resume: skipping %s", e)
        return None


def find_resumable(last: Path, keep_last: int = 2, map_location: Any = "cpu",
                   best: Path | None = None) -> tuple[Path, dict[str, Any]] | None:
    """The newest intact checkpoint of the chain of ``last``; None when there is none at all.

    Candidates, newest first: ``last``, ``last.1``, ... (up to ``max(keep_last, 8)`` names);
    a damaged or missing file is skipped with a warning naming it and the problem. ``best``
    (the run's ``_best.pt``, a complete checkpoint of the epoch that last improved) is also
    tried when ``last`` itself was not usable: it is taken when it is further into the run
    (epoch, batch) than the chain's newest intact file, or when the chain has none.

    Raises:
        CheckpointError: files exist but none of them is intact.
    """
    chain = checkpoint_chain(Path(last), max(keep_last, 8))
    problems: list[str] = []
    found = None
    for path in chain:
        if os.path.lexists(path) and (obj := _try_load(path, map_location, problems)) is not None:
            found = path, obj
            break
    if best is not None and (found is None or found[0] != chain[0]) and os.path.lexists(best):
        obj = _try_load(Path(best), map_location, problems)
        if obj is not None and (found is None or _position(obj) > _position(found[1])):
            found = Path(best), obj
    if found is None:
        if problems:
            raise CheckpointError(last, "no intact checkpoint to resume from: "
                                  + "; ".join(problems))
        return None
    if found[0] != chain[0]:  # the newest was damaged or missing
        log.warning("resume: falling back to the newest intact checkpoint %s", found[0])
    return found


def capture_rng() -> dict[str, Any]:
    """Every RNG state a run depends on (python, numpy, torch CPU and CUDA) as plain types."""
    kind, keys, pos, has_gauss, gauss = np.random.get_state()
    state: dict[str, Any] = {
        "python": random.getstate(),
        "numpy": {"kind": kind, "keys": torch.from_numpy(keys.astype(np.int64)), "pos": int(pos),
                  "has_gauss": int(has_gauss), "gauss": float(gauss)},
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def restore_rng(state: Mapping[str, Any]) -> None:
    """Restore the states captured by :func:`capture_rng`."""
    v, internal, gauss = state["python"]
    random.setstate((v, tuple(internal), gauss))
    n = state["numpy"]
    np.random.set_state((n["kind"], n["keys"].numpy().astype(np.uint32), n["pos"],
                         n["has_gauss"], n["gauss"]))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
