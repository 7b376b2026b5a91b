"""Features computed once per file and kept on disk, keyed by file identity and parameters.

The key is a SHA-256 of the file's absolute path, size and modification time (ns) and of the
feature parameters (sample rate, every ``LogMel`` parameter, anything else the caller passes), so
editing or replacing the file, or changing any parameter, computes the features again. Entries are
``.npz`` files of plain arrays, read back with ``allow_pickle=False`` (no code runs on load).

Writes are atomic: a uniquely named temporary file is created with ``O_CREAT | O_EXCL |
O_NOFOLLOW`` (never follows a planted symlink, never shares a name with another writer) and moved
into place with ``os.replace``, so concurrent readers see the old entry or the new one, never half
of one. An unreadable entry is recomputed and overwritten; an unwritable cache directory costs
speed only (one warning, the features are still returned).

Location: ``cache_dir`` if given, else ``$ADVTRAIN_CACHE/features``, else
``$XDG_CACHE_HOME/advanced-training-utils/features``, else
``~/.cache/advanced-training-utils/features``.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import secrets
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import numpy as np

__all__ = ["FeatureCache", "feature_cache_dir"]

log = logging.getLogger(__name__)

_VERSION = 1   # bump when the stored layout or the feature computation changes
_APP = "advanced-training-utils"


def feature_cache_dir() -> Path:
    """Where features are cached by default (see the module docstring for the order)."""
    if os.environ.get("ADVTRAIN_CACHE"):
        return Path(os.environ["ADVTRAIN_CACHE"]) / "features"
    xdg = os.environ.get("XDG_CACHE_HOME", "")
    base = Path(xdg) if os.path.isabs(xdg) else Path.home() / ".cache"   # XDG: relative = unset
    return base / _APP / "features"


class FeatureCache:
    """Compute-or-load feature arrays for audio files.

    Args:
        cache_dir: the directory (created on first write); None: :func:`feature_cache_dir`.
        enabled: False computes every time and writes nothing (a no-op cache).

    ``hits`` and ``misses`` count lookups since construction.

    Example::

        cache = FeatureCache()
        arrays, hit = cache.get("a.wav", {"sr": 16000}, lambda: {"mel": compute("a.wav")})
    """

    def __init__(self, cache_dir: str | os.PathLike[str] | None = None, enabled: bool = True) -> None:
        self.dir = Path(cache_dir) if cache_dir is not None else feature_cache_dir()
        self.enabled = bool(enabled)
        self.hits = 0
        self.misses = 0
        self._warned = False

    def key(self, path: str | os.PathLike[str], params: Mapping[str, Any]) -> str:
        """Hex key of (absolute path, size, mtime_ns, params); raises ``OSError`` if unstattable."""
        absolute = os.path.abspath(os.fspath(path))
        st = os.stat(absolute)
        ident = {"v": _VERSION, "path": absolute, "size": st.st_size,
                 "mtime_ns": st.st_mtime_ns, "params": dict(params)}
        blob = json.dumps(ident, sort_keys=True, default=repr).encode()
        return hashlib.sha256(blob).hexdigest()

    def entry(self, key: str) -> Path:
        """The file holding ``key``'s arrays."""
        return self.dir / key[:2] / f"{key}.npz"

    def get(self, path: str | os.PathLike[str], params: Mapping[str, Any],
            compute: Callable[[], dict[str, np.ndarray]]) -> tuple[dict[str, np.ndarray], bool]:
        """``(arrays, hit)``: the cached arrays for ``path`` under ``params``, or ``compute()``'s
        (then stored). ``compute`` must return a dict of numeric numpy arrays; its exceptions
        propagate and nothing is stored."""
        if not self.enabled:
            self.misses += 1
            return compute(), False
        try:
            target = self.entry(self.key(path, params))
        except OSError:                      # missing file: let compute() report it
            self.misses += 1
            return compute(), False
        arrays = self._load(target)
        if arrays is not None:
            self.hits += 1
            return arrays, True
        self.misses += 1
        arrays = compute()
        self._store(target, arrays)
        return arrays, False

    def _load(self, target: Path) -> dict[str, np.ndarray] | None:
        try:
            with np.load(target, allow_pickle=False) as z:
                return {k: z[k] for k in z.files}
        except FileNotFoundError:
            return None
        except Exception:                    # truncated or foreign file: recompute and overwrite
            log.warning("feature cache entry %s unreadable; computing again", target)
            return None

    def _store(self, target: Path, arrays: Mapping[str, np.ndarray]) -> None:
        tmp = target.with_name(f".{target.name}.{os.getpid()}.{secrets.token_hex(8)}.tmp")
        created = False
        try:
            target.parent.mkdir(parents=True, exist_ok=True)
            fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_NOFOLLOW", 0),
                         0o666)                                   # the user's umask applies
            created = True
            with os.fdopen(fd, "wb") as f:
                np.savez(f, **arrays)
            os.replace(tmp, target)
        except OSError as exc:
            if created:
                tmp.unlink(missing_ok=True)
            if not self._warned:
                log.warning("feature cache %s not writable (%s); features are not cached",
                            self.dir, exc)
                self._warned = True
