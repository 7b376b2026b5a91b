"""Feature normalisation: per utterance (default) or with training-set statistics.

* ``"utterance"`` (default): each clip's log-mel bands are shifted and scaled to zero mean and
  unit standard deviation over that clip's own frames (cepstral mean and variance normalisation
  per band). It removes recording gain and channel colouring, which differ between corpora and
  microphones far more than between emotions, and needs no statistics to be stored with a model.
* ``"dataset"``: one mean and standard deviation per band over every frame of the training split,
  applied to all splits (keeps level differences between clips; store the dataset's
  ``norm_stats`` with the model to featurise new audio the same way).
* ``"none"``: features as computed (log power).

Statistics are taken over a clip's real frames, before cropping or padding. Standard deviations
are floored at :data:`STD_FLOOR` (log units) so a constant band becomes 0, not inf.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

__all__ = ["NORMALIZATIONS", "STD_FLOOR", "dataset_stats", "normalize"]

NORMALIZATIONS = ("utterance", "dataset", "none")
STD_FLOOR = 1e-3


def dataset_stats(features: Sequence[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-band ``(mean, std)``, each ``[n_mels, 1]`` float32, over all frames of ``features``
    (each ``[n_mels, F_i]``); accumulated in float64."""
    if not features:
        raise ValueError("dataset_stats needs at least one feature array")
    total = sum(f.double().sum(dim=-1, keepdim=True) for f in features)
    sq = sum(f.double().pow(2).sum(dim=-1, keepdim=True) for f in features)
    n = sum(f.shape[-1] for f in features)
    mean = total / n
    var = torch.clamp(sq / n - mean.pow(2), min=0.0)
    return mean.float(), var.sqrt().float()


def normalize(x: torch.Tensor, mode: str, stats: tuple[torch.Tensor, torch.Tensor] | None = None
              ) -> torch.Tensor:
    """``x`` ``[n_mels, F]`` normalised by ``mode`` (``stats`` from :func:`dataset_stats` for
    ``"dataset"``)."""
    if mode == "none":
        return x
    if mode == "utterance":
        mean = x.mean(dim=-1, keepdim=True)
        std = x.std(dim=-1, keepdim=True, unbiased=False)
    elif mode == "dataset":
        if stats is None:
            raise ValueError("normalization='dataset' needs stats from dataset_stats()")
        mean, std = stats
    else:
        raise ValueError(f"normalization must be one of {NORMALIZATIONS}, got {mode!r}")
    return (x - mean) / torch.clamp(std, min=STD_FLOOR)
