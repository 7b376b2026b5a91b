"""Several instrument timbres for the built-in ``emotion`` task (additive synthesis with numpy).

The ``emotion-easy`` task renders every clip with one tone (:func:`.render.render_notes`); the
``emotion`` task draws, per clip, one of :data:`TIMBRES` (a harmonic profile and an
attack/decay envelope) and a room (light reverb and background noise, :class:`Room`), so that a
model has to hear the mode and the tempo through varied sounds rather than in one fixed spectrum.

Everything is deterministic: :func:`draw_rooms` takes a numpy ``Generator`` and
:func:`apply_rooms` a seed; the same ones give the same timbres, rooms and bytes.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache

import numpy as np
import torch

from .render import midi_to_hz, note_spans

__all__ = ["Timbre", "TIMBRES", "Room", "draw_rooms", "render_timbre", "apply_rooms",
           "tone_tables", "NOISE_SNR_DB", "REVERB_WET", "REVERB_SECONDS"]

#: Background noise, signal-to-noise ratio in dB, drawn uniformly per clip.
NOISE_SNR_DB = (6.0, 24.0)
#: Reverb: wet fraction and decay time (to -60 dB), drawn uniformly per clip.
REVERB_WET = (0.0, 0.5)
REVERB_SECONDS = (0.2, 1.2)


@dataclass(frozen=True)
class Timbre:
    """One instrument: partial amplitudes and a note envelope.

    ``amplitudes[h - 1]`` is the amplitude of harmonic ``h`` (the fundamental first); a note's
    envelope is a linear ``attack`` (seconds) then ``exp(-t / decay)`` (``decay`` in seconds;
    ``inf`` sustains), and a 5 ms linear release at the note's end.
    """

    name: str
    amplitudes: tuple[float, ...]
    attack: float
    decay: float


#: The instruments the ``emotion`` task draws from (uniformly, per clip).
TIMBRES: tuple[Timbre, ...] = (
    Timbre("flute", (1.0, 0.25, 0.08), attack=0.04, decay=2.0),
    Timbre("pluck", tuple(1.0 / h for h in range(1, 11)), attack=0.003, decay=0.25),
    Timbre("clarinet", tuple((1.0 / h) if h % 2 else 0.0 for h in range(1, 10)), attack=0.05,
           decay=4.0),
    Timbre("organ", (1.0, 0.8, 0.0, 0.6, 0.0, 0.4, 0.0, 0.35), attack=0.01, decay=float("inf")),
    Timbre("reed", tuple(1.0 / np.sqrt(h) for h in range(1, 11)), attack=0.02, decay=1.0),
    Timbre("hollow", (0.15, 1.0, 0.7, 0.5, 0.3, 0.2), attack=0.08, decay=1.5),
    Timbre("bell", (1.0, 0.0, 0.5, 0.0, 0.0, 0.3, 0.0, 0.2), attack=0.002, decay=0.6),
)


@dataclass(frozen=True)
class Room:
    """One clip's rendering: the timbre (index into :data:`TIMBRES`), reverb and noise."""

    timbre: int
    reverb_wet: float
    reverb_seconds: float
    snr_db: float


def draw_rooms(rng: np.random.Generator, n: int) -> list[Room]:
    """``n`` rooms drawn from ``rng``: timbre uniform over :data:`TIMBRES`, reverb and noise
    uniform over :data:`REVERB_WET`, :data:`REVERB_SECONDS` and :data:`NOISE_SNR_DB`."""
    timbre = rng.integers(0, len(TIMBRES), n)
    wet = rng.uniform(*REVERB_WET, n)
    rt = rng.uniform(*REVERB_SECONDS, n)
    snr = rng.uniform(*NOISE_SNR_DB, n)
    return [Room(int(t), float(w), float(r), float(s)) for t, w, r, s in zip(timbre, wet, rt, snr)]


def tone_tables(pitches: np.ndarray, seconds: float, sample_rate: int
                ) -> tuple[dict[int, int], np.ndarray]:
    """Every timbre's steady tone (no envelope) of each of ``pitches``.

    Returns:
        ``(row, tones)``: ``tones[t, row[pitch]]`` is timbre ``t``'s tone ``[n]`` float32
        (``n = round(seconds * sample_rate)``), partials at or above Nyquist left out.
    """
    n = int(round(seconds * sample_rate))
    t = np.arange(n) / sample_rate
    h_max = max(len(tb.amplitudes) for tb in TIMBRES)
    amps = np.zeros((len(TIMBRES), h_max))
    for i, tb in enumerate(TIMBRES):
        amps[i, :len(tb.amplitudes)] = tb.amplitudes
    pitches = np.unique(pitches)
    tones = np.zeros((len(TIMBRES), len(pitches), n), dtype=np.float32)
    for j, p in enumerate(pitches):
        f = midi_to_hz(p) * np.arange(1, h_max + 1)
        ok = f < sample_rate / 2
        partials = np.sin(2 * np.pi * f[ok, None] * t[None, :])      # [H, n]
        tones[:, j] = amps[:, ok] @ partials
    return {int(p): j for j, p in enumerate(pitches)}, tones


