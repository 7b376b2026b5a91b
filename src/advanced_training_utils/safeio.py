"""Symlink-safe file writes: unique temporary names, atomic replace, appends that undo
themselves on failure, and removal of the temporary files an interrupted write left behind.

Every byte this package writes goes through one call, ``os.write`` (in :func:`write_all`), and
every file it creates is opened with ``os.open``:

- a new file is created under a unique temporary name ``.{final name}.{12 hex digits}.tmp`` in
  the destination folder with ``O_CREAT | O_EXCL | O_NOFOLLOW``: a file or symlink planted at
  that name makes the open fail instead of being written through;
- it is fsynced and moved over the final name with ``os.replace``, which replaces a symlink at
  the final name by the new file (the link's target is never touched);
- an append opens the existing file with ``O_NOFOLLOW`` (a symlink there is removed and a new
  regular file created) and, when the write fails, truncates the file back to where it was, so
  a full disk never leaves half a line;
- :func:`remove_stale_temps` deletes the temporary files of the given final names (and only
  those) that a killed process left behind.

Example::

    atomic_write(Path("run/notes.txt"), lambda f: f.write(b"hello"))
"""

from __future__ import annotations

import errno
import io
import logging
import os
import re
import secrets
import stat
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import BinaryIO

__all__ = [
    "append_bytes", "atomic_write", "copy_into", "discard", "fsync_dir", "open_temp",
    "remove_stale_temps", "temp_name", "write_all", "write_temp",
]

log = logging.getLogger(__name__)

O_NOFOLLOW = getattr(os, "O_NOFOLLOW", 0)
O_CLOEXEC = getattr(os, "O_CLOEXEC", 0)
O_NONBLOCK = getattr(os, "O_NONBLOCK", 0)  # a planted FIFO fails at open instead of blocking
_NEW = os.O_WRONLY | os.O_CREAT | os.O_EXCL | O_NOFOLLOW | O_CLOEXEC
# Our temporary names; the 8-character and ".link" forms are those of earlier versions.
_TEMP = re.compile(r"^\.(?P<final>.+)\.(?:[0-9a-f]{12}|[a-z0-9_]{8}|link)\.tmp$")
_BUFFER = 1 << 16


def temp_name(final: Path) -> Path:
    """A fresh unique temporary name for ``final``, in its folder."""
    return final.with_name(f".{final.name}.{secrets.token_hex(6)}.tmp")


def write_all(fd: int, data: bytes | memoryview) -> None:
    """Write all of ``data`` to ``fd`` (``os.write`` may write part of it)."""
    view = memoryview(data).cast("B")
    while view.nbytes:
        n = os.write(fd, view)
        view = view[n:]


def fsync_dir(path: Path) -> None:
    """Flush a folder's entries (the renames in it) to disk; best effort."""
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


class _FdWriter(io.RawIOBase):
    """A raw writer over ``fd`` through :func:`write_all`, keeping the first ``OSError``
    (``torch.save`` turns some of them into a ``RuntimeError`` without errno)."""

    def __init__(self, fd: int) -> None:
        super().__init__()
        self.fd = fd
        self.error: OSError | None = None

    def writable(self) -> bool:
        return True

    def fileno(self) -> int:
        return self.fd

    def close(self) -> None:
        if not self.closed:
            try:
                os.close(self.fd)
            finally:
                super().close()

    def write(self, b: bytes | memoryview) -> int:  # type: ignore[override]
        try:
            write_all(self.fd, b)
        except OSError as e:
            self.error = self.error or e
            raise
        return memoryview(b).nbytes


def open_temp(final: Path, mode: int = 0o666) -> tuple[int, Path]:
    """Create a new empty temporary file for ``final`` (``O_EXCL | O_NOFOLLOW``), with
    ``mode`` less the process' umask (by default what the user's umask allows, as ``open``
    does: a team sharing a folder can read the checkpoints).

    Returns:
        ``(fd, path)``; the caller closes the fd and removes or renames the file.
    """
    for _ in range(100):
        tmp = temp_name(final)
        try:
            return os.open(tmp, _NEW, mode), tmp
        except FileExistsError:
            continue
    raise FileExistsError(errno.EEXIST, "no free temporary name", str(final))


def discard(tmp: Path) -> None:
    """Remove a temporary file; best effort."""
    try:
        os.unlink(tmp)
    except OSError:
        pass


