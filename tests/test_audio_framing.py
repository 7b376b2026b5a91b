import pytest
import torch

from advanced_training_utils.app.audio.framing import (
    center_offset,
    choose_crop_seconds,
    crop_or_pad,
    random_offset,
)
from advanced_training_utils.app.audio.normalize import STD_FLOOR, dataset_stats, normalize


@pytest.mark.parametrize("durations, expected", [
    ([1.0] * 9 + [3.04], 1.3),          # p90 = 1.204 s -> rounded up to 1.3 s
    ([2.0] * 10, 2.0),                  # exactly on the grid stays
    ([0.01] * 5, 0.1),                  # at least one step
    ([30.0, 40.0, 50.0], 10.0),         # capped
    ([0.5, 1.0, 1.5, 2.0, 2.5, 3.0, 3.5, 4.0, 4.5, 5.0], 4.6),   # p90 = 4.55
])
def test_crop_length_rule(durations, expected):
    assert choose_crop_seconds(durations) == expected


def test_crop_length_rule_arguments():
    assert choose_crop_seconds([30.0], max_seconds=4.0) == 4.0
    with pytest.raises(ValueError, match="at least one clip"):
        choose_crop_seconds([])
    with pytest.raises(ValueError, match=r"percentile must be in \[0, 100\], got 120"):
        choose_crop_seconds([1.0], percentile=120)


def test_crop_or_pad_values():
    x = torch.arange(12.0).reshape(2, 6)
    assert torch.equal(crop_or_pad(x, 3, 2), x[:, 2:5])
    padded = crop_or_pad(x, 8, 0, pad_value=-1.0)
    assert torch.equal(padded[:, :6], x) and (padded[:, 6:] == -1).all()
    assert torch.equal(crop_or_pad(x, 4, center_offset(6, 4)), x[:, 1:5])
    assert center_offset(3, 8) == 0


def test_random_offset_is_a_pure_function_of_seed_epoch_index():
    offs = [random_offset(100, 10, 0, 0, i) for i in range(200)]
    assert offs == [random_offset(100, 10, 0, 0, i) for i in range(200)]
    assert min(offs) >= 0 and max(offs) <= 90 and len(set(offs)) > 50
    assert offs != [random_offset(100, 10, 0, 1, i) for i in range(200)]      # next epoch
    assert offs != [random_offset(100, 10, 1, 0, i) for i in range(200)]      # other seed
    assert random_offset(5, 10, 0, 0, 0) == 0


def test_utterance_normalisation_per_band():
    x = torch.randn(4, 50, generator=torch.Generator().manual_seed(0)) * 3 + 7
    x[2] = 5.0                                                    # a constant band
    y = normalize(x, "utterance")
    torch.testing.assert_close(y[[0, 1, 3]].mean(1), torch.zeros(3), atol=1e-5, rtol=0)
    torch.testing.assert_close(y[[0, 1, 3]].std(1, unbiased=False), torch.ones(3), atol=1e-5,
                               rtol=0)
    assert torch.equal(y[2], torch.zeros(50))
    assert torch.equal(normalize(x, "none"), x)


def test_dataset_stats_equal_concatenated_frames():
    g = torch.Generator().manual_seed(1)
    feats = [torch.randn(3, n, generator=g) * 2 + 1 for n in (5, 17, 40)]
    mean, std = dataset_stats(feats)
    cat = torch.cat(feats, dim=1).double()
    torch.testing.assert_close(mean, cat.mean(1, keepdim=True).float())
    torch.testing.assert_close(std, cat.std(1, unbiased=False, keepdim=True).float())
    y = normalize(feats[0], "dataset", (mean, std))
    torch.testing.assert_close(y, (feats[0] - mean) / std.clamp(min=STD_FLOOR))
    with pytest.raises(ValueError, match="needs stats"):
        normalize(feats[0], "dataset")