@lru_cache(maxsize=32)
def _envelope(timbre: int, n: int, sample_rate: int) -> np.ndarray:
    t = np.arange(n) / sample_rate
    tb = TIMBRES[timbre]
    return (np.minimum(t / tb.attack, 1.0) * np.exp(-t / tb.decay)).astype(np.float32)


def render_timbre(notes: np.ndarray, bpm: float, timbre: int, tables: tuple[dict[int, int],
                  np.ndarray], seconds: float = 4.0, sample_rate: int = 16000,
                  loop_length: int | None = None) -> np.ndarray:
    """Render ``notes`` like :func:`.render.render_notes` with timbre ``TIMBRES[timbre]``, dry
    (no room; :func:`apply_rooms` adds it) and not normalised.

    Args:
        notes: ``[N, 3]`` (onset, duration, pitch) with onset/duration in 16ths.
        bpm: quarter notes per minute.
        timbre: index into :data:`TIMBRES`.
        tables: :func:`tone_tables` for (at least) the pitches of ``notes``, same ``seconds``
            and ``sample_rate``.
        seconds, sample_rate, loop_length: as in :func:`.render.render_notes`.

    Returns:
        ``[round(seconds * sample_rate)]`` float32.
    """
    row, tones = tables
    n_out = tones.shape[-1]
    env = _envelope(timbre, n_out, sample_rate)
    release = np.linspace(1.0, 0.0, int(0.005 * sample_rate), dtype=np.float32)
    out = np.zeros(n_out, dtype=np.float32)
    for start, length, pitch in note_spans(notes, bpm, seconds, sample_rate, n_out, loop_length):
        note = tones[timbre, row[int(pitch)], :length] * env[:length]
        k = min(len(release), length)
        note[length - k:] *= release[len(release) - k:]
        out[start:start + length] += note
    return out


def apply_rooms(dry: np.ndarray, rooms: list[Room], seed: int, sample_rate: int = 16000,
                chunk: int = 256) -> np.ndarray:
    """Each clip's reverb and noise, then peak normalisation (torch, one thread: same bytes on
    every call).

    Reverb is a circular convolution (the clip loops, so its tail wraps to its start) with
    exponentially decaying white noise (-60 dB after ``reverb_seconds``), mixed in at
    ``reverb_wet``; then white noise at ``snr_db`` below the clip's mean power.

    Args:
        dry: ``[N, n]`` float32 clips (:func:`render_timbre`).
        rooms: ``N`` rooms (:func:`draw_rooms`).
        seed: seeds the reverb and noise samples (a ``torch.Generator``).

    Returns:
        ``[N, n]`` float32, each clip peak-normalised to 1.
    """
    n = dry.shape[1]
    gen = torch.Generator().manual_seed(int(seed))
    out = np.empty_like(dry)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        for i in range(0, len(dry), chunk):
            out[i:i + chunk] = _rooms(torch.from_numpy(dry[i:i + chunk]), rooms[i:i + chunk], gen,
                                      sample_rate, n).numpy()
    finally:
        torch.set_num_threads(threads)
    return out


def _rooms(x: torch.Tensor, rooms: list[Room], gen: torch.Generator, sample_rate: int,
           n: int) -> torch.Tensor:
    wet = torch.tensor([r.reverb_wet for r in rooms])[:, None]
    m = torch.tensor([min(n, int(r.reverb_seconds * sample_rate)) for r in rooms])[:, None]
    t = torch.arange(int(m.max()))[None, :]
    ir = torch.randn(len(rooms), t.shape[1], generator=gen) * torch.exp(-6.9 * t / m) * (t < m)
    ir = ir * (wet / ir.square().sum(1, keepdim=True).sqrt())          # wet: the mix, folded in
    x = torch.fft.irfft(torch.fft.rfft(x) * (1 - wet + torch.fft.rfft(ir, n)), n)
    snr = torch.tensor([r.snr_db for r in rooms])[:, None]
    scale = (x.square().mean(1, keepdim=True) / 10 ** (snr / 10)).sqrt()
    x = torch.randn(x.shape, generator=gen).mul_(scale).add_(x)
    return x.div_(x.abs().amax(1, keepdim=True).clamp_min(1e-12))
