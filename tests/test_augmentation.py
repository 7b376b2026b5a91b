import pytest
import torch

from advanced_training_utils import SPECAUGMENT_POLICIES, DataAugmentation


def _bands(mask_1d):
    """Contiguous runs of True in a 1-d bool tensor: list of (start, width)."""
    runs, start = [], None
    for i, v in enumerate(mask_1d.tolist() + [False]):
        if v and start is None:
            start = i
        elif not v and start is not None:
            runs.append((start, i - start))
            start = None
    return runs


def test_freq_mask_bounds_over_1000_draws():
    aug = DataAugmentation(seed=1)
    n_f, n_t, param = 64, 50, 15
    x = torch.zeros(1000, n_f, n_t)
    out = aug.augment_audio_features(x, noise_level=0.0, time_mask=False, freq_mask_param=param,
                                     num_freq_masks=1, mask_value=1.0)
    rows = out == 1.0  # [B, F, T]
    assert (rows.all(-1) == rows.any(-1)).all()  # a frequency mask spans every frame
    widths = []
    for b in range(1000):
        bands = _bands(rows[b, :, 0])
        assert len(bands) <= 1
        w = bands[0][1] if bands else 0
        if bands:
            assert 0 <= bands[0][0] <= n_f - w
        widths.append(w)
    assert max(widths) < param
    assert set(widths) == set(range(param))  # every width in [0, param) is drawn


def test_time_mask_capped_by_fraction_and_bounds():
    aug = DataAugmentation(seed=2)
    n_f, n_t = 16, 100
    x = torch.zeros(1000, n_f, n_t)
    out = aug.augment_audio_features(x, noise_level=0.0, freq_mask=False, time_mask_param=40,
                                     num_time_masks=1, max_time_fraction=0.2, mask_value=1.0)
    cols = (out == 1.0)[:, 0, :]
    widths = []
    for b in range(1000):
        bands = _bands(cols[b])
        w = bands[0][1] if bands else 0
        if bands:
            assert 0 <= bands[0][0] <= n_t - w
        widths.append(w)
    assert max(widths) == 20 and min(widths) == 0  # cap = floor(0.2 * 100), inclusive


def test_short_clips_never_wholly_masked():
    aug = DataAugmentation(seed=3)
    x = torch.randn(500, 8, 6)
    out = aug.augment_audio_features(x, noise_level=0.0, policy="LD", mask_value=1e9)
    masked = out == 1e9
    assert not masked.all(dim=1).all(dim=1).any()
    assert not masked[:, :, :].all(dim=2).all(dim=1).any()
    assert ((~masked).sum(dim=(1, 2)) > 0).all()
    assert (~masked.all(dim=2)).any(dim=1).all()  # some bin not fully masked
    assert (~masked.all(dim=1)).any(dim=1).all()  # some frame not fully masked


@pytest.mark.parametrize("shape", [(64, 40), (4, 64, 40), (4, 2, 64, 40)])
def test_shapes_input_untouched_and_seeded(shape):
    x = torch.randn(shape)
    keep = x.clone()
    a = DataAugmentation(seed=7).augment_audio_features(x)
    b = DataAugmentation(seed=7).augment_audio_features(x)
    c = DataAugmentation(seed=8).augment_audio_features(x)
    assert torch.equal(x, keep)
    assert a.shape == x.shape and a.dtype == x.dtype
    assert torch.equal(a, b) and not torch.equal(a, c)


def test_channels_share_mask_examples_differ():
    x = torch.zeros(32, 3, 64, 80)
    out = DataAugmentation(seed=0).augment_audio_features(x, noise_level=0.0, mask_value=1.0)
    m = out == 1.0
    assert torch.equal(m[:, 0], m[:, 1]) and torch.equal(m[:, 0], m[:, 2])
    assert len({tuple(m[i, 0].nonzero().flatten().tolist()) for i in range(32)}) > 10


def test_noise_is_relative_to_example_std():
    aug = DataAugmentation(seed=0)
    x = torch.randn(8, 64, 400) * 50.0
    out = aug.augment_audio_features(x, noise_level=0.1, time_mask=False, freq_mask=False)
    ratio = (out - x).std() / x.std()
    assert 0.09 < ratio < 0.11


def test_policies_are_the_papers():
    assert SPECAUGMENT_POLICIES["LB"] == {"freq_mask_param": 27, "num_freq_masks": 1,
                                          "time_mask_param": 100, "max_time_fraction": 1.0,
                                          "num_time_masks": 1}
    assert SPECAUGMENT_POLICIES["SM"]["time_mask_param"] == 70
    assert SPECAUGMENT_POLICIES["SS"]["max_time_fraction"] == 0.2


def test_emotion_embedding_noise_clamp_unit_norm():
    aug = DataAugmentation(seed=0)
    e = torch.rand(1000, 3) * 2 - 1
    out = aug.augment_emotion_embedding(e, noise_level=0.05)
    assert 0.045 < (out - e).std() < 0.055
    c = aug.augment_emotion_embedding(e, noise_level=0.5, clamp=(-1.0, 1.0))
    assert c.min() >= -1 and c.max() <= 1
    u = aug.augment_emotion_embedding(e, noise_level=0.05, keep_unit_norm=True)
    assert torch.allclose(u.norm(dim=-1), torch.ones(1000), atol=1e-5)


