import torch

from advanced_training_utils.app.models import EmotionRecognizer, NoteGenerator


def test_emotion_recognizer_shapes_and_grad():
    m = EmotionRecognizer()
    x = torch.randn(3, 1, 64, 251)
    out = m(x)
    assert out.shape == (3, 4)
    assert m(x[:, 0]).shape == (3, 4)  # [B, F, T] accepted
    out.sum().backward()
    assert all(p.grad is not None for p in m.parameters())


def test_emotion_recognizer_is_scale_invariant_per_example():
    m = EmotionRecognizer().eval()
    x = torch.randn(2, 1, 64, 100)
    assert torch.allclose(m(x), m(x * 3 + 5), atol=1e-4)


def test_note_generator_probabilities():
    m = NoteGenerator()
    p = m.probabilities(torch.randn(5, 3))
    assert p.shape == (5, 128) and p.min() >= 0 and p.max() <= 1
    x = torch.randn(4, 3)
    assert torch.allclose(m.probabilities(x), torch.sigmoid(m(x)))


def test_emotion_recognizer_pads_short_inputs_and_checks_n_mels():
    import pytest

    from advanced_training_utils.app.models import MIN_FRAMES

    m = EmotionRecognizer(n_mels=32, num_classes=3).eval()
    x = torch.randn(2, 1, 32, 10)
    padded = (x - x.mean(dim=(-2, -1), keepdim=True)) / (x.std(dim=(-2, -1), keepdim=True) + 1e-5)
    padded = torch.nn.functional.pad(padded, (0, MIN_FRAMES - 10))
    assert torch.equal(m(x), m.head(m.features(padded).mean(dim=-1)))
    with pytest.raises(ValueError, match="n_mels must be >= 16, got 8"):
        EmotionRecognizer(n_mels=8)


def test_emotion_regressor_outputs_one_value_per_target():
    import pytest

    from advanced_training_utils.app.models import EmotionRegressor

    m = EmotionRegressor(n_mels=32, num_targets=2)
    out = m(torch.randn(3, 1, 32, 40))
    assert out.shape == (3, 2) and m.num_targets == 2
    torch.nn.functional.mse_loss(out, torch.zeros(3, 2)).backward()
    with pytest.raises(ValueError, match="num_targets must be >= 1, got 0"):
        EmotionRegressor(num_targets=0)
