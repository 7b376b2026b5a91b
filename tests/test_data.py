import hashlib

import numpy as np
import pytest
import torch

from advanced_training_utils.app.data import (
    EMOTION_CLASSES,
    TIMBRES,
    LogMel,
    chorale_windows,
    emotion_clips,
    emotion_dataset,
    load_chorales,
    mel_filterbank,
    notes_dataset,
    render_notes,
    training_subset,
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
    emotion_dataset(seed=3, per_piece=1, variant="easy")
    assert list((tmp_path / "advanced-training-utils").glob("emotion-*.pt"))


# ----------------------------------------------------------------- the two emotion variants

#: sha256 of ``emotion_clips(seed=0, per_piece=1)`` and ``emotion_dataset(seed=0, per_piece=1)``
#: (keys below, in order: name then raw bytes) computed on main before the ``emotion-easy``
#: variant existed (commit 7435be2; numpy 2.4.6, torch 2.13.0, x86-64). ``emotion-easy`` must
#: keep producing these bytes.
OLD_CLIPS_SHA = "2643a3ebc61d1ae393cf8f62da42932faf847e9c198fac4a00f5b93e61b14aa0"
OLD_DATASET_SHA = "b34b467d3157281d64ab478bd8f0618d162224e5b0a32b9eb41530c540c88569"
OLD_KEYS = ("label", "valence", "arousal", "bpm", "melody", "piece", "split")


def _sha(d, keys):
    h = hashlib.sha256()
    for k in keys:
        v = d[k].numpy() if isinstance(d[k], torch.Tensor) else d[k]
        h.update(k.encode())
        h.update(np.ascontiguousarray(v).tobytes())
    return h.hexdigest()


@pytest.fixture(scope="module")
def clips():
    return {v: emotion_clips(seed=0, per_piece=1, variant=v) for v in ("easy", "varied")}


def test_emotion_easy_is_bit_exact_the_old_emotion_task(clips):
    assert _sha(clips["easy"], ("wave", *OLD_KEYS)) == OLD_CLIPS_SHA
    assert set(clips["easy"]) == {"wave", *OLD_KEYS}
    d = emotion_dataset(seed=0, per_piece=1, variant="easy", use_cache=False)
    assert _sha(d, ("mel", *OLD_KEYS)) == OLD_DATASET_SHA


def _tonic_heard(wave):
    """The key (tonic pitch class) a clip's power spectrum (60 Hz-1 kHz, folded to pitch
    classes) correlates best with."""
    spec = np.abs(np.fft.rfft(wave)) ** 2
    f = np.fft.rfftfreq(len(wave), 1 / 16000)
    ok = (f > 60) & (f < 1000)
    pc = np.round(12 * np.log2(f[ok] / 440.0) + 69).astype(int) % 12
    return _local_keys(np.bincount(pc, weights=spec[ok], minlength=12)[None])[0, 0]


def test_varied_clips_sound_in_the_pieces_own_keys_easy_ones_in_c(clips):
    tonic = load_chorales().piece_tonic[clips["easy"]["piece"]]
    not_c = tonic != 0
    for variant, expect, share in (("varied", tonic, 0.55), ("easy", np.zeros_like(tonic), 0.7)):
        heard = np.array([_tonic_heard(w) for w in clips[variant]["wave"][not_c]])
        assert (heard == expect[not_c]).mean() > share, variant     # measured: 0.66 / 0.76
        assert (heard == (np.zeros_like(tonic) if variant == "varied" else tonic)[not_c]
                ).mean() < 0.1, variant                              # measured: 0.02 / 0.04


def test_windows_keep_their_key_without_transposition():
    ch = load_chorales()
    moved, kept = chorale_windows(), chorale_windows(to_c=False)
    assert [(w.piece, w.start, w.local_key_agrees) for w in moved] == [
        (w.piece, w.start, w.local_key_agrees) for w in kept]
    for a, b in zip(moved, kept):
        tonic = int(ch.piece_tonic[a.piece])
        assert np.array_equal(a.notes[:, :2], b.notes[:, :2])
        assert np.array_equal(b.notes[:, 2] - a.notes[:, 2],
                              np.full(len(a.notes), -(((6 - tonic) % 12) - 6)))


def test_variants_share_windows_tempi_labels_and_the_melody_split(clips):
    easy, varied = clips["easy"], clips["varied"]
    for k in OLD_KEYS:
        assert np.array_equal(easy[k], varied[k]), k
    for m in np.unique(varied["melody"]):
        assert len(set(varied["split"][varied["melody"] == m])) == 1   # no melody in two splits
    assert set(varied["split"]) == {0, 1, 2}


def test_varied_clips_use_every_timbre_drawn_per_clip(clips):
    t = clips["varied"]["timbre"]
    counts = np.bincount(t, minlength=len(TIMBRES))
    assert len(counts) == len(TIMBRES) and counts.min() > 0.5 * len(t) / len(TIMBRES)


def test_varied_clips_are_deterministic(clips):
    torch.manual_seed(1234)                     # the global RNG plays no part (the fixture: 0)
    again = emotion_clips(seed=0, per_piece=1, variant="varied")
    assert _sha(again, ("wave", "timbre", *OLD_KEYS)) == _sha(clips["varied"],
                                                              ("wave", "timbre", *OLD_KEYS))
    assert np.abs(again["wave"]).max() == pytest.approx(1.0)
    assert not np.array_equal(again["wave"], clips["easy"]["wave"])


def test_the_cache_keeps_the_variants_apart(clips):
    easy = emotion_dataset(seed=5, per_piece=1, variant="easy")
    varied = emotion_dataset(seed=5, per_piece=1, variant="varied")
    assert not torch.equal(easy["mel"], varied["mel"])
    same = (varied["timbre"].numpy() == clips["varied"]["timbre"]).mean()
    assert 0.05 < same < 0.3                      # another seed draws other timbres (~1/7 agree)
    again = emotion_dataset(seed=5, per_piece=1, variant="easy")     # from the cache
    assert torch.equal(again["mel"], easy["mel"]) and "timbre" not in again
    with pytest.raises(ValueError, match="variant must be one of 'varied', 'easy'; got 'hard'"):
        emotion_dataset(seed=5, per_piece=1, variant="hard")


def test_training_subsets_are_seeded_nested_and_keep_whole_melodies():
    melodies = np.repeat(np.arange(200), 3)
    split = melody_splits(melodies)
    n_train = len(np.unique(melodies[split == 0]))
    keep = {f: training_subset(melodies, split, f, seed=0) for f in (0.1, 0.3, 1.0)}
    assert keep[1.0].all()
    assert (keep[0.1] <= keep[0.3]).all() and keep[0.1].sum() < keep[0.3].sum()  # nested
    for f in (0.1, 0.3):
        assert keep[f][split != 0].all()                                 # val, test untouched
        kept = np.unique(melodies[keep[f] & (split == 0)])
        assert len(kept) == round(f * n_train)
        assert keep[f][np.isin(melodies, kept)].all()                   # whole melodies
    assert np.array_equal(keep[0.1], training_subset(melodies, split, 0.1, seed=0))
    assert not np.array_equal(keep[0.1], training_subset(melodies, split, 0.1, seed=1))
    assert training_subset(melodies, split, 1e-6, seed=0)[split == 0].sum() == 3  # >= 1 melody
    for bad in (0, 1.5):
        with pytest.raises(ValueError, match=f"train_fraction must be in \\(0, 1\\], got {bad}"):
            training_subset(melodies, split, bad, seed=0)