@pytest.mark.parametrize("shape", [(128,), (16, 128), (4, 10, 128)])
def test_note_probabilities_range_and_shape(shape):
    aug = DataAugmentation(seed=0)
    n = torch.rand(shape)
    out = aug.augment_note_probabilities(n, dropout_prob=0.1, noise_level=0.05, max_transpose=3)
    assert out.shape == n.shape
    assert out.min() >= 0 and out.max() <= 1


def test_note_dropout_rate():
    aug = DataAugmentation(seed=0)
    n = torch.full((200, 128), 0.5)
    out = aug.augment_note_probabilities(n, dropout_prob=0.3, noise_level=0.0)
    assert 0.28 < (out == 0).float().mean() < 0.32


def test_transposition_shifts_without_wrap():
    aug = DataAugmentation(seed=0)
    n = torch.zeros(500, 6, 128)
    n[:, :, 0] = 1.0  # lowest pitch
    n[:, :, 127] = 1.0  # highest pitch
    n[:, :, 60] = 1.0  # middle C
    out = aug.augment_note_probabilities(n, dropout_prob=0.0, noise_level=0.0, max_transpose=2)
    shifts = set()
    for b in range(500):
        on = out[b, 0].nonzero().flatten().tolist()
        s = [p - 60 for p in on if 55 <= p <= 65][0]
        shifts.add(s)
        assert torch.equal(out[b], out[b, :1].expand(6, 128))  # one shift for all frames
        expect = {p + s for p in (0, 60, 127) if 0 <= p + s < 128}  # edges dropped, no wrap
        assert set(on) == expect
    assert shifts == {-2, -1, 0, 1, 2}


def test_augmentation_state_dict_continues_stream():
    a = DataAugmentation(seed=5)
    x = torch.randn(4, 64, 40)
    a.augment_audio_features(x)
    state = a.state_dict()
    nxt = a.augment_audio_features(x)
    b = DataAugmentation(seed=5)
    b.load_state_dict(state)
    assert torch.equal(b.augment_audio_features(x), nxt)


def test_global_rng_when_unseeded():
    x = torch.randn(4, 64, 40)
    torch.manual_seed(3)
    a = DataAugmentation().augment_audio_features(x)
    torch.manual_seed(3)
    b = DataAugmentation().augment_audio_features(x)
    assert torch.equal(a, b)


@pytest.mark.parametrize(
    "call, exc, match",
    [
        (lambda a: a.augment_audio_features(torch.randn(5)), ValueError,
         r"mel must be 2-d or 3-d or 4-d, got shape \(5,\)"),
        (lambda a: a.augment_audio_features(torch.ones(4, 4, dtype=torch.long)), TypeError,
         "mel must be a floating-point tensor"),
        (lambda a: a.augment_audio_features([[1.0]]), TypeError, "mel must be a torch.Tensor"),
        (lambda a: a.augment_audio_features(torch.randn(0, 4)), ValueError, "mel must not be empty"),
        (lambda a: a.augment_audio_features(torch.randn(4, 4), noise_level=-1), ValueError,
         "noise_level must be >= 0, got -1"),
        (lambda a: a.augment_audio_features(torch.randn(4, 4), policy="XX"), ValueError,
         "policy must be one of 'LB', 'LD', 'SM', 'SS'; got 'XX'"),
        (lambda a: a.augment_audio_features(torch.randn(4, 4), max_time_fraction=2.0), ValueError,
         r"max_time_fraction must be in \[0, 1\], got 2.0"),
        (lambda a: a.augment_note_probabilities(torch.rand(128), dropout_prob=1.0), ValueError,
         r"dropout_prob must be in \[0, 1\), got 1.0"),
        (lambda a: a.augment_note_probabilities(torch.rand(12), max_transpose=12), ValueError,
         "max_transpose must be <= 11, got 12"),
        (lambda a: a.augment_emotion_embedding(torch.rand(3), clamp=(1, 0)), ValueError,
         "clamp must have low < high"),
    ],
)
def test_rejects_bad_input(call, exc, match):
    with pytest.raises(exc, match=match):
        call(DataAugmentation(seed=0))


def test_constructor_rejects():
    with pytest.raises(ValueError, match="seed must be >= 0, got -1"):
        DataAugmentation(seed=-1)
    with pytest.raises(TypeError, match="generator must be a torch.Generator"):
        DataAugmentation(generator=3)


def test_exact_noise_and_bank_noise_have_the_same_scale():
    x = torch.randn(16, 64, 200) * 3.0
    a = DataAugmentation(seed=1)
    for exact in (True, False):
        out = a.augment_audio_features(x, noise_level=0.2, time_mask=False, freq_mask=False,
                                       exact_noise=exact)
        ratio = float((out - x).std() / x.std())
        assert 0.18 < ratio < 0.22, (exact, ratio)


def test_bank_is_rebuilt_exactly_after_restore_across_refreshes():
    x = torch.randn(4, 32, 40)
    a = DataAugmentation(seed=3)
    for _ in range(70):  # past one bank refresh
        a.augment_audio_features(x)
    state = a.state_dict()
    nxt = [a.augment_audio_features(x) for _ in range(60)]
    b = DataAugmentation(seed=3)
    b.load_state_dict(state)
    assert all(torch.equal(b.augment_audio_features(x), n) for n in nxt)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32, torch.float64])
def test_audio_dtypes_kept(dtype):
    x = torch.randn(3, 16, 20).to(dtype)
    out = DataAugmentation(seed=0).augment_audio_features(x, noise_level=0.1)
    assert out.dtype == dtype and out.shape == x.shape and torch.isfinite(out).all()