def write_temp(final: Path, fill: Callable[[BinaryIO], object], mode: int = 0o666) -> Path:
    """Write what ``fill(file)`` writes to a new temporary file for ``final`` and fsync it.

    Returns:
        The complete temporary file's path; the caller renames it into place (``os.replace``)
        or removes it (:func:`discard`). On any error or interruption it is already removed.

    Raises:
        OSError: the write failed (``ENOSPC``, ``EIO``...), also when ``fill`` reported it as
            another exception (``torch.save`` raises ``RuntimeError`` for some).
    """
    fd, tmp = open_temp(final, mode)
    raw = _FdWriter(fd)
    try:
        with io.BufferedWriter(raw, _BUFFER) as f:
            fill(f)  # type: ignore[arg-type]
            f.flush()
            os.fsync(fd)
    except BaseException as e:
        if not raw.closed:
            raw.close()
        discard(tmp)
        if raw.error is not None and not isinstance(e, OSError):
            raise raw.error from e
        raise
    return tmp


def atomic_write(final: Path, fill: Callable[[BinaryIO], object], mode: int = 0o666) -> Path:
    """Make ``final`` hold what ``fill(file)`` writes, atomically: :func:`write_temp`, then
    ``os.replace`` over ``final`` (a symlink there is replaced, not followed). On any error
    ``final`` is left as it was and no temporary file remains.

    Raises:
        OSError: as :func:`write_temp`, or the rename failed.
    """
    tmp = write_temp(final, fill, mode)
    try:
        os.replace(tmp, final)
    except BaseException:
        discard(tmp)
        raise
    fsync_dir(final.parent)
    return final


def copy_into(src: Path, f: BinaryIO) -> None:
    """Write ``src``'s bytes to ``f`` (to make an independent copy with :func:`write_temp`)."""
    with open(src, "rb") as s:
        while chunk := s.read(1 << 22):
            f.write(chunk)


def append_bytes(path: Path, data: bytes, mode: int = 0o666) -> None:
    """Append ``data`` to ``path`` without following a symlink there, and fsync it; on failure
    the file is truncated back to its previous length (no partial line is left).

    A symlink at ``path`` is removed (not followed) and a new regular file created.

    Raises:
        OSError: the write failed, or ``path`` is not a regular file.
    """
    flags = os.O_WRONLY | os.O_APPEND | os.O_CREAT | O_NOFOLLOW | O_CLOEXEC | O_NONBLOCK
    try:
        fd = os.open(path, flags, mode)
    except OSError as e:
        if e.errno != errno.ELOOP:
            raise
        log.warning("%s was a symlink; replacing it with a new file (its target is untouched)",
                    path)
        os.unlink(path)
        fd = os.open(path, flags | os.O_EXCL, mode)
    try:
        info = os.fstat(fd)
        if not stat.S_ISREG(info.st_mode):
            raise OSError(errno.EINVAL, "not a regular file", str(path))
        try:
            write_all(fd, data)
            os.fsync(fd)  # durable like the checkpoints (once per epoch: about a millisecond)
        except OSError:
            try:
                os.ftruncate(fd, info.st_size)
            except OSError:
                pass
            raise
    finally:
        os.close(fd)


def remove_stale_temps(folder: Path, finals: Iterable[str] | Callable[[str], bool]) -> int:
    """Delete the temporary files left in ``folder`` by interrupted writes to the given final
    names (a set of names, or a predicate on a name). Only regular files named like ours are
    removed; nothing else in the folder is touched. Call it only while holding the run's lock.

    Returns:
        The number of bytes freed.
    """
    ours = finals if callable(finals) else set(finals).__contains__
    freed = removed = 0
    try:
        entries = list(os.scandir(folder))
    except OSError:
        return 0
    for entry in entries:
        m = _TEMP.match(entry.name)
        if m is None or not ours(m["final"]):
            continue
        try:
            if not entry.is_file(follow_symlinks=False):
                continue
            size = entry.stat(follow_symlinks=False).st_size
            os.unlink(entry.path)
        except OSError:
            continue
        freed += size
        removed += 1
    if removed:
        log.warning("removed %d temporary file(s) (%.1f MB) left in %s by an interrupted write",
                    removed, freed / 1e6, folder)
    return freed
