"""Crop and pad log-mel features ``[n_mels, F]`` to a fixed number of frames.

**The default training length** (:func:`choose_crop_seconds`): the 90th percentile of the
training clips' durations, rounded *up* to a multiple of 0.1 s and capped at ``max_seconds``
(10 s). So at least 90 % of training clips are seen whole (padded), the rest are cropped, and a
few very long recordings cannot blow up memory.

**Training** takes a random window of that length from a longer clip; the offset is a pure
function of ``(seed, epoch, index)`` (:func:`random_offset`), so it is the same in any
``DataLoader`` worker and after a resume, and changes each epoch when the dataset is told the
epoch. **Evaluation** takes the centre window (deterministic). Shorter clips start at frame 0
and are padded on the right.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np
import torch

from ..._validate import check_int, check_real

__all__ = ["center_offset", "choose_crop_seconds", "crop_or_pad", "random_offset"]


def choose_crop_seconds(durations: Sequence[float], percentile: float = 90.0,
                        max_seconds: float = 10.0, step: float = 0.1) -> float:
    """The training length in seconds: ``min(ceil(p90 / step) * step, max_seconds)``, >= step."""
    if len(durations) == 0:
        raise ValueError("durations must hold at least one clip length to choose a crop length")
    percentile = check_real("percentile", percentile, low=0.0, high=100.0)
    max_seconds = check_real("max_seconds", max_seconds, low=0.0, low_inclusive=False)
    step = check_real("step", step, low=0.0, low_inclusive=False)
    p = float(np.percentile(np.asarray(durations, dtype=np.float64), percentile))
    rounded = math.ceil(round(p / step, 6)) * step       # round(): 1.0000000001 steps is 1 step
    return round(min(max(rounded, step), max_seconds), 6)


def center_offset(n_frames: int, frames: int) -> int:
    """First frame of the centred ``frames``-long window (0 when the clip is shorter)."""
    return max(0, (n_frames - frames) // 2)


def random_offset(n_frames: int, frames: int, seed: int, epoch: int, index: int) -> int:
    """A uniform offset in ``[0, n_frames - frames]`` drawn from ``(seed, epoch, index)``."""
    if n_frames <= frames:
        return 0
    rng = np.random.default_rng([seed, epoch, index])
    return int(rng.integers(0, n_frames - frames + 1))


def crop_or_pad(x: torch.Tensor, frames: int, offset: int = 0, pad_value: float = 0.0
                ) -> torch.Tensor:
    """``x[..., offset:offset + frames]``, right-padded with ``pad_value`` to ``frames``."""
    frames = check_int("frames", frames, low=1)
    out = x[..., offset:offset + frames]
    short = frames - out.shape[-1]
    if short > 0:
        out = torch.nn.functional.pad(out, (0, short), value=pad_value)
    return out
