import pickle

import numpy as np
import pytest
import soundfile as sf

from _audio_corpus import PROBLEMS, sine, wav_header, write_broken
from advanced_training_utils.app.audio.decode import AudioError, load_audio


def _peak_hz(x, rate):
    spec = np.abs(np.fft.rfft(x * np.hanning(len(x))))
    return np.fft.rfftfreq(len(x), 1.0 / rate)[spec.argmax()]


@pytest.mark.parametrize("rate", [8000, 22050, 44100, 16000])
@pytest.mark.parametrize("channels", [1, 2])
@pytest.mark.parametrize("subtype", ["PCM_16", "PCM_24", "FLOAT"])
def test_decode_any_rate_channels_width_to_16k_mono(tmp_path, rate, channels, subtype):
    path = tmp_path / "a.wav"
    sf.write(path, sine(440.0, 0.5, rate, channels), rate, subtype=subtype)
    x = load_audio(path, 16000)
    assert x.dtype == np.float32 and x.ndim == 1
    assert abs(len(x) - 8000) <= 1                               # 0.5 s at 16 kHz
    assert abs(_peak_hz(x, 16000) - 440.0) <= 2.0                # 2 Hz bins
    # mono = mean of channels: amplitudes 0.5 and 0.35 -> 0.425
    amp = 0.5 if channels == 1 else 0.425
    rms = np.sqrt(np.mean(x[800:-800] ** 2))
    assert rms == pytest.approx(amp / np.sqrt(2), rel=0.01)


@pytest.mark.parametrize("fmt, subtype", [("FLAC", "PCM_16"), ("OGG", "VORBIS")])
def test_flac_and_ogg(tmp_path, fmt, subtype):
    path = tmp_path / f"a.{fmt.lower()}"
    sf.write(path, sine(1000.0, 1.0, 22050), 22050, format=fmt, subtype=subtype)
    x = load_audio(path, 16000)
    assert abs(len(x) - 16000) <= 1
    assert abs(_peak_hz(x, 16000) - 1000.0) <= 1.0


def test_resampled_1khz_sine_keeps_its_frequency_and_waveform(tmp_path):
    path = tmp_path / "s.wav"
    sf.write(path, sine(1000.0, 1.0, 44100), 44100, subtype="FLOAT")
    x = load_audio(path, 16000)
    assert len(x) == 16000
    assert _peak_hz(x, 16000) == pytest.approx(1000.0, abs=1.0)   # 1 Hz bins
    # the analytic sine sampled at 16 kHz, away from the edges (filter start-up)
    ref = 0.5 * np.sin(2 * np.pi * 1000.0 * np.arange(16000) / 16000)
    assert np.max(np.abs(x[100:-100] - ref[100:-100])) < 1e-5


def test_downmix_is_the_mean_of_channels(tmp_path):
    left, right = sine(300.0, 0.25, 16000), sine(2000.0, 0.25, 16000, amp=0.2)
    path = tmp_path / "st.wav"
    sf.write(path, np.stack([left, right], axis=1), 16000, subtype="FLOAT")
    np.testing.assert_array_equal(load_audio(path, 16000), (left + right) / np.float32(2))


def test_no_resampling_at_the_file_rate(tmp_path):
    x = sine(700.0, 0.2, 8000)
    sf.write(tmp_path / "a.wav", x, 8000, subtype="FLOAT")
    np.testing.assert_array_equal(load_audio(tmp_path / "a.wav", 8000), x)


@pytest.mark.parametrize("kind", sorted(PROBLEMS))
def test_broken_files_raise_audio_error_naming_file_and_problem(tmp_path, kind):
    path = write_broken(tmp_path)[kind]
    with pytest.raises(AudioError, match=PROBLEMS[kind]) as info:
        load_audio(path)
    err = info.value
    assert err.path == str(path) and str(err).startswith(f"{path}: ")
    # no decoder traceback attached: neither a cause nor a shown context
    assert err.__cause__ is None and (err.__context__ is None or err.__suppress_context__)
    assert isinstance(err, ValueError)


@pytest.mark.parametrize("make, problem", [
    (lambda p: p, "not found"),
    (lambda p: (p.mkdir(), p)[1], "not a file"),
    (lambda p: (p.write_bytes(wav_header(64)), p)[1], "unsupported format"),
    (lambda p: (p.write_bytes(wav_header(0)), p)[1], "unsupported format"),
    (lambda p: (sf.write(p, np.array([0.1, np.nan, 0.2] * 300, np.float32), 16000,
                         subtype="FLOAT"), p)[1], "non-finite"),
    (lambda p: (sf.write(p, np.stack([sine(440, 0.2, 16000), -sine(440, 0.2, 16000)], 1),
                         16000, subtype="FLOAT"), p)[1], "silent"),
])
def test_more_unusable_files(tmp_path, make, problem):
    with pytest.raises(AudioError, match=problem):
        load_audio(make(tmp_path / "x.wav"))


def test_silent_allowed_when_asked(tmp_path):
    path = write_broken(tmp_path)["silent"]
    x = load_audio(path, 16000, allow_silent=True)
    assert x.shape == (8000,) and not x.any()


def test_audio_error_pickles():
    err = pickle.loads(pickle.dumps(AudioError("/a/b.wav", "silent (all samples are zero)")))
    assert (err.path, err.problem, str(err)) == ("/a/b.wav", "silent (all samples are zero)",
                                                 "/a/b.wav: silent (all samples are zero)")


def test_arguments_are_validated(tmp_path):
    with pytest.raises(ValueError, match="sample_rate must be >= 1, got 0"):
        load_audio(tmp_path / "a.wav", 0)
    with pytest.raises(ValueError, match="quality must be one of .*'HQ'.*got 'best'"):
        load_audio(tmp_path / "a.wav", quality="best")


@pytest.mark.parametrize("module", ["soundfile", "soxr"])
def test_missing_extra_says_how_to_install(tmp_path, monkeypatch, module):
    sf.write(tmp_path / "a.wav", sine(440.0, 0.1, 8000), 8000)
    monkeypatch.setitem(__import__("sys").modules, module, None)   # import now fails
    with pytest.raises(ImportError, match=rf"{module} is needed .*advanced-training-utils\[audio\]"):
        load_audio(tmp_path / "a.wav", 16000)
