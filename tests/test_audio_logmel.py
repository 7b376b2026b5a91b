import math

import numpy as np
import pytest
import torch

from advanced_training_utils.app.audio.logmel import (
    CHORALE_PARAMS,
    LogMel,
    hz_to_mel,
    mel_filterbank,
    mel_to_hz,
)


def _np_hz_to_mel(f, scale):
    f = np.asarray(f, dtype=np.float64)
    if scale == "htk":
        return 2595.0 * np.log10(1.0 + f / 700.0)
    log_part = 15.0 + 27.0 * np.log(np.maximum(f, 1000.0) / 1000.0) / np.log(6.4)
    return np.where(f < 1000.0, 3.0 * f / 200.0, log_part)


def _np_mel_to_hz(m, scale):
    m = np.asarray(m, dtype=np.float64)
    if scale == "htk":
        return 700.0 * (10.0 ** (m / 2595.0) - 1.0)
    return np.where(m < 15.0, 200.0 * m / 3.0, 1000.0 * 6.4 ** ((m - 15.0) / 27.0))


def _np_filterbank(n_mels, n_fft, sr, f_min, f_max, scale="htk", norm=None):
    """Reference: one triangle at a time, in plain numpy loops."""
    edges = _np_mel_to_hz(np.linspace(_np_hz_to_mel(f_min, scale), _np_hz_to_mel(f_max, scale),
                                      n_mels + 2), scale)
    bins = np.arange(n_fft // 2 + 1) * sr / n_fft
    fb = np.zeros((n_mels, len(bins)))
    for k in range(n_mels):
        lo, mid, hi = edges[k], edges[k + 1], edges[k + 2]
        for j, f in enumerate(bins):
            if lo < f <= mid:
                fb[k, j] = (f - lo) / (mid - lo)
            elif mid < f < hi:
                fb[k, j] = (hi - f) / (hi - mid)
        if norm == "slaney":
            fb[k] *= 2.0 / (hi - lo)
    return fb


def _np_logmel(x, sr, n_fft, hop, n_mels, f_min, f_max, eps, scale="htk", norm=None):
    """Reference: reflect-pad, periodic Hann, rfft per frame, filterbank, log (float64)."""
    pad = n_fft // 2
    xp = np.pad(x.astype(np.float64), pad, mode="reflect")
    win = 0.5 - 0.5 * np.cos(2 * np.pi * np.arange(n_fft) / n_fft)
    frames = 1 + len(x) // hop
    spec = np.stack([np.fft.rfft(xp[t * hop:t * hop + n_fft] * win) for t in range(frames)], 1)
    power = np.abs(spec) ** 2                                      # [bins, frames]
    return np.log(_np_filterbank(n_mels, n_fft, sr, f_min, f_max, scale, norm) @ power + eps)


@pytest.mark.parametrize("scale, norm", [("htk", None), ("slaney", None), ("slaney", "slaney"),
                                         ("htk", "slaney")])
def test_filterbank_matches_loop_reference(scale, norm):
    ours = mel_filterbank(40, 512, 16000, 20.0, 8000.0, scale, norm).double().numpy()
    ref = _np_filterbank(40, 512, 16000, 20.0, 8000.0, scale, norm)
    np.testing.assert_allclose(ours, ref, rtol=1e-6, atol=1e-9)


def test_mel_scales_known_values():
    assert float(hz_to_mel(700.0)) == pytest.approx(2595.0 * math.log10(2.0))
    assert float(hz_to_mel(1000.0, "slaney")) == pytest.approx(15.0)
    assert float(hz_to_mel(6400.0, "slaney")) == pytest.approx(42.0)     # 27 bands per x6.4
    assert float(hz_to_mel(500.0, "slaney")) == pytest.approx(7.5)        # linear part
    f = torch.tensor([0.0, 60.0, 999.0, 1000.0, 4321.0, 8000.0], dtype=torch.float64)
    for scale in ("htk", "slaney"):
        torch.testing.assert_close(mel_to_hz(hz_to_mel(f, scale), scale), f)


def test_slaney_norm_gives_unit_area_filters():
    fb = mel_filterbank(40, 4096, 16000, 300.0, 8000.0, "slaney", "slaney").double()
    bin_hz = 16000 / 4096
    torch.testing.assert_close(fb.sum(1) * bin_hz, torch.ones(40, dtype=torch.float64),
                               rtol=0.02, atol=0.0)


@pytest.mark.parametrize("scale, norm", [("htk", None), ("slaney", "slaney")])
def test_logmel_matches_numpy_reference(scale, norm):
    x = torch.randn(4000, generator=torch.Generator().manual_seed(0))
    ours = LogMel(mel_scale=scale, norm=norm)(x).double().numpy()
    ref = _np_logmel(x.numpy(), 16000, 400, 160, 64, 0.0, 8000.0, 1e-6, scale, norm)
    assert ours.shape == ref.shape == (64, 26)
    np.testing.assert_allclose(ours, ref, rtol=0, atol=1e-4)


def test_chorale_preset_is_the_builtin_tasks_features():
    """The built-in tasks compute their log-mels with ``LogMel.chorale()`` (one implementation):
    its filterbank is the HTK one of CHORALE_PARAMS and it runs on the device it is moved to."""
    ours = LogMel.chorale()
    assert {k: v for k, v in ours.params().items() if k in CHORALE_PARAMS} == CHORALE_PARAMS
    assert torch.equal(ours.fb, mel_filterbank(64, 1024, 16000, 50.0, 4000.0))
    assert ours.frames(64000) == 251
    x = torch.randn(2, 16000, generator=torch.Generator().manual_seed(1))
    assert torch.equal(ours.to(torch.device("cpu"))(x), ours(x))


@pytest.mark.parametrize("scale", ["htk", "slaney"])
@pytest.mark.parametrize("freq", [250.0, 1000.0, 3000.0, 6500.0])
def test_sine_energy_lands_in_the_band_centred_nearest(scale, freq):
    t = torch.arange(16000, dtype=torch.float64) / 16000
    x = torch.sin(2 * math.pi * freq * t).float()
    mel = LogMel(mel_scale=scale)(x)                               # [64, 101]
    centres = _np_mel_to_hz(np.linspace(_np_hz_to_mel(0.0, scale), _np_hz_to_mel(8000.0, scale),
                                        66), scale)[1:-1]
    band = int(mel[:, 10:-10].mean(1).argmax())
    assert band == int(np.abs(centres - freq).argmin())


def test_shapes_batch_and_frames():
    m = LogMel()
    x = torch.randn(2, 12345, generator=torch.Generator().manual_seed(2))
    out = m(x)
    assert out.shape == (2, 64, m.frames(12345)) == (2, 64, 1 + 12345 // 160)
    torch.testing.assert_close(out[1], m(x[1]), rtol=0, atol=1e-5)
    nc = LogMel(center=False)
    assert nc(x[0]).shape == (64, nc.frames(12345)) == (64, 1 + (12345 - 400) // 160)
    assert LogMel(win_length=320)(x[0]).shape == (64, 78)


def test_buffers_move_with_the_module_and_stay_out_of_state_dict():
    m = LogMel()
    assert set(dict(m.named_buffers())) == {"window", "fb"}
    assert m.state_dict() == {}
    d = m.double()
    assert d.window.dtype == d.fb.dtype == torch.float64
    assert d(torch.randn(800, dtype=torch.float64)).dtype == torch.float64
    meta = LogMel().to("meta")
    assert meta.window.device.type == meta.fb.device.type == "meta"
    model = torch.nn.Sequential(LogMel(), torch.nn.Flatten())
    assert model.state_dict() == {}


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_runs_on_cuda_like_on_cpu():
    x = torch.randn(2, 16000, generator=torch.Generator().manual_seed(3))
    cpu = LogMel()(x)
    gpu = LogMel().to("cuda")(x.cuda())
    assert gpu.device.type == "cuda"
    torch.testing.assert_close(gpu.cpu(), cpu, rtol=0, atol=1e-3)


@pytest.mark.parametrize("kwargs, match", [
    ({"n_mels": 128, "n_fft": 64}, r"n_mels=128 is too many for n_fft=64 .* contain no FFT bin"),
    ({"f_max": 9000.0}, r"f_max must be in \(0, 8000\], got 9000.0"),
    ({"f_min": 8000.0}, r"f_min must be in \[0, 8000\), got 8000.0"),
    ({"mel_scale": "mfcc"}, r"mel_scale must be one of 'htk', 'slaney'; got 'mfcc'"),
    ({"norm": "area"}, r"norm must be one of None, 'slaney'; got 'area'"),
    ({"win_length": 512}, r"win_length must be <= 400, got 512"),
    ({"hop_length": 0}, r"hop_length must be >= 1, got 0"),
    ({"eps": 0.0}, r"eps must be > 0, got 0.0"),
])
def test_invalid_arguments(kwargs, match):
    with pytest.raises(ValueError, match=match):
        LogMel(**kwargs)


def test_invalid_inputs():
    m = LogMel()
    with pytest.raises(ValueError, match=r"input must be a tensor \[T\] or \[B, T\], got \(1, 2, 800\)"):
        m(torch.zeros(1, 2, 800))
    with pytest.raises(ValueError, match="input has 150 samples; at least 201 are needed"):
        m(torch.zeros(150))
    assert LogMel(pad_mode="constant")(torch.ones(10)).shape == (64, 1)
