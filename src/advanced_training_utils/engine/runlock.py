"""One run per checkpoint folder and model name: an exclusive ``flock`` on ``{model_name}.lock``.

Two runs writing the same ``{model_name}_*`` files would interleave their checkpoints and
metrics in silence. :class:`RunLock` takes ``fcntl.flock(LOCK_EX | LOCK_NB)`` on the lock file
(opened with ``O_NOFOLLOW``: a symlink there is refused, never followed) and writes the holder's
pid, host and start time into it. A second run fails at once with :class:`RunLockedError`
naming that process. The kernel drops the lock when its process dies (even by ``kill -9``), so a
lock file left by a dead run never blocks the next one. The file itself stays in the folder
(removing it would let two runs lock two different files).

``flock`` is advisory and per machine: it does not protect a folder shared over NFS by runs on
different hosts. Without ``fcntl`` (Windows) the lock is a no-op.
"""

from __future__ import annotations

import errno
import json
import os
import socket
import time
from pathlib import Path

from ..checkpoint import CheckpointError
from ..safeio import O_CLOEXEC, O_NOFOLLOW, write_all

try:
    import fcntl
except ImportError:  # pragma: no cover - Windows
    fcntl = None  # type: ignore[assignment]

__all__ = ["RunLock", "RunLockedError"]


class RunLockedError(CheckpointError):
    """Another live process holds the lock of this checkpoint folder and model name."""


class RunLock:
    """The exclusive lock of one run's files (``path`` is ``{checkpoint_dir}/{model_name}.lock``).

    Example::

        lock = RunLock(Path("checkpoints/m.lock"))
        lock.acquire()      # RunLockedError if another run holds it
        ...
        lock.release()
    """

    def __init__(self, path: Path) -> None:
        self.path = Path(path)
        self._fd: int | None = None

    @property
    def held(self) -> bool:
        return self._fd is not None

    def acquire(self) -> None:
        """Take the lock or raise at once.

        Raises:
            RunLockedError: another process holds it (the message gives its pid, host and
                start time).
            CheckpointError: the lock file is a symlink or cannot be created.
        """
        if self._fd is not None or fcntl is None:
            return
        flags = os.O_RDWR | os.O_CREAT | O_NOFOLLOW | O_CLOEXEC
        try:
            fd = os.open(self.path, flags, 0o644)
        except OSError as e:
            if e.errno == errno.ELOOP:
                raise CheckpointError(self.path, "the lock file is a symlink; remove it (it is "
                                      "never followed)") from None
            raise CheckpointError(self.path, f"cannot create the lock file ({e})") from e
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as e:
            holder = _read_holder(fd)
            os.close(fd)
            if e.errno not in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
                raise CheckpointError(self.path, f"cannot lock ({e})") from e
            raise RunLockedError(self.path, f"another run is using these checkpoint files: "
                                 f"{holder}. Two runs must not share a checkpoint_dir and "
                                 f"model_name: wait for it to end, stop it, or choose another "
                                 f"model_name or checkpoint_dir") from None
        self._fd = fd
        info = {"pid": os.getpid(), "host": socket.gethostname(),
                "started": time.strftime("%Y-%m-%dT%H:%M:%S%z")}
        try:  # who holds it, for the other run's message (best effort)
            os.ftruncate(fd, 0)
            os.lseek(fd, 0, os.SEEK_SET)
            write_all(fd, (json.dumps(info) + "\n").encode())
        except OSError:
            pass

    def release(self) -> None:
        """Drop the lock (the file stays); a no-op when not held."""
        fd, self._fd = self._fd, None
        if fd is not None:
            # Unlock explicitly: a forked child (a DataLoader worker still alive after an
            # exception) holds a copy of the descriptor, and closing ours alone would leave the
            # lock held until that child exits.
            try:
                fcntl.flock(fd, fcntl.LOCK_UN)
            finally:
                os.close(fd)


def _read_holder(fd: int) -> str:
    """``'pid 123 on host h (started ...)'`` from the lock file, or what is known."""
    try:
        raw = os.pread(fd, 4096, 0)
        info = json.loads(raw.decode())
        return f"pid {info['pid']} on host {info['host']} (started {info['started']})"
    except (OSError, ValueError, KeyError, TypeError):
        return "a process whose pid is not recorded yet"
