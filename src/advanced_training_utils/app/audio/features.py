"""File -> log-mel features, through the on-disk cache, with bad files reported by name.

Example::

    extract = FeatureExtractor()                 # speech LogMel, default cache directory
    mel, samples = extract("clip.wav")           # np.float32 [64, F], samples at 16 kHz
"""

from __future__ import annotations

import logging
import os
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from ..._validate import check_choice
from .cache import FeatureCache
from .decode import RESAMPLE_QUALITY, AudioError, load_audio
from .logmel import LogMel

__all__ = ["ON_ERROR", "Extracted", "FeatureExtractor"]

log = logging.getLogger(__name__)

ON_ERROR = ("skip", "raise")


@dataclass
class Extracted:
    """What :meth:`FeatureExtractor.extract_all` kept and skipped."""

    kept: list[int] = field(default_factory=list)          # indices into the input paths
    features: list[torch.Tensor] = field(default_factory=list)   # each float32 [n_mels, F]
    samples: list[int] = field(default_factory=list)       # waveform length at the feature rate
    skipped: list[dict[str, str]] = field(default_factory=list)  # {"path", "problem"}


class FeatureExtractor:
    """Decode (:func:`load_audio`) -> :class:`LogMel` on the CPU -> ``np.float32 [n_mels, F]``.

    Args:
        logmel: the feature module (its ``sample_rate`` is the decode rate); None: ``LogMel()``.
        cache: where features are kept; None: ``FeatureCache()`` (the default directory).
        allow_silent, quality: passed to :func:`load_audio`.
    """

    def __init__(self, logmel: LogMel | None = None, cache: FeatureCache | None = None, *,
                 allow_silent: bool = False, quality: str = "HQ") -> None:
        if logmel is not None and not isinstance(logmel, LogMel):
            raise TypeError(f"logmel must be a LogMel, got {type(logmel).__name__}")
        self.logmel = (logmel if logmel is not None else LogMel()).cpu()
        self.cache = cache if cache is not None else FeatureCache()
        self.allow_silent = bool(allow_silent)
        self.quality = check_choice("quality", quality, RESAMPLE_QUALITY)

    def params(self) -> dict[str, Any]:
        """Everything that changes the features (the cache key's parameter part)."""
        return {"logmel": self.logmel.params(), "allow_silent": self.allow_silent,
                "resample_quality": self.quality}

    def _compute(self, path: str) -> dict[str, np.ndarray]:
        wave = load_audio(path, self.logmel.sample_rate, allow_silent=self.allow_silent,
                          quality=self.quality)
        if wave.shape[0] < self.logmel.min_samples:
            raise AudioError(path, f"too short: {wave.shape[0]} samples at "
                                   f"{self.logmel.sample_rate} Hz; at least "
                                   f"{self.logmel.min_samples} needed for n_fft="
                                   f"{self.logmel.n_fft}")
        with torch.no_grad():
            mel = self.logmel(torch.from_numpy(wave)).numpy()
        return {"mel": mel, "samples": np.array(wave.shape[0], dtype=np.int64)}

    def __call__(self, path: str | os.PathLike[str]) -> tuple[np.ndarray, int]:
        """``(features [n_mels, F] float32, samples)``; raises :class:`AudioError`."""
        path = os.fspath(path)
        arrays, _hit = self.cache.get(path, self.params(), lambda: self._compute(path))
        return arrays["mel"], int(arrays["samples"])

    def extract_all(self, paths: Sequence[str | os.PathLike[str]], on_error: str = "skip"
                    ) -> Extracted:
        """Features of every path. ``on_error="skip"`` logs and records each bad file and goes
        on; ``"raise"`` raises the first :class:`AudioError`."""
        check_choice("on_error", on_error, ON_ERROR)
        out = Extracted()
        for i, path in enumerate(paths):
            try:
                mel, samples = self(path)
            except AudioError as exc:
                if on_error == "raise":
                    raise
                log.warning("skipping %s", exc)
                out.skipped.append({"path": exc.path, "problem": exc.problem})
                continue
            out.kept.append(i)
            out.features.append(torch.from_numpy(np.ascontiguousarray(mel, dtype=np.float32)))
            out.samples.append(samples)
        return out
