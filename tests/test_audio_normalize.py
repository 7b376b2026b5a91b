"""app/audio/normalize.py: per-utterance and dataset normalisation against NumPy."""

import numpy as np
import pytest
import torch

from advanced_training_utils.app.audio.normalize import (
    STD_FLOOR,
    dataset_stats,
    normalize,
)


def _clips():
    g = torch.Generator().manual_seed(0)
    return [torch.randn(4, n, generator=g) * 3 + 5 for n in (7, 11, 2)]


def test_dataset_stats_match_numpy_over_all_frames():
    clips = _clips()
    frames = np.concatenate([c.numpy().astype(np.float64) for c in clips], axis=1)
    mean, std = dataset_stats(clips)
    assert mean.shape == std.shape == (4, 1) and mean.dtype == std.dtype == torch.float32
    np.testing.assert_allclose(mean.numpy()[:, 0], frames.mean(1), rtol=1e-6)
    np.testing.assert_allclose(std.numpy()[:, 0], frames.std(1), rtol=1e-5)


def test_utterance_mode_gives_zero_mean_unit_std_per_band():
    x = _clips()[0]
    out = normalize(x, "utterance")
    ref = (x.numpy() - x.numpy().mean(1, keepdims=True)) / x.numpy().std(1, keepdims=True)
    np.testing.assert_allclose(out.numpy(), ref, rtol=1e-5, atol=1e-6)


def test_dataset_mode_applies_the_given_stats():
    clips = _clips()
    stats = dataset_stats(clips)
    out = normalize(clips[1], "dataset", stats)
    assert torch.equal(out, (clips[1] - stats[0]) / stats[1])


def test_none_returns_the_input_and_a_constant_band_becomes_zero():
    x = _clips()[0]
    assert normalize(x, "none") is x
    const = torch.full((2, 5), 3.0)
    assert torch.equal(normalize(const, "utterance"), torch.zeros(2, 5))  # std floored, not /0
    assert STD_FLOOR == 1e-3


@pytest.mark.parametrize("mode, stats, message", [
    ("dataset", None, "normalization='dataset' needs stats from dataset_stats()"),
    ("global", None, "normalization must be one of ('utterance', 'dataset', 'none'), got 'global'"),
])
def test_bad_modes_are_named(mode, stats, message):
    with pytest.raises(ValueError, match=message.replace("(", r"\(").replace(")", r"\)")):
        normalize(torch.zeros(2, 3), mode, stats)


def test_dataset_stats_of_nothing_is_an_error():
    with pytest.raises(ValueError, match="at least one feature array"):
        dataset_stats([])
