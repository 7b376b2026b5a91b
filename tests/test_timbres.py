"""app/data/timbres.py: the emotion task's instruments and rooms."""

import numpy as np
import pytest

from advanced_training_utils.app.data.timbres import (
    TIMBRES,
    Room,
    apply_rooms,
    draw_rooms,
    render_timbre,
    tone_tables,
)

A4 = np.array([[0, 16, 69]])            # one A4 (440 Hz) for a whole 4/4 bar


def _harmonics(wave, f0=440.0, count=6):
    """Magnitudes at the first ``count`` harmonics of ``f0`` (1-second window from 0.5 s)."""
    spec = np.abs(np.fft.rfft(wave[8000:24000]))     # 1 Hz bins
    return np.array([spec[int(round(f0 * h))] for h in range(1, count + 1)])


def test_each_timbre_has_its_declared_spectrum_and_they_differ():
    tables = tone_tables(np.array([69]), 4.0, 16000)
    profiles = []
    for i, tb in enumerate(TIMBRES):
        mags = _harmonics(render_timbre(A4, 60.0, i, tables))
        declared = np.zeros(6)
        k = min(6, len(tb.amplitudes))
        declared[:k] = tb.amplitudes[:k]
        # the same note, this timbre's partial amplitudes (relative to the strongest)
        assert mags / mags.max() == pytest.approx(declared / declared.max(), abs=0.02), tb.name
        profiles.append(mags / mags.max())
    for i in range(len(profiles)):
        for j in range(i):
            assert np.abs(profiles[i] - profiles[j]).max() > 0.1, (TIMBRES[i].name,
                                                                   TIMBRES[j].name)


def test_envelopes_differ_in_attack_and_decay():
    tables = tone_tables(np.array([69]), 4.0, 16000)
    pluck = [tb.name for tb in TIMBRES].index("pluck")
    organ = [tb.name for tb in TIMBRES].index("organ")
    p, o = (np.abs(render_timbre(A4, 60.0, i, tables)) for i in (pluck, organ))
    # pluck: exp(-t / 0.25): after 1 s its level is ~e^-4 of the start; organ sustains
    assert p[16000:16400].max() < 0.05 * p[:400].max()
    assert o[16000:16400].max() == pytest.approx(o[400:800].max(), rel=0.05)


def test_rooms_are_drawn_deterministically_and_apply_the_snr():
    a = draw_rooms(np.random.default_rng(3), 50)
    assert a == draw_rooms(np.random.default_rng(3), 50)
    assert a != draw_rooms(np.random.default_rng(4), 50)
    assert len({r.timbre for r in a}) == len(TIMBRES)
    tone = np.sin(2 * np.pi * 440 * np.arange(64000) / 16000).astype(np.float32)[None]
    room = Room(timbre=0, reverb_wet=0.0, reverb_seconds=0.5, snr_db=10.0)
    out = apply_rooms(tone, [room], seed=0)
    assert np.array_equal(out, apply_rooms(tone, [room], seed=0))
    assert not np.array_equal(out, apply_rooms(tone, [room], seed=1))
    assert np.abs(out).max() == pytest.approx(1.0)
    spec = np.abs(np.fft.rfft(out[0])) ** 2
    signal = spec[1760 - 2:1760 + 3].sum()            # 440 Hz is bin 1760 of 64000 at 16 kHz
    assert 10 * np.log10(signal / (spec.sum() - signal)) == pytest.approx(10.0, abs=0.5)


def test_reverb_leaves_a_tail_after_the_note():
    tables = tone_tables(np.array([69]), 4.0, 16000)
    pluck = [tb.name for tb in TIMBRES].index("pluck")
    note = np.array([[0, 2, 69]])                      # 0.25 s at 120 bpm, then silence
    dry = render_timbre(note, 120.0, pluck, tables, loop_length=32)[None]
    quiet, wet = (apply_rooms(dry, [Room(pluck, w, 1.0, 80.0)], seed=0) for w in (0.0, 0.5))
    tail = slice(8000, 12000)                         # 0.5-0.75 s: the note ended at 0.25 s
    assert np.abs(wet[0, tail]).max() > 20 * np.abs(quiet[0, tail]).max()
