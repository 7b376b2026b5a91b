"""Reference models for the two built-in tasks."""

from __future__ import annotations

import torch
from torch import nn

from .._validate import check_int

__all__ = ["EmotionRecognizer", "EmotionRegressor", "NoteGenerator"]

#: The fewest time frames the four pooling stages need (shorter inputs are zero-padded).
MIN_FRAMES = 32


def _block(c_in: int, c_out: int) -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(c_in, c_out, 3, padding=1, bias=False), nn.BatchNorm2d(c_out),
                         nn.ReLU(inplace=True), nn.MaxPool2d(2))


class EmotionRecognizer(nn.Module):
    """A small CNN: log-mel ``[B, 1, n_mels, T]`` -> class logits ``[B, num_classes]``.

    The input is normalised per example, halved in time, passed through four conv blocks, averaged
    over time (frequency position is kept: it carries the pitches that tell major from minor) and
    classified by a linear layer. ``n_mels`` must be >= 16 (four halvings); an input shorter
    than :data:`MIN_FRAMES` frames is zero-padded (after normalisation) to that length.
    """

    def __init__(self, n_mels: int = 64, num_classes: int = 4, width: int = 16,
                 dropout: float = 0.2) -> None:
        super().__init__()
        check_int("n_mels", n_mels, low=16)  # four 2x poolings
        self.features = nn.Sequential(
            nn.AvgPool2d((1, 2)),
            _block(1, width // 2), _block(width // 2, width), _block(width, 2 * width),
            _block(2 * width, 2 * width),
        )
        self.head = nn.Sequential(nn.Flatten(), nn.Dropout(dropout),
                                  nn.Linear(2 * width * (n_mels // 16), num_classes))

    def forward(self, mel: torch.Tensor) -> torch.Tensor:
        if mel.dim() == 3:
            mel = mel.unsqueeze(1)
        mu = mel.mean(dim=(-2, -1), keepdim=True)
        sd = mel.std(dim=(-2, -1), keepdim=True) + 1e-5
        x = (mel - mu) / sd
        if x.shape[-1] < MIN_FRAMES:
            x = nn.functional.pad(x, (0, MIN_FRAMES - x.shape[-1]))
        h = self.features(x)                             # [B, C, n_mels/16, T']
        return self.head(h.mean(dim=-1))                 # [B, C * n_mels/16] -> [B, classes]


class EmotionRegressor(EmotionRecognizer):
    """The :class:`EmotionRecognizer` CNN with ``num_targets`` real outputs: log-mel
    ``[B, 1, n_mels, T]`` -> ``[B, num_targets]`` (valence, arousal...; train with MSE)."""

    def __init__(self, n_mels: int = 64, num_targets: int = 2, width: int = 16,
                 dropout: float = 0.2) -> None:
        check_int("num_targets", num_targets, low=1)
        super().__init__(n_mels, num_targets, width, dropout)
        self.num_targets = num_targets


class NoteGenerator(nn.Module):
    """An MLP: emotion embedding ``[B, 3]`` -> note logits ``[B, 128]``.

    ``forward`` returns logits (train with ``BCEWithLogitsLoss``, which is safe under autocast);
    :meth:`probabilities` returns the note probabilities.
    """

    def __init__(self, emotion_dim: int = 3, num_pitches: int = 128, hidden: int = 256) -> None:
        super().__init__()
        self.net = nn.Sequential(nn.Linear(emotion_dim, hidden), nn.GELU(),
                                 nn.Linear(hidden, hidden), nn.GELU(),
                                 nn.Linear(hidden, num_pitches))

    def forward(self, emotion: torch.Tensor) -> torch.Tensor:
        return self.net(emotion)

    @torch.no_grad()
    def probabilities(self, emotion: torch.Tensor) -> torch.Tensor:
        """Note probabilities ``[B, 128]`` in [0, 1]."""
        return torch.sigmoid(self.forward(emotion))
