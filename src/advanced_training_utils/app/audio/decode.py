"""Decode an audio file to a mono float32 waveform at the feature sample rate.

Decoding is ``soundfile`` (libsndfile: wav, flac, ogg/vorbis and the other formats it reads),
resampling is ``soxr`` (high quality). Every way a file can be unusable ends in one exception,
:class:`AudioError`, that names the file and the problem; a decoder's own exception never
escapes, so a corpus loader can report bad files by name and carry on.

Example::

    wave = load_audio("clip.wav", sample_rate=16000)   # np.float32 [T], T = seconds * 16000
"""

from __future__ import annotations

import importlib
import os
from pathlib import Path
from typing import Any

import numpy as np

from ..._validate import check_choice, check_int

__all__ = ["AUDIO_EXTENSIONS", "AudioError", "load_audio", "RESAMPLE_QUALITY"]

AUDIO_EXTENSIONS = (".wav", ".flac", ".ogg")
"""File endings the folder layout picks up (case-insensitive); ``load_audio`` itself reads any
format libsndfile knows."""

RESAMPLE_QUALITY = ("VHQ", "HQ", "MQ", "LQ", "QQ")
"""soxr quality recipes, best first."""

_PREFIX = "Error opening "


class AudioError(ValueError):
    """A file that cannot be used as audio: ``path`` and ``problem`` say which and why.

    The message is ``"<path>: <problem>"``. Problems: ``not found``, ``not a file``,
    ``empty file (0 bytes)``, ``unsupported format: ...`` (e.g. a sample width libsndfile cannot
    read, such as 48- or 64-bit integer PCM), ``cannot decode: ...`` (corrupt or not audio),
    ``zero-length clip (0 samples)``, ``silent (all samples are zero)``, ``non-finite samples``.
    """

    def __init__(self, path: str | os.PathLike[str], problem: str) -> None:
        self.path = str(path)
        self.problem = problem
        super().__init__(f"{self.path}: {problem}")

    def __reduce__(self) -> tuple[type, tuple[str, str]]:  # picklable across DataLoader workers
        return (type(self), (self.path, self.problem))


def _decoder_problem(exc: Exception, path: str) -> str:
    """A libsndfile message without its ``Error opening '<path>': `` prefix, classified."""
    msg = str(exc).strip()
    for prefix in (f"{_PREFIX}{path!r}: ", f"{_PREFIX}'{path}': "):
        if msg.startswith(prefix):
            msg = msg[len(prefix):]
    if "unimplemented format" in msg or "unsupported" in msg.lower():
        return f"unsupported format: {msg} (allowed: what libsndfile decodes, e.g. 8/16/24/32-bit " \
               "integer PCM, 32/64-bit float, FLAC, Ogg Vorbis)"
    return f"cannot decode: {msg or type(exc).__name__}"


def _require(module: str) -> Any:
    """Import one of the ``audio`` extra's libraries, or say how to install it."""
    try:
        return importlib.import_module(module)
    except ImportError as exc:
        raise ImportError(f"{module} is needed to read audio files: pip install "
                          f"'advanced-training-utils[audio]' (soundfile and soxr)") from exc


def _read(path: str) -> tuple[np.ndarray, int]:
    """``(samples [T, C] float32, sample rate)``; every failure becomes :class:`AudioError`."""
    sf = _require("soundfile")

    if not os.path.exists(path):
        raise AudioError(path, "not found")
    if not os.path.isfile(path):
        raise AudioError(path, "not a file")
    if os.path.getsize(path) == 0:
        raise AudioError(path, "empty file (0 bytes)")
    try:
        data, rate = sf.read(path, dtype="float32", always_2d=True)
    except MemoryError:
        raise
    except Exception as exc:  # libsndfile, struct and OS errors alike: report, never re-raise
        raise AudioError(path, _decoder_problem(exc, path)) from None
    return data, int(rate)


def load_audio(path: str | os.PathLike[str], sample_rate: int = 16000, *,
               allow_silent: bool = False, quality: str = "HQ") -> np.ndarray:
    """Decode ``path``, downmix to mono and resample to ``sample_rate``.

    Args:
        path: an audio file (wav, flac, ogg, ...).
        sample_rate: the output rate in Hz (the feature rate; 16 kHz suits speech).
        allow_silent: accept a clip whose samples are all zero (by default that is an error: a
            silent training clip is almost always an export bug).
        quality: soxr recipe, one of :data:`RESAMPLE_QUALITY`.

    Returns:
        ``np.float32 [T]``: the mean of the channels, resampled with soxr;
        ``T = round(frames * sample_rate / file_rate)``. Values as decoded (PCM in [-1, 1)).

    Raises:
        AudioError: the file is missing, empty, corrupt, in an unsupported format or sample
            width, has zero samples, holds NaN/inf, or is silent (unless ``allow_silent``).
    """
    sample_rate = check_int("sample_rate", sample_rate, low=1)
    check_choice("quality", quality, RESAMPLE_QUALITY)
    path = os.fspath(Path(path))
    data, rate = _read(path)
    if data.shape[0] == 0:
        raise AudioError(path, "zero-length clip (0 samples)")
    mono = data.mean(axis=1, dtype=np.float32)                      # [T] mean of channels
    if not np.isfinite(mono).all():
        raise AudioError(path, "non-finite samples (NaN or inf)")
    if not allow_silent and not mono.any():
        raise AudioError(path, "silent (all samples are zero)")
    if rate != sample_rate:
        mono = _require("soxr").resample(mono, rate, sample_rate, quality=quality)
    return np.ascontiguousarray(mono, dtype=np.float32)
