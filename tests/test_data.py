import numpy as np
import pytest
import torch

from advanced_training_utils.app.data import (
    EMOTION_CLASSES,
    LogMel,
    chorale_windows,
    emotion_dataset,
    load_chorales,
    mel_filterbank,
    notes_dataset,
    render_notes,
)
from advanced_training_utils.app.data.datasets import _local_keys, melody_splits

pytestmark = pytest.mark.usefixtures("isolated_cache")


def test_bundled_chorales():
    ch = load_chorales()
    assert ch.num_pieces >= 360
    assert set(np.unique(ch.note_voice)) == {0, 1, 2, 3}
    assert ch.note_pitch.min() >= 30 and ch.note_pitch.max() <= 90
    assert set(np.unique(ch.piece_mode)) == {0, 1}
    assert len(np.unique(ch.piece_melody)) < ch.num_pieces  # shared tunes exist


def test_key_finder_on_scales():
    major = np.zeros((12, 12))
    minor = np.zeros((12, 12))
    for t in range(12):
        for step in (0, 2, 4, 5, 7, 9, 11):
            major[t, (t + step) % 12] = 1.0 + (step == 0) + (step == 7)
        for step in (0, 2, 3, 5, 7, 8, 11):
            minor[t, (t + step) % 12] = 1.0 + (step == 0) + (step == 7)
    assert _local_keys(major).tolist() == [[t, 1] for t in range(12)]
    assert _local_keys(minor).tolist() == [[t, 0] for t in range(12)]


def test_windows_transposed_to_c():
    ws = chorale_windows()
    agree = [w for w in ws if w.local_key_agrees]
    assert len(agree) > 1000
    # In C major windows E (4) outweighs Eb (3); in C minor the reverse.
    def weight(w, pc):
        return w.notes[w.notes[:, 2] % 12 == pc, 1].sum()
    maj = [w for w in agree if w.mode == 1]
    mnr = [w for w in agree if w.mode == 0]
    assert sum(weight(w, 4) for w in maj) > 5 * sum(weight(w, 3) for w in maj)
    assert sum(weight(w, 3) for w in mnr) > 5 * sum(weight(w, 4) for w in mnr)


def test_melody_split_keeps_tunes_together():
    melodies = np.array([5, 5, 7, 9, 9, 9, 11, 12, 13, 14, 15, 16, 17])
    split = melody_splits(melodies)
    for m in np.unique(melodies):
        assert len(set(split[melodies == m])) == 1
    assert set(split) <= {0, 1, 2}


def test_render_is_deterministic_and_tempo_dependent():
    notes = np.array([[0, 4, 60], [4, 4, 64], [8, 8, 67]])
    a = render_notes(notes, 120.0)
    b = render_notes(notes, 120.0)
    assert a.dtype == np.float32 and a.shape == (64000,)
    assert np.array_equal(a, b) and np.abs(a).max() == pytest.approx(1.0)
    assert not np.array_equal(a, render_notes(notes, 60.0))


def test_render_pitch_by_fft():
    sig = render_notes(np.array([[0, 16, 69]]), 60.0, harmonics=1)  # A4 for one second
    spec = np.abs(np.fft.rfft(sig[:16000]))
    assert np.argmax(spec) == pytest.approx(440, abs=1)


def test_mel_filterbank_and_logmel():
    fb = mel_filterbank(64, 1024, 16000, 50.0, 4000.0)
    assert fb.shape == (64, 513)
    assert (fb >= 0).all() and fb.max() <= 1.0 + 1e-6
    peaks = fb.argmax(dim=1)
    assert (peaks[1:] >= peaks[:-1]).all()  # centres ascend
    assert fb[:, 513 * 4100 // 8000:].sum() == 0  # nothing above f_max
    wave = torch.from_numpy(render_notes(np.array([[0, 16, 69]]), 60.0, harmonics=1))
    mel = LogMel.chorale()(wave)
    assert mel.shape == (64, LogMel.chorale().frames(64000))
    band = mel[:, 10:50].mean(1).argmax()
    hz_bin = fb[band].argmax() * 8000 / 512
    assert abs(hz_bin - 440) < 40


def test_emotion_dataset_small_and_cached():
    d = emotion_dataset(seed=1, per_piece=1)
    n = len(d["label"])
    assert d["mel"].shape[1:] == (1, 64, 251) and n > 300
    assert torch.isfinite(d["mel"]).all()
    assert set(d["label"].tolist()) == set(range(len(EMOTION_CLASSES)))
    fast = d["bpm"] >= 140
    major = d["valence"] > 0
    expect = torch.where(major, torch.where(fast, 0, 1), torch.where(fast, 3, 2))
    assert torch.equal(d["label"], expect)
    assert ((d["arousal"] > 0) == fast).all()
    again = emotion_dataset(seed=1, per_piece=1)  # from the cache
    assert torch.equal(again["mel"], d["mel"])


def test_notes_dataset():
    d = notes_dataset()
    assert d["emotion"].shape[1] == 3 and d["notes"].shape[1] == 128
    assert d["notes"].min() >= 0 and d["notes"].max() <= 1
    assert d["emotion"].abs().max() <= 1
    four_four = d["length"] == 32
    assert four_four.float().mean() > 0.7
    assert torch.allclose(d["roll"][four_four].mean(1), d["notes"][four_four])
    for m in d["melody"].unique()[:50]:
        assert len(d["split"][d["melody"] == m].unique()) == 1


@pytest.mark.parametrize("advtrain, xdg, expected", [
    ("/a/own", "/x/xdg", "/a/own"),                                  # $ADVTRAIN_CACHE wins
    (None, "/x/xdg", "/x/xdg/advanced-training-utils"),              # then $XDG_CACHE_HOME
    ("", "/x/xdg", "/x/xdg/advanced-training-utils"),                # empty counts as unset
    (None, None, "HOME/.cache/advanced-training-utils"),             # then ~/.cache
    (None, "", "HOME/.cache/advanced-training-utils"),               # XDG: empty is ignored
    (None, "rel/xdg", "HOME/.cache/advanced-training-utils"),        # XDG: relative is ignored
])
def test_cache_dir_precedence(monkeypatch, tmp_path, advtrain, xdg, expected):
    from pathlib import Path

    from advanced_training_utils.app.data.datasets import cache_dir

    monkeypatch.setenv("HOME", str(tmp_path))
    for name, value in (("ADVTRAIN_CACHE", advtrain), ("XDG_CACHE_HOME", xdg)):
        if value is None:
            monkeypatch.delenv(name, raising=False)
        else:
            monkeypatch.setenv(name, value)
    assert cache_dir() == Path(expected.replace("HOME", str(tmp_path)))


def test_dataset_cache_is_written_under_xdg_cache_home(monkeypatch, tmp_path):
    monkeypatch.delenv("ADVTRAIN_CACHE")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    emotion_dataset(seed=3, per_piece=1)
    assert list((tmp_path / "advanced-training-utils").glob("emotion-*.pt"))
