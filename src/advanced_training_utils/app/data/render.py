"""Additive synthesis of note lists to audio with numpy (deterministic, no external assets)."""

from __future__ import annotations

from collections.abc import Iterator
from functools import lru_cache

import numpy as np

__all__ = ["render_notes", "midi_to_hz", "note_spans"]


def midi_to_hz(pitch: np.ndarray | float) -> np.ndarray:
    """Equal temperament, A4 (MIDI 69) = 440 Hz."""
    return 440.0 * 2.0 ** ((np.asarray(pitch, dtype=np.float64) - 69.0) / 12.0)


@lru_cache(maxsize=8)
def _tables(seconds: float, sample_rate: int, harmonics: int) -> tuple[np.ndarray, np.ndarray]:
    """Per MIDI pitch, its tone (sum of partials, no envelope) for ``seconds``; and the envelope.

    A note starting at sample 0 of its own tone is ``tone[:length] * env[:length]``, so rendering
    is one slice multiply-add per note.
    """
    n = int(round(seconds * sample_rate))
    t = np.arange(n) / sample_rate
    h = np.arange(1, harmonics + 1, dtype=np.float64)
    tones = np.zeros((128, n), dtype=np.float32)
    for pitch in range(128):
        f = midi_to_hz(pitch) * h
        ok = f < sample_rate / 2
        if ok.any():
            tones[pitch] = (np.sin(2 * np.pi * f[ok, None] * t[None, :]) / h[ok, None]).sum(0)
    env = (np.minimum(t / 0.01, 1.0) * np.exp(-2.5 * t)).astype(np.float32)
    return tones, env


def render_notes(notes: np.ndarray, bpm: float, seconds: float = 4.0, sample_rate: int = 16000,
                 harmonics: int = 4, loop_length: int | None = None) -> np.ndarray:
    """Render ``notes`` to a mono float32 signal of exactly ``seconds``.

    Args:
        notes: ``[N, 3]`` (onset, duration, pitch) with onset/duration in 16ths.
        bpm: quarter notes per minute; one 16th lasts ``15 / bpm`` seconds.
        seconds: output length; the pattern repeats every ``loop_length`` 16ths until it is full.
        sample_rate: samples per second.
        harmonics: partials per note, amplitude ``1/h``; each note has a 10 ms linear attack
            and an exponential decay (time constant 0.4 s).
        loop_length: the pattern's length in 16ths (default: the end of its last note).

    Returns:
        ``[round(seconds * sample_rate)]`` float32 in [-1, 1] (peak-normalised).
    """
    tones, env = _tables(float(seconds), int(sample_rate), int(harmonics))
    n_out = tones.shape[1]
    out = np.zeros(n_out, dtype=np.float32)
    for start, length, pitch in note_spans(notes, bpm, seconds, sample_rate, n_out, loop_length):
        out[start:start + length] += tones[pitch, :length] * env[:length]
    peak = np.abs(out).max()
    return out / peak if peak > 0 else out


def note_spans(notes: np.ndarray, bpm: float, seconds: float, sample_rate: int, n_out: int,
               loop_length: int | None = None) -> Iterator[tuple[int, int, int]]:
    """``(start sample, length in samples, MIDI pitch)`` of every note of ``notes`` (rows
    ``(onset, duration, pitch)`` in 16ths), the pattern looped until ``seconds`` are filled
    (every ``loop_length`` 16ths; default: the end of its last note); notes are cut at
    ``n_out`` samples."""
    sixteenth = 15.0 / bpm
    span = loop_length or int((notes[:, 0] + notes[:, 1]).max())
    reps = int(np.ceil(seconds / (span * sixteenth))) if span else 1
    for r in range(reps):
        for onset, dur, pitch in notes:
            start = int(round(((r * span + onset) * sixteenth) * sample_rate))
            if start >= n_out:
                continue
            yield start, min(int(round(dur * sixteenth * sample_rate)), n_out - start), pitch
