"""Fault injection for the crash-safety tests and ``tests/crash_worker.py``.

Every file the package writes is created, written, synced, linked and renamed through a few
functions of the ``os`` module (see ``advanced_training_utils.safeio``): ``os.open``,
``os.write``, ``os.fsync``, ``os.replace``, ``os.link`` and ``os.unlink``. :class:`FileFaults`
wraps them and, for the calls that touch a file whose name matches a glob, runs an action at
the Nth such call: raise ``OSError(ENOSPC)`` or ``OSError(EIO)``, check an invariant, send a
signal, or SIGKILL the process. A test names files, not call sites, so a new write path is
covered as soon as it writes a file of that name.

    faults = FileFaults(folder=tmp_path).fail("write", "*_last.pt*", errno.ENOSPC, nth=2)
    faults.install(monkeypatch)
    ...
    assert faults.fired  # the fault really happened
"""

from __future__ import annotations

import errno
import fnmatch
import os
import signal
import threading
from collections.abc import Callable, Iterable
from pathlib import Path

OPS = ("open", "write", "fsync", "replace", "link", "unlink")
WRITE_FLAGS = os.O_WRONLY | os.O_RDWR | os.O_CREAT


class FileFaults:
    """Rules ``(ops, glob, calls, action)`` over the wrapped ``os`` functions.

    Args:
        folder: only files directly in this folder count (None: any file).
    """

    def __init__(self, folder: Path | str | None = None) -> None:
        self.folder = os.path.realpath(folder) if folder is not None else None
        self.real = {op: getattr(os, op) for op in OPS}
        self.rules: list[dict] = []
        self.fired: list[tuple[str, str]] = []  # (op, path) of every action run
        self.seen: list[tuple[str, str]] = []   # (op, path) of every matching call
        self._lock = threading.Lock()

    # ---------------------------------------------------------------- rules
    def on(self, ops: str | Iterable[str], pattern: str, action: Callable[[str, str], None],
           nth: int = 1, always: bool = False) -> FileFaults:
        """Run ``action(op, path)`` at the ``nth`` matching call (and every later one when
        ``always``), before the call itself."""
        ops = (ops,) if isinstance(ops, str) else tuple(ops)
        assert set(ops) <= set(OPS), ops
        self.rules.append({"ops": ops, "pattern": pattern, "action": action, "nth": nth,
                           "always": always, "count": 0})
        return self

    def fail(self, ops: str | Iterable[str], pattern: str, err: int = errno.ENOSPC,
             nth: int = 1, always: bool = False) -> FileFaults:
        """Raise ``OSError(err)`` at the ``nth`` matching call (and later ones if ``always``)."""
        def action(op: str, path: str) -> None:
            raise OSError(err, os.strerror(err), path)
        return self.on(ops, pattern, action, nth, always)

    def kill(self, ops: str | Iterable[str], pattern: str, nth: int,
             sig: int = signal.SIGKILL) -> FileFaults:
        """Send ``sig`` to this process at the ``nth`` matching call."""
        return self.on(ops, pattern, lambda op, path: os.kill(os.getpid(), sig), nth)

    # ---------------------------------------------------------------- wrapping
    def install(self, monkeypatch=None) -> FileFaults:
        """Replace the ``os`` functions (through pytest's ``monkeypatch`` when given, which
        restores them after the test)."""
        for op in OPS:
            wrapper = getattr(self, f"_{op}")
            if monkeypatch is not None:
                monkeypatch.setattr(os, op, wrapper)
            else:
                setattr(os, op, wrapper)
        return self

    def uninstall(self) -> None:
        for op, fn in self.real.items():
            setattr(os, op, fn)

    def _check(self, op: str, paths: Iterable[str]) -> None:
        """Count this call for every rule that one of its paths matches; run the due actions."""
        paths = [p for p in paths if p and (self.folder is None or os.path.realpath(
            os.path.dirname(os.path.abspath(p))) == self.folder)]
        if not paths:
            return
        names = [os.path.basename(p) for p in paths]
        due = []
        with self._lock:
            for r in self.rules:
                if op in r["ops"] and any(fnmatch.fnmatch(n, r["pattern"]) for n in names):
                    r["count"] += 1
                    if r["count"] == r["nth"] or (r["always"] and r["count"] > r["nth"]):
                        due.append(r["action"])
            self.seen.append((op, paths[0]))
        for action in due:
            self.fired.append((op, paths[0]))
            action(op, paths[0])

    def _fd_path(self, fd: int) -> str:
        try:
            return os.readlink(f"/proc/self/fd/{fd}").removesuffix(" (deleted)")
        except OSError:
            return ""

    def _open(self, path, flags, *args, **kwargs):
        if flags & WRITE_FLAGS:
            self._check("open", [os.fspath(path)])
        return self.real["open"](path, flags, *args, **kwargs)

    def _write(self, fd, data):
        self._check("write", [self._fd_path(fd)])
        return self.real["write"](fd, data)

    def _fsync(self, fd):
        fd = fd if isinstance(fd, int) else fd.fileno()
        self._check("fsync", [self._fd_path(fd)])
        return self.real["fsync"](fd)

    def _replace(self, src, dst, *args, **kwargs):
        self._check("replace", [os.fspath(dst), os.fspath(src)])
        return self.real["replace"](src, dst, *args, **kwargs)

    def _link(self, src, dst, *args, **kwargs):
        self._check("link", [os.fspath(dst), os.fspath(src)])
        return self.real["link"](src, dst, *args, **kwargs)

    def _unlink(self, path, *args, **kwargs):
        self._check("unlink", [os.fspath(path)])
        return self.real["unlink"](path, *args, **kwargs)


def temp_files(folder: Path) -> list[str]:
    """Names of temporary files (ours end in ``.tmp``) left in ``folder``."""
    return sorted(p.name for p in Path(folder).iterdir() if p.name.endswith(".tmp"))
