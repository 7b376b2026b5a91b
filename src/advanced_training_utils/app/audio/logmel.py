"""Log-mel spectrogram as an ``nn.Module``: ``torch.stft`` -> triangular mel filterbank -> log.

The Hann window and the filterbank are (non-persistent) buffers, so ``LogMel(...).to(device)``
computes features on that device and a model holding a ``LogMel`` keeps a clean ``state_dict``.
The filterbank is computed here (HTK or Slaney mel scale, optional Slaney area normalisation); no
torchaudio or librosa.

Defaults suit speech: 16 kHz, 25 ms windows (``n_fft=400``), 10 ms hop (``hop_length=160``),
64 bands from 0 Hz to 8 kHz (the whole band of 16 kHz audio). :meth:`LogMel.chorale` gives the
parameters the built-in chorale tasks use (``app/data/datasets.py``).

Example::

    to_mel = LogMel()                          # speech defaults
    mel = to_mel(torch.randn(2, 16000))        # [2, 64, 101]: 1 s -> 101 frames of 10 ms
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import nn

from ..._validate import check_choice, check_int, check_real

__all__ = ["CHORALE_PARAMS", "LogMel", "hz_to_mel", "mel_filterbank", "mel_to_hz"]

CHORALE_PARAMS: dict[str, Any] = {
    "sample_rate": 16000, "n_fft": 1024, "hop_length": 256, "n_mels": 64,
    "f_min": 50.0, "f_max": 4000.0, "mel_scale": "htk", "norm": None, "eps": 1e-6,
}
"""The built-in chorale tasks' features (``app/data/datasets.py``): 1024-point FFT (15.6 Hz bins), 16 ms
hop, 64 HTK bands from 50 Hz to 4 kHz."""

# Slaney (Auditory Toolbox) scale: linear below 1 kHz (3 bands per 200 Hz), log above.
_SLANEY_F_SP = 200.0 / 3.0
_SLANEY_MIN_LOG_HZ = 1000.0
_SLANEY_MIN_LOG_MEL = _SLANEY_MIN_LOG_HZ / _SLANEY_F_SP      # 15.0
_SLANEY_LOGSTEP = math.log(6.4) / 27.0                       # 27 bands per factor 6.4


def hz_to_mel(f: torch.Tensor | float, mel_scale: str = "htk") -> torch.Tensor:
    """Hz -> mel (float64). HTK: ``2595 log10(1 + f / 700)``; Slaney: ``f / (200/3)`` below
    1 kHz, ``15 + ln(f / 1000) / (ln 6.4 / 27)`` above."""
    f = torch.as_tensor(f, dtype=torch.float64)
    if mel_scale == "htk":
        return 2595.0 * torch.log10(1.0 + f / 700.0)
    log_part = _SLANEY_MIN_LOG_MEL + torch.log(
        torch.clamp(f, min=_SLANEY_MIN_LOG_HZ) / _SLANEY_MIN_LOG_HZ) / _SLANEY_LOGSTEP
    return torch.where(f >= _SLANEY_MIN_LOG_HZ, log_part, f / _SLANEY_F_SP)


def mel_to_hz(m: torch.Tensor | float, mel_scale: str = "htk") -> torch.Tensor:
    """Inverse of :func:`hz_to_mel` (float64)."""
    m = torch.as_tensor(m, dtype=torch.float64)
    if mel_scale == "htk":
        return 700.0 * (10.0 ** (m / 2595.0) - 1.0)
    log_part = _SLANEY_MIN_LOG_HZ * torch.exp(_SLANEY_LOGSTEP * (m - _SLANEY_MIN_LOG_MEL))
    return torch.where(m >= _SLANEY_MIN_LOG_MEL, log_part, m * _SLANEY_F_SP)


def mel_filterbank(n_mels: int, n_fft: int, sample_rate: int, f_min: float, f_max: float,
                   mel_scale: str = "htk", norm: str | None = None) -> torch.Tensor:
    """Triangular filters ``[n_mels, n_fft // 2 + 1]`` (float32), equally spaced on the mel scale.

    Filter ``k`` rises from edge ``k`` to peak 1 at edge ``k + 1`` and falls to 0 at edge ``k + 2``
    of ``n_mels + 2`` edges from ``f_min`` to ``f_max``, evaluated at the FFT bin frequencies
    ``0 .. sample_rate / 2``. ``norm="slaney"`` scales each filter by ``2 / (hi - lo)`` (Hz), so
    every filter has unit area on the Hz axis (equal energy per band for white noise).
    """
    freqs = torch.linspace(0, sample_rate / 2, n_fft // 2 + 1, dtype=torch.float64)
    mels = torch.linspace(float(hz_to_mel(f_min, mel_scale)), float(hz_to_mel(f_max, mel_scale)),
                          n_mels + 2, dtype=torch.float64)
    edges = mel_to_hz(mels, mel_scale)                                 # [n_mels + 2] Hz
    lo, mid, hi = edges[:-2, None], edges[1:-1, None], edges[2:, None]  # each [n_mels, 1]
    up = (freqs[None, :] - lo) / (mid - lo)
    down = (hi - freqs[None, :]) / (hi - mid)
    fb = torch.clamp(torch.minimum(up, down), min=0.0)                 # [n_mels, n_freqs]
    if norm == "slaney":
        fb = fb * (2.0 / (hi - lo))
    return fb.float()


class LogMel(nn.Module):
    """Waveform ``[T]`` or ``[B, T]`` -> natural-log mel power ``[n_mels, F]`` / ``[B, n_mels, F]``.

    ``F = 1 + T // hop_length`` with ``center=True`` (frames centred on ``t * hop_length``,
    reflect-padded at the ends), ``1 + (T - n_fft) // hop_length`` without. Output is
    ``log(mel_power + eps)``, mel_power = filterbank @ ``|STFT|^2`` (Hann window, unnormalised).

    Args:
        sample_rate: the waveform's rate in Hz.
        n_fft: FFT size in samples (400 = 25 ms at 16 kHz).
        hop_length: frame step in samples (160 = 10 ms at 16 kHz).
        n_mels: number of mel bands.
        f_min, f_max: band edges in Hz; ``f_max=None`` means ``sample_rate / 2``.
        win_length: Hann window length (<= n_fft, zero-padded to n_fft); None means n_fft.
        mel_scale: ``"htk"`` or ``"slaney"``.
        norm: None (peak-1 triangles) or ``"slaney"`` (unit-area triangles).
        eps: floor inside the log (the value of silence is ``log(eps)``).
        center: centre frames on their sample (pad ``n_fft // 2`` each side).
        pad_mode: padding used by ``center`` (``"reflect"``, ``"constant"``, ...).
    """

    window: torch.Tensor
    fb: torch.Tensor

    def __init__(self, sample_rate: int = 16000, n_fft: int = 400, hop_length: int = 160,
                 n_mels: int = 64, f_min: float = 0.0, f_max: float | None = 8000.0, *,
                 win_length: int | None = None, mel_scale: str = "htk", norm: str | None = None,
                 eps: float = 1e-6, center: bool = True, pad_mode: str = "reflect") -> None:
        super().__init__()
        self.sample_rate = check_int("sample_rate", sample_rate, low=1)
        self.n_fft = check_int("n_fft", n_fft, low=2)
        self.hop_length = check_int("hop_length", hop_length, low=1)
        self.win_length = check_int("win_length", n_fft if win_length is None else win_length,
                                    low=1, high=self.n_fft)
        self.n_mels = check_int("n_mels", n_mels, low=1)
        self.f_max = check_real("f_max", sample_rate / 2 if f_max is None else f_max,
                                low=0.0, high=sample_rate / 2, low_inclusive=False)
        self.f_min = check_real("f_min", f_min, low=0.0, high=self.f_max, high_inclusive=False)
        self.mel_scale = check_choice("mel_scale", mel_scale, ("htk", "slaney"))
        self.norm = check_choice("norm", norm, (None, "slaney"))
        self.eps = check_real("eps", eps, low=0.0, low_inclusive=False)
        self.center = bool(center)
        self.pad_mode = check_choice("pad_mode", pad_mode, ("reflect", "constant", "replicate",
                                                            "circular"))
        fb = mel_filterbank(self.n_mels, self.n_fft, self.sample_rate, self.f_min, self.f_max,
                            self.mel_scale, self.norm)
        empty = (fb.sum(dim=1) == 0).nonzero().flatten().tolist()
        if empty:
            raise ValueError(
                f"n_mels={n_mels} is too many for n_fft={n_fft} at {sample_rate} Hz between "
                f"{self.f_min:g} and {self.f_max:g} Hz: bands {empty} contain no FFT bin; use "
                "fewer mels, a larger n_fft or a higher f_min")
        self.register_buffer("window", torch.hann_window(self.win_length), persistent=False)
        self.register_buffer("fb", fb, persistent=False)

    @classmethod
    def chorale(cls, **overrides: Any) -> LogMel:
        """The built-in chorale tasks' parameters (:data:`CHORALE_PARAMS`), optionally changed."""
        return cls(**{**CHORALE_PARAMS, **overrides})

    def params(self) -> dict[str, Any]:
        """Every parameter that changes the output, as plain values (for cache keys, reports)."""
        return {"sample_rate": self.sample_rate, "n_fft": self.n_fft, "win_length": self.win_length,
                "hop_length": self.hop_length, "n_mels": self.n_mels, "f_min": self.f_min,
                "f_max": self.f_max, "mel_scale": self.mel_scale, "norm": self.norm,
                "eps": self.eps, "center": self.center, "pad_mode": self.pad_mode}

    def extra_repr(self) -> str:
        return ", ".join(f"{k}={v!r}" for k, v in self.params().items())

    @property
    def min_samples(self) -> int:
        """The shortest input accepted (reflect padding needs more than ``n_fft // 2`` samples)."""
        if not self.center:
            return self.n_fft
        return self.n_fft // 2 + 1 if self.pad_mode == "reflect" else 1

    def frames(self, samples: int) -> int:
        """Frames produced for ``samples`` input samples."""
        if self.center:
            return 1 + samples // self.hop_length
        return 0 if samples < self.n_fft else 1 + (samples - self.n_fft) // self.hop_length

    def forward(self, wave: torch.Tensor) -> torch.Tensor:
        """``[T]`` -> ``[n_mels, F]``; ``[B, T]`` -> ``[B, n_mels, F]`` (dtype of the buffers)."""
        if not isinstance(wave, torch.Tensor) or wave.dim() not in (1, 2):
            shape = tuple(wave.shape) if isinstance(wave, torch.Tensor) else type(wave).__name__
            raise ValueError(f"LogMel input must be a tensor [T] or [B, T], got {shape}")
        if wave.shape[-1] < self.min_samples:
            raise ValueError(f"LogMel input has {wave.shape[-1]} samples; at least "
                             f"{self.min_samples} are needed (n_fft={self.n_fft}, "
                             f"center={self.center}, pad_mode={self.pad_mode!r})")
        spec = torch.stft(wave.to(self.window.dtype), self.n_fft, self.hop_length,
                          win_length=self.win_length, window=self.window, center=self.center,
                          pad_mode=self.pad_mode, return_complex=True)   # [..., bins, F]
        power = spec.real.pow(2) + spec.imag.pow(2)
        mel = torch.matmul(self.fb, power)                                # [..., n_mels, F]
        return torch.log(mel + self.eps)
