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
