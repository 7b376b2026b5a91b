"""Log-mel spectrograms with ``torch.stft`` and a triangular (HTK-scale) mel filterbank."""

from __future__ import annotations

import torch

__all__ = ["mel_filterbank", "LogMel"]


def _hz_to_mel(f: torch.Tensor | float) -> torch.Tensor:
    return 2595.0 * torch.log10(1.0 + torch.as_tensor(f, dtype=torch.float64) / 700.0)


def _mel_to_hz(m: torch.Tensor) -> torch.Tensor:
    return 700.0 * (10.0 ** (m / 2595.0) - 1.0)


def mel_filterbank(n_mels: int, n_fft: int, sample_rate: int, f_min: float,
                   f_max: float) -> torch.Tensor:
    """``[n_mels, n_fft // 2 + 1]`` triangular filters, equally spaced on the HTK mel scale."""
    freqs = torch.linspace(0, sample_rate / 2, n_fft // 2 + 1, dtype=torch.float64)
    mels = torch.linspace(float(_hz_to_mel(f_min)), float(_hz_to_mel(f_max)), n_mels + 2,
                          dtype=torch.float64)
    edges = _mel_to_hz(mels)                                   # [n_mels + 2]
    lo, mid, hi = edges[:-2, None], edges[1:-1, None], edges[2:, None]
    up = (freqs[None, :] - lo) / (mid - lo)
    down = (hi - freqs[None, :]) / (hi - mid)
    return torch.clamp(torch.minimum(up, down), min=0.0).float()


class LogMel:
    """Waveforms ``[..., samples]`` -> natural-log mel power ``[..., n_mels, frames]``.

    Defaults suit the built-in chorale audio: 16 kHz, 1024-point FFT (15.6 Hz bins), hop 256
    (16 ms), 64 bands from 50 Hz to 4 kHz (about one band per semitone above 400 Hz).
    """

    def __init__(self, sample_rate: int = 16000, n_fft: int = 1024, hop_length: int = 256,
                 n_mels: int = 64, f_min: float = 50.0, f_max: float = 4000.0) -> None:
        self.n_fft, self.hop_length = n_fft, hop_length
        self.window = torch.hann_window(n_fft)
        self.fb = mel_filterbank(n_mels, n_fft, sample_rate, f_min, f_max)

    def __call__(self, wave: torch.Tensor) -> torch.Tensor:
        spec = torch.stft(wave, self.n_fft, self.hop_length, window=self.window,
                          return_complex=True, center=True)   # [..., bins, frames]
        power = spec.real.pow(2) + spec.imag.pow(2)
        mel = torch.matmul(self.fb, power)                     # [..., n_mels, frames]
        return torch.log(mel + 1e-6)

    def frames(self, samples: int) -> int:
        """Frames produced for ``samples`` input samples."""
        return 1 + samples // self.hop_length


